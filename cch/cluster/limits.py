"""Per-key limits kept in Redis, shared by every replica: :class:`RedisLimitStore`.

It implements :class:`cch.keylimits.LimitStore` with the answers of
:class:`cch.keylimits.MemoryLimitStore` for the same history (tests/test_cluster_limits.py runs
one suite against both). Each store method is one Lua script on one client key's Redis keys
(they share the hash tag ``{<key name>}``, so a Redis Cluster keeps them on one node).

- **Connections and concurrent turns are leases**: a sorted set per key of lease ids scored by
  their expiry (``now + lease_ttl``). A slot is taken by adding a lease and given back by
  removing it; every ``lease_ttl / 3`` this replica pushes the expiry of the leases it holds
  forward. A replica that dies (SIGKILL, a lost host) stops renewing, and its slots count no
  more once their expiry has passed: within ``lease_ttl``. A renewal puts back a lease that is
  missing (Redis restarted and lost it, or this replica stalled past ``lease_ttl`` and it was
  purged): the connection or turn it stands for is still there, so the count stays true. A
  renewal also runs at once whenever the connection to Redis is made again.
- **Request and token windows** are sliding, as in memory: the request times of the last 60 s
  in a sorted set, the token buckets (merged within a second) in a list.
- **The UTC day's tokens and the UTC month's spend** are counters under a key per day and
  per month, expiring after it; :meth:`seed` raises them to at least the ledger's figures.

Time comes from the caller (``now``) and, for leases, from ``clock``; Redis's own clock is
never read, so the replicas' clocks must agree (NTP) to well under ``lease_ttl``. Numbers
travel as ``repr`` of the float and are stored with 17 significant digits, so a window's
arithmetic is the same IEEE double arithmetic as in memory.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cch.cluster.redis import RedisConnection, Script
from cch.config import KeyLimitsConfig

# The memory store's calendar and rounding: both stores answer alike from one copy.
from cch.keylimits import BUSY_RETRY_AFTER, DAY, WINDOW, Breach, utc_month, whole_seconds

__all__ = ["RedisLimitStore"]

log = Logger()

# Redis keeps a window's keys this long after their last write (they are empty by then).
_WINDOW_KEY_MS = int(2 * WINDOW * 1000)
_DAY_KEY_MS = int(2 * DAY * 1000)
_MONTH_KEY_MS = int(33 * DAY * 1000)

_HELPERS = """
local function fmt(x) return string.format('%.17g', x) end
local function bucket(b)
  local first, last, tokens = string.match(b, '^(%S+) (%S+) (%S+)$')
  return first, last, tonumber(tokens)
end
-- Drop the token buckets that left the window (last <= edge); the window's total and buckets.
local function tokens_in_window(list, edge)
  while true do
    local b = redis.call('LINDEX', list, 0)
    if not b then break end
    local _, last = bucket(b)
    if tonumber(last) > edge then break end
    redis.call('LPOP', list)
  end
  local buckets = redis.call('LRANGE', list, 0, -1)
  local total = 0
  for _, b in ipairs(buckets) do
    local _, _, tokens = bucket(b)
    total = total + tokens
  end
  return total, buckets
end
"""

# KEYS: connection leases. ARGV: now, limit, lease id, its expiry, key ttl (ms).
# Returns -1 when the lease was taken, else the number held.
CONNECT = Script(
    "connect",
    """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then return held end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return -1
""",
)

# KEYS: leases. ARGV: lease ids.
RELEASE = Script("release", "return redis.call('ZREM', KEYS[1], unpack(ARGV))")

# KEYS: leases. ARGV: new expiry, key ttl (ms), lease ids. Returns how many were missing
# (and are back).
RENEW = Script(
    "renew",
    """
local missing = 0
for i = 3, #ARGV do
  missing = missing + redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return missing
""",
)

# KEYS: month spend, day tokens, token buckets, request times, turn leases.
# ARGV: now, now - WINDOW, budget, tokens per day, tokens per minute, requests per minute,
# concurrent turns ("" = not set), request id, lease id, lease expiry, lease key ttl (ms),
# window key ttl (ms).
# Returns {'admitted'} or {reason, used, the time its window frees from (when there is one)}.
ADMIT = Script(
    "admit",
    _HELPERS
    + """
local now, edge = tonumber(ARGV[1]), tonumber(ARGV[2])
local budget, per_day, per_minute = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rpm, concurrent = tonumber(ARGV[6]), tonumber(ARGV[7])
if budget then
  local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
  if spent >= budget then return {'budget_per_month', fmt(spent)} end
