"""Waiters: fired together, and a cancelled wait leaves nothing behind."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from cch.waiters import Waiters


def test_every_waiter_gets_the_value_once() -> None:
    waiters: Waiters[int] = Waiters()
    got: list[int] = []
    for _ in range(3):
        waiters.wait().addCallback(got.append)
    waiters.fire(7)
    waiters.fire(8)  # nobody waits any more
    assert got == [7, 7, 7] and len(waiters) == 0


def test_a_cancelled_wait_is_forgotten() -> None:
    waiters: Waiters[None] = Waiters()
    d = waiters.wait()
    d.cancel()
    assert len(waiters) == 0
    failure: list[Failure] = []
    d.addErrback(failure.append)
    assert failure[0].check(CancelledError)
    waiters.fire(None)  # no AlreadyCalledError


def test_a_failure_reaches_every_waiter() -> None:
    waiters: Waiters[None] = Waiters()
    seen: list[Failure] = []
    for _ in range(2):
        waiters.wait().addErrback(seen.append)
    waiters.fail(Failure(ValueError("no port")))
    assert [f.check(ValueError) for f in seen] == [ValueError, ValueError]
    assert len(waiters) == 0
