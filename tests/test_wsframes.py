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
import tracemalloc
import zlib
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from wire import GUID, Transport, client_frame, frame, open_edge, read_frames, split, upgraded_edge

from cch.config import LimitsConfig
from cch.edge.protocol import EdgeProtocol
from cch.upstream.ws import CLOSED, OPEN, SocketClosed, UpstreamConnection
from cch.writes import write_batch
from cch.wsframes import masked_text_frame, text_frame_header


class Consumer:
    relay = None  # no relay: every frame is delivered (relayed frames: tests/test_relay.py)
    read_types: frozenset[str] = frozenset()
    kept_types: frozenset[str] = frozenset()

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

    def __init__(
        self, max_message_bytes: int = 0, deflate_window_bits: int | None = None, extension: bytes | None = None
    ) -> None:
        """``deflate_window_bits``: the socket offers permessage-deflate; ``extension``: the
        server's ``Sec-WebSocket-Extensions`` answer (none: the offer is declined)."""
        self.clock = Clock()
        self.conn = UpstreamConnection(
            self.clock,
            self.clock,
            "ws://upstream.test/v1/responses",
            {"authorization": "Bearer k"},
            handshake_timeout=10,
            max_message_bytes=max_message_bytes,
            deflate_window_bits=deflate_window_bits,
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
        self.offered = next(
            (line.split(b":", 1)[1].strip() for line in request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-extensions:")),
            None,
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        answer = b"Sec-WebSocket-Extensions: " + extension + b"\r\n" if extension else b""
        self.proto.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + answer + b"\r\n"
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


def test_client_frames_split_across_reads_stay_on_the_fast_path() -> None:
    """A read that ends inside a client's frame leaves that frame's start in the buffer for the
    next read; Autobahn never parses it (nor, in its wake, the frames of the reads after)."""
    e = Edge()
    texts = [json.dumps({"type": "response.create", "n": i, "x": "y" * 2000}) for i in range(6)]
    data = b"".join(client_frame(t.encode()) for t in texts)
    for i in range(0, len(data), 700):
        e.feed(data[i : i + 700])
        assert e.proto.current_frame is None  # Autobahn has not taken a frame over
    assert e.texts == texts


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
    assert e.transport.disconnecting  # after the close frame: the rest is never read


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


# --- permessage-deflate: compressed frames (RSV1) never take the fast path ----------------------
#
# With permessage-deflate negotiated, a peer may send any message compressed (RSV1 set, the first
# byte 0xC1) or plain (0x81). The fast path takes only plain final text frames; compressed ones
# are inflated by Autobahn, whose zlib stream is the one both ends keep across messages (context
# takeover), so a compressed frame taken for a plain one would hand the raw deflate bytes on and
# leave the stream one message behind.

DEFLATE_OFFER = b"permessage-deflate; client_max_window_bits"


class Deflater:
    """A peer's permessage-deflate compressor: one zlib stream across messages."""

    def __init__(self, window_bits: int = 15) -> None:
        self.z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits)

    def __call__(self, payload: bytes) -> bytes:
        data = self.z.compress(payload) + self.z.flush(zlib.Z_SYNC_FLUSH)
        assert data.endswith(b"\x00\x00\xff\xff")
        return data[:-4]


class Inflater:
    """A peer's permessage-deflate decompressor."""

    def __init__(self) -> None:
        self.z = zlib.decompressobj(-15)

    def __call__(self, payload: bytes) -> bytes:
        return self.z.decompress(payload + b"\x00\x00\xff\xff")


def raw_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, unmasked payload) of each frame: the first byte shows FIN, RSV1 and opcode."""
    firsts, pos = [], 0
    while pos < len(data):
        firsts.append(data[pos])
        length = data[pos + 1] & 0x7F
        skip = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if data[pos + 1] & 0x80 else 0)
        pos += skip + read_frame_length(data, pos)
    return list(zip(firsts, [payload for _, payload in read_frames(data)], strict=True))


def read_frame_length(data: bytes, pos: int) -> int:
    length = data[pos + 1] & 0x7F
    if length == 126:
        return int(struct.unpack("!H", data[pos + 2 : pos + 4])[0])
    if length == 127:
        return int(struct.unpack("!Q", data[pos + 2 : pos + 10])[0])
    return length


def open_deflate_edge(
    limits: LimitsConfig | None = None, protocol: type[EdgeProtocol] | None = None, offer: bytes = DEFLATE_OFFER
) -> tuple[EdgeProtocol, Any, bytes]:
    """A production edge protocol (or ``protocol``) upgraded by a client offering ``offer``;
    the handshake answer's ``Sec-WebSocket-Extensions`` (empty when declined)."""
    proto, transport, head = upgraded_edge(limits, protocol, b"Sec-WebSocket-Extensions: " + offer + b"\r\n")
    answer = next(
        (line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-extensions:")),
        b"",
    )
    return proto, transport, answer


class DeflateEdge(Edge):
    """:class:`Edge` whose client negotiated permessage-deflate."""

    def __init__(self, max_message_bytes: int | None = None, offer: bytes = DEFLATE_OFFER) -> None:
        limits = LimitsConfig() if max_message_bytes is None else LimitsConfig(max_message_bytes=max_message_bytes)
        self.proto, self.transport, self.answer = open_deflate_edge(limits, offer=offer)
        self.texts, self.sizes, self.binary = [], [], 0
        edge = self.proto.edge
        assert edge is not None
        edge.text_received = self._text  # type: ignore[method-assign]
        edge.binary_received = self._binary  # type: ignore[method-assign]
        self.deflate = Deflater(12)  # the window the edge asked the client for

    def compressed(self, payload: bytes, **options: Any) -> bytes:
        return client_frame(self.deflate(payload), rsv=4, **options)


def test_the_edge_accepts_deflate_within_its_window_limit() -> None:
    assert DeflateEdge().answer == b"permessage-deflate; client_max_window_bits=15"  # the default

    def answer(offer: bytes, bits: int = 12) -> bytes:
        return open_deflate_edge(LimitsConfig(websocket_compression_window_bits=bits), offer=offer)[2]

    # The client is asked to keep its window within the limit when its offer lets us ask.
    assert answer(DEFLATE_OFFER) == b"permessage-deflate; client_max_window_bits=12"
    # A client asking for a smaller server window gets it; one that does not let the server
    # choose its window is still accepted (its own window may be up to 32 KiB).
    assert answer(b"permessage-deflate; server_max_window_bits=10") == b"permessage-deflate; server_max_window_bits=10"
    assert answer(b"permessage-deflate; server_no_context_takeover") == (
        b"permessage-deflate; server_no_context_takeover"
    )
    assert answer(b"permessage-deflate") == b"permessage-deflate"
    _, _, refused = open_deflate_edge(LimitsConfig(websocket_compression=False))
    assert refused == b""


def test_the_edges_compressor_stays_within_the_window_limit() -> None:
    proto, _, _ = open_deflate_edge(LimitsConfig(websocket_compression_window_bits=10))
    [pmce] = proto.websocket_extensions_in_use
    assert (pmce.server_max_window_bits, pmce.client_max_window_bits, pmce.mem_level) == (10, 10, 2)
    proto, _, _ = open_deflate_edge(LimitsConfig(), offer=b"permessage-deflate; server_max_window_bits=11")
    [pmce] = proto.websocket_extensions_in_use
    assert (pmce.server_max_window_bits, pmce.client_max_window_bits, pmce.mem_level) == (11, 15, 4)


def test_compressed_client_frames_are_inflated_by_autobahn_between_plain_ones() -> None:
    e = DeflateEdge()
    texts = [json.dumps({"type": "response.create", "n": i, "instructions": "You are Codex. " * (i * 40)}) for i in range(12)]
    wire = b"".join(e.compressed(t.encode()) if i % 3 else client_frame(t.encode()) for i, t in enumerate(texts))
    e.feed(wire)
    assert e.texts == texts
    assert e.sizes == [len(t.encode()) for t in texts]  # the inflated size, as limits count it
    assert e.close_code() is None


def test_a_compressed_client_frame_split_byte_by_byte_arrives_once() -> None:
    e = DeflateEdge()
    data = e.compressed(b"x" * 3000) + client_frame(b"plain") + e.compressed(b"y" * 300)
    e.feed(*(data[i : i + 1] for i in range(len(data))))
    assert e.texts == ["x" * 3000, "plain", "y" * 300]


@pytest.mark.parametrize(
    "bad, code",
    [
        (b"compressed-ping", 1002),
        (b"compressed-continuation", 1002),
        (b"rsv2", 1002),
        (b"not-deflate", 1007),
        (b"invalid-utf8", 1007),
    ],
)
def test_bad_compressed_client_frames_close_the_connection_like_autobahn(bad: bytes, code: int) -> None:
    e = DeflateEdge()
    frames = {
        b"compressed-ping": client_frame(b"", opcode=9, rsv=4),
        b"compressed-continuation": client_frame(b"ab", fin=False) + client_frame(e.deflate(b"c"), opcode=0, rsv=4),
        b"rsv2": client_frame(e.deflate(b"x"), rsv=6),
        b"not-deflate": client_frame(b"\xff\xff\xff\xff", rsv=4),
        b"invalid-utf8": e.compressed(b"\xff\xfe"),
    }
    e.feed(e.compressed(b"ok") + frames[bad] + client_frame(b"never"))
    assert e.texts == ["ok"]
    assert e.close_code() == code


@pytest.mark.parametrize("fragments", [1, 4])
def test_a_compressed_message_inflating_past_the_limit_closes_1009_before_it_is_inflated(fragments: int) -> None:
    limit = 64 * 1024
    e = DeflateEdge(max_message_bytes=limit)
    bomb = e.deflate(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces: about 64 KiB on the wire
    assert len(bomb) < limit
    cut = len(bomb) // fragments + 1
    parts = [bomb[i : i + cut] for i in range(0, len(bomb), cut)]
    wire = b"".join(
        client_frame(part, opcode=0 if i else 1, fin=i == len(parts) - 1, rsv=0 if i else 4)
        for i, part in enumerate(parts)
    )
    tracemalloc.start()
    try:
        e.feed(e.compressed(b"a" * limit) + wire + client_frame(b"never"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.texts == ["a" * limit]  # at the limit, inflated: still fine
    assert e.close_code() == 1009
    assert e.transport.disconnecting  # the 1009, then the TCP connection closed: nothing more is read
    assert e.proto.edge is not None and e.proto.edge.closed
    assert peak < 8 * limit  # never inflated much past the limit (64 MiB if it had been)


def test_the_edge_writes_compressed_frames_with_rsv1_once_deflate_was_negotiated() -> None:
    e = DeflateEdge()
    texts = [json.dumps({"type": "response.output_text.delta", "sequence_number": i, "delta": "é" * i}) for i in range(50)]
    sizes = [e.proto.send_text(t) for t in texts]
    assert sizes == [len(t.encode()) for t in texts]  # what the edge counts: the message's size
    frames = raw_frames(e.transport.value())
    assert {first for first, _ in frames} == {0xC1}  # final, RSV1, text
    inflate = Inflater()
    assert [inflate(payload).decode() for _, payload in frames] == texts
    assert sum(len(p) for _, p in frames) < sum(sizes) / 3  # context takeover between events


def test_the_edge_writes_plain_frames_to_a_client_that_did_not_offer_deflate() -> None:
    e = Edge()
    e.proto.send_text('{"type":"response.created"}')
    assert raw_frames(e.transport.value()) == [(0x81, b'{"type":"response.created"}')]


def test_frames_the_edge_writes_and_those_autobahn_writes_share_one_stream_in_order() -> None:
    proto, transport, _ = open_deflate_edge()
    inflate = Inflater()
    with write_batch:
        proto.send_text("one")
        proto.sendMessage(b"two", isBinary=True)  # Autobahn's compressor: the same one
        proto.send_text("three")
    frames = raw_frames(transport.value())
    assert [first for first, _ in frames] == [0xC1, 0xC2, 0xC1]
    assert [inflate(payload) for _, payload in frames] == [b"one", b"two", b"three"]


def test_upstream_frames_compressed_or_plain_arrive_in_order_and_inflated() -> None:
    h = Upstream(deflate_window_bits=12, extension=b"permessage-deflate; server_max_window_bits=12")
    assert h.offered == b"permessage-deflate; client_no_context_takeover; client_max_window_bits; server_max_window_bits=12"
    deflate = Deflater(12)
    events = [f'{{"type":"response.output_text.delta","n":{i},"delta":"{"x" * (i * 7)}"}}' for i in range(40)]
    wire = b"".join(frame(deflate(ev.encode()), rsv=4) if i % 2 else frame(ev.encode()) for i, ev in enumerate(events))
    h.feed(*split(wire, [17, 230, 231, 999]))
    assert h.texts() == events
    assert [size for _, size in h.consumer.messages] == [len(ev.encode()) for ev in events]


def test_the_upstream_socket_compresses_what_it_sends_once_deflate_was_negotiated() -> None:
    h = Upstream(deflate_window_bits=12, extension=b"permessage-deflate; server_max_window_bits=12")
    frames = [json.dumps({"type": "response.create", "instructions": "You are Codex. " * 700, "n": n}) for n in range(3)]
    for text in frames:
        h.conn.send(text)
    sent = raw_frames(h.transport.value())
    assert [first for first, _ in sent] == [0xC1] * 3
    inflate = Inflater()
    assert [inflate(payload).decode() for _, payload in sent] == frames
    assert sum(len(p) for _, p in sent) < sum(len(f) for f in frames) / 20


def test_an_upstream_that_declines_deflate_gets_plain_frames() -> None:
    h = Upstream(deflate_window_bits=12)
    h.conn.send("plain")
    assert raw_frames(h.transport.value()) == [(0x81, b"plain")]
    h.feed(frame(b"x", rsv=4))  # compressed, though not negotiated: a protocol error
    assert h.texts() == [] and h.transport.disconnecting


def test_a_compressed_upstream_message_inflating_past_the_limit_drops_the_socket() -> None:
    h = Upstream(max_message_bytes=1000, deflate_window_bits=12, extension=b"permessage-deflate; server_max_window_bits=12")
    deflate = Deflater(12)
    h.feed(frame(deflate(b"a" * 1000), rsv=4) + frame(deflate(b"b" * 10_000_000), rsv=4) + frame(b"after"))
    assert h.texts() == ["a" * 1000]
    h.lose()
    [(code, _, failure, _)] = h.consumer.closed
    assert code == 1006 and "exceeds payload limit of 1000 octets" in failure


# The differential test again, with permessage-deflate negotiated: random frames, compressed
# (from one zlib stream, in order) or plain, good or bad, in any split, to the production edge and
# to Autobahn alone. Outcomes must match, the edge's own compressed replies ("send") included.


@st.composite
def _deflate_frames(draw: Any) -> bytes:
    deflate = Deflater(12)
    out = b""
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        payload = draw(_payload())
        kind = draw(st.sampled_from(["compressed"] * 5 + ["plain"] * 3 + ["fragmented", "control", "rsv2", "garbage"]))
        mask = os.urandom(4)
        if kind == "compressed":
            out += frame(deflate(payload), rsv=4, mask=mask)
        elif kind == "plain":
            out += frame(payload, mask=mask)
        elif kind == "fragmented":
            data = deflate(payload)
            half = len(data) // 2
            out += frame(data[:half], rsv=4, fin=False, mask=mask) + frame(data[half:], opcode=0, mask=mask)
        elif kind == "control":
            out += frame(payload[:10], opcode=draw(st.sampled_from([9, 10])), rsv=draw(st.sampled_from([0, 4])), mask=mask)
        elif kind == "rsv2":
            out += frame(payload, rsv=2, mask=mask)
        else:
            out += frame(b"\xff" + payload[:20], rsv=4, mask=mask)  # not a deflate stream
    return out


def _deflate_edge_outcome(cls: type[_RecordingEdge], limit: int, chunks: list[bytes]) -> tuple[Any, ...]:
    proto, transport, _ = open_deflate_edge(LimitsConfig(max_message_bytes=limit), cls)
    assert isinstance(proto, _RecordingEdge)
    for chunk in chunks:
        proto.dataReceived(chunk)
    left = proto.data if proto.state != proto.STATE_CLOSED else None
    return proto.messages, transport.value(), proto.state, transport.disconnecting, left


@settings(max_examples=200, deadline=None)
@given(
    data=_deflate_frames(),
    limit=st.sampled_from([0, 100, 130, 300]),
    cuts=st.lists(st.integers(min_value=0), max_size=4),
)
def test_with_deflate_the_edge_fast_path_behaves_exactly_like_autobahn(data: bytes, limit: int, cuts: list[int]) -> None:
    chunks = split(data, cuts)
    assert _deflate_edge_outcome(_RecordingEdge, limit, chunks) == _deflate_edge_outcome(_AutobahnEdge, limit, chunks)
