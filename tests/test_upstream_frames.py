"""The upstream socket's receive path, frame by frame.

:class:`cch.upstream.ws._ClientProtocol` cuts the common frames (final, unmasked text, 7- or
16-bit length) straight out of the read buffer and leaves everything else to Autobahn. These
tests feed crafted server bytes, in any split, to a handshaken protocol on a
``StringTransport`` and check that the owner sees exactly the messages a WebSocket peer sent,
in order, and that protocol errors still fail the connection with the right close code.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from cch.upstream.ws import CLOSED, OPEN, UpstreamConnection

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Consumer:
    def __init__(self) -> None:
        self.opened = 0
        self.messages: list[tuple[str, int]] = []
        self.closed: list[tuple[Any, ...]] = []

    def ws_opened(self) -> None:
        self.opened += 1

    def ws_message(self, text: str, size: int) -> None:
        self.messages.append((text, size))

    def ws_closed(self, code: int | None, reason: str | None, failure: str | None, status: int | None) -> None:
        self.closed.append((code, reason, failure, status))


def frame(
    payload: bytes,
    *,
    opcode: int = 1,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length_bytes: int | None = None,
) -> bytes:
    """One WebSocket frame as a server would write it (or, with the options, should not)."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    if length_bytes == 0:
        header = bytes((first, mask_bit | size))
    elif length_bytes == 2:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", size)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", size)
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header += mask
    return header + payload


class Transport(StringTransport):
    """A TCP transport's leniency: unregistering when no producer is registered is fine."""

    def unregisterProducer(self) -> None:
        self.producer = None


class Harness:
    """An upstream connection whose socket is a StringTransport, handshake done."""

    def __init__(self, max_message_bytes: int = 0) -> None:
        self.clock = Clock()
        self.conn = UpstreamConnection(
            self.clock,
            self.clock,
            "ws://upstream.test/v1/responses",
            {"authorization": "Bearer k"},
            handshake_timeout=10,
            max_message_bytes=max_message_bytes,
        )
        self.consumer = Consumer()
        self.conn.consumer = self.consumer
        self.proto = self.conn.client_factory().buildProtocol(None)
        self.transport = Transport()
        self.proto.makeConnection(self.transport)
        request = self.transport.value()
        self.transport.clear()
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.proto.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        assert self.conn.state == OPEN and self.consumer.opened == 1

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.proto.dataReceived(chunk)

    def texts(self) -> list[str]:
        return [text for text, _ in self.consumer.messages]

    def sent_close_code(self) -> int | None:
        """The close code of the close frame the client wrote (frames from a client are masked)."""
        data = self.transport.value()
        at = data.find(b"\x88")
        if at < 0:
            return None
        length = data[at + 1] & 0x7F
        mask = data[at + 2 : at + 6]
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(data[at + 6 : at + 6 + length]))
        return struct.unpack("!H", body[:2])[0] if len(body) >= 2 else None

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_many_small_and_medium_text_frames_in_one_read_arrive_in_order() -> None:
    h = Harness()
    events = [f'{{"type":"response.output_text.delta","n":{i},"delta":"{"x" * (i * 7)}"}}' for i in range(60)]
    h.feed(b"".join(frame(e.encode()) for e in events))
    assert h.texts() == events
    assert [size for _, size in h.consumer.messages] == [len(e.encode()) for e in events]


def test_a_frame_split_byte_by_byte_arrives_once_and_whole() -> None:
    h = Harness()
    event = '{"type":"response.output_text.delta","delta":"' + "é" * 200 + '"}'
    data = frame(event.encode()) + frame(b'{"type":"response.completed"}')
    h.feed(*(data[i : i + 1] for i in range(len(data))))
    assert h.texts() == [event, '{"type":"response.completed"}']


def test_large_frames_with_64_bit_lengths_and_empty_frames_arrive() -> None:
    h = Harness()
    big = b'"' + b"y" * 70000 + b'"'
    h.feed(frame(b"a") + frame(big) + frame(b"") + frame(b"b"))
    assert h.texts() == ["a", big.decode(), "", "b"]


def test_pings_between_events_are_answered_and_do_not_reorder_events() -> None:
    h = Harness()
    h.feed(frame(b"one") + frame(b"hi", opcode=9) + frame(b"two"))
    assert h.texts() == ["one", "two"]
    pong = h.transport.value()
    assert pong[0] == 0x8A and pong[1] & 0x7F == 2  # a masked pong carrying the ping's payload


