"""The hot-path WebSocket frames (cch.wsframes), in both directions.

Upstream sockets and client sockets cut the common frames (final text, 7- or 16-bit length;
unmasked from an upstream, masked from a client) straight out of the read buffer and leave
everything else to Autobahn. These tests feed crafted bytes, in any split, to handshaken
protocols on a StringTransport and check that exactly the messages a peer sent arrive, in
order, and that protocol errors still fail the connection the way Autobahn does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from wire import GUID, Transport, client_frame, frame, open_edge, read_frames, split

from cch.config import LimitsConfig
from cch.edge.protocol import EdgeProtocol
from cch.upstream.ws import CLOSED, OPEN, SocketClosed, UpstreamConnection
from cch.wsframes import masked_text_frame, text_frame_header


class Consumer:
    def __init__(self) -> None:
        self.opened = 0
        self.messages: list[tuple[str, int]] = []
        self.closed: list[tuple[Any, ...]] = []

    def ws_opened(self) -> None:
        self.opened += 1

    def ws_message(self, text: str, size: int) -> None:
        self.messages.append((text, size))

    def ws_closed(self, closed: SocketClosed) -> None:
        self.closed.append((closed.code, closed.reason, closed.failure, closed.status))


# --- upstream sockets: unmasked frames from a server ------------------------------------------


class Upstream:
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


def test_many_small_and_medium_text_frames_in_one_read_arrive_in_order() -> None:
    h = Upstream()
    events = [f'{{"type":"response.output_text.delta","n":{i},"delta":"{"x" * (i * 7)}"}}' for i in range(60)]
    h.feed(b"".join(frame(e.encode()) for e in events))
    assert h.texts() == events
    assert [size for _, size in h.consumer.messages] == [len(e.encode()) for e in events]


def test_a_frame_split_byte_by_byte_arrives_once_and_whole() -> None:
    h = Upstream()
    event = '{"type":"response.output_text.delta","delta":"' + "é" * 200 + '"}'
    data = frame(event.encode()) + frame(b'{"type":"response.completed"}')
    h.feed(*(data[i : i + 1] for i in range(len(data))))
    assert h.texts() == [event, '{"type":"response.completed"}']


def test_large_frames_with_64_bit_lengths_and_empty_frames_arrive() -> None:
    h = Upstream()
    big = b'"' + b"y" * 70000 + b'"'
    h.feed(frame(b"a") + frame(big) + frame(b"") + frame(b"b"))
    assert h.texts() == ["a", big.decode(), "", "b"]


def test_pings_between_events_are_answered_and_do_not_reorder_events() -> None:
    h = Upstream()
    h.feed(frame(b"one") + frame(b"hi", opcode=9) + frame(b"two"))
    assert h.texts() == ["one", "two"]
    pong = h.transport.value()
    assert pong[0] == 0x8A and pong[1] & 0x7F == 2  # a masked pong carrying the ping's payload


def test_a_fragmented_message_is_assembled_between_whole_ones() -> None:
    h = Upstream()
    h.feed(
        frame(b"first")
        + frame(b"par", fin=False)
        + frame(b"ti", opcode=0, fin=False)
        + frame(b"al", opcode=0)
        + frame(b"last")
    )
    assert h.texts() == ["first", "partial", "last"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    h = Upstream()
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
    h = Upstream()
    h.feed(frame(b"before") + bad + frame(b"after"))
    assert h.texts() == ["before"]
    assert h.transport.disconnecting
    h.lose()
    assert h.conn.state == CLOSED
    [(code, _, failure, _)] = h.consumer.closed
    assert code == 1006 and why in failure


@pytest.mark.parametrize("size", [101, 300, 70000])
def test_a_frame_over_the_size_limit_drops_the_socket(size: int) -> None:
    h = Upstream(max_message_bytes=100)
    h.feed(frame(b"x" * 100) + frame(b"y" * size) + frame(b"after"))
    assert h.texts() == ["x" * 100]
    h.lose()
    [(code, _, failure, _)] = h.consumer.closed
    assert code == 1006 and f"size {size} exceeds payload limit of 100 octets" in failure


def test_a_close_frame_after_events_delivers_them_then_the_close() -> None:
    h = Upstream()
    h.feed(frame(b"one") + frame(b"two") + frame(struct.pack("!H", 1001) + b"bye", opcode=8))
    assert h.texts() == ["one", "two"]
    h.lose()
    assert h.consumer.closed[0][:2] == (1001, "bye")


def test_after_the_close_handshake_the_wait_for_the_server_to_drop_tcp_is_on_the_clock() -> None:
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    h = Upstream()
    h.conn.safe_close(1000)
    h.feed(frame(struct.pack("!H", 1000), opcode=8))  # the upstream's reply to our close frame
    assert set(reactor.getDelayedCalls()) == before  # nothing on the global reactor
    assert not h.transport.disconnecting  # the server is expected to drop TCP first
    h.clock.advance(1.0)
    assert h.transport.disconnecting  # it did not: we do, on the injected clock


def test_a_consumer_closing_the_socket_mid_read_gets_nothing_more_from_that_read() -> None:
    h = Upstream()

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
    h = Upstream()
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


# --- client sockets: masked frames into the edge --------------------------------------------


class Edge:
    """A production edge protocol, upgraded; what reaches the connection's rules is recorded."""

    def __init__(self, max_message_bytes: int | None = None) -> None:
        limits = LimitsConfig() if max_message_bytes is None else LimitsConfig(max_message_bytes=max_message_bytes)
        self.proto: EdgeProtocol
        self.proto, self.transport = open_edge(limits)
        self.texts: list[str] = []
        self.sizes: list[int] = []
        self.binary = 0
        edge = self.proto.edge
        assert edge is not None
        edge.text_received = self._text  # type: ignore[method-assign]
        edge.binary_received = self._binary  # type: ignore[method-assign]

    def _text(self, text: str, size: int) -> None:
        self.texts.append(text)
        self.sizes.append(size)

    def _binary(self) -> None:
        self.binary += 1

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.proto.dataReceived(chunk)

    def close_code(self) -> int | None:
        closes = [payload for opcode, payload in read_frames(self.transport.value()) if opcode == 8]
        return struct.unpack("!H", closes[0][:2])[0] if closes else None


