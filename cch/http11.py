"""One HTTP/1.1 client connection: a request written at once, its response read in one pass.

The gateway makes one kind of request — a POST with its body in memory, answered by an SSE
stream or a JSON body — once per turn. Twisted's Agent reads a response line by line through a
stack of protocols and hands the body on one chunk at a time: an SSE upstream writes a chunk
per event, so each event went five calls deep before cch saw it. Here the head is split at
once and each read's complete chunks are joined and handed to the body's protocol in one call,
inside a write batch (:mod:`cch.writes`), so one read's events leave for each client in one
write. The response is an ``IResponse`` whose body protocol ends with Twisted's reasons
(``ResponseDone``, ``PotentialDataLoss``, ``ResponseFailed``), so a body is read as before
(:mod:`cch.bodyreader`).

What it reads is what RFC 9112 allows a server to send, and no more: a response head of at most
:data:`MAX_RESPONSE_HEAD_BYTES` (endless headers cut the connection, docs/security.md), one
``Content-Length`` or a chunked body (strict hexadecimal sizes), or a body that ends with the
connection; interim 1xx responses are skipped. Anything else fails the response with
:class:`BadResponse` and closes the connection. A connection is kept for the next request only
when its response said where it ended and did not ask to close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers, InvalidHeaderName
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from cch.writes import write_batch

log = Logger()

MAX_RESPONSE_HEAD_BYTES = 256 * 1024  # real response heads are a few KiB
MAX_CHUNK_LINE_BYTES = 4096  # a chunk's size line with its extensions, or one trailer line

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})

# Connection states.
_IDLE, _HEAD, _BODY, _CLOSED = range(4)
# Chunked body states.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class BadResponse(Exception):
    """The upstream's response is not HTTP/1.1 as RFC 9112 has a server send it."""


def request_head(
    method: bytes, target: bytes, host: bytes, headers: dict[str, str], length: int
) -> bytes:
    """The request line and headers, ``Host`` and ``Content-Length`` set here (a ``host`` in
    ``headers`` wins); the caller's ``content-length``, ``transfer-encoding`` and
    ``connection`` are dropped: the framing and the connection are this client's. Header names
    must be tokens (``InvalidHeaderName`` otherwise); line breaks in a value become spaces, as
    Twisted's ``Headers`` makes them."""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    own_host = None
    for name, value in headers.items():
        lower = name.lower()
        try:
            raw_name = name.encode("iso-8859-1") if isinstance(name, str) else name
        except UnicodeEncodeError:
            raise InvalidHeaderName(name.encode("utf-8")) from None
        if not raw_name or not _TOKEN.issuperset(raw_name):
            raise InvalidHeaderName(raw_name)
        raw = value.encode("utf-8") if isinstance(value, str) else value
        if b"\r" in raw or b"\n" in raw:
            raw = b" ".join(raw.splitlines())
        if lower in _OWN_HEADERS:
            if lower == "host":
                own_host = raw
            continue
        lines += (raw_name, b": ", raw, b"\r\n")
    lines += (b"Host: ", own_host if own_host is not None else host, b"\r\nContent-Length: ")
    lines += (str(length).encode("ascii"), b"\r\n\r\n")
    return b"".join(lines)