end
if per_day then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= per_day then return {'tokens_per_day', fmt(used)} end
end
if per_minute then
  local total, buckets = tokens_in_window(KEYS[3], edge)
  if total >= per_minute then
    -- the bucket whose leaving brings the window under the limit
    local left, frees = total, ''
    for _, b in ipairs(buckets) do
      local _, last, tokens = bucket(b)
      left = left - tokens
      if left < per_minute then
        frees = last
        break
      end
    end
    return {'tokens_per_minute', fmt(total), frees}
  end
end
if rpm then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[2])
  local n = redis.call('ZCARD', KEYS[4])
  if n >= rpm then
    -- the request whose leaving brings the window under the limit
    local leaving = redis.call('ZRANGE', KEYS[4], n - rpm, n - rpm, 'WITHSCORES')
    return {'requests_per_minute', fmt(n), leaving[2]}
  end
end
if concurrent then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[1])
  local n = redis.call('ZCARD', KEYS[5])
  if n >= concurrent then return {'max_concurrent_turns', fmt(n)} end
end
if rpm then
  redis.call('ZADD', KEYS[4], ARGV[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[4], ARGV[12])
end
if concurrent then
  redis.call('ZADD', KEYS[5], ARGV[10], ARGV[9])
  redis.call('PEXPIRE', KEYS[5], ARGV[11])
end
return {'admitted'}
""",
)

# KEYS: month spend, day tokens, token buckets, turn leases.
# ARGV: now, now - WINDOW, lease id, tokens for the day, tokens for the minute window, cost
# ("" = none), window key ttl, day key ttl, month key ttl (ms).
FINISH = Script(
    "finish",
    _HELPERS
    + """
local now, edge = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[4], ARGV[3]) end
local day_tokens = tonumber(ARGV[4])
if day_tokens then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0') + day_tokens
  redis.call('SET', KEYS[2], fmt(used), 'PX', ARGV[8])
end
local minute_tokens = tonumber(ARGV[5])
if minute_tokens then
  tokens_in_window(KEYS[3], edge)
  local newest = redis.call('LINDEX', KEYS[3], -1)
  local merged = false
  if newest then
    local first, last, tokens = bucket(newest)
    if now - tonumber(first) < 1.0 then
      if now > tonumber(last) then last = ARGV[1] end
      redis.call('LSET', KEYS[3], -1, first .. ' ' .. last .. ' ' .. fmt(tokens + minute_tokens))
      merged = true
    end
  end
  if not merged then
    redis.call('RPUSH', KEYS[3], ARGV[1] .. ' ' .. ARGV[1] .. ' ' .. fmt(minute_tokens))
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
local cost = tonumber(ARGV[6])
if cost then
  local spent = tonumber(redis.call('GET', KEYS[1]) or '0') + cost
  redis.call('SET', KEYS[1], fmt(spent), 'PX', ARGV[9])
end
return 1
""",
)

# KEYS: day tokens, month spend. ARGV: tokens, spend, day key ttl, month key ttl (ms).
SEED = Script(
    "seed",
    """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
