"""The fault matrix: what a client sees when something breaks, and that nothing is left behind.

Every case runs a real gateway on a real socket in front of a real fake upstream (or a closed
port), across the tunnel modes (in-process, HTTP) and upstream transports (HTTP, WebSocket)
wherever the fault means something on that transport. Each case asserts the client's view
(events, error codes, close codes) and the gateway's state afterwards: no live edge
connection, no request in progress, no upstream WebSocket socket or pool entry, no open
connection at the fake, no DelayedCall on the reactor (the autouse ``no_leaks`` fixture) nor on
the gateway's ``task.Clock`` when one drives it.

What the fake can express: its HTTP side writes the response headers together with the first
byte of the body, so a script that starts with ``Hold()`` is a stall *before the response
headers* (the first-byte timeout); a stall after the headers but before the first event is a
script that writes an SSE comment and then holds (the idle timeout). Over an upstream
WebSocket the handshake plays the part of the headers: a script that holds is a stall before
the first event (``upstream_websocket.first_event_timeout``), which ends the turn with
``upstream_first_event_timeout`` (the provider has the frame: re-sending it over HTTP could run
the turn twice).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from conftest import LogWatch, RunningGateway, eventually, gateway_config, start_gateway, within
from conftest import event_types as types
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater

from cch.config import ProviderConfig
from cch.edge.connection import EdgeConnection
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.scripts import (
    SSE_HEADERS,
    Close,
    Drop,
    Event,
    Hold,
    Raw,
    Script,
    drop_after,
    error_json,
    hold,
    ws_close_after,
)

CREATED = {"type": "response.created", "response": {"id": "resp_f", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "half a thought"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_f", "status": "completed"}}
UNREACHABLE = {
    "type": "error",
    "status": 502,
    "error": {
        "message": "Upstream provider 'primary' is unreachable.",
        "type": "bad_gateway_error",
        "code": "upstream_unavailable",
    },
}
MIB = 1024 * 1024


# --- waiting without sleeping ------------------------------------------------------------------




async def closed_port_url() -> str:
    """The base URL of a loopback port nobody listens on (any more)."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}/v1"


# --- the gateway under test, and the leak checks ----------------------------------------------


class Matrix:
    """Starts gateways for one (tunnel mode, upstream transport) cell and checks, at teardown,
    that each left nothing behind."""

    def __init__(self, fake: FakeUpstream, tunnel: str, upstream: str) -> None:
        self.fake = fake
        self.tunnel = tunnel
        self.upstream = upstream
        self.started: list[tuple[RunningGateway, Clock | None]] = []

    @property
    def ws(self) -> bool:
        return self.upstream == "websocket"

    async def start(
        self, *, clock: Clock | None = None, base_url: str | None = None, **options: Any
    ) -> RunningGateway:
        provider = ProviderConfig(
            name="primary",
            base_url=base_url or self.fake.base_url,
            websocket="on" if self.ws else "off",
            **options,
        )
        config = gateway_config(self.fake, tunnel=self.tunnel, upstream=self.upstream, providers=(provider,))
        running = await start_gateway(config, clock)
        self.started.append((running, clock))
        return running

    async def finish(self) -> None:
        for running, clock in self.started:
            service = running.service
            # Asserts no live edge connection, no request in progress, no upstream socket.
            await running.stop()
            assert service.ws_pool.entries == {}
            if clock is not None:
                assert [c for c in clock.getDelayedCalls() if c.active()] == []
        await within(self.fake.wait_for_idle(), "the fake's connections to close")
        assert self.fake.open_connections == 0


@pytest_twisted.async_yield_fixture
async def matrix(fake: FakeUpstream, tunnel_mode: str, upstream_transport: str) -> Any:
    m = Matrix(fake, tunnel_mode, upstream_transport)
    yield m
    await m.finish()


@pytest_twisted.async_yield_fixture
async def http_matrix(fake: FakeUpstream, tunnel_mode: str) -> Any:
    m = Matrix(fake, tunnel_mode, "http")
    yield m
    await m.finish()


