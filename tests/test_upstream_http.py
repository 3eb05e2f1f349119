"""HttpUpstream.post: a request the gateway itself stops is never reported as the provider's
failure, however early it is stopped (reported by the soak); what goes out is exactly what the
gateway decided (no redirect followed, no cookie kept, no encoding added)."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cch.httpclient import ConnectTimeout, _BatchedReads, _Endpoints
from cch.upstream.http import HttpUpstream, UpstreamTimeout
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
        await upstream.close()
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
        await upstream.close()
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
        await upstream.close()
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
        await upstream.close()
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

    proto = _BatchedReads(Factory.forProtocol(Reader)).buildProtocol(None)
    assert proto is not None
    proto.dataReceived(b"chunk")
    assert seen == [True] and not write_batch.open


def test_endpoints_are_built_once_per_origin() -> None:
    endpoints = _Endpoints(reactor, BrowserLikePolicyForHTTPS(), 5.0)
    a = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/v1/responses"))
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/other")) is a
    assert endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/v1/responses")) is not a
    assert endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8080/v1/responses")) is not a
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://127.0.0.1/v1/responses"))