def test_client_frames_in_one_read_reach_the_edge_in_order() -> None:
    e = Edge()
    texts = [json.dumps({"type": "response.create", "n": i, "x": "é" * (i * 9)}) for i in range(20)]
    e.feed(b"".join(client_frame(t.encode()) for t in texts))
    assert e.texts == texts
    assert e.sizes == [len(t.encode()) for t in texts]


def test_a_client_frame_split_byte_by_byte_arrives_once() -> None:
    e = Edge()
    data = client_frame(b"x" * 300) + client_frame(b"")
    e.feed(*(data[i : i + 1] for i in range(len(data))))
    assert e.texts == ["x" * 300, ""]


@pytest.mark.parametrize(
    "bad, code",
    [
        (frame(b"unmasked"), 1002),
        (client_frame(b"\xff\xfe"), 1007),
        (client_frame(b"\xed\xa0\x80"), 1007),  # a UTF-16 surrogate encoded as UTF-8
        (client_frame(b"short", length_bytes=2), 1002),
        (client_frame(b"rsv", rsv=2), 1002),
    ],
    ids=["unmasked", "invalid-utf8", "surrogate", "non-minimal-16", "rsv"],
)
def test_bad_client_frames_close_the_connection_like_autobahn(bad: bytes, code: int) -> None:
    e = Edge()
    e.feed(client_frame(b"ok") + bad + client_frame(b"never"))
    assert e.texts == ["ok"]
    assert e.close_code() == code


def test_a_client_frame_over_the_limit_closes_1009_and_one_at_the_limit_passes() -> None:
    e = Edge(max_message_bytes=200)
    e.feed(client_frame(b"a" * 200) + client_frame(b"b" * 201) + client_frame(b"never"))
    assert e.texts == ["a" * 200]
    assert e.close_code() == 1009