@pytest_twisted.async_yield_fixture
async def ws_matrix(fake: FakeUpstream, tunnel_mode: str) -> Any:
    m = Matrix(fake, tunnel_mode, "websocket")
    yield m
    await m.finish()


def edge_of(running: RunningGateway) -> EdgeConnection:
    """The one client connection's EdgeConnection."""
    (proto,) = running.service.edge_factory.live
    assert proto.edge is not None
    return proto.edge


async def quiet(running: RunningGateway, client: ResponsesWSClient | None = None) -> None:
    """After a turn ended on a connection that stays open: nothing of it is still running."""
    service = running.service
    await within(service.handler.wait_idle(), "the handler to go idle")
    assert service.handler.active == 0
    if client is not None:
        assert client.close_info is None
        edge = edge_of(running)
        assert edge.in_flight is None and not edge.pending and not edge.closed


async def gone(running: RunningGateway, fake: FakeUpstream, client: ResponsesWSClient) -> None:
    """After the client connection closed: every resource of it was released."""
    service = running.service
    await within(client.wait_closed(), "the client to see the close")
    await within(service.edge_factory.wait_empty(), "the edge connection to go away")
    await within(service.handler.wait_idle(), "the handler to go idle")
    await eventually(lambda: not service.ws_pool.sockets, "the upstream sockets to close")
    assert service.ws_pool.entries == {}


async def next_turn_completes(client: ResponsesWSClient) -> None:
    """The connection still carries turns (the fake answers with its default script)."""
    client.send_json(create())
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the next turn")
    assert events[-1]["type"] == "response.completed", events


# --- the upstream refuses the connection ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_a_502_error_frame_and_the_connection_stays(matrix: Matrix) -> None:
    running = await matrix.start(base_url=await closed_port_url())
    client = await running.connect()
    for _ in range(2):  # the connection stays usable: each turn gets its own error frame
        client.send_json(create())
        assert await client.recv() == UNREACHABLE
        await quiet(running, client)
    fallbacks = running.service.handler.ws_figures.fallbacks
    if matrix.ws:
        # The socket never opened: that fell back to HTTP, which was refused too.
        assert fallbacks["ws_error_pre_first_event"] == 2
    assert running.service.ws_pool.sockets == set()
    assert matrix.fake.requests == []


# --- the upstream resets the connection -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_reset_mid_stream_ends_the_turn_with_an_error_event(matrix: Matrix) -> None:
    fake = matrix.fake
    fake.enqueue(drop_after([CREATED, DELTA, COMPLETED], 2))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    events = await client.recv_turn()
    assert events[:2] == [CREATED, DELTA]
    assert types(events) == ["response.created", "response.output_text.delta", "error"]
    code = "upstream_ws_mid_stream_error" if matrix.ws else "upstream_stream_error"
    assert events[-1]["error"]["code"] == code
    await quiet(running, client)
    if matrix.ws:
        # The broken socket is gone from the pool; the next turn opens a new one.
        await eventually(lambda: not running.service.ws_pool.sockets, "the broken socket to go")
        assert running.service.ws_pool.entries == {}
    await next_turn_completes(client)
    assert len(fake.requests) == 2
    if matrix.ws:
        assert len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_upstream_reset_before_response_headers_is_a_502_error_frame(matrix: Matrix) -> None:
    fake = matrix.fake
    # Over WebSocket the reset comes before the first event: the gateway falls back to HTTP
    # on the same provider, which resets too.
    fake.enqueue(*[Script(steps=(Drop(),))] * (2 if matrix.ws else 1))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await client.recv() == UNREACHABLE
    await quiet(running, client)
    assert [r.transport for r in fake.requests] == (["websocket", "http"] if matrix.ws else ["http"])
    await next_turn_completes(client)


