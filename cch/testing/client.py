"""A small Responses WebSocket client for tests, demos and benchmarks.

Every wait is on an event (a message, the close), never on a duration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

from cch.wsframes import DeflateResponseAccept

TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})


def sdk_deflate_offers() -> list[PerMessageDeflateOffer]:
    """``permessage-deflate; client_max_window_bits``: what the OpenAI Python SDK (``websockets``'
    default) and Codex offer, so a test sees what they get. Not cch.wsframes.deflate_offers (the
    gateway's own upstream offer), which also asks for ``server_max_window_bits`` and allows
    ``client_no_context_takeover``."""
    return [PerMessageDeflateOffer(accept_no_context_takeover=False, accept_max_window_bits=True)]


@dataclass
class CloseInfo:
    code: int | None
    reason: str | None
    was_clean: bool


class _ClientProtocol(WebSocketClientProtocol):
    client: ResponsesWSClient

    def onOpen(self) -> None:
        self.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client._message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client._closed(CloseInfo(code, reason, wasClean))


class _ClientFactory(WebSocketClientFactory):
    """Builds the protocol of one :class:`ResponsesWSClient` connection."""

    def __init__(self, client: ResponsesWSClient, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        proto = _ClientProtocol()
        proto.factory = self
        proto.client = self.client
        return proto


class ResponsesWSClient:
    """One client connection to ``ws://host:port/v1/responses``."""

    def __init__(self) -> None:
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.received: list[Any] = []
        self.close_info: CloseInfo | None = None
        self.protocol: _ClientProtocol | None = None
        # The negotiated permessage-deflate (its window bits, context takeover), None without.
        self.deflate: PerMessageDeflate | None = None
        self._open: Deferred[ResponsesWSClient] = Deferred()
        self._close_waiters: list[Deferred[CloseInfo]] = []

    @classmethod
    def connect(
        cls,
        reactor: Any,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        max_message_bytes: int = 0,
        deflate: bool = False,
    ) -> Deferred[ResponsesWSClient]:
        """Connect and fire once the WebSocket is open (fails if the upgrade is refused).

        ``deflate`` offers permessage-deflate as the SDK and Codex do (:func:`sdk_deflate_offers`);
        if the server accepts, Autobahn compresses what we send and inflates what we get (at most
        ``max_message_bytes`` per message, 0: no limit) and :attr:`deflate` says with what."""
        client = cls()
        factory = _ClientFactory(client, url, headers=headers or {}, reactor=reactor)
        factory.setProtocolOptions(
            maxMessagePayloadSize=max_message_bytes,
            maxFramePayloadSize=max_message_bytes,
            autoFragmentSize=0,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=5,
        )
        if deflate:
            # Our compressor may use zlib's largest window (15 bits), as the SDK's does.
            factory.setProtocolOptions(
                perMessageCompressionOffers=sdk_deflate_offers(),
                perMessageCompressionAccept=DeflateResponseAccept(15, max_message_bytes),
            )
        parts = urlsplit(url)
        endpoint = TCP4ClientEndpoint(reactor, parts.hostname or "127.0.0.1", parts.port or 80)
        d = endpoint.connect(factory)
        d.addErrback(client._connect_failed)
        return client._open

    # protocol callbacks
    def _opened(self, proto: _ClientProtocol) -> None:
        self.protocol = proto
        for extension in proto.websocket_extensions_in_use:
            if isinstance(extension, PerMessageDeflate):
                self.deflate = extension
        if not self._open.called:
            self._open.callback(self)

    def _connect_failed(self, failure: Any) -> None:
        if not self._open.called:
            self._open.errback(failure)

    def _message(self, payload: bytes, is_binary: bool) -> None:
        item: Any = payload
        if not is_binary:
            text = payload.decode("utf-8")
            try:
                item = json.loads(text)
            except ValueError:
                item = text
        self.received.append(item)
        self.messages.put(item)

    def _closed(self, info: CloseInfo) -> None:
        self.close_info = info
        if not self._open.called:
            self._open.errback(ConnectionError(f"WebSocket handshake failed: {info.reason}"))
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(info)

    # API
    @property
    def bytes_received(self) -> int:
        """Bytes read off the socket since the upgrade (frame headers included, compressed or not)."""
        return self.protocol.trafficStats.incomingOctetsWireLevel if self.protocol else 0

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the socket since the upgrade (frame headers and masks included)."""
        return self.protocol.trafficStats.outgoingOctetsWireLevel if self.protocol else 0

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    def send_text(self, text: str) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_bytes(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(data, isBinary=True)

    def recv(self) -> Deferred[Any]:
        """The next message (JSON-decoded when it is JSON)."""
        return self.messages.get()

    async def recv_turn(self) -> list[Any]:
        """Messages up to and including the next terminal event."""
        events = []
        while True:
            event = await self.recv()
            events.append(event)
            if isinstance(event, dict) and event.get("type") in TERMINAL:
                return events

    def wait_closed(self) -> Deferred[CloseInfo]:
        if self.close_info is not None:
            d: Deferred[CloseInfo] = Deferred()
            d.callback(self.close_info)
            return d
        d = Deferred()
        self._close_waiters.append(d)
        return d

    def close(self, code: int = 1000, reason: str | None = None) -> Deferred[CloseInfo]:
        if self.protocol is not None and self.close_info is None:
            self.protocol.sendClose(code, reason)
        return self.wait_closed()

    def abort(self) -> Deferred[CloseInfo]:
        """Drop the TCP connection without a close frame (what Codex does when it exits)."""
        if self.protocol is not None and self.close_info is None:
            self.protocol.transport.abortConnection()
        return self.wait_closed()
