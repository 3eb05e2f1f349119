"""The HTTP tunnel's own failure paths (docs/reference-behaviour.md#request-body-drain-timeout):
a body that cannot be written in time, a peer that goes away while it is written, a peer that
refuses the connection; a body the peer reads, small or large, arrives whole with no deadline
left running; an answer cut short fails the turn; the URL may be known only at the first turn
(the gateway's own port), and stopping the service closes the kept connections."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import MultiService
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

from cch.headers import lower_headers
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
        await tunnel.stopService()


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
        await tunnel.stopService()


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
        await tunnel.stopService()


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
        await tunnel.stopService()
        await port.stopListening()


class Heads(Resource):
    """Records each request's headers; answers an empty JSON object."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, str]] = []

    def render_POST(self, request: Request) -> bytes:
        self.seen.append(lower_headers(request.requestHeaders))
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


@pytest_twisted.ensureDeferred
async def test_the_turn_carries_the_clients_headers_and_only_the_gateways_own_markers() -> None:
    heads = Heads()
    port = reactor.listenTCP(0, Site(heads), interface="127.0.0.1")
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", Clock())
    client = {"originator": "codex_exec", "x-cch-internal-secret": "spoofed", "X-CCH-Tenant": "t", "accept": "*/*"}
    try:
        await tunnel.run_turn(TurnRequest(session_id="s1", headers=client, body={}, request_id="r1"), Sink())
        [seen] = heads.seen
        assert seen["originator"] == "codex_exec" and seen["accept"] == "text/event-stream"
        assert {name: value for name, value in seen.items() if name.startswith("x-cch-")} == {
            "x-cch-client-transport": "websocket",
            "x-cch-responses-ws-forward": "1",
            "x-cch-responses-ws-session": "s1",
            "x-cch-internal-secret": "secret",
            "x-cch-request-id": "r1",
        }
    finally:
        await tunnel.stopService()
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


class Answer(Protocol):
    """Answers the first request with the factory's canned bytes, then closes if told to."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not getattr(self, "answered", False):
            self.answered = True
            self.transport.write(self.factory.answer)  # type: ignore[attr-defined]
            if self.factory.close:  # type: ignore[attr-defined]
                self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.factory.connections.remove(self)  # type: ignore[attr-defined]
        self.factory.lost.callback(None)  # type: ignore[attr-defined]


def answering(answer: bytes, *, close: bool) -> tuple[Any, Any]:
    factory = Factory.forProtocol(Answer)
    factory.answer, factory.close = answer, close  # type: ignore[attr-defined]
    factory.connections, factory.lost = [], Deferred()  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, factory


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


@pytest.mark.parametrize(
    ("answer", "events"),
    [
        (SSE_HEAD + b"content-length: 500\r\n\r\ndata: {\"type\":\"response.created\"}\n\n", ['{"type":"response.created"}']),
        (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n{\"id\":", []),
    ],
    ids=["sse", "json"],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_cut_short_is_internal_response_closed(answer: bytes, events: list[str]) -> None:
    port, factory = answering(answer, close=True)
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", Clock())
    sink = Sink()
    try:
        with pytest.raises(TurnTransportError) as caught:
            await tunnel.run_turn(turn(10), sink)
        assert caught.value.code == "internal_response_closed"
        assert sink.events == events
    finally:
        await tunnel.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_event_stream_ended_by_the_close_is_read_to_its_last_event() -> None:
    body = b"data: {\"type\":\"response.created\"}\n\ndata: {\"type\":\"response.completed\"}"
    port, _ = answering(SSE_HEAD + b"\r\n" + body, close=True)
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", Clock())
    sink = Sink()
    try:
        await tunnel.run_turn(turn(10), sink)
        assert sink.events == ['{"type":"response.created"}', '{"type":"response.completed"}']
    finally:
        await tunnel.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_url_known_only_once_listening_is_asked_at_the_first_turn_only() -> None:
    port = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
    asked: list[str] = []

    def own_listener() -> str:
        asked.append("asked")
        return f"http://127.0.0.1:{port.getHost().port}/v1/responses"

    tunnel = HttpTunnel(reactor, own_listener, "secret", Clock())
    try:
        assert asked == []  # built before the listener listens
        sink = Sink()
        await tunnel.run_turn(turn(1), sink)
        await tunnel.run_turn(turn(2), sink)
        assert [json.loads(body)["input"] for _, body in sink.events] == ["x", "xx"]
        assert asked == ["asked"] and tunnel.url == own_listener()
    finally:
        await tunnel.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_url_that_cannot_be_known_is_an_internal_request_error() -> None:
    def not_listening() -> str:
        raise RuntimeError("not listening yet")

    tunnel = HttpTunnel(reactor, not_listening, "secret", Clock())
    with pytest.raises(TurnTransportError) as caught:
        await tunnel.run_turn(turn(10), Sink())
    assert (caught.value.code, caught.value.message) == ("internal_request_error", "not listening yet")
    await tunnel.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_the_parent_service_closes_the_kept_connection() -> None:
    port, factory = answering(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}", close=False)
    parent = MultiService()
    tunnel = HttpTunnel(reactor, f"http://127.0.0.1:{port.getHost().port}/v1/responses", "secret", Clock())
    tunnel.setServiceParent(parent)
    parent.startService()
    try:
        await tunnel.run_turn(turn(10), Sink())
        assert len(factory.connections) == 1  # kept for the next turn
        await parent.stopService()
        await factory.lost
        assert factory.connections == [] and not tunnel.running
    finally:
        await port.stopListening()