# --- the upstream stalls ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stall_before_the_first_byte_hits_the_first_byte_or_first_event_timeout(matrix: Matrix) -> None:
    fake = matrix.fake
    clock = Clock()
    # Hold() first: the fake writes nothing, so not even the response headers (HTTP) or the
    # first event (WebSocket, where the handshake already succeeded).
    fake.enqueue(Script(steps=(Hold(),)))
    running = await matrix.start(clock=clock, first_byte_timeout=5)
    client = await running.connect()
    client.send_json(create())
    await within(fake.wait_for_requests(1), "the upstream request")
    if matrix.ws:
        first_event_timeout = running.service.config.upstream_websocket.first_event_timeout
        clock.advance(first_event_timeout)
        # The silent socket took the frame: the turn ends there, it is not re-sent over HTTP.
        assert (await client.recv())["error"]["code"] == "upstream_first_event_timeout"
        await within(fake.wait_for_cancelled(0), "the silent upstream socket to close")
        assert [r.transport for r in fake.requests] == ["websocket"]
    else:
        clock.advance(5)
        assert await client.recv() == UNREACHABLE
        await within(fake.wait_for_cancelled(0), "the stalled request to be cancelled")
    await quiet(running, client)
    await next_turn_completes(client)


@pytest_twisted.ensureDeferred
async def test_stall_after_headers_before_the_first_event_hits_the_idle_timeout(http_matrix: Matrix) -> None:
    fake = http_matrix.fake
    clock = Clock()
    # Headers and an SSE comment, then silence: the first-byte timeout is satisfied, the idle
    # timeout is not.
    fake.enqueue(Script(steps=(Raw(b": keep-alive\n\n"), Hold()), headers=SSE_HEADERS))
    running = await http_matrix.start(clock=clock, first_byte_timeout=60, idle_timeout=5)
    client = await running.connect()
    with LogWatch("upstream_attempt_started") as started:
        client.send_json(create())
        await within(started.seen, "the upstream response headers")
    clock.advance(5)
    events = await client.recv_turn()
    assert events == [
        {"type": "error", "error": {"code": "upstream_idle_timeout", "message": "upstream sent nothing for 5s"}}
    ]
    await within(fake.wait_for_cancelled(0), "the stalled request to be cancelled")
    await quiet(running, client)
    await next_turn_completes(client)


@pytest_twisted.ensureDeferred
async def test_stall_mid_stream_hits_the_idle_timeout_and_the_connection_stays(matrix: Matrix) -> None:
    fake = matrix.fake
    clock = Clock()
    fake.enqueue(hold([CREATED, DELTA]))
    running = await matrix.start(clock=clock, idle_timeout=5)
    client = await running.connect()
    client.send_json(create())
    assert await client.recv() == CREATED
    assert await client.recv() == DELTA
    clock.advance(5)
    events = await client.recv_turn()
    assert events == [
        {"type": "error", "error": {"code": "upstream_idle_timeout", "message": "upstream sent nothing for 5s"}}
    ]
    await within(fake.wait_for_cancelled(0), "the stalled request to be cancelled")
    await quiet(running, client)
    await eventually(lambda: not running.service.ws_pool.sockets, "the stalled socket to go")
    await next_turn_completes(client)
    assert len(fake.requests) == 2


# --- the upstream answers with an error status -------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502])
@pytest_twisted.ensureDeferred
async def test_upstream_error_status_reaches_the_client_as_an_error_frame(matrix: Matrix, status: int) -> None:
    fake = matrix.fake
    if matrix.ws:
        # The upstream says the same at both doors: the upgrade and the HTTP fallback.
        fake.upgrade_status = status
    fake.enqueue(error_json(status, f"upstream_{status}", f"Upstream said {status}", type="server_error"))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await client.recv() == {
        "type": "error",
        "status": status,
        "error": {"message": f"Upstream said {status}", "type": "server_error", "code": f"upstream_{status}"},
    }
    await quiet(running, client)
    assert [r.transport for r in fake.requests] == ["http"]
    if matrix.ws:
        assert len(fake.refused_upgrades) == 1
        assert running.service.handler.ws_figures.fallbacks["ws_upgrade_rejected"] == 1
        fake.upgrade_status = None
    await next_turn_completes(client)


