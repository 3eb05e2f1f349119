"""Limits shared through Redis (cch/cluster/limits.py): one suite run against the memory store
and the Redis store gives the same Breach answers for the same history; leases expire when
their replica stops renewing them; two Redis stores (two replicas) share one key's limits.

The Redis tests use the machine's Redis (127.0.0.1:6379, or $CCH_TEST_REDIS) with a key
prefix of their own, deleted after; they skip when it does not answer, except under CI=true,
where they fail."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from cch.cluster.limits import RedisLimitStore
from cch.cluster.testing import TestRedis, close_test_redis, open_test_redis, require_redis
from cch.config import KeyLimitsConfig
from cch.keylimits import BUSY_RETRY_AFTER, Breach, MemoryLimitStore

TTL = 15.0


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# Not on a whole second: a float that survives no rounding on its way through Redis.
T0 = epoch("2026-12-06T12:00:00Z") + 0.123456789


def clock_at(when: float = T0) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def limits(**values: Any) -> KeyLimitsConfig:
    return KeyLimitsConfig(**values)


@dataclass
class Subject:
    """One store under test and the clock its caller reads ``now`` from."""

    store: Any
    clock: Clock
    started: list[Any] = field(default_factory=list)

    @property
    def now(self) -> float:
        return self.clock.seconds()

    async def advance(self, seconds: float) -> None:
        """Move time on; a Redis store's renewal (on the same clock) is awaited."""
        self.clock.advance(seconds)
        if isinstance(self.store, RedisLimitStore):
            await self.store.renew()

    async def connect(self, key: str, limit: int) -> Breach | None:
        return await self.store.try_connect(key, limit)

    async def admit(self, key: str, lim: KeyLimitsConfig) -> Breach | None:
        return await self.store.try_admit(key, self.now, lim)

    async def finish(self, key: str, lim: KeyLimitsConfig, tokens: int | None = None, cost: float | None = None) -> None:
        await self.store.finish(key, self.now, lim, tokens, cost)


def redis_store(redis: TestRedis, clock: Clock, replica: str = "a") -> RedisLimitStore:
    store = RedisLimitStore(redis, clock, replica=replica, lease_ttl=TTL, prefix=redis.prefix)
    store.startService()
    return store


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_redis()
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def subject(store_kind: str) -> Any:
    clock = clock_at()
    if store_kind == "memory":
        yield Subject(MemoryLimitStore(), clock)
        return
    redis = open_test_redis(global_reactor)
    store = redis_store(redis, clock)
    yield Subject(store, clock)
    await store.stopService()
    await close_test_redis(redis)


# -- the shared suite: memory and Redis answer alike ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_refused_at_the_limit_and_admitted_after_a_disconnect(subject: Subject) -> None:
    assert await subject.connect("alice", 2) is None
    assert await subject.connect("alice", 2) is None
    assert await subject.connect("alice", 2) == Breach("max_connections", 2, 2, BUSY_RETRY_AFTER)
    assert await subject.connect("bob", 2) is None  # keys are counted apart
    await subject.store.disconnect("alice")
    assert await subject.connect("alice", 2) is None
    assert await subject.connect("alice", 2) == Breach("max_connections", 2, 2, BUSY_RETRY_AFTER)


@pytest_twisted.ensureDeferred
async def test_connections_stay_counted_however_long_they_last(subject: Subject) -> None:
    assert await subject.connect("alice", 1) is None
    for _ in range(12):
        await subject.advance(TTL / 2)
    assert await subject.connect("alice", 1) == Breach("max_connections", 1, 1, BUSY_RETRY_AFTER)


@pytest_twisted.ensureDeferred
async def test_disconnect_without_a_connection_gives_nothing_back(subject: Subject) -> None:
    await subject.store.disconnect("alice")
    assert await subject.connect("alice", 1) is None
    assert await subject.connect("alice", 1) == Breach("max_connections", 1, 1, BUSY_RETRY_AFTER)


