"""HttpUpstream.post: a request the gateway itself stops is never reported as the provider's
failure, however early it is stopped (reported by the soak); what goes out is exactly what the
gateway decided (no redirect followed, no cookie kept, no encoding added); stopping the service
closes its kept connections. read_body/collect_body: how each way a body ends reaches the sink."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
import treq
from test_bodyreader import Upstream
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cch.http11 import HTTP11Connection, request_head
from cch.httpclient import ConnectTimeout, _Endpoints
from cch.upstream.http import HttpUpstream, UpstreamTimeout, collect_body, read_body
from cch.writes import write_batch


class Silent(Protocol):
    """Accepts and never answers."""


@pytest.mark.parametrize("turns_before_cancel", [0, 1, 2, 5])
@pytest_twisted.ensureDeferred
async def test_cancelling_at_any_moment_is_a_cancellation(turns_before_cancel: int) -> None:
    from twisted.internet.task import deferLater

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    upstream = HttpUpstream(reactor, Clock())
    try:
        d = upstream.post(
            f"http://127.0.0.1:{port.getHost().port}/v1/responses",
            {},
            b"{}",
            connect_timeout=5,
            first_byte_timeout=60,
        )
        for _ in range(turns_before_cancel):
            await deferLater(reactor, 0, lambda: None)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
    finally:
        await upstream.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_first_byte_deadline_is_a_timeout() -> None:
    accepted: Deferred[None] = Deferred()

    class Accepting(Silent):
        def connectionMade(self) -> None:
            accepted.callback(None)

    port = reactor.listenTCP(0, Factory.forProtocol(Accepting), interface="127.0.0.1")
    clock = Clock()
    upstream = HttpUpstream(reactor, clock)
    try:
        d = upstream.post(
            f"http://127.0.0.1:{port.getHost().port}/v1/responses", {}, b"{}", connect_timeout=5, first_byte_timeout=7
        )
        await accepted  # connected in time: only the first-byte deadline is left
        while len(clock.getDelayedCalls()) > 1:
            await deferLater(reactor, 0, lambda: None)
        clock.advance(7)
        with pytest.raises(UpstreamTimeout, match="no response within 7s"):
            await d
    finally:
        await upstream.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_connect_deadline_runs_on_the_injected_clock() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting
    # hangs until someone gives up.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    clock = Clock()
    upstream = HttpUpstream(reactor, clock)
    try:
        d = upstream.post(f"http://127.0.0.1:{address[1]}/v1/responses", {}, b"{}", connect_timeout=5, first_byte_timeout=60)
        for _ in range(10_000):  # reactor turns, not time: until the connect deadline is armed
            if len(clock.getDelayedCalls()) == 2:
                break
            await deferLater(reactor, 0, lambda: None)
        clock.advance(4.9)
        assert not d.called
        clock.advance(0.1)
        with pytest.raises(ConnectTimeout, match="no connection within 5s"):
            await d
        assert clock.getDelayedCalls() == []
    finally:
        await upstream.stopService()
        for s in (listener, *fillers):
            s.close()


# --- what goes out is what the gateway decided: nothing added, nothing followed -------------


class Recorder(Resource):
    """Answers the first POST with ``first`` (status, headers), later ones with 200."""

    isLeaf = True

    def __init__(self, first: tuple[int, dict[bytes, bytes]]) -> None:
        super().__init__()
        self.first = first
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []

    def render(self, request: Request) -> bytes:
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        assert request.content is not None
        self.requests.append((request.path, headers, request.content.read()))
        status, extra = self.first if len(self.requests) == 1 else (200, {})
        request.setResponseCode(status)
        for name, value in extra.items():
            request.setHeader(name, value)
        return b'{"ok":true}'


async def _post_twice(first: tuple[int, dict[bytes, bytes]]) -> tuple[Recorder, list[int]]:
    recorder = Recorder(first)
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    upstream = HttpUpstream(reactor, Clock())
    codes = []
    try:
        for body in (b'{"n":1}', b'{"n":2}'):
            response = await upstream.post(
                f"http://127.0.0.1:{port.getHost().port}/v1/responses",
                {"accept-encoding": "identity", "content-type": "application/json"},
                body,
                connect_timeout=5,
                first_byte_timeout=60,
            )
            await treq.content(response)
            codes.append(response.code)
    finally:
        await upstream.stopService()
        await port.stopListening()
    return recorder, codes


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirects_are_reported_not_followed(status: int) -> None:
    recorder, codes = await _post_twice((status, {b"location": b"/elsewhere"}))
    assert codes == [status, 200]
    assert [path for path, _, _ in recorder.requests] == [b"/v1/responses", b"/v1/responses"]


@pytest_twisted.ensureDeferred
async def test_no_cookie_is_kept_and_no_encoding_is_added() -> None:
    recorder, _ = await _post_twice((200, {b"set-cookie": b"session=upstream-a"}))
    for _, headers, _ in recorder.requests:
        assert b"cookie" not in headers
        assert headers[b"accept-encoding"] == [b"identity"]
    assert [body for _, _, body in recorder.requests] == [b'{"n":1}', b'{"n":2}']


def test_each_read_of_an_upstream_connection_is_one_write_batch() -> None:
    seen: list[bool] = []

    class Reader(Protocol):
        def dataReceived(self, data: bytes) -> None:
            seen.append(write_batch.open)

    connection = HTTP11Connection()
    connection.makeConnection(StringTransport())
    responses: list[Any] = []
    connection.request(request_head(b"POST", b"/", b"up", {}, 0), b"").addCallback(responses.append)
    connection.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    responses[0].deliverBody(Reader())
    connection.dataReceived(b"chunk")
    assert seen == [True] and not write_batch.open


def test_endpoints_are_built_once_per_origin() -> None:
    endpoints = _Endpoints(reactor, BrowserLikePolicyForHTTPS(), 5.0)
    a = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/v1/responses"))
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/other")) is a
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/v1/responses")) is not a
    assert endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8080/v1/responses")) is not a
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://127.0.0.1/v1/responses"))


# --- a service: stopping it closes the connections it keeps ---------------------------------


class Counting(Protocol):
    """Answers every request with a small kept-alive JSON body; counts its connections."""

    def connectionMade(self) -> None:
        self.factory.open.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    def connectionLost(self, reason: object = None) -> None:
        self.factory.open.remove(self)  # type: ignore[attr-defined]
        self.factory.lost.callback(None)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_closes_the_kept_connections() -> None:
    factory = Factory.forProtocol(Counting)
    factory.open, factory.lost = [], Deferred()  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    parent = MultiService()
    upstream = HttpUpstream(reactor, Clock())
    upstream.setServiceParent(parent)
    parent.startService()
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/v1/responses"
        response = await upstream.post(url, {}, b"{}", connect_timeout=5, first_byte_timeout=60)
        assert await collect_body(response, Clock(), idle_timeout=60) == b"{}"
        assert len(factory.open) == 1  # kept for the next request
        await parent.stopService()
        assert not upstream.running
        await factory.lost
        assert factory.open == []
    finally:
        await port.stopListening()


# --- read_body and collect_body: how each end of a body reaches the sink ---------------------


class Sink:
    """Records what the body reader reports, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.producer: Any = None

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        self.calls.append(("started", status, headers["content-type"]))

    def sse_event(self, data: str, kind: str | None = None) -> None:
        self.calls.append(("event", data, kind))

    def json_body(self, status: int, body: bytes, content_type: str) -> None:
        self.calls.append(("json", status, body, content_type))

    def register_producer(self, producer: Any) -> None:
        self.producer = producer

    def unregister_producer(self) -> None:
        self.calls.append("unregistered")


