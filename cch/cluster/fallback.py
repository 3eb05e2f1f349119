"""Limits while Redis cannot answer: :class:`FallbackLimitStore`.

Every call goes to the shared store first. When it fails with a
:class:`~cch.cluster.redis.RedisError` (Redis down, restarting, hung, or refusing), the answer
comes from this replica alone, as ``[cluster] on_redis_down`` says:

- ``"local"``: a :class:`~cch.keylimits.MemoryLimitStore` holds each key to its share of every
  limit: the limit divided by ``expected_replicas``, rounded up, at least 1 (the monthly budget
  divided as a number). The local store counts only the turns this replica ran (seeded with
  the same share of the ledger's day and month figures), so the replicas together stay near
  the limit without talking to each other.
- ``"refuse"``: every new connection and turn gets a :class:`~cch.keylimits.Breach` whose
  reason is :data:`CLUSTER_UNAVAILABLE`, which the limiter words as a 503 refusal.

The first failure of an outage is logged once (``cluster_redis_down``), every answer given
without Redis is counted, and the first success after it (``cluster_redis_back``) ends the
outage: the switch back needs nothing but Redis answering again, since Redis is always asked
first (while no connection is up, the connection says so at once, without a round trip).

A slot is given back where it was taken: each key's connection and turn slots remember their
store. A slot taken in Redis whose give-back fails expires with its lease. Usage of a turn that
finishes while Redis is down is counted in the local windows, and a turn admitted locally
also reports its usage to Redis (best effort), so cluster totals miss as little as possible.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import replace

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cch.cluster.redis import RedisError
from cch.config import KeyLimitsConfig
from cch.keylimits import (
    BUSY_RETRY_AFTER,
    CLUSTER_UNAVAILABLE,
    Breach,
    LimitStore,
    MemoryLimitStore,
)

__all__ = ["CLUSTER_UNAVAILABLE", "FallbackLimitStore"]

log = Logger()

_REMOTE, _LOCAL = "remote", "local"


class FallbackLimitStore:
    """:class:`cch.keylimits.LimitStore` over ``shared`` (Redis), answering without it while it
    fails. ``mode`` is ``"local"`` or ``"refuse"``; ``clock`` times the outages."""

    def __init__(
        self,
        shared: LimitStore,
        clock: IReactorTime,
        *,
        mode: str = "local",
        expected_replicas: int = 1,
        local: MemoryLimitStore | None = None,
    ) -> None:
        if mode not in (_LOCAL, "refuse"):
            raise ValueError(f"mode must be 'local' or 'refuse', not {mode!r}")
        self.shared = shared
        self.clock = clock
        self.mode = mode
        self.expected_replicas = max(1, expected_replicas)
        self.local = local if local is not None else MemoryLimitStore()
        self.down_since: float | None = None
        self.outages = 0
        self.fallbacks = 0  # answers given without Redis
        self.failures = 0  # calls Redis failed (answers and give-backs)
        # Where each slot held by this replica was taken, by key (give-backs follow it).
        self._slots: dict[str, dict[str, deque[str]]] = {"connections": {}, "turns": {}}

    @property
    def down(self) -> bool:
        """Redis failed the last call (an outage is on)."""
        return self.down_since is not None

    # -- shares ---------------------------------------------------------------------------

    def share(self, limit: int) -> int:
        """This replica's share of a count limit."""
        return max(1, math.ceil(limit / self.expected_replicas))

    def shares(self, limits: KeyLimitsConfig) -> KeyLimitsConfig:
        """This replica's share of every limit of a key."""
        n = self.expected_replicas
        if n == 1:
            return limits

        def part(limit: int | None) -> int | None:
            return None if limit is None else self.share(limit)

        return replace(
            limits,
            max_connections=part(limits.max_connections),
            max_concurrent_turns=part(limits.max_concurrent_turns),
            requests_per_minute=part(limits.requests_per_minute),
            tokens_per_minute=part(limits.tokens_per_minute),
            tokens_per_day=part(limits.tokens_per_day),
            budget_per_month=None if limits.budget_per_month is None else limits.budget_per_month / n,
        )

    # -- outages --------------------------------------------------------------------------

    def _failed(self, error: RedisError, op: str) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = self.clock.seconds()
            self.outages += 1
            # The error names the server, never its password (cch.cluster.redis).
            log.warn("cluster_redis_down", op=op, mode=self.mode, error=str(error))

    def _answered(self) -> None:
        if self.down_since is not None:
            down_for = round(self.clock.seconds() - self.down_since, 3)
            self.down_since = None
            log.info("cluster_redis_back", down_for=down_for, fallbacks=self.fallbacks)

    def _refusal(self) -> Breach:
        return Breach(CLUSTER_UNAVAILABLE, 0, 0, BUSY_RETRY_AFTER)

    def _took(self, kind: str, key: str, where: str) -> None:
        self._slots[kind].setdefault(key, deque()).append(where)

    def _where(self, kind: str, key: str) -> str:
        slots = self._slots[kind].get(key)
        if not slots:
            return _REMOTE
        where = slots.pop()
        if not slots:
            del self._slots[kind][key]
        return where

    # -- connections ----------------------------------------------------------------------

    def try_connect(self, key: str, limit: int) -> Deferred[Breach | None]:
        return Deferred.fromCoroutine(self._try_connect(key, limit))

    async def _try_connect(self, key: str, limit: int) -> Breach | None:
        try:
            breach = await self.shared.try_connect(key, limit)
        except RedisError as error:
            self._failed(error, "try_connect")
            self.fallbacks += 1
            if self.mode != _LOCAL:
                return self._refusal()
            breach = await self.local.try_connect(key, self.share(limit))
            where = _LOCAL
        else:
            self._answered()
            where = _REMOTE
        if breach is None:
            self._took("connections", key, where)
        return breach

    def disconnect(self, key: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._disconnect(key))

    async def _disconnect(self, key: str) -> None:
        if self._where("connections", key) == _LOCAL:
            await self.local.disconnect(key)
            return
        try:
            await self.shared.disconnect(key)
        except RedisError as error:
            self._failed(error, "disconnect")  # the lease expires unrenewed
        else:
            self._answered()

    # -- turns ----------------------------------------------------------------------------

    def try_admit(self, key: str, now: float, limits: KeyLimitsConfig) -> Deferred[Breach | None]:
        return Deferred.fromCoroutine(self._try_admit(key, now, limits))

    async def _try_admit(self, key: str, now: float, limits: KeyLimitsConfig) -> Breach | None:
        try:
            breach = await self.shared.try_admit(key, now, limits)
        except RedisError as error:
            self._failed(error, "try_admit")
            self.fallbacks += 1
            if self.mode != _LOCAL:
                return self._refusal()
            breach = await self.local.try_admit(key, now, self.shares(limits))
            where = _LOCAL
        else:
            self._answered()
            where = _REMOTE
        if breach is None and limits.max_concurrent_turns is not None:
            self._took("turns", key, where)
        return breach

    def finish(
        self, key: str, now: float, limits: KeyLimitsConfig, tokens: int | None, cost: float | None
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._finish(key, now, limits, tokens, cost))

    async def _finish(
        self, key: str, now: float, limits: KeyLimitsConfig, tokens: int | None, cost: float | None
    ) -> None:
        slotted = limits.max_concurrent_turns is not None
        where = self._where("turns", key) if slotted else _REMOTE
        usage_only = replace(limits, max_concurrent_turns=None)  # frees no slot
        if where == _LOCAL:
            await self.local.finish(key, now, self.shares(limits), tokens, cost)
            shared_limits = usage_only
        else:
            shared_limits = limits
        try:
            # Not a sign that Redis is back when it succeeds: a finish with nothing to count
            # asks Redis nothing. The next connection or turn, which always asks, says so.
            await self.shared.finish(key, now, shared_limits, tokens, cost)
        except RedisError as error:
            self._failed(error, "finish")
            if where == _REMOTE:
                await self.local.finish(key, now, self.shares(usage_only), tokens, cost)

    def seed(self, key: str, now: float, tokens_today: int, spent_this_month: float) -> Deferred[None]:
        """Seed Redis, and the local store with this replica's share; a failure to seed Redis
        is counted, not raised (seed again when Redis is back: RedisConnection.on_connect)."""
        return Deferred.fromCoroutine(self._seed(key, now, tokens_today, spent_this_month))

    async def _seed(self, key: str, now: float, tokens_today: int, spent_this_month: float) -> None:
        n = self.expected_replicas
        await self.local.seed(key, now, math.ceil(tokens_today / n), spent_this_month / n)
        try:
            await self.shared.seed(key, now, tokens_today, spent_this_month)
        except RedisError as error:
            self._failed(error, "seed")
        else:
            self._answered()

    # -- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The fallback's figures, read at scrape time (cch.metrics)."""
        down = GaugeMetricFamily("cch_cluster_redis_down", "1 while Redis fails and limits are answered without it.")
        down.add_metric([], 1 if self.down else 0)
        yield down
        outages = CounterMetricFamily("cch_cluster_redis_outages", "Times Redis started failing.")
        outages.add_metric([], self.outages)
        yield outages
        fallbacks = CounterMetricFamily(
            "cch_cluster_fallbacks", "Connections and turns answered without Redis, by on_redis_down mode.", labels=["mode"]
        )
        fallbacks.add_metric([self.mode], self.fallbacks)
        yield fallbacks