@pytest_twisted.ensureDeferred
async def test_requests_per_minute_refuses_the_eleventh_until_the_first_leaves(subject: Subject) -> None:
    rpm = limits(requests_per_minute=10)
    for _ in range(10):
        assert await subject.admit("alice", rpm) is None
        await subject.advance(1.0)
    await subject.advance(0.5)  # 10.5 s after the first
    assert await subject.admit("alice", rpm) == Breach("requests_per_minute", 10, 10, 50)
    await subject.advance(49.25)  # 59.75 s after the first: it still counts
    assert await subject.admit("alice", rpm) == Breach("requests_per_minute", 10, 10, 1)
    await subject.advance(0.25)  # 60 s: it has left
    assert await subject.admit("alice", rpm) is None
    assert await subject.admit("alice", rpm) == Breach("requests_per_minute", 10, 10, 1)


@pytest_twisted.ensureDeferred
async def test_requests_per_minute_retry_after_names_the_request_that_frees_a_place(subject: Subject) -> None:
    rpm = limits(requests_per_minute=3)
    for step in (0.0, 20.25, 20.25):
        await subject.advance(step)
        assert await subject.admit("alice", rpm) is None
    await subject.advance(30.0)  # 70.5 s: the first has left, two remain
    assert await subject.admit("alice", rpm) is None
    # The window holds 20.25, 40.5 and 70.5; the first leaves at 80.25, 9.75 s from now.
    assert await subject.admit("alice", rpm) == Breach("requests_per_minute", 3, 3, 10)


@pytest_twisted.ensureDeferred
async def test_concurrent_turns_refused_at_the_limit_until_one_finishes(subject: Subject) -> None:
    two = limits(max_concurrent_turns=2)
    assert await subject.admit("alice", two) is None
    assert await subject.admit("alice", two) is None
    assert await subject.admit("alice", two) == Breach("max_concurrent_turns", 2, 2, BUSY_RETRY_AFTER)
    await subject.finish("alice", two, tokens=10)
    assert await subject.admit("alice", two) is None
    assert await subject.admit("alice", two) == Breach("max_concurrent_turns", 2, 2, BUSY_RETRY_AFTER)


@pytest_twisted.ensureDeferred
async def test_a_turn_under_no_concurrency_limit_holds_no_slot(subject: Subject) -> None:
    rpm = limits(requests_per_minute=100)
    assert await subject.admit("alice", rpm) is None
    await subject.finish("alice", rpm)
    both = limits(requests_per_minute=100, max_concurrent_turns=1)
    assert await subject.admit("alice", both) is None
    # Finishing a turn admitted without the concurrency limit frees nothing.
    await subject.finish("alice", rpm)
    assert await subject.admit("alice", both) == Breach("max_concurrent_turns", 1, 1, BUSY_RETRY_AFTER)


@pytest_twisted.ensureDeferred
async def test_tokens_per_minute_counts_finished_turns_and_frees_with_their_bucket(subject: Subject) -> None:
    tpm = limits(tokens_per_minute=1000)
    for tokens, wait in ((600, 0.0), (300, 0.5), (200, 1.5)):  # the first two share a bucket
        await subject.advance(wait)
        assert await subject.admit("alice", tpm) is None
        await subject.finish("alice", tpm, tokens=tokens)
    await subject.advance(3.0)
    # 1100 used; once the bucket of 600 + 300 (last at 0.5 s) leaves, 200 remain.
    assert await subject.admit("alice", tpm) == Breach("tokens_per_minute", 1000, 1100, 56)
    await subject.advance(56.5)  # 61.5 s: the bucket that ended at 0.5 s left at 60.5 s
    assert await subject.admit("alice", tpm) is None


