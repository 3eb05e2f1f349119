"""Client headers that must not reach a provider, end to end over real sockets: hop-by-hop ones
(``Via``, whatever the client's ``Connection`` header names) and the billing choice
(``OpenAI-Organization`` / ``OpenAI-Project``, unless ``providers[].forward_headers`` lists it),
over the upstream HTTP request and over the upstream WebSocket upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest_twisted
import treq
from conftest import RunningGateway, gateway_config, response_create, start_gateway
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, Config
from cch.testing import FakeUpstream

ALICE = ClientKey(name="alice", key="sk-cch-alice-0123456789")
AUTH = {"authorization": f"Bearer {ALICE.key}"}
# What a client (or a proxy it came through) may send along with its turn.
SENT = {
    "via": "1.1 corp-proxy.internal",
    "openai-organization": "org-chosen-by-the-client",
    "openai-project": "proj-chosen-by-the-client",
    "originator": "codex_exec",
}
DROPPED = ("via", "openai-organization", "openai-project")


def keyed(fake: FakeUpstream, upstream: str, tunnel: str = "in-process", **provider: Any) -> Config:
    """A gateway with client keys (so no keyless-proxy rule is involved) and one provider."""
    config = gateway_config(fake, tunnel=tunnel, upstream=upstream, keys=(ALICE,))
    return replace(config, providers=(replace(config.providers[0], **provider),))


@pytest_twisted.async_yield_fixture
async def running() -> AsyncIterator[list[RunningGateway]]:
    started: list[RunningGateway] = []
    yield started
    for gateway in started:
        await gateway.stop()


async def post_turn(gateway: RunningGateway, headers: dict[str, str]) -> int:
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            gateway.http_url + "/v1/responses",
            json={"model": "gpt-5.5", "input": "hi", "stream": True},
            headers={**AUTH, **headers},
            pool=pool,
            reactor=reactor,
        )
        await treq.content(response)
        return int(response.code)
    finally:
        await pool.closeCachedConnections()


async def ws_turn(gateway: RunningGateway, headers: dict[str, str]) -> None:
    client = await gateway.connect(headers={**AUTH, **headers})
    client.send_json(response_create())
    events = await client.recv_turn()
    assert events[-1]["type"] == "response.completed"


# --- over the upstream HTTP request ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_via_connection_listed_and_billing_headers_do_not_reach_the_provider_over_http(
    fake: FakeUpstream, running: list[RunningGateway]
) -> None:
    gateway = await start_gateway(keyed(fake, "http"))
    running.append(gateway)
    hop = {"connection": "keep-alive, X-Secret-Hop", "x-secret-hop": "for-the-next-hop-only"}
    assert await post_turn(gateway, {**SENT, **hop}) == 200
    (seen,) = fake.requests
    assert seen.transport == "http"
    for name in (*DROPPED, "x-secret-hop"):
        assert name not in seen.headers, name
    assert seen.headers["originator"] == "codex_exec"


@pytest_twisted.ensureDeferred
async def test_forward_headers_let_the_organization_reach_the_provider_over_http(
    fake: FakeUpstream, running: list[RunningGateway]
) -> None:
    gateway = await start_gateway(keyed(fake, "http", forward_headers=("openai-organization",)))
    running.append(gateway)
    assert await post_turn(gateway, SENT) == 200
    (seen,) = fake.requests
    assert seen.headers["openai-organization"] == "org-chosen-by-the-client"
    assert "openai-project" not in seen.headers and "via" not in seen.headers


# --- over the upstream WebSocket upgrade --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_via_and_billing_headers_do_not_reach_the_provider_over_the_upstream_websocket(
    fake: FakeUpstream, running: list[RunningGateway], tunnel_mode: str
) -> None:
    gateway = await start_gateway(keyed(fake, "websocket", tunnel_mode))
    running.append(gateway)
    await ws_turn(gateway, SENT)
    (seen,) = fake.requests
    assert seen.transport == "websocket"
    upgrade = fake.ws_connections[0].headers
    for name in DROPPED:
        assert name not in upgrade, name
    assert upgrade["originator"] == "codex_exec"


@pytest_twisted.ensureDeferred
async def test_forward_headers_let_the_organization_reach_the_provider_over_the_upstream_websocket(
    fake: FakeUpstream, running: list[RunningGateway], tunnel_mode: str
) -> None:
    config = keyed(fake, "websocket", tunnel_mode, forward_headers=("openai-organization",))
    gateway = await start_gateway(config)
    running.append(gateway)
    await ws_turn(gateway, SENT)
    upgrade = fake.ws_connections[0].headers
    assert upgrade["openai-organization"] == "org-chosen-by-the-client"
    assert "openai-project" not in upgrade and "via" not in upgrade


@pytest_twisted.ensureDeferred
async def test_a_header_the_client_upgrade_lists_in_connection_does_not_reach_the_upstream_websocket(
    fake: FakeUpstream, running: list[RunningGateway], tunnel_mode: str
) -> None:
    gateway = await start_gateway(keyed(fake, "websocket", tunnel_mode))
    running.append(gateway)
    # Autobahn writes its own "Connection: Upgrade"; this second line lists one more name.
    await ws_turn(gateway, {"connection": "Upgrade, X-Secret-Hop", "x-secret-hop": "hop-only"})
    upgrade = fake.ws_connections[0].headers
    assert "x-secret-hop" not in upgrade
    assert fake.requests[0].transport == "websocket"
