"""The HTTP surface on one port: ``/v1/responses`` (POST and WebSocket upgrade),
``/v1/models``, ``/healthz``, ``/readyz``. Every error is OpenAI-shaped JSON."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from cch import secret as markers
from cch.adapters import request_gone
from cch.config import LimitsConfig
from cch.drain import Drain
from cch.edge.factory import EdgeFactory
from cch.edge.protocol import EdgeProtocol
from cch.handler import errors
from cch.handler.auth import KeyRing, token_matches
from cch.handler.pipeline import ResponsesHandler
from cch.handler.routing import ProviderRouter
from cch.headers import lower_headers, without_reserved
from cch.jsoncodec import dumps, loads
from cch.keylimits import ConnectionLease, KeyLimiter, Refused
from cch.logs import mask_query
from cch.metrics import Metrics
from cch.sse import encode_event
from cch.turn import RequestContext
from cch.writes import BatchedWriter

log = Logger()

DRAINING_BODY = errors.error_body("The gateway is shutting down.", "service_unavailable_error", "draining")
# The same error as the terminal event of an SSE response the drain deadline cuts short.
DRAINING_EVENT = encode_event(dumps({"type": "error", **loads(DRAINING_BODY)}))


def json_answer(request: Request, status: int, body: bytes | dict[str, Any]) -> bytes:
    """Set the status and JSON content type; the body to return from ``render``."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    if isinstance(body, dict):
        body = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return body


class JsonResource(Resource):
    """A resource whose every answer, an unsupported method included, is JSON."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        method = request.method.decode("ascii", errors="replace")
        handler = getattr(self, f"render_{method}", None)
        if handler is None and method == "HEAD":
            handler = getattr(self, "render_GET", None)
        if handler is None:
            allowed = sorted(name[len("render_"):] for name in dir(self) if name.startswith("render_"))
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return json_answer(
                request,
                405,
                errors.error_body(f"Method {method} is not allowed here.", "invalid_request_error", "method_not_allowed"),
            )
        return handler(request)


class HttpResponseSink(BatchedWriter):
    """Writes a handler's response to a plain HTTP request: SSE events or one JSON body.

    The upstream's producer registered here is paused while the client does not read
    (:meth:`pause`, from :class:`HttpTurn`), and starts paused if registered meanwhile.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.started = False
        self.sse = False
        self.paused = False
        self.producer: IPushProducer | None = None

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
        self.sse = True
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")

    def sse_event(self, data: str, kind: str | None = None) -> None:
        # The events of one upstream read go out as one chunk (cch.writes).
        self.write_batched(encode_event(data))

    def write_now(self, data: bytes) -> None:
        self.request.write(data)

    def json_body(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.flush_writes()
        self.started = True
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode("latin-1") or b"application/json")
        for name, value in (headers or {}).items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        request.write(body)

    def register_producer(self, producer: IPushProducer) -> None:
        self.producer = producer
        if self.paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self.producer = None

    def pause(self) -> None:
        """The client stopped reading: so does the upstream."""
        self.paused = True
        if self.producer is not None:
            self.producer.pauseProducing()

    def resume(self) -> None:
        self.paused = False
        if self.producer is not None:
            self.producer.resumeProducing()