@pytest_twisted.ensureDeferred
async def test_tokens_per_minute_buckets_merge_within_a_second_of_their_first(subject: Subject) -> None:
    tpm = limits(tokens_per_minute=100)
    for _ in range(5):  # 0, 0.25, 0.5, 0.75: one bucket; 1.0: a new one
        await subject.finish("alice", tpm, tokens=30)
        await subject.advance(0.25)
    # 1.25 s: the first bucket (last at 0.75 s) leaves at 60.75 s.
    assert await subject.admit("alice", tpm) == Breach("tokens_per_minute", 100, 150, 60)
    await subject.advance(58.0)  # 59.25 s
    assert await subject.admit("alice", tpm) == Breach("tokens_per_minute", 100, 150, 2)
    await subject.advance(1.5)  # 60.75 s
    assert await subject.admit("alice", tpm) is None


@pytest_twisted.ensureDeferred
async def test_tokens_per_day_refuses_until_utc_midnight(subject: Subject) -> None:
    day = limits(tokens_per_day=5000)
    assert await subject.admit("alice", day) is None
    await subject.finish("alice", day, tokens=4999)
    assert await subject.admit("alice", day) is None
    await subject.finish("alice", day, tokens=2)
    # 12:00:00.123 -> midnight: 43199.88 s, rounded up.
    assert await subject.admit("alice", day) == Breach("tokens_per_day", 5000, 5001, 43200)
    await subject.advance(epoch("2026-12-07T00:00:00Z") - subject.now + 1.0)
    assert await subject.admit("alice", day) is None


@pytest_twisted.ensureDeferred
async def test_budget_adds_costs_as_the_memory_store_does_and_resets_with_the_month(subject: Subject) -> None:
    budget = limits(budget_per_month=1.0)
    spent = 0.0
    while spent < 1.0:
        assert await subject.admit("alice", budget) is None
        await subject.finish("alice", budget, tokens=10, cost=0.1)
        spent += 0.1
        await subject.advance(1.0)
    # Ten times 0.1 is 0.9999999999999999 in floats: the eleventh is refused at 1.0999999999999999.
    assert await subject.admit("alice", budget) == Breach("budget_per_month", 1.0, spent, None)
    await subject.advance(epoch("2027-01-01T00:00:00Z") - subject.now + 1.0)
    assert await subject.admit("alice", budget) is None


@pytest_twisted.ensureDeferred
async def test_unknown_usage_counts_nothing(subject: Subject) -> None:
    every = limits(tokens_per_minute=1, tokens_per_day=1, budget_per_month=0.01)
    assert await subject.admit("alice", every) is None
    await subject.finish("alice", every, tokens=None, cost=None)
    await subject.finish("alice", every, tokens=0, cost=0.0)
    assert await subject.admit("alice", every) is None


@pytest_twisted.ensureDeferred
async def test_limits_are_checked_in_order_budget_day_minute_requests_turns(subject: Subject) -> None:
    every = limits(
        budget_per_month=0.5, tokens_per_day=100, tokens_per_minute=50, requests_per_minute=2, max_concurrent_turns=1
    )
    assert await subject.admit("alice", every) is None
    assert await subject.admit("alice", every) == Breach("max_concurrent_turns", 1, 1, BUSY_RETRY_AFTER)
    await subject.finish("alice", every)
    assert await subject.admit("alice", every) is None
    await subject.finish("alice", every, tokens=60)
    assert await subject.admit("alice", every) == Breach("tokens_per_minute", 50, 60, 60)
    await subject.finish("alice", limits(tokens_per_day=100), tokens=40)
    assert await subject.admit("alice", every) == Breach("tokens_per_day", 100, 100, 43200)
    await subject.finish("alice", limits(budget_per_month=0.5), tokens=1, cost=0.5)
    assert await subject.admit("alice", every) == Breach("budget_per_month", 0.5, 0.5, None)


