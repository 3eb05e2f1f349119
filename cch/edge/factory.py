"""The client edge's factory: protocol options, the live-connection registry, close hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketServerFactory
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cch.adapters import run_timers_on
from cch.config import LimitsConfig
from cch.edge.connection import CLOSE_GOING_AWAY, EdgeConnection
from cch.edge.protocol import EdgeProtocol
from cch.metrics import EdgeStats
from cch.turn import Tunnel
from cch.waiters import Waiters
from cch.wsframes import DeflateAccept, refuse_compression

if TYPE_CHECKING:
    from cch.httpchannel import ConnectionSlots

log = Logger()


class EdgeFactory(WebSocketServerFactory):
    """Builds one :class:`EdgeProtocol` per client connection and knows every live one."""

    protocol = EdgeProtocol

    def __init__(
        self,
        *,
        tunnel: Tunnel,
        limits: LimitsConfig,
        clock: IReactorTime,
        reactor: Any = None,
        stats: EdgeStats | None = None,
        slots: ConnectionSlots | None = None,
        session_closed: Iterable[Callable[[str], None]] = (),
    ) -> None:
        """``session_closed``: called with a connection's session id once it is closing, to
        release what the session holds elsewhere (its upstream socket, its transcript)."""
        super().__init__(reactor=reactor)
        # Autobahn's own timers (keepalive pings, close handshake) on the injected clock too.
        run_timers_on(self, clock)
        self.stats = stats if stats is not None else EdgeStats()
        self.tunnel = tunnel
        self.slots = slots  # open connections against server.max_connections
        self.limits = limits
        self.clock = clock
        self.live: set[EdgeProtocol] = set()
        self._empty: Waiters[None] = Waiters()
        self.session_closed = tuple(session_closed)
        self.setProtocolOptions(
            maxMessagePayloadSize=limits.max_message_bytes,
            maxFramePayloadSize=limits.max_message_bytes,
            # Send 1009 with a close frame instead of dropping the TCP connection.
            failByDrop=False,
            # Like the reference: answer a client's close with its own code and reason
            # (docs/reference-behaviour.md#the-client-connection).
            echoCloseCodeReason=True,
            autoPingInterval=limits.auto_ping_interval,
            autoPingTimeout=limits.auto_ping_timeout,
            closeHandshakeTimeout=5,
            openHandshakeTimeout=30,
            # permessage-deflate with clients that offer it, windows within the limit; the
            # inflated size of a message is held to max_message_bytes (1009 beyond it).
            perMessageCompressionAccept=(
                DeflateAccept(limits.websocket_compression_window_bits, limits.max_message_bytes)
                if limits.websocket_compression
                else refuse_compression
            ),
        )

    def connection_opened(self, proto: EdgeProtocol) -> None:
        self.live.add(proto)

    def connection_closed(self, proto: EdgeProtocol) -> None:
        self.live.discard(proto)
        if not self.live:
            self._empty.fire(None)

    def wait_empty(self) -> Deferred[None]:
        """Fires once no client connection is left (immediately if none is)."""
        if not self.live:
            return succeed(None)
        return self._empty.wait()

    def close_decided(self, edge: EdgeConnection) -> None:
        """A connection is closing: release what it holds upstream (pool entries)."""
        for release in self.session_closed:
            release(edge.session_id)

    def collect(self) -> Iterator[Metric]:
        """The edge's figures, read at scrape time (cch.metrics)."""
        yield GaugeMetricFamily("cch_client_connections", "Open client WebSocket connections.", value=len(self.live))

    def go_away(self, only_idle: bool) -> None:
        """Draining: with ``only_idle`` close idle connections 1001 now and the others as soon
        as their turn in flight ends; without it close every connection 1001 now."""
        for proto in list(self.live):
            edge = proto.edge
            if edge is None or edge.closed:
                continue
            if only_idle:
                edge.leave()
            else:
                edge.close(CLOSE_GOING_AWAY, "going_away")

    def abort_all(self) -> None:
        """Last resort at shutdown: drop connections whose close handshake never finished."""
        for proto in list(self.live):
            if proto.transport is not None:
                proto.transport.abortConnection()