def test_a_fragmented_message_is_assembled_between_whole_ones() -> None:
    h = Harness()
    h.feed(
        frame(b"first")
        + frame(b"par", fin=False)
        + frame(b"ti", opcode=0, fin=False)
        + frame(b"al", opcode=0)
        + frame(b"last")
    )
    assert h.texts() == ["first", "partial", "last"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    h = Harness()
    h.feed(frame(b'{"delta":"\xff"}') + frame(b"ok"))
    assert h.texts() == ['{"delta":"\ufffd"}', "ok"]
    assert h.conn.state == OPEN


@pytest.mark.parametrize(
    "bad, why",
    [
        (frame(b"masked", mask=b"\x01\x02\x03\x04"), "masked server-to-client frame"),
        (frame(b"x" * 200, length_bytes=8), "not using minimal length encoding"),
        (frame(b"short", length_bytes=2), "not using minimal length encoding"),
        (frame(b"rsv", rsv=1), "RSV = 1"),
        (frame(b"x", opcode=3), "reserved opcode 3"),
        (frame(b"x", opcode=0), "continuation data frame outside fragmented message"),
    ],
    ids=["masked", "non-minimal-64", "non-minimal-16", "rsv", "reserved-opcode", "stray-continuation"],
)
def test_protocol_errors_drop_the_socket_and_nothing_after_them_is_delivered(bad: bytes, why: str) -> None:
    h = Harness()
    h.feed(frame(b"before") + bad + frame(b"after"))
    assert h.texts() == ["before"]
    assert h.transport.disconnecting
    h.lose()
    assert h.conn.state == CLOSED
    [(code, _, failure, _)] = h.consumer.closed
    assert code == 1006 and why in failure


@pytest.mark.parametrize("size", [101, 300, 70000])
def test_a_frame_over_the_size_limit_drops_the_socket(size: int) -> None:
    h = Harness(max_message_bytes=100)
    h.feed(frame(b"x" * 100) + frame(b"y" * size) + frame(b"after"))
    assert h.texts() == ["x" * 100]
    h.lose()
    [(code, _, failure, _)] = h.consumer.closed
    assert code == 1006 and f"size {size} exceeds payload limit of 100 octets" in failure


def test_a_close_frame_after_events_delivers_them_then_the_close() -> None:
    h = Harness()
    h.feed(frame(b"one") + frame(b"two") + frame(struct.pack("!H", 1001) + b"bye", opcode=8))
    assert h.texts() == ["one", "two"]
    h.lose()
    assert h.consumer.closed[0][:2] == (1001, "bye")


def test_a_consumer_closing_the_socket_mid_read_gets_nothing_more_from_that_read() -> None:
    h = Harness()

    class Closer(Consumer):
        def ws_message(self, text: str, size: int) -> None:
            super().ws_message(text, size)
            if text == "stop":
                h.conn.safe_close(1000)

    h.consumer = Closer()
    h.conn.consumer = h.consumer
    h.feed(frame(b"go") + frame(b"stop") + frame(b"ignored"))
    assert h.texts() == ["go", "stop"]
    assert h.sent_close_code() == 1000


_message = st.tuples(
    st.sampled_from(["text", "fragmented", "ping", "binary"]),
    st.integers(min_value=0, max_value=70000).filter(lambda n: n < 400 or n > 65530 or n % 997 == 0),
)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(_message, max_size=12), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_mix_of_frames_in_any_split_arrives_as_sent(messages: list[tuple[str, int]], cuts: list[int]) -> None:
    h = Harness()
    wire = b""
    expected: list[str] = []
    pings = 0
    for i, (kind, size) in enumerate(messages):
        payload = (f"{i}:" + "z" * size).encode()
        if kind == "text":
            wire += frame(payload)
            expected.append(payload.decode())
        elif kind == "binary":
            wire += frame(payload, opcode=2)
            expected.append(payload.decode())
        elif kind == "fragmented":
            half = len(payload) // 2
            wire += frame(payload[:half], fin=False) + frame(b"", opcode=0, fin=False) + frame(payload[half:], opcode=0)
            expected.append(payload.decode())
        else:
            wire += frame(payload[:100], opcode=9)
            pings += 1
    h.feed(*split(wire, cuts))
    assert h.texts() == expected
    assert h.transport.value().count(b"\x8a") >= pings
    assert h.conn.state == OPEN and not h.consumer.closed