@implementer(IResponse)
class Response:
    """A response whose head has arrived; its body is read with :meth:`deliverBody`. What comes
    before that waits here (and the socket is not read meanwhile)."""

    request = None
    previousResponse = None

    def __init__(
        self,
        connection: HTTP11Connection,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: HTTP11Connection | None = connection  # None once the body is over
        self._protocol: Any = None
        self._delivered = False
        self._reader_paused = False
        self._pending: list[bytes] = []
        self._end: Failure | None = None

    def deliverBody(self, protocol: Any) -> None:
        if self._delivered:
            raise RuntimeError("deliverBody called twice")
        self._delivered = True
        self._protocol = protocol
        try:
            protocol.makeConnection(_BodyTransport(self))
            pending, self._pending = self._pending, []
            for data in pending:
                if self._protocol is not protocol:
                    return  # the body was stopped
                protocol.dataReceived(data)
        except BaseException:
            # The reader failed before it had the body: nobody will read the rest of it, and a
            # connection paused until deliverBody would stay paused (and open) for ever.
            self._protocol = None
            if self._connection is not None:
                self._connection.abort()
            raise
        end, self._end = self._end, None
        if end is not None:
            self._protocol = None
            protocol.connectionLost(end)
        elif self._connection is not None and not self._reader_paused:
            self._connection.resume_reading()  # read until deliverBody, unless the reader paused

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def _data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None:
            self._pending.append(data)
        else:
            protocol.dataReceived(data)

    def _ended(self, reason: Failure) -> None:
        self._connection = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
        elif not self._delivered:
            self._end = reason


@implementer(IPushProducer)
class _BodyTransport:
    """What a body's protocol gets as its transport: pausing it stops reading the socket,
    stopping it aborts the connection (the protocol then gets ``connectionLost``); once the body
    is over, neither touches the connection (it may carry the next request by then)."""

    def __init__(self, response: Response) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        self._response._reader_paused = True
        connection = self._response._connection
        if connection is not None:
            connection.pause_reading()

    def resumeProducing(self) -> None:
        self._response._reader_paused = False
        connection = self._response._connection
        if connection is not None:
            connection.resume_reading()

    def stopProducing(self) -> None:
        connection = self._response._connection
        if connection is not None:
            connection.abort()

    abortConnection = stopProducing  # what twisted.web.client.readBody calls


class _LengthChecked:
    """A body producer's consumer: the socket, for exactly the length the request declared. A
    producer that writes more fails the request and cuts the connection: the extra bytes would
    be read as the start of the next request."""

    def __init__(self, connection: HTTP11Connection, length: int) -> None:
        self.connection = connection
        self.left = length

    def write(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            connection = self.connection
            body = connection._body_producer
            if body is not None:
                body.stopProducing()
                connection._body_failed(Failure(ValueError("the body is longer than its length")), body)
            return
        self.connection.transport.write(data)


class HTTP11Connection(Protocol):
    """One request at a time; ``on_idle(connection)`` when it may take the next (its response
    over and kept alive), ``on_lost(connection)`` once it is gone."""

    head_limit = MAX_RESPONSE_HEAD_BYTES

    def __init__(
        self,
        on_idle: Callable[[HTTP11Connection], object] | None = None,
        on_lost: Callable[[HTTP11Connection], object] | None = None,
    ) -> None:
        self.on_idle = on_idle
        self.on_lost = on_lost
        self.state = _IDLE
        self._closing = False  # aborted or closing: never taken again
        self._head = bytearray()
        self._scanned = 0  # bytes of _head already searched for its end
        self._received = False  # any byte of the current response (an interim one's included)
        self._buffer = b""  # an incomplete chunk line
        self._waiting: Deferred[IResponse] | None = None
        self._body_producer: IBodyProducer | None = None
        self._response: Response | None = None
        self._remaining = -1  # Content-Length bytes still to come; -1: chunked or until close
        self._chunked = False
        self._chunk_state = _SIZE
        self._chunk_left = 0
        self._keep_alive = False

    @property
    def reusable(self) -> bool:
        """Idle (its request written, its response read), connected and not closing."""
        return self.state == _IDLE and not self._closing and self._body_producer is None

    # -- the request -------------------------------------------------------------------------------

    def request(self, head: bytes, body: Any) -> Deferred[IResponse]:
        """Write ``head`` (:func:`request_head`) and ``body``; fires with the response once its
        head arrived. ``body`` is bytes, or an ``IBodyProducer`` of known length, registered
        as the socket's streaming producer until it is done."""
        if not self.reusable:
            raise RuntimeError("HTTP11Connection.request on a busy or closed connection")
        self.state = _HEAD
        self._head = bytearray()
        self._scanned = 0
        self._received = False
        waiting = self._waiting = Deferred(self._cancel)
        transport = self.transport
        if isinstance(body, bytes):
            transport.write(head + body)
            return waiting
        try:
            transport.write(head)
            self._body_producer = body
            consumer = _LengthChecked(self, body.length)
            transport.registerProducer(body, True)
            body.startProducing(consumer).addCallbacks(
                self._body_written, self._body_failed, (body, consumer), None, (body,)
            )
        except BaseException:
            self._waiting = self._body_producer = None
            self.abort()
            raise
        return waiting

    def _body_written(self, _: object, body: Any, consumer: _LengthChecked) -> None:
        if self._body_producer is not body:
            return  # the connection already went: the request reported that
        if consumer.left:
            self._body_failed(Failure(ValueError(f"the body was {consumer.left} bytes short")), body)
            return
        self._body_producer = None
        self.transport.unregisterProducer()

    def _body_failed(self, failure: Failure, body: Any) -> None:
        if self._body_producer is not body:
            return  # the connection already went: the request reported that
        self._body_producer = None
        self._fail_waiting(Failure(RequestTransmissionFailed([failure])))
        self.abort()

    def _cancel(self, _: Deferred[IResponse]) -> None:
        self._waiting = None  # the canceller errbacks it with CancelledError
        self.abort()

    def _fail_waiting(self, failure: Failure) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(failure)

    def abort(self) -> None:
        """Cut the connection (a cancelled request, a body stopped by its reader)."""
        if self.state != _CLOSED and not self._closing and self.transport is not None:
            self._closing = True
            self.transport.abortConnection()

    def close(self) -> None:
        """Close the connection, idle or its response read (what is still to send goes first)."""
        if self.state != _CLOSED and not self._closing and self.transport is not None:
            self._closing = True
            self.transport.loseConnection()

    # -- reading -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # cut or closing: what still comes (TLS already decrypted) is nobody's
        with write_batch:
            try:
                if self.state == _BODY:
                    self._body(data)
                elif self.state == _HEAD:
                    self._read_head(data)
                elif data and self.state == _IDLE:
                    raise BadResponse("data when no request was outstanding")
            except BadResponse as bad:
                self._bad(bad)

    def _read_head(self, data: bytes) -> None:
        if data:
            self._received = True
        head = self._head
        head += data
        while True:
            end, skip = _head_end(head, self._scanned)
            if end < 0 or end > self.head_limit:
                if end < 0 and len(head) <= self.head_limit + 3:  # its end may be arriving
                    self._scanned = len(head)
                    return
                log.warn("upstream_response_head_too_large", limit=self.head_limit)
                raise BadResponse("response head too large")
            version, code, phrase, headers = _parse_head(bytes(head[:end]))
            rest = bytes(head[end + skip :])
            if 100 <= code < 200:
                if code == 101:
                    raise BadResponse("101 Switching Protocols answering a POST")
                head = self._head = bytearray(rest)  # interim (100, 103): the response follows
                self._scanned = 0
                continue
            break
        self._head = bytearray()
        length = self._framing(version, code, headers)
        self.state = _BODY
        response = self._response = Response(self, version, code, phrase, headers, length)
        waiting, self._waiting = self._waiting, None
        if length == 0:
            self._finish_body(rest)
        else:
            self.pause_reading()  # until deliverBody
            if rest:
                self._body(rest)
        if waiting is not None:
            waiting.callback(response)

    def _framing(
        self, version: tuple[bytes, int, int], code: int, headers: Headers
    ) -> int | object:
        """Set how the body ends; returns its length (UNKNOWN_LENGTH for chunked or until close)."""
        connection = b",".join(headers.getRawHeaders(b"connection", ())).lower()
        self._keep_alive = version[2] == 1 and b"close" not in _tokens(connection)
        self._chunked = False
        self._remaining = -1
        if code in (204, 304):
            self._remaining = 0
            return 0
        encodings = headers.getRawHeaders(b"transfer-encoding")
        if encodings is not None:
            codings = _tokens(b",".join(encodings).lower())
            if codings and codings[-1] == b"chunked":
                self._chunked = True
                self._chunk_state = _SIZE
                self._chunk_left = 0
                self._buffer = b""
                if headers.hasHeader(b"content-length"):
                    self._keep_alive = False  # RFC 9112 6.3: close after such a message
            else:
                self._keep_alive = False  # the connection's close ends the body
            return UNKNOWN_LENGTH
        lengths = headers.getRawHeaders(b"content-length")
        if lengths is None:
            self._keep_alive = False
            return UNKNOWN_LENGTH
        values = {value.strip(b" \t") for joined in lengths for value in joined.split(b",")}
        if len(values) != 1:
            raise BadResponse("conflicting Content-Length values")
        (value,) = values
        if not value.isdigit() or len(value) > 18:
            raise BadResponse("Content-Length is not a length")
        self._remaining = int(value)
        return self._remaining

    def _body(self, data: bytes) -> None:
        if self._chunked:
            self._chunks(data)
        elif self._remaining < 0:
            self._hand_on(data)  # until the connection closes
        elif len(data) < self._remaining:
            self._remaining -= len(data)
            self._hand_on(data)
        else:
            rest = self._remaining
            self._remaining = 0
            if rest:
                self._hand_on(data[:rest])
            self._finish_body(data[rest:])

    def _chunks(self, data: bytes) -> None:
        """Every complete piece of chunk data in ``data`` (after what was left of the last
        read), handed on as one; what came before bad framing is handed on first."""
        buf = self._buffer + data if self._buffer else data
        self._buffer = b""
        size = len(buf)
        pos = 0
        out: list[bytes] = []
        state = self._chunk_state
        left = self._chunk_left
        finished = False
        bad = None
        while pos < size:
            if state == _DATA:
                take = left if left < size - pos else size - pos
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if not left:
                    state = _DATA_END
            elif state == _DATA_END:
                if size - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    bad = "chunk data not followed by CRLF"
                    break
                pos += 2
                state = _SIZE
            else:
                eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE_BYTES + 2)
                if eol < 0:
                    if size - pos > MAX_CHUNK_LINE_BYTES + 1:  # (its CR may have come alone)
                        bad = "chunk line too long"
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if state == _SIZE:
                    hex_size = line.split(b";", 1)[0].rstrip(b" \t")
                    if not hex_size or len(hex_size) > 15 or not _HEX.issuperset(hex_size):
                        bad = "chunk size is not hexadecimal"
                        break
                    left = int(hex_size, 16)
                    state = _DATA if left else _TRAILER
                elif not line:  # the blank line after the last chunk's trailers
                    finished = True
                    break
        self._chunk_state, self._chunk_left = state, left
        if out:
            self._hand_on(out[0] if len(out) == 1 else b"".join(out))
        if bad is not None:
            raise BadResponse(bad)
        if finished:
            self._finish_body(buf[pos:])
        elif pos < size:
            self._buffer = buf[pos:]

    def _hand_on(self, data: bytes) -> None:
        response = self._response
        if response is not None:
            response._data(data)

    def _finish_body(self, extra: bytes) -> None:
        """The body is complete; ``extra`` is what the server sent after it (nothing may follow
        a response we did not ask for: such a connection is not kept)."""
        response, self._response = self._response, None
        self.state = _IDLE
        if self._body_producer is not None:
            self._keep_alive = False  # answered before its request was sent: never reused
        if self._keep_alive and not extra and not self._closing and self.on_idle is not None:
            self.resume_reading()
            self.on_idle(self)
        else:
            self.close()
        if response is not None:
            response._ended(Failure(ResponseDone("Response body fully received")))

    def pause_reading(self) -> None:
        if self.state != _CLOSED:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.state != _CLOSED and not self._closing:
            self.transport.resumeProducing()

    # -- the end ---------------------------------------------------------------------------------

    def _bad(self, bad: BadResponse) -> None:
        failure = Failure(ResponseFailed([Failure(bad)]))
        if self.state == _HEAD:
            self._fail_waiting(failure)
        response, self._response = self._response, None
        self.abort()
        if response is not None:
            response._ended(failure)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state, self.state = self.state, _CLOSED
        self._closing = True
        producer, self._body_producer = self._body_producer, None
        if producer is not None:
            producer.stopProducing()
        if state == _HEAD:
            kind = ResponseFailed if self._received else ResponseNeverReceived
            self._fail_waiting(Failure(kind([reason])))
        response, self._response = self._response, None
        if response is not None:
            if self._remaining < 0 and not self._chunked:
                response._ended(Failure(PotentialDataLoss()))
            else:
                response._ended(Failure(ResponseFailed([reason])))
        if self.on_lost is not None:
            self.on_lost(self)


def _head_end(head: bytearray, scanned: int) -> tuple[int, int]:
    """Where the head in ``head`` ends (before its last line's LF) and how many bytes end it
    ((-1, 0): not yet); the first ``scanned`` bytes were searched before (a head that drips in
    is searched once)."""
    start = scanned - 2 if scanned > 2 else 0
    crlf = head.find(b"\n\r\n", start)  # a line's end, then a blank line ended by CRLF
    lf = head.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(head))  # or by LF alone
    if lf >= 0:
        return lf, 2
    return (crlf, 3) if crlf >= 0 else (-1, 0)


def _parse_head(head: bytes) -> tuple[tuple[bytes, int, int], int, bytes, Headers]:
    lines = head.split(b"\n")
    status = lines[0].rstrip(b"\r")
    parts = status.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadResponse(f"not an HTTP/1.1 status line: {status[:64]!r}")
    code_text = parts[1]
    if len(code_text) != 3 or not code_text.isdigit():
        raise BadResponse(f"bad status code: {code_text[:16]!r}")
    version = (b"HTTP", 1, 1 if parts[0] == b"HTTP/1.1" else 0)
    raw: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise BadResponse(f"bad header line: {line[:64]!r}")  # folded lines included
        raw.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return version, int(code_text), parts[2] if len(parts) > 2 else b"", Headers(raw)


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip(b" \t") for token in value.split(b",") if token.strip(b" \t")]
