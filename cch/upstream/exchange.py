"""One request's life on an upstream socket, and what its first event says.

:meth:`cch.upstream.pool.UpstreamWSPool.exchange` sends a frame and returns a Deferred that fires
with one :data:`Outcome` — never an errback for anything the upstream did:

- :class:`Ready`: the first event arrived; :meth:`Exchange.deliver` streams the response.
- :class:`ConnectionLimit`: the first event says the socket hit its connection-age cap.
- :class:`PreviousLost`: the first event says the upstream does not know ``previous_response_id``.
- :class:`Failed`: no event, and the provider never took the turn: the caller may use HTTP.
- :class:`NotResent`: no event, but the provider may have the turn (and bill it): end it with
  this error; re-sending could run it twice.

The caller decides what to do with an outcome (deliver, or :meth:`Exchange.discard` and try
again); the socket itself belongs to the pool, which the exchange tells when its first event
arrived and when it ended (:class:`ExchangeOwner`) and which alone keeps or retires the socket.
The rules: docs/reference-behaviour.md#one-request-on-an-upstream-socket.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from cch.config import UpstreamWebSocketConfig
from cch.jsoncodec import loads
from cch.transcript import as_items
from cch.turn import ResponseSink
from cch.upstream.idle import IdleWatchdog
from cch.upstream.ws import OPEN, SocketClosed, UpstreamConnection
from cch.wire import (
    CLOSE_MESSAGE_TOO_BIG,
    ITEM_ADDED,
    ITEM_DONE,
    TERMINAL_EVENT_TYPES,
    error_event,
    event_too_large,
    event_type,
    is_connection_limit,
    is_previous_not_found,
    message_too_big,
    response_of,
)
from cch.wsframes import FrameRelay

log = Logger()

READ_EVENT_TYPES = frozenset((*TERMINAL_EVENT_TYPES, "response.created"))
"""The events a turn's readers look at (the exchange, the usage meter, the transcript): every
other event may reach the client as the upstream framed it (:meth:`Exchange.relay_frames`)."""

KEPT_EVENT_TYPES = frozenset((ITEM_ADDED, ITEM_DONE))
"""Relayed events the edge keeps a copy of: a response's output items, for an interrupt it must
answer itself (:meth:`Exchange.keep`)."""

UPGRADE_CACHEABLE = frozenset({400, 404, 405, 426, 501})
"""Upgrade refusals that say "this endpoint has no WebSocket": remembered for a while."""


# -- outcomes of the first event -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    exchange: Exchange


@dataclass(frozen=True, slots=True)
class ConnectionLimit:
    """The socket reached the provider's connection-age cap; a fresh one may serve the turn."""

    exchange: Exchange


@dataclass(frozen=True, slots=True)
class PreviousLost:
    """The upstream answered ``previous_response_not_found``."""

    exchange: Exchange


@dataclass(frozen=True, slots=True)
class Failed:
    """No first event, and the provider never started the turn: fall back to HTTP."""

    reason: str
    message: str | None = None
    cacheable: bool = False  # the endpoint has no WebSocket: remember it


@dataclass(frozen=True, slots=True)
class NotResent:
    """No first event, but the provider may already be working on (and billing) the turn."""

    code: str
    message: str
    log_event: str  # the stable name the caller logs it under


Outcome = Ready | ConnectionLimit | PreviousLost | Failed | NotResent
"""What the first event (or its absence) says; ``Ready``/``ConnectionLimit``/``PreviousLost``
hold an exchange that must be delivered or discarded."""


class ExchangeOwner(Protocol):
    """The pool, as an exchange sees it: the one who keeps or retires the socket."""

    clock: IReactorTime
    config: UpstreamWebSocketConfig

    def first_event(self, exchange: Exchange) -> None:
        """The socket proved itself: keep it for the session if it may be kept."""

    def retire(self, exchange: Exchange, code: int) -> None:
        """Close the socket now; the exchange still hears it close."""

    def ended(self, exchange: Exchange, close: int | None) -> None:
        """The exchange is over: keep the socket (``close`` None) or close it with ``close``."""


