"""One request on an upstream WebSocket, through the pool's exchange, over real sockets.

The rules: docs/reference-behaviour.md#one-request-on-an-upstream-socket. What the first event
(or its absence) resolves to, and how a started stream ends:

* the first event and the stream: the request resolves on the first event; events become SSE;
* failures before the first event: a rejected upgrade (with its status and cacheability), a
  socket ending, a refused connection, the 10-second handshake and 20-second first-event
  timeouts, and cancelling at each stage;
* mid-stream endings: a drop, a close without a terminal, the buffer cap, a stall (and a
  paused consumer that is not one), the consumer cancelling.

A pool on a ``task.Clock`` (``make_pool``) is driven directly against the fake upstream, or a
server that accepts TCP and never answers the upgrade (``silent``). Nothing sleeps.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import upstream_ws_support as support
from conftest import event_types as types
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from upstream_ws_support import (
    CACHEABLE,
    COMPLETED,
    CREATED,
    DELTA,
    NOT_CACHEABLE,
    NOT_CACHEABLE_MORE,
    PROVIDER_KEY,
    RecordingSink,
    SilentServer,
    ask,
    failure_of,
    gone,
    turn,
    turn_failure_of,
)

from cch.testing import FakeUpstream
from cch.testing.scripts import Close, Drop, Event, Script, drop_after, hold, ws_close_after

# The shared fixtures, bound (not imported) so that ruff does not take the test parameters
# for redefinitions of unused imports.
clock = support.clock
make_pool = support.make_pool
silent = support.silent


# --- the first event and the stream ---------------------------------------------------------------


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


# --- failures before the first event --------------------------------------------------------------


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


# --- mid-stream endings ---------------------------------------------------------------------------


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


@pytest_twisted.ensureDeferred
async def test_consumer_cancelling_the_stream_closes_1000(fake: FakeUpstream, make_pool: Any) -> None:
    fake.enqueue(hold([CREATED]))
    pool = make_pool()
    stream = await ask(pool, fake.ws_url)
    done = stream.deliver(RecordingSink())
    done.cancel()
    assert (await fake.wait_for_ws_close(0)).close_code == 1000
    assert pool.entries == {}
