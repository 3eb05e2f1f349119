"""One OpenTelemetry span per turn, with a child per upstream attempt (docs/tracing.md).

Off by default (``[tracing] enabled``). Off, nothing here is made and nothing of OpenTelemetry is
imported: the pipeline asks ``self.tracer is not None`` once per turn, and the rest of the turn
sees ``meter.trace is None``. On, :class:`TracingService` owns the SDK's tracer provider
(exporting over OTLP/HTTP as the standard ``OTEL_*`` variables say) and hands the pipeline a
:class:`TurnTracer`. Each turn gets a :class:`TurnSpan`, which the turn's
:class:`~cch.handler.metering.TurnMeter` ends with the usage row — the one moment every turn
reaches, however it ended — so no span is left open. Times are the gateway's clock, as the row's.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from cch.usage.rows import UsageRow

log = Logger()

# Where Codex puts a WebSocket turn's W3C trace context: in the body, since a WebSocket has one
# handshake for many turns (codex-api: WS_REQUEST_HEADER_TRACEPARENT_CLIENT_METADATA_KEY).
TRACEPARENT_METADATA = "ws_request_header_traceparent"
TRACESTATE_METADATA = "ws_request_header_tracestate"

TURN_SPAN = "cch.turn"
ATTEMPT_SPAN = "cch.upstream_attempt"
FALLBACK_EVENT = "upstream_ws_fallback"
RETRY_EVENT = "upstream_retry"

# How an attempt ended (``cch.outcome``).
SERVED = "served"  # its response (whatever it said) went to the client
FALLBACK = "fallback"  # the upstream WebSocket failed before its first event: HTTP follows
RETRIED = "retried"  # sent again (``cch.reason`` connection_limit or previous_lost)
NOT_RESENT = "not_resent"  # the socket ended after the provider may have taken the turn
FAILED = "failed"  # the provider failed (unreachable, 429, 5xx): the next provider may serve
ABANDONED = "abandoned"  # another attempt began without this one saying how it ended

# The usage row's columns a turn span carries, each as ``cch.<column>`` (docs/usage.md).
ROW_ATTRIBUTES = (
    "request_id",
    "response_id",
    "key",
    "provider",
    "model_requested",
    "model_served",
    "client_transport",
    "upstream_transport",
    "status",
    "error_code",
    "attempts",
    "replayed",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "first_event_ms",
)
ERROR_STATUSES = frozenset({"error", "failed"})
CUT_STATUSES = frozenset({"cancelled", "drained"})

SERVICE_NAME = "cch"  # unless OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES)
SHUTDOWN_TIMEOUT = 5.0  # seconds stopService waits for the last spans to be exported

_REQUIRED = (
    "opentelemetry.trace",
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


def missing_packages() -> str | None:
    """Why tracing cannot be turned on here (the ``otel`` extra is not installed), or None."""
    for name in _REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            return (
                f"needs OpenTelemetry, which is not installed ({name} cannot be imported): "
                "pip install 'cch[otel]', or turn tracing off"
            )
    return None


def _ns(seconds: float) -> int:
    """The SDK's timestamps: integer nanoseconds since the epoch."""
    return round(seconds * 1_000_000_000)


