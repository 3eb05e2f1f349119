"""One client WebSocket connection's rules: the inbound queue, one turn at a time, closes.

The Autobahn protocol only turns bytes into calls on :class:`EdgeConnection`; every rule of
docs/reference-behaviour.md for a connection (from "The client connection" to "Error frames")
lives here, testable without a transport.
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
    parse_client_frame,
    translate_json_response,
    translate_sse_data,
)
from cch.handler import errors
from cch.metrics import EdgeStats
from cch.turn import Tunnel, TurnRequest, TurnTransportError
from cch.wire import TERMINAL_EVENT_TYPES, error_event

log = Logger()


CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011


class EdgeChannel(Protocol):
    """What a connection needs from its transport."""

    def send_text(self, text: str) -> int | None:
        """Queue a text frame; the bytes written, 0 when the socket is no longer open."""

    def send_close(self, code: int, reason: str) -> None: ...

    def pause_reading(self) -> None:
        """Stop reading from the client (its outbound buffer is over the high-water mark)."""

    def resume_reading(self) -> None: ...


class _Turn:
    """One in-flight ``response.create``: the sink its response is reported to."""

    def __init__(self, conn: EdgeConnection, turn_id: int) -> None:
        self.conn = conn
        self.turn_id = turn_id
        self.deferred: Deferred[Any] | None = None
        self.terminal_seen = False
        self.terminal_type: str | None = None
        self.producer: IPushProducer | None = None
        self.dead = False
        self.sent = False  # has any frame of this turn reached the client?
        self.reported = False
        self.request_id = os.urandom(16).hex()  # in every log line of this turn
        self.started_at = conn.clock.seconds()
        self.first_event_at: float | None = None
        self.frames = 0
        self.bytes = 0

    # ResponseSink
    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        pass

    def sse_event(self, data: str, kind: str | None = None) -> None:
        if self.dead:
            return
        if kind is not None:
            # The per-event hot path: a JSON object event, already parsed upstream of here,
            # goes out byte for byte.
            self._send(data, kind if kind in TERMINAL_EVENT_TYPES else None, "sse")
            return
        if data == "[DONE]":
            if self.terminal_seen:
                return
            self._send(DONE_FRAME.text, DONE_FRAME.terminal, "sse", synthesized=True)
            return
        frame = translate_sse_data(data)
        self._send(frame.text, frame.terminal, "sse")

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
        written = self.conn.channel.send_text(text)
        if written == 0:
            log.warn("ws_send_failed", reason="outbound_socket_closed")
            self.conn.close(CLOSE_INTERNAL_ERROR, "outbound_socket_closed")
            return
        if not self.sent:
            self.sent = True
            self.first_event_at = self.conn.clock.seconds()
        self.frames += 1
        self.bytes += written if written is not None else len(text)
        if terminal is not None and not self.terminal_seen:
            self.terminal_seen = True
            self.terminal_type = None if synthesized else terminal
            if status is not None and terminal == "error":
                log.info("ws_terminal_event_sent", type=terminal, source=source, status=status, request_id=self.request_id)
            else:
                log.info("ws_terminal_event_sent", type=terminal, source=source, request_id=self.request_id)

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
    reading, the transport pauses it and it pauses the producer of the turn in flight, so TCP
    backpressure reaches the upstream instead of piling frames up in memory. It also stops
    reading from the client until the buffer drains: what a client sends may make the gateway
    write (a ping is answered with a pong), so a client that sends and never reads would
    otherwise grow the buffer without end. Once the connection is closing, reading goes on,
    so the client's close frame is seen.
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
        on_close_decided: Callable[[EdgeConnection], None] | None = None,
        stats: EdgeStats | None = None,
    ) -> None:
        self.channel = channel
        self.tunnel = tunnel
        self.limits = limits
        self.clock = clock
        self.headers = headers
        self.query_model = query_model
        self.session_id = session_id or str(uuid.uuid4())
        self._on_close_decided = on_close_decided
        self.stats = stats if stats is not None else EdgeStats()
        self.pending: deque[tuple[str, int]] = deque()
        self.pending_bytes = 0
        self.in_flight: _Turn | None = None
        self.closed = False
        self.leaving = False  # draining: close 1001 as soon as no turn is in flight
        self.paused = False
        self._reading_paused = False
        self.turns_started = 0
        self._draining = False
        self._send_deadline: IDelayedCall | None = None

    # -- inbound --------------------------------------------------------------------------

    def text_received(self, text: str, size: int) -> None:
        """A text message arrived: queue it behind the turn in flight
        (docs/reference-behaviour.md#inbound-frames-and-the-queue)."""
        if self.closed:
            return
        self.stats.frame_in(size)
        limits = self.limits
        if (
            len(self.pending) >= limits.max_pending_frames
            or self.pending_bytes + size > limits.max_pending_bytes
        ):
            log.warn(
                "ws_pending_overflow",
                pendingFrames=len(self.pending),
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
        self.pending.append((text, size))
        self.pending_bytes += size
        self._drain()

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

    # -- turns ----------------------------------------------------------------------------

    def leave(self) -> None:
        """The gateway is draining: let the turn in flight finish, then close 1001."""
        self.leaving = True
        if self.in_flight is None:
            self.close(CLOSE_GOING_AWAY, "going_away")

    def _drain(self) -> None:
        if self._draining:
            return
        if self.leaving and self.in_flight is None:
            self.close(CLOSE_GOING_AWAY, "going_away")
            return
        self._draining = True
        try:
            while not self.closed and self.in_flight is None and self.pending:
                text, size = self.pending.popleft()
                self.pending_bytes = max(0, self.pending_bytes - size)
                self._start_turn(text, size)
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

    def _start_turn(self, text: str, size: int) -> None:
        self.turns_started += 1
        try:
            body = parse_client_frame(text, self.query_model)
        except FrameRejected as rejected:
            self._send_error(error_event(rejected.code, rejected.message))
            return
        model = body.get("model")
        turn = _Turn(self, self.turns_started)
        log.info(
            "ws_request_started",
            model=model if isinstance(model, str) else None,
            payloadBytes=size,
            hasPreviousResponseId=isinstance(body.get("previous_response_id"), str),
            request_id=turn.request_id,
        )
        self.in_flight = turn
        self.stats.turn_started()
        request = TurnRequest(
            session_id=self.session_id,
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
        self._drain()

    def _turn_failed(self, failure: Failure, turn: _Turn) -> None:
        if turn.dead or failure.check(CancelledError):
            return
        if turn.terminal_seen:
            # The body broke after the terminal event: the turn is complete
            # (docs/reference-behaviour.md#one-turn-at-a-time).
            self._release(turn)
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
        self.close(CLOSE_INTERNAL_ERROR, code, error=(code, message))

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
        if self.in_flight is turn:
            self.in_flight = None
        log.debug("ws_turn_resources_released", turnId=turn.turn_id, request_id=turn.request_id)

    # -- closing --------------------------------------------------------------------------

    def close(self, code: int, reason: str, error: tuple[str, str] | None = None) -> None:
        """Server-initiated close: stop everything first, then flush the error frame and the
        close frame, in that order (docs/reference-behaviour.md#close-means-stop)."""
        if self.closed:
            return
        self._stop_everything()
        self.stats.closed(code, reason)
        log.info("ws_client_close_initiated", code=code, reason=reason)
        if error is not None:
            self._send_error(error_event(*error))
        self.channel.send_close(code, reason)

    def _send_error(self, text: str) -> None:
        """An error frame outside any turn's response."""
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
        turn, self.in_flight = self.in_flight, None
        if turn is not None:
            self._report(turn)
            turn.cancel()
            log.debug("ws_turn_resources_released", turnId=turn.turn_id, request_id=turn.request_id)
        if self.pending:
            log.warn(
                "ws_pending_dropped_on_close",
                droppedFrames=len(self.pending),
                droppedBytes=self.pending_bytes,
            )
            self.pending.clear()
            self.pending_bytes = 0
        self._cancel_send_deadline()
        self._resume_reading()  # the close handshake needs the client's frames
        if self._on_close_decided is not None:
            hook, self._on_close_decided = self._on_close_decided, None
            try:
                hook(self)
            except Exception:
                log.failure("ws_upstream_session_cleanup_failed", level=LogLevel.warn)

    @property
    def idle(self) -> bool:
        return self.in_flight is None and not self.pending

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
        turn = self.in_flight
        if turn is not None and turn.producer is not None:
            turn.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self._cancel_send_deadline()
        turn = self.in_flight
        if turn is not None and turn.producer is not None:
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
