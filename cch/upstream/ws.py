"""One upstream Responses WebSocket (Autobahn client), and how to close it safely.

:class:`UpstreamConnection` owns the socket's life: connecting (with a handshake deadline on
the injected clock), its state, and ``safe_close``: never two closes, abort instead of a close
frame while connecting, nothing left registered afterwards
(docs/reference-behaviour.md#one-request-on-an-upstream-socket). Whoever uses the socket for a
request attaches as its ``consumer`` and receives ``ws_opened``/``ws_message``/``ws_closed``
calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from cch.adapters import (
    ClientProtocol,
    cancel_close_timer,
    handshake_status_line,
    not_clean_reason,
    refused_oversized,
    run_timers_on,
)
from cch.headers import UPGRADE_NOT_FORWARDED
from cch.writes import write_batch
from cch.wsframes import (
    DeflateResponseAccept,
    FrameRelay,
    MessageDeflater,
    deflate_offers,
    masked_text_frame,
    negotiated_deflate,
    relay_text_frames,
)

log = Logger()

CONNECTING = "connecting"
OPEN = "open"
CLOSING = "closing"
CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SocketClosed:
    """How a socket ended, as its consumer is told: the close frame's ``code`` and ``reason``
    (None without one), ``failure`` text when it did not end cleanly, the HTTP ``status`` when
    the upgrade was refused, and ``too_large`` (the limit) when the upstream sent a frame or
    message over ``max_message_bytes`` — Autobahn refused it from its header, before buffering
    the payload, and dropped the socket."""

    code: int | None = None
    reason: str | None = None
    failure: str | None = None
    status: int | None = None
    too_large: int | None = None


def ws_url(http_url: str) -> str:
    """``https:`` → ``wss:``, anything else → ``ws:``; host, port, path and query unchanged."""
    parts = urlsplit(http_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


def upgrade_headers(headers: dict[str, str]) -> dict[str, str]:
    """The outbound HTTP headers minus what must not go into a WebSocket upgrade."""
    return {k: v for k, v in headers.items() if k.lower() not in UPGRADE_NOT_FORWARDED}


class SocketConsumer(Protocol):
    relay: FrameRelay | None
    """Who takes the frames nobody needs to read whole, while there is one
    (:func:`cch.wsframes.relay_text_frames`)."""

    read_types: frozenset[str]
    """The event types the consumer reads: never relayed."""

    kept_types: frozenset[str]
    """Relayed event types whose copy the relay keeps (:meth:`FrameRelay.keep`)."""

    def ws_opened(self) -> None: ...

    def ws_message(self, text: str, size: int) -> None: ...

    def ws_closed(self, closed: SocketClosed) -> None: ...


SERVER_DROP_TIMEOUT = 1.0  # Autobahn's default wait for the server to drop TCP after a close


class _ClientProtocol(ClientProtocol):
    owner: UpstreamConnection
    _was_open = False

    def onOpen(self) -> None:
        self.owner._opened(self)

    def dataReceived(self, data: bytes) -> None:
        # Client frames made from this read leave in one write per client socket.
        with write_batch:
            super().dataReceived(data)

    def consumeData(self) -> None:
        # The per-event hot path: upstreams send each event as one small final text frame,
        # many to a read; those are cut straight out of the buffer, and those nobody reads go
        # to the client as they are (cch.wsframes). Autobahn's consumeData and the state read
        # here are listed in cch/adapters.py.
        if self.state == self.STATE_OPEN and self.current_frame is None and not self.inside_message:
            owner = self.owner
            consumer = owner.consumer
            if consumer is not None and relay_text_frames(
                self, owner._message, owner.relay, consumer.read_types, consumer.kept_types
            ):
                return  # the rest is the start of a frame this path takes when the next read completes it
        super().consumeData()

    def message_parsed(self, payload: bytes) -> None:
        # Messages Autobahn parsed (cch.adapters.ClientProtocol): handed over directly.
        self.owner._message(payload)

    _drop_deadline: IDelayedCall | None = None

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        # The upstream is closing: never hand this socket to another request meanwhile.
        if self.owner.state == OPEN:
            self.owner.state = CLOSING
        answered = self.state == self.STATE_CLOSING  # the upstream's reply to our close frame
        result = super().onCloseFrame(code, reasonRaw)
        if answered and self.transport is not None and self._drop_deadline is None:
            # The server drops TCP now; if it does not, we do. Autobahn's own timer for this
            # (serverConnectionDropTimeout) runs on txaio's global reactor, so it is off and
            # this one runs on the injected clock.
            self._drop_deadline = self.owner.clock.callLater(SERVER_DROP_TIMEOUT, self.onServerConnectionDropTimeout)
        return result

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        deadline, self._drop_deadline = self._drop_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        status = None
        line = handshake_status_line(self)
        if self.state != self.STATE_OPEN and line and not self._was_open:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
                status = int(parts[1])
                self.owner.status_text = " ".join(parts[1:])
        cancel_close_timer(self)
        not_clean = not_clean_reason(self)
        # Autobahn's record that it refused an oversized frame/message (tests/test_upstream_event_cap.py).
        too_large = self.owner.max_message_bytes if refused_oversized(self) else None
        if too_large is not None:
            not_clean = not_clean or "message too large"
        self.owner._closed(code, reason, wasClean, status, not_clean, too_large)


class _ClientFactory(WebSocketClientFactory):
    """The Autobahn factory of one :class:`UpstreamConnection`: it builds that connection's
    socket, whose timers run on the connection's clock."""

    def __init__(self, owner: UpstreamConnection, headers: dict[str, str], useragent: str | None) -> None:
        super().__init__(owner.url, headers=headers, useragent=useragent, reactor=owner.reactor)
        run_timers_on(self, owner.clock)
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        proto = _ClientProtocol()
        proto.factory = self
        proto.owner = owner = self.owner
        owner._proto = proto
        return proto


