"""Unsupported-endpoint marks and provider breakers shared between replicas through Redis
(cch/cluster/marks.py): what one replica discovers, the others know at their next read. Two
"replicas" here are two SharedMarks on the machine's Redis, each with its own cache, breakers
and Clock; reads are driven by advancing the Clock, replies awaited for real."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import eventually, within
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from cch.cluster.marks import MARKS_INTERVAL, SharedMarks
from cch.cluster.testing import (
    RedisProxy,
    TestRedis,
    close_test_redis,
    open_test_redis,
)
from cch.config import BreakerConfig
from cch.handler.routing import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from cch.upstream.unsupported import UnsupportedCache

NOW = 1_800_000_000.0
BREAKER = BreakerConfig(failure_threshold=2, cooldown=30.0)


class Replica:
    """One replica's view of the providers: its cache, its breakers, its shared marks."""

    def __init__(self, redis: TestRedis, clock: Clock, prefix: str) -> None:
        self.clock = clock
        self.unsupported = UnsupportedCache(clock, ttl=300.0)
        self.breakers = [CircuitBreaker("main", BREAKER, clock), CircuitBreaker("spare", BREAKER, clock)]
        self.marks = SharedMarks(redis, clock, prefix=prefix, unsupported=self.unsupported, breakers=self.breakers)
        self.marks.startService()

    @property
    def main(self) -> CircuitBreaker:
        return self.breakers[0]

    async def read(self) -> None:
        """The next periodic read, as the Clock brings it."""
        await within(self.marks.read(), "the marks to be read")


@pytest_twisted.async_yield_fixture
async def pair(redis: TestRedis) -> Any:
    clocks = (Clock(), Clock())
    for clock in clocks:
        clock.advance(NOW)
    replicas = [Replica(redis, clock, redis.prefix) for clock in clocks]
    yield replicas
    for replica in replicas:
        await replica.marks.stopService()
        assert replica.clock.getDelayedCalls() == []  # the periodic read is gone
        assert replica.unsupported.listeners == [] and all(b.listeners == [] for b in replica.breakers)


async def published(redis: TestRedis, count: int) -> None:
    async def written() -> bool:
        return len(await redis.execute("HKEYS", redis.prefix + "marks")) >= count

    await eventually_async(written, f"{count} marks in Redis")


async def eventually_async(check: Any, what: str, seconds: float = 10.0) -> None:
    """Until ``await check()`` is true: a state another connection writes to Redis."""
    deadline = reactor.seconds() + seconds
    while not await check():
        if reactor.seconds() > deadline:
            pytest.fail(f"never happened: {what}")
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_an_endpoint_one_replica_found_without_websocket_is_skipped_by_the_other(pair: list[Replica], redis: TestRedis) -> None:
    a, b = pair
    a.unsupported.mark("main", None, "ws_upgrade_rejected")
    await published(redis, 1)
    assert b.unsupported.lookup("main", None) is None  # not read yet
    b.clock.advance(MARKS_INTERVAL)  # the periodic read
    await eventually(lambda: b.unsupported.lookup("main", None) == "ws_upgrade_rejected", "b to learn the mark")
    assert b.marks.learned == {"unsupported": 1, "breaker": 0}
    # The mark keeps its expiry: both forget it at the same moment.
    b.clock.advance(300 - MARKS_INTERVAL - 0.001)
    assert b.unsupported.lookup("main", None) == "ws_upgrade_rejected"
    b.clock.advance(0.001)
    assert b.unsupported.lookup("main", None) is None
    # A read after it expired does not bring it back.
    await b.read()
    assert b.unsupported.lookup("main", None) is None and b.marks.learned["unsupported"] == 1


@pytest_twisted.ensureDeferred
async def test_a_breaker_opened_on_one_replica_opens_on_the_other_and_its_closing_closes_it(pair: list[Replica], redis: TestRedis) -> None:
    a, b = pair
    a.main.record_failure()
    a.main.record_failure()  # the threshold: open
    assert a.main.state == OPEN and a.main.opened_at == NOW
    await published(redis, 1)
    await b.read()
    assert b.main.state == OPEN and b.main.opened_at == NOW  # the same cool-down
    assert b.breakers[1].state == CLOSED  # the other provider untouched
    # Both reach half-open together; a's trial succeeds and closes it; b follows.
    a.clock.advance(30)
    b.clock.advance(30)
    assert a.main.state == HALF_OPEN and b.main.state == HALF_OPEN
    a.main.attempt_started()
    a.main.record_success()
    assert a.main.state == CLOSED
    await eventually_async(
        lambda: _field(redis, "breaker|main", lambda v: v.startswith("closed")), "the closing in Redis"
    )
    await b.read()
    assert b.main.state == CLOSED and b.main.failures == 0
    assert b.marks.learned["breaker"] == 2
    # Learned changes are not told again: only a's two changes were published.
    assert b.marks.published == {"unsupported": 0, "breaker": 0}
    assert a.marks.published == {"unsupported": 0, "breaker": 2}


@pytest_twisted.ensureDeferred
async def test_a_newer_local_change_wins_over_an_older_shared_one(pair: list[Replica], redis: TestRedis) -> None:
    a, b = pair
    a.main.record_failure()
    a.main.record_failure()
    await published(redis, 1)
    # b closed a breaker of its own later than a opened its: b keeps its newer view.
    b.clock.advance(5)
    b.main.record_failure()
    b.main.record_failure()
    b.main.record_success()
    assert b.main.changed_at == NOW + 5
    a.clock.advance(1)
    await eventually_async(lambda: _field(redis, "breaker|main", lambda v: v.startswith("closed")), "b's closing")
    await b.read()
    assert b.main.state == CLOSED
    await a.read()
    assert a.main.state == CLOSED  # a learns b's later closing


@pytest_twisted.ensureDeferred
async def test_redis_down_keeps_each_replica_on_its_own_marks_and_the_next_read_catches_up(redis_url: str, redis: TestRedis) -> None:
    proxy = RedisProxy(reactor, redis_url)
    proxy.start()
    cut = open_test_redis(reactor, proxy.url)
    cut.prefix = redis.prefix
    clocks = (Clock(), Clock())
    for clock in clocks:
        clock.advance(NOW)
    a, b = Replica(redis, clocks[0], redis.prefix), Replica(cut, clocks[1], redis.prefix)
    try:
        await eventually(lambda: cut.up, "the proxied connection")
        await proxy.stop()
        await eventually(lambda: not cut.up, "the proxied connection to drop")
        a.unsupported.mark("main", None, "ws_upgrade_rejected")
        await published(redis, 1)
        b.clock.advance(MARKS_INTERVAL)  # a read that fails: no crash, nothing learned
        await b.read()
        assert b.unsupported.lookup("main", None) is None
        assert cut.errors["unavailable"] >= 1
        proxy.start()  # Redis is back: the reconnection reads at once
        await eventually(lambda: b.unsupported.lookup("main", None) == "ws_upgrade_rejected", "b to catch up")
    finally:
        for replica in (a, b):
            await replica.marks.stopService()
        await close_test_redis(cut)
        await proxy.stop()


async def _field(redis: TestRedis, name: str, test: Any) -> bool:
    value = await redis.execute("HGET", redis.prefix + "marks", name)
    return value is not None and bool(test(value))
