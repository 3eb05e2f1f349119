"""Reading an HTTP response body: one protocol for every body the gateway reads.

An upstream's SSE stream or JSON body, a failover candidate's error and the HTTP tunnel's
answer all go through :class:`BodyReader`: each chunk goes to a callable as it arrives; the
reader is the push producer the turn's sink pauses, so a slow client holds the upstream's
socket (docs/architecture.md#flow-control-instead-of-frame-size-kills); an optional stall
watchdog runs on the injected clock and stops counting while the reader is paused; an
optional cap stops a body that grows too large. How the body ended is a type
(:data:`BodyEnd`), and cancelling :attr:`BodyReader.finished` aborts the body and reports
nothing more. :func:`collect` (a whole body to bytes) is one use of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from cch.upstream.idle import IdleWatchdog, WatchedProducer

__all__ = [
    "BodyEnd",
    "BodyReader",
    "Collected",
    "Complete",
    "Failed",
    "Idle",
    "Lost",
    "TooLarge",
    "Unframed",
    "collect",
    "content_type",
    "is_event_stream",
]


@dataclass(frozen=True)
class Complete:
    """The body ended where its framing said (its length, or the last chunk)."""


@dataclass(frozen=True)
class Unframed:
    """A body without a length, ended by the connection closing: everything that was sent,
    as far as anyone can tell (Twisted's ``PotentialDataLoss``)."""


@dataclass(frozen=True)
class Lost:
    """The connection broke before the body was complete."""

    reason: Failure


@dataclass(frozen=True)
class TooLarge:
    """More than ``limit`` bytes came; the first ``limit`` were handed on, then the body was
    stopped."""

    limit: int


@dataclass(frozen=True)
class Idle:
    """Nothing came for ``timeout`` seconds (not counting while paused); the body was stopped."""

    timeout: float


@dataclass(frozen=True)
class Failed:
    """The chunk handler raised ``failure``; the body was stopped."""

    failure: Failure


BodyEnd = Complete | Unframed | Lost | TooLarge | Idle | Failed


@implementer(IPushProducer)
class BodyReader(Protocol):
    """Reads one response body into ``on_chunk``; :attr:`finished` fires with its end.

    ``on_start(reader)`` runs once the body is connected, before any chunk: where a consumer
    registers the reader with its sink as the producer to pause. A reader that stopped the
    body itself (the cap, the watchdog, a chunk handler that raised) reads nothing more, and
    its reason wins over however the connection then ends.
    """

    def __init__(
        self,
        on_chunk: Callable[[bytes], object],
        *,
        on_start: Callable[[BodyReader], object] | None = None,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.on_chunk = on_chunk
        self.on_start = on_start
        self.max_bytes = max_bytes
        self.received = 0
        self.finished: Deferred[BodyEnd] = Deferred(self._cancel)
        self.watchdog: IdleWatchdog | None = None
        if clock is not None and idle_timeout is not None:
            self.watchdog = IdleWatchdog(clock, idle_timeout, self._idle)
        self._producer: IPushProducer | None = None
        self._stopped: BodyEnd | None = None
        self._reading = True  # False once stopped or cancelled: chunks in flight are dropped
        self._paused = False

    def read(self, response: IResponse) -> Deferred[BodyEnd]:
        """Read ``response``'s body; returns :attr:`finished`."""
        response.deliverBody(self)
        if self._paused and self._reading and self._producer is not None and not self.finished.called:
            # Twisted resumes the connection once it has handed over what it buffered; a sink
            # that paused the reader in on_start still wants it paused.
            self._producer.pauseProducing()
        return self.finished

    # -- Protocol ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        self._producer = transport if self.watchdog is None else WatchedProducer(transport, self.watchdog)
        if self.on_start is not None:
            self.on_start(self)
        if self.watchdog is not None:
            self.watchdog.start()

    def dataReceived(self, data: bytes) -> None:
        if not self._reading:
            return
        if self.watchdog is not None:
            self.watchdog.poke()
        cap = self.max_bytes
        if cap is not None and self.received + len(data) > cap:
            room = cap - self.received
            self.received += len(data)
            if room > 0:
                self._hand_on(data[:room])
            self._stop(TooLarge(cap))
            return
        self.received += len(data)
        self._hand_on(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._reading = False
        self._producer = None
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.finished.called:
            return  # cancelled: nobody is waiting
        self.finished.callback(self._stopped or _end_of(reason))

    # -- IPushProducer (for the sink) ----------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()

    # -- the reader's own stops ----------------------------------------------------------------

    def _hand_on(self, data: bytes) -> None:
        try:
            self.on_chunk(data)
        except Exception:
            self._stop(Failed(Failure()))

    def _idle(self) -> None:
        assert self.watchdog is not None
        self._stop(Idle(self.watchdog.timeout))

    def _stop(self, end: BodyEnd) -> None:
        if not self._reading:
            return
        self._reading = False
        self._stopped = end
        self._abort()

    def _cancel(self, _: Deferred[BodyEnd]) -> None:
        self._reading = False
        self._abort()

    def _abort(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.transport is not None:
            self.transport.stopProducing()


def _end_of(reason: Failure) -> BodyEnd:
    if reason.check(ResponseDone):
        return Complete()
    if reason.check(PotentialDataLoss):
        return Unframed()
    return Lost(reason)


@dataclass(frozen=True)
class Collected:
    """A body's bytes (at most the cap's worth) and how it ended."""

    data: bytes
    end: BodyEnd


def collect(
    response: IResponse,
    *,
    on_start: Callable[[BodyReader], object] | None = None,
    clock: IReactorTime | None = None,
    idle_timeout: float | None = None,
    max_bytes: int | None = None,
) -> Deferred[Collected]:
    """The whole body (or its first ``max_bytes``) in memory, however it ended; cancellable."""
    chunks: list[bytes] = []
    reader = BodyReader(chunks.append, on_start=on_start, clock=clock, idle_timeout=idle_timeout, max_bytes=max_bytes)
    return reader.read(response).addCallback(lambda end: Collected(b"".join(chunks), end))


def content_type(response: IResponse) -> str:
    """The response's ``Content-Type`` as text, "" when it has none."""
    value = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def is_event_stream(content_type: str) -> bool:
    """Is a body of this type read as SSE events (docs/reference-behaviour.md#sse-parsing)?"""
    return "text/event-stream" in content_type.lower()
