"""A WebSocket client that sends and never reads: every ping is answered with a pong, so
without flow control on reading the gateway would buffer pongs without end. While a client's
outbound buffer is over the transport's high-water mark the gateway stops reading from it, and
the send deadline (``limits.outbound_send_timeout``) then closes it 1011. Real sockets."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from conftest import eventually, gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from wire import client_frame

from cch.testing import FakeUpstream

PING = client_frame(b"p" * 125, opcode=9)  # masked, as a client must; 131 bytes
PONG_SIZE = 2 + 125
FLOOD = 40_000  # 5 MiB of pings: 5 MiB of pongs for a gateway that answers them all
# The socket buffers of both ends (made small below), the transport's 64 KiB mark and what
# one read of pings (64 KiB) is answered with fit in this many times over.
BOUND = 1024 * 1024




class Flooder(Protocol):
    """Upgrades to a WebSocket, then stops reading and writes ``FLOOD`` pings."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.head = b""
        self.open: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.write(
            b"GET /v1/responses HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % self.host.encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if not self.open.called and b"\r\n\r\n" in self.head:
            assert self.head.startswith(b"HTTP/1.1 101 "), self.head
            self.open.callback(None)

    def flood(self) -> None:
        self.transport.pauseProducing()  # never reads again
        self.transport.write(PING * FLOOD)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


def reading(proto: Any) -> bool:
    """Whether the reactor reads the gateway's end of this connection."""
    fd = proto.transport.getHandle().fileno()
    return any(getattr(r, "fileno", lambda: -1)() == fd for r in reactor.getReaders())


@pytest_twisted.ensureDeferred
async def test_ping_flood_from_a_client_that_never_reads_is_not_read_and_is_closed_1011(fake: FakeUpstream) -> None:
    clock = Clock()
    running = await start_gateway(gateway_config(fake), clock)
    address = running.service.listener.port.getHost()  # type: ignore[union-attr]
    client = Flooder(f"{address.host}:{address.port}")
    try:
        await connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), client)
        await within(client.open, "the upgrade")
        factory = running.service.edge_factory
        await eventually(lambda: len(factory.live) == 1, "the edge connection")
        (proto,) = factory.live
        edge = proto.edge
        proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        written = [0]
        write = proto.transport.write

        def counting(data: bytes) -> None:
            written[0] += len(data)
            write(data)

        proto.transport.write = counting  # everything the gateway sends this client

        client.flood()

        def settled() -> bool:
            assert written[0] < BOUND, f"{written[0]} bytes of pongs queued for a client that reads nothing"
            return edge.paused and not reading(proto)

        await eventually(settled, "the gateway to stop reading the flood")
        for _ in range(50):  # the reactor goes on; nothing more is read, nothing more queued
            await deferLater(reactor, 0, lambda: None)
            assert settled()
        assert 0 < written[0] < BOUND < FLOOD * PONG_SIZE

        clock.advance(running.service.config.limits.outbound_send_timeout)
        assert edge.closed
        closes = running.service.metrics.registry.get_sample_value(
            "cch_client_closes_total", {"code": "1011", "reason": "outbound_send_timeout"}
        )
        assert closes == 1
        before_close_handshake = written[0]
        await eventually(lambda: reading(proto) or proto.state == proto.STATE_CLOSED, "reading the close handshake")
        clock.advance(5)  # the client never answers the close: the handshake times out
        await within(factory.wait_empty(), "the connection to be dropped")
        assert written[0] - before_close_handshake < PONG_SIZE  # no pong after the close frame
        assert running.service.handler.active == 0
    finally:
        if client.transport is not None:
            client.transport.abortConnection()
            await within(client.lost, "the client socket to close")
        await running.stop()
