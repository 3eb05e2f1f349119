"""The upstream WebSocket pool over real sockets: which socket a request rides, and when one goes.

The rules: docs/reference-behaviour.md#the-upstream-websocket-pool (acquire rules, fingerprint,
idle timer and LRU pruning):

* acquire: reuse for the same session and fingerprint, a fresh socket without a session id or
  while the session's socket is busy, a replacement when the fingerprint changes;
* retirement: after an error terminal or the connection-limit code, after a first-event
  timeout on a reused socket; ``response.failed`` alone keeps the socket;
* the cap and LRU pruning, the 65-minute idle timer, the upstream closing an idle socket;
* closing on demand: the session cleanup hook and ``close_all``.

A pool on a ``task.Clock`` (``make_pool``) is driven directly against the fake upstream; every
timer is moved by ``Clock.advance`` and every wait is on an I/O event.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import upstream_ws_support as support
from conftest import event_types as types
from conftest import eventually, within
from twisted.internet import reactor
from twisted.internet.task import Clock
from upstream_ws_support import (
    COMPLETED,
    CREATED,
    FAILED,
    FAILED_AT_LIMIT,
    HEADERS,
    LIMIT_ERROR,
    SERVER_ERROR,
    RecordingSink,
    SilentServer,
    ask,
    failure_of,
    gone,
    turn,
    turn_failure_of,
)

from cch.config import UpstreamWebSocketConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import Close, Delay, Event, Script, hold
from cch.upstream.pool import Target, UpstreamWSPool
from cch.upstream.ws import UpstreamConnection

# The shared fixtures, bound (not imported) so that ruff does not take the test parameters
# for redefinitions of unused imports.
clock = support.clock
make_pool = support.make_pool
silent = support.silent


# --- acquire: reuse, fresh sockets, the fingerprint -----------------------------------------------


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


# --- retirement -----------------------------------------------------------------------------------


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


# --- the cap and LRU pruning ----------------------------------------------------------------------


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


# --- the idle timer -------------------------------------------------------------------------------


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


# --- closing on demand: the cleanup hook and close_all --------------------------------------------


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


# --- permessage-deflate towards the upstream (upstream_websocket.compression) ------------------
#
# The fake upstream accepts permessage-deflate when it is offered. Most of these tests open
# sockets through the pool's ``open_socket``; the last one through the pool's own.

INSTRUCTIONS = "You are Codex, a coding agent. Follow the repository's conventions. " * 160  # ~11 KB
OFFER = "permessage-deflate; client_no_context_takeover; client_max_window_bits; server_max_window_bits=12"


@pytest_twisted.async_yield_fixture
async def deflating_pool(clock: Clock) -> Any:
    """A pool on ``clock`` whose sockets offer permessage-deflate with 4 KiB windows."""

    def open_socket(target: Target) -> UpstreamConnection:
        return UpstreamConnection(
            reactor,
            clock,
            target.url,
            dict(target.headers),
            handshake_timeout=10.0,
            max_message_bytes=target.max_event_bytes,
            deflate_window_bits=12,
        )

    pool = UpstreamWSPool(reactor, clock, UpstreamWebSocketConfig(compression=True), open_socket=open_socket)
    yield pool
    await pool.close_all()
    assert pool.sockets == set() and pool.entries == {}
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


@pytest_twisted.ensureDeferred
async def test_a_socket_offering_deflate_to_an_upstream_that_accepts_it_compresses_both_ways(
    fake: FakeUpstream, deflating_pool: UpstreamWSPool
) -> None:
    first, first_sink = await turn(deflating_pool, fake.ws_url, instructions=INSTRUCTIONS)
    # The retained socket's zlib streams carry over to the next turn (context takeover).
    second, sink = await turn(deflating_pool, fake.ws_url, instructions=INSTRUCTIONS)
    assert (first.reused, second.reused) == (False, True)
    assert types(first_sink.events)[-1] == types(sink.events)[-1] == "response.completed"
    assert fake.ws_connections[0].headers["sec-websocket-extensions"] == OFFER
    assert deflating_pool.entries["sess-1"].conn.compressed
    # What the socket compressed reached the upstream whole.
    assert [r.body["instructions"] for r in fake.requests] == [INSTRUCTIONS, INSTRUCTIONS]


@pytest_twisted.ensureDeferred
async def test_an_upstream_event_inflating_past_max_event_bytes_ends_the_turn_and_drops_the_socket(
    fake: FakeUpstream, deflating_pool: UpstreamWSPool
) -> None:
    cap = 64 * 1024
    # 8 MiB of delta: about 8 KiB once the fake compresses it, far under the cap on the wire.
    fake.enqueue(Script((Event(CREATED), Event({"type": "response.output_text.delta", "delta": "x" * (8 << 20)}), Event(COMPLETED))))
    target = Target.of("primary", fake.ws_url, HEADERS, "sess-1", max_event_bytes=cap)
    outcome = await within(deflating_pool.exchange(target, json.dumps({"type": "response.create"})), "the first event")
    sink = RecordingSink()
    await within(outcome.exchange.deliver(sink), "the turn's end")
    assert types(sink.events) == ["response.created", "error"]
    assert sink.events[-1]["error"]["code"] == "upstream_event_too_large"
    assert (await within(fake.wait_for_ws_close(0), "the upstream socket to go")).closed
    await eventually(lambda: not deflating_pool.sockets, "the pool to forget the socket")
    assert deflating_pool.entries == {}


@pytest_twisted.ensureDeferred
async def test_the_pool_offers_deflate_when_upstream_websocket_compression_is_on(
    fake: FakeUpstream, make_pool: Any
) -> None:
    pool = make_pool(compression=True, compression_window_bits=12)
    await turn(pool, fake.ws_url)
    assert fake.ws_connections[0].headers.get("sec-websocket-extensions") == OFFER
    assert pool.entries["sess-1"].conn.compressed


@pytest_twisted.ensureDeferred
async def test_the_pool_offers_no_deflate_when_upstream_websocket_compression_is_off(
    fake: FakeUpstream, make_pool: Any
) -> None:
    pool = make_pool(compression=False)
    await turn(pool, fake.ws_url)
    assert "sec-websocket-extensions" not in fake.ws_connections[0].headers
    assert not pool.entries["sess-1"].conn.compressed
