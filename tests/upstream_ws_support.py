"""What the upstream WebSocket tests share: fake servers, the pool harness, the gateway harness.

Used by tests/test_upstream_ws_*.py:

* events and statuses the tests send and expect (``CREATED``, ``CACHEABLE``, ...);
* waiting on state changes without polling (:class:`Watch`, :func:`gone`) and reading an
  exchange's outcome (:func:`failure_of`, :func:`turn_failure_of`);
* two fake servers on 127.0.0.1: :class:`SilentServer` (accepts TCP, never answers the upgrade)
  and :class:`HoldingFront` (an HTTP front of the fake that holds every WebSocket upgrade);
* the unit harness: a pool on a ``task.Clock`` (``make_pool``), driven with :func:`ask` and
  :func:`turn` into a :class:`RecordingSink`;
* the end-to-end harness: gateways started by ``launch`` from :func:`ws_config`, and a
  :class:`FailureCounter` on the provider's breaker.

The fixtures (``clock``, ``make_pool``, ``silent``, ``front``, ``launch``) are bound by name in
each test module that uses them, which is how pytest finds them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import RunningGateway, gateway_config, start_gateway
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cch.config import Config, ProviderConfig, UpstreamWebSocketConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import CONNECTION_LIMIT_ERROR
from cch.upstream.exchange import Exchange, Failed, NotResent, Outcome
from cch.upstream.pool import Target, UpstreamWSPool
from cch.upstream.ws import CLOSED, UpstreamConnection
from cch.wire import event_type

CREATED = {"type": "response.created", "response": {"id": "resp_u", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "hello"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_u", "status": "completed"}}
LIMIT_ERROR = CONNECTION_LIMIT_ERROR
SERVER_ERROR = {"type": "error", "status": 500, "error": {"type": "server_error", "code": "server_error", "message": "oops"}}
FAILED = {"type": "response.failed", "response": {"id": "resp_u", "status": "failed"}}
FAILED_AT_LIMIT = {
    "type": "response.failed",
    "response": {"id": "resp_u", "status": "failed"},
    "error": {"code": "websocket_connection_limit_reached", "message": "limit"},
}

CACHEABLE = [400, 404, 405, 426, 501]
NOT_CACHEABLE = [401, 403, 500]
NOT_CACHEABLE_MORE = [301, 302, 429, 502, 503]
PROVIDER_KEY = "sk-upstream-0123456789"


# --- waiting on state changes without polling --------------------------------------------------


class Watch:
    """Deferreds that fire once a condition holds; re-checked whenever ``changed`` is called."""

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def until(self, check: Callable[[], bool]) -> Deferred[None]:
        if check():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._pending.append((check, d))
        return d

    def changed(self) -> None:
        for entry in list(self._pending):
            if entry in self._pending and entry[0]():
                self._pending.remove(entry)
                entry[1].callback(None)


def gone(conn: UpstreamConnection) -> Deferred[None]:
    """Fires once the upstream socket has finished closing (its ``on_gone`` hooks ran)."""
    d: Deferred[None] = Deferred()
    if conn.state == CLOSED and not conn.on_gone:  # closed and every hook has run
        d.callback(None)
    else:
        conn.on_gone.append(lambda _conn: d.callback(None))
    return d


class NoEvent(Exception):
    """The exchange ended before its first event (``outcome`` says how)."""

    def __init__(self, outcome: Failed | NotResent) -> None:
        super().__init__(outcome)
        self.outcome = outcome


def _exchange_of(outcome: Outcome) -> Exchange:
    if isinstance(outcome, (Failed, NotResent)):
        raise NoEvent(outcome)
    return outcome.exchange


async def failure_of(d: Deferred[Any]) -> Failed:
    try:
        await d
    except NoEvent as ended:
        assert isinstance(ended.outcome, Failed), ended.outcome
        return ended.outcome
    raise AssertionError("the request did not fail")


async def turn_failure_of(d: Deferred[Any]) -> NotResent:
    try:
        await d
    except NoEvent as ended:
        assert isinstance(ended.outcome, NotResent), ended.outcome
        return ended.outcome
    raise AssertionError("the request did not fail without a fallback")


# --- a server that accepts TCP and never answers (handshake never completes) -------------------


class _SilentProtocol(Protocol):
    factory: SilentServer

    def connectionMade(self) -> None:
        self.data = b""
        self.lost = False
        self.factory.connections.append(self)
        self.factory.watch.changed()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.factory.watch.changed()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.factory.watch.changed()


class SilentServer(Factory):
    """Reads whatever arrives (an HTTP upgrade request) and never writes a byte."""

    protocol = _SilentProtocol
    noisy = False

    def __init__(self) -> None:
        self.connections: list[_SilentProtocol] = []
        self.watch = Watch()
        self.port: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port.getHost().port}/v1/responses"

    def upgrade_received(self, index: int = 0) -> Deferred[None]:
        """Fires once connection ``index`` has sent a complete HTTP upgrade request."""
        return self.watch.until(
            lambda: index < len(self.connections) and self.connections[index].data.endswith(b"\r\n\r\n")
        )

    def lost(self, index: int = 0) -> Deferred[None]:
        return self.watch.until(lambda: index < len(self.connections) and self.connections[index].lost)

    async def stop(self) -> None:
        await maybeDeferred(self.port.stopListening)
        for conn in self.connections:
            if not conn.lost:
                conn.transport.abortConnection()
        await self.watch.until(lambda: all(c.lost for c in self.connections))


@pytest_twisted.async_yield_fixture
async def silent() -> AsyncIterator[SilentServer]:
    server = SilentServer()
    server.port = reactor.listenTCP(0, server, interface="127.0.0.1")
    yield server
    await server.stop()


# --- an HTTP front of the fake that holds every WebSocket upgrade forever ----------------------


class _Tracked(ProtocolWrapper):
    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        try:
            super().connectionLost(reason)
        finally:
            self.factory.watch.changed()  # type: ignore[attr-defined]


class _HoldUpgrades(Resource):
    isLeaf = True

    def __init__(self, inner: Resource, watch: Watch) -> None:
        super().__init__()
        self.inner = inner
        self.watch = watch
        self.held: list[Request] = []

    def render(self, request: Request) -> Any:
        if (request.getHeader(b"upgrade") or b"").lower() == b"websocket":
            self.held.append(request)
            self.watch.changed()
            return NOT_DONE_YET
        return self.inner.render(request)


class HoldingFront:
    """POSTs go to the fake; upgrades get no answer at all (the handshake never completes)."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.watch = Watch()
        inner = fake.resource().children[b"v1"].children[b"responses"]  # type: ignore[attr-defined]
        self.responses = _HoldUpgrades(inner, self.watch)
        v1 = Resource()
        v1.putChild(b"responses", self.responses)
        root = Resource()
        root.putChild(b"v1", v1)
        site = Site(root)
        site.noisy = False
        self.factory = WrappingFactory(site)
        self.factory.protocol = _Tracked
        self.factory.watch = self.watch  # type: ignore[attr-defined]
        self.factory.noisy = False
        self.port: Any = reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/v1"

    def upgrade_held(self, n: int = 1) -> Deferred[None]:
        return self.watch.until(lambda: len(self.responses.held) >= n)

    def held_connections_gone(self) -> Deferred[None]:
        return self.watch.until(lambda: all(r.channel is None or r._disconnected for r in self.responses.held))

    async def stop(self) -> None:
        await self.port.stopListening()
        for proto in list(self.factory.protocols):
            proto.transport.abortConnection()
        await self.watch.until(lambda: not self.factory.protocols)


