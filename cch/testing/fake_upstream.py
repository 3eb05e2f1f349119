"""A fake OpenAI Responses upstream: a real Twisted server for tests, demos and benchmarks.

One port serves `POST /v1/responses` (SSE or JSON), the WebSocket upgrade on the same path and
`GET /v1/models`; `POST /v1/chat/completions` and `POST /v1/messages` take scripts from the same
queue (the fake does not speak those APIs: scripts say what to stream, e.g.
`cch.testing.chat_scripts`), recorded with their path. What it answers is scripted (see `cch.testing.scripts`); what it received is
recorded for assertions. `previous_response_id` follows OpenAI's rules (store=false responses are
only known on the WebSocket connection that produced them), so a gateway's continuity handling
can be tested against it.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import directlyProvides, providedBy

from cch.adapters import cancel_close_timer
from cch.testing.scripts import (
    Event,
    Script,
    error_object,
    json_response,
    play,
    sse_block,
)
from cch.testing.scripts import codex_like as _codex_like

if TYPE_CHECKING:
    from autobahn.websocket.types import ConnectionRequest
    from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime

__all__ = ["FakeUpstream", "Recorded", "WSConnectionRecord"]

log = Logger()

SSE_CONTENT_TYPE = b"text/event-stream"
JSON_CONTENT_TYPE = b"application/json"

T = TypeVar("T")
ScriptSource = Script | Callable[["Recorded"], Script]


@dataclass
class Recorded:
    """One HTTP request or WebSocket turn, as the fake received it."""

    transport: str  # "http" | "websocket"
    method: str  # WebSocket turns: "GET", the method of the upgrade that opened the connection
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: dict[str, Any]  # parsed JSON body / WebSocket frame object ({} if not a JSON object)
    raw: bytes  # exact bytes received (HTTP body or WebSocket message payload)
    connection_index: int | None = None  # WebSocket: index into FakeUpstream.ws_connections
    cancelled: bool = False  # the connection went away before the script ended
    finished: bool = False  # the script has ended (played out, dropped, closed or cancelled)
    response_id: str | None = None  # the id the fake allotted when it served a script


@dataclass
class WSConnectionRecord:
    """One accepted WebSocket connection."""

    headers: dict[str, str]  # handshake headers, lower-case names
    opened_at_index: int  # len(FakeUpstream.requests) when the connection opened
    turns: list[Recorded] = field(default_factory=list)
    # Code of the close frame the peer sent (1005 if it carried none); None if the TCP
    # connection ended without a close frame from the peer.
    close_code: int | None = None
    closed: bool = False


@dataclass
class _Stored:
    """A response the fake remembers, for previous_response_id and `conversation`."""

    previous_response_id: str | None
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]


class FakeUpstream:
    """A scriptable, recording Responses server (HTTP SSE/JSON and WebSocket on one port)."""

    def __init__(self, clock: IReactorTime | None = None, *, id_prefix: str = "resp_fake"):
        self._clock = clock
        self._secure = False
        self._id_prefix = id_prefix
        self._served = 0
        self._queue: deque[ScriptSource] = deque()
        #: Script source for a request when the queue is empty.
        self.default: Callable[[Recorded], Script] = _codex_like
        #: If set, WebSocket upgrades are refused with this HTTP status and a JSON error body.
        self.upgrade_status: int | None = None
        #: Model ids listed by GET /v1/models.
        self.models: list[str] = ["gpt-5.5"]
        #: Every request and WebSocket turn, in arrival order.
        self.requests: list[Recorded] = []
        #: One record per accepted WebSocket connection.
        self.ws_connections: list[WSConnectionRecord] = []
        #: Handshake headers of every upgrade refused because of `upgrade_status`.
        self.refused_upgrades: list[dict[str, str]] = []
        self._responses: dict[str, _Stored] = {}
        self._global_ids: set[str] = set()
        self._runs: set[Deferred[None]] = set()
        self._waiters = _Waiters()
        self._resource: IResource | None = None
        self._factory: _ConnectionTracker | None = None
        self._port: IListeningPort | None = None

    # --- serving ------------------------------------------------------------------------------

    def resource(self) -> IResource:
        """The root resource: /v1/responses (POST and WebSocket upgrade), /v1/models, and
        POST /v1/chat/completions and /v1/messages (for translated providers)."""
        if self._resource is None:
            v1 = Resource()
            v1.putChild(b"responses", _ResponsesResource(self))
            chat = Resource()
            chat.putChild(b"completions", _ScriptedPostResource(self))
            v1.putChild(b"chat", chat)
            v1.putChild(b"messages", _ScriptedPostResource(self))
            v1.putChild(b"models", _ModelsResource(self))
            root = Resource()
            root.putChild(b"v1", v1)
            self._resource = root
        return self._resource

    def listen(
        self, reactor: IReactorTCP, interface: str = "127.0.0.1", port: int = 0, *, tls: Any = None
    ) -> Deferred[IListeningPort]:
        """Serve `resource()` on a TCP port (0 = any free one); see `base_url`. With `tls`
        (a Twisted TLS context factory, e.g. `PrivateCertificate.options()`) it serves
        https/wss instead."""
        from twisted.internet.endpoints import (
            SSL4ServerEndpoint,
            TCP4ServerEndpoint,
            TCP6ServerEndpoint,
        )

        if self._port is not None:
            raise RuntimeError("FakeUpstream is already listening")
        site = Site(self.resource(), reactor=reactor)
        site.noisy = False
        factory = _ConnectionTracker(site, self)
        self._factory = factory
        if tls is not None:
            self._secure = True
            endpoint: Any = SSL4ServerEndpoint(reactor, port, tls, interface=interface)
        else:
            endpoint_type = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
            endpoint = endpoint_type(reactor, port, interface=interface)

        def listening(listening_port: IListeningPort) -> IListeningPort:
            self._port = listening_port
            return listening_port

        return endpoint.listen(factory).addCallback(listening)

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{'https' if self._secure else 'http'}://{self._authority()}/v1"

    @property
    def ws_url(self) -> str:
        """The Responses WebSocket URL, e.g. ws://127.0.0.1:PORT/v1/responses."""
        return f"{'wss' if self._secure else 'ws'}://{self._authority()}/v1/responses"

    def stop(self) -> Deferred[None]:
        """Stop listening, abort every connection (held ones included) and cancel every script.

        When it fires nothing of the fake is left in the reactor."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            await maybeDeferred(port.stopListening)
        if self._factory is not None:
            for connection in list(self._factory.protocols):
                connection.transport.abortConnection()
        for run in list(self._runs):
            run.cancel()
        await self._waiters.wait(lambda: (self.open_connections == 0, None))

    # --- scripting ----------------------------------------------------------------------------

    def enqueue(self, *scripts: ScriptSource) -> None:
        """Scripts for the next served requests/turns, in order. A callable is called with the
        request's `Recorded` (e.g. `codex_like`). Requests answered with an error instead of a
        script (unknown previous_response_id, invalid frame) do not take one."""
        self._queue.extend(scripts)

    # --- recording ----------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Open HTTP and WebSocket connections on the listening port (for leak checks)."""
        return len(self._factory.protocols) if self._factory is not None else 0

    def wait_for_requests(self, n: int) -> Deferred[list[Recorded]]:
        """Fires with the first `n` requests once that many have arrived."""
        return self._waiters.wait(
            lambda: (len(self.requests) >= n, self.requests[:n]),
        )

    def wait_for_ws_close(self, index: int = 0) -> Deferred[WSConnectionRecord]:
        """Fires with `ws_connections[index]` once that connection has closed."""

        def check() -> tuple[bool, WSConnectionRecord | None]:
            if index < len(self.ws_connections) and self.ws_connections[index].closed:
                return True, self.ws_connections[index]
            return False, None

        return self._waiters.wait(check)

    def wait_for_finished(self, index: int) -> Deferred[Recorded]:
        """Fires with `requests[index]` once its script has ended (also when cancelled)."""

        def check() -> tuple[bool, Recorded | None]:
            if index < len(self.requests) and self.requests[index].finished:
                return True, self.requests[index]
            return False, None

        return self._waiters.wait(check)

    def wait_for_cancelled(self, index: int) -> Deferred[Recorded]:
        """Fires with `requests[index]` once its connection went away before its script ended
        (e.g. a gateway cancelled the upstream request)."""

        def check() -> tuple[bool, Recorded | None]:
            if index < len(self.requests) and self.requests[index].cancelled:
                return True, self.requests[index]
            return False, None

        return self._waiters.wait(check)

    def wait_for_idle(self) -> Deferred[None]:
        """Fires once no connection is open (e.g. after a gateway closed its upstream socket)."""
        return self._waiters.wait(lambda: (self.open_connections == 0, None))

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        """The context the upstream saw for a response: the input items of every turn of the
        previous_response_id chain plus their output items, oldest first."""
        chain: list[_Stored] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None and current not in seen:
            stored = self._responses.get(current)
            if stored is None:
                if current == response_id:
                    raise KeyError(response_id)
                break
            seen.add(current)
            chain.append(stored)
            current = stored.previous_response_id
        return [item for stored in reversed(chain) for item in (*stored.input, *stored.output)]

    # --- internals ----------------------------------------------------------------------------

    def _authority(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not listening")
        address = self._port.getHost()
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{host}:{address.port}"

    @property
    def clock(self) -> IReactorTime:
        """The clock Delay steps wait on; tests may swap in a ``task.Clock`` at any time."""
        return self._time()

    @clock.setter
    def clock(self, value: IReactorTime) -> None:
        self._clock = value

    def _time(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast("IReactorTime", reactor)
        return self._clock

    def _changed(self) -> None:
        self._waiters.changed()

    def _record(self, recorded: Recorded) -> None:
        # Waiters are told by the caller once the request is queued or its script started.
        self.requests.append(recorded)

    def _start(
        self,
        recorded: Recorded,
        sink: _HTTPSink | _WSSink,
        problem: Script | None,
        session: _WSSession | None,
    ) -> Deferred[None]:
        """Run the script for a request/turn; the returned Deferred never fails."""
        run = Deferred.fromCoroutine(self._serve(recorded, sink, problem, session))
        self._runs.add(run)

        def ended(result: None | Failure) -> None:
            self._runs.discard(run)
            recorded.finished = True
            if isinstance(result, Failure):
                if result.check(CancelledError):
                    recorded.cancelled = True
                else:
                    log.failure("fake_upstream_script_failed", result)
                    sink.drop()
            self._changed()

        run.addBoth(ended)
        return run

    async def _serve(
        self,
        recorded: Recorded,
        sink: _HTTPSink | _WSSink,
        problem: Script | None,
        session: _WSSession | None,
    ) -> None:
        script = problem or self._unknown_previous(recorded, session) or self._script_for(recorded)
        sink.use(script, lambda obj: self._observe(obj, recorded, session))
        await play(script.steps, sink, self._time())

    def _script_for(self, recorded: Recorded) -> Script:
        self._served += 1
        recorded.response_id = f"{self._id_prefix}_{self._served}"
        source = self._queue.popleft() if self._queue else self.default
        return source if isinstance(source, Script) else source(recorded)

    def _unknown_previous(self, recorded: Recorded, session: _WSSession | None) -> Script | None:
        """OpenAI's answer to a previous_response_id this upstream cannot see, else None."""
        previous = recorded.body.get("previous_response_id")
        if previous is None or previous == "":
            return None
        if isinstance(previous, str) and (
            previous in self._global_ids or (session is not None and previous in session.local_ids)
        ):
            return None
        error = error_object(
            "previous_response_not_found",
            f"Previous response with id '{previous}' not found.",
            "invalid_request_error",
            param="previous_response_id",
        )
        if recorded.transport == "http":
            return json_response(400, {"error": error})
        return Script((Event({"type": "error", "status": 400, "error": error}),))

    def _observe(self, obj: Any, recorded: Recorded, session: _WSSession | None) -> None:
        """Remember a response the fake delivered: a response.completed event's response, or
        a JSON response object."""
        if not isinstance(obj, dict):
            return
        if obj.get("type") == "response.completed":
            response = obj.get("response")
        elif obj.get("object") == "response":
            response = obj
        else:
            return
        rid = response.get("id") if isinstance(response, dict) else None
        if not isinstance(rid, str):
            return
        output = response.get("output")
        previous = recorded.body.get("previous_response_id")
        self._responses[rid] = _Stored(
            previous if isinstance(previous, str) else None,
            _input_items(recorded.body.get("input")),
            list(output) if isinstance(output, list) else [],
        )
        if recorded.body.get("store") is not False:
            self._global_ids.add(rid)
        elif session is not None:
            session.local_ids.add(rid)


# --- waiting without polling -------------------------------------------------------------------


class _Waiters:
    """Deferreds that fire once a condition on the fake's state holds; re-checked on change."""

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[], tuple[bool, Any]], Deferred[Any]]] = []

    def wait(self, check: Callable[[], tuple[bool, T]]) -> Deferred[T]:
        ready, value = check()
        if ready:
            return succeed(value)
        entry: tuple[Callable[[], tuple[bool, Any]], Deferred[Any]]

        def cancel(_: Deferred[Any]) -> None:
            if entry in self._pending:
                self._pending.remove(entry)

        d: Deferred[T] = Deferred(cancel)
        entry = (check, d)
        self._pending.append(entry)
        return d

    def changed(self) -> None:
        for entry in list(self._pending):
            if entry not in self._pending:
                continue
            ready, value = entry[0]()
            if ready:
                self._pending.remove(entry)
                entry[1].callback(value)


