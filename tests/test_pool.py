"""The upstream WebSocket pool and one exchange on it, in memory: in-memory sockets
(tests/doubles.py) and a ``task.Clock``, no reactor I/O
(docs/reference-behaviour.md#the-upstream-websocket-pool,
docs/reference-behaviour.md#one-request-on-an-upstream-socket).

Every test leaves nothing behind: after ``stopService`` and every started close completing,
the pool holds no entry and no socket, every socket is closed and the clock has no call.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from cch.config import UpstreamWebSocketConfig
from cch.upstream.exchange import (
    ConnectionLimit,
    Exchange,
    Failed,
    NotResent,
    Outcome,
    PreviousLost,
    Ready,
)
from cch.upstream.pool import Target, UpstreamWSPool
from cch.upstream.ws import CLOSING, OPEN
from tests.doubles import FakeSocket, MemorySink, SocketFactory, failure_of, result_of

URL = "wss://api.example/v1/responses"
HEADERS = {"authorization": "Bearer key-1", "user-agent": "codex"}
FRAME = '{"type":"response.create","model":"m","input":"hi"}'


def target(session: str | None = "s1", *, provider: str = "p1", key: str = "key-1") -> Target:
    return Target.of(
        provider, URL, {"authorization": f"Bearer {key}", "user-agent": "codex"}, session
    )


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


CREATED = event("response.created", response={"id": "resp_1"})
DELTA = event("response.output_text.delta", delta="hel")
COMPLETED = event("response.completed", response={"id": "resp_1", "output": []})
ERROR = event("error", error={"code": "server_error", "message": "boom"})
LIMIT = event(
    "error", error={"code": "websocket_connection_limit_reached", "message": "60 minutes"}
)
NOT_FOUND = event(
    "error",
    error={
        "code": "previous_response_not_found",
        "message": "Previous response with id 'resp_0' not found.",
    },
)


# -- the rig --------------------------------------------------------------------------------------


@dataclass
class Rig:
    clock: Clock
    sockets: SocketFactory
    pool: UpstreamWSPool
    config: UpstreamWebSocketConfig
    sinks: list[MemorySink] = field(default_factory=list)

    def exchange(self, t: Target, frame: str = FRAME) -> Deferred[Outcome]:
        return self.pool.exchange(t, frame)

    def ready(self, t: Target, *, first: str = CREATED) -> tuple[FakeSocket, Exchange]:
        """An exchange on ``t`` up to its first event (opening a new socket when it needs one)."""
        made = len(self.sockets.made)
        reused = self.pool.peek(t)
        d = self.exchange(t)
        if reused is None:
            assert len(self.sockets.made) == made + 1
            sock = self.sockets.last
            sock.open()
        else:
            assert len(self.sockets.made) == made
            sock = next(s for s in self.sockets.made if s.id == reused)
        sock.message(first)
        outcome = result_of(d)
        assert isinstance(outcome, Ready), outcome
        return sock, outcome.exchange

    def turn(self, t: Target) -> FakeSocket:
        """A whole turn: first event, delivery, ``response.completed``."""
        sock, exchange = self.ready(t)
        sink = MemorySink()
        done = exchange.deliver(sink)
        sock.message(COMPLETED)
        result_of(done)
        assert sink.types == ["response.created", "response.completed"]
        return sock

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in self.pool.collect()
            for sample in family.samples
        }

    def event_count(self, name: str) -> float:
        return self.metrics()[("cch_upstream_ws_pool_events_total", (("event", name),))]


@pytest.fixture
def unhandled() -> Iterator[list[dict[str, Any]]]:
    """Fails the test when a Deferred was left with an unhandled failure."""
    seen: list[dict[str, Any]] = []

    def observe(entry: dict[str, Any]) -> None:
        if str(entry.get("log_format", "")).startswith("Unhandled error in Deferred"):
            seen.append(entry)

    globalLogPublisher.addObserver(observe)
    yield seen
    gc.collect()
    globalLogPublisher.removeObserver(observe)
    assert seen == [], "a Deferred was left with an unhandled failure"


@pytest.fixture
def make_rig(unhandled: list[dict[str, Any]]) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(**config: Any) -> Rig:
        clock = Clock()
        sockets = SocketFactory()
        settings = UpstreamWebSocketConfig(**config)
        rig = Rig(
            clock, sockets, UpstreamWSPool(None, clock, settings, open_socket=sockets), settings
        )
        rig.pool.startService()
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        stopped = rig.pool.stopService()
        rig.sockets.settle()
        result_of(stopped)
        assert rig.pool.entries == {}
        assert rig.pool.sockets == set()
        assert rig.sockets.not_closed() == []
        assert rig.clock.getDelayedCalls() == []


@pytest.fixture
def rig(make_rig: Any) -> Rig:
    return make_rig()


# -- one exchange ---------------------------------------------------------------------------------


def test_frame_waits_for_the_open_socket_then_first_event_readies_the_exchange(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    assert sock.connects == 1 and sock.target == target()
    assert sock.sent == [] and not d.called
    sock.open()
    assert sock.sent == [FRAME] and not d.called
    sock.message(CREATED)
    outcome = result_of(d)
    assert isinstance(outcome, Ready)
    assert outcome.exchange.reused is False
    assert outcome.exchange.socket_id == sock.id


def test_deliver_replays_queued_events_in_order_then_forwards_live_ones_with_their_type(
    rig: Rig,
) -> None:
    sock, exchange = rig.ready(target())
    sock.message(DELTA)
    sink = MemorySink()
    done = exchange.deliver(sink)
    assert sink.started == [
        (200, {"content-type": "text/event-stream", "x-cch-upstream-transport": "websocket"})
    ]
    assert sink.events == [(CREATED, "response.created"), (DELTA, "response.output_text.delta")]
    assert sink.producer is not None
    sock.message(DELTA)
    assert not done.called
    sock.message(COMPLETED)
    result_of(done)
    assert sink.events[2:] == [
        (DELTA, "response.output_text.delta"),
        (COMPLETED, "response.completed"),
    ]
    assert sink.unregistered == 1
    assert sock.state == OPEN and sock.close_code is None  # kept for the session
    assert rig.pool.entries["s1"].conn is sock


def test_same_session_and_fingerprint_reuses_the_idle_socket_and_sends_at_once(rig: Rig) -> None:
    sock = rig.turn(target())
    d = rig.exchange(target(), '{"type":"response.create","n":2}')
    assert len(rig.sockets.made) == 1
    assert sock.sent == [FRAME, '{"type":"response.create","n":2}']
    sock.message(CREATED)
    outcome = result_of(d)
    assert isinstance(outcome, Ready) and outcome.exchange.reused is True
    outcome.exchange.discard()
    assert rig.event_count("reuses") == 1 and rig.event_count("connects") == 1


def test_peek_names_the_socket_exchange_would_reuse_and_none_when_it_would_open_one(
    rig: Rig,
) -> None:
    assert rig.pool.peek(target()) is None
    sock = rig.turn(target())
    assert rig.pool.peek(target()) == sock.id
    assert rig.pool.peek(target(key="key-2")) is None  # another fingerprint
    assert rig.pool.peek(target("s2")) is None
    assert rig.pool.peek(target(None)) is None
    _, exchange = rig.ready(target())
    assert rig.pool.peek(target()) is None  # busy
    exchange.discard()


def test_without_a_session_each_exchange_gets_its_own_socket_closed_1000_after_its_turn(
    rig: Rig,
) -> None:
    first = rig.turn(target(None))
    assert first.state == CLOSING and first.close_code == 1000
    second = rig.turn(target(None))
    assert second is not first and second.close_code == 1000
    assert rig.pool.entries == {}


# -- which socket a session gets --------------------------------------------------------------------


def test_other_fingerprint_keeps_the_idle_socket_until_the_new_one_sends_its_first_event(
    rig: Rig,
) -> None:
    old = rig.turn(target())
    d = rig.exchange(target(key="key-2"))
    new = rig.sockets.last
    assert new is not old
    new.open()
    assert old.state == OPEN and rig.pool.entries["s1"].conn is old
    new.message(CREATED)
    assert old.state == CLOSING and old.close_code == 1000
    assert rig.pool.entries["s1"].conn is new
    result_of(d).exchange.discard()


def test_other_fingerprint_failing_before_its_first_event_leaves_the_session_its_socket(
    rig: Rig,
) -> None:
    old = rig.turn(target())
    d = rig.exchange(target(provider="p2"))
    rig.sockets.last.fail("connection refused")
    assert result_of(d) == Failed("ws_error_pre_first_event", "connection refused")
    assert old.state == OPEN and rig.pool.entries["s1"].conn is old
    assert rig.pool.peek(target()) == old.id


def test_busy_session_gets_a_request_scoped_socket_closed_1000_after_its_turn(rig: Rig) -> None:
    busy, exchange = rig.ready(target())
    sock = rig.turn(target())
    assert sock is not busy
    assert sock.close_code == 1000
    assert busy.state == OPEN and busy.close_code is None
    assert rig.pool.entries["s1"].conn is busy
    assert rig.event_count("busy_fresh") == 1
    exchange.discard()


def test_busy_sessions_extra_socket_never_replaces_the_sessions_socket(rig: Rig) -> None:
    busy, exchange = rig.ready(target())
    d = rig.exchange(target())
    extra = rig.sockets.last
    extra.open()
    sink = MemorySink()
    done = exchange.deliver(sink)
    busy.message(COMPLETED)  # the session's socket is idle again before the extra one's first event
    result_of(done)
    extra.message(CREATED)
    assert rig.pool.entries["s1"].conn is busy and busy.state == OPEN
    outcome = result_of(d)
    sink = MemorySink()
    done = outcome.exchange.deliver(sink)
    extra.message(COMPLETED)
    result_of(done)
    assert extra.close_code == 1000 and busy.state == OPEN


def test_new_socket_never_replaces_a_session_socket_in_use(rig: Rig) -> None:
    old = rig.turn(target())
    d = rig.exchange(target(key="key-2"))  # another fingerprint: a new socket for the session
    new = rig.sockets.last
    old_again, in_use = rig.ready(target())  # the old socket serves a turn meanwhile
    assert old_again is old
    new.open()
    new.message(CREATED)
    assert old.state == OPEN and old.close_code is None
    assert rig.pool.entries["s1"].conn is old
    result_of(d).exchange.discard()
    assert new.close_code == 1000
    in_use.discard()


def test_idle_retained_socket_is_closed_1000_after_idle_timeout(make_rig: Any) -> None:
    rig = make_rig(idle_timeout=60.0)
    sock = rig.turn(target())
    rig.clock.advance(59.9)
    assert sock.state == OPEN
    rig.clock.advance(0.1)
    assert sock.close_code == 1000 and rig.pool.entries == {}
    assert rig.event_count("idle_closed") == 1
    sock.finish_close()
    assert rig.pool.sockets == set()


def test_reuse_cancels_the_idle_timer_and_the_end_of_the_turn_rearms_it(make_rig: Any) -> None:
    rig = make_rig(idle_timeout=60.0)
    sock = rig.turn(target())
    rig.clock.advance(50)
    sock, exchange = rig.ready(target())
    assert rig.clock.getDelayedCalls() == []  # no idle timer while the socket is in use
    rig.clock.advance(100)
    assert sock.state == OPEN
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.message(COMPLETED)
    result_of(done)
    rig.clock.advance(59)
    assert sock.state == OPEN
    rig.clock.advance(1)
    assert sock.close_code == 1000


def test_socket_older_than_max_socket_age_is_rotated_before_the_next_turn(make_rig: Any) -> None:
    rig = make_rig(max_socket_age=100.0)
    old = rig.turn(target())
    rig.clock.advance(60)
    assert rig.turn(target()) is old  # reuse does not make it younger
    rig.clock.advance(40)
    assert rig.pool.peek(target()) is None
    new = rig.turn(target())
    assert new is not old
    assert old.close_code == 1000
    assert rig.pool.entries["s1"].conn is new
    assert rig.event_count("rotated") == 1


def test_peer_closing_an_idle_retained_socket_forgets_it_and_its_idle_timer(rig: Rig) -> None:
    sock = rig.turn(target())
    sock.closed_by_peer(1001, "going away")
    assert rig.pool.entries == {} and rig.pool.sockets == set()
    assert rig.clock.getDelayedCalls() == []
    assert rig.turn(target()) is not sock


def test_lru_prune_at_pool_max_entries_closes_the_least_recently_used_idle_socket(
    make_rig: Any,
) -> None:
    rig = make_rig(pool_max_entries=2)
    one = rig.turn(target("s1"))
    rig.clock.advance(1)
    two = rig.turn(target("s2"))
    rig.clock.advance(1)
    rig.turn(target("s1"))  # s1 is now the most recently used
    rig.clock.advance(1)
    three = rig.turn(target("s3"))
    assert two.close_code == 1000
    assert one.state == OPEN and three.state == OPEN
    assert set(rig.pool.entries) == {"s1", "s3"}
    assert rig.event_count("pruned") == 1


def test_active_entries_are_never_pruned_and_the_new_socket_stays_request_scoped(
    make_rig: Any,
) -> None:
    rig = make_rig(pool_max_entries=1)
    busy, exchange = rig.ready(target("s1"))
    other = rig.turn(target("s2"))
    assert busy.state == OPEN
    assert other.close_code == 1000
    assert set(rig.pool.entries) == {"s1"}
    assert rig.event_count("pruned") == 0
    exchange.discard()


# -- terminals and first events -----------------------------------------------------------------


def test_error_terminal_retires_the_socket_1000(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.message(ERROR)
    result_of(done)
    assert sink.events[-1] == (ERROR, "error")
    assert sock.close_code == 1000 and rig.pool.entries == {}
    assert rig.turn(target()) is not sock


def test_error_as_first_event_is_ready_and_still_retires_the_socket(rig: Rig) -> None:
    sock, exchange = rig.ready(target(), first=ERROR)
    sink = MemorySink()
    result_of(exchange.deliver(sink))
    assert sink.events == [(ERROR, "error")]
    assert sock.close_code == 1000 and rig.pool.entries == {}


def test_response_failed_terminal_keeps_the_socket(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.message(event("response.failed", response={"id": "resp_1", "error": {"code": "x"}}))
    result_of(done)
    assert sock.state == OPEN and rig.pool.peek(target()) == sock.id


def test_connection_limit_first_event_is_its_own_outcome_and_discard_retires_the_socket(
    rig: Rig,
) -> None:
    old = rig.turn(target())
    d = rig.exchange(target())
    old.message(LIMIT)
    outcome = result_of(d)
    assert isinstance(outcome, ConnectionLimit) and outcome.exchange.reused
    outcome.exchange.discard()
    assert old.close_code == 1000 and rig.pool.entries == {}
    assert rig.turn(target()) is not old


def test_connection_limit_mid_stream_reaches_the_sink_and_retires_the_socket(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.message(LIMIT)
    result_of(done)
    assert sink.data == [CREATED, LIMIT]
    assert sock.close_code == 1000 and rig.pool.entries == {}


def test_previous_response_not_found_first_event_is_previous_lost(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    sock.message(NOT_FOUND)
    outcome = result_of(d)
    assert isinstance(outcome, PreviousLost)
    outcome.exchange.discard()
    assert sock.close_code == 1000


def test_discard_retires_a_ready_socket_1000_and_releases_it(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    exchange.discard()
    assert sock.close_code == 1000
    assert rig.pool.entries == {}
    assert sock.consumer is None
    assert rig.clock.getDelayedCalls() == []


# -- before the first event -----------------------------------------------------------------------


def test_first_event_timeout_while_connecting_is_a_fallback_and_aborts_the_socket(
    make_rig: Any,
) -> None:
    rig = make_rig(first_event_timeout=20.0)
    d = rig.exchange(target())
    sock = rig.sockets.last
    rig.clock.advance(19.9)
    assert not d.called
    rig.clock.advance(0.1)
    assert result_of(d) == Failed("ws_error_pre_first_event", "timeout_waiting_for_first_event")
    assert sock.aborted and sock.close_code is None  # no close frame while connecting


def test_first_event_timeout_after_the_frame_was_sent_is_not_resent_and_closes_1011(
    make_rig: Any,
) -> None:
    rig = make_rig(first_event_timeout=20.0)
    d = rig.exchange(target())
    sock = rig.sockets.last
    rig.clock.advance(5)
    sock.open()
    rig.clock.advance(15)  # the timer runs from the start of the attempt
    outcome = result_of(d)
    assert isinstance(outcome, NotResent)
    assert outcome.code == "upstream_first_event_timeout"
    assert outcome.log_event == "upstream_ws_first_event_timeout"
    assert "20s" in outcome.message
    assert sock.close_code == 1011 and rig.pool.entries == {}


def test_first_event_timeout_after_send_with_fallback_after_send_is_a_fallback(
    make_rig: Any,
) -> None:
    rig = make_rig(first_event_timeout=20.0, fallback_after_send=True)
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    rig.clock.advance(20)
    assert result_of(d) == Failed("ws_error_pre_first_event", "timeout_waiting_for_first_event")
    assert sock.close_code == 1011


def test_silent_reused_socket_is_not_resent_and_retired_1011(make_rig: Any) -> None:
    rig = make_rig(first_event_timeout=20.0)
    sock = rig.turn(target())
    d = rig.exchange(target())
    rig.clock.advance(20)
    assert isinstance(result_of(d), NotResent)
    assert sock.close_code == 1011 and rig.pool.entries == {}


@pytest.mark.parametrize("status", [400, 404, 405, 426, 501])
def test_upgrade_refused_with_a_no_websocket_status_is_a_cacheable_failure(
    rig: Rig, status: int
) -> None:
    d = rig.exchange(target())
    rig.sockets.last.refuse_upgrade(status, "Nope")
    assert result_of(d) == Failed("ws_upgrade_rejected", f"HTTP {status} Nope", cacheable=True)
    assert rig.pool.sockets == set()


@pytest.mark.parametrize("status", [301, 401, 403, 429, 500, 502, 503])
def test_upgrade_refused_with_another_status_is_a_failure_not_cached(rig: Rig, status: int) -> None:
    d = rig.exchange(target())
    rig.sockets.last.refuse_upgrade(status, "Nope")
    assert result_of(d) == Failed("ws_upgrade_rejected", f"HTTP {status} Nope", cacheable=False)


def test_socket_closing_cleanly_before_the_first_event_is_ws_closed_before_first_event(
    rig: Rig,
) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    sock.closed_by_peer(1000)
    assert result_of(d) == Failed("ws_closed_before_first_event")
    assert rig.clock.getDelayedCalls() == []  # the first-event timer went with it


def test_socket_failing_before_the_first_event_is_ws_error_pre_first_event(rig: Rig) -> None:
    d = rig.exchange(target())
    rig.sockets.last.fail("connection refused")
    assert result_of(d) == Failed("ws_error_pre_first_event", "connection refused")
    assert rig.clock.getDelayedCalls() == []


def test_send_failure_on_open_is_a_fallback_and_closes_1011(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.send_error = ConnectionError("broken pipe")
    sock.open()
    assert result_of(d) == Failed("ws_error_pre_first_event", "broken pipe")
    assert sock.close_code == 1011


def test_oversized_message_before_the_first_event_is_not_resent(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    sock.refuse_oversized(1024)
    outcome = result_of(d)
    assert isinstance(outcome, NotResent)
    assert outcome.code == "upstream_event_too_large" and "1024" in outcome.message


# -- after the first event ------------------------------------------------------------------------


def test_queue_overflow_before_deliver_ends_with_upstream_ws_queue_overflow_and_closes_1011(
    make_rig: Any,
) -> None:
    rig = make_rig(max_buffer_bytes=len(CREATED) + 2 * len(DELTA))
    sock, exchange = rig.ready(target())
    sock.message(DELTA)
    sock.message(DELTA)
    assert sock.state == OPEN
    sock.message(DELTA)  # one byte too many
    assert sock.close_code == 1011 and rig.pool.entries == {}
    sink = MemorySink()
    result_of(exchange.deliver(sink))
    assert sink.data[:3] == [CREATED, DELTA, DELTA]
    assert len(sink.events) == 4
    assert sink.parsed()[3]["error"]["code"] == "upstream_ws_queue_overflow"
    assert sink.unregistered == 1


def test_close_mid_stream_without_terminal_ends_with_upstream_ws_closed_mid_stream(
    rig: Rig,
) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.closed_by_peer(1001, "going away")
    result_of(done)
    error = sink.parsed()[-1]
    assert error["type"] == "error"
    assert error["error"] == {
        "code": "upstream_ws_closed_mid_stream",
        "message": "upstream WebSocket closed (code=1001): going away",
    }
    assert sink.events[-1][1] == "error"
    assert rig.pool.entries == {} and rig.pool.sockets == set()


def test_failure_mid_stream_ends_with_upstream_ws_mid_stream_error(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.fail("connection reset")
    result_of(done)
    assert sink.parsed()[-1]["error"] == {
        "code": "upstream_ws_mid_stream_error",
        "message": "connection reset",
    }


def test_oversized_message_mid_stream_ends_with_upstream_event_too_large(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    sock.refuse_oversized(1024)
    result_of(done)
    assert sink.parsed()[-1]["error"]["code"] == "upstream_event_too_large"


def test_close_between_first_event_and_deliver_is_reported_after_the_queued_events(
    rig: Rig,
) -> None:
    sock, exchange = rig.ready(target())
    sock.message(DELTA)
    sock.closed_by_peer(1011, "")
    sink = MemorySink()
    result_of(exchange.deliver(sink))
    assert sink.data[:2] == [CREATED, DELTA]
    assert sink.parsed()[2]["error"] == {
        "code": "upstream_ws_closed_mid_stream",
        "message": "upstream WebSocket closed (code=1011)",
    }


def test_close_after_the_terminal_is_not_an_error(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sock.message(COMPLETED)
    sock.closed_by_peer(1000)
    sink = MemorySink()
    result_of(exchange.deliver(sink))
    assert sink.data == [CREATED, COMPLETED]


def test_silent_upstream_mid_stream_ends_with_upstream_idle_timeout_and_closes_1011(
    rig: Rig,
) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink, idle_timeout=30.0)
    rig.clock.advance(20)
    sock.message(DELTA)  # each event restarts the count
    rig.clock.advance(29)
    assert not done.called
    rig.clock.advance(1)
    result_of(done)
    assert sink.parsed()[-1]["error"] == {
        "code": "upstream_idle_timeout",
        "message": "upstream sent nothing for 30s",
    }
    assert sock.close_code == 1011 and rig.pool.entries == {}


def test_a_stream_paused_by_the_sink_is_not_a_stall(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink, idle_timeout=30.0)
    assert sink.producer is not None
    sink.producer.pauseProducing()
    rig.clock.advance(300)
    assert not done.called and sock.state == OPEN
    sink.producer.resumeProducing()
    rig.clock.advance(30)
    result_of(done)
    assert sink.parsed()[-1]["error"]["code"] == "upstream_idle_timeout"


def test_sink_pausing_the_producer_pauses_the_socket_and_resuming_resumes_it(rig: Rig) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    assert sink.producer is not None
    sink.producer.pauseProducing()
    assert sock.paused and sock.pauses == 1
    sink.producer.resumeProducing()
    assert not sock.paused
    sock.message(COMPLETED)
    result_of(done)


def test_sink_stopping_the_producer_retires_the_socket_and_the_turn_ends_with_an_error(
    rig: Rig,
) -> None:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink, idle_timeout=30.0)
    assert sink.producer is not None
    sink.producer.stopProducing()
    assert sock.close_code == 1000 and rig.pool.entries == {}
    sock.finish_close()
    result_of(done)
    assert sink.parsed()[-1]["error"]["code"] == "upstream_ws_closed_mid_stream"
    assert rig.clock.getDelayedCalls() == []


# -- cancelling ---------------------------------------------------------------------------------


def test_cancelling_the_exchange_while_connecting_aborts_the_socket(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    d.cancel()
    failure_of(d, CancelledError)
    assert sock.aborted and sock.state == CLOSING
    assert rig.clock.getDelayedCalls() == []
    sock.finish_close()
    assert rig.pool.sockets == set() and rig.pool.entries == {}


def test_cancelling_the_exchange_after_the_frame_was_sent_closes_1000_and_keeps_nothing(
    rig: Rig,
) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    d.cancel()
    failure_of(d, CancelledError)
    assert sock.close_code == 1000
    assert sock.consumer is None
    assert rig.pool.entries == {}
    assert rig.clock.getDelayedCalls() == []


def test_cancelling_delivery_closes_the_retained_socket_1000_and_forgets_it(rig: Rig) -> None:
    rig.turn(target())
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink, idle_timeout=30.0)
    done.cancel()
    failure_of(done, CancelledError)
    assert sock.close_code == 1000
    assert rig.pool.entries == {}
    assert rig.clock.getDelayedCalls() == []  # the watchdog too
    sock.finish_close()
    assert sink.data == [CREATED]  # nothing after the cancel


# -- hooks, stop, figures -------------------------------------------------------------------------


def test_cleanup_closes_the_sessions_idle_socket_1000(rig: Rig) -> None:
    sock = rig.turn(target("s1"))
    other = rig.turn(target("s2"))
    rig.pool.cleanup("s1")
    rig.pool.cleanup("nobody")
    assert sock.close_code == 1000
    assert other.state == OPEN
    assert set(rig.pool.entries) == {"s2"}


def test_cleanup_mid_turn_closes_1000_and_the_turn_ends_with_an_error_event(rig: Rig) -> None:
    rig.turn(target())
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    rig.pool.cleanup("s1")
    assert sock.close_code == 1000 and rig.pool.entries == {}
    sock.finish_close()
    result_of(done)
    assert sink.parsed()[-1]["type"] == "error"


def test_stop_service_closes_every_socket_and_fires_when_all_are_gone(rig: Rig) -> None:
    idle = rig.turn(target("s1"))
    busy, exchange = rig.ready(target("s2"))
    sink = MemorySink()
    delivering = exchange.deliver(sink)
    connecting_d = rig.exchange(target("s3"))
    connecting = rig.sockets.last
    stopped = rig.pool.stopService()
    assert idle.close_code == 1000 and busy.close_code == 1000 and connecting.aborted
    assert rig.pool.entries == {}
    assert not stopped.called
    idle.finish_close()
    busy.finish_close()
    assert not stopped.called
    connecting.finish_close()
    result_of(stopped)
    assert rig.pool.sockets == set()
    result_of(delivering)
    assert sink.parsed()[-1]["type"] == "error"
    assert isinstance(result_of(connecting_d), Failed)
    assert rig.clock.getDelayedCalls() == []


def test_collect_reports_pool_size_sockets_and_events(rig: Rig) -> None:
    rig.turn(target("s1"))
    rig.turn(target("s1"))
    _, exchange = rig.ready(target("s1"))
    rig.turn(target("s1"))  # busy: a request-scoped socket
    exchange.discard()
    figures = rig.metrics()
    assert figures[("cch_upstream_ws_pool_size", ())] == 0  # the discard retired s1's socket
    assert figures[("cch_upstream_ws_sockets", ())] == 2  # both still closing
    assert figures[("cch_upstream_ws_pool_events_total", (("event", "connects"),))] == 2
    assert figures[("cch_upstream_ws_pool_events_total", (("event", "reuses"),))] == 2
    assert figures[("cch_upstream_ws_pool_events_total", (("event", "busy_fresh"),))] == 1
    rig.sockets.settle()
    rig.turn(target("s9"))
    figures = rig.metrics()
    assert figures[("cch_upstream_ws_pool_size", ())] == 1
    assert figures[("cch_upstream_ws_sockets", ())] == 1


# -- defects found by these tests, fixed: a socket that cannot start connecting, a socket kept
# -- paused, a first event that only mentions the connection-limit code


def test_socket_that_cannot_start_connecting_leaves_no_timer_and_no_socket_behind(rig: Rig) -> None:
    rig.sockets.connect_error = ValueError(
        "Codepoint U+005F at position 3 of 'my_host' not allowed"
    )
    try:
        d = rig.exchange(target())
    except ValueError:
        pass  # an exception the caller falls back on is acceptable; what it leaves is not
    else:
        assert isinstance(result_of(d), Failed)
    assert rig.clock.getDelayedCalls() == []
    assert rig.pool.sockets == set()


def test_socket_returned_to_the_pool_after_a_paused_turn_reads_again(rig: Rig) -> None:
    rig.turn(target())
    sock, exchange = rig.ready(target())
    sock.message(COMPLETED)  # a short answer: all of it arrived with the first read
    sink = MemorySink(paused=True)  # the client has not read the previous turn yet
    result_of(exchange.deliver(sink))
    assert sink.data == [CREATED, COMPLETED]
    assert rig.pool.peek(target()) == sock.id  # kept for the session's next turn...
    assert not sock.paused  # ...which would never hear its first event


def test_error_first_event_that_only_mentions_the_limit_code_is_not_the_connection_limit(
    rig: Rig,
) -> None:
    mention = event(
        "error", error={"code": "server_error", "message": "not websocket_connection_limit_reached"}
    )
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    sock.message(mention)
    outcome = result_of(d)
    outcome.exchange.discard()
    assert isinstance(outcome, Ready)
