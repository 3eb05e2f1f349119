"""In-memory doubles of the gateway's upstream edges, for tests that run on a ``task.Clock``
with no sockets and no reactor I/O.

- :class:`FakeSocket` has exactly the surface of :class:`cch.upstream.ws.UpstreamConnection`
  that the pool and an exchange use; the test decides when it opens, what it receives and when
  a close completes. :class:`SocketFactory` is the pool's ``open_socket``.
- :class:`FakeHttp` has :meth:`cch.upstream.http.HttpUpstream.post`'s signature; each request is
  a :class:`PostCall` the test answers with a :class:`FakeResponse`, which implements the
  ``IResponse`` surface the body readers use (``code``, ``headers``, ``length``,
  ``deliverBody``) and whose body arrives when the test says.
- :class:`MemorySink` records what a :class:`cch.turn.ResponseSink` is told.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from cch.upstream.pool import Target
from cch.upstream.ws import CLOSED, CLOSING, CONNECTING, OPEN, SocketClosed

# -- Deferred helpers ---------------------------------------------------------------------------


def result_of(d: Deferred[Any]) -> Any:
    """The result ``d`` already has (fails the test when it has none, or a failure)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    result = box[0]
    if isinstance(result, Failure):
        d.addErrback(lambda _: None)
        raise AssertionError(f"the Deferred failed: {result.getTraceback()}")
    return result


def failure_of(d: Deferred[Any], *kinds: type[BaseException]) -> Failure:
    """The failure ``d`` already has, of one of ``kinds``; the failure is consumed."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    result = box[0]
    assert isinstance(result, Failure), f"the Deferred succeeded with {result!r}"
    assert result.check(*kinds), f"unexpected failure: {result.getTraceback()}"
    return result


# -- the upstream WebSocket -----------------------------------------------------------------------

_socket_ids = itertools.count(9001)


class FakeSocket:
    """An upstream socket under the test's control (``cch.upstream.ws.UpstreamConnection``'s
    surface: ``id``, ``state``, ``consumer``, ``on_gone``, ``usable``, ``status_text``,
    ``connect``, ``send``, ``pause``/``resume``, ``safe_close``).

    Like the real one, ``safe_close`` never closes twice, aborts (no close code) while
    connecting, and only *starts* a close: :meth:`finish_close` ends it, telling the consumer
    ``ws_closed`` and then running the ``on_gone`` hooks.
    """

    def __init__(self, target: Target) -> None:
        self.id = next(_socket_ids)
        self.target = target
        self.state = CONNECTING
        self.consumer: Any = None
        self.on_gone: list[Callable[[FakeSocket], None]] = []
        self.status_text = ""
        self.connects = 0
        self.sent: list[str] = []
        self.close_code: int | None = None  # the code safe_close sent
        self.aborted = False  # safe_close while connecting: no close frame
        self.paused = False
        self.pauses = 0
        self.send_error: Exception | None = None  # send raises this, when set
        self.connect_error: Exception | None = None  # connect raises this, when set
        self.ended_with: SocketClosed | None = None  # what the consumer was told at the end

    def __repr__(self) -> str:
        return f"<FakeSocket {self.id} {self.state} close={self.close_code} aborted={self.aborted}>"

    # -- the surface the pool and an exchange use ----------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state in (CONNECTING, OPEN)

    def connect(self) -> None:
        assert self.connects == 0, "connect() called twice"
        self.connects += 1
        if self.connect_error is not None:
            # As the real one raises for a host name IDNA refuses (optionsForClientTLS).
            raise self.connect_error

    def send(self, text: str | bytes) -> None:
        if self.state != OPEN:
            raise ConnectionError("websocket is not open")
        if self.send_error is not None:
            raise self.send_error
        self.sent.append(text.decode("utf-8") if isinstance(text, bytes) else text)

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False

    def safe_close(self, code: int = 1000) -> None:
        if self.state in (CLOSED, CLOSING):
            return
        if self.state == CONNECTING:
            self.aborted = True
        else:
            self.close_code = code
            self.paused = False  # the real one resumes reads so the close reply is read
        self.state = CLOSING

    def abort(self, failure: str) -> None:
        """As the real one: ends at once, without a close frame, for ``failure``."""
        if self.state == CLOSED:
            return
        self.aborted = True
        self._end(SocketClosed(failure=failure))

    # -- what the test makes happen -------------------------------------------------------------

    def open(self) -> None:
        assert self.connects == 1, "open() before connect()"
        assert self.state == CONNECTING, self
        self.state = OPEN
        if self.consumer is not None:
            self.consumer.ws_opened()

    def message(self, text: str | dict[str, Any]) -> None:
        """One upstream text message (a dict is sent as its JSON); dropped when nobody listens,
        as the real socket drops it."""
        if isinstance(text, dict):
            text = json.dumps(text)
        assert self.state in (OPEN, CLOSING), self
        if self.consumer is not None and self.state == OPEN:
            self.consumer.ws_message(text, len(text.encode("utf-8")))

    def closed_by_peer(self, code: int = 1000, reason: str | None = None) -> None:
        assert self.state in (OPEN, CLOSING), self
        self._end(SocketClosed(code=code, reason=reason))

    def fail(self, text: str = "connection lost") -> None:
        """The connection broke (or never connected)."""
        assert self.state != CLOSED, self
        self._end(SocketClosed(failure=text))

    def refuse_upgrade(self, status: int, text: str = "") -> None:
        assert self.state == CONNECTING, self
        self.status_text = f"{status} {text}".strip()
        self._end(SocketClosed(failure="connection was closed uncleanly", status=status))

    def refuse_oversized(self, limit: int) -> None:
        """The upstream sent a message over the socket's cap (Autobahn drops the socket)."""
        assert self.state == OPEN, self
        self._end(SocketClosed(failure="message too large", too_large=limit))

    def finish_close(self) -> None:
        """The close safe_close started has completed."""
        assert self.state == CLOSING, self
        if self.aborted:
            self._end(SocketClosed(failure="connection aborted"))
        else:
            self._end(SocketClosed(code=self.close_code))

    def _end(self, closed: SocketClosed) -> None:
        self.state = CLOSED
        self.ended_with = closed
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            consumer.ws_closed(closed)
        hooks, self.on_gone = self.on_gone, []
        for hook in hooks:
            hook(self)

    # -- reading what happened -------------------------------------------------------------------

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.sent]


