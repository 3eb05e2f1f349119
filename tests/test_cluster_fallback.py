"""Limits while Redis cannot answer (cch/cluster/fallback.py): each replica's share of every
limit ("local") or a refusal ("refuse"), logged once per outage and counted, slots given back
where they were taken, and the switch back to Redis without anyone's help. The last tests run
the whole cluster service against the machine's Redis through a proxy that is stopped and
started again."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs

from cch.cluster.fallback import CLUSTER_UNAVAILABLE, FallbackLimitStore
from cch.cluster.redis import RedisUnavailable
from cch.cluster.service import ClusterService
from cch.cluster.testing import RedisProxy, close_test_redis, open_test_redis
from cch.config import ClientKey, ClusterConfig, KeyLimitsConfig
from cch.keylimits import BUSY_RETRY_AFTER, Breach, KeyLimiter, MemoryLimitStore, TurnLease
from cch.usage.prices import PriceSheet

NOW = 1_796_558_400.0  # 2026-12-06T12:00:00Z


class Flaky:
    """A shared store that fails as Redis does while ``down``."""

    def __init__(self) -> None:
        self.memory = MemoryLimitStore()
        self.down = False

    def _call(self, name: str, *args: Any) -> Deferred[Any]:
        if self.down:
            return fail(RedisUnavailable("redis://127.0.0.1:6379/0: not connected"))
        return getattr(self.memory, name)(*args)

    def try_connect(self, *args: Any) -> Deferred[Any]:
        return self._call("try_connect", *args)

    def disconnect(self, *args: Any) -> Deferred[Any]:
        return self._call("disconnect", *args)

    def try_admit(self, *args: Any) -> Deferred[Any]:
        return self._call("try_admit", *args)

    def finish(self, *args: Any) -> Deferred[Any]:
        return self._call("finish", *args)

    def seed(self, *args: Any) -> Deferred[Any]:
        return self._call("seed", *args)


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def fallback(mode: str = "local", replicas: int = 3) -> tuple[FallbackLimitStore, Flaky, Clock]:
    clock = Clock()
    clock.advance(NOW)
    shared = Flaky()
    return FallbackLimitStore(shared, clock, mode=mode, expected_replicas=replicas), shared, clock


def limits(**values: Any) -> KeyLimitsConfig:
    return KeyLimitsConfig(**values)


def in_flight(store: MemoryLimitStore, key: str = "alice") -> int:
    return store._state(key).in_flight


def connections(store: MemoryLimitStore, key: str = "alice") -> int:
    return store._state(key).connections


# -- shares ----------------------------------------------------------------------------------


def test_a_share_is_the_limit_divided_by_the_replicas_rounded_up_and_at_least_one() -> None:
    store, _, _ = fallback(replicas=3)
    assert [store.share(n) for n in (1, 2, 3, 4, 10)] == [1, 1, 1, 2, 4]
    shares = store.shares(limits(max_connections=64, tokens_per_day=1000, budget_per_month=9.0, models=("m",)))
    assert shares == limits(max_connections=22, tokens_per_day=334, budget_per_month=3.0, models=("m",))
    one, _, _ = fallback(replicas=1)
    every = limits(max_concurrent_turns=5, budget_per_month=1.0)
    assert one.shares(every) is every


# -- "local" ---------------------------------------------------------------------------------


def test_redis_down_answers_with_this_replicas_share_of_each_limit() -> None:
    store, shared, clock = fallback(replicas=3)
    four = limits(max_concurrent_turns=4)
    assert result(store.try_admit("alice", NOW, four)) is None
    assert in_flight(shared.memory) == 1
    shared.down = True
    assert result(store.try_admit("alice", NOW, four)) is None
    assert result(store.try_admit("alice", NOW, four)) is None  # this replica's 2 of 4
    assert result(store.try_admit("alice", NOW, four)) == Breach("max_concurrent_turns", 2, 2, BUSY_RETRY_AFTER)
    assert result(store.try_connect("alice", 10)) is None
    assert connections(store.local) == 1
    assert (store.down, store.outages, store.fallbacks) == (True, 1, 4)


def test_an_outage_is_logged_once_and_its_end_once() -> None:
    store, shared, clock = fallback()
    shared.down = True
    with capturedLogs() as events:
        for _ in range(5):
            result(store.try_admit("alice", NOW, limits(requests_per_minute=100)))
        result(store.try_connect("alice", 3))
        clock.advance(12.5)
        shared.down = False
        result(store.try_admit("alice", NOW, limits(requests_per_minute=100)))
        result(store.try_admit("alice", NOW, limits(requests_per_minute=100)))
    names = [event.get("log_format") for event in events]
    assert names == ["cluster_redis_down", "cluster_redis_back"]
    down, back = events
    assert (down["mode"], down["op"]) == ("local", "try_admit")
    assert "not connected" in down["error"]
    assert (back["down_for"], back["fallbacks"]) == (12.5, 6)
    assert (store.down, store.outages) == (False, 1)
    shared.down = True
    result(store.try_connect("alice", 3))
    assert store.outages == 2


def test_a_finish_that_asks_redis_nothing_does_not_end_the_outage() -> None:
    # Redis is asked nothing when a turn has nothing to count there (no lease, no token or
    # budget limit): its quiet success is no news of Redis, and the outage goes on, once.
    store, shared, _ = fallback()
    shared.down = True
    shared.finish = lambda *args: Deferred.fromCoroutine(_nothing())  # type: ignore[method-assign]
    with capturedLogs() as events:
        for _ in range(3):
            result(store.try_admit("alice", NOW, limits(requests_per_minute=100)))
            result(store.finish("alice", NOW, limits(requests_per_minute=100), 10, None))
    assert [event.get("log_format") for event in events] == ["cluster_redis_down"]
    assert (store.down, store.outages) == (True, 1)


async def _nothing() -> None:
    return None


def test_the_switch_back_is_automatic_and_slots_go_back_where_they_were_taken() -> None:
    store, shared, _ = fallback(replicas=2)
    two = limits(max_concurrent_turns=2)
    assert result(store.try_admit("alice", NOW, two)) is None  # in Redis
    assert result(store.try_connect("alice", 4)) is None
    shared.down = True
    assert result(store.try_admit("alice", NOW, two)) is None  # here: this replica's 1 of 2
    assert result(store.try_connect("alice", 4)) is None
    shared.down = False
    assert result(store.try_admit("alice", NOW, two)) is None  # Redis again: 2 of 2 there
    assert (in_flight(shared.memory), in_flight(store.local)) == (2, 1)
    assert (connections(shared.memory), connections(store.local)) == (1, 1)
    for _ in range(3):
        result(store.finish("alice", NOW, two, 10, None))
    result(store.disconnect("alice"))
    result(store.disconnect("alice"))
    assert (in_flight(shared.memory), in_flight(store.local)) == (0, 0)
    assert (connections(shared.memory), connections(store.local)) == (0, 0)


def test_a_give_back_redis_cannot_take_is_counted_not_raised() -> None:
    store, shared, _ = fallback()
    one = limits(max_concurrent_turns=1)
    assert result(store.try_admit("alice", NOW, one)) is None
    assert result(store.try_connect("alice", 1)) is None
    shared.down = True
    assert result(store.finish("alice", NOW, one, 5, None)) is None
    assert result(store.disconnect("alice")) is None
    assert store.failures == 2 and store.outages == 1
    assert in_flight(store.local) == 0  # the slot was Redis's: its lease expires there


def test_usage_of_a_turn_that_ends_while_redis_is_down_counts_in_the_local_windows() -> None:
    store, shared, _ = fallback(replicas=2)
    tpm = limits(tokens_per_minute=1000, max_concurrent_turns=5)
    assert result(store.try_admit("alice", NOW, tpm)) is None  # in Redis
    shared.down = True
    result(store.finish("alice", NOW, tpm, 600, None))
    # This replica's share is 500 tokens a minute: the 600 just used fill it.
    assert result(store.try_admit("alice", NOW + 1, tpm)) == Breach("tokens_per_minute", 500, 600, 59)
    assert in_flight(store.local) == 0


def test_a_turn_admitted_locally_reports_its_usage_to_redis_when_it_is_back() -> None:
    store, shared, _ = fallback(replicas=2)
    lim = limits(tokens_per_day=10_000, max_concurrent_turns=3)
    shared.down = True
    assert result(store.try_admit("alice", NOW, lim)) is None
    shared.down = False
    result(store.finish("alice", NOW, lim, 700, None))
    assert shared.memory._state("alice").day_tokens == 700
    assert in_flight(shared.memory) == 0 and in_flight(store.local) == 0


def test_seed_gives_redis_the_ledger_figures_and_the_local_store_this_replicas_share() -> None:
    store, shared, _ = fallback(replicas=4)
    result(store.seed("alice", NOW, 1001, 2.0))
    assert (shared.memory._state("alice").day_tokens, shared.memory._state("alice").month_spent) == (1001, 2.0)
    assert (store.local._state("alice").day_tokens, store.local._state("alice").month_spent) == (251, 0.5)
    shared.down = True
    assert result(store.seed("bob", NOW, 10, 0.0)) is None  # counted, not raised
    assert store.down


# -- "refuse" --------------------------------------------------------------------------------


def test_refuse_mode_answers_every_new_connection_and_turn_with_cluster_unavailable() -> None:
    store, shared, _ = fallback(mode="refuse")
    shared.down = True
    refusal = Breach(CLUSTER_UNAVAILABLE, 0, 0, BUSY_RETRY_AFTER)
    assert result(store.try_connect("alice", 5)) == refusal
    assert result(store.try_admit("alice", NOW, limits(requests_per_minute=5))) == refusal
    assert connections(store.local) == 0 and store.local.held() == {"alice": 0}
    shared.down = False
    assert result(store.try_connect("alice", 5)) is None


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        FallbackLimitStore(Flaky(), Clock(), mode="ignore")


# -- with the limiter ------------------------------------------------------------------------


def test_the_limiter_words_a_local_share_refusal_like_any_other() -> None:
    store, shared, clock = fallback(replicas=2)
    limiter = KeyLimiter(clock, PriceSheet(()), store)
    key = ClientKey(name="alice", key="sk-cch-alice-0123456789", limits=limits(max_concurrent_turns=2))
    shared.down = True
    lease = result(limiter.begin_turn(key, "gpt-5"))
    assert isinstance(lease, TurnLease)
    refused = result(limiter.begin_turn(key, "gpt-5"))
    assert (refused.status, refused.code, refused.retry_after) == (429, "rate_limit_exceeded", BUSY_RETRY_AFTER)
    assert "at most 1 turns at once" in refused.message
    lease.finish(10, None)
    assert isinstance(result(limiter.begin_turn(key, "gpt-5")), TurnLease)


def test_the_fallback_metrics_say_down_outages_and_fallbacks() -> None:
    store, shared, _ = fallback()
    shared.down = True
    result(store.try_connect("alice", 3))
    registry = CollectorRegistry()
    registry.register(store)
    text = generate_latest(registry).decode()
    assert "cch_cluster_redis_down 1.0" in text
    assert "cch_cluster_redis_outages_total 1.0" in text
    assert 'cch_cluster_fallbacks_total{mode="local"} 1.0' in text


# -- the whole service against Redis, through a proxy stopped and started again --------------


async def eventually_admitted_by_redis(service: ClusterService, what: str) -> None:
    deadline = global_reactor.seconds() + 10
    while service.store.down or not service.redis.up:
        if global_reactor.seconds() > deadline:
            pytest.fail(f"never happened: {what}")
        await service.store.try_connect("probe", 1000)
        await service.store.disconnect("probe")
        await deferLater(global_reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_the_cluster_service_falls_back_while_redis_is_stopped_and_recovers(proxy: RedisProxy) -> None:
    cleanup = open_test_redis(global_reactor)  # deletes the service's keys after
    config = ClusterConfig(
        redis=proxy.url, replica="t1", lease_ttl=3.0, expected_replicas=2, key_prefix=cleanup.prefix
    )
    clock = Clock()
    clock.advance(NOW)
    service = ClusterService(config, global_reactor, clock)
    service.redis.reconnect_delay = service.redis.max_reconnect_delay = 0.05
    service.startService()
    store = service.store
    four = limits(max_concurrent_turns=4)
    try:
        assert await store.try_admit("alice", NOW, four) is None
        assert await store.try_connect("alice", 2) is None
        assert service.ready and not store.down
        assert len(service.limits.leases("turns", "alice")) == 1

        await proxy.stop()
        for _ in range(2):  # this replica's 2 of 4, counted here
            assert await store.try_admit("alice", NOW, four) is None
        assert await store.try_admit("alice", NOW, four) == Breach("max_concurrent_turns", 2, 2, 5)
        assert store.down and not service.ready
        clock.advance(1.0)  # a renewal while down fails quietly
        await deferLater(global_reactor, 0, lambda: None)
        assert service.limits.renewal_failures >= 1

        proxy.start()
        await eventually_admitted_by_redis(service, "Redis answering again")
        assert service.ready and store.outages == 1
        # Redis's count was kept: one turn held there before the outage, three more fit.
        for _ in range(3):
            assert await store.try_admit("alice", NOW, four) is None
        assert await store.try_admit("alice", NOW, four) == Breach("max_concurrent_turns", 4, 4, 5)
        for _ in range(6):
            await store.finish("alice", NOW, four, 1, None)
        assert service.limits.leases("turns", "alice") == []
        assert in_flight(store.local) == 0
    finally:
        await service.stopService()
        await close_test_redis(cleanup)
    assert not service.redis.up