@pytest_twisted.ensureDeferred
async def test_seed_raises_day_and_month_to_at_least_the_ledger_figures(subject: Subject) -> None:
    lim = limits(tokens_per_day=1000, budget_per_month=2.0)
    await subject.store.seed("alice", subject.now, 900, 1.5)
    await subject.store.seed("alice", subject.now, 900, 1.5)  # twice counts nothing twice
    assert await subject.admit("alice", lim) is None
    await subject.finish("alice", lim, tokens=50, cost=0.25)
    await subject.store.seed("alice", subject.now, 10, 0.1)  # never lowers
    assert await subject.admit("alice", lim) is None
    await subject.finish("alice", lim, tokens=50, cost=0.25)
    assert await subject.admit("alice", lim) == Breach("budget_per_month", 2.0, 2.0, None)
    assert await subject.admit("alice", limits(tokens_per_day=1000)) == Breach("tokens_per_day", 1000, 1000, 43200)




# -- the same random history against both stores -----------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest_twisted.ensureDeferred
async def test_a_random_history_gets_the_same_answers_from_memory_and_redis(redis: TestRedis, seed: int) -> None:
    rng = random.Random(seed)
    memory, clock = Subject(MemoryLimitStore(), clock_at()), clock_at()
    shared = Subject(redis_store(redis, clock), clock)
    choices = [
        limits(requests_per_minute=5, max_concurrent_turns=3),
        limits(tokens_per_minute=400, tokens_per_day=3000),
        limits(budget_per_month=0.7, requests_per_minute=8),
        limits(max_concurrent_turns=2, tokens_per_minute=250, tokens_per_day=2000, budget_per_month=1.1),
    ]
    open_turns: list[tuple[str, KeyLimitsConfig]] = []
    answers: list[tuple[Any, Any]] = []
    try:
        for _ in range(250):
            key = rng.choice(["alice", "bob"])
            action = rng.random()
            if action < 0.45:
                lim = rng.choice(choices)
                got = [await s.admit(key, lim) for s in (memory, shared)]
                if got[0] is None:
                    open_turns.append((key, lim))
            elif action < 0.75 and open_turns:
                key, lim = open_turns.pop(rng.randrange(len(open_turns)))
                tokens = rng.choice([None, 0, 1, 37, 120, 333])
                cost = rng.choice([None, 0.0, 0.05, 0.1, 0.333])
                got = [await s.finish(key, lim, tokens, cost) for s in (memory, shared)]
            elif action < 0.85:
                got = [await s.connect(key, 3) for s in (memory, shared)]
            elif action < 0.9:
                got = [await s.store.disconnect(key) for s in (memory, shared)]
            else:
                step = rng.choice([0.2, 0.7, 1.0, 5.0, 13.3, 30.0, 61.0])
                memory.clock.advance(step)
                await shared.advance(step)
                continue
            answers.append((got[0], got[1]))
            assert got[0] == got[1], f"step {len(answers)}: memory {got[0]} != redis {got[1]}"
    finally:
        await shared.store.stopService()
    # The history did reach the limits, and more than one kind of them.
    reasons = {a.reason for a, _ in answers if isinstance(a, Breach)}
    assert len(reasons) >= 4, reasons


# -- leases: replicas that die, replicas that share ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_replica_that_stops_renewing_frees_its_slots_within_lease_ttl(redis: TestRedis) -> None:
    dead_clock, live_clock = clock_at(), clock_at()
    dead, live = redis_store(redis, dead_clock, "dead"), redis_store(redis, live_clock, "live")
    one = limits(max_concurrent_turns=1)
    try:
        assert await dead.try_connect("alice", 2) is None
        assert await dead.try_connect("alice", 2) is None
        assert await dead.try_admit("alice", dead_clock.seconds(), one) is None
        # "dead" stops here: its clock never moves again, so it never renews.
        live_clock.advance(TTL - 0.5)
        await live.renew()
        assert await live.try_connect("alice", 2) == Breach("max_connections", 2, 2, BUSY_RETRY_AFTER)
        assert await live.try_admit("alice", live_clock.seconds(), one) == Breach("max_concurrent_turns", 1, 1, 5)
        live_clock.advance(0.5)  # lease_ttl after they were taken
        assert await live.try_connect("alice", 2) is None
        assert await live.try_admit("alice", live_clock.seconds(), one) is None
    finally:
        await live.stopService()
        await dead.stopService()


