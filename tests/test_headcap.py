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
from twisted.web.client import HTTPConnectionPool, ResponseFailed

from cch.config import ProviderConfig
from cch.http11 import HTTP11Connection, request_head


def capped(limit: int) -> tuple[HTTP11Connection, StringTransport]:
    """The outbound HTTP client's connection, its head cap at ``limit`` bytes."""
    connection = HTTP11Connection(on_idle=lambda _: None)
    connection.head_limit = limit
    transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def post(connection: HTTP11Connection) -> list[Any]:
    outcome: list[Any] = []
    connection.request(request_head(b"POST", b"/", b"up", {}, 0), b"").addBoth(outcome.append)
    return outcome


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def test_a_head_within_the_cap_and_its_body_pass_through() -> None:
    connection, transport = capped(100)
    outcome = post(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx: " + b"y" * 40)
    assert outcome == []  # the head is not complete yet
    connection.dataReceived(b"\r\n\r\n" + b"z" * 1000)  # the body is never counted
    body = Recorder()
    outcome[0].deliverBody(body)
    assert outcome[0].code == 200 and body.data == b"z" * 1000
    assert not transport.disconnecting


def test_a_head_over_the_cap_aborts_the_connection() -> None:
    connection, transport = capped(100)
    outcome = post(connection)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    for _ in range(20):
        connection.dataReceived(b"x-evil: " + b"e" * 10 + b"\r\n")
    assert transport.disconnecting  # aborted
    assert len(outcome) == 1 and outcome[0].check(ResponseFailed)
    assert "response head too large" in str(outcome[0].value.reasons[0].value)


def test_each_request_on_a_kept_alive_connection_has_its_own_cap() -> None:
    connection, transport = capped(100)
    for _ in range(3):
        outcome = post(connection)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + b"h: " + b"v" * 60 + b"\r\n\r\n")
        assert outcome[0].code == 200
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