end
if tonumber(ARGV[2]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
end
return 1
""",
)

SCRIPTS = (CONNECT, RELEASE, RENEW, ADMIT, FINISH, SEED)

_COUNTED = frozenset({"tokens_per_day", "tokens_per_minute", "requests_per_minute", "max_concurrent_turns"})


def _opt(value: float | None) -> str:
    """A limit as a script argument: "" when it is not set."""
    return "" if value is None else repr(value)


class RedisLimitStore(Service):
    """:class:`cch.keylimits.LimitStore` in Redis, through ``redis``.

    ``clock`` gives the leases' time and drives their renewal; ``replica`` names this process in
    its lease ids (each id also carries a random token of this store, so two processes given
    the same name never share a lease); ``prefix`` starts every Redis key. A service: its
    renewal runs from start to stop, and stopping gives back the leases still held (the
    drain has closed their connections by then; stop it after the drain and before
    ``redis``)."""

    def __init__(
        self,
        redis: RedisConnection,
        clock: IReactorTime,
        *,
        replica: str,
        lease_ttl: float = 15.0,
        prefix: str = "cch:",
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.replica = replica
        self.lease_ttl = lease_ttl
        self.prefix = prefix
        self._lease_key_ms = math.ceil(2 * lease_ttl * 1000)
        self._token = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        # The leases this replica holds, by client key: what it renews and gives back.
        self._held: dict[str, dict[str, list[str]]] = {"connections": {}, "turns": {}}
        self._renewal: LoopingCall | None = None
        self.renewed = 0
        self.renewal_failures = 0
        self.restored = 0

    # -- keys -----------------------------------------------------------------------------

    def _key(self, key: str, name: str) -> str:
        return f"{self.prefix}{{{key}}}:{name}"

    def _new_id(self) -> str:
        return f"{self.replica}/{self._token}/{next(self._ids)}"

    def leases(self, kind: str, key: str) -> list[str]:
        """The ids of the leases of ``kind`` ("connections" or "turns") this replica holds for
        ``key`` (a copy, for tests and debugging)."""
        return list(self._held[kind].get(key, ()))

    # -- connections ----------------------------------------------------------------------

    def try_connect(self, key: str, limit: int) -> Deferred[Breach | None]:
        now = self.clock.seconds()
        lease = self._new_id()
        args = [repr(now), str(limit), lease, repr(now + self.lease_ttl), str(self._lease_key_ms)]
        reply = self.redis.run(CONNECT, [self._key(key, "connections")], args)

        def answer(held: Any) -> Breach | None:
            if int(held) >= 0:
                return Breach("max_connections", limit, int(held), BUSY_RETRY_AFTER)
            return None

        return self._taking(reply.addCallback(answer), "connections", key, lease)

    def disconnect(self, key: str) -> Deferred[None]:
        return self._give_back("connections", key)

    # -- turns ----------------------------------------------------------------------------

    def try_admit(self, key: str, now: float, limits: KeyLimitsConfig) -> Deferred[Breach | None]:
        concurrent = limits.max_concurrent_turns
        lease = self._new_id() if concurrent is not None else ""
        keys = [
            self._key(key, f"month:{int(utc_month(now)[0])}"),
            self._key(key, f"day:{int(now // DAY)}"),
            self._key(key, "tokens"),
            self._key(key, "requests"),
            self._key(key, "turns"),
        ]
        args = [
            repr(now),
            repr(now - WINDOW),
            _opt(limits.budget_per_month),
            _opt(limits.tokens_per_day),
            _opt(limits.tokens_per_minute),
            _opt(limits.requests_per_minute),
            _opt(concurrent),
            self._new_id() if limits.requests_per_minute is not None else "-",
            lease or "-",
            repr(now + self.lease_ttl),
            str(self._lease_key_ms),
            str(_WINDOW_KEY_MS),
        ]
        reply = self.redis.run(ADMIT, keys, args)
        reply.addCallback(self._breach, now, limits)
        return self._taking(reply, "turns", key, lease)

    def _breach(self, reply: list[str], now: float, limits: KeyLimitsConfig) -> Breach | None:
        reason = reply[0]
        if reason == "admitted":
            return None
        limit = getattr(limits, reason)
        used: float = int(float(reply[1])) if reason in _COUNTED else float(reply[1])
        retry: int | None
        if reason == "budget_per_month":
            retry = None
        elif reason == "tokens_per_day":
            retry = whole_seconds((int(now // DAY) + 1) * DAY - now)
        elif reason in ("tokens_per_minute", "requests_per_minute"):
            frees_at = float(reply[2]) + WINDOW if reply[2] else now
            retry = whole_seconds(frees_at - now)
        else:
            retry = BUSY_RETRY_AFTER
        return Breach(reason, limit, used, retry)

    def finish(
        self, key: str, now: float, limits: KeyLimitsConfig, tokens: int | None, cost: float | None
    ) -> Deferred[None]:
        lease = ""
        if limits.max_concurrent_turns is not None:
            held = self._held["turns"].get(key)
            lease = held.pop() if held else ""
        day = str(tokens) if tokens and limits.tokens_per_day is not None else ""
        minute = str(tokens) if tokens and limits.tokens_per_minute is not None else ""
        spend = repr(cost) if cost and limits.budget_per_month is not None else ""
        if not (lease or day or minute or spend):
            return succeed(None)
        keys = [
            self._key(key, f"month:{int(utc_month(now)[0])}"),
            self._key(key, f"day:{int(now // DAY)}"),
            self._key(key, "tokens"),
            self._key(key, "turns"),
        ]
        args = [repr(now), repr(now - WINDOW), lease, day, minute, spend]
        args += [str(_WINDOW_KEY_MS), str(_DAY_KEY_MS), str(_MONTH_KEY_MS)]
        return self.redis.run(FINISH, keys, args).addCallback(lambda _: None)

    def seed(self, key: str, now: float, tokens_today: int, spent_this_month: float) -> Deferred[None]:
        keys = [self._key(key, f"day:{int(now // DAY)}"), self._key(key, f"month:{int(utc_month(now)[0])}")]
        args = [str(tokens_today), repr(float(spent_this_month)), str(_DAY_KEY_MS), str(_MONTH_KEY_MS)]
        return self.redis.run(SEED, keys, args).addCallback(lambda _: None)

    # -- leases ---------------------------------------------------------------------------

    def _taking(self, reply: Deferred[Breach | None], kind: str, key: str, lease: str) -> Deferred[Breach | None]:
        """The answer of a script that takes ``lease`` when it admits. Cancelling the answer
        does not abandon the script: once it has run, a lease it took is given back."""
        cancelled = False

        def cancel(_: Deferred[Breach | None]) -> None:
            nonlocal cancelled
            cancelled = True

        answer: Deferred[Breach | None] = Deferred(cancel)

        def admitted(breach: Breach | None) -> None:
            if breach is None and lease:
                if cancelled:
                    self._release(kind, key, [lease]).addErrback(lambda _: None)  # expires else
                else:
                    self._held[kind].setdefault(key, []).append(lease)
            if not answer.called:
                answer.callback(breach)

        def failed(failure: Failure) -> None:
            if not answer.called:
                answer.errback(failure)

        reply.addCallbacks(admitted, failed)
        return answer

    def _give_back(self, kind: str, key: str) -> Deferred[None]:
        held = self._held[kind].get(key)
        if not held:
            return succeed(None)
        # Forgotten here first: if Redis cannot be told, the lease expires unrenewed.
        return self._release(kind, key, [held.pop()])

    def _release(self, kind: str, key: str, leases: list[str]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release_all(self._key(key, kind), leases))

    async def _release_all(self, leases_key: str, leases: list[str]) -> None:
        # In chunks: Lua's unpack() takes a few thousand values at most.
        for start in range(0, len(leases), 1000):
            await self.redis.run(RELEASE, [leases_key], leases[start : start + 1000])

    def renew(self) -> Deferred[None]:
        """Push the expiry of every lease this replica holds to ``now + lease_ttl`` (the
        renewal loop calls it every ``lease_ttl / 3``); never fails."""
        expiry = repr(self.clock.seconds() + self.lease_ttl)
        calls = []
        for kind, by_key in self._held.items():
            for key in [key for key, held in by_key.items() if not held]:
                del by_key[key]
            for key, held in by_key.items():
                calls.append(self._renew(kind, key, held, expiry))
        return gatherResults(calls, consumeErrors=True).addBoth(lambda _: None)

    def _renew(self, kind: str, key: str, held: list[str], expiry: str) -> Deferred[None]:
        leases = list(held)
        reply = self.redis.run(RENEW, [self._key(key, kind)], [expiry, str(self._lease_key_ms), *leases])

        def renewed(missing: Any) -> None:
            self.renewed += len(leases)
            if int(missing):
                self.restored += int(missing)
                log.warn("cluster_leases_restored", kind=kind, key=key, count=int(missing))

        def failed(failure: Failure) -> None:
            # Counted, never raised: the renewal loop goes on, and an outage is logged once
            # by whoever asked Redis for an answer (cch.cluster.fallback).
            if not failure.check(CancelledError):
                self.renewal_failures += 1

        return reply.addCallbacks(renewed, failed)

    # -- life cycle -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._renewal = LoopingCall(self.renew)
        self._renewal.clock = self.clock
        self._renewal.start(self.lease_ttl / 3, now=False).addErrback(
            lambda failure: log.failure("cluster_lease_renewal_stopped", failure)
        )
        self.redis.on_connect(self._reconnected)

    def _reconnected(self) -> None:
        """A (new) connection to Redis: put back at once what a restarted Redis lost."""
        self.renew()

    def stopService(self) -> Deferred[None]:
        """Stop renewing and give back every lease still held; never fails."""
        super().stopService()
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._renewal = None
        self.redis.forget(self._reconnected)
        calls = []
        for kind, by_key in self._held.items():
            for key, held in by_key.items():
                if held:
                    calls.append(self._release(kind, key, list(held)))
            by_key.clear()
        return gatherResults(calls, consumeErrors=True).addBoth(lambda _: None)

    # -- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The leases' figures, read at scrape time (cch.metrics)."""
        held = GaugeMetricFamily("cch_cluster_leases", "Leases this replica holds in Redis, by kind.", labels=["kind"])
        for kind, by_key in sorted(self._held.items()):
            held.add_metric([kind], sum(len(leases) for leases in by_key.values()))
        yield held
        renewed = CounterMetricFamily("cch_cluster_lease_renewals", "Leases renewed in Redis.")
        renewed.add_metric([], self.renewed)
        yield renewed
        failures = CounterMetricFamily("cch_cluster_lease_renewal_failures", "Lease renewals Redis could not take.")
        failures.add_metric([], self.renewal_failures)
        yield failures
        restored = CounterMetricFamily(
            "cch_cluster_leases_restored", "Leases missing from Redis when renewed (Redis lost them, or this replica stalled past lease_ttl), put back."
        )
        restored.add_metric([], self.restored)
        yield restored
