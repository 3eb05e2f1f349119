"""When the gateway uses HTTP instead of the upstream WebSocket, end to end through the edge.

The rules: docs/reference-behaviour.md, "Upstream WebSocket eligibility", "Fallback to HTTP" and
"Unsupported-endpoint cache":

* eligibility: WebSocket switched off (globally or for the provider) and plain HTTP POSTs
  never try it; a POST with the internal markers and the secret does;
* fallback before the first event: a rejected upgrade, the socket ending, the first-event and
  handshake timeouts all fall back to HTTP and none is a breaker failure; a client leaving
  during the handshake gets no fallback;
* the unsupported-endpoint cache: only cacheable statuses are marked, the mark expires (five
  minutes, or the configured TTL), and ``websocket = "on"`` tries anyway.

A client WebSocket goes through the edge (both tunnel modes where it matters) to a gateway
whose provider speaks WebSocket (``launch``, ``ws_config``), with the gateway's timers on a
``task.Clock`` where they matter.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
import upstream_ws_support as support
from conftest import SECRET
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool
from upstream_ws_support import (
    CACHEABLE,
    NOT_CACHEABLE,
    FailureCounter,
    HoldingFront,
    Launch,
    ws_config,
)

from cch.config import UpstreamWebSocketConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import Close, Drop, Script, hold

# The shared fixtures, bound (not imported) so that ruff does not take the test parameters
# for redefinitions of unused imports.
launch = support.launch
front = support.front


# --- eligibility: when the upstream WebSocket is not tried ----------------------------------------


@pytest.mark.parametrize(
    ("setting", "reason"),
    [("global-off", "setting_disabled"), ("provider-off", "provider_websocket_off")],
)
@pytest_twisted.ensureDeferred
async def test_websocket_switched_off_uses_http_without_an_attempt(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str, setting: str, reason: str
) -> None:
    if setting == "global-off":
        config = ws_config(fake, tunnel_mode, upstream_websocket=UpstreamWebSocketConfig(enabled=False))
    else:
        config = ws_config(fake, tunnel_mode, websocket="off")
    running = await launch(config)
    client = await running.connect()
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["http"]
    assert fake.ws_connections == [] and fake.refused_upgrades == []
    figures = running.service.handler.ws_figures
    assert figures.attempts == 0 and figures.fallbacks[reason] == 1


@pytest.mark.parametrize("spoofed", [True, False], ids=["spoofed-markers", "no-markers"])
@pytest_twisted.ensureDeferred
async def test_plain_http_post_never_tries_the_upstream_websocket(
    fake: FakeUpstream, launch: Launch, spoofed: bool
) -> None:
    running = await launch(ws_config(fake, "in-process"))
    headers = {"content-type": "application/json"}
    if spoofed:
        headers.update(
            {
                "x-cch-client-transport": "websocket",
                "x-cch-responses-ws-forward": "1",
                "x-cch-responses-ws-session": "abc",
                "x-cch-internal-secret": "not-the-secret",
            }
        )
    http = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json.dumps({"model": "gpt-5.5", "input": "hi", "stream": True}).encode(),
            headers=headers,
            pool=http,
            reactor=reactor,
        )
        await treq.content(response)
    finally:
        await http.closeCachedConnections()
    assert response.code == 200
    assert [r.transport for r in fake.requests] == ["http"]
    assert running.service.handler.ws_figures.attempts == 0
    assert not any(name.startswith("x-cch-") for name in fake.requests[0].headers)


@pytest_twisted.ensureDeferred
async def test_http_post_with_the_internal_markers_and_secret_uses_the_upstream_websocket(
    fake: FakeUpstream, launch: Launch
) -> None:
    running = await launch(ws_config(fake, "in-process"))
    headers = {
        "content-type": "application/json",
        "x-cch-client-transport": "websocket",
        "x-cch-responses-ws-forward": "1",
        "x-cch-responses-ws-session": "remote-session-1",
        "x-cch-internal-secret": SECRET,
    }
    http = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json.dumps({"model": "gpt-5.5", "input": "hi", "stream": True}).encode(),
            headers=headers,
            pool=http,
            reactor=reactor,
        )
        body = await treq.content(response)
    finally:
        await http.closeCachedConnections()
    assert response.code == 200
    assert b"response.completed" in body
    assert [r.transport for r in fake.requests] == ["websocket"]
    assert set(running.service.ws_pool.entries) == {"remote-session-1"}
    assert not any(name.startswith("x-cch-") for name in fake.ws_connections[0].headers)


# --- fallback to HTTP before the first event ------------------------------------------------------


@pytest.mark.parametrize("status", CACHEABLE + NOT_CACHEABLE)
@pytest_twisted.ensureDeferred
async def test_rejected_upgrade_falls_back_to_http_and_caches_only_cacheable_statuses(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str, status: int
) -> None:
    fake.upgrade_status = status
    running = await launch(ws_config(fake, tunnel_mode, websocket="auto"))
    failures = FailureCounter(running)
    client = await running.connect()
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert client.close_info is None
    assert [r.transport for r in fake.requests] == ["http"]
    assert len(fake.refused_upgrades) == 1
    service = running.service
    assert service.handler.ws_figures.fallbacks["ws_upgrade_rejected"] == 1
    assert failures.count == 0 and failures.breaker.failures == 0
    cached = service.unsupported.lookup("primary", None)
    assert (cached is not None) is (status in CACHEABLE)

    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["http", "http"]
    if status in CACHEABLE:
        assert len(fake.refused_upgrades) == 1  # straight to HTTP, no second upgrade
        assert service.handler.ws_figures.fallbacks["endpoint_ws_unsupported_cached"] == 1
        assert service.handler.ws_figures.attempts == 1
    else:
        assert len(fake.refused_upgrades) == 2  # tried WebSocket again
        assert service.handler.ws_figures.attempts == 2
    assert failures.count == 0
    assert service.ws_pool.sockets == set()


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (Script((Close(1000),)), "ws_closed_before_first_event"),
        (Script((Drop(),)), "ws_error_pre_first_event"),
    ],
    ids=["closed-before-first-event", "error-before-first-event"],
)
@pytest_twisted.ensureDeferred
async def test_socket_ending_before_the_first_event_falls_back_to_http_without_a_breaker_failure(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str, script: Script, reason: str
) -> None:
    fake.enqueue(script)
    running = await launch(ws_config(fake, tunnel_mode, websocket="auto"))
    failures = FailureCounter(running)
    client = await running.connect()
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert client.close_info is None
    assert [r.transport for r in fake.requests] == ["websocket", "http"]
    assert running.service.handler.ws_figures.fallbacks[reason] == 1
    assert failures.count == 0 and failures.breaker.failures == 0
    assert running.service.unsupported.lookup("primary", None) is None
    # Not cacheable: the next turn tries WebSocket again (and gets it).
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert fake.requests[-1].transport == "websocket"
    assert len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_first_event_timeout_falls_back_to_http_with_fallback_after_send(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    gateway_clock = Clock()
    fake.enqueue(hold())
    config = ws_config(fake, tunnel_mode, upstream_websocket=UpstreamWebSocketConfig(fallback_after_send=True))
    running = await launch(config, gateway_clock)
    failures = FailureCounter(running)
    client = await running.connect()
    client.send_json(create())
    await fake.wait_for_requests(1)
    gateway_clock.advance(19)
    assert len(fake.requests) == 1
    gateway_clock.advance(1)
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["websocket", "http"]
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    assert running.service.handler.ws_figures.fallbacks["ws_error_pre_first_event"] == 1
    assert failures.count == 0
    assert client.close_info is None


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_falls_back_to_http(
    fake: FakeUpstream, front: HoldingFront, launch: Launch, tunnel_mode: str
) -> None:
    gateway_clock = Clock()
    running = await launch(ws_config(fake, tunnel_mode, base_url=front.base_url), gateway_clock)
    failures = FailureCounter(running)
    client = await running.connect()
    client.send_json(create())
    await front.upgrade_held(1)
    gateway_clock.advance(9)
    assert fake.requests == []
    gateway_clock.advance(1)
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["http"]
    assert running.service.handler.ws_figures.fallbacks["ws_error_pre_first_event"] == 1
    assert failures.count == 0
    await front.held_connections_gone()


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_the_upstream_handshake_stops_everything(
    fake: FakeUpstream, front: HoldingFront, launch: Launch, tunnel_mode: str
) -> None:
    gateway_clock = Clock()
    running = await launch(ws_config(fake, tunnel_mode, base_url=front.base_url), gateway_clock)
    client = await running.connect()
    client.send_json(create())
    await front.upgrade_held(1)
    await client.abort()
    await front.held_connections_gone()
    await running.service.edge_factory.wait_empty()
    await running.service.handler.wait_idle()
    assert fake.requests == []  # no HTTP fallback after the client left
    assert running.service.ws_pool.sockets == set()
    assert [c for c in gateway_clock.getDelayedCalls() if c.active()] == []


# --- the unsupported-endpoint cache ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provider_websocket_on_still_tries_an_endpoint_cached_as_unsupported(
    fake: FakeUpstream, launch: Launch
) -> None:
    fake.upgrade_status = 426
    running = await launch(ws_config(fake, "in-process", websocket="on"))
    client = await running.connect()
    for _ in range(2):
        client.send_json(create())
        assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert running.service.unsupported.lookup("primary", None) is not None
    assert len(fake.refused_upgrades) == 2


@pytest_twisted.ensureDeferred
async def test_unsupported_mark_expires_after_five_minutes(fake: FakeUpstream, launch: Launch) -> None:
    gateway_clock = Clock()
    fake.upgrade_status = 404
    running = await launch(ws_config(fake, "in-process", websocket="auto"), gateway_clock)
    client = await running.connect()
    client.send_json(create())
    await client.recv_turn()
    gateway_clock.advance(299)
    client.send_json(create())
    await client.recv_turn()
    assert len(fake.refused_upgrades) == 1
    gateway_clock.advance(1)
    fake.upgrade_status = None
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["http", "http", "websocket"]


@pytest_twisted.ensureDeferred
async def test_service_unsupported_cache_is_the_one_the_pipeline_marks(fake: FakeUpstream, launch: Launch) -> None:
    fake.upgrade_status = 426
    running = await launch(ws_config(fake, "in-process", websocket="auto"))
    client = await running.connect()
    client.send_json(create())
    await client.recv_turn()
    assert running.service.unsupported.lookup("primary", None) == "ws_upgrade_rejected"


@pytest_twisted.ensureDeferred
async def test_configured_unsupported_ttl_is_honoured(fake: FakeUpstream, launch: Launch) -> None:
    gateway_clock = Clock()
    fake.upgrade_status = 426
    config = ws_config(
        fake, "in-process", websocket="auto", upstream_websocket=UpstreamWebSocketConfig(unsupported_ttl=60)
    )
    running = await launch(config, gateway_clock)
    client = await running.connect()
    client.send_json(create())
    await client.recv_turn()
    gateway_clock.advance(60)
    client.send_json(create())
    await client.recv_turn()
    assert len(fake.refused_upgrades) == 2  # the mark expired after 60 s: WebSocket tried again
