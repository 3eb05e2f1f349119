"""A turn reaches the provider at most once: an upstream WebSocket that took the frame and then
sent nothing before ``upstream_websocket.first_event_timeout`` ends the turn with
``upstream_first_event_timeout`` instead of re-sending it over HTTP (the provider may be working
on, and billing, the first copy). Before the frame left, a timeout still falls back to HTTP, and
``upstream_websocket.fallback_after_send = true`` restores the fallback after it (see
``test_first_event_timeout_falls_back_to_http_with_fallback_after_send`` in test_upstream_ws_fallback.py).

Real gateway, real fake upstream, both tunnel modes; the gateway's timers on a ``task.Clock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from conftest import LogWatch, RunningGateway, gateway_config, start_gateway, within
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cch.config import Config, ProviderConfig, UpstreamWebSocketConfig
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.scripts import hold


def turn(client: ResponsesWSClient) -> Deferred[list[Any]]:
    client.send_json(create())
    return Deferred.fromCoroutine(client.recv_turn())


def sockets_gone(running: RunningGateway) -> Deferred[Any]:
    """Fires once every upstream socket of the gateway has finished closing."""
    waiting: list[Deferred[None]] = []
    for conn in list(running.service.ws_pool.sockets):
        d: Deferred[None] = Deferred()
        conn.on_gone.append(lambda _conn, d=d: d.callback(None))
        waiting.append(d)
    return DeferredList(waiting)


def ws_config(fake: FakeUpstream, tunnel: str, base_url: str | None = None, **websocket: Any) -> Config:
    provider = ProviderConfig(name="primary", base_url=base_url or fake.base_url, websocket="on")
    return gateway_config(
        fake,
        tunnel=tunnel,
        upstream="websocket",
        providers=(provider,),
        upstream_websocket=UpstreamWebSocketConfig(**websocket),
    )


@pytest_twisted.async_yield_fixture
async def launch() -> AsyncIterator[Any]:
    """Start gateways on a Clock; at the end each is stopped and must leave nothing behind."""
    started: list[tuple[RunningGateway, Clock]] = []

    async def go(config: Config, clock: Clock) -> RunningGateway:
        running = await start_gateway(config, clock)
        started.append((running, clock))
        return running

    yield go
    for running, clock in started:
        await running.stop()  # asserts: no edge connection, no request, no upstream socket
        assert running.service.ws_pool.entries == {}
        assert [c for c in clock.getDelayedCalls() if c.active()] == []


def count_breaker_failures(running: RunningGateway) -> list[None]:
    """Every ``record_failure`` of the provider's breaker appends to the returned list."""
    breaker = running.service.router.get("primary").breaker
    failures: list[None] = []
    original = breaker.record_failure

    def counting() -> None:
        failures.append(None)
        original()

    breaker.record_failure = counting  # type: ignore[method-assign]
    return failures


@pytest_twisted.ensureDeferred
async def test_silent_upstream_after_the_frame_ends_the_turn_with_upstream_first_event_timeout_and_never_resends_it(
    fake: FakeUpstream, launch: Any, tunnel_mode: str
) -> None:
    clock = Clock()
    fake.enqueue(hold())  # takes the frame, sends nothing
    running = await launch(ws_config(fake, tunnel_mode), clock)
    failures = count_breaker_failures(running)
    client = await running.connect()
    with LogWatch("upstream_ws_first_event_timeout") as logged:
        answer = turn(client)
        await within(fake.wait_for_requests(1), "the frame at the upstream")
        clock.advance(19)
        assert not answer.called
        clock.advance(1)
        events = await within(answer, "the error event")
        entry = await within(logged.seen, "the log event")
    assert events == [
        {
            "type": "error",
            "error": {
                "code": "upstream_first_event_timeout",
                "message": "no upstream event arrived within 20s; the request was not re-sent,"
                " so the client may retry it",
            },
        }
    ]
    assert entry["provider"] == "primary" and isinstance(entry["request_id"], str) and entry["request_id"]
    # The silent socket is closed and forgotten; the provider is not blamed for it.
    assert (await within(fake.wait_for_ws_close(0), "the silent socket to close")).close_code == 1011
    await within(running.service.handler.wait_idle(), "the handler to go idle")
    await within(sockets_gone(running), "the silent socket to be gone")
    assert running.service.ws_pool.sockets == set() and running.service.ws_pool.entries == {}
    assert failures == [] and running.service.router.get("primary").breaker.failures == 0
    assert not running.service.handler.ws_figures.fallbacks
    scraped = running.service.metrics.render().decode()
    assert 'cch_upstream_ws_turn_failures_total{code="upstream_first_event_timeout"} 1.0' in scraped
    # The client connection carries the next turn, on a new upstream socket.
    assert (await within(turn(client), "the next turn"))[-1]["type"] == "response.completed"
    assert client.close_info is None
    # The upstream's HTTP endpoint never saw the turn: it reached the provider once.
    assert [r.transport for r in fake.requests] == ["websocket", "websocket"]
    assert running.service.handler.http_attempts == 0
    assert len(fake.ws_connections) == 2


# --- before the frame left: the handshake never completes ---------------------------------------


class _HoldUpgrades(Resource):
    """Upgrades get no answer at all; POSTs go to the fake."""

    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self.inner = fake.resource().children[b"v1"].children[b"responses"]  # type: ignore[attr-defined]
        self.held: list[Request] = []
        self.waiting: list[Deferred[None]] = []

    def render(self, request: Request) -> Any:
        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            return self.inner.render(request)
        self.held.append(request)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)
        return NOT_DONE_YET

    def upgrade_held(self) -> Deferred[None]:
        if self.held:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d


@pytest_twisted.async_yield_fixture
async def front(fake: FakeUpstream) -> AsyncIterator[Any]:
    v1 = Resource()
    responses = _HoldUpgrades(fake)
    v1.putChild(b"responses", responses)
    root = Resource()
    root.putChild(b"v1", v1)
    site = Site(root)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    responses.base_url = f"http://127.0.0.1:{port.getHost().port}/v1"  # type: ignore[attr-defined]
    yield responses
    await port.stopListening()
    for request in responses.held:
        if request.channel is not None and request.channel.transport is not None:
            request.channel.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_first_event_timeout_while_still_connecting_falls_back_to_http(
    fake: FakeUpstream, front: Any, launch: Any, tunnel_mode: str
) -> None:
    clock = Clock()
    # The first-event deadline comes before the handshake's: the frame never left.
    config = ws_config(fake, tunnel_mode, base_url=front.base_url, first_event_timeout=5, handshake_timeout=10)
    running = await launch(config, clock)
    failures = count_breaker_failures(running)
    client = await running.connect()
    answer = turn(client)
    await within(front.upgrade_held(), "the upgrade request")
    clock.advance(4)
    assert not answer.called and fake.requests == []
    clock.advance(1)
    assert (await within(answer, "the HTTP fallback"))[-1]["type"] == "response.completed"
    assert [r.transport for r in fake.requests] == ["http"]
    assert running.service.handler.ws_figures.fallbacks["ws_error_pre_first_event"] == 1
    assert failures == []
    assert client.close_info is None
