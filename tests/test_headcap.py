"""An upstream's response head is capped (cch.httpclient): endless headers cut the connection."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq
from conftest import gateway_config, response_create, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.web.client import HTTPConnectionPool

from cch.config import ProviderConfig
from cch.httpclient import _BatchedReads


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def capped(limit: int) -> tuple[Any, Recorder, StringTransport]:
    """The reader the outbound HTTP client puts in front of each connection's protocol."""
    inner = Recorder()
    proto = _BatchedReads(Factory.forProtocol(lambda: inner)).buildProtocol(None)
    proto.limit = limit
    transport = StringTransport()
    proto.makeConnection(transport)
    assert inner.transport is proto  # the protocol writes through the reader
    return proto, inner, transport


def test_a_head_within_the_cap_and_its_body_pass_through() -> None:
    proto, inner, transport = capped(100)
    proto.write(b"POST / HTTP/1.1\r\n\r\n")
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nx: " + b"y" * 40)
    proto.dataReceived(b"\r\n\r\n" + b"z" * 1000)  # the body is never counted
    assert inner.data.endswith(b"z" * 1000)
    assert not transport.disconnecting


def test_a_head_over_the_cap_aborts_the_connection() -> None:
    proto, inner, transport = capped(100)
    proto.write(b"POST / HTTP/1.1\r\n\r\n")
    for _ in range(20):
        proto.dataReceived(b"x-evil: " + b"e" * 10 + b"\r\n")
    assert transport.disconnecting  # aborted
    assert len(inner.data) <= 100


def test_each_request_on_a_kept_alive_connection_has_its_own_cap() -> None:
    proto, inner, transport = capped(100)
    for _ in range(3):
        proto.write(b"GET / HTTP/1.1\r\n\r\n")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + b"h: " + b"v" * 60 + b"\r\n\r\n")
    assert not transport.disconnecting


class EndlessHeaders(Protocol):
    """An upstream that answers every request with headers that never end."""

    sent = 0
    reset: Deferred[int]

    def dataReceived(self, data: bytes) -> None:
        if self.sent == 0:
            self.transport.write(b"HTTP/1.1 200 OK\r\n")
            self._more()

    def _more(self) -> None:
        if self.transport is None or self.transport.disconnected:
            return
        line = b"x-evil: " + b"e" * 8000 + b"\r\n"
        self.transport.write(line * 8)
        self.sent += len(line) * 8
        if self.sent < 64 * 1024 * 1024:
            reactor.callLater(0, self._more)

    def connectionLost(self, reason: Any) -> None:
        if not EndlessHeaders.reset.called:
            EndlessHeaders.reset.callback(self.sent)


@pytest_twisted.ensureDeferred
async def test_an_upstream_sending_endless_headers_is_cut_off(fake: Any) -> None:
    EndlessHeaders.reset = Deferred()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(EndlessHeaders))
    base = f"http://127.0.0.1:{port.getHost().port}/v1"
    config = gateway_config(fake, providers=(ProviderConfig(name="evil", base_url=base, websocket="off"),))
    gateway = await start_gateway(config)
    try:
        response = await within(
            treq.post(
                gateway.http_url + "/v1/responses",
                json=response_create(stream=False),
                pool=HTTPConnectionPool(reactor, persistent=False),
            ),
            "the gateway's answer",
        )
        assert response.code == 502
        await treq.content(response)
        sent = await within(EndlessHeaders.reset, "the upstream connection to be cut")
        assert sent < 16 * 1024 * 1024  # cut long before the upstream ran out of headers
    finally:
        await gateway.stop()
        await port.stopListening()