@pytest_twisted.async_yield_fixture
async def front(fake: FakeUpstream) -> AsyncIterator[HoldingFront]:
    server = HoldingFront(fake)
    yield server
    await server.stop()


# --- unit harness: a pool on a Clock --------------------------------------------------------


class RecordingSink:
    """A ResponseSink that keeps everything it is given."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.texts: list[str] = []
        self.producer: Any = None
        self.registered = 0
        self.unregistered = 0

    @property
    def events(self) -> list[Any]:
        return [json.loads(t) for t in self.texts]

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, dict(headers)

    def sse_event(self, data: str, kind: str | None = None) -> None:
        # The pool finds each event's type once and passes it on: it must be the real one.
        assert kind is None or kind == event_type(data), (kind, data)
        self.texts.append(data)

    def json_body(self, status: int, body: bytes, content_type: str) -> None:
        raise AssertionError("a WebSocket stream never produces a JSON body")

    def register_producer(self, producer: Any) -> None:
        self.producer = producer
        self.registered += 1

    def unregister_producer(self) -> None:
        self.producer = None
        self.unregistered += 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def make_pool(clock: Clock) -> AsyncIterator[Callable[..., UpstreamWSPool]]:
    """Pools on ``clock``; each is closed at the end and must leave nothing behind."""
    pools: list[UpstreamWSPool] = []

    def make(**config: Any) -> UpstreamWSPool:
        pool = UpstreamWSPool(reactor, clock, UpstreamWebSocketConfig(**config))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close_all()
        assert pool.sockets == set()
        assert pool.entries == {}
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


HEADERS = {"authorization": f"Bearer {PROVIDER_KEY}", "user-agent": "codex_cli_rs/0.99", "originator": "codex_exec"}


def ask(
    pool: UpstreamWSPool,
    url: str,
    session: str | None = "sess-1",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> Deferred[Exchange]:
    target = Target.of("primary", url, HEADERS if headers is None else headers, session)
    return pool.exchange(target, json.dumps(create(**fields))).addCallback(_exchange_of)


async def turn(pool: UpstreamWSPool, url: str, session: str | None = "sess-1", **kwargs: Any) -> tuple[Exchange, RecordingSink]:
    stream = await ask(pool, url, session, **kwargs)
    sink = RecordingSink()
    await stream.deliver(sink)
    return stream, sink


# --- end-to-end harness: gateways in front of the fake --------------------------------------------


Launch = Callable[..., Awaitable[RunningGateway]]


@pytest_twisted.async_yield_fixture
async def launch() -> AsyncIterator[Launch]:
    """Start gateways; each is stopped at the end (unless the test stopped it) and must leave
    nothing behind, on its Clock either."""
    started: list[tuple[RunningGateway, Any]] = []

    async def go(config: Config, clock: Any = None) -> RunningGateway:
        running = await start_gateway(config, clock)
        started.append((running, clock))
        return running

    yield go
    for running, gateway_clock in started:
        if running.service.running:
            await running.stop()
        assert running.service.ws_pool.sockets == set()
        assert running.service.ws_pool.entries == {}
        if isinstance(gateway_clock, Clock):
            assert [c for c in gateway_clock.getDelayedCalls() if c.active()] == []


def ws_config(
    fake: FakeUpstream, tunnel: str, websocket: str = "on", *, base_url: str | None = None, **overrides: Any
) -> Config:
    """One provider "primary" with an API key, reached over WebSocket (``websocket`` mode);
    ``idle_timeout``/``api_key`` go to the provider, anything else to the Config."""
    provider_fields = {k: overrides.pop(k) for k in ("idle_timeout", "api_key") if k in overrides}
    provider = ProviderConfig(
        name="primary",
        base_url=base_url or fake.base_url,
        websocket=websocket,
        api_key=provider_fields.pop("api_key", PROVIDER_KEY),
        **provider_fields,
    )
    return gateway_config(fake, tunnel=tunnel, upstream="websocket", providers=(provider,), **overrides)  # type: ignore[arg-type]


class FailureCounter:
    """Counts the provider breaker's failures (a later success resets ``failures``)."""

    def __init__(self, running: RunningGateway) -> None:
        self.breaker = running.service.router.get("primary").breaker
        self.count = 0
        original = self.breaker.record_failure

        def counting() -> None:
            self.count += 1
            original()

        self.breaker.record_failure = counting  # type: ignore[method-assign]
