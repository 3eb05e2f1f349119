"""Stall detection for upstream streams, on the injected clock.

The setting is ``providers[].idle_timeout`` (docs/configuration.md); the reference has no such
timeout (docs/reference-behaviour.md#one-request-on-an-upstream-socket).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


class IdleWatchdog:
    """Calls ``on_idle`` once ``timeout`` seconds pass without :meth:`poke`.

    While the gateway itself holds the upstream paused (a slow client), silence is ours, not
    the upstream's: :meth:`pause` stops the clock and :meth:`resume` restarts it.
    """

    def __init__(self, clock: IReactorTime, timeout: float, on_idle: Callable[[], None]) -> None:
        self.clock = clock
        self.timeout = timeout
        self.on_idle = on_idle
        self._call: IDelayedCall | None = None
        self._last = 0.0
        self._paused = False
        self._stopped = False

    def poke(self) -> None:
        """Traffic seen. Cheap on purpose (called per event): it only notes the time; the
        timer re-arms itself for the remainder when it fires early."""
        if self._stopped or self._paused:
            return
        self._last = self.clock.seconds()
        if self._call is None:
            self._call = self.clock.callLater(self.timeout, self._fire)

    start = poke

    def pause(self) -> None:
        self._paused = True
        self._cancel()

    def resume(self) -> None:
        self._paused = False
        self.poke()

    def stop(self) -> None:
        self._stopped = True
        self._cancel()

    def _cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        if self._stopped or self._paused:
            return
        quiet = self.clock.seconds() - self._last
        if quiet < self.timeout:
            self._call = self.clock.callLater(self.timeout - quiet, self._fire)
            return
        self._stopped = True
        self.on_idle()


@implementer(IPushProducer)
class WatchedProducer:
    """The producer handed to a sink: pausing it pauses the upstream and the watchdog."""

    def __init__(self, producer: IPushProducer, watchdog: IdleWatchdog) -> None:
        self.producer = producer
        self.watchdog = watchdog

    def pauseProducing(self) -> None:
        self.watchdog.pause()
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.producer.resumeProducing()
        self.watchdog.resume()

    def stopProducing(self) -> None:
        self.watchdog.stop()
        self.producer.stopProducing()
