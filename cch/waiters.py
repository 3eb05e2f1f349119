"""Deferreds waiting for one event (idle, empty, listening), fired together, none left over."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Waiters(Generic[T]):
    """Whoever waits gets a Deferred; :meth:`fire` or :meth:`fail` answers them all at once.

    A cancelled wait is forgotten at once, so a waiter that gave up leaves nothing behind.
    """

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []

    def wait(self) -> Deferred[T]:
        d: Deferred[T] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def fire(self, value: T) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(value)

    def fail(self, failure: Failure) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def __len__(self) -> int:
        return len(self._waiting)
