"""Turns over the upstream WebSocket, end to end through the edge, and the acceptance scenario.

The rules: docs/reference-behaviour.md, "The upstream WebSocket pool" to "The 60-minute
connection cap", and "Upstream headers":

* a turn: the upgrade headers sent upstream, the frame sent, reuse of one socket across turns
  (a ``generate: false`` warm-up included);
* how a turn ends: error terminals, the connection-limit first event retried on a fresh
  socket, a mid-stream drop, a mid-stream stall;
* how the socket ends: the client leaving (between or during turns), the 65-minute idle timer,
  ``stopService`` and ``close_all``;
* the acceptance scenario: five turns on one upstream socket, or five on HTTP after one
  refused upgrade.

A client WebSocket goes through the edge in both tunnel modes to a gateway whose provider
speaks WebSocket (``launch``, ``ws_config``), with the gateway's timers on a ``task.Clock``
where they matter. Eligibility and the HTTP fallback: tests/test_upstream_ws_fallback.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import upstream_ws_support as support
from conftest import event_types as types
from conftest import response_create as create
from twisted.internet.task import Clock
from upstream_ws_support import (
    COMPLETED,
    CREATED,
    DELTA,
    LIMIT_ERROR,
    PROVIDER_KEY,
    SERVER_ERROR,
    FailureCounter,
    Launch,
    ws_config,
)

from cch.testing import FakeUpstream
from cch.testing.scripts import Event, Script, drop_after, hold

# The shared fixture, bound (not imported) so that ruff does not take the test parameters for
# redefinitions of an unused import.
launch = support.launch


# --- a turn over the upstream WebSocket -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_turn_streams_over_one_upstream_socket_with_the_right_upgrade_headers(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect(
        headers={
            "originator": "codex_exec",
            "session_id": "codex-session-1",
            "openai-beta": "responses_websockets=2026-02-06",
            "authorization": "Bearer client-own-key",
            "x-cch-internal-secret": "forged",
            "x-cch-tenant": "t1",
        }
    )
    client.send_json(create())
    events = await client.recv_turn()
    assert events[0]["type"] == "response.created"
    assert "response.output_text.delta" in types(events)
    assert events[-1]["type"] == "response.completed"
    assert client.close_info is None
    (seen,) = fake.requests
    assert seen.transport == "websocket" and seen.connection_index == 0
    headers = fake.ws_connections[0].headers
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert headers["originator"] == "codex_exec"
    assert headers["session_id"] == "codex-session-1"
    assert headers["openai-beta"] == "responses_websockets=2026-02-06"
    assert headers["accept-encoding"] == "identity"
    assert not any(name.startswith("x-cch-") for name in headers)
    assert "accept" not in headers and "content-type" not in headers and "content-length" not in headers
    figures = running.service.handler.ws_figures
    assert (figures.attempts, figures.connected, figures.reused) == (1, 1, 0)
    assert len(running.service.ws_pool.entries) == 1


@pytest_twisted.ensureDeferred
async def test_transport_only_fields_are_stripped_and_type_goes_first(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    frame = create(
        stream=False,
        background=True,
        prompt_cache_key="pck-1",
        instructions="be brief",
        tools=[],
        metadata={"k": "v"},
    )
    client.send_json(frame)
    await client.recv_turn()
    (seen,) = fake.requests
    assert seen.raw.startswith(b'{"type":"response.create"')
    assert "stream" not in seen.body and "background" not in seen.body
    expected = {k: v for k, v in frame.items() if k not in ("stream", "background")}
    assert seen.body == expected


@pytest_twisted.ensureDeferred
async def test_two_turns_reuse_one_upstream_socket(fake: FakeUpstream, launch: Launch, tunnel_mode: str) -> None:
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    for _ in range(2):
        client.send_json(create())
        assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 1
    assert [r.connection_index for r in fake.requests] == [0, 0]
    assert running.service.handler.ws_figures.reused == 1
    assert running.service.ws_pool.stats["connects"] == 1


@pytest_twisted.ensureDeferred
async def test_generate_false_warm_up_then_store_false_continuation_on_the_same_socket(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    client.send_json(create(generate=False, store=False))
    warm = await client.recv_turn()
    assert types(warm) == ["response.created", "response.completed"]
    warm_id = warm[-1]["response"]["id"]
    client.send_json(create(previous_response_id=warm_id, store=False))
    events = await client.recv_turn()
    assert events[-1]["type"] == "response.completed", events[-1]
    assert events[-1]["response"]["previous_response_id"] == warm_id
    assert len(fake.ws_connections) == 1
    assert fake.requests[0].body["generate"] is False
    assert fake.requests[1].body["previous_response_id"] == warm_id
    assert fake.requests[1].connection_index == 0


# --- how a turn ends ------------------------------------------------------------------------------


@pytest.mark.parametrize("terminal", [LIMIT_ERROR, SERVER_ERROR], ids=["connection-limit", "other-error"])
@pytest_twisted.ensureDeferred
async def test_error_terminal_reaches_the_client_and_the_next_turn_opens_a_fresh_socket(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str, terminal: dict[str, Any]
) -> None:
    fake.enqueue(Script((Event(CREATED), Event(terminal))))
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    client.send_json(create())
    assert await client.recv_turn() == [CREATED, terminal]
    assert client.close_info is None
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert len(fake.requests) == 1  # the failed turn is not retried
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 2
    assert fake.requests[1].connection_index == 1
    assert running.service.handler.ws_figures.reused == 0


@pytest_twisted.ensureDeferred
async def test_connection_limit_as_the_first_event_is_retried_on_a_fresh_socket(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    """Continuity (docs/reference-behaviour.md#the-60-minute-connection-cap): the age-cap error
    before anything was delivered is not shown to the client; the socket is closed 1000 and
    forgotten and the turn runs on a new one."""
    fake.enqueue(Script((Event(LIMIT_ERROR),)))
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert len(fake.ws_connections) == 2
    assert [r.connection_index for r in fake.requests] == [0, 1]
    assert running.service.handler.ws_figures.retries["connection_limit"] == 1
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 2 and fake.requests[-1].connection_index == 1


@pytest_twisted.ensureDeferred
async def test_mid_stream_drop_is_a_terminal_error_and_the_next_turn_gets_a_fresh_socket(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    fake.enqueue(drop_after([CREATED, DELTA, COMPLETED], 2))
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    client.send_json(create())
    events = await client.recv_turn()
    assert types(events) == ["response.created", "response.output_text.delta", "error"]
    assert events[-1]["error"]["code"] == "upstream_ws_mid_stream_error"
    assert client.close_info is None
    assert len(fake.requests) == 1  # no fallback after the first event
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_upstream_stall_mid_stream_ends_the_turn_with_upstream_idle_timeout(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    gateway_clock = Clock()
    fake.enqueue(hold([CREATED]))
    running = await launch(ws_config(fake, tunnel_mode, idle_timeout=5), gateway_clock)
    client = await running.connect()
    client.send_json(create())
    assert (await client.recv())["type"] == "response.created"
    gateway_clock.advance(4)
    assert running.service.handler.active == 1
    gateway_clock.advance(1)
    error = await client.recv()
    assert error["type"] == "error" and error["error"]["code"] == "upstream_idle_timeout"
    assert client.close_info is None
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 2


# --- how the socket ends: the client leaving, the idle timer, shutdown ----------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_client_leaving_closes_its_upstream_socket_1000(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str, how: str
) -> None:
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    client.send_json(create())
    await client.recv_turn()
    assert len(running.service.ws_pool.entries) == 1
    await (client.close() if how == "close" else client.abort())
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert running.service.ws_pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_turn_cancels_upstream_and_closes_the_socket_1000(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    fake.enqueue(hold([CREATED]))
    running = await launch(ws_config(fake, tunnel_mode))
    client = await running.connect()
    client.send_json(create())
    assert (await client.recv())["type"] == "response.created"
    await client.abort()
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    await fake.wait_for_cancelled(0)
    await running.service.edge_factory.wait_empty()
    await running.service.handler.wait_idle()
    assert running.service.ws_pool.entries == {}
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_idle_upstream_socket_is_closed_after_65_minutes_and_the_client_stays(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    gateway_clock = Clock()
    running = await launch(ws_config(fake, tunnel_mode), gateway_clock)
    client = await running.connect()
    client.send_json(create())
    await client.recv_turn()
    pool = running.service.ws_pool
    gateway_clock.advance(3899)
    assert len(pool.entries) == 1 and not fake.ws_connections[0].closed
    gateway_clock.advance(1)
    assert pool.entries == {}
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert client.close_info is None
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 2
    assert running.service.handler.ws_figures.reused == 0


@pytest_twisted.ensureDeferred
async def test_stop_service_closes_every_pooled_socket_1000(fake: FakeUpstream, launch: Launch, tunnel_mode: str) -> None:
    running = await launch(ws_config(fake, tunnel_mode))
    clients = [await running.connect() for _ in range(2)]
    for client in clients:
        client.send_json(create())
        await client.recv_turn()
    assert len(running.service.ws_pool.entries) == 2
    await running.service.stopService()
    for index in range(2):
        assert (await fake.wait_for_ws_close(index)).close_code == 1000
    assert running.service.ws_pool.sockets == set()
    assert running.service.ws_pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_pool_close_all_closes_retained_sockets_1000(fake: FakeUpstream, launch: Launch) -> None:
    running = await launch(ws_config(fake, "in-process"))
    client = await running.connect()
    client.send_json(create())
    await client.recv_turn()
    await running.service.ws_pool.close_all()
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert running.service.ws_pool.entries == {}


# --- the acceptance scenario ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_acceptance_five_turns_ride_one_upstream_websocket(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    running = await launch(ws_config(fake, tunnel_mode, websocket="auto"))
    client = await running.connect()
    previous = None
    for _ in range(5):
        fields = {"previous_response_id": previous} if previous else {}
        client.send_json(create(**fields))
        events = await client.recv_turn()
        assert events[-1]["type"] == "response.completed", events[-1]
        previous = events[-1]["response"]["id"]
    assert len(fake.ws_connections) == 1
    assert [(r.transport, r.connection_index) for r in fake.requests] == [("websocket", 0)] * 5
    figures = running.service.handler.ws_figures
    assert (figures.attempts, figures.connected, figures.reused) == (5, 5, 4)
    assert running.service.ws_pool.stats["connects"] == 1
    assert client.close_info is None


@pytest_twisted.ensureDeferred
async def test_acceptance_five_turns_fall_back_to_http_after_one_refused_upgrade(
    fake: FakeUpstream, launch: Launch, tunnel_mode: str
) -> None:
    fake.upgrade_status = 426
    running = await launch(ws_config(fake, tunnel_mode, websocket="auto"))
    failures = FailureCounter(running)
    client = await running.connect()
    for _ in range(5):
        client.send_json(create())
        assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["http"] * 5
    assert len(fake.refused_upgrades) == 1 and fake.ws_connections == []
    service = running.service
    assert service.unsupported.lookup("primary", None) == "ws_upgrade_rejected"
    figures = service.handler.ws_figures
    assert figures.attempts == 1
    assert figures.fallbacks["ws_upgrade_rejected"] == 1
    assert figures.fallbacks["endpoint_ws_unsupported_cached"] == 4
    assert failures.count == 0
    assert client.close_info is None
