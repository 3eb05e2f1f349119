"""TurnMeter: one usage row per turn from the events on their way to the client."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from cch.config import PriceConfig
from cch.handler.metering import TurnMeter
from cch.usage.prices import PriceSheet
from cch.wire import error_event, event_type

PRICES = PriceSheet([PriceConfig("gpt-5", input_per_mtok=1.0, cached_input_per_mtok=0.1, output_per_mtok=10.0)])
USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 400},
    "output_tokens": 200,
    "output_tokens_details": {"reasoning_tokens": 50},
    "total_tokens": 1200,
}


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        self.calls.append(("started", status))

    def sse_event(self, data: str, kind: str | None = None) -> None:
        self.calls.append(("event", data, kind))

    def json_body(self, status: int, body: bytes, content_type: str) -> None:
        self.calls.append(("json", status, body))

    def register_producer(self, producer: Any) -> None:
        self.calls.append(("register",))

    def unregister_producer(self) -> None:
        self.calls.append(("unregister",))


def meter(clock: Clock, sink: Sink | None = None, **kwargs: Any) -> TurnMeter:
    options: dict[str, Any] = {"request_id": "req-1", "key": "alice", "model": "gpt-5", "client_transport": "websocket"}
    options.update(kwargs)
    return TurnMeter(sink or Sink(), clock, **options)


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def send(m: TurnMeter, data: str, typed: bool = True) -> None:
    m.sse_event(data, event_type(data) if typed else None)


@pytest.mark.parametrize(
    ("terminal", "status"),
    [("response.completed", "completed"), ("response.failed", "failed"), ("response.incomplete", "incomplete")],
)
def test_a_terminal_response_gives_the_row_its_status_tokens_model_and_cost(terminal: str, status: str) -> None:
    clock = Clock()
    clock.advance(1_765_000_000)
    seen: list[str] = []
    m = meter(clock, on_response_id=seen.append)
    m.provider, m.upstream_transport, m.attempts = "openai", "websocket", 1
    clock.advance(0.25)
    send(m, event("response.created", response={"id": "resp_1", "status": "in_progress"}))
    clock.advance(1.0)
    send(m, event("response.output_text.delta", delta="hi"))
    response = {"id": "resp_1", "status": status, "model": "gpt-5-2025-08-07", "usage": USAGE}
    send(m, event(terminal, response=response))
    row = m.row(PRICES, "replica-a")
    assert seen == ["resp_1"]
    assert (row.status, row.response_id, row.model_requested, row.model_served) == (status, "resp_1", "gpt-5", "gpt-5-2025-08-07")
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens) == (1000, 400, 200, 50)
    # 600 input at 1.0, 400 cached at 0.1, 200 output at 10.0, per million.
    assert row.cost == pytest.approx((600 * 1.0 + 400 * 0.1 + 200 * 10.0) / 1e6)
    assert row.first_event_ms == pytest.approx(250.0)
    assert row.duration_ms == pytest.approx(1250.0)
    assert (row.key, row.provider, row.client_transport, row.upstream_transport) == ("alice", "openai", "websocket", "websocket")
    assert (row.request_id, row.replica, row.started_at) == ("req-1", "replica-a", 1_765_000_000)


def test_events_pass_through_unchanged_with_their_type() -> None:
    sink = Sink()
    m = meter(Clock(), sink)
    m.sse_started(200, {})
    created = event("response.created", response={"id": "r"})
    m.sse_event(created, "response.created")
    m.sse_event("not json", None)
    assert sink.calls == [("started", 200), ("event", created, "response.created"), ("event", "not json", None)]


def test_an_untyped_terminal_is_still_seen() -> None:
    m = meter(Clock())
    send(m, event("response.completed", response={"id": "r", "usage": USAGE}), typed=False)
    assert m.row(PRICES, "").status == "completed"


def test_an_error_event_is_status_error_with_its_code_and_no_tokens() -> None:
    m = meter(Clock())
    send(m, error_event("upstream_idle_timeout", "silent"))
    row = m.row(PRICES, "")
    assert (row.status, row.error_code, row.input_tokens, row.cost) == ("error", "upstream_idle_timeout", None, None)


def test_a_failed_response_keeps_its_error_code() -> None:
    m = meter(Clock())
    send(m, event("response.failed", response={"id": "r", "status": "failed", "error": {"code": "server_error"}}))
    row = m.row(PRICES, "")
    assert (row.status, row.error_code) == ("failed", "server_error")


def test_usage_without_a_price_has_tokens_and_a_null_cost_never_zero() -> None:
    m = meter(Clock(), model="other-model")
    send(m, event("response.completed", response={"id": "r", "model": "other-model", "usage": USAGE}))
    row = m.row(PRICES, "")
    assert row.input_tokens == 1000 and row.cost is None


def test_a_terminal_without_usage_has_null_tokens() -> None:
    m = meter(Clock())
    send(m, event("response.completed", response={"id": "r"}))
    row = m.row(PRICES, "")
    assert (row.input_tokens, row.output_tokens, row.cost) == (None, None, None)


@pytest.mark.parametrize("status", ["cancelled", "drained"])
def test_a_turn_cut_before_its_terminal_is_recorded_as_cut(status: str) -> None:
    clock = Clock()
    m = meter(clock)
    send(m, event("response.created", response={"id": "resp_cut"}))
    clock.advance(3)
    m.ended(status)
    row = m.row(PRICES, "")
    assert (row.status, row.response_id, row.input_tokens, row.duration_ms) == (status, "resp_cut", None, 3000)


def test_a_terminal_already_seen_stands_when_the_turn_is_then_cancelled() -> None:
    m = meter(Clock())
    send(m, event("response.completed", response={"id": "r", "usage": USAGE}))
    m.ended("cancelled")
    assert m.row(PRICES, "").status == "completed"


def test_a_stream_that_ends_without_a_terminal_is_an_error() -> None:
    m = meter(Clock())
    send(m, event("response.created", response={"id": "r"}))
    row = m.row(PRICES, "")
    assert (row.status, row.error_code) == ("error", "stream_ended_without_terminal")


def test_a_json_error_body_is_status_error_with_its_code() -> None:
    sink = Sink()
    m = meter(Clock(), sink, client_transport="http")
    body = b'{"error":{"message":"no","type":"rate_limit_error","code":"rate_limited"}}'
    m.json_body(429, body, "application/json")
    row = m.row(PRICES, "")
    assert sink.calls == [("json", 429, body)]
    assert (row.status, row.error_code, row.client_transport) == ("error", "rate_limited", "http")


def test_a_json_error_without_a_code_is_named_by_its_status() -> None:
    m = meter(Clock())
    m.json_body(502, b"<html>bad gateway</html>", "text/html")
    assert m.row(PRICES, "").error_code == "http_502"


def test_a_non_streamed_response_body_gives_tokens_and_id() -> None:
    seen: list[str] = []
    m = meter(Clock(), on_response_id=seen.append)
    body = json.dumps({"id": "resp_j", "object": "response", "status": "completed", "model": "gpt-5", "usage": USAGE})
    m.json_body(200, body.encode(), "application/json")
    row = m.row(PRICES, "")
    assert (row.status, row.response_id, row.output_tokens) == ("completed", "resp_j", 200)
    assert seen == ["resp_j"]


def test_refused_turns_are_rows_with_their_code() -> None:
    m = meter(Clock())
    m.ended("refused", "rate_limit_exceeded")
    send(m, error_event("rate_limit_exceeded", "slow down", status=429))
    row = m.row(PRICES, "")
    assert (row.status, row.error_code, row.upstream_transport, row.attempts) == ("refused", "rate_limit_exceeded", None, 0)


def test_a_failed_non_streamed_response_keeps_its_error_code() -> None:
    m = meter(Clock())
    body = json.dumps({"id": "r", "status": "failed", "error": {"code": "server_error", "message": "x"}})
    m.json_body(200, body.encode(), "application/json")
    row = m.row(PRICES, "")
    assert (row.status, row.error_code) == ("failed", "server_error")
