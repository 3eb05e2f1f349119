"""Control frames and the close codes clients act on (docs/protocol.md#control-frames,
docs/protocol.md#close-codes).

* ``response.cancel`` stops the response in flight in its lane: the upstream request is
  aborted (its socket retired) and the client gets ``response.failed`` with status
  ``cancelled``; with nothing to stop, ``response_cancel_not_active``.
* ``response.steer`` / ``response.inject`` go up the upstream WebSocket carrying the targeted
  response; a steer nothing can carry gets ``response.steer.failed``; an inject, like every
  type cch does not know, ``unsupported_event_type``.
* An upstream's close 1009 (our frame too big for it) reaches the client as an error frame and
  a close 1009 of its own, never as an HTTP retry.

Unit tests drive :class:`EdgeConnection` and one :class:`Exchange` in memory; the rest run a
real gateway against the fake upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import test_pool as pool_rig
from conftest import eventually, gateway_config, response_create, start_gateway, within
from test_edge_connection import Channel, Tunnel
from test_pool import Rig, target
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from zope.interface import implementer

from cch.config import LimitsConfig
from cch.edge.connection import EdgeConnection
from cch.handler.continuity import TranscriptRecorder
from cch.handler.metering import TurnMeter
from cch.testing import FakeUpstream
from cch.testing.scripts import SSE_HEADERS, Close, Script, codex_events, hold, ws_close_after
from cch.transcript import Origin, Transcript
from cch.upstream.exchange import NotResent, Ready
from cch.usage.prices import PriceSheet
from cch.wsframes import text_frame_header
from tests.doubles import MemorySink, result_of

rig = pool_rig.rig
make_rig = pool_rig.make_rig
unhandled = pool_rig.unhandled

CREATED_R1 = '{"type":"response.created","response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}'
COMPLETED = {"type": "response.completed", "response": {"id": "resp_1"}}


def create(stream_id: str | None = None, **fields: Any) -> str:
    frame: dict[str, Any] = {"type": "response.create", "model": "m", "input": "hi", **fields}
    if stream_id is not None:
        frame["stream_id"] = stream_id
    return json.dumps(frame)


@pytest.fixture
def parts() -> tuple[EdgeConnection, Channel, Tunnel]:
    channel, tunnel = Channel(), Tunnel()
    conn = EdgeConnection(
        channel=channel, tunnel=tunnel, limits=LimitsConfig(), clock=Clock(), headers={}, session_id="c"
    )
    return conn, channel, tunnel


def send(conn: EdgeConnection, frame: str | dict[str, Any]) -> None:
    text = frame if isinstance(frame, str) else json.dumps(frame)
    conn.text_received(text, len(text.encode("utf-8")))


def started(tunnel: Tunnel, index: int = -1, created: str = CREATED_R1) -> None:
    sink = tunnel.turns[index].sink
    sink.sse_started(200, {})
    sink.sse_event(created, "response.created")


@implementer(IPushProducer)
class ControlProducer:
    """What an upstream WebSocket exchange registers: a producer that also sends control frames."""

    def __init__(self, accepts: bool = True) -> None:
        self.accepts = accepts
        self.sent: list[bytes] = []

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...

    def send_control(self, frame: bytes) -> bool:
        if self.accepts:
            self.sent.append(frame)
        return self.accepts


@implementer(IPushProducer)
class PlainProducer:
    """What an HTTP body registers: no way to send anything up."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


# --- response.cancel ------------------------------------------------------------------------------