class TurnTracer:
    """Starts each turn's span; the pipeline's only handle on OpenTelemetry."""

    def __init__(self, clock: IReactorTime) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import (
            SpanKind,
            Status,
            StatusCode,
            get_current_span,
            set_span_in_context,
        )
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.clock = clock
        self.tracer: Any = None  # the SDK's Tracer, while the service runs
        self._root = Context()  # no parent: never whatever context happens to be current
        self._propagator = TraceContextTextMapPropagator()
        self._current_span = get_current_span
        self._in_context = set_span_in_context
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._status, self._error_code = Status, StatusCode.ERROR

    def use(self, tracer: Any) -> None:
        self.tracer = tracer

    def turn(
        self, headers: Mapping[str, str], body: Mapping[str, Any], started_at: float
    ) -> TurnSpan | None:
        """The span of a turn that started at ``started_at`` (the meter's clock); None while
        the service is stopped."""
        if self.tracer is None:
            return None
        span = self.tracer.start_span(
            TURN_SPAN,
            context=self.parent(headers, body),
            kind=self._server,
            start_time=_ns(started_at),
        )
        return TurnSpan(self, span)

    def parent(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> Any:
        """The W3C trace context the client sent: Codex's ``client_metadata`` keys first (a
        WebSocket turn), else the ``traceparent``/``tracestate`` headers; else a new trace."""
        metadata = body.get("client_metadata")
        if isinstance(metadata, dict):
            traceparent = metadata.get(TRACEPARENT_METADATA)
            if isinstance(traceparent, str):
                carrier = {"traceparent": traceparent}
                tracestate = metadata.get(TRACESTATE_METADATA)
                if isinstance(tracestate, str):
                    carrier["tracestate"] = tracestate
                context = self._extract(carrier)
                if context is not None:
                    return context
        if "traceparent" in headers:
            context = self._extract(headers)
            if context is not None:
                return context
        return self._root

    def _extract(self, carrier: Mapping[str, str]) -> Any:
        context = self._propagator.extract(carrier, self._root)
        return context if self._current_span(context).get_span_context().is_valid else None

    def child(self, parent: Any, attributes: dict[str, Any]) -> Any:
        return self.tracer.start_span(
            ATTEMPT_SPAN,
            context=self._in_context(parent),
            kind=self._client,
            attributes=attributes,
            start_time=_ns(self.clock.seconds()),
        )

    def now(self) -> int:
        return _ns(self.clock.seconds())

    def error(self, description: str | None) -> Any:
        """A span's error status, saying ``description`` (an error code)."""
        return self._status(self._error_code, description)


class TurnSpan:
    """One turn's span and its open attempt. The pipeline says where the turn went
    (:meth:`attempt` and how it ended: :meth:`failed`, :meth:`not_resent`, :meth:`fallback`,
    :meth:`retry`); :meth:`end` writes the row's figures and ends whatever is still open."""

    __slots__ = ("_attempt", "_span", "_tracer")

    def __init__(self, tracer: TurnTracer, span: Any) -> None:
        self._tracer = tracer
        self._span: Any = span
        self._attempt: Any = None

    def attempt(self, provider: str, transport: str, api: str, number: int) -> None:
        """An upstream attempt begins (a child span): ``transport`` websocket or http, ``api``
        responses, chat or anthropic, ``number`` the provider's place in the turn, from 1."""
        if self._span is None:
            return
        if self._attempt is not None:
            self._end_attempt(ABANDONED)
        attributes = {
            "cch.provider": provider,
            "cch.transport": transport,
            "cch.api": api,
            "cch.attempt": number,
        }
        self._attempt = self._tracer.child(self._span, attributes)

    def attempt_status(self, status: int) -> None:
        """The open attempt's HTTP status; its response goes to the client."""
        if self._attempt is not None:
            self._attempt.set_attribute("http.response.status_code", status)

    def failed(self, reason: str, status: int | None = None) -> None:
        """The provider failed the open attempt (``unreachable``, ``http_503``, ...)."""
        self._end_attempt(FAILED, reason, status)

    def not_resent(self, code: str) -> None:
        """The upstream socket ended after the provider may have taken the turn."""
        self._end_attempt(NOT_RESENT, code)

    def fallback(self, provider: str, reason: str) -> None:
        """The turn uses HTTP instead of the provider's WebSocket: a downgrade before any
        attempt, or the open attempt failing before its first event."""
        self._end_attempt(FALLBACK, reason)
        self._event(FALLBACK_EVENT, provider, reason)

    def retry(self, provider: str, reason: str) -> None:
        """The open attempt is sent again (``connection_limit``, ``previous_lost``)."""
        self._end_attempt(RETRIED, reason)
        self._event(RETRY_EVENT, provider, reason)

    def _event(self, name: str, provider: str, reason: str) -> None:
        if self._span is not None:
            self._span.add_event(
                name, {"cch.provider": provider, "cch.reason": reason}, self._tracer.now()
            )

    def _end_attempt(
        self,
        outcome: str,
        reason: str | None = None,
        status: int | None = None,
        at: int | None = None,
    ) -> None:
        span, self._attempt = self._attempt, None
        if span is None:
            return
        span.set_attribute("cch.outcome", outcome)
        if reason is not None:
            span.set_attribute("cch.reason", reason)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if outcome in (FAILED, NOT_RESENT):
            span.set_status(self._tracer.error(reason))
        span.end(end_time=self._tracer.now() if at is None else at)

    def end(self, row: UsageRow) -> None:
        """The turn's row is made: its figures become the span's attributes, and the span (and
        an attempt still open: the one that served, or the one cut short) end at its end."""
        span, self._span = self._span, None
        if span is None:
            return
        end = _ns(row.ended_at)
        failed = row.status in ERROR_STATUSES
        if self._attempt is not None:
            cut = row.status in CUT_STATUSES
            if failed:
                self._attempt.set_status(self._tracer.error(row.error_code))
            self._end_attempt(row.status if cut else SERVED, at=end)
        attributes = {}
        for name in ROW_ATTRIBUTES:
            value = getattr(row, name)
            if value is not None:
                attributes["cch." + name] = value
        span.set_attributes(attributes)
        if failed:
            span.set_status(self._tracer.error(row.error_code))
        span.end(end_time=end)


class TracingService(Service):
    """The tracer provider, while the gateway runs: made at start, shut down at stop (the
    spans still batched are exported then, in a thread, for at most ``SHUTDOWN_TIMEOUT``)."""

    def __init__(
        self, reactor: Any, clock: IReactorTime, *, replica: str = "", processor: Any = None
    ) -> None:
        """``processor``: the SDK ``SpanProcessor`` spans go to (default: batched OTLP/HTTP
        exports, configured by the ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` variables)."""
        self.reactor = reactor
        self.clock = clock
        self.replica = replica
        self.processor = processor
        self.provider: Any = None
        self.tracer = TurnTracer(clock)

    def startService(self) -> None:
        super().startService()
        from opentelemetry.sdk.trace import TracerProvider

        processor = self.processor
        if processor is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            processor = BatchSpanProcessor(OTLPSpanExporter())
        # Not the global provider: an embedding application keeps its own.
        self.provider = TracerProvider(
            resource=service_resource(self.replica), shutdown_on_exit=False
        )
        self.provider.add_span_processor(processor)
        self.tracer.use(self.provider.get_tracer("cch"))
        log.info("tracing_started", processor=type(processor).__name__)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        provider, self.provider = self.provider, None
        self.tracer.use(None)
        if provider is None:
            return succeed(None)
        # The SDK's shutdown blocks (a last export over HTTP): never on the reactor thread.
        d: Deferred[None] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), provider.shutdown
        )
        d.addTimeout(SHUTDOWN_TIMEOUT, self.clock)
        d.addErrback(_not_flushed)
        return d


def _not_flushed(failure: Failure) -> None:
    if failure.check(DeferredTimeout):
        log.warn("tracing_flush_timeout", seconds=SHUTDOWN_TIMEOUT)
    else:
        log.failure("tracing_shutdown_failed", failure, level=LogLevel.warn)


def service_resource(replica: str) -> Any:
    """What the spans say of their process: ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` as the SDK reads them, else service.name ``cch`` and, when the
    replica has a name, service.instance.id."""
    from opentelemetry.sdk.resources import Resource

    detected = Resource.create()
    ours: dict[str, str] = {}
    if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
        ours["service.name"] = SERVICE_NAME
    if replica and "service.instance.id" not in detected.attributes:
        ours["service.instance.id"] = replica
    return detected.merge(Resource(ours)) if ours else detected