@pytest_twisted.ensureDeferred
async def test_upstream_ws_error_event_is_a_terminal_and_retires_the_socket(ws_matrix: Matrix) -> None:
    fake = ws_matrix.fake
    error = {"type": "error", "status": 429, "error": {"type": "rate_limit", "code": "rate_limit_exceeded", "message": "slow down"}}
    fake.enqueue(Script(steps=(Event(error),)))
    running = await ws_matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await client.recv_turn() == [error]
    await quiet(running, client)
    # An error terminal closes and forgets the upstream socket
    # (docs/reference-behaviour.md#one-request-on-an-upstream-socket).
    await within(fake.wait_for_ws_close(0), "the upstream socket to close")
    await eventually(lambda: not running.service.ws_pool.sockets, "the socket to leave the pool")
    assert running.service.ws_pool.entries == {}
    await next_turn_completes(client)
    assert len(fake.ws_connections) == 2


# --- the upstream sends garbage ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_garbage_sse_becomes_text_deltas_then_the_end_without_terminal(matrix: Matrix) -> None:
    fake = matrix.fake
    # Close(): over HTTP the response simply ends; over WebSocket a 1000 close frame.
    fake.enqueue(Script(steps=(Event("this is not json"), Event('{"half":'), Close()), headers=SSE_HEADERS))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await client.recv() == {"type": "response.output_text.delta", "delta": "this is not json"}
    assert await client.recv() == {"type": "response.output_text.delta", "delta": '{"half":'}
    if matrix.ws:
        # A socket that closes mid-turn is a terminal error event; the client stays.
        assert await client.recv() == {
            "type": "error",
            "error": {"code": "upstream_ws_closed_mid_stream", "message": "upstream WebSocket closed (code=1000)"},
        }
        await quiet(running, client)
        await next_turn_completes(client)
        return
    assert await client.recv() == {
        "type": "error",
        "error": {
            "code": "stream_ended_without_terminal",
            "message": "Upstream stream ended before emitting a terminal response event",
        },
    }
    info = await within(client.wait_closed(), "the close")
    assert (info.code, info.reason) == (1011, "stream_ended_without_terminal")
    await gone(running, fake, client)
    assert fake.requests[0].cancelled is False


# --- the upstream WebSocket closes mid-turn ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_closing_1011_mid_turn(matrix: Matrix) -> None:
    fake = matrix.fake
    fake.enqueue(ws_close_after([CREATED, COMPLETED], 1, code=1011, reason="boom"))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await client.recv() == CREATED
    if not matrix.ws:
        # Over HTTP a "close" is the response ending: no terminal, so the client is closed.
        error = await client.recv()
        assert error["error"]["code"] == "stream_ended_without_terminal"
        info = await within(client.wait_closed(), "the close")
        assert (info.code, info.reason) == (1011, "stream_ended_without_terminal")
        await gone(running, fake, client)
        return
    assert await client.recv() == {
        "type": "error",
        "error": {"code": "upstream_ws_closed_mid_stream", "message": "upstream WebSocket closed (code=1011): boom"},
    }
    await quiet(running, client)
    await eventually(lambda: not running.service.ws_pool.sockets, "the closed socket to leave the pool")
    assert running.service.ws_pool.entries == {}
    await next_turn_completes(client)
    assert len(fake.ws_connections) == 2


# --- the client goes away mid-turn ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_dropping_mid_turn_with_frames_queued_cancels_the_one_upstream_request(
    matrix: Matrix,
) -> None:
    fake = matrix.fake
    fake.enqueue(hold([CREATED]))
    running = await matrix.start()
    client = await running.connect()
    for _ in range(3):
        client.send_json(create())
    assert await client.recv() == CREATED
    await eventually(lambda: len(edge_of(running).pending) == 2, "the two frames to queue")
    await client.abort()
    await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
    await gone(running, fake, client)
    await within(fake.wait_for_idle(), "the fake to see every connection close")
    assert len(fake.requests) == 1
    if matrix.ws:
        # The retained upstream socket is closed 1000 (docs/architecture.md#close-means-stop).
        assert fake.ws_connections[0].close_code == 1000