def test_fragmented_binary_and_ping_frames_from_a_client_still_work() -> None:
    e = Edge()
    e.feed(
        client_frame(b"one")
        + client_frame(b"pi", opcode=9)
        + client_frame(b"fr", fin=False)
        + client_frame(b"ag", opcode=0)
        + client_frame(b"\x00\x01", opcode=2)
        + client_frame(b"two")
    )
    assert e.texts == ["one", "frag", "two"]
    assert e.binary == 1
    assert (10, b"pi") in read_frames(e.transport.value())


def test_a_data_frame_on_the_fast_path_counts_as_traffic_for_the_keepalive() -> None:
    e = Edge()
    cancelled: list[bool] = []
    e.proto.autoPingTimeoutCall = object()  # a pong is awaited
    e.proto._cancelAutoPingTimeoutCall = lambda: cancelled.append(True)  # type: ignore[method-assign]
    e.feed(client_frame(b"traffic"))
    assert cancelled == [True] and e.texts == ["traffic"]


_client_message = st.tuples(
    st.sampled_from(["text", "fragmented", "ping"]),
    st.integers(min_value=0, max_value=3000),
)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(_client_message, max_size=10), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_mix_of_client_frames_in_any_split_arrives_as_sent(
    messages: list[tuple[str, int]], cuts: list[int]
) -> None:
    e = Edge()
    wire = b""
    expected: list[str] = []
    pings = []
    for i, (kind, size) in enumerate(messages):
        payload = (f"{i}:" + "é" * (size // 2)).encode()
        if kind == "text":
            wire += client_frame(payload)
            expected.append(payload.decode())
        elif kind == "fragmented":
            half = len(payload) // 2
            wire += client_frame(payload[:half], fin=False) + client_frame(payload[half:], opcode=0)
            expected.append(payload.decode("utf-8"))  # a code point may straddle the fragments
        else:
            wire += client_frame(payload[:100], opcode=9)
            pings.append(payload[:100])
    e.feed(*split(wire, cuts))
    assert e.texts == expected
    assert [p for op, p in read_frames(e.transport.value()) if op == 10] == pings


# --- frames the gateway writes --------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_frames_the_gateway_writes_are_read_back_whole(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    assert read_frames(text_frame_header(size) + payload) == [(1, payload)]
    masked = masked_text_frame(payload)
    assert masked[1] & 0x80  # a client's frames are masked
    assert read_frames(masked) == [(1, payload)]


def test_every_masked_frame_gets_a_fresh_key() -> None:
    keys = {bytes(masked_text_frame(b"same text")[2:6]) for _ in range(20)}
    assert len(keys) > 1


# --- differential: the fast path against Autobahn alone, on any bytes --------------------------
#
# The same random frames, in the same random split, go to the production protocol and to a copy
# whose consumeData is Autobahn's own (no fast path). Everything observable must be the same:
# the messages delivered, the bytes written back (close frames, pongs), the state, whether the
# connection was dropped, and what is left in the buffer.

_SIZES = [0, 1, 5, 99, 100, 101, 125, 126, 127, 129, 130, 131, 200, 299, 300, 301, 65535, 65536]


@st.composite
def _payload(draw: Any) -> bytes:
    action = draw(st.sampled_from([None] * 9 + [b"close", b"drop", b"send"]))
    if action is not None:
        return action
    size = draw(st.sampled_from(_SIZES))
    kind = draw(st.sampled_from(["ascii"] * 8 + ["bytes", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(min_size=min(size, 8), max_size=min(size, 8))) + b"a" * max(0, size - 8)
    if kind == "truncated" and size >= 2:
        return b"a" * (size - 1) + b"\xe2"  # ends inside a UTF-8 sequence
    return b"a" * size


@st.composite
def _frames(draw: Any, masked: bool) -> bytes:
    out = b""
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        payload = draw(_payload())
        opcode = draw(st.sampled_from([1] * 8 + [0, 2, 8, 9, 10, 3, 11]))
        if opcode >= 8 and len(payload) > 125:
            payload = payload[: draw(st.sampled_from([0, 2, 125]))]
        if opcode == 8 and len(payload) >= 2 and draw(st.booleans()):
            payload = struct.pack("!H", draw(st.sampled_from([1000, 1001, 999, 3000]))) + payload[2:]
        length_bytes = draw(st.sampled_from([None] * 6 + [0, 2, 8]))
        if length_bytes == 0 and len(payload) >= 126:
            length_bytes = None
        if length_bytes == 2 and len(payload) >= 65536:
            length_bytes = 8
        mask = draw(st.sampled_from([masked] * 12 + [not masked]))
        out += frame(
            payload,
            opcode=opcode,
            fin=draw(st.sampled_from([True] * 6 + [False])),
            rsv=draw(st.sampled_from([0] * 10 + [1, 4])),
            mask=os.urandom(4) if mask else None,
            length_bytes=length_bytes,
        )
    return out


class _RecordingEdge(EdgeProtocol):
    """The production edge protocol, minus turns: records messages, and some messages act."""

    def _open(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((bytes(payload), isBinary))
        if payload == b"close":
            self.send_close(1000, "bye")
        elif payload == b"drop":
            self.dropConnection(abort=True)
        elif payload == b"send":
            self.send_text("x")


class _AutobahnEdge(_RecordingEdge):
    def consumeData(self) -> None:
        WebSocketServerProtocol.consumeData(self)


def _edge_outcome(cls: type[_RecordingEdge], limit: int, chunks: list[bytes]) -> tuple[Any, ...]:
    proto, transport = open_edge(LimitsConfig(max_message_bytes=limit), cls)
    assert isinstance(proto, _RecordingEdge)
    for chunk in chunks:
        proto.dataReceived(chunk)
    left = proto.data if proto.state != proto.STATE_CLOSED else None
    return proto.messages, transport.value(), proto.state, transport.disconnecting, left


@settings(max_examples=300, deadline=None)
@given(
    data=_frames(masked=True),
    limit=st.sampled_from([0, 100, 130, 300]),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
)
@example(data=client_frame(b"drop") + client_frame(b"after"), limit=0, cuts=[])  # stops at once
@example(data=client_frame(b"close") + client_frame(b"after"), limit=0, cuts=[])
def test_the_edge_fast_path_behaves_exactly_like_autobahn(data: bytes, limit: int, cuts: list[int]) -> None:
    chunks = split(data, cuts)
    assert _edge_outcome(_RecordingEdge, limit, chunks) == _edge_outcome(_AutobahnEdge, limit, chunks)


class _ActingConsumer(Consumer):
    def __init__(self, conn: UpstreamConnection) -> None:
        super().__init__()
        self.conn = conn

    def ws_message(self, text: str, size: int) -> None:
        super().ws_message(text, size)
        if text == "close":
            self.conn.safe_close(1000)


def _upstream_outcome(autobahn_only: bool, limit: int, chunks: list[bytes]) -> tuple[Any, ...]:
    upstream = Upstream(max_message_bytes=limit)
    consumer = upstream.conn.consumer = _ActingConsumer(upstream.conn)
    if autobahn_only:
        upstream.proto.consumeData = lambda: WebSocketClientProtocol.consumeData(upstream.proto)  # type: ignore[method-assign]
    upstream.feed(*chunks)
    # A client masks its frames with random keys: compare what they say, not their bytes.
    return consumer.messages, read_frames(upstream.transport.value()), upstream.proto.state, upstream.conn.state, upstream.transport.disconnecting


@settings(max_examples=300, deadline=None)
@given(
    data=_frames(masked=False),
    limit=st.sampled_from([0, 100, 130, 300]),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
)
def test_the_upstream_fast_path_behaves_exactly_like_autobahn(data: bytes, limit: int, cuts: list[int]) -> None:
    chunks = split(data, cuts)
    assert _upstream_outcome(False, limit, chunks) == _upstream_outcome(True, limit, chunks)