@pytest_twisted.ensureDeferred
async def test_a_live_replica_keeps_its_slots_by_renewing_them(redis: TestRedis) -> None:
    clock = clock_at()
    holder, other = redis_store(redis, clock, "holder"), redis_store(redis, clock, "other")
    try:
        assert await holder.try_connect("alice", 1) is None
        for _ in range(20):  # 20 lease_ttl/3 renewals, 100 s
            clock.advance(TTL / 3)
            await holder.renew()
        assert await other.try_connect("alice", 1) == Breach("max_connections", 1, 1, BUSY_RETRY_AFTER)
        assert holder.renewed >= 20
        await holder.disconnect("alice")
        assert await other.try_connect("alice", 1) is None
    finally:
        await holder.stopService()
        await other.stopService()


@pytest_twisted.ensureDeferred
async def test_the_renewal_runs_every_third_of_lease_ttl_on_the_clock(redis: TestRedis) -> None:
    clock = clock_at()
    store = redis_store(redis, clock)
    try:
        assert await store.try_connect("alice", 5) is None
        assert store.renewed == 0
        clock.advance(TTL / 3)
        await store.renew()  # the loop's call went out first on the one connection
        assert store.renewed == 2
        lease = store.leases("connections", "alice")[0]
        score = await redis.execute("ZSCORE", f"{redis.prefix}{{alice}}:connections", lease)
        assert float(score) == clock.seconds() + TTL
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_two_replicas_share_one_keys_limits(redis: TestRedis) -> None:
    clock = clock_at()
    a, b = redis_store(redis, clock, "a"), redis_store(redis, clock, "b")
    four = limits(max_concurrent_turns=4, requests_per_minute=6)
    try:
        admitted = [await store.try_admit("alice", clock.seconds(), four) for store in (a, b, a, b)]
        assert admitted == [None] * 4
        assert await a.try_admit("alice", clock.seconds(), four) == Breach("max_concurrent_turns", 4, 4, 5)
        assert await b.try_admit("alice", clock.seconds(), four) == Breach("max_concurrent_turns", 4, 4, 5)
        await a.finish("alice", clock.seconds(), four, 10, None)
        assert await b.try_admit("alice", clock.seconds(), four) is None  # a's slot, taken by b
        await b.finish("alice", clock.seconds(), four, 10, None)
        await b.finish("alice", clock.seconds(), four, 10, None)
        assert await a.try_admit("alice", clock.seconds(), four) is None
        # Six requests in the minute between them: the seventh is refused on either.
        assert await b.try_admit("alice", clock.seconds(), four) == Breach("requests_per_minute", 6, 6, 60)
        assert (len(a.leases("turns", "alice")), len(b.leases("turns", "alice"))) == (2, 1)
    finally:
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_leases_lost_by_redis_are_put_back_by_the_next_renewal(redis: TestRedis) -> None:
    clock = clock_at()
    holder, other = redis_store(redis, clock, "holder"), redis_store(redis, clock, "other")
    try:
        assert await holder.try_connect("alice", 1) is None
        await redis.execute("DEL", f"{redis.prefix}{{alice}}:connections")  # as a restarted Redis would
        assert await other.try_connect("alice", 1) is None
        await other.disconnect("alice")
        await holder.renew()
        assert holder.restored == 1
        assert await other.try_connect("alice", 1) == Breach("max_connections", 1, 1, BUSY_RETRY_AFTER)
    finally:
        await holder.stopService()
        await other.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_a_store_gives_back_every_lease_it_holds(redis: TestRedis) -> None:
    clock = clock_at()
    store, other = redis_store(redis, clock, "a"), redis_store(redis, clock, "b")
    try:
        assert await store.try_connect("alice", 1) is None
        assert await store.try_admit("alice", clock.seconds(), limits(max_concurrent_turns=1)) is None
        await store.stopService()
        assert await other.try_connect("alice", 1) is None
        assert await other.try_admit("alice", clock.seconds(), limits(max_concurrent_turns=1)) is None
    finally:
        await other.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_gives_back_thousands_of_leases_of_one_key(redis: TestRedis) -> None:
    clock = clock_at()
    store, other = redis_store(redis, clock, "a"), redis_store(redis, clock, "b")
    try:
        for _ in range(2500):
            assert await store.try_connect("alice", 2500) is None
        await store.renew()
        assert store.renewed == 2500
        await store.stopService()
        assert await redis.execute("ZCARD", f"{redis.prefix}{{alice}}:connections") == 0
        assert await other.try_connect("alice", 1) is None
    finally:
        await other.stopService()