class _ConnectionTracker(WrappingFactory):
    """Wraps the Site so every TCP connection of the listening port is known, whatever protocol
    (HTTP or WebSocket) it ends up running: `stop()` aborts them, `open_connections` counts them."""

    noisy = False

    def __init__(self, site: Site, fake: FakeUpstream) -> None:
        super().__init__(site)
        self.fake = fake
        self.protocol = _TrackedConnection


class _TrackedConnection(ProtocolWrapper):
    """One tracked TCP connection; reports its loss once the wrapped protocol has seen it."""

    factory: _ConnectionTracker

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper claims every interface of the transport; with TLS that includes
        # ISSLTransport, which Autobahn then takes at its word and asks for TLS details this
        # wrapper cannot give. The fake needs none of them.
        directlyProvides(self, providedBy(transport) - ISSLTransport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        try:
            super().connectionLost(reason)
        finally:
            # After the wrapped protocol has handled the loss, so waiters see its effects too.
            self.factory.fake._changed()


# --- HTTP --------------------------------------------------------------------------------------


class _ResponsesResource(Resource):
    """/v1/responses: POST runs a script; a GET upgrade becomes a WebSocket connection."""

    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self._fake = fake
        self._ws = WebSocketResource(_WSFactory(fake))

    def render(self, request: Request) -> bytes | int:
        if request.postpath:
            return _json_error(request, 404, "not_found", "Unknown path.")
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if request.method == b"GET" and upgrade == b"websocket":
            if self._fake.upgrade_status is not None:
                self._fake.refused_upgrades.append(_headers(request))
                return _json_error(
                    request,
                    self._fake.upgrade_status,
                    "websocket_upgrade_refused",
                    "WebSocket mode is not available on this endpoint.",
                )
            return self._ws.render(request)
        if request.method == b"POST":
            self._serve(request)
            return NOT_DONE_YET
        request.setHeader(b"allow", b"POST")
        return _json_error(request, 405, "method_not_allowed", "Use POST.")

    def _serve(self, request: Request) -> None:
        fake = self._fake
        raw = request.content.read() if request.content is not None else b""
        body = _json_object(raw)
        uri = request.uri.decode("latin-1")
        recorded = Recorded(
            transport="http",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            query=urlsplit(uri).query,
            headers=_headers(request),
            body=body if body is not None else {},
            raw=raw,
        )
        fake._record(recorded)
        problem = None
        if body is None:
            problem = json_response(
                400,
                {
                    "error": error_object(
                        "invalid_json", "Body is not a JSON object.", "invalid_request_error"
                    )
                },
            )
        sink = _HTTPSink(request)
        # Registered before the script starts, so a script that ends at once is not misread.
        finished = request.notifyFinish()
        run = fake._start(recorded, sink, problem, None)
        finished.addErrback(lambda _: run.cancel())
        fake._changed()


class _ScriptedPostResource(_ResponsesResource):
    """/v1/chat/completions and /v1/messages: a POST runs the next script, exactly as on
    /v1/responses; there is no WebSocket here."""

    def render(self, request: Request) -> bytes | int:
        if request.postpath:
            return _json_error(request, 404, "not_found", "Unknown path.")
        if request.method == b"POST":
            self._serve(request)
            return NOT_DONE_YET
        request.setHeader(b"allow", b"POST")
        return _json_error(request, 405, "method_not_allowed", "Use POST.")


class _HTTPSink:
    """Plays a script as an HTTP response, writing each step as it comes (nothing buffered)."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._script = Script(())
        self._observe: Callable[[Any], None] = lambda obj: None
        self._started = False
        self._scanner = _DataScanner()
        self._body = bytearray()

    def use(self, script: Script, observe: Callable[[Any], None]) -> None:
        self._script = script
        self._observe = observe

    def _begin(self) -> None:
        if self._started:
            return
        self._started = True
        request = self._request
        request.setResponseCode(self._script.status)
        names = set()
        for name, value in self._script.headers:
            names.add(name.lower())
            request.responseHeaders.addRawHeader(name, value)
        if "content-type" not in names:
            streams = any(isinstance(step, Event) for step in self._script.steps)
            request.setHeader(b"content-type", SSE_CONTENT_TYPE if streams else JSON_CONTENT_TYPE)

    def event(self, text: str) -> None:
        self.raw(sse_block(text))

    def raw(self, data: bytes) -> None:
        self._begin()
        self._request.write(data)
        for payload in self._scanner.feed(data):
            self._observe(_json_object(payload))

    def body(self, data: bytes) -> None:
        self._begin()
        self._request.write(data)
        self._body += data

    def drop(self) -> None:
        channel = self._request.channel
        if channel is not None and channel.transport is not None:
            _drop(channel.transport)

    def close(self, code: int, reason: str) -> None:
        self.end()

    def end(self) -> None:
        self._begin()
        if self._body:
            self._observe(_json_object(bytes(self._body)))
        self._request.finish()


class _DataScanner:
    """Finds the `data:` payloads in an SSE byte stream, so the fake notices which responses it
    completed even when a script writes raw fragments."""

    _LINE_END = re.compile(rb"\r\n|\n|\r")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        payloads = []
        while match := self._LINE_END.search(self._buffer):
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # may be the first half of a CRLF split across writes
            line, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            if not line:
                if self._data:
                    payloads.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return payloads


class _ModelsResource(Resource):
    """GET /v1/models, in OpenAI's list shape."""

    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self._fake = fake

    def render_GET(self, request: Request) -> bytes:
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "cch-fake"}
            for model in self._fake.models
        ]
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"object": "list", "data": data}).encode()


