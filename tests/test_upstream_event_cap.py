"""``limits.max_upstream_event_bytes``: one upstream event (an SSE event over HTTP, a message
over the upstream WebSocket) past the cap ends the turn with ``upstream_event_too_large``.

A single oversized event used to be buffered whole (128 MiB of event took the gateway from 57
to 569 MiB). Now the SSE decoder stops as soon as the event in progress is past the cap, and
the upstream socket refuses the frame from its header; the upstream is aborted, and the client
connection carries the next turn. Unit tests pin the decoder's bound; the rest run a real
gateway in front of the real fake upstream, both tunnel modes, both upstream transports.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
import pytest_twisted
from conftest import RunningGateway, gateway_config, start_gateway, within
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cch.config import LimitsConfig, UpstreamWebSocketConfig
from cch.sse import EventTooLarge, SSEDecoder
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.scripts import SSE_HEADERS, Event, Hold, Script
from cch.upstream.exchange import NotResent
from cch.upstream.pool import Target, UpstreamWSPool

CAP = 4096
CREATED = {"type": "response.created", "response": {"id": "resp_cap", "status": "in_progress"}}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_cap", "status": "completed"}}
# Over the cap by far, and past 64 KiB so a WebSocket frame carries a 64-bit length.
HUGE = {"type": "response.output_text.delta", "delta": "x" * 100_000}
TOO_LARGE = {
    "type": "error",
    "error": {
        "code": "upstream_event_too_large",
        "message": f"an upstream event exceeded the gateway's limit of {CAP} bytes",
    },
}


# --- the decoder ---------------------------------------------------------------------------


def test_decoder_refuses_an_event_growing_past_the_cap_and_never_holds_more_than_the_cap() -> None:
    decoder = SSEDecoder(max_event_bytes=CAP)
    piece = b"x" * 100
    fed = len(b"data: ")
    decoder.feed(b"data: ")
    with pytest.raises(EventTooLarge) as refused:
        while True:
            decoder.feed(piece)
            fed += len(piece)
            assert decoder.buffered <= CAP
    # Refused by the first piece that took it past the cap, not at the end of the event.
    assert CAP < fed + len(piece) <= CAP + len(piece)
    assert refused.value.limit == CAP and refused.value.events == []
    assert decoder.buffered == 0


def test_decoder_stops_a_128_mib_event_after_the_cap_not_at_its_end() -> None:
    cap = 1024 * 1024
    decoder = SSEDecoder(max_event_bytes=cap)
    chunk = b"x" * 65536  # what one socket read delivers
    decoder.feed(b"data: ")
    fed = 0
    with pytest.raises(EventTooLarge):
        for _ in range(128 * 16):  # 128 MiB, if it were all read
            fed += len(chunk)
            decoder.feed(chunk)
    assert fed <= cap + len(chunk)
    assert decoder.buffered == 0


def test_decoder_refuses_a_complete_oversized_event_and_hands_over_the_events_before_it() -> None:
    decoder = SSEDecoder(max_event_bytes=CAP)
    data = b"data: one\n\n" + b"data: " + b"y" * CAP + b"\n\ndata: two\n\n"
    with pytest.raises(EventTooLarge) as refused:
        decoder.feed(data)
    assert refused.value.events == ["one"]
    assert decoder.buffered == 0


@pytest.mark.parametrize("cut", [0, 1, 2], ids=["whole", "delimiter-split", "after-first-newline"])
def test_decoder_accepts_an_event_of_exactly_the_cap(cut: int) -> None:
    event = b"data: " + b"z" * (CAP - len(b"data: "))
    data = event + b"\n\n"
    at = len(event) + cut - 1 if cut else len(data)
    decoder = SSEDecoder(max_event_bytes=CAP)
    events = decoder.feed(data[:at]) + decoder.feed(data[at:])
    assert events == ["z" * (CAP - len(b"data: "))]


def test_decoder_counts_a_crlf_event_as_its_lf_form() -> None:
    # 18 bytes a line with CRLF, 17 with LF: over the cap as sent, under it as decoded.
    lines = b"data: " + b"w" * 10 + b"\r\n"
    count = CAP // 17
    assert len(lines) * count > CAP
    decoder = SSEDecoder(max_event_bytes=CAP)
    assert decoder.feed(lines * count + b"\r\n") == ["\n".join(["w" * 10] * count)]


# --- the upstream socket refuses a frame from its header --------------------------------------


class _HugeFrameHeader(Protocol):
    """Completes the upgrade, then answers the turn with the header of a 128 MiB text frame
    and a little of its payload, and holds: the rest would never come."""

    factory: Factory

    def connectionMade(self) -> None:
        self.data = b""
        self.upgraded = False
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.upgraded and b"\r\n\r\n" in self.data:
            head, self.data = self.data.split(b"\r\n\r\n", 1)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.upgraded = True
        if self.upgraded and self.data:  # the turn's frame arrived
            self.data = b""
            self.transport.write(b"\x81\x7f" + (128 * 1024 * 1024).to_bytes(8, "big") + b"x" * 1000)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_upstream_socket_refuses_a_128_mib_frame_from_its_header_and_ends_the_turn() -> None:
    factory = Factory.forProtocol(_HugeFrameHeader)
    factory.connections = []  # type: ignore[attr-defined]
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    clock = Clock()
    pool = UpstreamWSPool(reactor, clock, UpstreamWebSocketConfig())
    try:
        target = Target.of("primary", f"ws://127.0.0.1:{port.getHost().port}/v1/responses", {}, "sess-1", max_event_bytes=CAP)
        outcome = await within(pool.exchange(target, json.dumps(create())), "the refusal")
        assert isinstance(outcome, NotResent)
        assert (outcome.code, outcome.message) == (TOO_LARGE["error"]["code"], TOO_LARGE["error"]["message"])
        (server,) = factory.connections  # type: ignore[attr-defined]
        await within(server.lost, "the upstream socket to be dropped")
        assert pool.sockets == set() and pool.entries == {}
    finally:
        await pool.close_all()
        await port.stopListening()
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


# --- end to end ----------------------------------------------------------------------------



def turn(client: ResponsesWSClient, **fields: Any) -> Deferred[list[Any]]:
    client.send_json(create(**fields))
    return Deferred.fromCoroutine(client.recv_turn())


@pytest_twisted.async_yield_fixture
async def capped(fake: FakeUpstream, tunnel_mode: str, upstream_transport: str) -> Any:
    config = gateway_config(
        fake,
        tunnel=tunnel_mode,
        upstream=upstream_transport,
        limits=LimitsConfig(max_upstream_event_bytes=CAP),
    )
    running = await start_gateway(config)
    yield running
    await running.stop()  # asserts: no edge connection, no request, no upstream socket left
    await within(fake.wait_for_idle(), "the fake's connections to close")


@pytest.mark.parametrize("where", ["first-event", "mid-stream", "reused-connection"])
@pytest_twisted.ensureDeferred
async def test_an_event_over_the_cap_ends_the_turn_with_upstream_event_too_large_and_aborts_the_upstream(
    capped: RunningGateway, fake: FakeUpstream, where: str
) -> None:
    client = await capped.connect()
    if where == "reused-connection":
        # A normal turn first: the oversized event arrives on a kept-alive / retained upstream.
        assert (await within(turn(client), "the warm-up turn"))[-1]["type"] == "response.completed"
    before = [Event(CREATED)] if where == "mid-stream" else []
    # Hold() after it: only the gateway can end this upstream request.
    fake.enqueue(Script((*before, Event(HUGE), Event(COMPLETED), Hold()), headers=SSE_HEADERS))
    events = await within(turn(client), "the oversized turn")
    assert events == [*([CREATED] if before else []), TOO_LARGE]
    index = len(fake.requests) - 1
    await within(fake.wait_for_cancelled(index), "the upstream request to be aborted")
    await within(capped.service.handler.wait_idle(), "the handler to go idle")
    pool = capped.service.ws_pool
    assert pool.sockets == set() and pool.entries == {}  # the socket is gone, never reused
    # The client connection carries the next turn, on a new upstream socket when over WebSocket.
    assert (await within(turn(client), "the next turn"))[-1]["type"] == "response.completed"
    assert client.close_info is None
    if capped.upstream == "websocket":
        assert [r.transport for r in fake.requests] == ["websocket"] * len(fake.requests)
        socket = fake.requests[index].connection_index
        assert socket is not None and fake.ws_connections[socket].closed
        assert fake.requests[-1].connection_index == socket + 1


@pytest_twisted.ensureDeferred
async def test_an_event_at_the_cap_is_delivered(capped: RunningGateway, fake: FakeUpstream) -> None:
    client = await capped.connect()
    filler = "f" * CAP
    at_cap = {"type": "response.output_text.delta", "delta": filler}
    text = json.dumps(at_cap, separators=(",", ":"))
    at_cap["delta"] = filler[: len(filler) - (len(text) - CAP) - len("data: ")]
    fake.enqueue(Script((Event(CREATED), Event(at_cap), Event(COMPLETED)), headers=SSE_HEADERS))
    assert await within(turn(client), "the turn") == [CREATED, at_cap, COMPLETED]