SSE = b"content-type: text/event-stream\r\n"


def _read(upstream: Upstream, sink: Sink, clock: Clock | None = None, **caps: int) -> list[Any]:
    outcome: list[Any] = []
    limits = {"max_json_bytes": 1000, "max_event_bytes": 1000, **caps}
    d = read_body(upstream.response, sink, clock or Clock(), idle_timeout=5, **limits)
    d.addBoth(outcome.append)
    return outcome


def _error(call: Any) -> dict[str, Any]:
    assert call[0] == "event" and call[2] is None
    error: dict[str, Any] = json.loads(call[1])["error"]
    return error


def test_events_go_on_with_their_type_and_a_terminal_means_no_error_after_a_break() -> None:
    upstream, sink = Upstream(SSE), Sink()
    outcome = _read(upstream, sink)
    assert sink.producer is not None
    upstream.send(b'data: {"type":"response.created"}\n\ndata: {"type":"response.completed"}\n\n')
    upstream.drop()
    assert sink.calls == [
        ("started", 200, "text/event-stream"),
        ("event", '{"type":"response.created"}', "response.created"),
        ("event", '{"type":"response.completed"}', "response.completed"),
        "unregistered",
    ]
    assert outcome == [None]


def test_a_stream_that_breaks_before_its_terminal_ends_with_upstream_stream_error() -> None:
    upstream, sink = Upstream(SSE + b"content-length: 1000\r\n"), Sink()
    outcome = _read(upstream, sink)
    upstream.send(b'data: {"type":"response.created"}\n\n')
    upstream.drop()
    error = _error(sink.calls[-1])
    assert error["code"] == "upstream_stream_error"
    assert error["message"] == "upstream stream failed: Connection was closed cleanly."
    assert outcome == [None]


