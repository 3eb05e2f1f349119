"""The HTTP tunnel's own failure paths (docs/reference-behaviour.md#request-body-drain-timeout):
a body that cannot be written in time, a peer that goes away while it is written, a peer that
refuses the connection; and a body the peer reads, small or large, arrives whole with no
deadline left running."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web._newclient import Request as ClientRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cch.tunnel import BODY_DRAIN_TIMEOUT, HttpTunnel, _DeadlineBody
from cch.turn import TurnRequest, TurnTransportError


class Sink:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def sse_started(self, status: int, headers: dict[str, str]) -> None: ...

    def sse_event(self, data: str, kind: str | None = None) -> None:
        self.events.append(data)

    def json_body(self, status: int, body: bytes, content_type: str) -> None:
        self.events.append((status, body))

    def register_producer(self, producer: Any) -> None: ...

    def unregister_producer(self) -> None: ...


class Deaf(Protocol):
    """Accepts and never reads: the request body backs up."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.transport.pauseProducing()
        if not self.factory.connected.called:  # type: ignore[attr-defined]
            self.factory.connected.callback(None)  # type: ignore[attr-defined]


class Slammer(Protocol):
    """Reads a little, then slams the door while the body is still coming."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.abortConnection()


def listen(protocol: type[Protocol]) -> Any:
    factory = Factory.forProtocol(protocol)
    factory.connections = []  # type: ignore[attr-defined]
    factory.connected = Deferred()  # type: ignore[attr-defined]
    return reactor.listenTCP(0, factory, interface="127.0.0.1"), factory


def turn(size: int) -> TurnRequest:
    return TurnRequest(session_id="s", headers={}, body={"input": "x" * size}, request_id="r1")


@pytest_twisted.ensureDeferred
async def test_a_body_backpressured_past_the_deadline_is_a_drain_timeout() -> None:
    port, factory = listen(Deaf)
    clock = Clock()
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", clock)
    try:
        d = tunnel.run_turn(turn(32 * 1024 * 1024), Sink())
        await factory.connected  # the deadline runs from when the body starts to be written
        for _ in range(10_000):  # reactor turns, not time: until the request starts its body
            if clock.getDelayedCalls():
                break
            await deferLater(reactor, 0, lambda: None)
        clock.advance(30)
        with pytest.raises(TurnTransportError) as caught:
            await d
        assert caught.value.code == "internal_request_drain_timeout"
        assert caught.value.message == "Internal request body remained backpressured past its deadline"
    finally:
        for proto in factory.connections:
            proto.transport.abortConnection()
        await port.stopListening()
        await tunnel.close()


@pytest_twisted.ensureDeferred
async def test_a_peer_that_leaves_mid_body_is_body_closed_or_request_error() -> None:
    port, _ = listen(Slammer)
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", Clock())
    try:
        with pytest.raises(TurnTransportError) as caught:
            await tunnel.run_turn(turn(32 * 1024 * 1024), Sink())
        # Which of the two a reset surfaces as is a race in the kernel, as in the reference.
        assert caught.value.code in ("internal_request_body_closed", "internal_request_error")
    finally:
        await port.stopListening()
        await tunnel.close()


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_an_internal_request_error() -> None:
    port, _ = listen(Deaf)
    url = f"http://127.0.0.1:{port.getHost().port}/v1/responses"
    await port.stopListening()
    tunnel = HttpTunnel(reactor, url, "secret", Clock())
    try:
        with pytest.raises(TurnTransportError) as caught:
            await tunnel.run_turn(turn(10), Sink())
        assert caught.value.code == "internal_request_error"
    finally:
        await tunnel.close()


class Echo(Resource):
    """Answers every POST with the body it received, as JSON bytes."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        request.setHeader(b"content-type", b"application/json")
        return request.content.read()


@pytest.mark.parametrize("size", [10, 200_000])
@pytest_twisted.ensureDeferred
async def test_a_body_the_peer_reads_arrives_whole_and_leaves_no_deadline_behind(size: int) -> None:
    port = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
    clock = Clock()
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", clock)
    sink = Sink()
    try:
        await tunnel.run_turn(turn(size), sink)
        [(status, body)] = sink.events
        assert status == 200 and json.loads(body)["input"] == "x" * size
        assert clock.getDelayedCalls() == []
    finally:
        await tunnel.close()
        await port.stopListening()


class _PausingTransport(StringTransport):
    """Pauses its streaming producer once more than a little is buffered (a slow peer)."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.io.getvalue()) > 1000:
            self.producer.pauseProducing()


def test_a_turn_cancelled_while_its_body_is_held_leaves_no_deadline_running() -> None:
    clock = Clock()
    body = _DeadlineBody(b"x" * 5000, clock, BODY_DRAIN_TIMEOUT)
    transport = _PausingTransport()
    client = HTTP11ClientProtocol()
    client.makeConnection(transport)
    failures: list[Failure] = []
    d = client.request(ClientRequest(b"POST", b"/v1/responses", Headers({b"host": [b"gw"]}), body))
    d.addErrback(failures.append)
    assert len(clock.getDelayedCalls()) == 1  # held: the drain deadline runs
    d.cancel()  # the client left
    assert failures and clock.getDelayedCalls() == []
    clock.advance(BODY_DRAIN_TIMEOUT + 1)
    assert not body.timed_out