class Exchange:
    """One request on one socket: send the frame, classify the first event, then stream.

    Also the socket's consumer (``ws_opened``/``ws_message``/``ws_closed``, and the
    :attr:`relay` of frames nobody reads while it delivers to a sink that takes them whole).
    """

    read_types = READ_EVENT_TYPES
    kept_types = KEPT_EVENT_TYPES

    def __init__(self, owner: ExchangeOwner, conn: UpstreamConnection, frame: str | bytes, *, reused: bool) -> None:
        self.owner = owner
        self.conn = conn
        self.frame = frame
        self.reused = reused
        self.held: Any = None  # the pool's record for a retained socket (opaque here)
        self.result: Deferred[Outcome] = Deferred(self._cancel_opening)
        self.first_event_seen = False
        self.frame_sent = False  # the frame was written to the socket: the provider may have it
        self.queue: deque[tuple[str, int]] = deque()
        self.queued_bytes = 0
        self.closed = False
        self.mid_error: tuple[str, str] | None = None
        self.terminal_seen = False
        self.finished = False
        self.sink: ResponseSink | None = None
        self.done: Deferred[None] | None = None  # made by deliver (a discarded exchange needs none)
        self.watchdog: IdleWatchdog | None = None
        self.steered = False  # a client control frame (steer, inject) went up this socket
        self.steer_input: list[Any] = []  # what the steers sent up add (the successor's input)
        self.relay: Exchange | None = None  # self, while delivering to a sink with a relay
        self._sink_relay: FrameRelay | None = None
        self._first_kind: str | None = None  # the first event's type, while it is queued
        self._timer: IDelayedCall | None = None

    @property
    def socket_id(self) -> int:
        return self.conn.id

    def start(self) -> None:
        self.conn.consumer = self
        self._timer = self.owner.clock.callLater(self.owner.config.first_event_timeout, self._first_event_timeout)
        if self.conn.state == OPEN:
            self.ws_opened()

    # -- socket events (SocketConsumer) -------------------------------------------------------

    def ws_opened(self) -> None:
        try:
            self.conn.send(self.frame)
        except Exception as exc:
            self._fail(Failed("ws_error_pre_first_event", str(exc) or "send failed"))
            return
        self.frame_sent = True

    def ws_message(self, text: str, size: int) -> None:
        if self.finished:
            return
        if not self.first_event_seen:
            self._first_event(text, size)
            return
        if self.sink is not None:
            self.forward(text)
            return
        limit = self.owner.config.max_buffer_bytes
        if self.queued_bytes + size > limit:
            log.warn("upstream_ws_queue_overflow", queuedBytes=self.queued_bytes, attemptedSize=size)
            self.mid_error = ("upstream_ws_queue_overflow", f"buffered upstream payload exceeded {limit} bytes")
            self.closed = True
            self._finish(1011)
            return
        self.queue.append((text, size))
        self.queued_bytes += size

    def _first_event(self, text: str, size: int) -> None:
        self.first_event_seen = True
        self._cancel_timer()
        self.owner.first_event(self)
        self.queue.append((text, size))
        self.queued_bytes += size
        kind = self._first_kind = event_type(text)
        outcome: Outcome = Ready(self)
        if kind == "error":
            if is_previous_not_found(text):
                outcome = PreviousLost(self)
            elif is_connection_limit(text):
                outcome = ConnectionLimit(self)
        self.result.callback(outcome)

    def ws_closed(self, closed: SocketClosed) -> None:
        self.closed = True
        if closed.too_large is not None:
            # The provider did start the turn (it is sending it): end it, never re-send it.
            too_large = event_too_large(closed.too_large)
            if not self.first_event_seen:
                self._fail(NotResent(*too_large, log_event="upstream_event_too_large"))
                return
            log.warn("upstream_event_too_large", transport="websocket", limit=closed.too_large)
            if not self.terminal_seen and self.mid_error is None:
                self.mid_error = too_large
        elif closed.code == CLOSE_MESSAGE_TOO_BIG:
            # The upstream refused what we sent as too big: the client's frame. Never re-sent
            # (nor over HTTP); the client gets it as an error and a 1009 of its own
            # (docs/protocol.md#close-codes).
            too_big = message_too_big(closed.reason)
            if not self.first_event_seen:
                self._fail(NotResent(*too_big, log_event="upstream_ws_message_too_big"))
                return
            if not self.terminal_seen and self.mid_error is None:
                self.mid_error = too_big
        if not self.first_event_seen:
            if closed.status is not None:
                self._fail(
                    Failed(
                        "ws_upgrade_rejected",
                        f"HTTP {self.conn.status_text or closed.status}",
                        cacheable=closed.status in UPGRADE_CACHEABLE,
                    )
                )
            elif closed.failure is not None:
                self._fail(Failed("ws_error_pre_first_event", closed.failure))
            else:
                self._fail(Failed("ws_closed_before_first_event"))
            return
        if not self.terminal_seen and self.mid_error is None:
            if closed.failure is not None:
                self.mid_error = ("upstream_ws_mid_stream_error", closed.failure)
            else:
                message = f"upstream WebSocket closed (code={closed.code})"
                if closed.reason:
                    message += f": {closed.reason}"
                self.mid_error = ("upstream_ws_closed_mid_stream", message)
        if self.sink is not None:
            self.ended()

    # -- before the first event -----------------------------------------------------------------

    def _first_event_timeout(self) -> None:
        self._timer = None
        if self.first_event_seen:
            return
        config = self.owner.config
        if self.frame_sent and not config.fallback_after_send:
            self._fail(
                NotResent(
                    "upstream_first_event_timeout",
                    f"no upstream event arrived within {config.first_event_timeout:g}s; the request was"
                    " not re-sent, so the client may retry it",
                    log_event="upstream_ws_first_event_timeout",
                )
            )
            return
        # Still connecting (the frame never left), or configured to re-send regardless.
        self._fail(Failed("ws_error_pre_first_event", "timeout_waiting_for_first_event"))

    def _fail(self, outcome: Failed | NotResent) -> None:
        self._finish(1011)
        if not self.result.called:
            self.result.callback(outcome)

    def _cancel_opening(self, _: Deferred[Outcome]) -> None:
        """The attempt was aborted before the first event (client gone, attempt timeout)."""
        self.closed = True
        self._finish(1000)

    # -- after the first event --------------------------------------------------------------------

    def discard(self) -> None:
        """Do not deliver this response: the socket is retired (1000), everything released."""
        self._finish(1000)  # nothing if the delivery already ended

    def deliver(self, sink: ResponseSink, idle_timeout: float | None = None) -> Deferred[None]:
        """Replay what is queued, then forward live events until a terminal (or the end).

        An upstream silent for ``idle_timeout`` seconds mid-stream ends the turn with an
        ``upstream_idle_timeout`` error event and loses its socket (1011).
        """
        done = self.done = Deferred(self._cancel_delivery)
        self.sink = sink
        sink.sse_started(200, {"content-type": "text/event-stream", "x-cch-upstream-transport": "websocket"})
        if idle_timeout is not None:
            self.watchdog = IdleWatchdog(self.owner.clock, idle_timeout, self._stalled)
            self.watchdog.start()
        sink.register_producer(_SocketProducer(self, self.watchdog))
        kind, self._first_kind = self._first_kind, None
        while self.queue and not done.called:
            text, size = self.queue.popleft()
            self.queued_bytes -= size
            self.forward(text, kind)
            kind = None
        if not done.called:
            if self.closed:
                self.ended()
            else:
                offer = getattr(sink, "frame_relay", None)
                self._sink_relay = offer() if offer is not None else None
                if self._sink_relay is not None:
                    self.relay = self
        return done

    def relay_frames(self, data: bytes, start: int, end: int, count: int, size: int) -> None:
        """Events nobody reads (cch.wsframes.FrameRelay), on to the sink's relay whole."""
        sink_relay = self._sink_relay
        if sink_relay is None or self.finished:
            return
        if self.watchdog is not None:
            self.watchdog.poke()
        sink_relay.relay_frames(data, start, end, count, size)

    def keep(self, payload: bytes) -> None:
        """A relayed event the sink's relay keeps a copy of (cch.wsframes.FrameRelay)."""
        sink_relay = self._sink_relay
        if sink_relay is not None and not self.finished:
            sink_relay.keep(payload)

    def forward(self, text: str, kind: str | None = None) -> None:
        """One upstream event to the sink; ``kind`` is its type when already known."""
        done = self.done
        if done is None or done.called or self.sink is None:
            return
        if self.watchdog is not None:
            self.watchdog.poke()
        if kind is None:
            kind = event_type(text)
        # Steering ended this response at a safe boundary; its successor follows on this socket
        # and belongs to the same turn (docs/protocol.md#control-frames). Whoever meters the
        # turn hears it first, with the steers' input (the successor's).
        steered_away = self.steered and kind == "response.incomplete" and _steered_away(text)
        if steered_away:
            told = getattr(self.sink, "steered", None)
            if told is not None:
                told(self.steer_input)
            self.steer_input = []
        self.sink.sse_event(text, kind)
        if done.called:
            return  # the consumer went away while it handled the event (_cancel_delivery)
        if kind in TERMINAL_EVENT_TYPES:
            if steered_away:
                return
            self.terminal_seen = True
            # An `error` terminal, or the 60-minute cap, retires the socket
            # (docs/reference-behaviour.md#the-60-minute-connection-cap); so does a steered
            # turn: what the upstream still owes it (a successor, `response.steer.pending`)
            # must not reach the next turn on this socket.
            retire = kind == "error" or is_connection_limit(text) or self.steered
            self._stop_delivery()
            self._finish(1000 if retire else None)
            done.callback(None)

    def send_control(self, frame: bytes) -> bool:
        """A client's control frame (``response.steer``, ``response.inject``) for the response
        this exchange is delivering, sent up the same socket; False once that is over."""
        done = self.done
        if self.finished or done is None or done.called or self.conn.state != OPEN:
            return False
        try:
            self.conn.send(frame)
        except Exception:
            return False
        self.steered = True
        try:
            sent = loads(frame)
        except ValueError:
            sent = None
        if isinstance(sent, dict) and sent.get("type") == "response.steer":
            self.steer_input.extend(as_items(sent.get("input")))
        return True

    def _stalled(self) -> None:
        if self.mid_error is None:
            assert self.watchdog is not None
            self.mid_error = ("upstream_idle_timeout", f"upstream sent nothing for {self.watchdog.timeout:g}s")
        self.ended()

    def ended(self) -> None:
        """The socket closed (or stalled): without a terminal, end the turn with an error event."""
        done = self.done
        if done is None or done.called or self.sink is None:
            return
        if not self.terminal_seen:
            code, message = self.mid_error or (
                "upstream_ws_mid_stream_error",
                "upstream WebSocket closed before emitting a terminal response event",
            )
            self.sink.sse_event(error_event(code, message), "error")
        self._stop_delivery()
        self._finish(1000 if self.terminal_seen else 1011)
        done.callback(None)

    def stop(self) -> None:
        """The consumer stops producing: the socket goes (the exchange hears it close)."""
        self.owner.retire(self, 1000)

    def _stop_delivery(self) -> None:
        self.relay = self._sink_relay = None
        if self.watchdog is not None:
            self.watchdog.stop()
        assert self.sink is not None
        self.sink.unregister_producer()

    def _cancel_delivery(self, _: Deferred[None]) -> None:
        """The consumer went away (client abort, idle timeout): close 1000 and forget."""
        self.relay = self._sink_relay = None
        if self.watchdog is not None:
            self.watchdog.stop()
        self.sink = None
        self._finish(1000)

    # -- the end --------------------------------------------------------------------------------

    def _finish(self, close: int | None) -> None:
        """Release everything this exchange holds, exactly once; the pool keeps the socket
        (``close`` None) or retires it."""
        if self.finished:
            return
        self.finished = True
        self.relay = self._sink_relay = None
        self._cancel_timer()
        if self.conn.consumer is self:
            self.conn.consumer = None
        self.owner.ended(self, close)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


@implementer(IPushProducer)
class _SocketProducer:
    """Lets the client side pause the upstream socket's reads (TCP backpressure upstream), with
    the stall watchdog stopped meanwhile (the silence is ours), and send a client's control
    frame up the socket (:class:`cch.turn.UpstreamControl`)."""

    def __init__(self, exchange: Exchange, watchdog: IdleWatchdog | None) -> None:
        self.exchange = exchange
        self.watchdog = watchdog

    def pauseProducing(self) -> None:
        if self.watchdog is not None:
            self.watchdog.pause()
        self.exchange.conn.pause()

    def resumeProducing(self) -> None:
        self.exchange.conn.resume()
        if self.watchdog is not None:
            self.watchdog.resume()

    def stopProducing(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.exchange.stop()

    def send_control(self, frame: bytes) -> bool:
        return self.exchange.send_control(frame)


def _steered_away(text: str) -> bool:
    """Is this ``response.incomplete`` the end steering made (a successor follows)?"""
    response = response_of(text)
    details = response.get("incomplete_details") if response is not None else None
    return isinstance(details, dict) and details.get("reason") == "steered"