def test_a_stream_without_length_ended_by_the_close_still_needs_its_terminal() -> None:
    upstream, sink = Upstream(SSE), Sink()
    _read(upstream, sink)
    upstream.drop()
    error = _error(sink.calls[-1])
    assert (error["code"], error["message"]) == ("upstream_stream_error", "upstream stream failed: PotentialDataLoss")


def test_an_event_over_the_cap_delivers_the_ones_before_it_then_ends_the_turn() -> None:
    upstream, sink = Upstream(SSE), Sink()
    _read(upstream, sink, max_event_bytes=40)
    upstream.send(b'data: {"type":"response.created"}\n\ndata: "' + b"x" * 100)
    assert upstream.state == "stopped"
    upstream.drop()
    assert sink.calls[1] == ("event", '{"type":"response.created"}', "response.created")
    assert _error(sink.calls[-1])["code"] == "upstream_event_too_large"


def test_a_stall_ends_the_stream_with_upstream_idle_timeout() -> None:
    clock = Clock()
    upstream, sink = Upstream(SSE), Sink()
    _read(upstream, sink, clock)
    clock.advance(5)
    upstream.drop()
    error = _error(sink.calls[-1])
    assert (error["code"], error["message"]) == ("upstream_idle_timeout", "upstream sent nothing for 5s")


def test_a_json_body_reaches_the_sink_whole_with_its_status_and_type() -> None:
    upstream, sink = Upstream(b"content-type: application/json\r\n"), Sink()
    outcome = _read(upstream, sink)
    upstream.send(b'{"id":')
    upstream.send(b'"resp_1"}')
    upstream.drop()  # no length: the close ends it
    assert sink.calls == ["unregistered", ("json", 200, b'{"id":"resp_1"}', "application/json")]
    assert outcome == [None]


def test_a_json_body_over_the_cap_is_a_502_upstream_response_too_large() -> None:
    upstream, sink = Upstream(b"content-type: application/json\r\n"), Sink()
    _read(upstream, sink, max_json_bytes=10)
    upstream.send(b'{"id":"resp_1"}')
    assert upstream.state == "stopped"
    upstream.drop()
    [_, (what, status, body, kind)] = sink.calls
    assert (what, status, kind) == ("json", 502, "application/json")
    assert json.loads(body)["error"]["code"] == "upstream_response_too_large"


def test_cancelling_read_body_aborts_the_body_and_reports_nothing_more() -> None:
    upstream, sink = Upstream(SSE), Sink()
    failures: list[Any] = []
    d = read_body(upstream.response, sink, Clock(), idle_timeout=5, max_json_bytes=10, max_event_bytes=10)
    d.addErrback(failures.append)
    d.cancel()
    assert failures[0].check(CancelledError) and upstream.state == "stopped"
    upstream.drop()
    assert sink.calls == [("started", 200, "text/event-stream")]


def test_collect_body_keeps_the_first_bytes_of_a_long_error() -> None:
    upstream = Upstream(b"content-length: 100\r\n")
    collected: list[bytes] = []
    collect_body(upstream.response, Clock(), idle_timeout=5, max_bytes=8).addCallback(collected.append)
    upstream.send(b"0123456789")
    assert upstream.state == "stopped"
    upstream.drop()
    assert collected == [b"01234567"]