_ids = itertools.count(1)


class UpstreamConnection:
    """A single upstream socket and its lifecycle."""

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        url: str,
        headers: dict[str, str],
        *,
        handshake_timeout: float,
        max_message_bytes: int = 0,
        trust: Any = None,
        deflate_window_bits: int | None = None,
    ) -> None:
        """``deflate_window_bits``: offer permessage-deflate (RFC 7692) with windows of at most
        2**bits bytes on our side (None: not offered); ``max_message_bytes`` then caps the
        inflated size of a message."""
        self.id = next(_ids)
        self.reactor = reactor
        self.clock = clock
        self.url = url
        self.headers = headers
        self.handshake_timeout = handshake_timeout
        self.max_message_bytes = max_message_bytes
        self.trust = trust
        self.deflate_window_bits = deflate_window_bits
        self.state = CONNECTING
        self.consumer: SocketConsumer | None = None
        self.on_gone: list[Callable[[UpstreamConnection], None]] = []
        self.close_code_sent: int | None = None
        self.status: int | None = None
        self.status_text = ""  # "426 Upgrade Required" when the upgrade was refused
        self._proto: _ClientProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._handshake_timer: IDelayedCall | None = None
        self._failure_text: str | None = None
        self._deflate: MessageDeflater | None = None  # what send() compresses with, if negotiated

    # -- opening --------------------------------------------------------------------------

    def connect(self) -> None:
        factory = self.client_factory()
        parts = urlsplit(self.url)
        host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        endpoint: Any = HostnameEndpoint(self.reactor, host, port)
        if secure:
            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=self.trust), endpoint)
        self._handshake_timer = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)
        d = self._connecting = endpoint.connect(factory)
        d.addCallbacks(self._tcp_connected, self._connect_failed)

    def client_factory(self) -> WebSocketClientFactory:
        """The Autobahn factory whose one protocol is this connection's socket."""
        headers = dict(self.headers)
        useragent = headers.pop("user-agent", None)
        factory = _ClientFactory(self, headers, useragent)
        factory.setProtocolOptions(
            maxMessagePayloadSize=self.max_message_bytes,
            maxFramePayloadSize=self.max_message_bytes,
            openHandshakeTimeout=0,  # our own deadline runs on the injected clock
            # Payloads are decoded once, with replacement, where they are used.
            utf8validateIncoming=False,
            closeHandshakeTimeout=5,
            serverConnectionDropTimeout=0,  # its timer is txaio's global one: see _ClientProtocol
            autoFragmentSize=0,
        )
        bits = self.deflate_window_bits
        if bits is not None:
            factory.setProtocolOptions(
                perMessageCompressionOffers=deflate_offers(bits),
                perMessageCompressionAccept=DeflateResponseAccept(bits, self.max_message_bytes),
            )
        return factory

    def _tcp_connected(self, proto: Any) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state == CLOSED:
            return
        self._finish_closed(SocketClosed(failure=_text(failure)))

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state == CONNECTING:
            self._failure_text = f"upstream WebSocket handshake timed out after {self.handshake_timeout:g}s"
            self._abort()

    def _opened(self, proto: _ClientProtocol) -> None:
        proto._was_open = True
        self._deflate = negotiated_deflate(proto)
        self._cancel_handshake_timer()
        if self.state != CONNECTING:
            return
        self.state = OPEN
        if self.consumer is not None:
            self.consumer.ws_opened()

    # -- traffic --------------------------------------------------------------------------

    def send(self, text: str | bytes) -> None:
        """One text message (``bytes`` are taken as its UTF-8 encoding)."""
        proto = self._proto
        if self.state != OPEN or proto is None or proto.state != proto.STATE_OPEN:
            raise ConnectionError("websocket is not open")
        # One final masked text frame, written directly (cch.wsframes): Autobahn's
        # sendMessage adds only bookkeeping and eagerly formatted debug logging. Compressed
        # (RSV1) with the socket's Autobahn compressor when permessage-deflate was negotiated.
        payload = text if isinstance(text, bytes) else text.encode("utf-8")
        deflate = self._deflate
        if deflate is None:
            proto.transport.write(masked_text_frame(payload))
        else:
            proto.transport.write(masked_text_frame(deflate(payload), compressed=True))

    def relay(self) -> FrameRelay | None:
        """The consumer's relay while the socket is open and someone listens."""
        consumer = self.consumer
        return consumer.relay if consumer is not None and self.state == OPEN else None

    def _message(self, payload: bytes) -> None:
        if self.consumer is not None and self.state == OPEN:
            self.consumer.ws_message(payload.decode("utf-8", errors="replace"), len(payload))
        # Between requests nobody listens: unsolicited upstream messages are dropped.

    def pause(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.pauseProducing()

    def resume(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.resumeProducing()

    # -- closing --------------------------------------------------------------------------

    @property
    def compressed(self) -> bool:
        """permessage-deflate was negotiated: what this socket sends is compressed."""
        return self._deflate is not None

    @property
    def usable(self) -> bool:
        return self.state in (CONNECTING, OPEN)

    def safe_close(self, code: int = 1000) -> None:
        """Close once: abort while connecting (no close frame), close frame when open."""
        if self.state in (CLOSED, CLOSING):
            return
        if self.state == CONNECTING:
            self._abort()
            return
        self.state = CLOSING
        self.close_code_sent = code
        # If the client side paused our reads, the peer's close reply would never be read.
        self.resume()
        proto = self._proto
        if proto is None:
            self._finish_closed(SocketClosed())
            return
        try:
            proto.sendCloseFrame(code=code, isReply=False)
        except Exception:
            if proto.transport is not None:
                proto.transport.abortConnection()

    def abort(self, failure: str) -> None:
        """End the socket now, without a close frame, for the reason ``failure``."""
        if self.state == CLOSED:
            return
        self._failure_text = failure
        self._abort()

    def _abort(self) -> None:
        self.state = CLOSING
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        elif self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abortConnection()
        else:
            self._finish_closed(SocketClosed(failure=self._failure_text))

    def _closed(
        self,
        code: int | None,
        reason: str | None,
        clean: bool,
        status: int | None,
        not_clean: str | None,
        too_large: int | None,
    ) -> None:
        failure = None if clean else (self._failure_text or not_clean or "connection lost")
        self._finish_closed(SocketClosed(code, reason, failure, status, too_large))

    def _finish_closed(self, closed: SocketClosed) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.status = closed.status
        self._cancel_handshake_timer()
        if self._failure_text is not None and closed.failure != self._failure_text:
            closed = replace(closed, failure=self._failure_text)
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            consumer.ws_closed(closed)
        hooks, self.on_gone = self.on_gone, []
        for hook in hooks:
            hook(self)
        self._proto = None

    def _cancel_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _text(failure: Failure) -> str:
    value = failure.value
    return str(value) or type(value).__name__
