"""The HTTP surface on one port: ``/v1/responses`` (POST and WebSocket upgrade),
``/v1/models``, ``/healthz``, ``/readyz``. Every error is OpenAI-shaped JSON."""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from cch import secret as markers
from cch.edge.factory import EdgeFactory
from cch.handler import errors
from cch.handler.auth import KeyRing, presented_key
from cch.handler.pipeline import ResponsesHandler
from cch.handler.routing import ProviderRouter
from cch.jsoncodec import loads
from cch.logs import mask_query
from cch.metrics import Metrics
from cch.sse import encode_event
from cch.tunnel import REQUEST_ID
from cch.turn import RequestContext
from cch.writes import BatchedWriter

log = Logger()


def _lower_headers(request: Request) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def _json(request: Request, status: int, body: bytes | dict[str, Any]) -> bytes:
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
            return _json(
                request,
                405,
                errors.error_body(f"Method {method} is not allowed here.", "invalid_request_error", "method_not_allowed"),
            )
        return handler(request)


class HttpResponseSink(BatchedWriter):
    """Writes a handler's response to a plain HTTP request: SSE events or one JSON body."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.started = False
        self.producer: IPushProducer | None = None

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
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

    def json_body(self, status: int, body: bytes, content_type: str) -> None:
        self.flush_writes()
        self.started = True
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode("latin-1") or b"application/json")
        request.write(body)

    def register_producer(self, producer: IPushProducer) -> None:
        if self.producer is None and not self.request.finished:
            self.producer = producer
            self.request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if self.producer is not None:
            self.producer = None
            if not self.request.finished:
                self.request.unregisterProducer()


class ResponsesResource(JsonResource):
    """``/v1/responses``: POST runs the pipeline; a WebSocket upgrade goes to the edge."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.ws_resource = WebSocketResource(gateway.edge_factory)

    def render(self, request: Request) -> Any:
        if request.postpath:
            return _json(request, 404, errors.error_body("Not found.", "invalid_request_error", "not_found"))
        return super().render(request)

    def render_GET(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"allow", b"POST")
            return _json(
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
        gateway = self.gateway
        path = mask_query(request.uri)
        if gateway.draining:
            log.info("ws_upgrade_refused", status=503, reason="draining", path=path)
            return _json(
                request, 503, errors.error_body("The gateway is shutting down.", "service_unavailable_error", "draining")
            )
        headers = _lower_headers(request)
        allowed, key = gateway.keys.authenticate(headers)
        if not allowed:
            log.info("ws_upgrade_refused", status=401, reason="invalid_api_key", path=path)
            request.setHeader(b"www-authenticate", b'Bearer realm="cch"')
            return _json(request, *errors.unauthorized())
        if not gateway.websocket_enabled or (key is not None and not key.websocket):
            log.info("ws_upgrade_refused", status=426, reason="websocket_disabled", path=path)
            request.setHeader(b"upgrade", b"websocket")
            return _json(
                request,
                426,
                errors.error_body(
                    "WebSocket mode is disabled here; use HTTP POST /v1/responses.",
                    "invalid_request_error",
                    "websocket_disabled",
                ),
            )
        return self.ws_resource.render(request)

    def render_POST(self, request: Request) -> Any:
        gateway = self.gateway
        if gateway.draining:
            return _json(
                request, 503, errors.error_body("The gateway is shutting down.", "service_unavailable_error", "draining")
            )
        content = request.content
        content.seek(0, 2)
        if content.tell() > gateway.limits.max_request_body_bytes:
            return _json(request, 413, errors.error_body("Request body too large.", "invalid_request_error", "request_too_large"))
        content.seek(0)
        try:
            body = loads(content.read())
        except ValueError as exc:
            return _json(request, *errors.invalid_request(f"Invalid JSON body: {exc}", "invalid_json"))
        if not isinstance(body, dict):
            return _json(request, *errors.invalid_request("The body must be a JSON object.", "invalid_json"))
        headers = _lower_headers(request)
        ctx = RequestContext(headers={k: v for k, v in headers.items() if not markers.is_reserved(k)})
        ctx.request_id = uuid.uuid4().hex
        if markers.is_websocket_client(headers, gateway.secret):
            ctx.via_websocket = True
            ctx.ws_session = markers.session_id_from(headers)
            turn_id = headers.get(REQUEST_ID, "")
            if turn_id.isalnum() and len(turn_id) <= 64:
                ctx.request_id = turn_id
        sink = HttpResponseSink(request)
        d = gateway.handler.handle(ctx, body, sink)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(lambda _: self._finished(request, sink), lambda f: self._failed(request, sink, f))
        return NOT_DONE_YET

    @staticmethod
    def _finished(request: Request, sink: HttpResponseSink) -> None:
        sink.flush_writes()  # the last events of a batch go before the end of the body
        if not request.finished and not request._disconnected:
            request.finish()

    @staticmethod
    def _failed(request: Request, sink: HttpResponseSink, failure: Failure) -> None:
        if failure.check(CancelledError) or request._disconnected:
            return
        log.failure("http_handler_error", failure)
        if not sink.started:
            request.write(_json(request, 500, errors.error_body("Internal error.", "server_error", "internal_error")))
            request.finish()
        else:
            # Half a response was sent: break the connection so the client sees it as broken.
            request.channel.transport.abortConnection()


class ModelsResource(JsonResource):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request: Request) -> bytes:
        allowed, _ = self.gateway.keys.authenticate(_lower_headers(request))
        if not allowed:
            return _json(request, *errors.unauthorized())
        data = [{"id": m, "object": "model", "owned_by": "cch"} for m in self.gateway.router.models()]
        return _json(request, 200, {"object": "list", "data": data})