# --- WebSocket ---------------------------------------------------------------------------------


class _WSProtocol(WebSocketServerProtocol):
    """Turns WebSocket callbacks into calls on a `_WSSession`."""

    factory: _WSFactory
    _session: _WSSession | None = None
    _headers: dict[str, str]
    _got_close_frame = False

    def onConnect(self, request: ConnectionRequest) -> None:
        self._headers = {name.lower(): value for name, value in request.headers.items()}

    def onOpen(self) -> None:
        fake = self.factory.fake
        record = WSConnectionRecord(headers=self._headers, opened_at_index=len(fake.requests))
        fake.ws_connections.append(record)
        query = urlsplit(self.http_request_uri or "").query
        self._session = _WSSession(fake, record, len(fake.ws_connections) - 1, query, self)
        fake._changed()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._session is not None:
            self._session.received(payload, isBinary)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        self._got_close_frame = True
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._session is not None:
            peer_code = (self.remoteCloseCode or 1005) if self._got_close_frame else None
            self._session.lost(peer_code)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        # Autobahn leaves this timer running when the peer never answers our close frame.
        cancel_close_timer(self)


class _WSFactory(WebSocketServerFactory):
    """Builds one thin protocol per connection; accepts permessage-deflate when offered."""

    protocol = _WSProtocol

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__(server="cch-fake-upstream")
        self.fake = fake
        self.setProtocolOptions(perMessageCompressionAccept=_accept_deflate)


