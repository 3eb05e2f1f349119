"""The upstream WebSocket pool and one request's life on a socket.

One :class:`UpstreamWSPool` per process (owned by the service) keeps at most one idle socket per
client connection (session id), so a Codex session's warm-up and every following turn ride the
same upstream connection. :meth:`UpstreamWSPool.request` returns a Deferred that fires once the
first upstream event arrived (with a :class:`WSStream` to deliver into a sink), or fails before
it with :class:`WSFailure` (the provider never started the turn: the caller falls back to HTTP)
or :class:`WSTurnFailed` (it may have: the caller ends the turn with that error, never re-sends it).
The rules: docs/reference-behaviour.md#the-upstream-websocket-pool and
docs/reference-behaviour.md#one-request-on-an-upstream-socket.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cch.config import LimitsConfig, UpstreamWebSocketConfig
from cch.turn import ResponseSink
from cch.upstream.idle import IdleWatchdog, WatchedProducer
from cch.upstream.tls import trust_root
from cch.upstream.ws import OPEN, MessageTooLarge, UpstreamConnection
from cch.wire import (
    CONNECTION_LIMIT,
    TERMINAL_EVENT_TYPES,
    error_code,
    error_event,
    event_too_large,
    event_type,
)

log = Logger()

UPGRADE_CACHEABLE = frozenset({400, 404, 405, 426, 501})


class WSFailure(Exception):
    """The upstream WebSocket could not deliver a first event; fall back to HTTP."""

    def __init__(self, reason: str, message: str | None = None, cacheable: bool = False) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message
        self.cacheable = cacheable


class WSTurnFailed(Exception):
    """No first event, but the provider may already be working on (and billing) the turn:
    end it with this ``error`` event; re-sending it over HTTP could run it twice."""

    def __init__(self, code: str, message: str, log_event: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.log_event = log_event  # the stable name the caller logs it under


def fingerprint(provider: str, endpoint: str | None, url: str, headers: dict[str, str]) -> str:
    """SHA-256 over what makes a socket reusable: provider, endpoint, URL, upgrade headers."""
    # Every turn asks (twice) with what is nearly always the same target as last time.
    return _fingerprint(provider, endpoint, url, tuple(headers.items()))


@functools.lru_cache(maxsize=1024)
def _fingerprint(provider: str, endpoint: str | None, url: str, headers: tuple[tuple[str, str], ...]) -> str:
    pairs = sorted([k.lower(), v] for k, v in headers)
    blob = json.dumps(
        {"providerId": provider, "endpointId": endpoint, "upstreamUrl": url, "headers": pairs},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(eq=False)
class PoolEntry:
    session_id: str
    fingerprint: str
    conn: UpstreamConnection
    active: bool
    created_at: float
    last_used_at: float
    idle_timer: IDelayedCall | None = None
    reuses: int = field(default=0)


class UpstreamWSPool(Service):
    """Retained upstream sockets keyed by client session id; stopping the service closes them all."""

    name = "upstream-ws-pool"

    def __init__(self, reactor: Any, clock: IReactorTime, config: UpstreamWebSocketConfig) -> None:
        self.reactor = reactor
        self.clock = clock
        self.config = config
        self.max_entries = config.pool_max_entries
        self.entries: dict[str, PoolEntry] = {}
        self.sockets: set[UpstreamConnection] = set()  # every live socket, retained or not
        self.stats = {"connects": 0, "reuses": 0, "busy_fresh": 0, "pruned": 0, "idle_closed": 0, "rotated": 0}

    # -- acquiring ------------------------------------------------------------------------

    def _aged(self, entry: PoolEntry) -> bool:
        return self.clock.seconds() - entry.created_at >= self.config.max_socket_age

    def peek(
        self, *, provider: str, endpoint: str | None, url: str, headers: dict[str, str], session_id: str | None
    ) -> int | None:
        """The id of the socket :meth:`request` would reuse right now, or None for a new one."""
        entry = self.entries.get(session_id) if session_id else None
        if (
            entry is not None
            and not entry.active
            and entry.conn.state == OPEN
            and not self._aged(entry)
            and entry.fingerprint == fingerprint(provider, endpoint, url, headers)
        ):
            return entry.conn.id
        return None

    def request(
        self,
        *,
        provider: str,
        endpoint: str | None,
        url: str,
        headers: dict[str, str],
        frame: str | bytes,
        session_id: str | None,
        tls_ca: str | None = None,
        max_event_bytes: int = LimitsConfig.max_upstream_event_bytes,
    ) -> Deferred[WSStream]:
        """Send ``frame`` on a socket for ``session_id``
        (docs/reference-behaviour.md#acquire-rules).

        A new socket refuses upstream messages over ``max_event_bytes`` (0: no cap); a reused
        one keeps the cap it was opened with.
        """
        print_ = fingerprint(provider, endpoint, url, headers)
        entry = self.entries.get(session_id) if session_id else None
        retainable = session_id is not None
        if entry is not None:
            if entry.active and entry.conn.usable:
                log.warn("upstream_ws_session_busy", sessionId=session_id)
                self.stats["busy_fresh"] += 1
                retainable = False
                entry = None
            elif entry.fingerprint == print_ and entry.conn.state == OPEN and not self._aged(entry):
                entry.active = True
                entry.last_used_at = self.clock.seconds()
                entry.reuses += 1
                self._cancel_idle(entry)
                self.stats["reuses"] += 1
                req = _Request(self, entry.conn, entry, frame, session_id, reused=True, retainable=True)
                req.start()
                return req.result
            elif entry.conn.state == OPEN and not self._aged(entry):
                # Another provider/endpoint/key: keep the idle socket until a new one has
                # proved itself (first event), so a dead provider tried first does not cost
                # the session its working socket (replaced in _register).
                entry = None
            else:
                if entry.conn.state == OPEN:
                    # Retire it before the provider's connection-age cap does it mid-turn.
                    log.info("upstream_ws_session_rotated", sessionId=session_id)
                    self.stats["rotated"] += 1
                self._forget(entry)
                entry.conn.safe_close(1000)
                entry = None
        conn = self._open(url, headers, tls_ca, max_event_bytes)
        req = _Request(self, conn, None, frame, session_id, reused=False, retainable=retainable)
        req.fingerprint = print_
        req.start()
        conn.connect()
        return req.result

    def _open(self, url: str, headers: dict[str, str], tls_ca: str | None, max_event_bytes: int) -> UpstreamConnection:
        conn = UpstreamConnection(
            self.reactor,
            self.clock,
            url,
            headers,
            handshake_timeout=self.config.handshake_timeout,
            max_message_bytes=max_event_bytes,
            trust=trust_root(tls_ca),
        )
        self.sockets.add(conn)
        conn.on_gone.append(self.sockets.discard)
        self.stats["connects"] += 1
        return conn

    # -- registration and release -----------------------------------------------------------

    def _register(self, req: _Request) -> None:
        """After the first event on a fresh retainable socket: keep it for the session."""
        session_id = req.session_id
        assert session_id is not None
        previous = self.entries.get(session_id)
        if previous is not None:
            if previous.active:
                return  # someone is using the old socket: this one stays request-scoped
            self._forget(previous)
            previous.conn.safe_close(1000)
        if len(self.entries) >= self.max_entries:
            idle = sorted((e for e in self.entries.values() if not e.active), key=lambda e: e.last_used_at)
            for victim in idle[: len(self.entries) - self.max_entries + 1]:
                log.warn("upstream_ws_session_pruned", sessionId=victim.session_id)
                self.stats["pruned"] += 1
                self._forget(victim)
                victim.conn.safe_close(1000)
        if len(self.entries) >= self.max_entries:
            log.warn("upstream_ws_session_cap_reached", sessionId=session_id, maxEntries=self.max_entries)
            return
        now = self.clock.seconds()
        entry = PoolEntry(session_id, req.fingerprint, req.conn, True, now, now)
        self.entries[session_id] = entry
        req.entry = entry
        req.conn.on_gone.append(lambda conn: self._socket_gone(entry))

    def _socket_gone(self, entry: PoolEntry) -> None:
        if self.entries.get(entry.session_id) is entry:
            self._forget(entry)

    def _release(self, entry: PoolEntry) -> None:
        """A request on a retained socket ended: idle it, or close it if it was detached."""
        entry.active = False
        entry.last_used_at = self.clock.seconds()
        if self.entries.get(entry.session_id) is entry and entry.conn.state == OPEN:
            self._cancel_idle(entry)
            entry.idle_timer = self.clock.callLater(self.config.idle_timeout, self._idle_expired, entry)
        elif self.entries.get(entry.session_id) is not entry:
            entry.conn.safe_close(1000)

    def _idle_expired(self, entry: PoolEntry) -> None:
        entry.idle_timer = None
        if self.entries.get(entry.session_id) is entry and not entry.active:
            log.info("upstream_ws_session_idle_closed", sessionId=entry.session_id, idleMs=int(self.config.idle_timeout * 1000))
            self.stats["idle_closed"] += 1
            self._forget(entry)
            entry.conn.safe_close(1000)

    def _forget(self, entry: PoolEntry) -> None:
        if self.entries.get(entry.session_id) is entry:
            del self.entries[entry.session_id]
        self._cancel_idle(entry)

    @staticmethod
    def _cancel_idle(entry: PoolEntry) -> None:
        timer, entry.idle_timer = entry.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- hooks ----------------------------------------------------------------------------

    def cleanup(self, session_id: str) -> None:
        """The client connection closed: close its retained socket 1000, even mid-request."""
        entry = self.entries.get(session_id)
        if entry is None:
            return
        log.info("upstream_ws_session_cleaned", sessionId=session_id)
        self._forget(entry)
        entry.conn.safe_close(1000)

    def close_all(self) -> Deferred[Any]:
        """Close every socket 1000 (service stop); fires when all are gone."""
        for entry in list(self.entries.values()):
            self._forget(entry)
        waiting = []
        for conn in list(self.sockets):
            d: Deferred[None] = Deferred()
            conn.on_gone.append(lambda _c, d=d: d.callback(None))
            waiting.append(d)
            conn.safe_close(1000)
        if not waiting:
            return succeed(None)
        return DeferredList(waiting)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.close_all()

    @property
    def size(self) -> int:
        return len(self.entries)

    def collect(self) -> Iterator[Metric]:
        """The pool's figures, read at scrape time (cch.metrics)."""
        yield GaugeMetricFamily("cch_upstream_ws_pool_size", "Retained upstream WebSocket sessions.", value=self.size)
        yield GaugeMetricFamily("cch_upstream_ws_sockets", "Open upstream WebSocket sockets.", value=len(self.sockets))
        events = CounterMetricFamily("cch_upstream_ws_pool_events", "Upstream WebSocket pool events.", labels=["event"])
        for key, count in sorted(self.stats.items()):
            events.add_metric([key], count)
        yield events


class _Request:
    """One request's life on a socket; also the socket's consumer
    (docs/reference-behaviour.md#one-request-on-an-upstream-socket)."""

    def __init__(
        self,
        pool: UpstreamWSPool,
        conn: UpstreamConnection,
        entry: PoolEntry | None,
        frame: str | bytes,
        session_id: str | None,
        *,
        reused: bool,
        retainable: bool,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.entry = entry
        self.frame = frame
        self.session_id = session_id
        self.reused = reused
        self.retainable = retainable
        self.fingerprint = entry.fingerprint if entry else ""
        self.result: Deferred[WSStream] = Deferred(self._cancel_opening)
        self.first_event_seen = False
        self.frame_sent = False  # the frame was written to the socket: the provider may have it
        self.queue: deque[tuple[str, int]] = deque()
        self.queued_bytes = 0
        self.closed = False
        self.mid_error: tuple[str, str] | None = None
        self.terminal_seen = False
        self.close_persistent = False
        self.finished = False
        self.stream: WSStream | None = None
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self.conn.consumer = self
        self._timer = self.pool.clock.callLater(self.pool.config.first_event_timeout, self._first_event_timeout)
        if self.conn.state == OPEN:
            self.ws_opened()

    # -- socket events (SocketConsumer) ---------------------------------------------------

    def ws_opened(self) -> None:
        try:
            self.conn.send(self.frame)
        except Exception as exc:
            self._fail(WSFailure("ws_error_pre_first_event", str(exc) or "send failed"))
            return
        self.frame_sent = True

    def ws_message(self, text: str, size: int) -> None:
        if self.finished:
            return
        if not self.first_event_seen:
            self.first_event_seen = True
            self._cancel_timer()
            if self.entry is None and self.retainable:
                self.pool._register(self)
            self.stream = WSStream(self)
            self.queue.append((text, size))
            self.queued_bytes += size
            self.result.callback(self.stream)
            return
        stream = self.stream
        if stream is not None and stream.sink is not None:
            stream.forward(text)
            return
        if self.queued_bytes + size > self.pool.config.max_buffer_bytes:
            log.warn("upstream_ws_queue_overflow", queuedBytes=self.queued_bytes, attemptedSize=size)
            self.mid_error = (
                "upstream_ws_queue_overflow",
                f"buffered upstream payload exceeded {self.pool.config.max_buffer_bytes} bytes",
            )
            self.closed = True
            self.finish(1011, forget=True)
            return
        self.queue.append((text, size))
        self.queued_bytes += size

    def ws_closed(self, code: int | None, reason: str | None, failure: str | None, status: int | None) -> None:
        self.closed = True
        if self.entry is not None:
            self.pool._socket_gone(self.entry)
        if isinstance(failure, MessageTooLarge):
            # The provider did start the turn (it is sending it): end it, never re-send it.
            too_large = event_too_large(failure.limit)
            if not self.first_event_seen:
                self._fail(WSTurnFailed(*too_large, log_event="upstream_event_too_large"))
                return
            log.warn("upstream_event_too_large", transport="websocket", limit=failure.limit)
            if not self.terminal_seen and self.mid_error is None:
                self.mid_error = too_large
        if not self.first_event_seen:
            if status is not None:
                self._fail(
                    WSFailure(
                        "ws_upgrade_rejected",
                        f"HTTP {self.conn.status_text or status}",
                        cacheable=status in UPGRADE_CACHEABLE,
                    )
                )
            elif failure is not None:
                self._fail(WSFailure("ws_error_pre_first_event", failure))
            else:
                self._fail(WSFailure("ws_closed_before_first_event"))
            return
        if not self.terminal_seen and self.mid_error is None:
            if failure is not None:
                self.mid_error = ("upstream_ws_mid_stream_error", failure)
            else:
                message = f"upstream WebSocket closed (code={code})"
                if reason:
                    message += f": {reason}"
                self.mid_error = ("upstream_ws_closed_mid_stream", message)
        if self.stream is not None and self.stream.sink is not None:
            self.stream.ended()

    # -- failure before the first event -------------------------------------------------------

    def _first_event_timeout(self) -> None:
        self._timer = None
        if self.first_event_seen:
            return
        if self.frame_sent and not self.pool.config.fallback_after_send:
            timeout = self.pool.config.first_event_timeout
            self._fail(
                WSTurnFailed(
                    "upstream_first_event_timeout",
                    f"no upstream event arrived within {timeout:g}s; the request was not re-sent,"
                    " so the client may retry it",
                    log_event="upstream_ws_first_event_timeout",
                )
            )
            return
        # Still connecting (the frame never left), or configured to re-send regardless.
        self._fail(WSFailure("ws_error_pre_first_event", "timeout_waiting_for_first_event"))

    def _fail(self, failure: WSFailure | WSTurnFailed) -> None:
        if self.result.called:
            self.finish(1011, forget=True)
            return
        self.finish(1011, forget=True)
        self.result.errback(failure)

    def _cancel_opening(self, _: Deferred[WSStream]) -> None:
        """The attempt was aborted before the first event (client gone, attempt timeout)."""
        self.closed = True
        self.finish(1000, forget=True)

    # -- end of the request -------------------------------------------------------------------

    def finish(self, close_code: int | None = None, *, forget: bool = False) -> None:
        """Release everything this request holds, exactly once
        (docs/reference-behaviour.md#one-request-on-an-upstream-socket)."""
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        if self.conn.consumer is self:
            self.conn.consumer = None
        if close_code is not None:
            self.conn.safe_close(close_code)
        entry = self.entry
        if entry is not None:
            if forget or close_code is not None:
                self.pool._forget(entry)
            self.pool._release(entry)
        else:
            # Request-scoped socket (no session, busy session, or cap reached).
            self.conn.safe_close(1000)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class WSStream:
    """A request past its first event: delivers the upstream events into a sink."""

    def __init__(self, req: _Request) -> None:
        self.req = req
        self.sink: ResponseSink | None = None
        self.done: Deferred[None] = Deferred(self._cancel)
        self.watchdog: IdleWatchdog | None = None
        self._typed: tuple[str, str | None] | None = None  # the first event and its type

    @property
    def reused(self) -> bool:
        return self.req.reused

    @property
    def socket_id(self) -> int:
        return self.req.conn.id

    def first_event(self) -> str | None:
        """The first upstream event, while it has not been delivered yet."""
        return self.req.queue[0][0] if self.req.queue and self.sink is None else None

    def first_event_type(self) -> str | None:
        """The type of :meth:`first_event` (parsed once: delivering it reuses the result)."""
        first = self.first_event()
        if first is None:
            return None
        if self._typed is None or self._typed[0] is not first:
            self._typed = (first, event_type(first))
        return self._typed[1]

    def discard(self) -> None:
        """Do not deliver this response: retire the socket (1000) and release everything."""
        if not self.done.called:
            self.req.finish(1000, forget=True)

    def deliver(self, sink: ResponseSink, idle_timeout: float | None = None) -> Deferred[None]:
        """Replay what is queued, then forward live events until a terminal (or the end).

        An upstream silent for ``idle_timeout`` seconds mid-stream ends the turn with an
        ``upstream_idle_timeout`` error event and loses its socket (1011).
        """
        req = self.req
        self.sink = sink
        sink.sse_started(200, {"content-type": "text/event-stream", "x-cch-upstream-transport": "websocket"})
        producer: Any = _SocketProducer(req.conn)
        if idle_timeout is not None:
            self.watchdog = IdleWatchdog(req.pool.clock, idle_timeout, self._stalled)
            producer = WatchedProducer(producer, self.watchdog)
            self.watchdog.start()
        sink.register_producer(producer)
        typed, self._typed = self._typed, None
        while req.queue and not self.done.called:
            text, size = req.queue.popleft()
            req.queued_bytes -= size
            self.forward(text, typed[1] if typed is not None and typed[0] is text else None)
        if not self.done.called and req.closed:
            self.ended()
        return self.done

    def forward(self, text: str, kind: str | None = None) -> None:
        """One upstream event to the sink; ``kind`` is its type when already known."""
        req = self.req
        if self.done.called or self.sink is None:
            return
        if self.watchdog is not None:
            self.watchdog.poke()
        if kind is None:
            kind = event_type(text)
        self.sink.sse_event(text, kind)
        if kind in TERMINAL_EVENT_TYPES:
            req.terminal_seen = True
            # An `error` terminal, or the 60-minute cap, retires the socket
            # (docs/reference-behaviour.md#the-60-minute-connection-cap).
            req.close_persistent = kind == "error" or (
                CONNECTION_LIMIT in text and error_code(text) == CONNECTION_LIMIT
            )
            self._complete()

    def _stalled(self) -> None:
        req = self.req
        if req.mid_error is None:
            req.mid_error = ("upstream_idle_timeout", f"upstream sent nothing for {self.watchdog.timeout:g}s")  # type: ignore[union-attr]
        self.ended()

    def ended(self) -> None:
        """The socket closed (or stalled): without a terminal, end the turn with an error event."""
        if self.done.called or self.sink is None:
            return
        self._stop_watchdog()
        req = self.req
        if not req.terminal_seen:
            code, message = req.mid_error or (
                "upstream_ws_mid_stream_error",
                "upstream WebSocket closed before emitting a terminal response event",
            )
            self.sink.sse_event(error_event(code, message), "error")
        self.sink.unregister_producer()
        req.finish(1000 if req.terminal_seen else 1011, forget=True)
        self.done.callback(None)

    def _stop_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def _complete(self) -> None:
        req = self.req
        assert self.sink is not None
        self._stop_watchdog()
        self.sink.unregister_producer()
        if req.session_id and req.entry is not None and not req.close_persistent:
            req.finish()
        else:
            req.finish(1000, forget=True)
        self.done.callback(None)

    def _cancel(self, _: Deferred[None]) -> None:
        """The consumer went away (client abort, idle timeout): close 1000 and forget."""
        self._stop_watchdog()
        self.sink = None
        self.req.finish(1000, forget=True)


class _SocketProducer:
    """Lets the client side pause the upstream socket's reads (TCP backpressure upstream)."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn

    def pauseProducing(self) -> None:
        self.conn.pause()

    def resumeProducing(self) -> None:
        self.conn.resume()

    def stopProducing(self) -> None:
        self.conn.safe_close(1000)