def test_cancel_stops_the_default_lanes_turn_and_answers_response_failed_cancelled(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    started(tunnel)
    send(conn, create(input="next"))  # queued behind it
    send(conn, {"type": "response.cancel"})
    assert tunnel.turns[0].cancelled
    assert channel.frames[-1] == {
        "type": "response.failed",
        "response": {"id": "resp_1", "object": "response", "status": "cancelled", "output": []},
    }
    # The lane goes on with its next frame; the connection stays open.
    assert len(tunnel.turns) == 2 and tunnel.turns[1].request.body["input"] == "next"
    assert channel.closes == [] and conn.active == 1


def test_cancel_by_stream_id_stops_only_that_lane(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create("a"))
    send(conn, create("b"))
    started(tunnel, 1)
    send(conn, {"type": "response.cancel", "stream_id": "b"})
    assert [t.cancelled for t in tunnel.turns] == [False, True]
    assert channel.frames[-1]["type"] == "response.failed"
    assert channel.frames[-1]["stream_id"] == "b"
    assert channel.frames[-1]["response"]["status"] == "cancelled"


def test_cancel_by_response_id_finds_its_lane(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create("a"))
    send(conn, create("b"))
    started(tunnel, 0, '{"type":"response.created","response":{"id":"resp_a"}}')
    started(tunnel, 1, '{"type":"response.created","response":{"id":"resp_b"}}')
    send(conn, {"type": "response.cancel", "response_id": "resp_a"})
    assert [t.cancelled for t in tunnel.turns] == [True, False]
    assert channel.frames[-1] == {
        "type": "response.failed",
        "response": {"id": "resp_a", "status": "cancelled"},
        "stream_id": "a",
    }


def test_cancel_before_response_created_still_ends_the_turn(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    send(conn, {"type": "response.cancel"})
    assert tunnel.turns[0].cancelled
    assert channel.frames[-1] == {
        "type": "response.failed",
        "response": {"id": None, "object": "response", "output": [], "status": "cancelled"},
    }


def test_cancel_with_nothing_in_flight_is_an_error_and_changes_nothing(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, {"type": "response.cancel"})
    send(conn, {"type": "response.cancel", "stream_id": "idle-lane"})
    assert channel.frames == [
        {
            "type": "error",
            "status": 400,
            "error": {
                "type": "invalid_request_error",
                "code": "response_cancel_not_active",
                "message": "Cancellation failed: no active response found.",
            },
        },
        {
            "type": "error",
            "status": 400,
            "error": {
                "type": "invalid_request_error",
                "code": "response_cancel_not_active",
                "message": "Cancellation failed: no active response found.",
            },
            "stream_id": "idle-lane",
        },
    ]
    assert tunnel.turns == [] and not conn.closed
    assert conn.lanes.keys() == {None}  # a cancel opens no lane


def test_cancel_naming_another_response_waits_behind_the_lanes_turn(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    started(tunnel)
    send(conn, {"type": "response.cancel", "response_id": "resp_other"})
    assert not tunnel.turns[0].cancelled and channel.frames[-1]["type"] == "response.created"
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert [f["type"] for f in channel.frames] == ["response.created", "response.completed", "error"]
    assert channel.frames[-1]["error"]["code"] == "response_cancel_not_active"


def test_cancel_after_the_terminal_is_too_late(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    started(tunnel)
    tunnel.turns[0].events(COMPLETED)  # the terminal went out; the turn has not settled yet
    send(conn, {"type": "response.cancel"})
    assert not tunnel.turns[0].cancelled
    tunnel.turns[0].finish()
    assert channel.frames[-1]["error"]["code"] == "response_cancel_not_active"


def test_cancel_with_an_invalid_stream_id_is_refused(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    send(conn, {"type": "response.cancel", "stream_id": "no spaces"})
    assert not tunnel.turns[0].cancelled and channel.frames == []
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert channel.frames[-1]["error"]["code"] == "invalid_stream_id"


def test_a_cancelled_turn_that_answers_late_sends_nothing_more(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    started(tunnel)
    send(conn, {"type": "response.cancel"})
    frames = len(channel.frames)
    tunnel.turns[0].sink.sse_event(json.dumps(COMPLETED), "response.completed")
    assert len(channel.frames) == frames


# --- response.steer / response.inject -------------------------------------------------------------


STEER = {"type": "response.steer", "previous_response_id": "resp_1", "input": "also say hi"}


def test_steer_goes_up_the_socket_carrying_the_response_byte_for_byte(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create("a"))
    producer = ControlProducer()
    tunnel.turns[0].sink.register_producer(producer)
    started(tunnel)
    text = '{"type":"response.steer", "previous_response_id":"resp_1","input":"é"}'
    send(conn, text)
    assert producer.sent == [text.encode("utf-8")]
    assert [f["type"] for f in channel.frames] == ["response.created"]  # the upstream answers


def test_a_steer_carrying_a_stream_id_goes_up_without_it(parts: Any) -> None:
    conn, _, tunnel = parts
    send(conn, create("a"))
    producer = ControlProducer()
    tunnel.turns[0].sink.register_producer(producer)
    started(tunnel)
    send(conn, {**STEER, "stream_id": "a"})
    assert [json.loads(frame) for frame in producer.sent] == [STEER]


@pytest.mark.parametrize("producer", [None, PlainProducer(), ControlProducer(accepts=False)])
def test_a_steer_nothing_can_carry_fails_with_steering_not_supported(parts: Any, producer: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create("a"))
    if producer is not None:
        tunnel.turns[0].sink.register_producer(producer)
    started(tunnel)
    send(conn, STEER)
    assert channel.frames[-1] == {
        "type": "response.steer.failed",
        "sequence_number": 0,
        "error": {
            "type": "invalid_request_error",
            "code": "steering_not_supported",
            "message": channel.frames[-1]["error"]["message"],
        },
        "steer": {"previous_response_id": "resp_1", "input": "also say hi"},
        "stream_id": "a",
    }
    assert not tunnel.turns[0].cancelled and not conn.closed


def test_a_steer_for_no_response_in_flight_fails_with_response_not_found(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, STEER)
    send(conn, {"type": "response.steer", "input": "x"})
    assert [(f["type"], f["error"]["code"]) for f in channel.frames] == [
        ("response.steer.failed", "response_not_found"),
        ("response.steer.failed", "invalid_input"),
    ]
    assert "stream_id" not in channel.frames[0]


def test_inject_goes_up_the_socket_carrying_the_response(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    producer = ControlProducer()
    tunnel.turns[0].sink.register_producer(producer)
    started(tunnel)
    inject = {"type": "response.inject", "response_id": "resp_1", "input": [{"type": "function_call_output"}]}
    send(conn, inject)
    assert [json.loads(frame) for frame in producer.sent] == [inject]


def test_an_inject_nothing_can_carry_is_an_unsupported_type_in_order(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    tunnel.turns[0].sink.register_producer(PlainProducer())
    started(tunnel)
    send(conn, {"type": "response.inject", "response_id": "resp_1", "input": []})
    assert [f["type"] for f in channel.frames] == ["response.created"]
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert channel.frames[-1] == {
        "type": "error",
        "error": {
            "code": "unsupported_event_type",
            "message": "Only type=response.create is supported; received: response.inject",
        },
    }


@pytest.mark.parametrize("kind", ["response.interrupted", "session.update", "response.cancelled", "Response.Cancel"])
def test_unknown_frame_types_get_unsupported_event_type_naming_them(parts: Any, kind: str) -> None:
    conn, channel, tunnel = parts
    send(conn, {"type": kind, "stream_id": "a"})
    assert channel.frames == [
        {
            "type": "error",
            "error": {
                "code": "unsupported_event_type",
                "message": f"Only type=response.create is supported; received: {kind}",
            },
        }
    ]
    assert tunnel.turns == [] and not conn.closed


# --- response.interrupt ---------------------------------------------------------------------------

ITEM = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant"}
DONE_ITEM = {**ITEM, "status": "completed", "content": [{"type": "output_text", "text": "ab"}]}
INTERRUPT = {"type": "response.interrupt", "response_id": "resp_1", "mode": "discard_partial_items"}


def test_interrupt_goes_up_the_socket_carrying_the_response_byte_for_byte(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    producer = ControlProducer()
    tunnel.turns[0].sink.register_producer(producer)
    started(tunnel)
    text = '{"type":"response.interrupt", "response_id":"resp_1","mode":"discard_partial_items"}'
    send(conn, text)
    assert producer.sent == [text.encode()]
    assert not tunnel.turns[0].cancelled  # the upstream answers and ends the response
    assert [f["type"] for f in channel.frames] == ["response.created"]


SECOND = {**ITEM, "id": "msg_2"}
ITEMS_SO_FAR = (  # a response with one item done and one open
    {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": ITEM},
    {"type": "response.output_item.done", "sequence_number": 2, "output_index": 0, "item": DONE_ITEM},
    {"type": "response.output_item.added", "sequence_number": 3, "output_index": 1, "item": SECOND},
    {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_2", "delta": "partial"},
)
STOPPED_AS_THE_API_DOES = [  # what the client gets after ITEMS_SO_FAR when cch stops the response
    {"type": "response.interrupt.accepted", "response_id": "resp_1", "sequence_number": 5},
    {
        "type": "response.output_item.interrupted",
        "response_id": "resp_1",
        "item_id": "msg_2",
        "output_index": 1,
        "sequence_number": 6,
    },
    {
        "type": "response.incomplete",
        "sequence_number": 7,
        "response": {
            "id": "resp_1",
            "object": "response",
            "status": "incomplete",
            "output": [DONE_ITEM],  # the partial item is discarded
            "incomplete_details": {"reason": "interrupted"},
        },
    },
]


def test_an_interrupt_nothing_can_carry_stops_the_response_as_the_api_does(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    tunnel.turns[0].sink.register_producer(PlainProducer())
    started(tunnel)
    turn = tunnel.turns[0]
    turn.events(*ITEMS_SO_FAR)
    send(conn, create(input="next"))  # queued behind it
    send(conn, INTERRUPT)
    assert turn.cancelled  # the upstream request is aborted
    assert channel.frames[5:] == STOPPED_AS_THE_API_DOES
    # The lane goes on with its next frame; the connection stays open.
    assert len(tunnel.turns) == 2 and tunnel.turns[1].request.body["input"] == "next"
    assert channel.closes == []


def test_items_that_came_relayed_answer_an_interrupt_the_socket_can_no_longer_carry(parts: Any) -> None:
    # An upstream WebSocket's output items reach the client as relayed frames, a copy kept.
    conn, channel, tunnel = parts
    send(conn, create())
    tunnel.turns[0].sink.register_producer(ControlProducer(accepts=False))  # its socket is going
    started(tunnel)
    relay = tunnel.turns[0].sink.frame_relay()
    payloads = [json.dumps(event).encode() for event in ITEMS_SO_FAR]
    for payload in payloads:
        if b"output_item" in payload:
            relay.keep(payload)
    data = b"".join(text_frame_header(len(p)) + p for p in payloads)
    relay.relay_frames(data, 0, len(data), len(payloads), sum(map(len, payloads)))
    send(conn, INTERRUPT)
    assert tunnel.turns[0].cancelled
    assert channel.frames[1:5] == list(ITEMS_SO_FAR) and channel.frames[5:] == STOPPED_AS_THE_API_DOES


def test_an_interrupt_in_a_lane_answers_in_that_lane(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create("a"))
    tunnel.turns[0].sink.register_producer(PlainProducer())
    started(tunnel)
    send(conn, {**INTERRUPT, "stream_id": "a"})
    assert [(f["type"], f["stream_id"]) for f in channel.frames[1:]] == [
        ("response.interrupt.accepted", "a"),
        ("response.incomplete", "a"),
    ]
    assert channel.frames[-1]["response"]["output"] == []


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "response.interrupt", "mode": "discard_partial_items"}, "invalid_input"),
        ({**INTERRUPT, "response_id": "resp_other"}, "response_not_found"),
        ({**INTERRUPT, "mode": "keep_partial_items"}, "unsupported_interrupt_mode"),
    ],
)
def test_an_interrupt_that_cannot_apply_fails_without_ending_anything(parts: Any, frame: Any, code: str) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    tunnel.turns[0].sink.register_producer(PlainProducer())
    started(tunnel)
    send(conn, frame)
    failed = channel.frames[-1]
    assert failed["type"] == "response.interrupt.failed"
    assert failed["response_id"] == frame.get("response_id")
    assert failed["error"]["code"] == code and failed["error"]["param"] == "response_id"
    # Not an `error` (Codex ends its turn on one): the response goes on.
    assert not tunnel.turns[0].cancelled
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert channel.frames[-1]["type"] == "response.completed" and channel.closes == []


def test_an_interrupt_after_the_terminal_is_too_late(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    tunnel.turns[0].sink.register_producer(PlainProducer())
    started(tunnel)
    tunnel.turns[0].events(COMPLETED)
    send(conn, INTERRUPT)
    assert channel.frames[-1]["type"] == "response.interrupt.failed"
    assert channel.frames[-1]["error"]["code"] == "response_not_found"


# --- an upstream's 1009, as the edge sees it ------------------------------------------------------------


TOO_BIG = json.dumps(
    {"type": "error", "error": {"code": "upstream_message_too_big", "message": "the upstream closed its WebSocket 1009"}}
)


@pytest.mark.parametrize("kind", ["error", None])  # parsed upstream of the edge, or not (HTTP tunnel)
def test_an_upstream_1009_closes_the_client_1009_after_its_error_frame(parts: Any, kind: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create("a"))
    send(conn, create())
    sink = tunnel.turns[0].sink
    sink.sse_started(200, {})
    sink.sse_event(TOO_BIG, kind)
    assert channel.closes == []  # not from inside the upstream's call
    tunnel.turns[0].finish()
    assert channel.log[-2:] == [
        ("frame", {**json.loads(TOO_BIG), "stream_id": "a"}),
        ("close", (1009, "upstream_message_too_big")),
    ]
    assert tunnel.turns[1].cancelled and conn.closed


def test_other_error_terminals_keep_the_connection_open(parts: Any) -> None:
    conn, channel, tunnel = parts
    send(conn, create())
    tunnel.turns[0].events({"type": "error", "error": {"code": "server_error", "message": "upstream_message_too_big"}})
    tunnel.turns[0].finish()
    assert channel.closes == [] and not conn.closed


# --- one exchange: control frames and 1009 ---------------------------------------------------------


def delivering(rig: Rig) -> tuple[Any, Any, MemorySink, Deferred[None]]:
    sock, exchange = rig.ready(target())
    sink = MemorySink()
    done = exchange.deliver(sink)
    return sock, exchange, sink, done


def test_the_exchange_producer_sends_control_frames_up_its_socket(rig: Rig) -> None:
    sock, exchange, sink, done = delivering(rig)
    steer = b'{"type":"response.steer","previous_response_id":"resp_1","input":"x"}'
    assert sink.producer is not None and sink.producer.send_control(steer) is True
    assert sock.sent[-1] == steer.decode()
    sock.message(json.dumps({"type": "response.completed", "response": {"id": "resp_1"}}))
    result_of(done)
    assert exchange.send_control(steer) is False  # over: nothing more goes up


def test_a_steered_response_ends_with_its_successor_and_retires_the_socket(rig: Rig) -> None:
    sock, exchange, sink, done = delivering(rig)
    assert exchange.send_control(b'{"type":"response.steer"}')
    sock.message({"type": "response.steer.accepted", "steer": {"id": "st_1", "previous_response_id": "resp_1"}})
    sock.message({"type": "response.incomplete", "response": {"id": "resp_1", "incomplete_details": {"reason": "steered"}}})
    assert not done.called  # the successor follows on this socket
    sock.message({"type": "response.created", "response": {"id": "resp_2"}})
    sock.message({"type": "response.completed", "response": {"id": "resp_2"}})
    result_of(done)
    assert sink.types == [
        "response.created",
        "response.steer.accepted",
        "response.incomplete",
        "response.created",
        "response.completed",
    ]
    # What the upstream may still owe a steered response must not reach the next turn.
    assert sock.close_code == 1000 and rig.pool.entries == {}


def test_an_interrupted_response_ends_the_turn_and_retires_the_socket(rig: Rig) -> None:
    sock, exchange, sink, done = delivering(rig)
    assert exchange.send_control(json.dumps(INTERRUPT).encode())
    sock.message({"type": "response.interrupt.accepted", "response_id": "resp_1", "sequence_number": 1})
    sock.message(
        {"type": "response.incomplete", "response": {"id": "resp_1", "incomplete_details": {"reason": "interrupted"}}}
    )
    result_of(done)
    assert sink.types == ["response.created", "response.interrupt.accepted", "response.incomplete"]
    # Whatever the upstream still owes the interrupt must not reach the next turn on this socket.
    assert sock.close_code == 1000 and rig.pool.entries == {}


def test_a_steered_turn_counts_both_responses_and_its_successor_can_be_continued(rig: Rig) -> None:
    """The usage row adds up the tokens of the response steering ended and of its successor,
    says how the successor ended, and the transcript can replay the successor: the turn's
    input, the first answer, the steer's input, the successor's answer."""
    transcript = Transcript(1 << 20, 100)
    sock, exchange = rig.ready(target())
    meter = TurnMeter(MemorySink(), Clock(), request_id="r", key=None, model="m", client_transport="websocket")
    turn_input = [{"role": "user", "content": "write a poem"}]
    meter.recorder = TranscriptRecorder(transcript, {"input": turn_input}, Origin("p", "websocket", sock.id, False))
    done = exchange.deliver(meter)
    assert exchange.send_control(b'{"type":"response.steer","previous_response_id":"resp_1","input":"shorter"}')
    first_out = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Roses"}]}]
    second_out = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Ok."}]}]
    usage_1 = {"input_tokens": 10, "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}}
    usage_2 = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 2}
    sock.message(
        {
            "type": "response.incomplete",
            "response": {"id": "resp_1", "output": first_out, "usage": usage_1, "incomplete_details": {"reason": "steered"}},
        }
    )
    sock.message({"type": "response.created", "response": {"id": "resp_2"}})
    sock.message({"type": "response.completed", "response": {"id": "resp_2", "output": second_out, "usage": usage_2}})
    result_of(done)
    row = meter.row(PriceSheet({}), "replica")
    assert (row.status, row.response_id) == ("completed", "resp_2")
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens) == (30, 10, 5, 1)
    assert transcript.replay_input("resp_2") == [
        *turn_input,
        *first_out,
        {"role": "user", "content": "shorter"},
        *second_out,
    ]


def test_an_incomplete_that_was_not_steered_ends_the_turn(rig: Rig) -> None:
    sock, exchange, sink, done = delivering(rig)
    sock.message({"type": "response.incomplete", "response": {"id": "resp_1", "incomplete_details": {"reason": "steered"}}})
    result_of(done)
    assert rig.pool.entries["s1"].conn is sock and sock.state == "open"  # kept for the session


def test_an_upstream_1009_before_the_first_event_is_not_resent(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    sock.closed_by_peer(1009, "frame exceeds 16 MiB")
    outcome = result_of(d)
    assert outcome == NotResent(
        "upstream_message_too_big",
        "the upstream closed its WebSocket 1009 (message too big): frame exceeds 16 MiB",
        log_event="upstream_ws_message_too_big",
    )


def test_an_upstream_1009_mid_stream_ends_the_turn_with_that_error(rig: Rig) -> None:
    sock, exchange, sink, done = delivering(rig)
    sock.closed_by_peer(1009)
    result_of(done)
    assert sink.parsed()[-1] == {
        "type": "error",
        "error": {"code": "upstream_message_too_big", "message": "the upstream closed its WebSocket 1009 (message too big)"},
    }


def test_other_close_codes_before_the_first_event_still_fall_back(rig: Rig) -> None:
    d = rig.exchange(target())
    sock = rig.sockets.last
    sock.open()
    sock.closed_by_peer(1011)
    assert not isinstance(result_of(d), (NotResent, Ready))


# --- through a real gateway ----------------------------------------------------------------------------


async def turn_of(client: Any, what: str = "a turn") -> list[Any]:
    return await within(Deferred.fromCoroutine(client.recv_turn()), what)


def held(recorded: Any) -> Script:
    """``response.created``, then nothing until the peer goes away."""
    return hold(codex_events(recorded)[:1])


@pytest.mark.parametrize("upstream", ["websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_cancel_aborts_the_upstream_request_and_the_lane_goes_on(fake: FakeUpstream, upstream: str) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream=upstream))
    try:
        fake.enqueue(held)
        client = await gateway.connect()
        client.send_json(response_create(stream_id="work"))
        created = await within(client.recv(), "response.created")
        assert created["type"] == "response.created" and created["stream_id"] == "work"
        client.send_json({"type": "response.cancel", "stream_id": "work"})
        (terminal,) = await turn_of(client, "the cancelled terminal")
        assert terminal == {
            "type": "response.failed",
            "response": {**created["response"], "status": "cancelled"},
            "stream_id": "work",
        }
        # The upstream request was aborted: nothing more is billed.
        await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")
        if upstream == "websocket":
            await within(fake.wait_for_ws_close(0), "the upstream socket to be retired")
        # The lane goes on.
        client.send_json(response_create(stream_id="work"))
        events = await turn_of(client)
        assert events[-1]["type"] == "response.completed" and events[-1]["stream_id"] == "work"
        assert client.close_info is None
        assert gateway.service.handler.active == 0
    finally:
        await gateway.stop()


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("response.steer", ',"input":[{"role":"user","content":"and then?"}]'),
        ("response.interrupt", ',"mode":"discard_partial_items"'),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_control_frame_reaches_the_upstream_socket_of_its_response_as_written(
    fake: FakeUpstream, kind: str, fields: str
) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        fake.enqueue(held)
        client = await gateway.connect()
        client.send_json(response_create(stream_id="s"))
        created = await within(client.recv(), "response.created")
        rid = created["response"]["id"]
        named = "previous_response_id" if kind == "response.steer" else "response_id"
        control = f'{{"type":"{kind}","{named}":"{rid}"{fields}}}'
        client.send_text(control)
        await eventually(lambda: len(fake.ws_connections[0].turns) == 2, "the frame to reach the upstream")
        assert fake.ws_connections[0].turns[1].raw == control.encode()
        # With a stream_id (the lane is cch's), the frame goes up without it.
        client.send_text(control[:-1] + ',"stream_id":"s"}')
        await eventually(lambda: len(fake.ws_connections[0].turns) == 3, "the second frame to reach the upstream")
        assert fake.ws_connections[0].turns[2].body == json.loads(control)
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_interrupt_over_http_stops_the_upstream_and_the_client_gets_the_apis_ending(fake: FakeUpstream) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="http"))
    try:
        fake.enqueue(lambda recorded: hold(codex_events(recorded)[:4]))  # created … a first delta
        client = await gateway.connect()
        client.send_json(response_create())
        events = [await within(client.recv(), f"event {n}") for n in range(4)]
        rid = events[0]["response"]["id"]
        client.send_json({"type": "response.interrupt", "response_id": rid, "mode": "discard_partial_items"})
        accepted, item_interrupted, terminal = [await within(client.recv(), f"answer {n}") for n in range(3)]
        assert accepted == {"type": "response.interrupt.accepted", "response_id": rid, "sequence_number": 4}
        assert item_interrupted["type"] == "response.output_item.interrupted"
        assert item_interrupted["item_id"] == events[2]["item"]["id"]
        assert terminal["type"] == "response.incomplete"
        assert terminal["response"]["id"] == rid and terminal["response"]["output"] == []
        assert terminal["response"]["incomplete_details"] == {"reason": "interrupted"}
        await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")
        # The connection goes on.
        client.send_json(response_create())
        assert (await turn_of(client))[-1]["type"] == "response.completed"
        assert client.close_info is None
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_steer_over_an_http_upstream_fails_with_steering_not_supported(fake: FakeUpstream) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="http"))
    try:
        fake.enqueue(held)
        client = await gateway.connect()
        client.send_json(response_create())
        created = await within(client.recv(), "response.created")
        client.send_json({"type": "response.steer", "previous_response_id": created["response"]["id"], "input": "x"})
        failed = await within(client.recv(), "response.steer.failed")
        assert failed["type"] == "response.steer.failed"
        assert failed["error"]["code"] == "steering_not_supported"
        assert "stream_id" not in failed
        assert len(fake.requests) == 1  # nothing went anywhere
    finally:
        await gateway.stop()


@pytest.mark.parametrize("first_event", [False, True])
@pytest_twisted.ensureDeferred
async def test_an_upstream_1009_is_mirrored_to_the_client(fake: FakeUpstream, first_event: bool) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        if first_event:
            fake.enqueue(lambda recorded: ws_close_after(codex_events(recorded), 1, 1009, "too big"))
        else:
            fake.enqueue(Script((Close(1009, "too big"),), headers=SSE_HEADERS))
        client = await gateway.connect()
        client.send_json(response_create())
        events = await turn_of(client)
        assert events[-1] == {
            "type": "error",
            "error": {
                "code": "upstream_message_too_big",
                "message": "the upstream closed its WebSocket 1009 (message too big): too big",
            },
        }
        info = await within(client.wait_closed(), "the close")
        assert (info.code, info.reason) == (1009, "upstream_message_too_big")
        # Never sent again, over HTTP or anything else.
        assert [r.transport for r in fake.requests] == ["websocket"]
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_plain_event_stream_still_works_after_lanes_and_controls(fake: FakeUpstream) -> None:
    """A Codex-like session (warm-up, turn) on the default lane is untouched by any of this."""
    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        client = await gateway.connect()
        client.send_json(response_create(generate=False))
        warm = await turn_of(client, "warm-up")
        client.send_json(response_create(previous_response_id=warm[-1]["response"]["id"]))
        events = await turn_of(client)
        assert [e["type"] for e in events][-1] == "response.completed"
        assert len(fake.ws_connections) == 1 and all("stream_id" not in e for e in warm + events)
    finally:
        await gateway.stop()


def test_answers_echoing_a_lone_surrogate_stay_valid_utf8(parts: Any) -> None:
    conn, channel, tunnel = parts
    raw: list[str] = []
    channel.send_text = lambda text: raw.append(text)  # type: ignore[method-assign]
    send(conn, '{"type":"response.steer","previous_response_id":"resp_x","input":"\\ud800"}')
    send(conn, create())
    started(tunnel, 0, '{"type":"response.created","response":{"id":"resp_1","note":"\\udfff"}}')
    send(conn, {"type": "response.cancel"})
    assert [json.loads(text)["type"] for text in raw] == ["response.steer.failed", "response.created", "response.failed"]
    for text in raw:
        text.encode("utf-8")  # a frame a WebSocket can carry
    assert json.loads(raw[0])["steer"]["input"] == "\ud800"


def test_a_steer_with_a_lone_surrogate_goes_up_as_valid_utf8(parts: Any) -> None:
    conn, _, tunnel = parts
    send(conn, create("a"))
    producer = ControlProducer()
    tunnel.turns[0].sink.register_producer(producer)
    started(tunnel)
    send(conn, '{"type":"response.steer","previous_response_id":"resp_1","input":"\\ud800","stream_id":"a"}')
    (frame,) = producer.sent
    frame.decode("utf-8")
    assert json.loads(frame) == {"type": "response.steer", "previous_response_id": "resp_1", "input": "\ud800"}


def test_a_consumer_that_goes_away_on_the_terminal_leaves_the_exchange_settled(rig: Rig) -> None:
    """The client's socket is found gone while the terminal is written: the edge cancels the
    turn from inside the exchange's call; the exchange must not go on as if it still had a sink."""
    sock, exchange = rig.ready(target())

    class Leaving(MemorySink):
        def sse_event(self, data: str, kind: str | None = None) -> None:
            super().sse_event(data, kind)
            if kind == "response.completed":
                done.cancel()

    done = exchange.deliver(Leaving())
    cancelled: list[Any] = []
    done.addErrback(cancelled.append)
    sock.message({"type": "response.completed", "response": {"id": "resp_1"}})
    assert len(cancelled) == 1 and exchange.finished
    assert sock.close_code == 1000 and rig.pool.entries == {}