class HealthResource(JsonResource):
    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class ReadyResource(JsonResource):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request: Request) -> bytes:
        if self.gateway.draining:
            return _json(request, 503, {"status": "draining"})
        return _json(request, 200, {"status": "ready"})


class MetricsResource(JsonResource):
    """``GET /metrics``: open on its own listener; on the main port it needs the admin token
    (or, with no client keys configured, the loopback-only gateway is open anyway)."""

    def __init__(self, gateway: Gateway, *, open_access: bool = False) -> None:
        super().__init__()
        self.gateway = gateway
        self.open_access = open_access

    def render_GET(self, request: Request) -> bytes:
        if not self.open_access and not self._allowed(request):
            return _json(
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
        return self.gateway.metrics.render()

    def _allowed(self, request: Request) -> bool:
        token = self.gateway.admin_token
        if token is None:
            return not self.gateway.keys.required
        presented = presented_key(_lower_headers(request))
        return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, errors.error_body("Not found.", "invalid_request_error", "not_found"))


class _Dir(Resource):
    """A path segment whose unknown children answer JSON 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return NotFound().render(request)


class Gateway:
    """What the web resources need from the running service."""

    def __init__(
        self,
        *,
        keys: KeyRing,
        router: ProviderRouter,
        handler: ResponsesHandler,
        edge_factory: EdgeFactory,
        limits: Any,
        secret: str,
        websocket_enabled: bool,
        metrics: Metrics,
        admin_token: str | None = None,
    ) -> None:
        self.keys = keys
        self.router = router
        self.handler = handler
        self.edge_factory = edge_factory
        self.limits = limits
        self.secret = secret
        self.websocket_enabled = websocket_enabled
        self.metrics = metrics
        self.admin_token = admin_token
        self.draining = False


def build_root(gateway: Gateway) -> Resource:
    root = _Dir()
    v1 = _Dir()
    root.putChild(b"v1", v1)
    v1.putChild(b"responses", ResponsesResource(gateway))
    v1.putChild(b"models", ModelsResource(gateway))
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(gateway))
    root.putChild(b"metrics", MetricsResource(gateway))
    return root


def build_metrics_root(gateway: Gateway) -> Resource:
    """The tree of the separate metrics listener: only ``/metrics``, no auth."""
    root = _Dir()
    root.putChild(b"metrics", MetricsResource(gateway, open_access=True))
    return root