@pytest_twisted.ensureDeferred
async def test_every_key_of_one_client_key_shares_its_hash_tag(redis: TestRedis) -> None:
    clock = clock_at()
    store = redis_store(redis, clock)
    every = limits(max_concurrent_turns=2, requests_per_minute=2, tokens_per_minute=9, tokens_per_day=9, budget_per_month=9.0)
    try:
        assert await store.try_connect("team:a}b", 2) is None
        assert await store.try_admit("team:a}b", clock.seconds(), every) is None
        await store.finish("team:a}b", clock.seconds(), every, 5, 0.5)
        _, keys = await redis.execute("SCAN", "0", "MATCH", redis.prefix + "*", "COUNT", 1000)
        # connections, requests, tokens, day, month (the emptied turns set is gone)
        assert len(keys) == 5
        assert {key.split("}")[0] for key in keys} == {redis.prefix + "{team:a"}
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_admission_leaves_no_slot_taken(redis: TestRedis) -> None:
    clock = clock_at()
    store = redis_store(redis, clock)
    one = limits(max_concurrent_turns=1)
    try:
        asked = store.try_admit("alice", clock.seconds(), one)
        asked.cancel()
        with pytest.raises(CancelledError):
            await asked
        # The script ran all the same; its lease is given back as soon as its reply is in,
        # which is before the reply to a command sent after it.
        await redis.execute("PING")
        assert await store.try_admit("alice", clock.seconds(), one) is None
        assert await store.try_admit("alice", clock.seconds(), one) == Breach("max_concurrent_turns", 1, 1, 5)
        assert len(store.leases("turns", "alice")) == 1
    finally:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_three_limiters_over_redis_hold_twelve_turns_to_four(redis: TestRedis) -> None:
    from cch.config import ClientKey
    from cch.keylimits import KeyLimiter, Refused, TurnLease
    from cch.usage.prices import PriceSheet

    clock = clock_at()
    stores = [redis_store(redis, clock, f"r{n}") for n in range(3)]
    limiters = [KeyLimiter(clock, PriceSheet(()), store) for store in stores]
    key = ClientKey(name="team", key="sk-cch-team-0123456789", limits=limits(max_concurrent_turns=4))
    try:
        answers = [await limiters[n % 3].begin_turn(key, "gpt-5") for n in range(12)]
        leases = [a for a in answers if isinstance(a, TurnLease)]
        refused = [a for a in answers if isinstance(a, Refused)]
        assert (len(leases), len(refused)) == (4, 8)
        assert {r.reason for r in refused} == {"max_concurrent_turns"}
        for lease in leases:
            lease.finish(100, None)
        await redis.execute("PING")  # the finishes went out first on the one connection
        again = [await limiters[n % 3].begin_turn(key, "gpt-5") for n in range(5)]
        assert [isinstance(a, TurnLease) for a in again] == [True] * 4 + [False]
    finally:
        for store in stores:
            await store.stopService()