class _WSSession:
    """One WebSocket connection's turns: run one at a time, in order; its store=false cache."""

    def __init__(
        self,
        fake: FakeUpstream,
        record: WSConnectionRecord,
        index: int,
        query: str,
        protocol: _WSProtocol,
    ) -> None:
        self._fake = fake
        self._record = record
        self._index = index
        self._query = query
        self._protocol = protocol
        self._queue: deque[tuple[Recorded, Script | None]] = deque()
        self._current: Deferred[None] | None = None
        self.closing = False
        self.local_ids: set[str] = set()

    def received(self, payload: bytes, is_binary: bool) -> None:
        frame = None if is_binary else _json_object(payload)
        recorded = Recorded(
            transport="websocket",
            method="GET",
            path="/v1/responses",
            query=self._query,
            headers=dict(self._record.headers),
            body=frame if frame is not None else {},
            raw=payload,
            connection_index=self._index,
        )
        self._record.turns.append(recorded)
        problem = None
        if frame is None or frame.get("type") != "response.create":
            error = error_object(
                "invalid_request",
                "Expected a JSON text frame of type response.create.",
                "invalid_request_error",
            )
            problem = Script((Event({"type": "error", "status": 400, "error": error}),))
        self._queue.append((recorded, problem))
        self._fake._record(recorded)
        self._pump()
        self._fake._changed()

    def _pump(self) -> None:
        if self._current is not None or self.closing or not self._queue:
            return
        recorded, problem = self._queue.popleft()
        self._current = self._fake._start(recorded, _WSSink(self), problem, self)
        self._current.addCallback(self._turn_ended)

    def _turn_ended(self, _: None) -> None:
        self._current = None
        self._pump()

    def lost(self, close_code: int | None) -> None:
        self.closing = True
        self._record.closed = True
        self._record.close_code = close_code
        for recorded, _ in self._queue:
            recorded.cancelled = recorded.finished = True
        self._queue.clear()
        if self._current is not None:
            self._current.cancel()
        self._fake._changed()

    def send(self, data: bytes) -> bool:
        """Send one text message unless the connection is going away; say whether it was sent."""
        if self.closing or self._protocol.state != WebSocketServerProtocol.STATE_OPEN:
            return False
        self._protocol.sendMessage(data, isBinary=False)
        return True

    def drop(self) -> None:
        self.closing = True
        if self._protocol.transport is not None:
            _drop(self._protocol.transport)

    def close(self, code: int, reason: str) -> None:
        self.closing = True
        # sendCloseFrame, not sendClose: scripts may send any code (1011 included).
        self._protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode() or None)


