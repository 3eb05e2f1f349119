"""The HTTP server side of the wire: the doors applied before a body is read, a deadline for
each request head, and a cap on open connections.

Twisted reads (and spools to disk) a whole request body before any resource runs, and restarts
its idle timer on every byte. :class:`GuardedChannel` instead asks :class:`cch.doors.Doors` once
the headers are in, answers a refused request at once and closes, counts a chunked body as it
arrives, and gives a request head ``limits.handshake_timeout`` in all. :class:`GuardedSite`
answers ``503`` beyond ``server.max_connections`` (:class:`ConnectionSlots`, WebSocket
connections included).

The request line comes from ``HTTPChannel``'s own state (:func:`cch.adapters.request_line`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from cch.adapters import request_line
from cch.doors import DoorAnswer, Doors, refusal
from cch.logs import mask_query

log = Logger()

# After a refusal, how long the rest of a request may still arrive (and be thrown away)
# before the connection is cut: closing with unread data makes TCP reset the connection,
# and a client still sending would lose the answer.
LINGER_SECONDS = 2.0

_REASONS = {
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}


def raw_response(answer: DoorAnswer) -> bytes:
    """The whole HTTP/1.1 response for ``answer``, ending the connection."""
    lines = [b"HTTP/1.1 %d %s" % (answer.status, _REASONS.get(answer.status, b"Error"))]
    if answer.body:
        lines.append(b"content-type: application/json")
    lines.append(b"content-length: %d" % len(answer.body))
    lines.append(b"connection: close")
    lines.extend(name + b": " + value for name, value in answer.headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + answer.body


class _GuardedRequest(Request):
    """Counts a body as it arrives; past its limit the channel refuses the request."""

    body_limit = 0
    received = 0

    def handleContentChunk(self, data: bytes) -> None:
        channel: GuardedChannel = self.channel
        if channel.refused:
            return
        self.received += len(data)
        if self.received > self.body_limit:
            channel.refuse(channel.doors.too_large(self.body_limit))
            return
        super().handleContentChunk(data)


class GuardedChannel(HTTPChannel):
    """An ``HTTPChannel`` that lets only what the doors allow reach the resources."""

    doors: Doors
    clock: IReactorTime
    head_timeout: float
    on_refused: Any = None  # called with the reason of every refusal (metrics)

    slots: ConnectionSlots | None = None
    refused = False
    too_many: DoorAnswer  # the 503 beyond server.max_connections
    _first_request = True
    _slot_held = False
    _transport: Any = None
    _head_timer: IDelayedCall | None = None
    _linger_timer: IDelayedCall | None = None
    _between_requests = False  # a kept-alive connection waiting for its next request

    # -- the request head's deadline ------------------------------------------------------

    @property  # type: ignore[override]
    def transport(self) -> Any:
        return self._transport

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and self._transport is not None:
            # A WebSocket upgrade took the connection (autobahn's WebSocketResource): the
            # edge's protocol holds the slot from now on.
            self._release_slot()
        self._transport = value

    def connectionMade(self) -> None:
        if self.slots is not None:
            self.slots.take()
            self._slot_held = True
        super().connectionMade()
        self._start_head_deadline()  # the first request's head counts from the connection

    def _release_slot(self) -> None:
        if self._slot_held:
            self._slot_held = False
            assert self.slots is not None
            self.slots.release()

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # lingering: what still arrives is thrown away
        if self._between_requests:
            self._between_requests = False
            self._start_head_deadline()
        super().dataReceived(data)

    def requestDone(self, request: Request) -> None:
        # The next head's deadline starts at its first byte (pipelined bytes Twisted held back
        # are replayed from inside requestDone).
        self._between_requests = bool(self.persistent) and not self.refused
        super().requestDone(request)

    def _start_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.clock.callLater(self.head_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.refuse(
            refusal(
                408,
                "request_head_timeout",
                f"The request head did not arrive within {self.head_timeout:g}s.",
                "invalid_request_error",
            )
        )

    # -- the doors ------------------------------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        # A head parsed from what Twisted already held (pipelined behind a request answered
        # at once) came through no dataReceived: this request is not waiting any more.
        self._between_requests = False
        request: _GuardedRequest = self.requests[-1]
        headers = request.requestHeaders
        line = request_line(self)
        assert line is not None, "the request line is read before the headers"
        method, uri = line
        over_unix = isinstance(self.transport.getHost(), UNIXAddress)
        answer = self.doors.check(method, uri, headers, self.transport.getPeer(), self.length, over_unix)
        if answer is not None:
            self.refuse(answer)
            return
        first, self._first_request = self._first_request, False
        if self.doors.is_internal(headers):
            self._release_slot()  # the tunneled turn's client connection is counted already
        elif first and self.slots is not None and self.slots.over:
            self.refuse(self.too_many)
            return
        request.body_limit = self.doors.body_limit(method, uri)
        for name, value in self.doors.cors_headers(headers):
            request.responseHeaders.addRawHeader(name, value)
        super().allHeadersReceived()

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:  # pipelined lines after a refusal: thrown away, not answered
            super().lineReceived(line)

    def allContentReceived(self) -> None:
        if not self.refused:
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def refuse(self, answer: DoorAnswer) -> None:
        """Answer from here and close; nothing of this connection reaches a resource."""
        transport = self.transport
        if self.refused or transport is None:
            return
        self.refused = True
        self._cancel_head_deadline()
        method, uri = request_line(self) or (b"", None)  # the request line, when it has arrived
        log.info(
            "http_request_refused",
            status=answer.status,
            reason=answer.reason,
            method=method.decode("latin-1")[:16] or None,
            path=mask_query(uri) if uri else None,
            peer=str(getattr(transport.getPeer(), "host", "unix")),
        )
        if self.on_refused is not None:
            self.on_refused(answer.reason)
        transport.write(raw_response(answer))
        self.setTimeout(None)
        # The channel is its transport's producer; TLS would not close while one is registered.
        transport.unregisterProducer()
        self._linger_close(transport)

    def _linger_close(self, transport: Any) -> None:
        """Send the answer, stop writing, read and drop the rest for a moment, then cut.

        A TLS connection cannot half-close (its close_notify ends both ways), and it may never
        have finished its handshake: it is closed at once, and cut if that does not end it.
        """
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()
        self._linger_timer = self.clock.callLater(LINGER_SECONDS, self._cut)

    def _cut(self) -> None:
        self._linger_timer = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._release_slot()
        self._cancel_head_deadline()
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        super().connectionLost(reason)


class GuardedSite(Site):
    """A ``Site`` whose connections are :class:`GuardedChannel` on the injected clock."""

    protocol = GuardedChannel

    def __init__(
        self,
        resource: Any,
        *,
        doors: Doors,
        clock: IReactorTime,
        head_timeout: float,
        slots: ConnectionSlots | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, requestFactory=_GuardedRequest, **kwargs)
        self.doors = doors
        self.clock = clock
        self.head_timeout = head_timeout
        self.on_refused: Any = None
        self.slots = slots if slots is not None else ConnectionSlots(10_000)
        self._too_many = refusal(
            503,
            "too_many_connections",
            "Too many connections to this gateway; try again shortly.",
            "service_unavailable_error",
            [(b"retry-after", b"1")],
        )
        self._overflow = raw_response(self._too_many)

    def buildProtocol(self, addr: Any) -> Any:
        if self.slots.full:
            log.warn("server_connection_limit", limit=self.slots.limit, peer=str(getattr(addr, "host", "unix")))
            if self.on_refused is not None:
                self.on_refused("too_many_connections")
            return _Overflow(self._overflow, self.clock)
        channel = super().buildProtocol(addr)
        channel.slots = self.slots
        channel.too_many = self._too_many
        channel.doors = self.doors
        channel.clock = self.clock
        channel.head_timeout = self.head_timeout
        channel.on_refused = self.on_refused
        return channel


class _Overflow(Protocol):
    """A connection beyond the cap: one ``503`` and close, cut if the close does not end it
    (a TLS handshake the peer never finishes)."""

    def __init__(self, body: bytes, clock: IReactorTime) -> None:
        self.body = body
        self.clock = clock
        self._cut: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.body)
        self.transport.loseConnection()
        self._cut = self.clock.callLater(LINGER_SECONDS, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        cut, self._cut = self._cut, None
        if cut is not None and cut.active():
            cut.cancel()


class ConnectionSlots:
    """Open client connections against ``server.max_connections``.

    A connection holds a slot from its accept to its end; a WebSocket upgrade hands it to the
    edge, whose protocol holds it from then on (:mod:`cch.edge.protocol`). Up to ``limit`` a
    request is served; beyond it the first request of a connection gets ``503`` — except the
    turns the HTTP tunnel forwards (their client connection is counted already), which is what
    the ``headroom`` of extra accepted connections is for; beyond that, a connection is
    answered ``503`` at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.headroom = min(limit, max(16, limit // 10))
        self.held = 0

    @property
    def over(self) -> bool:
        """More connections than ``limit`` (their requests are refused)."""
        return self.held > self.limit

    @property
    def full(self) -> bool:
        """No connection is accepted any more."""
        return self.held >= self.limit + self.headroom

    def take(self) -> None:
        self.held += 1

    def release(self) -> None:
        self.held -= 1
