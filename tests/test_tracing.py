"""Traces (docs/tracing.md): one span per turn, a child per upstream attempt, the client's W3C
trace context as the parent, events for the WebSocket fallback and for retries; nothing at all
when tracing is off.

Real gateways on 127.0.0.1 in front of the fake upstream, their spans in the SDK's
``InMemorySpanExporter`` behind a ``SimpleSpanProcessor`` (each span exported as it ends); and
once the real thing: batched OTLP/HTTP exports to a collector in this test, flushed at stop.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import RunningGateway, eventually, gateway_config, within
from conftest import response_create as create
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cch.config import Config, ProviderConfig, TracingConfig
from cch.service import makeService
from cch.testing import FakeUpstream
from cch.testing.chat_scripts import chat_like
from cch.testing.scripts import CONNECTION_LIMIT_ERROR, Delay, Event, Script, error_json, hold
from cch.tracing import TRACEPARENT_METADATA, TRACESTATE_METADATA, TurnTracer

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
OTHER_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
OTHER_PARENT_ID = 0xB7AD6B7169203331
OTHER_TRACEPARENT = f"00-{OTHER_TRACE_ID:032x}-{OTHER_PARENT_ID:016x}-01"

CREATED = {
    "type": "response.created",
    "response": {"id": "resp_t1", "status": "in_progress", "model": "gpt-5.5"},
}
USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 3},
    "total_tokens": 17,
}
COMPLETED = {
    "type": "response.completed",
    "response": {
        "id": "resp_t1",
        "status": "completed",
        "model": "gpt-5.5-2026-01-01",
        "usage": USAGE,
    },
}

Launch = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest_twisted.async_yield_fixture
async def launch(spans: InMemorySpanExporter) -> AsyncIterator[Launch]:
    """Start a gateway with tracing on, its spans going to ``spans``; stopped at the end."""
    started: list[RunningGateway] = []

    async def start(config: Config, clock: Any = None) -> RunningGateway:
        traced = replace(config, tracing=TracingConfig(enabled=True))
        service = makeService(traced, reactor, clock, span_processor=SimpleSpanProcessor(spans))
        service.startService()
        await service.when_listening()
        running = RunningGateway(service)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


async def turn_spans(spans: InMemorySpanExporter, n: int = 1) -> list[ReadableSpan]:
    """The first ``n`` turn spans, once they have ended (just after the client's last event)."""
    await eventually(lambda: len(named(spans, "cch.turn")) >= n, f"{n} turn span(s)")
    return named(spans, "cch.turn")


def attempts_of(spans: InMemorySpanExporter, turn: ReadableSpan) -> list[ReadableSpan]:
    return [
        span
        for span in named(spans, "cch.upstream_attempt")
        if span.parent is not None and span.parent.span_id == turn.context.span_id
    ]


def events_of(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(event.name, dict(event.attributes or {})) for event in span.events]


async def post(running: RunningGateway, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json.dumps(body).encode(),
            headers={"content-type": "application/json", **headers},
            pool=pool,
        )
        assert response.code == 200
        content: bytes = await response.content()
        return content
    finally:
        await pool.closeCachedConnections()


def provider(fake: FakeUpstream, name: str = "primary", **fields: Any) -> ProviderConfig:
    return ProviderConfig(name=name, base_url=fake.base_url, **fields)


# --- one span per turn, one child per attempt -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_websocket_turn_makes_one_turn_span_with_the_rows_figures_and_one_attempt_child(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    clock = Clock()
    clock.advance(1000)
    fake.clock = clock  # the fake's Delay steps wait on the gateway's clock too
    fake.enqueue(Script((Delay(2.5), Event(CREATED), Delay(1.0), Event(COMPLETED))))
    running = await launch(gateway_config(fake, upstream="websocket"), clock)
    client = await running.connect()
    client.send_json(create())
    await fake.wait_for_requests(1)
    clock.advance(2.5)
    assert (await within(client.recv(), "response.created"))["type"] == "response.created"
    clock.advance(1.0)
    assert (await within(Deferred.fromCoroutine(client.recv_turn()), "the turn"))[-1] == COMPLETED

    (turn,) = await turn_spans(spans)
    assert turn.kind == SpanKind.SERVER
    assert turn.parent is None  # the client sent no trace context: a trace of its own
    attributes = dict(turn.attributes or {})
    request_id = attributes.pop("cch.request_id")
    assert isinstance(request_id, str) and request_id
    assert attributes == {
        "cch.response_id": "resp_t1",
        "cch.provider": "primary",
        "cch.model_requested": "gpt-5.5",
        "cch.model_served": "gpt-5.5-2026-01-01",
        "cch.client_transport": "websocket",
        "cch.upstream_transport": "websocket",
        "cch.status": "completed",
        "cch.attempts": 1,
        "cch.replayed": False,
        "cch.input_tokens": 10,
        "cch.cached_input_tokens": 4,
        "cch.output_tokens": 7,
        "cch.reasoning_tokens": 3,
        "cch.first_event_ms": 2500.0,
    }
    # The gateway's clock, in nanoseconds, as the usage row has it.
    assert (turn.start_time, turn.end_time) == (1000 * 10**9, 1003_500_000_000)
    assert turn.status.status_code == StatusCode.UNSET
    assert turn.events == ()

    (attempt,) = attempts_of(spans, turn)
    assert attempt.kind == SpanKind.CLIENT
    assert attempt.context.trace_id == turn.context.trace_id
    assert dict(attempt.attributes or {}) == {
        "cch.provider": "primary",
        "cch.transport": "websocket",
        "cch.api": "responses",
        "cch.attempt": 1,
        "cch.outcome": "served",
    }
    assert (attempt.start_time, attempt.end_time) == (1000 * 10**9, 1003_500_000_000)
    assert len(spans.get_finished_spans()) == 2


@pytest_twisted.ensureDeferred
async def test_failover_shows_the_failed_attempt_and_the_one_that_served(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    fake.enqueue(error_json(503, "server_error", "overloaded"))
    config = gateway_config(
        fake,
        providers=(
            provider(fake, "first", websocket="off"),
            provider(fake, "second", priority=1, websocket="off"),
        ),
    )
    running = await launch(config)
    await post(running, {"model": "gpt-5.5", "input": "hi", "stream": True}, {})

    (turn,) = await turn_spans(spans)
    assert turn.attributes is not None
    assert (turn.attributes["cch.provider"], turn.attributes["cch.attempts"]) == ("second", 2)
    assert turn.attributes["cch.client_transport"] == "http"
    failed, served = sorted(attempts_of(spans, turn), key=lambda span: span.start_time or 0)
    assert failed.attributes is not None and served.attributes is not None
    assert (failed.attributes["cch.provider"], failed.attributes["cch.outcome"]) == (
        "first",
        "failed",
    )
    assert (failed.attributes["cch.reason"], failed.attributes["http.response.status_code"]) == (
        "http_503",
        503,
    )
    assert failed.status.status_code == StatusCode.ERROR
    assert (served.attributes["cch.provider"], served.attributes["cch.outcome"]) == (
        "second",
        "served",
    )
    assert (served.attributes["cch.transport"], served.attributes["http.response.status_code"]) == (
        "http",
        200,
    )


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_marks_the_turn_span_as_an_error_with_its_code(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    failed = {
        "type": "response.failed",
        "response": {
            "id": "resp_f",
            "status": "failed",
            "error": {"code": "server_error", "message": "x"},
        },
    }
    fake.enqueue(Script((Event(CREATED), Event(failed))))
    running = await launch(gateway_config(fake, upstream="websocket"))
    client = await running.connect()
    client.send_json(create())
    await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")
    (turn,) = await turn_spans(spans)
    assert turn.attributes is not None
    assert (turn.attributes["cch.status"], turn.attributes["cch.error_code"]) == (
        "failed",
        "server_error",
    )
    assert (turn.status.status_code, turn.status.description) == (StatusCode.ERROR, "server_error")
    (attempt,) = attempts_of(spans, turn)
    assert attempt.status.status_code == StatusCode.ERROR


@pytest_twisted.ensureDeferred
async def test_an_attempt_at_a_translated_provider_names_its_api(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    fake.enqueue(chat_like)
    running = await launch(
        gateway_config(fake, providers=(provider(fake, "local", api="chat", websocket="off"),))
    )
    client = await running.connect()
    client.send_json(create())
    assert (await within(Deferred.fromCoroutine(client.recv_turn()), "the turn"))[-1][
        "type"
    ] == "response.completed"
    (turn,) = await turn_spans(spans)
    (attempt,) = attempts_of(spans, turn)
    assert attempt.attributes is not None
    assert (attempt.attributes["cch.api"], attempt.attributes["cch.transport"]) == ("chat", "http")
    assert (attempt.attributes["cch.outcome"], attempt.attributes["http.response.status_code"]) == (
        "served",
        200,
    )
    assert turn.attributes is not None and turn.attributes["cch.provider"] == "local"


# --- the parent: the client's trace context -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_codex_frame_s_client_metadata_is_the_parent_even_through_the_http_tunnel(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter, tunnel_mode: str
) -> None:
    running = await launch(gateway_config(fake, tunnel=tunnel_mode, upstream="websocket"))
    # The upgrade's own traceparent is older than the turn's: the frame's wins.
    client = await running.connect(headers={"traceparent": OTHER_TRACEPARENT})
    metadata = {
        "x-codex-turn-metadata": "{}",
        TRACEPARENT_METADATA: TRACEPARENT,
        TRACESTATE_METADATA: "congo=t61rcWkgMzE",
    }
    client.send_json(create(client_metadata=metadata))
    await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")

    (turn,) = await turn_spans(spans)
    assert turn.parent is not None and turn.parent.is_remote
    assert (turn.context.trace_id, turn.parent.span_id) == (TRACE_ID, PARENT_ID)
    assert dict(turn.context.trace_state) == {"congo": "t61rcWkgMzE"}
    (attempt,) = attempts_of(spans, turn)
    assert attempt.context.trace_id == TRACE_ID


@pytest_twisted.ensureDeferred
async def test_an_http_client_s_traceparent_header_is_the_parent(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    running = await launch(gateway_config(fake))
    await post(
        running,
        {"model": "gpt-5.5", "input": "hi", "stream": True},
        {"traceparent": TRACEPARENT, "tracestate": "rojo=1"},
    )
    (turn,) = await turn_spans(spans)
    assert turn.parent is not None
    assert (turn.context.trace_id, turn.parent.span_id) == (TRACE_ID, PARENT_ID)
    assert dict(turn.context.trace_state) == {"rojo": "1"}
    assert turn.attributes is not None and turn.attributes["cch.upstream_transport"] == "http"


def test_the_parent_rules() -> None:
    from opentelemetry import trace

    tracer = TurnTracer(Clock())

    def parent_of(headers: dict[str, str], body: dict[str, Any]) -> tuple[int, int] | None:
        context = trace.get_current_span(tracer.parent(headers, body)).get_span_context()
        return (context.trace_id, context.span_id) if context.is_valid else None

    metadata = {"client_metadata": {TRACEPARENT_METADATA: TRACEPARENT}}
    assert parent_of({}, metadata) == (TRACE_ID, PARENT_ID)
    assert parent_of({"traceparent": OTHER_TRACEPARENT}, metadata) == (TRACE_ID, PARENT_ID)
    assert parent_of({"traceparent": OTHER_TRACEPARENT}, {}) == (OTHER_TRACE_ID, OTHER_PARENT_ID)
    # A malformed value in the frame falls back to the headers; nothing valid: a new trace.
    broken = {"client_metadata": {TRACEPARENT_METADATA: "00-nonsense-01"}}
    assert parent_of({"traceparent": OTHER_TRACEPARENT}, broken) == (
        OTHER_TRACE_ID,
        OTHER_PARENT_ID,
    )
    assert parent_of({}, broken) is None
    assert parent_of({"traceparent": "garbage"}, {"client_metadata": "not a table"}) is None
    assert parent_of({}, {"client_metadata": {TRACEPARENT_METADATA: 42}}) is None


# --- fallback and retries -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_websocket_to_http_fallback_is_an_event_with_its_reason(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    fake.upgrade_status = 404  # "no WebSocket here": remembered for the next turn
    running = await launch(gateway_config(fake, providers=(provider(fake, websocket="auto"),)))
    client = await running.connect()
    for _ in range(2):
        client.send_json(create())
        await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")

    first, second = sorted(await turn_spans(spans, 2), key=lambda span: span.start_time or 0)
    assert events_of(first) == [
        ("upstream_ws_fallback", {"cch.provider": "primary", "cch.reason": "ws_upgrade_rejected"})
    ]
    ws, http = sorted(attempts_of(spans, first), key=lambda span: span.start_time or 0)
    assert ws.attributes is not None and http.attributes is not None
    assert (ws.attributes["cch.transport"], ws.attributes["cch.outcome"]) == (
        "websocket",
        "fallback",
    )
    assert ws.attributes["cch.reason"] == "ws_upgrade_rejected"
    assert ws.status.status_code == StatusCode.UNSET  # handled: the turn went on over HTTP
    assert (http.attributes["cch.transport"], http.attributes["cch.outcome"]) == ("http", "served")
    assert first.attributes is not None and first.attributes["cch.upstream_transport"] == "http"
    # The downgrade of the next turn: no WebSocket attempt at all, the event says why.
    assert events_of(second) == [
        (
            "upstream_ws_fallback",
            {"cch.provider": "primary", "cch.reason": "endpoint_ws_unsupported_cached"},
        )
    ]
    (only,) = attempts_of(spans, second)
    assert only.attributes is not None and only.attributes["cch.transport"] == "http"


@pytest_twisted.ensureDeferred
async def test_a_retry_on_a_fresh_socket_is_an_event_between_two_attempts(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    fake.enqueue(Script((Event(CONNECTION_LIMIT_ERROR),)))
    running = await launch(gateway_config(fake, upstream="websocket"))
    client = await running.connect()
    client.send_json(create())
    assert (await within(Deferred.fromCoroutine(client.recv_turn()), "the turn"))[-1][
        "type"
    ] == "response.completed"

    (turn,) = await turn_spans(spans)
    assert events_of(turn) == [
        ("upstream_retry", {"cch.provider": "primary", "cch.reason": "connection_limit"})
    ]
    retried, served = sorted(attempts_of(spans, turn), key=lambda span: span.start_time or 0)
    assert retried.attributes is not None and served.attributes is not None
    assert (retried.attributes["cch.outcome"], retried.attributes["cch.reason"]) == (
        "retried",
        "connection_limit",
    )
    assert served.attributes["cch.outcome"] == "served"
    assert turn.attributes is not None and turn.attributes["cch.status"] == "completed"


# --- every close path ends the span ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_turn_the_client_leaves_mid_stream_ends_its_spans_as_cancelled(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    fake.enqueue(hold([CREATED]))
    running = await launch(gateway_config(fake, upstream="websocket"))
    client = await running.connect()
    client.send_json(create())
    assert (await within(client.recv(), "response.created"))["type"] == "response.created"
    await client.close()

    (turn,) = await turn_spans(spans)
    assert turn.attributes is not None
    assert turn.attributes["cch.status"] == "cancelled"
    assert turn.attributes["cch.response_id"] == "resp_t1"  # what response.created said
    assert turn.status.status_code == StatusCode.UNSET
    (attempt,) = attempts_of(spans, turn)
    assert attempt.attributes is not None and attempt.attributes["cch.outcome"] == "cancelled"
    assert attempt.end_time == turn.end_time


@pytest_twisted.ensureDeferred
async def test_a_turn_refused_before_any_upstream_still_has_its_span(
    fake: FakeUpstream, launch: Launch, spans: InMemorySpanExporter
) -> None:
    running = await launch(gateway_config(fake, providers=()))
    client = await running.connect()
    client.send_json(create())
    await within(client.recv(), "the error")
    (turn,) = await turn_spans(spans)
    assert turn.attributes is not None and turn.attributes["cch.status"] == "error"
    assert turn.attributes["cch.attempts"] == 0
    assert attempts_of(spans, turn) == []


# --- tracing off ----------------------------------------------------------------------------------

OFF = textwrap.dedent(
    """
    import sys

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from cch.config import load_config
    from cch.service import makeService
    from cch.testing import FakeUpstream
    from cch.turn import RequestContext


    class Sink:
        def __init__(self):
            self.events = []

        def sse_started(self, status, headers):
            pass

        def sse_event(self, data, kind=None):
            self.events.append(data)

        def json_body(self, status, body, content_type, headers=None):
            self.events.append(body)

        def register_producer(self, producer):
            pass

        def unregister_producer(self):
            pass


    async def main(reactor):
        fake = FakeUpstream(reactor)
        await fake.listen(reactor)
        path = sys.argv[1]
        with open(path, "w") as config:
            config.write(
                '[server]\\nlisten = "tcp:0:interface=127.0.0.1"\\n[usage]\\ndatabase = "off"\\n'
                f'[[providers]]\\nname = "p"\\nbase_url = "{fake.base_url}"\\n'
            )
        service = makeService(load_config(path, {}), reactor)
        assert service.tracing is None and service.handler.tracer is None
        service.startService()
        await service.when_listening()
        sink = Sink()
        body = {"model": "gpt-5.5", "input": "hi", "stream": True,
                "client_metadata": {"ws_request_header_traceparent": sys.argv[2]}}
        await service.handler.handle(RequestContext(headers={"traceparent": sys.argv[3]}), body, sink)
        assert "response.completed" in sink.events[-1], sink.events
        await service.stopService()
        await fake.stop()
        print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))


    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    """
)


def test_tracing_off_makes_nothing_and_imports_nothing_of_opentelemetry(tmp_path: Any) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", OFF, str(tmp_path / "cch.toml"), TRACEPARENT, OTHER_TRACEPARENT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1] == "[]"


# --- over OTLP/HTTP -------------------------------------------------------------------------------


class Collector(Resource):
    """``POST /v1/traces``: OTLP/HTTP's protobuf body, kept as the request it decodes to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[tuple[bytes, str, ExportTraceServiceRequest]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        if request.getHeader("content-encoding") == "gzip":
            body = gzip.decompress(body)
        decoded = ExportTraceServiceRequest()
        decoded.ParseFromString(body)
        self.exports.append((request.path, request.getHeader("content-type") or "", decoded))
        request.setHeader("content-type", "application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


@pytest_twisted.ensureDeferred
async def test_spans_reach_an_otlp_http_collector_by_the_otel_variables_and_are_flushed_at_stop(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = Collector()
    site = Site(collector)
    site.timeOut = None  # no idle timer left behind by the exporter's kept-alive connection
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    for name in (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port.getHost().port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing sent before the stop
    try:
        config = replace(
            gateway_config(fake, upstream="websocket"), tracing=TracingConfig(enabled=True)
        )
        service = makeService(config, reactor)
        service.startService()
        await service.when_listening()
        running = RunningGateway(service)
        client = await running.connect()
        metadata = {TRACEPARENT_METADATA: TRACEPARENT}
        client.send_json(create(client_metadata=metadata))
        await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")
        await eventually(lambda: service.handler.active == 0, "the turn's end")
        assert collector.exports == []
        await running.stop()  # flushes: the batch goes out before stopService's Deferred fires
    finally:
        await port.stopListening()

    (path, content_type, request), *_ = collector.exports
    assert (path, content_type) == (b"/v1/traces", "application/x-protobuf")
    (resource_spans,) = request.resource_spans
    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "cch"
    spans = {span.name: span for scope in resource_spans.scope_spans for span in scope.spans}
    assert set(spans) == {"cch.turn", "cch.upstream_attempt"}
    turn, attempt = spans["cch.turn"], spans["cch.upstream_attempt"]
    assert turn.trace_id == TRACE_ID.to_bytes(16, "big")
    assert turn.parent_span_id == PARENT_ID.to_bytes(8, "big")
    assert attempt.parent_span_id == turn.span_id
    attributes = {a.key: _value(a.value) for a in turn.attributes}
    assert attributes["cch.status"] == "completed"
    assert attributes["cch.client_transport"] == "websocket"
    assert attributes["cch.provider"] == "primary"
    assert {a.key: _value(a.value) for a in attempt.attributes}["cch.outcome"] == "served"