@implementer(IPushProducer)
class HttpTurn:
    """One ``POST /v1/responses`` in flight, and the one place where it ends.

    It is the push producer on the request for the turn's whole life, as
    :class:`cch.edge.connection.EdgeConnection` is on a WebSocket: when the client stops
    reading, Twisted pauses it and it pauses the upstream (through the sink), so backpressure
    reaches the upstream. The upstream's stall watchdog pauses with it, so a client that reads
    nothing for ``limits.outbound_send_timeout`` would hold the turn forever: at that deadline
    the upstream request is aborted and the client connection cut, as a WebSocket client is
    closed (docs/configuration.md).

    Every end (done, failed, the client gone, the send deadline, the drain deadline) goes
    through :meth:`_end`, which counts the turn once and drops it from the registry.
    """

    def __init__(
        self,
        request: Request,
        sink: HttpResponseSink,
        *,
        clock: IReactorTime,
        send_timeout: float,
        metrics: Metrics,
        request_id: str,
        on_end: Callable[[HttpTurn], None],
    ) -> None:
        self.request = request
        self.sink = sink
        self.clock = clock
        self.send_timeout = send_timeout
        self.metrics = metrics
        self.request_id = request_id
        self._on_end = on_end
        self.deferred: Deferred[None] | None = None
        self.outcome: str | None = None  # completed / cancelled / failed, once it ended
        self.paused = False
        self._deadline: IDelayedCall | None = None

    def start(self, d: Deferred[None]) -> None:
        """Follow the handler's Deferred ``d``; cancelling it aborts the upstream."""
        self.deferred = d
        self.request.notifyFinish().addErrback(self._client_gone)
        d.addCallbacks(self._completed, self._failed)

    # -- flow control (IPushProducer, registered on the request) ---------------------------

    def pauseProducing(self) -> None:
        if self.paused or self.outcome is not None:
            return
        self.paused = True
        self.sink.pause()
        self._deadline = self.clock.callLater(self.send_timeout, self._send_timed_out)

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self._cancel_deadline()
        if self.outcome is None:
            self.sink.resume()

    def stopProducing(self) -> None:
        self._client_gone(None)

    # -- the ends ---------------------------------------------------------------------------

    def _end(self, outcome: str) -> bool:
        """Account for the turn; False if it had already ended."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self._cancel_deadline()
        self.sink.unregister_producer()
        self.metrics.http_turn(outcome)
        self._on_end(self)
        return True

    def _cancel_deadline(self) -> None:
        call, self._deadline = self._deadline, None
        if call is not None and call.active():
            call.cancel()

    def _release_request(self) -> None:
        """Unregister from the request before its response ends (Twisted insists)."""
        request = self.request
        if request.producer is self and not request_gone(request):
            request.unregisterProducer()

    def _completed(self, _: object) -> None:
        if self._end("completed"):
            self._release_request()
            ResponsesResource._finished(self.request, self.sink)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            self._end("cancelled")  # we cancelled it: whoever did has answered the client
            return
        if not self._end("failed"):
            return
        request = self.request
        if request_gone(request):
            return
        log.failure("http_handler_error", failure, request_id=self.request_id)
        self._release_request()
        if not self.sink.started:
            request.write(json_answer(request, 500, errors.INTERNAL_ERROR))
            request.finish()
        else:
            # Half a response was sent: break the connection so the client sees it as broken.
            request.channel.transport.abortConnection()

    def _client_gone(self, _: object) -> None:
        if self._end("cancelled") and self.deferred is not None:
            self.deferred.cancel()

    def _send_timed_out(self) -> None:
        self._deadline = None
        if not self._end("cancelled"):
            return
        log.warn("http_send_timeout", timeout=self.send_timeout, request_id=self.request_id)
        if self.deferred is not None:
            self.deferred.cancel()
        channel = self.request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def cut_short(self) -> None:
        """Draining: cancel the turn and end its response cleanly with the ``draining`` error,
        a terminal SSE ``error`` event when the stream has started, else a 503."""
        if not self._end("cancelled"):
            return
        if self.deferred is not None:
            self.deferred.cancel()
        request = self.request
        if request_gone(request) or request.finished:
            return
        sink = self.sink
        sink.flush_writes()
        self._release_request()
        if sink.sse:
            request.write(DRAINING_EVENT)
        elif not sink.started:
            request.write(json_answer(request, 503, DRAINING_BODY))
        request.finish()


class HttpTurns:
    """``POST /v1/responses``: each request becomes an :class:`HttpTurn` on the handler, and
    every one in flight is known, so the drain deadline can cut them short."""

    def __init__(
        self,
        handler: ResponsesHandler,
        *,
        drain: Drain,
        limits: LimitsConfig,
        secret: str,
        clock: IReactorTime,
        metrics: Metrics,
    ) -> None:
        self.handler = handler
        self.drain = drain
        self.limits = limits
        self.secret = secret  # the HTTP tunnel's: its requests carry a WebSocket client's markers
        self.clock = clock  # send deadlines
        self.metrics = metrics
        self.live: set[HttpTurn] = set()

    def render(self, request: Request) -> Any:
        if self.drain.draining:
            return json_answer(request, 503, DRAINING_BODY)
        content = request.content
        content.seek(0, 2)
        if content.tell() > self.limits.max_request_body_bytes:
            return json_answer(request, 413, errors.error_body("Request body too large.", "invalid_request_error", "request_too_large"))
        content.seek(0)
        try:
            body = loads(content.read())
        except ValueError as exc:
            return json_answer(request, *errors.invalid_request(f"Invalid JSON body: {exc}", "invalid_json"))
        if not isinstance(body, dict):
            return json_answer(request, *errors.invalid_request("The body must be a JSON object.", "invalid_json"))
        headers = lower_headers(request.requestHeaders)
        ctx = RequestContext(headers=without_reserved(headers))
        ctx.request_id = uuid.uuid4().hex
        if markers.is_websocket_client(headers, self.secret):
            ctx.via_websocket = True
            ctx.ws_session = markers.session_id_from(headers)
            turn_id = headers.get(markers.REQUEST_ID, "")
            if turn_id.isalnum() and len(turn_id) <= 64:
                ctx.request_id = turn_id
        sink = HttpResponseSink(request)
        turn = HttpTurn(
            request,
            sink,
            clock=self.clock,
            send_timeout=self.limits.outbound_send_timeout,
            metrics=self.metrics,
            request_id=ctx.request_id,
            on_end=self.live.discard,
        )
        self.live.add(turn)
        request.registerProducer(turn, True)
        turn.start(self.handler.handle(ctx, body, sink))
        return NOT_DONE_YET

    def cut_short(self) -> None:
        """The drain deadline passed: end every HTTP POST turn in flight, plain clients' and
        the HTTP tunnel's alike; the upstream is aborted and each response ends cleanly with
        the ``draining`` error (docs/operations.md)."""
        turns = list(self.live)
        if turns:
            log.info("http_turns_cancelled", reason="draining", count=len(turns))
        for turn in turns:
            turn.cut_short()


class UpgradeResource(JsonResource):
    """``/v1/responses`` for WebSocket upgrades: refused 503 while draining, 401 without a
    valid key, 426 when WebSocket mode is off (here or for the key), 429 beyond the key's
    ``max_connections``; the rest go to the edge, holding their place under the key's limit
    until the connection is lost."""

    def __init__(
        self,
        edge_factory: EdgeFactory,
        *,
        keys: KeyRing,
        drain: Drain,
        websocket_enabled: bool,
        limiter: KeyLimiter | None = None,
    ) -> None:
        super().__init__()
        self.keys = keys
        self.drain = drain
        self.websocket_enabled = websocket_enabled
        self.limiter = limiter
        self.ws_resource = WebSocketResource(edge_factory)

    def render(self, request: Request) -> Any:
        if request.postpath:
            return json_answer(request, 404, errors.error_body("Not found.", "invalid_request_error", "not_found"))
        return super().render(request)

    def render_GET(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"allow", b"POST")
            return json_answer(
                request,
                405,
                errors.error_body(
                    "Use POST, or a WebSocket upgrade, on /v1/responses.",
                    "invalid_request_error",
                    "method_not_allowed",
                ),
            )
        return self._upgrade(request)

    def _upgrade(self, request: Request) -> Any:
        path = mask_query(request.uri)
        if self.drain.draining:
            log.info("ws_upgrade_refused", status=503, reason="draining", path=path)
            return json_answer(request, 503, DRAINING_BODY)
        headers = lower_headers(request.requestHeaders)
        allowed, key = self.keys.authenticate(headers)
        if not allowed:
            log.info("ws_upgrade_refused", status=401, reason="invalid_api_key", path=path)
            request.setHeader(b"www-authenticate", b'Bearer realm="cch"')
            return json_answer(request, *errors.unauthorized())
        if not self.websocket_enabled or (key is not None and not key.websocket):
            log.info("ws_upgrade_refused", status=426, reason="websocket_disabled", path=path)
            request.setHeader(b"upgrade", b"websocket")
            return json_answer(
                request,
                426,
                errors.error_body(
                    "WebSocket mode is disabled here; use HTTP POST /v1/responses.",
                    "invalid_request_error",
                    "websocket_disabled",
                ),
            )
        if self.limiter is None or key is None:
            return self.ws_resource.render(request)
        admitted = self.limiter.open_connection(key)
        answered: list[Any] = []
        admitted.addCallback(answered.append)
        if answered:  # the memory store answers at once
            return self._admitted(request, answered[0], path)
        # A networked store answers later: the upgrade (or the 429) happens then.
        request.notifyFinish().addErrback(lambda _: admitted.cancel())
        admitted.addCallback(lambda outcome: self._admitted_later(request, outcome, path))
        admitted.addErrback(lambda failure: self._admission_failed(request, failure))
        return NOT_DONE_YET

    def _admitted(self, request: Request, outcome: Refused | ConnectionLease, path: str) -> Any:
        if isinstance(outcome, Refused):
            log.info("ws_upgrade_refused", status=outcome.status, reason=outcome.reason, path=path)
            for name, value in outcome.headers():
                request.setHeader(name, value)
            return json_answer(request, outcome.status, outcome.json_body())
        transport = request.channel.transport
        result = self.ws_resource.render(request)
        protocol = getattr(transport, "protocol", None)
        if isinstance(protocol, EdgeProtocol):
            protocol.hold(outcome.release)  # given back when the connection is lost
        else:
            outcome.release()  # the upgrade did not happen
        return result

    def _admitted_later(self, request: Request, outcome: Refused | ConnectionLease, path: str) -> None:
        if request.finished or request_gone(request):
            if isinstance(outcome, ConnectionLease):
                outcome.release()
            return
        body = self._admitted(request, outcome, path)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _admission_failed(self, request: Request, failure: Failure) -> None:
        if failure.check(CancelledError) or request.finished or request_gone(request):
            return
        log.failure("ws_admission_failed", failure)
        request.write(json_answer(request, 503, errors.error_body("The limits store did not answer.", "service_unavailable_error", "limits_unavailable")))
        request.finish()


class ResponsesResource(UpgradeResource):
    """``/v1/responses``: a WebSocket upgrade goes to the edge, a POST to :class:`HttpTurns`."""

    def __init__(
        self,
        edge_factory: EdgeFactory,
        turns: HttpTurns,
        *,
        keys: KeyRing,
        drain: Drain,
        websocket_enabled: bool,
        limiter: KeyLimiter | None = None,
    ) -> None:
        super().__init__(edge_factory, keys=keys, drain=drain, websocket_enabled=websocket_enabled, limiter=limiter)
        self.turns = turns

    def render_POST(self, request: Request) -> Any:
        return self.turns.render(request)

    @staticmethod
    def _finished(request: Request, sink: HttpResponseSink) -> None:
        sink.flush_writes()  # the last events of a batch go before the end of the body
        if not request.finished and not request_gone(request):
            request.finish()


class ModelsResource(JsonResource):
    def __init__(self, keys: KeyRing, router: ProviderRouter) -> None:
        super().__init__()
        self.keys = keys
        self.router = router

    def render_GET(self, request: Request) -> bytes:
        allowed, _ = self.keys.authenticate(lower_headers(request.requestHeaders))
        if not allowed:
            return json_answer(request, *errors.unauthorized())
        data = [{"id": m, "object": "model", "owned_by": "cch"} for m in self.router.models()]
        return json_answer(request, 200, {"object": "list", "data": data})


class HealthResource(JsonResource):
    def render_GET(self, request: Request) -> bytes:
        return json_answer(request, 200, {"status": "ok"})


class ReadyResource(JsonResource):
    """``GET /readyz``: 503 while draining, else 200 with the state of what the replica shares
    (``stores()``: Redis, the usage database). A store that is down does not fail readiness:
    every replica shares it, and taking them all out of rotation would turn the clean errors
    the gateway answers meanwhile into connection failures (docs/scaling.md)."""

    def __init__(self, drain: Drain, stores: Callable[[], dict[str, str]] = dict) -> None:
        super().__init__()
        self.drain = drain
        self.stores = stores

    def render_GET(self, request: Request) -> bytes:
        status = "draining" if self.drain.draining else "ready"
        return json_answer(request, 503 if self.drain.draining else 200, {"status": status, **self.stores()})


class MetricsResource(JsonResource):
    """``GET /metrics``: with ``admin_token`` only for a request that presents it; without one,
    open when ``open_without_token`` (its own loopback listener, or a main port with no client
    keys: the loopback-only gateway is open anyway), else closed."""

    def __init__(self, metrics: Metrics, *, admin_token: str | None = None, open_without_token: bool = False) -> None:
        super().__init__()
        self.metrics = metrics
        self.admin_token = admin_token
        self.open_without_token = open_without_token

    def render_GET(self, request: Request) -> bytes:
        if not self._allowed(request):
            return json_answer(
                request,
                403,
                errors.error_body(
                    "Metrics need 'Authorization: Bearer <server.admin_token>' here, "
                    "or a separate server.metrics_listen endpoint.",
                    "permission_error",
                    "metrics_forbidden",
                ),
            )
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()

    def _allowed(self, request: Request) -> bool:
        if self.admin_token is None:
            return self.open_without_token
        return token_matches(lower_headers(request.requestHeaders), self.admin_token)


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return json_answer(request, 404, errors.error_body("Not found.", "invalid_request_error", "not_found"))


class _Dir(Resource):
    """A path segment whose unknown children answer JSON 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


def build_root(
    responses: UpgradeResource,
    *,
    models: ModelsResource | None = None,
    ready: ReadyResource | None = None,
    metrics: MetricsResource | None = None,
    usage: Resource | None = None,
) -> Resource:
    """The main port's tree around its resources; an endpoint not given answers JSON 404 (the
    conformance echo edge serves only upgrades). ``usage`` is ``/admin/usage``."""
    root = _Dir()
    v1 = _Dir()
    admin = _Dir()
    root.putChild(b"v1", v1)
    root.putChild(b"admin", admin)
    v1.putChild(b"responses", responses)
    root.putChild(b"healthz", HealthResource())
    for parent, name, child in (
        (v1, b"models", models),
        (root, b"readyz", ready),
        (root, b"metrics", metrics),
        (admin, b"usage", usage),
    ):
        if child is not None:
            parent.putChild(name, child)
    return root


def build_metrics_root(metrics: MetricsResource) -> Resource:
    """The tree of the separate metrics listener: only ``/metrics``."""
    root = _Dir()
    root.putChild(b"metrics", metrics)
    return root
