"""One client WebSocket connection's rules: the inbound queue, lanes, turns, control frames, closes.

The Autobahn protocol only turns bytes into calls on :class:`EdgeConnection`; every rule of
docs/reference-behaviour.md for a connection (from "The client connection" to "Error frames")
and of docs/protocol.md (lanes, control frames, close codes) lives here, testable without a
transport.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from cch.config import LimitsConfig
from cch.edge.frames import (
    DONE_FRAME,
    FrameRejected,
    create_body,
    frame_type,
    load_client_frame,
    parse_client_frame,
    translate_json_response,
    translate_sse_data,
)
from cch.handler import errors
from cch.jsoncodec import dumps_bytes, loads
from cch.metrics import EdgeStats
from cch.turn import Tunnel, TurnRequest, TurnTransportError, UpstreamControl
from cch.wire import (
    CANCEL,
    CLOSE_MESSAGE_TOO_BIG,
    CONTROL_EVENT_TYPES,
    DISCARD_PARTIAL_ITEMS,
    INTERRUPT,
    ITEM_ADDED,
    ITEM_DONE,
    MAX_ACTIVE_RESPONSES,
    MAX_STREAM_IDS,
    MESSAGE_TOO_BIG,
    STEER,
    TERMINAL_EVENT_TYPES,
    cancel_not_active,
    cancelled,
    error_code,
    error_event,
    interrupt_accepted,
    interrupt_failed,
    interrupted,
    invalid_stream_id,
    item_interrupted,
    response_of,
    steer_failed,
    stream_limit,
    valid_stream_id,
    with_stream_id,
)
from cch.wsframes import frame_payloads

log = Logger()


CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011


class EdgeChannel(Protocol):
    """What a connection needs from its transport."""

    def send_text(self, text: str) -> int | None:
        """Queue a text frame; the bytes written, 0 when the socket is no longer open."""

    def send_frames(self, data: bytes, start: int, end: int) -> int | None:
        """Queue ``data[start:end]``, complete final text frames as an upstream server framed
        them (unmasked, uncompressed), as they are (each compressed if the connection
        negotiated permessage-deflate); 0 when the socket is no longer open."""

    def send_close(self, code: int, reason: str) -> None: ...

    def pause_reading(self) -> None:
        """Stop reading from the client (its outbound buffer is over the high-water mark)."""

    def resume_reading(self) -> None: ...


class _Waiting:
    """A text frame waiting in its lane: its text and size, the parsed frame when it was kept
    (a frame about to start is parsed once; one that must wait is parsed again when its turn
    comes, so the queue holds no more than the text), or the answer already decided for it."""

    __slots__ = ("frame", "parsed", "reply", "size", "text")

    def __init__(self, text: str, size: int, frame: Any = None, *, parsed: bool = False, reply: str | None = None):
        self.text = text
        self.size = size
        self.frame = frame
        self.parsed = parsed
        self.reply = reply


class Lane:
    """One lane of a connection (docs/protocol.md#lanes): the default one (``stream_id``
    None) or a named one. Frames run in order within a lane; lanes run side by side. Each has
    its own session id, so its own upstream socket and transcript, released when the
    connection closes."""

    __slots__ = ("in_flight", "pending", "ready", "session_id", "stream_id")

    def __init__(self, stream_id: str | None, session_id: str) -> None:
        self.stream_id = stream_id
        self.session_id = session_id
        self.pending: deque[_Waiting] = deque()
        self.in_flight: _Turn | None = None
        self.ready = False  # waiting in the connection's run queue for a slot


class _Turn:
    """One in-flight ``response.create``: the sink its response is reported to."""

    def __init__(self, conn: EdgeConnection, lane: Lane, turn_id: int) -> None:
        self.conn = conn
        self.lane = lane
        self.stream_id = lane.stream_id  # added to every frame of a named lane's turn
        self.turn_id = turn_id
        self.deferred: Deferred[Any] | None = None
        self.terminal_seen = False
        self.terminal_type: str | None = None
        self.producer: IPushProducer | None = None
        self.dead = False
        self.sent = False  # has any frame of this turn reached the client?
        self.reported = False
        self.created: str | None = None  # the latest response.created, unparsed until asked
        self.close_code: int | None = None  # the connection closes so once the turn is over
        self.request_id = os.urandom(16).hex()  # in every log line of this turn
        self.started_at = conn.clock.seconds()
        self.first_event_at: float | None = None
        self.frames = 0
        self.bytes = 0
        # output_item.added/done events, unparsed (for an interrupt): text, or the bytes of a
        # relayed frame
        self.items: list[str | bytes] = []

    # ResponseSink
    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        pass

    def sse_event(self, data: str, kind: str | None = None) -> None:
        if self.dead:
            return
        if kind is not None:
            # The per-event hot path: a JSON object event, already parsed upstream of here,
            # goes out byte for byte.
            if kind == "response.created":
                self.created = data
            elif kind == ITEM_ADDED or kind == ITEM_DONE:
                self.items.append(data)
            self._send(data, kind if kind in TERMINAL_EVENT_TYPES else None, "sse")
            return
        if data == "[DONE]":
            if self.terminal_seen:
                return
            self._send(DONE_FRAME.text, DONE_FRAME.terminal, "sse", synthesized=True)
            return
        frame = translate_sse_data(data)
        if frame.kind == "response.created":
            self.created = frame.text
        elif frame.kind == ITEM_ADDED or frame.kind == ITEM_DONE:
            self.items.append(frame.text)
        self._send(frame.text, frame.terminal, "sse")

    def frame_relay(self) -> _Turn | None:
        """Upstream frames nobody reads come here whole (cch.wsframes.FrameRelay)."""
        return None if self.dead else self

    def relay_frames(self, data: bytes, start: int, end: int, count: int, size: int) -> None:
        if self.dead:
            return
        if self.stream_id is not None:
            # A named lane's events carry its stream_id: each is rewritten (its UTF-8 was checked).
            for payload in frame_payloads(data, start, end):
                self._send(payload.decode("utf-8"), None, "sse")
            return
        if self.conn.channel.send_frames(data, start, end) == 0:
            self._send_failed()
            return
        self.frames += count
        self.bytes += size

    def keep(self, payload: bytes) -> None:
        if not self.dead:
            self.items.append(payload)

    def json_body(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        if self.dead:
            return
        frame = translate_json_response(status, body)
        self._send(frame.text, frame.terminal, "json", status=status)

    def register_producer(self, producer: IPushProducer) -> None:
        self.producer = producer
        if self.conn.paused and not self.dead:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self.producer = None

    def _send(
        self, text: str, terminal: str | None, source: str, *, status: int | None = None, synthesized: bool = False
    ) -> None:
        if self.stream_id is not None:
            text = with_stream_id(text, self.stream_id)
        written = self.conn.channel.send_text(text)
        if written == 0:
            self._send_failed()
            return
        if not self.sent:
            self.sent = True
            self.first_event_at = self.conn.clock.seconds()
        self.frames += 1
        self.bytes += written if written is not None else len(text)
        if terminal is not None and not self.terminal_seen:
            self.terminal_seen = True
            self.terminal_type = None if synthesized else terminal
            if terminal == "error" and MESSAGE_TOO_BIG in text and error_code(text) == MESSAGE_TOO_BIG:
                # The upstream refused the frame with 1009: the client hears it the same way.
                self.close_code = CLOSE_MESSAGE_TOO_BIG
            if status is not None and terminal == "error":
                log.info("ws_terminal_event_sent", type=terminal, source=source, status=status, request_id=self.request_id)
            else:
                log.info("ws_terminal_event_sent", type=terminal, source=source, request_id=self.request_id)

    def _send_failed(self) -> None:
        log.warn("ws_send_failed", reason="outbound_socket_closed")
        self.conn.close(CLOSE_INTERNAL_ERROR, "outbound_socket_closed")

    # What control frames need to know

    @property
    def response(self) -> dict[str, Any] | None:
        """The response object of this turn's ``response.created``, once it arrived."""
        return response_of(self.created) if self.created is not None else None

    @property
    def response_id(self) -> str | None:
        response = self.response
        found = response.get("id") if response is not None else None
        return found if isinstance(found, str) else None

    def cancel(self) -> None:
        """Stop the turn: nothing more is sent, and the upstream request is aborted."""
        if self.dead:
            return
        self.dead = True
        self.producer = None
        if self.deferred is not None:
            self.deferred.cancel()