@pytest.mark.parametrize("code", [1000, 4000])
@pytest_twisted.ensureDeferred
async def test_client_close_frame_mid_turn_cancels_the_one_upstream_request(matrix: Matrix, code: int) -> None:
    fake = matrix.fake
    fake.enqueue(hold([CREATED]))
    running = await matrix.start()
    client = await running.connect()
    for _ in range(3):
        client.send_json(create())
    assert await client.recv() == CREATED
    info = await within(client.close(code, "bye"), "the close handshake")
    # The gateway answers the client's close with the client's own code.
    assert info.code == code and info.was_clean
    await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
    await gone(running, fake, client)
    await within(fake.wait_for_idle(), "the fake to see every connection close")
    assert len(fake.requests) == 1
    if matrix.ws:
        assert fake.ws_connections[0].close_code == 1000


# --- protocol violations by the client --------------------------------------------------------


@pytest.mark.parametrize("when", ["mid-turn", "idle"])
@pytest_twisted.ensureDeferred
async def test_binary_frame_is_an_error_frame_then_1003(matrix: Matrix, when: str) -> None:
    fake = matrix.fake
    fake.enqueue(hold([CREATED]))
    running = await matrix.start()
    client = await running.connect()
    if when == "mid-turn":
        client.send_json(create())
        client.send_json(create())  # queued behind the turn: must never reach the upstream
        assert await client.recv() == CREATED
    client.send_bytes(b"\x00\xffbinary")
    assert await client.recv() == {
        "type": "error",
        "error": {"code": "invalid_frame_type", "message": "Only text WebSocket frames are supported"},
    }
    info = await within(client.wait_closed(), "the close")
    assert (info.code, info.reason) == (1003, "binary_not_supported")
    assert client.received[-1]["type"] == "error"  # the error frame came before the close
    if when == "mid-turn":
        await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
        assert len(fake.requests) == 1
    else:
        assert fake.requests == []
    await gone(running, fake, client)


@pytest_twisted.ensureDeferred
async def test_sixty_five_frames_behind_a_held_turn_the_sixty_sixth_closes_1008(matrix: Matrix) -> None:
    fake = matrix.fake
    fake.enqueue(hold([CREATED]))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await client.recv() == CREATED
    for _ in range(64):
        client.send_json(create())
    edge = edge_of(running)
    await eventually(lambda: len(edge.pending) == 64, "64 frames to queue")
    assert client.close_info is None and not edge.closed  # 64 queued is within the limit
    client.send_json(create())  # frame 66: the 65th queued
    assert await client.recv() == {
        "type": "error",
        "error": {"code": "too_many_requests", "message": "Pending frame limit exceeded"},
    }
    info = await within(client.wait_closed(), "the close")
    assert (info.code, info.reason) == (1008, "too_many_requests")
    await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
    await gone(running, fake, client)
    assert len(fake.requests) == 1  # none of the queued frames was dispatched


@pytest.mark.parametrize("when", ["mid-turn", "idle"])
@pytest_twisted.ensureDeferred
async def test_33_mib_message_closes_1009(matrix: Matrix, when: str) -> None:
    fake = matrix.fake
    fake.enqueue(hold([CREATED]))
    running = await matrix.start()
    client = await running.connect()
    if when == "mid-turn":
        client.send_json(create())
        assert await client.recv() == CREATED
    client.send_text("x" * (33 * MIB))
    info = await within(client.wait_closed(), "the close")
    assert info.code == 1009
    if when == "mid-turn":
        await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
        assert len(fake.requests) == 1
        assert types(client.received) == ["response.created"]
    else:
        assert fake.requests == [] and client.received == []
    await gone(running, fake, client)


