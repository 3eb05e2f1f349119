"""The gateway's drain (docs/operations.md#draining-and-rolling-deploys): one object, made once
by the service, which alone starts it; whoever refuses new work while it is on (readiness, new
upgrades, new HTTP turns) reads it, and whoever must act when it starts waits on it."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from cch.waiters import Waiters


class Drain:
    """Off until :meth:`start`; on from then until :meth:`reset` (the service started again)."""

    def __init__(self) -> None:
        self._draining = False
        self._started: Waiters[None] = Waiters()

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> None:
        """Refuse new work from now on and tell everyone waiting; a second start changes nothing."""
        if self._draining:
            return
        self._draining = True
        self._started.fire(None)

    def reset(self) -> None:
        """The service is starting: new work is welcome again."""
        self._draining = False

    def wait(self) -> Deferred[None]:
        """Fires when the drain starts (at once if it has); cancelling it only stops the wait."""
        if self._draining:
            return succeed(None)
        return self._started.wait()
