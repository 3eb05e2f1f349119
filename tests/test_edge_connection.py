"""EdgeConnection rules without a socket: queue, turns, error frames and close paths."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cch.config import LimitsConfig
from cch.edge.connection import EdgeConnection
from cch.turn import ResponseSink, TurnRequest, TurnTransportError
from cch.wsframes import frame_payloads


class Channel:
    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.closes: list[tuple[int, str]] = []
        self.log: list[tuple[str, Any]] = []
        self.reading: list[str] = []  # pause / resume calls on the client socket's reading

    def send_text(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            frame = ("raw", text)
        self.frames.append(frame)
        self.log.append(("frame", frame))

    def send_frames(self, data: bytes, start: int, end: int) -> int:
        """Relayed frames (cch.wsframes): each payload arrives as a frame of its own."""
        for payload in frame_payloads(data, start, end):
            self.send_text(payload.decode("utf-8"))
        return end - start

    def send_close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        self.log.append(("close", (code, reason)))

    def pause_reading(self) -> None:
        self.reading.append("pause")

    def resume_reading(self) -> None:
        self.reading.append("resume")


class Turn:
    def __init__(self, request: TurnRequest, sink: ResponseSink) -> None:
        self.request = request
        self.sink = sink
        self.cancelled = False
        self.deferred: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, _: Any) -> None:
        self.cancelled = True

    def events(self, *events: dict[str, Any]) -> None:
        self.sink.sse_started(200, {})
        for event in events:
            self.sink.sse_event(json.dumps(event))

    def finish(self) -> None:
        self.deferred.callback(None)


class Tunnel:
    def __init__(self) -> None:
        self.turns: list[Turn] = []

    def run_turn(self, request: TurnRequest, sink: ResponseSink) -> Deferred[None]:
        turn = Turn(request, sink)
        self.turns.append(turn)
        return turn.deferred


class Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


COMPLETED = {"type": "response.completed", "response": {"id": "r1"}}


def create(text_model: str = "gpt-5.5") -> str:
    return json.dumps({"type": "response.create", "model": text_model, "input": []})


@pytest.fixture
def parts() -> tuple[EdgeConnection, Channel, Tunnel, Clock, list[str]]:
    channel, tunnel, clock = Channel(), Tunnel(), Clock()
    released: list[str] = []
    conn = EdgeConnection(
        channel=channel,
        tunnel=tunnel,
        limits=LimitsConfig(),
        clock=clock,
        headers={"authorization": "Bearer k"},
        query_model="query-model",
        on_close_decided=lambda c: released.append(c.session_id),
    )
    return conn, channel, tunnel, clock, released


def send(conn: EdgeConnection, text: str) -> None:
    conn.text_received(text, len(text.encode("utf-8")))


def test_turn_body_drops_type_and_background_and_forces_stream(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, json.dumps({"type": "response.create", "model": "m", "background": True, "stream": False, "store": False}))
    body = tunnel.turns[0].request.body
    assert body == {"model": "m", "stream": True, "store": False}
    assert tunnel.turns[0].request.session_id == conn.session_id


@pytest.mark.parametrize("model", [None, ""])
def test_query_model_fills_a_missing_or_empty_model(parts: Any, model: Any) -> None:
    conn, _, tunnel, _, _ = parts
    frame: dict[str, Any] = {"type": "response.create"}
    if model is not None:
        frame["model"] = model
    send(conn, json.dumps(frame))
    assert tunnel.turns[0].request.body["model"] == "query-model"


def test_body_model_wins_over_query_model(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, create("body-model"))
    assert tunnel.turns[0].request.body["model"] == "body-model"


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        ("{nope", "invalid_json", None),
        ("null", "invalid_frame", "Frame must be a JSON object"),
        ("42", "invalid_frame", "Frame must be a JSON object"),
        ('"s"', "invalid_frame", "Frame must be a JSON object"),
        ("false", "invalid_frame", "Frame must be a JSON object"),
        ("[]", "unsupported_event_type", "Only type=response.create is supported; received: (missing)"),
        ("{}", "unsupported_event_type", "Only type=response.create is supported; received: (missing)"),
        ('{"type":5}', "unsupported_event_type", "Only type=response.create is supported; received: 5"),
        ('{"type":true}', "unsupported_event_type", "Only type=response.create is supported; received: true"),
        ('{"type":{}}', "unsupported_event_type", "Only type=response.create is supported; received: [object Object]"),
        ('{"type":["a","b"]}', "unsupported_event_type", "Only type=response.create is supported; received: a,b"),
        ('{"type":"session.update"}', "unsupported_event_type", "Only type=response.create is supported; received: session.update"),
    ],
)
def test_recoverable_frame_errors_keep_the_connection_open(parts: Any, text: str, code: str, message: str | None) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, text)
    assert channel.frames[0]["type"] == "error"
    assert channel.frames[0]["error"]["code"] == code
    if message is None:
        assert channel.frames[0]["error"]["message"].startswith("Invalid JSON frame: ")
    else:
        assert channel.frames[0]["error"]["message"] == message
    assert channel.closes == [] and not conn.closed and tunnel.turns == []
    send(conn, create())
    assert len(tunnel.turns) == 1


def test_one_turn_at_a_time_and_errors_wait_their_turn(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    send(conn, "{bad")
    send(conn, create())
    assert len(tunnel.turns) == 1 and channel.frames == []
    first = tunnel.turns[0]
    first.events({"type": "response.created"}, COMPLETED)
    assert len(tunnel.turns) == 1, "next turn must wait for the body to end"
    first.finish()
    assert [f["type"] for f in channel.frames] == ["response.created", "response.completed", "error"]
    assert len(tunnel.turns) == 2


@pytest.mark.parametrize("terminal", ["response.completed", "response.failed", "response.incomplete", "error"])
def test_every_terminal_keeps_the_connection_open(parts: Any, terminal: str) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    tunnel.turns[0].events({"type": terminal})
    tunnel.turns[0].finish()
    assert not conn.closed and channel.closes == [] and conn.in_flight is None


def test_stream_without_terminal_closes_1011_after_the_error_frame(parts: Any) -> None:
    conn, channel, tunnel, _, released = parts
    send(conn, create())
    send(conn, create())
    tunnel.turns[0].events({"type": "response.created"})
    tunnel.turns[0].finish()
    assert channel.log[-2:] == [
        ("frame", {"type": "error", "error": {"code": "stream_ended_without_terminal", "message": "Upstream stream ended before emitting a terminal response event"}}),
        ("close", (1011, "stream_ended_without_terminal")),
    ]
    assert len(tunnel.turns) == 1 and not conn.pending and released == [conn.session_id]


@pytest.mark.parametrize(
    "code",
    ["internal_response_error", "internal_response_closed", "internal_request_error"],
)
def test_transport_failures_close_1011_with_their_reason(parts: Any, code: str) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    tunnel.turns[0].deferred.errback(TurnTransportError(code, "it broke"))
    assert channel.log[-2:] == [
        ("frame", {"type": "error", "error": {"code": code, "message": "it broke"}}),
        ("close", (1011, code)),
    ]


def test_failure_after_terminal_settles_the_turn_without_closing(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].deferred.errback(TurnTransportError("internal_response_closed", "x"))
    assert channel.closes == [] and conn.in_flight is None
    send(conn, create())
    assert len(tunnel.turns) == 2


def test_done_is_synthesized_once_and_dropped_after_a_terminal(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    sink = tunnel.turns[0].sink
    sink.sse_event("[DONE]")
    sink.sse_event("[DONE]")
    assert channel.frames == [{"type": "response.completed", "response": None}]
    send(conn, create())
    tunnel.turns[0].finish()
    tunnel.turns[1].events(COMPLETED)
    tunnel.turns[1].sink.sse_event("[DONE]")
    assert channel.frames[-1] == COMPLETED


def test_sse_data_translation(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    sink = tunnel.turns[0].sink
    sink.sse_event("plain text")
    sink.sse_event('"a json string"')
    sink.sse_event("12")
    sink.sse_event('{"type": "response.output_text.delta", "delta": "é"}')
    assert channel.frames == [
        {"type": "response.output_text.delta", "delta": "plain text"},
        ("raw", "a json string"),
        12,
        {"type": "response.output_text.delta", "delta": "é"},
    ]


@pytest.mark.parametrize(
    ("status", "body", "frame"),
    [
        (200, b'{"id":"r"}', {"type": "response.completed", "response": {"id": "r"}}),
        (302, b"moved", {"type": "response.completed", "response": {"raw": "moved"}}),
        (401, b'{"error":{"message":"bad key","type":"authentication_error","code":"invalid_api_key"}}',
         {"type": "error", "status": 401, "error": {"message": "bad key", "type": "authentication_error", "code": "invalid_api_key"}}),
        (500, b'{"error":"boom"}', {"type": "error", "status": 500, "error": "boom"}),
        (502, b"x" * 600, {"type": "error", "status": 502, "error": {"code": "http_502", "message": "x" * 512}}),
        (429, b'{"error":null}', {"type": "error", "status": 429, "error": {"code": "http_429", "message": '{"error":null}'}}),
    ],
)
def test_json_responses_become_one_terminal_frame(parts: Any, status: int, body: bytes, frame: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    tunnel.turns[0].sink.json_body(status, body, "application/json")
    tunnel.turns[0].finish()
    assert channel.frames == [frame]
    assert not conn.closed and conn.in_flight is None


def test_binary_frame_closes_1003_immediately_even_mid_turn(parts: Any) -> None:
    conn, channel, tunnel, _, released = parts
    send(conn, create())
    send(conn, create())
    conn.binary_received()
    assert tunnel.turns[0].cancelled
    assert channel.log == [
        ("frame", {"type": "error", "error": {"code": "invalid_frame_type", "message": "Only text WebSocket frames are supported"}}),
        ("close", (1003, "binary_not_supported")),
    ]
    assert not conn.pending and conn.in_flight is None and released == [conn.session_id]
    # Nothing after the close decision reaches a tunnel or the client.
    tunnel.turns[0].events(COMPLETED)
    send(conn, create())
    conn.binary_received()
    assert len(tunnel.turns) == 1 and len(channel.log) == 2


def test_sixty_six_frames_behind_a_turn_overflow_with_1008(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    for _ in range(65):
        send(conn, create())
    assert len(conn.pending) == 64 and channel.closes == []
    send(conn, create())
    assert channel.log == [
        ("frame", {"type": "error", "error": {"code": "too_many_requests", "message": "Pending frame limit exceeded"}}),
        ("close", (1008, "too_many_requests")),
    ]
    assert tunnel.turns[0].cancelled and len(tunnel.turns) == 1 and not conn.pending


def test_pending_bytes_overflow(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    conn.limits = LimitsConfig(max_pending_bytes=100)
    send(conn, create())
    conn.text_received("x" * 60, 60)
    conn.text_received("y" * 41, 41)
    assert channel.closes == [(1008, "too_many_requests")]


def test_client_disconnect_cancels_turn_and_drops_pending(parts: Any) -> None:
    conn, channel, tunnel, _, released = parts
    send(conn, create())
    send(conn, create())
    conn.connection_lost()
    assert tunnel.turns[0].cancelled and not conn.pending and conn.in_flight is None
    assert channel.log == [] and released == [conn.session_id]
    conn.connection_lost()
    assert released == [conn.session_id]


def test_producer_is_paused_with_the_client_and_a_stuck_client_is_closed(parts: Any) -> None:
    conn, channel, tunnel, clock, _ = parts
    send(conn, create())
    producer = Producer()
    tunnel.turns[0].sink.register_producer(producer)
    conn.pauseProducing()
    assert producer.calls == ["pause"]
    clock.advance(29)
    conn.resumeProducing()
    assert producer.calls == ["pause", "resume"]
    clock.advance(10)
    assert channel.closes == []
    conn.pauseProducing()
    clock.advance(30)
    assert channel.closes == [(1011, "outbound_send_timeout")]
    assert tunnel.turns[0].cancelled
    assert clock.getDelayedCalls() == []


def test_producer_registered_while_paused_starts_paused(parts: Any) -> None:
    conn, _, tunnel, clock, _ = parts
    send(conn, create())
    conn.pauseProducing()
    producer = Producer()
    tunnel.turns[0].sink.register_producer(producer)
    assert producer.calls == ["pause"]
    conn.connection_lost()
    assert clock.getDelayedCalls() == []


def test_a_full_outbound_buffer_stops_reading_the_client_until_it_drains(parts: Any) -> None:
    conn, channel, _, clock, _ = parts
    conn.pauseProducing()
    conn.pauseProducing()
    assert channel.reading == ["pause"]
    clock.advance(29)
    conn.resumeProducing()
    conn.resumeProducing()
    assert channel.reading == ["pause", "resume"]
    assert channel.closes == [] and clock.getDelayedCalls() == []


def test_a_client_that_never_drains_is_closed_1011_and_read_again_for_its_close_frame(parts: Any) -> None:
    conn, channel, _, clock, _ = parts
    conn.pauseProducing()
    clock.advance(30)
    assert channel.closes == [(1011, "outbound_send_timeout")]
    assert channel.reading == ["pause", "resume"]
    conn.resumeProducing()  # the buffer drains at last: reading already goes on
    conn.pauseProducing()  # closing: pausing again would hide the client's close frame
    assert channel.reading == ["pause", "resume"]
    assert clock.getDelayedCalls() == []


def test_drain_close_of_a_paused_client_still_sends_the_close_and_reads_the_reply(parts: Any) -> None:
    conn, channel, _, clock, released = parts
    conn.pauseProducing()
    conn.leave()
    assert channel.closes == [(1001, "going_away")]
    assert channel.reading == ["pause", "resume"]
    assert released == [conn.session_id] and clock.getDelayedCalls() == []


def test_a_pause_from_inside_a_send_pauses_reading_and_the_turn_and_arms_one_deadline(parts: Any) -> None:
    conn, channel, tunnel, clock, _ = parts
    sent = channel.send_text

    def send_and_fill(text: str) -> None:
        sent(text)
        conn.pauseProducing()  # what the transport does when a write goes over its mark

    channel.send_text = send_and_fill  # type: ignore[method-assign]
    send(conn, create())
    producer = Producer()
    tunnel.turns[0].sink.register_producer(producer)
    tunnel.turns[0].events({"type": "response.created"}, {"type": "response.output_text.delta", "delta": "x"})
    assert [f["type"] for f in channel.frames] == ["response.created", "response.output_text.delta"]
    assert producer.calls == ["pause"] and channel.reading == ["pause"]
    assert len(clock.getDelayedCalls()) == 1
    conn.resumeProducing()
    assert producer.calls == ["pause", "resume"] and channel.reading == ["pause", "resume"]
    assert clock.getDelayedCalls() == []


def test_synchronous_turns_do_not_recurse(parts: Any) -> None:
    conn, channel, _, _, _ = parts

    class SyncTunnel:
        def run_turn(self, request: TurnRequest, sink: ResponseSink) -> Deferred[None]:
            sink.json_body(401, b'{"error":{"code":"invalid_api_key"}}', "application/json")
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d

    conn.tunnel = SyncTunnel()
    for _ in range(60):
        send(conn, create())
    assert len(channel.frames) == 60 and conn.idle


def test_go_away_close_is_idempotent(parts: Any) -> None:
    conn, channel, _, _, released = parts
    conn.close(1001, "going_away")
    conn.close(1011, "other")
    conn.connection_lost()
    assert channel.closes == [(1001, "going_away")] and released == [conn.session_id]


def test_a_turn_that_cannot_start_closes_1011_internal_error(parts: Any) -> None:
    conn, channel, _, _, released = parts

    class Broken:
        def run_turn(self, request: TurnRequest, sink: ResponseSink) -> Deferred[None]:
            raise RuntimeError("boom")

    conn.tunnel = Broken()
    send(conn, create())
    assert channel.log == [
        ("frame", {"type": "error", "error": {"code": "internal_error", "message": "Failed to process request"}}),
        ("close", (1011, "internal_error")),
    ]
    assert conn.closed and conn.in_flight is None and released == [conn.session_id]


def test_a_queued_turn_that_cannot_start_says_queued(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    send(conn, create())

    class Broken:
        def run_turn(self, request: TurnRequest, sink: ResponseSink) -> Deferred[None]:
            raise RuntimeError("boom")

    conn.tunnel = Broken()
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert channel.log[-2:] == [
        ("frame", {"type": "error", "error": {"code": "internal_error", "message": "Failed to process queued request"}}),
        ("close", (1011, "internal_error")),
    ]


def test_a_send_on_a_closed_socket_closes_1011_outbound_socket_closed(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    channel.send_text = lambda text: 0  # type: ignore[method-assign]
    tunnel.turns[0].events(COMPLETED)
    assert channel.closes == [(1011, "outbound_socket_closed")]
    assert tunnel.turns[0].cancelled


# -- beside lanes and control frames (docs/protocol.md): the default lane is unchanged ---------


def test_a_cancel_acts_at_once_and_leaves_the_queue_and_its_order_alone(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())
    send(conn, "{nope")
    send(conn, create("second"))
    send(conn, json.dumps({"type": "response.cancel"}))  # not queued behind the turn it stops
    assert tunnel.turns[0].cancelled
    assert [f.get("type") for f in channel.frames] == ["response.failed", "error"]
    assert channel.frames[1]["error"]["code"] == "invalid_json"  # then the queue, in order
    assert [t.request.body["model"] for t in tunnel.turns] == ["gpt-5.5", "second"]
    assert len(conn.pending) == 0 and conn.pending_frames == 0


def test_a_queued_frame_keeps_only_its_text_and_is_read_again_when_its_turn_comes(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, create())
    send(conn, create("queued"))
    (waiting,) = conn.pending
    assert waiting.frame is None and not waiting.parsed and waiting.text == create("queued")
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert tunnel.turns[1].request.body == {"model": "queued", "input": [], "stream": True}


def test_the_default_lanes_session_is_the_connections(parts: Any) -> None:
    conn, _, tunnel, _, released = parts
    send(conn, create())
    assert tunnel.turns[0].request.session_id == conn.session_id
    assert conn.session_ids == [conn.session_id]
    conn.connection_lost()
    assert released == [conn.session_id]
