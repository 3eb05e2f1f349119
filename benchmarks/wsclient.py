"""A minimal, cheap WebSocket client for load generation (RFC 6455, text frames).

Autobahn's client costs several times more CPU per message than a gateway's forwarding work
would be worth measuring against, and on a 2-core machine the load client shares the CPU with
the gateway and the upstream. This client does only what the benchmark needs: the upgrade
handshake, masked text frames out, unmasked frames in (continuations reassembled), ping -> pong,
and the close handshake; with ``deflate=True`` it offers permessage-deflate (RFC 7692) as the
Python SDK and Codex do (``permessage-deflate; client_max_window_bits``) and, when the server
accepts, compresses what it sends and inflates what it gets (``benchmarks/deflate.py``). It
counts the bytes it reads and writes after the upgrade (``wire_in``, ``wire_out``). Every wait
has a deadline; nothing here retries.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
LOOPBACK = ("127.0.0.1", "localhost")
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_TAIL = b"\x00\x00\xff\xff"


class HandshakeError(Exception):
    """The server did not answer the upgrade with 101 and the right accept key."""


def check_loopback(url: str) -> tuple[str, int, str]:
    """(host, port, path?query) of a ws:// URL on the loopback interface; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported (got {url!r})")
    host = parts.hostname or ""
    if host not in LOOPBACK:
        raise ValueError(f"benchmarks only run against 127.0.0.1 (got host {host!r})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return ("127.0.0.1" if host == "localhost" else host), parts.port or 80, path


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def encode_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """One final, masked client frame (``rsv1``: its payload is compressed)."""
    n = len(payload)
    head = bytes([0x80 | (0x40 if rsv1 else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = random.getrandbits(32).to_bytes(4, "little")
    return head + key + _mask(payload, key)


class WSClientProtocol(Protocol):
    """One client connection. Set ``on_message(payload: bytes, now: float)`` to receive text
    messages (``now`` is ``time.perf_counter()`` when the bytes were read)."""

    def __init__(
        self, host: str, port: int, path: str, headers: dict[str, str], *, deflate: bool = False
    ) -> None:
        self.host, self.port, self.path, self.headers = host, port, path, headers
        self.offer_deflate = deflate
        self.deflate: Deflate | None = None  # set once the server accepted permessage-deflate
        self.wire_in = 0  # bytes read after the upgrade
        self.wire_out = 0  # bytes written after the upgrade
        self._compressed = False  # the message being received is compressed
        self.opened: Deferred[WSClientProtocol] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.on_message: Callable[[bytes, float], None] = lambda payload, now: None
        self.on_close: Callable[[], None] = lambda: None
        self.is_open = False
        self.is_closed = False
        self._key = base64.b64encode(os.urandom(16))
        self._handshake = b""
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._close_sent = False

    # -- handshake --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in self.headers.items()),
            *([f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}"] if self.offer_deflate else []),
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.is_open:
            self._handshake += data
            end = self._handshake.find(b"\r\n\r\n")
            if end < 0:
                if len(self._handshake) > 65536:
                    self._fail_handshake("handshake response too large")
                return
            head, rest = self._handshake[:end], self._handshake[end + 4 :]
            self._handshake = b""
            status = head.split(b"\r\n", 1)[0]
            expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
            if b" 101 " not in status + b" " or expected not in head:
                self._fail_handshake(status.decode("latin-1", "replace"))
                return
            if self.offer_deflate:
                self.deflate = Deflate.answered(head)
            self.is_open = True
            self.opened.callback(self)
            data = rest
            if not data:
                return
        self.wire_in += len(data)
        buf = self._buf
        buf += data
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            offset = pos + 2
            if length == 126:
                if size - offset < 2:
                    break
                length = (buf[offset] << 8) | buf[offset + 1]
                offset += 2
            elif length == 127:
                if size - offset < 8:
                    break
                (length,) = struct.unpack_from("!Q", buf, offset)
                offset += 8
            key = None
            if b1 & 0x80:  # servers must not mask, but be lenient
                if size - offset < 4:
                    break
                key = bytes(buf[offset : offset + 4])
                offset += 4
            if size - offset < length:
                break
            payload = bytes(buf[offset : offset + length])
            if key is not None:
                payload = _mask(payload, key)
            pos = offset + length
            if b0 & 0x40 and self.deflate is not None:
                self._compressed = True  # RSV1: the message (its first frame) is compressed
            self._frame(b0 & 0x80, b0 & 0x0F, payload, now)
            if self.is_closed:
                return
        if pos:
            del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes, now: float) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if opcode != OP_CONT:
                self._fragments = []
            if not fin:
                self._fragments.append(payload)
                return
            if self._fragments:
                payload = b"".join(self._fragments) + payload
                self._fragments = []
            if self._compressed:
                self._compressed = False
                payload = self.deflate.inflate(payload)  # type: ignore[union-attr]
            self.on_message(payload, now)
        elif opcode == OP_PING:
            self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            if not self._close_sent:
                self._close_sent = True
                self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
            self.transport.loseConnection()

    def _fail_handshake(self, why: str) -> None:
        self.transport.abortConnection()
        if not self.opened.called:
            self.opened.errback(HandshakeError(why))

    # -- API --------------------------------------------------------------------------------

    def send_text(self, data: bytes) -> None:
        if self.deflate is None:
            frame = encode_frame(OP_TEXT, data)
        else:
            frame = encode_frame(OP_TEXT, self.deflate.compress(data), rsv1=True)
        self.wire_out += len(frame)
        self.transport.write(frame)

    def close(self, code: int = 1000) -> Deferred[None]:
        """Send a close frame; the server answers and drops the TCP connection."""
        if self.is_open and not self._close_sent and not self.is_closed:
            self._close_sent = True
            self.transport.write(encode_frame(OP_CLOSE, struct.pack("!H", code)))
        return self.closed

    def abort(self) -> None:
        if not self.is_closed and self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.is_closed = True
        if not self.opened.called:
            self.opened.errback(HandshakeError(f"connection lost during handshake: {reason.value}"))
        self.on_close()
        if not self.closed.called:
            self.closed.callback(None)


class Deflate:
    """The client's half of permessage-deflate as the server's answer set it up: a compressor
    within ``client_max_window_bits`` and an inflater, each one zlib stream across messages
    unless the answer asks for no context takeover."""

    def __init__(self, params: dict[str, str | None]) -> None:
        self.client_bits = int(params.get("client_max_window_bits") or 15)
        self.server_bits = int(params.get("server_max_window_bits") or 15)
        self.client_reset = "client_no_context_takeover" in params
        self.server_reset = "server_no_context_takeover" in params
        self._compressor = self._new_compressor()
        self._inflater = zlib.decompressobj(-self.server_bits)

    @classmethod
    def answered(cls, head: bytes) -> Deflate | None:
        """From the server's handshake answer, if it accepted permessage-deflate."""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() != b"sec-websocket-extensions":
                continue
            parts = [p.strip() for p in value.decode("latin-1").split(";")]
            if parts[0] == "permessage-deflate":
                params = {}
                for part in parts[1:]:
                    key, _, val = part.partition("=")
                    params[key.strip()] = val.strip().strip('"') or None
                return cls(params)
        return None

    def _new_compressor(self) -> Any:
        return zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.client_bits)

    def compress(self, payload: bytes) -> bytes:
        if self.client_reset:
            self._compressor = self._new_compressor()
        return (self._compressor.compress(payload) + self._compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]

    def inflate(self, payload: bytes) -> bytes:
        if self.server_reset:
            self._inflater = zlib.decompressobj(-self.server_bits)
        return self._inflater.decompress(payload + _TAIL)


def connect(
    reactor: object,
    url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    *,
    deflate: bool = False,
) -> Deferred[WSClientProtocol]:
    """Open a connection; fires once the upgrade completed (fails on refusal or timeout).
    ``deflate``: offer permessage-deflate."""
    host, port, path = check_loopback(url)
    proto = WSClientProtocol(host, port, path, headers or {}, deflate=deflate)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(Factory.forProtocol(lambda: proto))

    def failed(failure: Failure) -> None:
        if not proto.opened.called:
            proto.opened.errback(failure)

    d.addErrback(failed)
    timer = reactor.callLater(timeout, lambda: proto.opened.called or proto.abort())  # type: ignore[attr-defined]

    def done(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return proto.opened.addBoth(done)