@pytest.mark.parametrize("tunnel_mode", ["in-process"])
@pytest.mark.parametrize("upstream_transport", ["http"])
@pytest_twisted.ensureDeferred
async def test_message_of_exactly_32_mib_is_read_and_answered(matrix: Matrix) -> None:
    running = await matrix.start()
    client = await running.connect()
    client.send_text("x" * (32 * MIB))
    frame = await client.recv()
    assert frame["error"]["code"] == "invalid_json"
    # A 32 MiB create that is JSON reaches the pipeline too (and the upstream).
    padding = "y" * (32 * MIB - len(json.dumps(create(pad=""))))
    client.send_json(create(pad=padding))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the 32 MiB turn")
    assert events[-1]["type"] == "response.completed"
    assert len(matrix.fake.requests[0].raw) > 32 * MIB - 1024
    await quiet(running, client)


# --- the client leaves before the upstream said anything ---------------------------------------


async def leave(client: ResponsesWSClient, how: str) -> None:
    if how == "abort":
        await client.abort()
    elif how == "close":
        await within(client.close(1000), "the close handshake")
    elif how == "binary":
        client.send_bytes(b"\x01")
    else:
        client.send_text("x" * (33 * MIB))


@pytest.mark.parametrize("how", ["abort", "close", "binary", "oversize"])
@pytest_twisted.ensureDeferred
async def test_client_leaving_before_the_first_byte_cancels_and_never_falls_back(
    matrix: Matrix, how: str
) -> None:
    fake = matrix.fake
    fake.enqueue(Script(steps=(Hold(),)), Script(steps=(Hold(),)))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    client.send_json(create())
    await within(fake.wait_for_requests(1), "the upstream request")
    await leave(client, how)
    await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
    await gone(running, fake, client)
    await within(fake.wait_for_idle(), "the fake to see every connection close")
    # Neither the queued frame nor an HTTP fallback of the cancelled WebSocket attempt went out.
    assert len(fake.requests) == 1
    assert running.service.handler.http_attempts == (0 if matrix.ws else 1)
    if how == "binary":
        assert client.received[-1]["error"]["code"] == "invalid_frame_type"
        assert (client.close_info.code, client.close_info.reason) == (1003, "binary_not_supported")
    elif how == "oversize":
        assert client.close_info.code == 1009


# --- the client stops reading -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_is_closed_1011_after_the_send_deadline(matrix: Matrix) -> None:
    fake = matrix.fake
    clock = Clock()
    chunk = {"type": "response.output_text.delta", "delta": "z" * MIB}
    # Far more than the loopback socket buffers hold; the rest waits upstream (backpressure).
    fake.enqueue(Script(steps=(Event(CREATED), *[Event(chunk)] * 48, Hold()), headers=SSE_HEADERS))
    running = await matrix.start(clock=clock)
    client = await running.connect()
    assert client.protocol is not None
    client.protocol.transport.pauseProducing()  # the client stops reading its socket
    client.send_json(create())
    await within(fake.wait_for_requests(1), "the upstream request")
    edge = edge_of(running)
    await eventually(lambda: edge.paused, "the client transport to push back")
    clock.advance(running.service.config.limits.outbound_send_timeout)
    assert edge.closed
    client.protocol.transport.resumeProducing()
    info = await within(client.wait_closed(), "the close", seconds=30)
    assert (info.code, info.reason) == (1011, "outbound_send_timeout")
    # What had been written before the deadline still arrived; nothing after it.
    assert client.received[0] == CREATED
    assert all(e["type"] in (CREATED["type"], chunk["type"]) for e in client.received)
    assert len(client.received) < 49
    await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
    await gone(running, fake, client)