@implementer(IPushProducer)
class EdgeConnection:
    """The state of one client connection (docs/reference-behaviour.md#the-client-connection).

    It is also the push producer registered on the client transport: when the client stops
    reading, the transport pauses it and it pauses the producers of the turns in flight, so
    TCP backpressure reaches the upstream instead of piling frames up in memory. It also
    stops reading from the client until the buffer drains: what a client sends may make the
    gateway write (a ping is answered with a pong), so a client that sends and never reads
    would otherwise grow the buffer without end. Once the connection is closing, reading
    goes on, so the client's close frame is seen.

    Frames run in lanes (docs/protocol.md#lanes): the default lane, which behaves exactly as
    the reference's one-turn-at-a-time connection, and up to 32 named ones (``stream_id``),
    each in order, side by side, at most 16 turns in flight at once. The queue limits count
    every lane's waiting frames together.
    """

    def __init__(
        self,
        *,
        channel: EdgeChannel,
        tunnel: Tunnel,
        limits: LimitsConfig,
        clock: IReactorTime,
        headers: dict[str, str],
        query_model: str | None = None,
        session_id: str | None = None,
        on_close_decided: Callable[[Any], None] | None = None,
        stats: EdgeStats | None = None,
    ) -> None:
        """``on_close_decided`` is called once the connection is closing, with the connection
        and then with each named lane: each has the ``session_id`` whose upstream socket and
        transcript are to be released."""
        self.channel = channel
        self.tunnel = tunnel
        self.limits = limits
        self.clock = clock
        self.headers = headers
        self.query_model = query_model
        self.session_id = session_id or str(uuid.uuid4())
        self._on_close_decided = on_close_decided
        self.stats = stats if stats is not None else EdgeStats()
        self.default_lane = Lane(None, self.session_id)
        self.lanes: dict[str | None, Lane] = {None: self.default_lane}
        self.pending = self.default_lane.pending  # the default lane's waiting frames
        self.pending_frames = 0  # waiting frames, every lane
        self.pending_bytes = 0
        self.active = 0  # turns in flight, every lane
        self._ready: deque[Lane] = deque()  # lanes whose next frame waits for a slot, in order
        self.closed = False
        self.leaving = False  # draining: close 1001 as soon as no turn is in flight
        self.paused = False
        self._reading_paused = False
        self.turns_started = 0
        self._draining = False
        self._send_deadline: IDelayedCall | None = None

    @property
    def in_flight(self) -> _Turn | None:
        """The default lane's turn in flight."""
        return self.default_lane.in_flight

    @property
    def session_ids(self) -> list[str]:
        """Every session this connection holds upstream: its own and each named lane's."""
        return [lane.session_id for lane in self.lanes.values()]

    def _turns(self) -> list[_Turn]:
        return [lane.in_flight for lane in self.lanes.values() if lane.in_flight is not None]

    # -- inbound --------------------------------------------------------------------------

    def text_received(self, text: str, size: int) -> None:
        """A text message arrived: a control frame acts now, any other frame queues in its lane
        (docs/reference-behaviour.md#inbound-frames-and-the-queue, docs/protocol.md)."""
        if self.closed:
            return
        self.stats.frame_in(size)
        limits = self.limits
        if self.pending_frames >= limits.max_pending_frames or self.pending_bytes + size > limits.max_pending_bytes:
            log.warn(
                "ws_pending_overflow",
                pendingFrames=self.pending_frames,
                pendingBytes=self.pending_bytes,
                attemptedFrameSize=size,
            )
            self.stats.overflow()
            self.close(
                CLOSE_POLICY_VIOLATION,
                "too_many_requests",
                error=("too_many_requests", "Pending frame limit exceeded"),
            )
            return
        try:
            frame = load_client_frame(text)
        except FrameRejected:
            self._enqueue(self.default_lane, _Waiting(text, size))  # answered in its turn
            return
        kind = frame_type(frame)
        if isinstance(kind, str) and kind in CONTROL_EVENT_TYPES:
            self._control(kind, frame, text, size)
            return
        lane = self.default_lane
        if kind == "response.create":
            stream_id = frame.get("stream_id")
            if stream_id is not None:
                if not valid_stream_id(stream_id):
                    self._enqueue(self.default_lane, _Waiting(text, size, reply=invalid_stream_id()))
                    return
                found = self._lane(stream_id)
                if found is None:
                    log.warn("ws_stream_limit_reached", lanes=MAX_STREAM_IDS)
                    self._send_frame(stream_limit(stream_id))
                    return
                lane = found
        self._enqueue(lane, _Waiting(text, size, frame, parsed=True))

    def binary_received(self) -> None:
        """Binary frames are refused at once, even while a turn streams
        (docs/reference-behaviour.md#inbound-frames-and-the-queue)."""
        if self.closed:
            return
        self.close(
            CLOSE_UNSUPPORTED_DATA,
            "binary_not_supported",
            error=("invalid_frame_type", "Only text WebSocket frames are supported"),
        )

    def _lane(self, stream_id: str) -> Lane | None:
        """The named lane, opened on first use; None past :data:`MAX_STREAM_IDS` of them."""
        lane = self.lanes.get(stream_id)
        if lane is None:
            named = len(self.lanes) - 1
            if named >= MAX_STREAM_IDS:
                return None
            lane = self.lanes[stream_id] = Lane(stream_id, f"{self.session_id}.{named + 1}")
            log.debug("ws_lane_opened", lanes=named + 1)
        return lane

    def _enqueue(self, lane: Lane, waiting: _Waiting) -> None:
        if waiting.parsed and not (lane.in_flight is None and not lane.pending and self.active < MAX_ACTIVE_RESPONSES):
            # It has to wait: keep its text only, parse it again when its turn comes.
            waiting.frame, waiting.parsed = None, False
        lane.pending.append(waiting)
        self.pending_frames += 1
        self.pending_bytes += waiting.size
        self._mark_ready(lane)
        self._drain()

    def _mark_ready(self, lane: Lane) -> None:
        if lane.in_flight is None and lane.pending and not lane.ready:
            lane.ready = True
            self._ready.append(lane)

    # -- control frames (docs/protocol.md#control-frames) ----------------------------------

    def _control(self, kind: str, frame: dict[str, Any], text: str, size: int) -> None:
        if kind == CANCEL:
            self._cancel(frame, text, size)
        elif kind == STEER:
            self._steer(frame, text)
        elif kind == INTERRUPT:
            self._interrupt(frame, text)
        else:
            self._inject(frame, text, size)

    def _turn_of(self, response_id: Any) -> _Turn | None:
        """The turn in flight whose ``response.created`` named ``response_id``."""
        if not isinstance(response_id, str):
            return None
        for turn in self._turns():
            if not turn.dead and turn.created is not None and turn.response_id == response_id:
                return turn
        return None

    def _cancel(self, frame: dict[str, Any], text: str, size: int) -> None:
        """``response.cancel``: stop the response in flight in the lane ``stream_id`` names (the
        default lane without one), or the one ``response_id`` names."""
        stream_id = frame.get("stream_id")
        response_id = frame.get("response_id")
        if stream_id is not None and not valid_stream_id(stream_id):
            self._enqueue(self.default_lane, _Waiting(text, size, reply=invalid_stream_id()))
            return
        turn: _Turn | None
        if stream_id is None and isinstance(response_id, str):
            turn = self._turn_of(response_id)
            lane: Lane | None = turn.lane if turn is not None else self.default_lane
        else:
            lane = self.lanes.get(stream_id)
            turn = lane.in_flight if lane is not None else None
            if turn is not None and isinstance(response_id, str) and turn.response_id != response_id:
                turn = None
        if turn is None or turn.dead or turn.terminal_seen:
            answer = cancel_not_active()
            if stream_id is not None:
                answer = with_stream_id(answer, stream_id)
            log.info("ws_cancel_not_active")
            if lane is not None and lane.in_flight is not None:
                # After the lane's turn in flight: an error in the middle of it would end it.
                self._enqueue(lane, _Waiting(text, size, reply=answer))
            else:
                self._send_frame(answer)
            return
        self._cancel_turn(turn)

    def _cancel_turn(self, turn: _Turn) -> None:
        log.info("ws_turn_cancelled", request_id=turn.request_id)
        response = turn.response
        turn.cancel()  # the upstream request is aborted, its socket retired
        turn._send(cancelled(response), "response.failed", "cancel")
        if self.closed:
            return
        self._release(turn)
        self._drain()

    def _interrupt(self, frame: dict[str, Any], text: str) -> None:
        """``response.interrupt``: sent up the socket carrying the response it names, or the
        response is stopped here as the API would (docs/protocol.md#control-frames); with no
        such response in flight, ``response.interrupt.failed``."""
        response_id = frame.get("response_id")
        stream_id = frame.get("stream_id")
        lane_of = (lambda answer: with_stream_id(answer, stream_id)) if valid_stream_id(stream_id) else str
        if not isinstance(response_id, str) or not response_id:
            log.info("ws_control_refused", type=INTERRUPT, code="invalid_input")
            self._send_frame(lane_of(interrupt_failed(response_id, "invalid_input", "response.interrupt needs a response_id string.")))
            return
        turn = self._turn_of(response_id)
        if turn is None or turn.terminal_seen:
            log.info("ws_control_refused", type=INTERRUPT, code="response_not_found")
            message = f"Response '{response_id}' is not in progress on this connection."
            self._send_frame(lane_of(interrupt_failed(response_id, "response_not_found", message)))
            return
        if self._forward(turn, frame, text):
            return
        mode = frame.get("mode", DISCARD_PARTIAL_ITEMS)
        if mode != DISCARD_PARTIAL_ITEMS:
            log.info("ws_control_refused", type=INTERRUPT, code="unsupported_interrupt_mode", request_id=turn.request_id)
            message = f"Interrupt mode {mode!r} is not supported; use {DISCARD_PARTIAL_ITEMS!r}."
            self._send_frame(lane_of(interrupt_failed(response_id, "unsupported_interrupt_mode", message)))
            return
        self._interrupt_turn(turn, response_id)

    def _interrupt_turn(self, turn: _Turn, response_id: str) -> None:
        """Stop a response no upstream socket can interrupt: its upstream request is aborted
        and the client gets what an upstream sends, in order — ``response.interrupt.accepted``,
        ``response.output_item.interrupted`` for each item still open, ``response.incomplete``
        (reason ``interrupted``) with the items that were done."""
        log.info("ws_turn_interrupted", request_id=turn.request_id)
        response = turn.response
        open_items: dict[Any, tuple[Any, dict[str, Any]]] = {}
        done: list[dict[str, Any]] = []
        for text in turn.items:
            try:
                event = loads(text)
            except ValueError:
                continue
            item = event.get("item") if isinstance(event, dict) else None
            if not isinstance(item, dict):
                continue
            key = item.get("id", event.get("output_index"))
            if event.get("type") == ITEM_ADDED:
                open_items[key] = (event.get("output_index"), item)
            else:
                open_items.pop(key, None)
                done.append(item)
        turn.cancel()  # the upstream request is aborted
        sequence = turn.frames  # the response's events so far, numbered from 0
        turn._send(interrupt_accepted(response_id, sequence), None, "interrupt")
        for index, item in open_items.values():
            sequence += 1
            turn._send(item_interrupted(response_id, item, index, sequence), None, "interrupt")
        turn._send(interrupted(response, done, sequence + 1), "response.incomplete", "interrupt")
        if self.closed:
            return
        self._release(turn)
        self._drain()

    def _steer(self, frame: dict[str, Any], text: str) -> None:
        """``response.steer``: sent up the socket carrying the targeted response, or answered
        with ``response.steer.failed``."""
        previous = frame.get("previous_response_id")
        steer = {"previous_response_id": previous, "input": frame.get("input")}
        if not isinstance(previous, str):
            self._send_frame(steer_failed("invalid_input", "response.steer needs a previous_response_id string.", steer))
            return
        turn = self._turn_of(previous)
        if turn is None:
            log.info("ws_control_refused", type=STEER, code="response_not_found")
            self._send_frame(
                steer_failed("response_not_found", f"Response '{previous}' is not in progress on this connection.", steer)
            )
            return
        if self._forward(turn, frame, text):
            return
        log.info("ws_control_refused", type=STEER, code="steering_not_supported", request_id=turn.request_id)
        answer = steer_failed(
            "steering_not_supported",
            "Steering needs the response to run on an upstream Responses WebSocket; this one does not.",
            steer,
        )
        self._send_frame(answer if turn.stream_id is None else with_stream_id(answer, turn.stream_id))

    def _inject(self, frame: dict[str, Any], text: str, size: int) -> None:
        """``response.inject`` (beta): sent up the socket carrying the targeted response; any
        other is answered as a type cch does not support, in the default lane's order."""
        turn = self._turn_of(frame.get("response_id"))
        if turn is not None and self._forward(turn, frame, text):
            return
        log.info("ws_control_refused", type=frame.get("type"), code="unsupported_event_type")
        self._enqueue(self.default_lane, _Waiting(text, size, frame, parsed=True))

    def _forward(self, turn: _Turn, frame: dict[str, Any], text: str) -> bool:
        control = turn.producer
        if not isinstance(control, UpstreamControl):
            return False
        if "stream_id" in frame:  # the lane is ours; the upstream socket has none
            payload = dumps_bytes({k: v for k, v in frame.items() if k != "stream_id"})
        else:
            payload = text.encode("utf-8")  # as the client wrote it
        if not control.send_control(payload):
            return False
        log.info("ws_control_forwarded", type=frame.get("type"), request_id=turn.request_id)
        return True

    # -- turns ----------------------------------------------------------------------------

    def leave(self) -> None:
        """The gateway is draining: let the turns in flight finish, then close 1001."""
        self.leaving = True
        if self.active == 0:
            self.close(CLOSE_GOING_AWAY, "going_away")

    def _drain(self) -> None:
        if self._draining:
            return
        if self.leaving:
            if self.active == 0:
                self.close(CLOSE_GOING_AWAY, "going_away")
            return
        self._draining = True
        try:
            while not self.closed and self._ready and self.active < MAX_ACTIVE_RESPONSES:
                lane = self._ready.popleft()
                lane.ready = False
                waiting = lane.pending.popleft()
                self.pending_frames -= 1
                self.pending_bytes = max(0, self.pending_bytes - waiting.size)
                self._start_turn(lane, waiting)
                self._mark_ready(lane)  # answered at once (an error frame): its next one
        except Exception:
            log.failure("ws_drain_failed", level=LogLevel.error)
            first = self.turns_started <= 1
            self.close(
                CLOSE_INTERNAL_ERROR,
                "internal_error",
                error=(
                    "internal_error",
                    "Failed to process request" if first else "Failed to process queued request",
                ),
            )
        finally:
            self._draining = False

    def _start_turn(self, lane: Lane, waiting: _Waiting) -> None:
        self.turns_started += 1
        if waiting.reply is not None:
            self._send_frame(waiting.reply)
            return
        try:
            if waiting.parsed:
                body = create_body(waiting.frame, self.query_model)
            else:
                body = parse_client_frame(waiting.text, self.query_model)
        except FrameRejected as rejected:
            self._send_frame(error_event(rejected.code, rejected.message))
            return
        model = body.get("model")
        turn = _Turn(self, lane, self.turns_started)
        lane_field = {} if lane.stream_id is None else {"streamId": lane.stream_id}
        log.info(
            "ws_request_started",
            model=model if isinstance(model, str) else None,
            payloadBytes=waiting.size,
            hasPreviousResponseId=isinstance(body.get("previous_response_id"), str),
            request_id=turn.request_id,
            **lane_field,
        )
        lane.in_flight = turn
        self.active += 1
        self.stats.turn_started()
        request = TurnRequest(
            session_id=lane.session_id,
            headers=self.headers,
            body=body,
            request_id=turn.request_id,
        )
        d = self.tunnel.run_turn(request, turn)
        turn.deferred = d
        d.addCallbacks(self._turn_succeeded, self._turn_failed, (turn,), None, (turn,), None)

    def _turn_succeeded(self, _: object, turn: _Turn) -> None:
        if turn.dead:
            return
        if not turn.terminal_seen:
            self._turn_fatal(
                turn,
                "stream_ended_without_terminal",
                "Upstream stream ended before emitting a terminal response event",
            )
            return
        log.info("ws_turn_completed", terminalEventType=turn.terminal_type, request_id=turn.request_id)
        self._release(turn)
        if turn.close_code is not None:
            # Its error frame is out already (docs/protocol.md#close-codes).
            self.close(turn.close_code, MESSAGE_TOO_BIG)
            return
        self._drain()

    def _turn_failed(self, failure: Failure, turn: _Turn) -> None:
        if turn.dead or failure.check(CancelledError):
            return
        if turn.terminal_seen:
            # The body broke after the terminal event: the turn is complete
            # (docs/reference-behaviour.md#one-turn-at-a-time).
            self._release(turn)
            if turn.close_code is not None:
                self.close(turn.close_code, MESSAGE_TOO_BIG)
                return
            self._drain()
            return
        if failure.check(TurnTransportError):
            err: TurnTransportError = failure.value  # type: ignore[assignment]
            self._turn_fatal(turn, err.code, err.message)
            return
        log.failure("ws_turn_crashed", failure, level=LogLevel.error)
        if turn.sent:
            # Half a response went out: the same as an HTTP tunnel whose response broke.
            self._turn_fatal(
                turn,
                "internal_response_closed",
                "Internal response closed before emitting a terminal response event",
            )
            return
        # Nothing went out: the same per-turn 500 error frame the HTTP tunnel would deliver.
        turn.json_body(500, errors.INTERNAL_ERROR, "application/json")
        self._release(turn)
        self._drain()

    def _turn_fatal(self, turn: _Turn, code: str, message: str) -> None:
        self._release(turn)
        self.close(CLOSE_INTERNAL_ERROR, code, error=(code, message), stream_id=turn.stream_id)

    def _report(self, turn: _Turn) -> None:
        """Account for a turn once, whichever way it ends."""
        if turn.reported:
            return
        turn.reported = True
        first = turn.first_event_at - turn.started_at if turn.first_event_at is not None else None
        terminal = turn.terminal_type or ("response.completed" if turn.terminal_seen else None)
        self.stats.turn_finished(terminal, self.clock.seconds() - turn.started_at, first, turn.frames, turn.bytes)

    def _release(self, turn: _Turn) -> None:
        self._report(turn)
        turn.dead = True
        turn.producer = None
        lane = turn.lane
        if lane.in_flight is turn:
            lane.in_flight = None
            self.active -= 1
            self._mark_ready(lane)
        log.debug("ws_turn_resources_released", turnId=turn.turn_id, request_id=turn.request_id)

    # -- closing --------------------------------------------------------------------------

    def close(self, code: int, reason: str, error: tuple[str, str] | None = None, stream_id: str | None = None) -> None:
        """Server-initiated close: stop everything first, then flush the error frame (of the
        lane ``stream_id`` when a turn of a named lane failed) and the close frame, in that
        order (docs/reference-behaviour.md#close-means-stop)."""
        if self.closed:
            return
        self._stop_everything()
        self.stats.closed(code, reason)
        log.info("ws_client_close_initiated", code=code, reason=reason)
        if error is not None:
            text = error_event(*error)
            self._send_frame(text if stream_id is None else with_stream_id(text, stream_id))
        self.channel.send_close(code, reason)

    def _send_frame(self, text: str) -> None:
        """A frame outside any turn's response (an error, a control frame's answer)."""
        written = self.channel.send_text(text)
        self.stats.frame_out(written if written is not None else len(text))

    def connection_lost(self) -> None:
        """The socket is gone (client close, TCP drop, 1009, ...): finalize
        (docs/reference-behaviour.md#close-means-stop)."""
        if self.closed:
            return
        self._stop_everything()

    def _stop_everything(self) -> None:
        # Synchronous on purpose: after this returns no pipelined frame can reach an upstream.
        self.closed = True
        for lane in self.lanes.values():
            turn, lane.in_flight = lane.in_flight, None
            if turn is not None:
                self._report(turn)
                turn.cancel()
                log.debug("ws_turn_resources_released", turnId=turn.turn_id, request_id=turn.request_id)
        self.active = 0
        if self.pending_frames:
            log.warn(
                "ws_pending_dropped_on_close",
                droppedFrames=self.pending_frames,
                droppedBytes=self.pending_bytes,
            )
        for lane in self.lanes.values():
            lane.pending.clear()
            lane.ready = False
        self._ready.clear()
        self.pending_frames = 0
        self.pending_bytes = 0
        self._cancel_send_deadline()
        self._resume_reading()  # the close handshake needs the client's frames
        if self._on_close_decided is not None:
            hook, self._on_close_decided = self._on_close_decided, None
            # The connection's own session, then each lane's: its socket, its transcript.
            for holder in (self, *(lane for lane in self.lanes.values() if lane.stream_id is not None)):
                try:
                    hook(holder)
                except Exception:
                    log.failure("ws_upstream_session_cleanup_failed", level=LogLevel.warn)

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.pending_frames == 0

    # -- flow control (IPushProducer, registered on the client transport) ------------------

    def pauseProducing(self) -> None:
        # Often called from inside a write (the transport's buffer just went over its mark),
        # itself inside dataReceived: the state is settled before anything is called out.
        if self.paused or self.closed:
            return
        self.paused = True
        self._send_deadline = self.clock.callLater(
            self.limits.outbound_send_timeout, self._send_timed_out
        )
        self._reading_paused = True
        self.channel.pause_reading()
        for turn in self._turns():
            if turn.producer is not None:
                turn.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self._cancel_send_deadline()
        for turn in self._turns():
            if turn.producer is not None:
                turn.producer.resumeProducing()
        self._resume_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.channel.resume_reading()

    def stopProducing(self) -> None:
        self.connection_lost()

    def _cancel_send_deadline(self) -> None:
        call, self._send_deadline = self._send_deadline, None
        if call is not None and call.active():
            call.cancel()

    def _send_timed_out(self) -> None:
        self._send_deadline = None
        log.warn("ws_send_failed", reason="outbound_send_timeout")
        self.close(CLOSE_INTERNAL_ERROR, "outbound_send_timeout")