class _WSSink:
    """Plays a script as WebSocket messages: one text message per event/raw/body step."""

    def __init__(self, session: _WSSession) -> None:
        self._session = session
        self._observe: Callable[[Any], None] = lambda obj: None

    def use(self, script: Script, observe: Callable[[Any], None]) -> None:
        self._observe = observe

    def event(self, text: str) -> None:
        self.raw(text.encode("utf-8"))

    def raw(self, data: bytes) -> None:
        if self._session.send(data):
            self._observe(_json_object(data))

    def body(self, data: bytes) -> None:
        self.raw(data)

    def drop(self) -> None:
        self._session.drop()

    def close(self, code: int, reason: str) -> None:
        self._session.close(code, reason)

    def end(self) -> None:
        pass


def _accept_deflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


# --- helpers -----------------------------------------------------------------------------------


def _drop(transport: Any) -> None:
    """Abort a connection the way a crashing server does: no close frame, no chunk terminator,
    a TCP RST; but only after what the script wrote before has gone out, so "drop after n
    events" really delivers n events (a bare abortConnection() discards unsent writes)."""
    try:
        transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    except (AttributeError, OSError):
        transport.abortConnection()  # not a socket (e.g. an in-memory transport)
        return
    transport.loseConnection()


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _input_items(value: object) -> list[dict[str, Any]]:
    """A request's `input` as a list of items (a bare string is one user message)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return []


def _headers(request: Request) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def _json_error(request: Request, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    error = error_object(code, message, "invalid_request_error")
    return json.dumps({"error": error}).encode()