@pytest.mark.parametrize("tunnel_mode", ["in-process"])
@pytest_twisted.ensureDeferred
async def test_paused_upstream_socket_goes_at_once_when_the_client_is_closed(ws_matrix: Matrix) -> None:
    fake = ws_matrix.fake
    clock = Clock()
    chunk = {"type": "response.output_text.delta", "delta": "z" * MIB}
    fake.enqueue(Script(steps=(Event(CREATED), *[Event(chunk)] * 48, Hold())))
    running = await ws_matrix.start(clock=clock)
    client = await running.connect()
    assert client.protocol is not None
    client.protocol.transport.pauseProducing()
    client.send_json(create())
    await within(fake.wait_for_requests(1), "the upstream request")
    edge = edge_of(running)
    await eventually(lambda: edge.paused, "the client transport to push back")
    clock.advance(running.service.config.limits.outbound_send_timeout)
    assert edge.closed
    # The close decision was taken: the upstream socket must go now, not seconds later.
    try:
        await within(fake.wait_for_cancelled(0), "the upstream socket to close", seconds=2)
    finally:
        client.protocol.transport.resumeProducing()
        await within(fake.wait_for_cancelled(0), "the upstream socket to close eventually")
        await gone(running, fake, client)


# --- the client vanishes while the gateway closes it ---------------------------------------------


async def delayed_calls_left(before: set[Any]) -> list[Any]:
    """New active reactor DelayedCalls that are still there after a few reactor turns."""
    left: list[Any] = []
    for _ in range(50):
        left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
        if not left:
            break
        await deferLater(reactor, 0, lambda: None)
    return left


def cancel_close_handshake_timer(proto: Any) -> None:
    """Clean up after the bug below, so the test's own leak check is what reports it."""
    call = getattr(proto, "closeHandshakeTimeoutCall", None)
    if call is not None:
        call.cancel()
        proto.closeHandshakeTimeoutCall = None


@pytest.mark.parametrize("tunnel_mode", ["in-process"])
@pytest.mark.parametrize("upstream_transport", ["http"])
@pytest_twisted.ensureDeferred
async def test_client_vanishing_after_the_gateway_closed_it_leaves_no_timer(matrix: Matrix) -> None:
    running = await matrix.start()
    client = await running.connect()
    assert client.protocol is not None
    (proto,) = running.service.edge_factory.live
    before = set(reactor.getDelayedCalls())
    try:
        client.protocol.transport.pauseProducing()  # it will never read the close frame
        client.send_bytes(b"\x00")  # the gateway answers 1003
        await eventually(lambda: proto.state == proto.STATE_CLOSING, "the gateway to send its close")
        await client.abort()
        await within(running.service.edge_factory.wait_empty(), "the edge connection to go away")
        assert await delayed_calls_left(before) == []
    finally:
        cancel_close_handshake_timer(proto)


# --- upstream events the gateway must pass through untouched -------------------------------------


async def recv(client: ResponsesWSClient) -> Any:
    return await within(client.recv(), "the next frame")


@pytest_twisted.ensureDeferred
async def test_upstream_event_with_a_non_string_type_is_forwarded(matrix: Matrix) -> None:
    odd = {"type": ["response.completed"], "n": 1}
    matrix.fake.enqueue(Script(steps=(Event(CREATED), Event(odd), Event(COMPLETED)), headers=SSE_HEADERS))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await recv(client) == CREATED
    assert await recv(client) == odd
    assert await recv(client) == COMPLETED
    await quiet(running, client)


@pytest_twisted.ensureDeferred
async def test_garbage_that_looks_like_an_event_becomes_a_text_delta(matrix: Matrix) -> None:
    broken = '{"type":"response.completed", oops}'
    matrix.fake.enqueue(Script(steps=(Event(CREATED), Event(broken), Event(COMPLETED)), headers=SSE_HEADERS))
    running = await matrix.start()
    client = await running.connect()
    client.send_json(create())
    assert await recv(client) == CREATED
    assert await recv(client) == {"type": "response.output_text.delta", "delta": broken}
    assert await recv(client) == COMPLETED
    await quiet(running, client)
