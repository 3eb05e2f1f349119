"""The upstream Responses WebSocket: adapter, session pool and HTTP fallback.

The rules: docs/reference-behaviour.md, from "Upstream WebSocket eligibility" to
"Unsupported-endpoint cache".

Two levels, all on real sockets on 127.0.0.1:

* unit: an :class:`UpstreamWSPool` on a ``task.Clock`` driven directly (``pool.exchange`` then
  ``Exchange.deliver`` into a recording sink), against the fake upstream or a server that
  accepts TCP and never answers the upgrade;
* end to end: a client WebSocket through the edge (both tunnel modes) to a gateway whose
  provider speaks WebSocket, with the gateway's timers on a ``task.Clock`` where they matter.

Nothing sleeps: every wait is on an I/O event (a frame at the client, a turn or a close at the
fake, a socket gone from the pool) and every timer is moved by ``Clock.advance``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import SECRET, RunningGateway, gateway_config, start_gateway
from conftest import event_types as types
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cch.config import Config, ProviderConfig, UpstreamWebSocketConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import (
    CONNECTION_LIMIT_ERROR,
    Close,
    Delay,
    Drop,
    Event,
    Script,
    drop_after,
    hold,
    ws_close_after,
)
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


# --- unit: success, reuse, retirement ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_event_resolves_the_request_and_the_stream_is_synthesized_sse(
    fake: FakeUpstream, make_pool: Any
) -> None:
    fake.enqueue(Script((Event(CREATED), Event(DELTA), Event(COMPLETED))))
    pool = make_pool()
    stream, sink = await turn(pool, fake.ws_url)
    assert stream.reused is False
    assert sink.status == 200
    assert sink.headers["content-type"] == "text/event-stream"
    assert sink.headers["x-cch-upstream-transport"] == "websocket"
    assert sink.events == [CREATED, DELTA, COMPLETED]
    # Raw upstream text, not re-serialized.
    assert sink.texts[0] == json.dumps(CREATED, separators=(",", ":"))
    assert sink.registered == sink.unregistered == 1 and sink.producer is None
    # Retained for the session, idle, with the 65-minute timer armed on the injected clock.
    entry = pool.entries["sess-1"]
    assert not entry.active and entry.idle_timer is not None and entry.idle_timer.active()
    assert entry.idle_timer.getTime() == pool.clock.seconds() + 3900
    assert fake.ws_connections[0].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert fake.ws_connections[0].headers["originator"] == "codex_exec"


@pytest_twisted.ensureDeferred
async def test_events_arriving_before_deliver_are_replayed_in_order(fake: FakeUpstream, make_pool: Any) -> None:
    fake.enqueue(Script((Event(CREATED), Event(DELTA), Event(DELTA), Event(COMPLETED))))
    pool = make_pool()
    stream = await ask(pool, fake.ws_url)
    await fake.wait_for_finished(0)  # everything has been sent before anyone reads
    await fake.wait_for_requests(1)
    sink = RecordingSink()
    await stream.deliver(sink)
    assert sink.events == [CREATED, DELTA, DELTA, COMPLETED]


@pytest_twisted.ensureDeferred
async def test_same_session_same_fingerprint_reuses_the_socket_and_sends_on_it_at_once(
    fake: FakeUpstream, make_pool: Any
) -> None:
    pool = make_pool()
    first, _ = await turn(pool, fake.ws_url)
    second, sink = await turn(pool, fake.ws_url)
    assert (first.reused, second.reused) == (False, True)
    assert sink.events[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 1
    assert [r.connection_index for r in fake.requests] == [0, 0]
    assert pool.stats["connects"] == 1 and pool.stats["reuses"] == 1


@pytest_twisted.ensureDeferred
async def test_without_a_session_id_every_request_gets_a_fresh_socket_closed_1000(
    fake: FakeUpstream, make_pool: Any
) -> None:
    pool = make_pool()
    await turn(pool, fake.ws_url, session=None)
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    await turn(pool, fake.ws_url, session=None)
    assert (await fake.wait_for_ws_close(1)).close_code == 1000
    assert pool.entries == {}


@pytest.mark.parametrize(
    "terminal",
    [LIMIT_ERROR, SERVER_ERROR, FAILED_AT_LIMIT],
    ids=["connection-limit-error", "any-error", "failed-with-connection-limit-code"],
)
@pytest_twisted.ensureDeferred
async def test_error_terminal_or_connection_limit_retires_the_socket(
    fake: FakeUpstream, make_pool: Any, terminal: dict[str, Any]
) -> None:
    fake.enqueue(Script((Event(CREATED), Event(terminal))))
    pool = make_pool()
    _, sink = await turn(pool, fake.ws_url)
    assert sink.events == [CREATED, terminal]  # passed through as the terminal, not retried
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert pool.entries == {}
    second, _ = await turn(pool, fake.ws_url)
    assert second.reused is False and len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_response_failed_without_the_limit_code_keeps_the_socket(fake: FakeUpstream, make_pool: Any) -> None:
    fake.enqueue(Script((Event(CREATED), Event(FAILED))))
    pool = make_pool()
    await turn(pool, fake.ws_url)
    second, _ = await turn(pool, fake.ws_url)
    assert second.reused is True and len(fake.ws_connections) == 1


@pytest_twisted.ensureDeferred
async def test_busy_session_gets_a_fresh_request_scoped_socket_and_the_active_one_is_untouched(
    fake: FakeUpstream, make_pool: Any
) -> None:
    fake_clock = Clock()
    fake.clock = fake_clock
    fake.enqueue(Script((Event(CREATED), Delay(5), Event(COMPLETED))))
    pool = make_pool()
    first = await ask(pool, fake.ws_url)
    first_sink = RecordingSink()
    first_done = first.deliver(first_sink)
    entry = pool.entries["sess-1"]
    assert entry.active

    second, sink = await turn(pool, fake.ws_url)  # same session while the first is active
    assert second.reused is False
    assert sink.events[-1]["type"] == "response.completed"
    assert pool.stats["busy_fresh"] == 1
    assert (await fake.wait_for_ws_close(1)).close_code == 1000  # request-scoped: closed after its terminal
    assert pool.entries["sess-1"] is entry and entry.active
    assert not fake.ws_connections[0].closed

    fake_clock.advance(5)
    await first_done
    assert first_sink.events == [CREATED, COMPLETED]
    assert pool.entries["sess-1"] is entry and not entry.active
    third, _ = await turn(pool, fake.ws_url)
    assert third.reused is True and len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_cap_reached_with_every_entry_active_does_not_retain_and_closes_after_terminal(
    fake: FakeUpstream, make_pool: Any
) -> None:
    fake_clock = Clock()
    fake.clock = fake_clock
    fake.enqueue(Script((Event(CREATED), Delay(5), Event(COMPLETED))))
    pool = make_pool()
    pool.max_entries = 1
    busy = await ask(pool, fake.ws_url, session="A")
    busy_done = busy.deliver(RecordingSink())

    other, sink = await turn(pool, fake.ws_url, session="B")
    assert sink.events[-1]["type"] == "response.completed"
    assert set(pool.entries) == {"A"}  # the active entry is never pruned
    assert (await fake.wait_for_ws_close(1)).close_code == 1000
    assert not fake.ws_connections[0].closed

    fake_clock.advance(5)
    await busy_done
    assert set(pool.entries) == {"A"}


@pytest_twisted.ensureDeferred
async def test_lru_prune_closes_the_least_recently_used_idle_entry_at_the_cap(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    pool.max_entries = 2
    await turn(pool, fake.ws_url, session="A")  # ws_connections[0]
    clock.advance(1)
    await turn(pool, fake.ws_url, session="B")  # ws_connections[1]
    clock.advance(1)
    reused, _ = await turn(pool, fake.ws_url, session="A")  # A is now the most recently used
    assert reused.reused is True
    clock.advance(1)
    await turn(pool, fake.ws_url, session="C")  # ws_connections[2]; B must go, not A
    assert (await fake.wait_for_ws_close(1)).close_code == 1000
    assert set(pool.entries) == {"A", "C"}
    assert not fake.ws_connections[0].closed and not fake.ws_connections[2].closed
    assert pool.stats["pruned"] == 1


@pytest_twisted.ensureDeferred
async def test_fingerprint_change_replaces_the_socket_and_closes_the_old_one_1000(
    fake: FakeUpstream, make_pool: Any
) -> None:
    pool = make_pool()
    await turn(pool, fake.ws_url)
    old = pool.entries["sess-1"].conn
    changed, _ = await turn(pool, fake.ws_url, headers={**HEADERS, "authorization": "Bearer sk-other-key"})
    assert changed.reused is False
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert pool.entries["sess-1"].conn is not old
    assert fake.ws_connections[1].headers["authorization"] == "Bearer sk-other-key"


@pytest_twisted.ensureDeferred
async def test_idle_timer_closes_the_retained_socket_1000_after_65_minutes(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    await turn(pool, fake.ws_url)
    clock.advance(3899)
    assert set(pool.entries) == {"sess-1"}
    clock.advance(1)
    assert pool.entries == {}
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert pool.stats["idle_closed"] == 1


@pytest_twisted.ensureDeferred
async def test_reuse_cancels_the_idle_timer_and_release_rearms_it(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    await turn(pool, fake.ws_url)
    clock.advance(3000)
    await turn(pool, fake.ws_url)
    clock.advance(3000)  # 6000 s since the first release, 3000 s since the second
    assert set(pool.entries) == {"sess-1"} and not fake.ws_connections[0].closed
    clock.advance(900)
    assert (await fake.wait_for_ws_close(0)).close_code == 1000


@pytest_twisted.ensureDeferred
async def test_cleanup_hook_closes_an_active_socket_1000_and_the_request_ends_with_an_error(
    fake: FakeUpstream, make_pool: Any
) -> None:
    fake.enqueue(hold([CREATED]))
    pool = make_pool()
    stream = await ask(pool, fake.ws_url)
    sink = RecordingSink()
    done = stream.deliver(sink)
    pool.cleanup("sess-1")
    assert pool.entries == {}
    await done
    assert types(sink.events) == ["response.created", "error"]
    assert sink.events[-1]["error"]["code"] == "upstream_ws_closed_mid_stream"
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    pool.cleanup("sess-1")  # no entry: a no-op
    pool.cleanup("never-seen")


@pytest_twisted.ensureDeferred
async def test_close_all_closes_every_socket_1000_retained_active_and_connecting(
    fake: FakeUpstream, silent: SilentServer, make_pool: Any, clock: Clock
) -> None:
    fake.enqueue(hold([CREATED]))
    pool = make_pool()
    active = await ask(pool, fake.ws_url, session="A")
    active_sink = RecordingSink()
    active_done = active.deliver(active_sink)
    await turn(pool, fake.ws_url, session="B")
    connecting = ask(pool, silent.url, session="C")
    await silent.upgrade_received(0)

    await pool.close_all()
    assert pool.sockets == set() and pool.entries == {}
    assert [c for c in clock.getDelayedCalls() if c.active()] == []
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert (await fake.wait_for_ws_close(1)).close_code == 1000
    await active_done
    assert active_sink.events[-1]["type"] == "error"
    failure = await failure_of(connecting)
    assert failure.reason == "ws_error_pre_first_event" and not failure.cacheable
    await silent.lost(0)
    assert silent.connections[0].data.endswith(b"\r\n\r\n")  # nothing after the upgrade request


@pytest_twisted.ensureDeferred
async def test_upstream_closing_a_retained_idle_socket_forgets_it_and_its_idle_timer(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    fake.enqueue(Script((Event(CREATED), Event(COMPLETED), Close(1000))))
    pool = make_pool()
    stream, sink = await turn(pool, fake.ws_url)
    assert sink.events == [CREATED, COMPLETED]
    await gone(stream.conn)
    assert pool.entries == {} and pool.sockets == set()
    assert [c for c in clock.getDelayedCalls() if c.active()] == []
    again, _ = await turn(pool, fake.ws_url)
    assert again.reused is False and len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_silent_reused_socket_times_out_before_the_first_event_and_is_retired_1011(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    await turn(pool, fake.ws_url)
    fake.enqueue(hold())
    d = ask(pool, fake.ws_url)
    await fake.wait_for_requests(2)
    clock.advance(20)
    # The frame went out on the reused socket: the turn ends, it is not handed to HTTP.
    failed = await turn_failure_of(d)
    assert failed.code == "upstream_first_event_timeout"
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_a_paused_stream_is_not_a_stall(fake: FakeUpstream, make_pool: Any, clock: Clock) -> None:
    fake.enqueue(hold([CREATED]))
    pool = make_pool()
    stream = await ask(pool, fake.ws_url)
    sink = RecordingSink()
    done = stream.deliver(sink, idle_timeout=5)
    sink.producer.pauseProducing()  # a slow client: the silence is ours, not the upstream's
    clock.advance(60)
    assert not done.called
    sink.producer.resumeProducing()
    clock.advance(4)
    assert not done.called
    clock.advance(1)
    await done
    assert sink.events[-1]["error"]["code"] == "upstream_idle_timeout"


# --- unit: failures before the first event ---------------------------------------------------


@pytest.mark.parametrize("status", CACHEABLE + NOT_CACHEABLE + NOT_CACHEABLE_MORE)
@pytest_twisted.ensureDeferred
async def test_rejected_upgrade_fails_with_its_status_and_cacheability(
    fake: FakeUpstream, make_pool: Any, status: int
) -> None:
    fake.upgrade_status = status
    pool = make_pool()
    d = ask(pool, fake.ws_url)
    (conn,) = pool.sockets
    failure = await failure_of(d)
    await gone(conn)
    assert failure.reason == "ws_upgrade_rejected"
    assert failure.message is not None and failure.message.startswith(f"HTTP {status}")
    assert failure.cacheable is (status in CACHEABLE)
    assert len(fake.refused_upgrades) == 1 and fake.ws_connections == []
    assert pool.sockets == set() and pool.entries == {}


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (Script((Close(1000),)), "ws_closed_before_first_event"),
        (Script((Close(1011, "nope"),)), "ws_closed_before_first_event"),
        (Script((Drop(),)), "ws_error_pre_first_event"),
    ],
    ids=["close-1000", "close-1011", "drop"],
)
@pytest_twisted.ensureDeferred
async def test_socket_ending_before_the_first_event_is_a_non_cacheable_failure(
    fake: FakeUpstream, make_pool: Any, script: Script, reason: str
) -> None:
    fake.enqueue(script)
    pool = make_pool()
    failure = await failure_of(ask(pool, fake.ws_url))
    assert failure.reason == reason and not failure.cacheable
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_pre_first_event_error(silent: SilentServer, make_pool: Any) -> None:
    url = silent.url
    await silent.port.stopListening()
    pool = make_pool()
    d = ask(pool, url)
    (conn,) = pool.sockets
    failure = await failure_of(d)
    assert failure.reason == "ws_error_pre_first_event" and not failure.cacheable
    await gone(conn)
    assert pool.sockets == set()


@pytest_twisted.ensureDeferred
async def test_first_event_timeout_after_20s_ends_the_turn_and_closes_1011(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    fake.enqueue(hold())
    pool = make_pool()
    d = ask(pool, fake.ws_url)
    await fake.wait_for_requests(1)  # the socket is open and the frame went out
    clock.advance(19)
    assert not d.called
    clock.advance(1)
    failed = await turn_failure_of(d)
    assert failed.code == "upstream_first_event_timeout"
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_first_event_timeout_with_fallback_after_send_is_a_fallback_failure_and_closes_1011(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    fake.enqueue(hold())
    pool = make_pool(fallback_after_send=True)
    d = ask(pool, fake.ws_url)
    await fake.wait_for_requests(1)  # the socket is open and the frame went out
    clock.advance(20)
    failure = await failure_of(d)
    assert (failure.reason, failure.message, failure.cacheable) == (
        "ws_error_pre_first_event",
        "timeout_waiting_for_first_event",
        False,
    )
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_after_10s_aborts_without_a_close_frame(
    silent: SilentServer, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    d = ask(pool, silent.url)
    await silent.upgrade_received(0)
    (conn,) = pool.sockets
    clock.advance(9)
    assert not d.called
    clock.advance(1)
    failure = await failure_of(d)
    assert failure.reason == "ws_error_pre_first_event" and not failure.cacheable
    assert "handshake" in (failure.message or "")
    await gone(conn)
    await silent.lost(0)
    assert silent.connections[0].data.endswith(b"\r\n\r\n")  # only the upgrade request
    assert pool.sockets == set()
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


@pytest_twisted.ensureDeferred
async def test_abort_while_connecting_terminates_and_leaves_nothing_registered(
    silent: SilentServer, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    d = ask(pool, silent.url)
    await silent.upgrade_received(0)
    (conn,) = pool.sockets
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await gone(conn)
    await silent.lost(0)
    assert silent.connections[0].data.endswith(b"\r\n\r\n")  # no close frame after it
    assert conn.close_code_sent is None
    assert pool.sockets == set() and pool.entries == {}
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


@pytest_twisted.ensureDeferred
async def test_abort_before_tcp_connects_leaves_nothing_registered(
    silent: SilentServer, make_pool: Any, clock: Clock
) -> None:
    pool = make_pool()
    d = ask(pool, silent.url)
    (conn,) = pool.sockets
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await gone(conn)
    assert pool.sockets == set() and pool.entries == {}
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


@pytest_twisted.ensureDeferred
async def test_abort_after_open_before_first_event_closes_1000(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    fake.enqueue(hold())
    pool = make_pool()
    d = ask(pool, fake.ws_url)
    await fake.wait_for_requests(1)
    (conn,) = pool.sockets
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    await gone(conn)
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


# --- unit: mid-stream endings ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_drop_mid_stream_ends_with_upstream_ws_mid_stream_error(fake: FakeUpstream, make_pool: Any) -> None:
    fake.enqueue(drop_after([CREATED, DELTA, COMPLETED], 2))
    pool = make_pool()
    stream, sink = await turn(pool, fake.ws_url)
    assert types(sink.events) == ["response.created", "response.output_text.delta", "error"]
    assert sink.events[-1]["error"]["code"] == "upstream_ws_mid_stream_error"
    await gone(stream.conn)
    assert pool.entries == {} and pool.sockets == set()


@pytest.mark.parametrize(
    ("code", "reason", "message"),
    [
        (1000, "", "upstream WebSocket closed (code=1000)"),
        (1001, "going away", "upstream WebSocket closed (code=1001): going away"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_close_without_terminal_ends_with_upstream_ws_closed_mid_stream(
    fake: FakeUpstream, make_pool: Any, code: int, reason: str, message: str
) -> None:
    fake.enqueue(ws_close_after([CREATED, COMPLETED], 1, code=code, reason=reason))
    pool = make_pool()
    _, sink = await turn(pool, fake.ws_url)
    assert sink.events == [CREATED, {"type": "error", "error": {"code": "upstream_ws_closed_mid_stream", "message": message}}]
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_queue_overflow_before_delivery_terminates_the_socket_1011(fake: FakeUpstream, make_pool: Any) -> None:
    big = {"type": "response.output_text.delta", "delta": "x" * 200}
    fake.enqueue(hold([CREATED, big]))
    pool = make_pool(max_buffer_bytes=100)
    stream = await ask(pool, fake.ws_url)
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    sink = RecordingSink()
    await stream.deliver(sink)
    assert sink.events[0] == CREATED
    assert sink.events[-1]["error"] == {
        "code": "upstream_ws_queue_overflow",
        "message": "buffered upstream payload exceeded 100 bytes",
    }
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_stall_mid_stream_ends_with_upstream_idle_timeout_and_closes_1011(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    fake.enqueue(hold([CREATED]))
    pool = make_pool()
    stream = await ask(pool, fake.ws_url)
    sink = RecordingSink()
    done = stream.deliver(sink, idle_timeout=5)
    clock.advance(4)
    assert not done.called
    clock.advance(1)
    await done
    assert sink.events[-1]["error"]["code"] == "upstream_idle_timeout"
    assert (await fake.wait_for_ws_close(0)).close_code == 1011
    assert pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_consumer_cancelling_the_stream_closes_1000(fake: FakeUpstream, make_pool: Any) -> None:
    fake.enqueue(hold([CREATED]))
    pool = make_pool()
    stream = await ask(pool, fake.ws_url)
    done = stream.deliver(RecordingSink())
    done.cancel()
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert pool.entries == {}


# --- end to end through the edge --------------------------------------------------------------


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


# --- the acceptance scenario ----------------------------------------------------------------


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
