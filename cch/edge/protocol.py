"""The Autobahn protocol of the client edge: frames in, calls on EdgeConnection out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from autobahn.websocket.types import ConnectionRequest
from twisted.logger import Logger

from cch.adapters import ServerProtocol, cancel_close_timer, not_clean_reason, refused_oversized
from cch.edge.connection import EdgeConnection
from cch.headers import EDGE_NOT_FORWARDED, without_hop_by_hop, without_reserved
from cch.logs import mask_query
from cch.writes import BatchedWriter
from cch.wsframes import (
    MessageDeflater,
    frame_payloads,
    negotiated_deflate,
    take_text_frames,
    text_frame_header,
)

if TYPE_CHECKING:
    from cch.edge.factory import EdgeFactory

log = Logger()



def forwardable_headers(headers: dict[str, str]) -> dict[str, str]:
    """The handshake headers a turn carries inward: hop-by-hop ones (those the client's
    ``Connection`` names included), the handshake's own and ``x-cch-*`` removed."""
    return {
        name: value
        for name, value in without_reserved(without_hop_by_hop(headers)).items()
        if name not in EDGE_NOT_FORWARDED
    }


class EdgeProtocol(ServerProtocol, BatchedWriter):
    """One client WebSocket on ``/v1/responses``; stays thin on purpose."""

    factory: EdgeFactory
    edge: EdgeConnection | None = None
    _holds_slot = False
    # The negotiated permessage-deflate compressor for the frames send_text writes, if any.
    _deflate: MessageDeflater | None = None

    # The connection's place under server.max_connections, handed over by the HTTP channel
    # at the upgrade (cch.httpchannel.ConnectionSlots).
    def connectionMade(self) -> None:
        slots = self.factory.slots
        if slots is not None:
            slots.take()
            self._holds_slot = True
        super().connectionMade()

    def connectionLost(self, reason: object) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self.factory.slots.release()  # type: ignore[union-attr]
        self._lost = True
        held, self._held = self._held, []
        for release in held:
            release()
        super().connectionLost(reason)

    _held: list[Callable[[], None]] = []
    _lost = False

    def hold(self, release: Callable[[], None]) -> None:
        """Call ``release`` when this connection is lost (its place under a key's
        ``max_connections``); at once if it is lost already."""
        if self._lost:
            release()
        else:
            self._held = [*self._held, release]

    def onConnect(self, request: ConnectionRequest) -> str | None:
        self._request = request
        # Like the reference: pick the first offered subprotocol, if any
        # (docs/reference-behaviour.md#the-client-connection).
        return request.protocols[0] if request.protocols else None

    def onOpen(self) -> None:
        self._deflate = negotiated_deflate(self)
        try:
            self._open()
        except Exception as exc:
            self._handler_crashed(exc)

    def _open(self) -> None:
        transport = self.transport
        # twisted.web registered its HTTPChannel as the transport's producer; the connection
        # is ours now, and so is its flow control.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        request = self._request
        model = request.params.get("model")
        self.edge = EdgeConnection(
            channel=self,
            tunnel=self.factory.tunnel,
            limits=self.factory.limits,
            clock=self.factory.clock,
            headers=forwardable_headers(request.headers),
            query_model=model[0] if model else None,
            on_close_decided=self.factory.close_decided,
            stats=self.factory.stats,
        )
        transport.registerProducer(self.edge, True)
        self.factory.connection_opened(self)
        log.info("ws_client_connected", path=mask_query(self.http_request_uri), deflate=self._deflate is not None)

    def consumeData(self) -> None:
        # The per-turn hot path: a turn's frame is one final masked text frame, cut straight
        # out of the buffer (cch.wsframes); Autobahn handles everything else. Autobahn's
        # consumeData and the state read here are listed in cch/adapters.py.
        if self.state == self.STATE_OPEN and self.current_frame is None and not self.inside_message:
            if take_text_frames(self, masked=True, deliver=self._text_frame):
                return  # the rest is the start of a frame this path takes when the next read completes it
        super().consumeData()

    def _text_frame(self, payload: bytes) -> bool:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return False  # Autobahn's validator fails the connection with 1007
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self.cancel_ping_timeout()  # what Autobahn does on any data frame (cch/adapters.py)
        self.onMessage(payload, False)
        return True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        edge = self.edge
        if edge is None:
            return
        try:
            if isBinary:
                edge.binary_received()
            else:
                edge.text_received(payload.decode("utf-8"), len(payload))
        except Exception as exc:
            self._handler_crashed(exc)

    def _handler_crashed(self, exc: BaseException) -> None:
        """Reference H1: log ``ws_handler_error`` and close 1011 ``internal_error``."""
        log.error("ws_handler_error", error=repr(exc))
        if self.edge is not None:
            self.edge.connection_lost()
        self.send_close(1011, "internal_error")

    # Any close decided below us (a client close frame, a protocol error such as 1009 or
    # 1007, a dropped connection) finalizes the edge at once, not when the TCP is gone, so
    # no queued frame can start a turn in between (docs/architecture.md, "Close means stop").
    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        if self.edge is not None:
            self.edge.connection_lost()
        return super().onCloseFrame(code, reasonRaw)

    def failing_connection(self) -> None:
        if self.edge is not None:
            self.edge.connection_lost()

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False) -> None:
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        if not isReply and refused_oversized(self):
            # Autobahn refused a message over max_message_bytes (1009) and reads nothing more
            # of it: a compressed one leaves its parser inside the frame for good, so the
            # client's close reply would never be read and whatever else the client sends
            # would pile up in the buffer until closeHandshakeTimeout. The close frame goes
            # out, then the TCP connection is closed (RFC 6455 section 7.1.7).
            self.dropConnection(abort=False)

    def dropConnection(self, abort: bool = False) -> None:
        if self.edge is not None:
            self.edge.connection_lost()
        self.flush_writes()
        super().dropConnection(abort)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Everything Autobahn writes (close frames, pongs) goes after the frames collected.
        self.flush_writes()
        super().sendData(data, sync, chopsize)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        cancel_close_timer(self)
        edge = self.edge
        if edge is not None:
            if not wasClean and not edge.closed:
                # Codex ends `codex exec` by dropping TCP without a close frame: info, not alarm.
                log.info("ws_client_error", error=not_clean_reason(self) or "connection lost")
            edge.connection_lost()
            self.factory.connection_closed(self)
            log.info("ws_client_disconnected", code=code, clean=wasClean, turns=edge.turns_started)

    # EdgeChannel
    def send_text(self, text: str) -> int:
        if self.state != self.STATE_OPEN:
            return 0
        payload = text.encode("utf-8")
        # The per-event hot path. The edge never fragments and a server never masks, so a
        # message is one final text frame: written here directly, it skips Autobahn's
        # per-frame bookkeeping and eagerly formatted debug logging. With permessage-deflate
        # negotiated it is compressed with the connection's Autobahn compressor (RSV1 set).
        size = len(payload)
        deflate = self._deflate
        if deflate is None:
            # Inside an upstream read: collected, written once when the read is done (cch.writes).
            self.write_batched(text_frame_header(size), payload)
        else:
            data = deflate(payload)
            self.write_batched(text_frame_header(len(data), True), data)
        return size

    def send_frames(self, data: bytes, start: int, end: int) -> int:
        if self.state != self.STATE_OPEN:
            return 0
        deflate = self._deflate
        if deflate is None:
            # The relayed hot path (cch.wsframes.relay_text_frames): the upstream's bytes.
            self.write_batched(data[start:end])
        else:
            for payload in frame_payloads(data, start, end):
                compressed = deflate(payload)
                self.write_batched(text_frame_header(len(compressed), True), compressed)
        return end - start

    def write_now(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def send_close(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            # sendClose() only allows 1000/3000-4999; the edge's codes are protocol codes.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