class SocketFactory:
    """The pool's ``open_socket``: makes :class:`FakeSocket` s and remembers each."""

    def __init__(self) -> None:
        self.made: list[FakeSocket] = []
        self.connect_error: Exception | None = None  # given to every new socket

    def __call__(self, target: Target) -> FakeSocket:
        sock = FakeSocket(target)
        sock.connect_error = self.connect_error
        self.made.append(sock)
        return sock

    @property
    def last(self) -> FakeSocket:
        assert self.made, "no socket was opened"
        return self.made[-1]

    def settle(self) -> None:
        """Complete every close that was started."""
        for sock in self.made:
            if sock.state == CLOSING:
                sock.finish_close()

    def not_closed(self) -> list[FakeSocket]:
        return [sock for sock in self.made if sock.state != CLOSED]


# -- the client side of a turn --------------------------------------------------------------------


@dataclass
class MemorySink:
    """A :class:`cch.turn.ResponseSink` that records what it is told."""

    started: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    events: list[tuple[str, str | None]] = field(default_factory=list)
    json: list[tuple[int, bytes, str]] = field(default_factory=list)
    json_headers: list[dict[str, str] | None] = field(default_factory=list)
    producer: IPushProducer | None = None
    registered: int = 0
    unregistered: int = 0
    paused: bool = False  # a paused sink pauses a producer as it registers (as the edge does)

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        assert not self.started and not self.json, "a response started twice"
        self.started.append((status, dict(headers)))

    def sse_event(self, data: str, kind: str | None = None) -> None:
        assert self.started, "an event before sse_started"
        self.events.append((data, kind))

    def json_body(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        assert not self.started and not self.json, "a response started twice"
        self.json.append((status, body, content_type))
        self.json_headers.append(None if headers is None else dict(headers))

    def register_producer(self, producer: IPushProducer) -> None:
        self.producer = producer
        self.registered += 1
        if self.paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self.producer = None
        self.unregistered += 1

    # -- reading it back ---------------------------------------------------------------------

    @property
    def data(self) -> list[str]:
        return [data for data, _ in self.events]

    @property
    def types(self) -> list[str | None]:
        return [json.loads(data).get("type") for data, _ in self.events]

    def parsed(self) -> list[dict[str, Any]]:
        return [json.loads(data) for data, _ in self.events]

    def json_error(self) -> tuple[int, dict[str, Any]]:
        assert len(self.json) == 1, self.json
        status, body, _ = self.json[0]
        return status, json.loads(body)


# -- the upstream over HTTP -----------------------------------------------------------------------


class BodyTransport:
    """What a response body's protocol gets as ``transport`` (Twisted's
    ``TransportProxyProducer`` surface): a push producer that can also be dropped."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False  # stopProducing or loseConnection: the connection goes

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True

    def loseConnection(self) -> None:
        self.stopped = True


class FakeResponse:
    """An ``IResponse`` whose body the test writes: bytes written before ``deliverBody`` are
    buffered and handed over then, as Twisted's ``Response`` does."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, code: int, content_type: str | None, *, phrase: bytes = b"", length: int | None = None
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers()
        if content_type is not None:
            self.headers.setRawHeaders(b"content-type", [content_type.encode("latin-1")])
        self.length = UNKNOWN_LENGTH if length is None else length
        self.transport = BodyTransport()
        self.protocol: Protocol | None = None
        self._buffered: list[bytes] = []
        self._end: Failure | None = None
        self.ended = False

    def deliverBody(self, protocol: Protocol) -> None:
        assert self.protocol is None, "deliverBody called twice"
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        for chunk in self._buffered:
            protocol.dataReceived(chunk)
        self._buffered = []
        if self._end is not None:
            end, self._end = self._end, None
            protocol.connectionLost(end)

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        assert not self.ended, "write after the body ended"
        if self.protocol is None:
            self._buffered.append(data)
        else:
            self.protocol.dataReceived(data)

    def event(self, payload: dict[str, Any] | str) -> None:
        """One SSE event."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self.write(f"data: {text}\n\n")

    def finish(self) -> None:
        self._lose(Failure(ResponseDone("Response body fully received")))

    def lose(self, exc: BaseException) -> None:
        self._lose(Failure(exc))

    def _lose(self, reason: Failure) -> None:
        assert not self.ended, "the body ended twice"
        self.ended = True
        if self.protocol is None:
            self._end = reason
        else:
            self.protocol.connectionLost(reason)


@dataclass
class PostCall:
    """One request :class:`FakeHttp` received, waiting for the test's answer."""

    url: str
    headers: dict[str, str]
    body: bytes
    options: dict[str, Any]
    result: Deferred[Any]
    cancelled: bool = False
    response: FakeResponse | None = None

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def respond(
        self, code: int, content_type: str | None = "text/event-stream", **kw: Any
    ) -> FakeResponse:
        assert not self.result.called, "already answered"
        self.response = FakeResponse(code, content_type, **kw)
        self.result.callback(self.response)
        return self.response

    def respond_json(self, code: int, body: dict[str, Any] | bytes) -> FakeResponse:
        response = self.respond(code, "application/json")
        response.write(body if isinstance(body, bytes) else json.dumps(body).encode())
        response.finish()
        return response

    def refuse(self, exc: BaseException) -> None:
        assert not self.result.called, "already answered"
        self.result.errback(Failure(exc))


class FakeHttp:
    """:class:`cch.upstream.http.HttpUpstream`'s ``post``, answered by the test."""

    def __init__(self) -> None:
        self.calls: list[PostCall] = []

    def post(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        tls_ca: str | None = None,
    ) -> Deferred[Any]:
        call: PostCall

        def cancel(_: Deferred[Any]) -> None:
            call.cancelled = True  # the real one answers a cancel with CancelledError

        d: Deferred[Any] = Deferred(cancel)
        options = {
            "connect_timeout": connect_timeout,
            "first_byte_timeout": first_byte_timeout,
            "tls_ca": tls_ca,
        }
        call = PostCall(url, dict(headers), body, options, d)
        self.calls.append(call)
        return d

    @property
    def last(self) -> PostCall:
        assert self.calls, "no HTTP request was made"
        return self.calls[-1]

    def unfinished(self) -> list[PostCall]:
        """Requests the gateway still waits on: not answered and not cancelled, or a body it
        neither read to the end nor stopped."""
        left = []
        for call in self.calls:
            if not call.result.called:
                left.append(call)
            elif (
                call.response is not None
                and not call.response.ended
                and not call.response.transport.stopped
            ):
                left.append(call)
        return left
