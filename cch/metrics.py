"""Prometheus metrics (``GET /metrics``).

The per-event path touches no metric: connections count per turn in plain integers and report
once when the turn ends; each component (edge, pool, pipeline, router, transcripts) reports its
own figures at scrape time (:meth:`Metrics.export`). Each service has its own registry, so
embedding programs (and tests) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# How an HTTP POST turn ends: the response went out whole, the turn was cut short (the client
# left, stopped reading past the send deadline, or the gateway drained), or the handler broke.
HTTP_TURN_OUTCOMES = ("completed", "cancelled", "failed")


class EdgeStats:
    """What a client connection reports; the no-op base is what unit tests use."""

    def frame_in(self, size: int) -> None: ...

    def frame_out(self, size: int) -> None: ...

    def turn_started(self) -> None: ...

    def turn_finished(self, terminal: str | None, seconds: float, first_event: float | None, frames: int, size: int) -> None: ...

    def closed(self, code: int, reason: str) -> None: ...

    def overflow(self) -> None: ...


class Metrics(EdgeStats):
    """The gateway's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames = Counter("cch_client_frames", "WebSocket frames, by direction.", ["direction"], registry=r)
        self.bytes = Counter("cch_client_bytes", "WebSocket payload bytes, by direction.", ["direction"], registry=r)
        self.turns_started = Counter("cch_turns_started", "Turns started (valid response.create frames).", registry=r)
        self.turns_completed = Counter(
            "cch_turns_completed", "Turns ended, by terminal event type (none = no terminal).", ["terminal"], registry=r
        )
        self.closes = Counter("cch_client_closes", "Close frames sent to clients, by code and reason.", ["code", "reason"], registry=r)
        self.overflows = Counter("cch_queue_overflows", "Clients closed 1008 for queueing too many frames.", registry=r)
        self.turn_seconds = Histogram("cch_turn_seconds", "Time from a turn's start to its end.", buckets=LATENCY_BUCKETS, registry=r)
        self.first_event_seconds = Histogram(
            "cch_time_to_first_event_seconds", "Time from a turn's start to its first event.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.http_turns = Counter(
            "cch_http_turns", "HTTP POST /v1/responses turns ended, by outcome.", ["outcome"], registry=r
        )
        self.requests_refused = Counter(
            "cch_requests_refused", "Requests and connections refused before any work, by reason.", ["reason"], registry=r
        )
        # Children of the per-turn series, looked up once (labels() takes a lock each time).
        self._frames_in, self._frames_out = self.frames.labels("in"), self.frames.labels("out")
        self._bytes_in, self._bytes_out = self.bytes.labels("in"), self.bytes.labels("out")
        self._http_turns = {outcome: self.http_turns.labels(outcome) for outcome in HTTP_TURN_OUTCOMES}

    # EdgeStats
    def frame_in(self, size: int) -> None:
        self._frames_in.inc()
        self._bytes_in.inc(size)

    def frame_out(self, size: int) -> None:
        self._frames_out.inc()
        self._bytes_out.inc(size)

    def turn_started(self) -> None:
        self.turns_started.inc()

    def turn_finished(self, terminal: str | None, seconds: float, first_event: float | None, frames: int, size: int) -> None:
        self.turns_completed.labels(terminal or "none").inc()
        self.turn_seconds.observe(seconds)
        if first_event is not None:
            self.first_event_seconds.observe(first_event)
        self._frames_out.inc(frames)
        self._bytes_out.inc(size)

    def closed(self, code: int, reason: str) -> None:
        self.closes.labels(str(code), reason).inc()

    def overflow(self) -> None:
        self.overflows.inc()

    def http_turn(self, outcome: str) -> None:
        """One HTTP POST turn ended: ``completed``, ``cancelled`` or ``failed`` (once per turn)."""
        self._http_turns[outcome].inc()

    def refused(self, reason: str) -> None:
        """A request or connection was turned away before any work (``reason`` is its code)."""
        self.requests_refused.labels(reason).inc()

    def watch(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add figures read at scrape time."""
        self.registry.register(_Callback(collect))

    def export(self, component: Collector) -> None:
        """Add a component's own figures (its ``collect()``), read at scrape time."""
        self.watch(component.collect)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Collector(Protocol):
    """A component that reports its own figures (the edge, the pool, the handler, the router, ...)."""

    def collect(self) -> Iterable[Metric]: ...


class _Callback:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        return []
