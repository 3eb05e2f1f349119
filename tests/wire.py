"""WebSocket bytes for tests: frame builders and readers, a StringTransport that behaves like
TCP where Autobahn needs it and a handshaken edge (for tests that feed protocols directly), and
a client that keeps every byte a server sent it (for tests over real sockets)."""

from __future__ import annotations

import itertools
import os
import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cch.config import LimitsConfig
from cch.edge.factory import EdgeFactory
from cch.edge.protocol import EdgeProtocol
from cch.testing.client import CloseInfo

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(
    payload: bytes,
    *,
    opcode: int = 1,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length_bytes: int | None = None,
) -> bytes:
    """One WebSocket frame as a peer would write it (or, with the options, should not)."""
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


def client_frame(payload: bytes, **options: object) -> bytes:
    """A frame as a client writes it: masked with a random key."""
    return frame(payload, mask=os.urandom(4), **options)  # type: ignore[arg-type]


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each frame in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        opcode, masked, length = data[pos] & 0x0F, data[pos + 1] & 0x80, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[pos : pos + 2])
            pos += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[pos : pos + 8])
            pos += 8
        key = data[pos : pos + 4] if masked else b"\0\0\0\0"
        pos += 4 if masked else 0
        out.append((opcode, bytes(b ^ key[i % 4] for i, b in enumerate(data[pos : pos + length]))))
        pos += length
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class Transport(StringTransport):
    """A StringTransport that counts writes and, like TCP, lets a producer be unregistered
    when none is registered."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def unregisterProducer(self) -> None:
        self.producer = None


def open_edge(
    limits: LimitsConfig | None = None, protocol: type[EdgeProtocol] | None = None
) -> tuple[EdgeProtocol, Transport]:
    """A production edge protocol (or ``protocol``) on a Transport, upgraded, with the
    handshake bytes cleared."""
    proto, transport, _ = upgraded_edge(limits, protocol)
    return proto, transport


def upgraded_edge(
    limits: LimitsConfig | None = None, protocol: type[EdgeProtocol] | None = None, extra_headers: bytes = b""
) -> tuple[EdgeProtocol, Transport, bytes]:
    """:func:`open_edge`, the upgrade request carrying ``extra_headers`` (CRLF-terminated
    lines); also the head of the handshake answer, which the transport no longer holds."""
    clock = Clock()
    factory = EdgeFactory(tunnel=None, limits=limits or LimitsConfig(), clock=clock, reactor=clock)  # type: ignore[arg-type]
    if protocol is not None:
        factory.protocol = protocol
    proto = factory.buildProtocol(None)
    transport = Transport()
    proto.makeConnection(transport)
    proto.dataReceived(
        b"GET /v1/responses HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + extra_headers + b"\r\n"
    )
    assert proto.state == proto.STATE_OPEN
    head = transport.value().split(b"\r\n\r\n")[0]
    transport.clear()
    transport.writes = 0
    return proto, transport, head


class RawRecordingClient(WebSocketClientProtocol):
    """An Autobahn client that keeps every byte the server sent after the upgrade (``raw``), so a
    test can read the frames themselves, and queues each message's payload as bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = bytearray()
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.opened: Deferred[Any] = Deferred()
        self.closed: Deferred[CloseInfo] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.raw += data
        super().dataReceived(data)

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(bytes(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason))
        self.closed.callback(CloseInfo(code, reason, wasClean))
