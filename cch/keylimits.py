"""Per-key limits: what one client key may use, and the typed answer when it asks for more.

A :class:`KeyLimiter` answers two questions, each with a Deferred firing with an outcome type:
may this key open another client WebSocket (:meth:`KeyLimiter.open_connection` → a
:class:`ConnectionLease` or a :class:`Refused`), and may it start a turn for this model
(:meth:`KeyLimiter.begin_turn` → a :class:`TurnLease` or a :class:`Refused`). A lease holds what
to give back: :meth:`ConnectionLease.release` when the connection closes,
:meth:`TurnLease.finish` with the turn's tokens and cost when it ends however it ends. Both are
idempotent, so every path that ends a turn or a connection may call them.

The counters live behind :class:`LimitStore`. Each read-modify-write of a key's windows is ONE
store method (:meth:`~LimitStore.try_admit` checks every window and takes a request and a
concurrency slot in the same step), so a Redis store (a Lua script per method) can replace
:class:`MemoryLimitStore` and stay atomic across replicas. A store answers with a
:class:`Breach` (which limit, how far, when it frees); the limiter alone words a
:class:`Refused`, so a second store never repeats the messages.

Decisions (docs/usage.md states them for operators):

- **No key, no limits.** A keyless gateway passes ``key=None``: everything is admitted and no
  state is kept. A key whose limits are all unset touches no store either; per-key state exists
  only for keys that set a limit, so memory is bounded by the configured keys.
- **Windows.** ``requests_per_minute`` and ``tokens_per_minute`` are sliding 60 s windows: what
  happened at ``t`` counts while ``now < t + 60``. ``tokens_per_day`` is the UTC day and
  ``budget_per_month`` the UTC month. A limit refuses when what is used has reached it
  (``used >= limit``): the 11th request in a minute under ``requests_per_minute = 10``.
- **Usage counts when a turn finishes**: its tokens (input + output) enter the minute window, the
  UTC day and the month of the moment :meth:`TurnLease.finish` is called. Token limits and the
  budget are checked before a turn against what is already recorded, so a turn admitted under a
  limit always finishes and its tokens count; a window may end above its limit by the turns that
  were in flight (the issue's rule: a turn that started under the limit finishes).
- **Retry-After** is whole seconds, rounded up, at least 1: for ``requests_per_minute`` until
  enough admitted requests leave the window; for ``tokens_per_minute`` until enough recorded
  tokens leave it that the window is under the limit; for ``tokens_per_day`` until the next UTC
  midnight. A concurrency or connection slot frees when another turn ends or connection closes,
  which cannot be foreseen: those say :data:`BUSY_RETRY_AFTER`. An exhausted budget says none
  (``insufficient_quota``, so Codex does not retry it; the message names when it resets).
- **Budget needs prices.** A key with ``budget_per_month`` may only start turns that name a
  model the price sheet prices (refused ``403 model_not_allowed`` otherwise, before any upstream
  cost): the budget is never bypassed by an unpriced model or by leaving ``model`` out. A turn
  that still ends with cost None (the upstream never reported usage, or served an unpriced
  model) adds nothing to the month's spend: nothing known is charged, as the ledger row's cost is
  null, never 0. Tokens None likewise add nothing to the token windows.
- **Models** are matched by exact name. When ``models`` is set, a turn that names no model is
  refused: the upstream would choose one the list may not hold.
- **Seeding** (:meth:`KeyLimiter.seed`, from the ledger at start) raises the UTC day's tokens and
  the UTC month's spend to at least the ledger's figures: calling it twice, or after turns this
  process already counted, never counts anything twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cch import wire

if TYPE_CHECKING:
    from cch.config import ClientKey, KeyLimitsConfig
    from cch.usage.prices import PriceSheet

__all__ = [
    "BUSY_RETRY_AFTER",
    "WINDOW",
    "Admitted",
    "Breach",
    "ConnectionLease",
    "KeyLimiter",
    "LimitStore",
    "MemoryLimitStore",
    "Refused",
    "TurnLease",
    "utc_month",
    "whole_seconds",
]

log = Logger()

WINDOW = 60.0
"""Seconds of the sliding request and token windows."""

BUSY_RETRY_AFTER = 5
"""Retry-After (seconds) of a concurrency or connection refusal: a slot frees when another turn
ends or connection closes, which no window foretells."""

DAY = 86400.0

RATE_LIMITED = "rate_limit_exceeded"
CLUSTER_UNAVAILABLE = "cluster_unavailable"  # the shared store is down and may not be done without
USAGE_LIMIT = "usage_limit_reached"  # the error type Codex shows with its reset time
LONG_WAIT = 300
"""Seconds beyond which a refusal says when it resets instead of how long to wait: Codex sleeps a
Retry-After silently, however long."""
NO_QUOTA = "insufficient_quota"
MODEL_NOT_ALLOWED = "model_not_allowed"

# The limits a store keeps state for; a key that sets none of them never reaches the store.
_TURN_FIELDS = ("max_concurrent_turns", "requests_per_minute", "tokens_per_minute", "tokens_per_day", "budget_per_month")


# -- outcomes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection or turn this key may not have now, and how to say so on each wire.

    ``kind`` is the OpenAI error type, ``code`` the error code Codex reads, ``retry_after``
    whole seconds (None: retrying will not help soon). ``reason`` names the limit (its config
    field, ``model_not_allowed``, or ``model_not_priced`` under a budget) for logs and metrics.
    """

    status: int
    kind: str
    code: str
    message: str
    retry_after: int | None
    reason: str = ""
    # A usage limit (kind "usage_limit_reached"): when it resets (epoch) and in how many seconds.
    resets_at: int | None = None
    resets_in_seconds: int | None = None

    def _resets(self) -> dict[str, int]:
        if self.resets_at is None:
            return {}
        return {"resets_at": self.resets_at, "resets_in_seconds": self.resets_in_seconds or 0}

    def error_event(self) -> str:
        """The ``error`` event (WebSocket frame, SSE data) of a refused turn; the connection stays open."""
        headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else None
        return wire.error_event(
            self.code, self.message, status=self.status, kind=self.kind, headers=headers, **self._resets()
        )

    def json_body(self) -> bytes:
        """The JSON error body of the HTTP answer (status :attr:`status`)."""
        return wire.error_body(self.message, self.kind, self.code, **self._resets())

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The HTTP answer's extra headers (``retry-after`` when there is a wait to say)."""
        if self.retry_after is None:
            return ()
        return ((b"retry-after", str(self.retry_after).encode("ascii")),)


class Admitted:
    """What an admitted connection or turn holds until it is given back."""

    __slots__ = ("key", "_limiter", "_done")

    def __init__(self, limiter: KeyLimiter | None, key: str | None) -> None:
        self.key = key  # the key's name; None on a keyless gateway
        self._limiter = limiter
        self._done = False

    @property
    def done(self) -> bool:
        """Given back already (further calls do nothing)."""
        return self._done


class ConnectionLease(Admitted):
    """One client WebSocket of a key: :meth:`release` when it closes."""

    __slots__ = ("_counted",)

    def __init__(self, limiter: KeyLimiter | None, key: str | None, counted: bool) -> None:
        super().__init__(limiter, key)
        self._counted = counted  # holds a slot in the store

    def release(self) -> None:
        """Give the connection slot back; idempotent."""
        if self._done:
            return
        self._done = True
        if self._limiter is not None and self.key is not None:
            self._limiter._connection_closed(self.key, self._counted)


class TurnLease(Admitted):
    """One admitted turn of a key: :meth:`finish` when it ends, however it ends."""

    __slots__ = ("_limits",)

    def __init__(self, limiter: KeyLimiter | None, key: str | None, limits: KeyLimitsConfig | None) -> None:
        super().__init__(limiter, key)
        self._limits = limits  # what it was admitted under, when a store holds its state

    def finish(self, tokens: int | None, cost: float | None) -> None:
        """Record the turn's usage (input + output tokens, USD; None = unknown, counts nothing)
        and free its concurrency slot; idempotent: only the first call counts."""
        if self._done:
            return
        self._done = True
        if self._limiter is not None and self.key is not None:
            self._limiter._turn_finished(self.key, self._limits, tokens, cost)


@dataclass(frozen=True, slots=True)
class Breach:
    """A store's answer when a key is at a limit: which (its config field), the limit and what
    is used, and the seconds until it would admit (None: not within a window)."""

    reason: str
    limit: float
    used: float
    retry_after: int | None


# -- the store ---------------------------------------------------------------------------------


class LimitStore(Protocol):
    """The counters of every limited key. Each method is one atomic step on one key's state (a
    Lua script on Redis), and returns a Deferred because a shared store is across a network.

    ``limits`` travel with each call (a script's arguments), so a store keeps state only for
    the limits a key sets. A shared store must also survive a replica that dies holding slots
    (connection and concurrency counts as leases that expire unless renewed), and a cancelled
    :meth:`try_admit` must not leave a slot taken; the memory store answers at once, so
    neither arises here."""

    def try_connect(self, key: str, limit: int) -> Deferred[Breach | None]:
        """Take a connection slot if fewer than ``limit`` are held."""

    def disconnect(self, key: str) -> Deferred[None]:
        """Give a connection slot back."""

    def try_admit(self, key: str, now: float, limits: KeyLimitsConfig) -> Deferred[Breach | None]:
        """Check budget, tokens per day, tokens per minute, requests per minute and concurrent
        turns, in that order; when all admit, record one request and take a concurrency slot."""

    def finish(
        self, key: str, now: float, limits: KeyLimitsConfig, tokens: int | None, cost: float | None
    ) -> Deferred[None]:
        """Free the turn's concurrency slot and add its usage to the windows ``limits`` sets."""

    def seed(self, key: str, now: float, tokens_today: int, spent_this_month: float) -> Deferred[None]:
        """Raise this UTC day's tokens and this UTC month's spend to at least these figures."""


def whole_seconds(seconds: float) -> int:
    """Whole seconds, rounded up and at least 1 (rounded to the microsecond first, so float
    noise in epoch arithmetic never adds a second)."""
    return max(1, math.ceil(round(seconds, 6)))


def utc_month(now: float) -> tuple[float, float]:
    """The first second (epoch) of the UTC month holding ``now``, and of the next one."""
    when = datetime.fromtimestamp(now, UTC)
    start = datetime(when.year, when.month, 1, tzinfo=UTC)
    after = datetime(when.year + 1, 1, 1, tzinfo=UTC) if when.month == 12 else start.replace(month=when.month + 1)
    return start.timestamp(), after.timestamp()


@dataclass(slots=True)
class _KeyState:
    connections: int = 0
    in_flight: int = 0
    requests: deque[float] = field(default_factory=deque)  # admitted turns' start times
    # Token buckets [first, last, tokens]: usage finishing within a second of a bucket's first
    # merges into it and leaves the window at last + 60 (never before its real time), so a
    # window holds at most ~61 buckets however many turns end.
    tokens: deque[list[float]] = field(default_factory=deque)
    tokens_in_window: int = 0
    day: int = -1
    day_tokens: int = 0
    month: tuple[float, float] = (0.0, 0.0)  # this UTC month's first second and the next's (epoch)
    month_spent: float = 0.0

    def expire(self, now: float) -> None:
        edge = now - WINDOW
        requests = self.requests
        while requests and requests[0] <= edge:
            requests.popleft()
        buckets = self.tokens
        while buckets and buckets[0][1] <= edge:
            self.tokens_in_window -= int(buckets.popleft()[2])
        day = int(now // DAY)
        if day != self.day:
            self.day, self.day_tokens = day, 0
        if not self.month[0] <= now < self.month[1]:
            self.month, self.month_spent = utc_month(now), 0.0


class MemoryLimitStore:
    """The counters in this process's memory (one replica). State exists only for keys that set
    a limit; each window is pruned whenever its key is touched, and holds at most
    ``requests_per_minute`` request times and ~61 token buckets."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}

    def held(self) -> dict[str, int]:
        """Entries held in each key's windows (request times and token buckets), by key name:
        what memory the store holds, for tests and debugging."""
        return {key: len(state.requests) + len(state.tokens) for key, state in self._keys.items()}

    def _state(self, key: str) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        return state

    def try_connect(self, key: str, limit: int) -> Deferred[Breach | None]:
        state = self._state(key)
        if state.connections >= limit:
            return succeed(Breach("max_connections", limit, state.connections, BUSY_RETRY_AFTER))
        state.connections += 1
        return succeed(None)

    def disconnect(self, key: str) -> Deferred[None]:
        state = self._keys.get(key)
        if state is not None and state.connections > 0:
            state.connections -= 1
        return succeed(None)

    def try_admit(self, key: str, now: float, limits: KeyLimitsConfig) -> Deferred[Breach | None]:
        return succeed(self._admit(self._state(key), now, limits))

    def _admit(self, state: _KeyState, now: float, limits: KeyLimitsConfig) -> Breach | None:
        state.expire(now)
        budget = limits.budget_per_month
        if budget is not None and state.month_spent >= budget:
            return Breach("budget_per_month", budget, state.month_spent, None)
        per_day = limits.tokens_per_day
        if per_day is not None and state.day_tokens >= per_day:
            return Breach("tokens_per_day", per_day, state.day_tokens, whole_seconds((state.day + 1) * DAY - now))
        per_minute = limits.tokens_per_minute
        if per_minute is not None and state.tokens_in_window >= per_minute:
            # The bucket whose leaving brings the window under the limit.
            left, frees_at = state.tokens_in_window, now
            for bucket in state.tokens:
                left -= int(bucket[2])
                if left < per_minute:
                    frees_at = bucket[1] + WINDOW
                    break
            return Breach("tokens_per_minute", per_minute, state.tokens_in_window, whole_seconds(frees_at - now))
        rpm = limits.requests_per_minute
        if rpm is not None and len(state.requests) >= rpm:
            # The request whose leaving brings the window under the limit.
            leaving = state.requests[len(state.requests) - rpm]
            return Breach("requests_per_minute", rpm, len(state.requests), whole_seconds(leaving + WINDOW - now))
        concurrent = limits.max_concurrent_turns
        if concurrent is not None and state.in_flight >= concurrent:
            return Breach("max_concurrent_turns", concurrent, state.in_flight, BUSY_RETRY_AFTER)
        if rpm is not None:
            state.requests.append(now)
        if concurrent is not None:
            state.in_flight += 1
        return None

    def finish(
        self, key: str, now: float, limits: KeyLimitsConfig, tokens: int | None, cost: float | None
    ) -> Deferred[None]:
        state = self._state(key)
        state.expire(now)
        if limits.max_concurrent_turns is not None and state.in_flight > 0:
            state.in_flight -= 1
        if tokens:
            if limits.tokens_per_day is not None:
                state.day_tokens += tokens
            if limits.tokens_per_minute is not None:
                buckets = state.tokens
                if buckets and now - buckets[-1][0] < 1.0:
                    buckets[-1][1] = now
                    buckets[-1][2] += tokens
                else:
                    buckets.append([now, now, tokens])
                state.tokens_in_window += tokens
        if cost and limits.budget_per_month is not None:
            state.month_spent += cost
        return succeed(None)

    def seed(self, key: str, now: float, tokens_today: int, spent_this_month: float) -> Deferred[None]:
        state = self._state(key)
        state.expire(now)
        state.day_tokens = max(state.day_tokens, tokens_today)
        state.month_spent = max(state.month_spent, spent_this_month)
        return succeed(None)


# -- the limiter -------------------------------------------------------------------------------


_USED = {
    "tokens_per_day": lambda limit, used: f"{used:.0f} of {limit:.0f} tokens used this UTC day",
    "tokens_per_minute": lambda limit, used: f"{used:.0f} of {limit:.0f} tokens used in the last minute",
    "requests_per_minute": lambda limit, used: f"{limit:.0f} requests per minute",
    "max_concurrent_turns": lambda limit, used: f"at most {limit:.0f} turns at once",
    "max_connections": lambda limit, used: f"at most {limit:.0f} WebSocket connections at once",
}
"""What each limit's refusal says was used."""


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shown(model: str) -> str:
    """A client's model name as a message may echo it (bounded)."""
    return model if len(model) <= 100 else model[:100] + "…"


class KeyLimiter:
    """Holds each key to its ``ClientKey.limits`` (already merged with ``[key_defaults]``).

    ``clock`` gives the time of every window; ``prices`` says which models a budget can be kept
    for. One per process; ``store`` is where the counters live (memory by default).
    """

    def __init__(self, clock: IReactorTime, prices: PriceSheet, store: LimitStore | None = None) -> None:
        self.clock = clock
        self.prices = prices
        self.store: LimitStore = store if store is not None else MemoryLimitStore()
        # This replica's figures for metrics, by key name (configured keys only).
        self._in_flight: dict[str, int] = {}
        self._connections: dict[str, int] = {}
        self._refusals: dict[tuple[str, str], int] = {}

    # connections

    def open_connection(self, key: ClientKey | None) -> Deferred[Refused | ConnectionLease]:
        """May ``key`` open another client WebSocket? (Refused: 429 at the handshake.)"""
        return Deferred.fromCoroutine(self._open_connection(key))

    async def _open_connection(self, key: ClientKey | None) -> Refused | ConnectionLease:
        if key is None:
            return ConnectionLease(None, None, False)
        limit = key.limits.max_connections
        if limit is not None:
            breach = await self.store.try_connect(key.name, limit)
            if breach is not None:
                return self._refuse(key.name, breach)
        self._connections[key.name] = self._connections.get(key.name, 0) + 1
        return ConnectionLease(self, key.name, limit is not None)

    def _connection_closed(self, key: str, counted: bool) -> None:
        self._connections[key] = max(0, self._connections.get(key, 0) - 1)
        if counted:
            self._settle(self.store.disconnect(key), "disconnect", key)

    # turns

    def begin_turn(self, key: ClientKey | None, model: str | None) -> Deferred[Refused | TurnLease]:
        """May ``key`` start a turn for ``model`` now? An admitted turn counts one request at
        once; its lease must be finished when the turn ends."""
        return Deferred.fromCoroutine(self._begin_turn(key, model))

    async def _begin_turn(self, key: ClientKey | None, model: str | None) -> Refused | TurnLease:
        if key is None:
            return TurnLease(None, None, None)
        limits = key.limits
        refused = self._model_refusal(key, model)
        if refused is not None:
            return refused
        stored = any(getattr(limits, name) is not None for name in _TURN_FIELDS)
        if stored:
            breach = await self.store.try_admit(key.name, self.clock.seconds(), limits)
            if breach is not None:
                return self._refuse(key.name, breach)
        self._in_flight[key.name] = self._in_flight.get(key.name, 0) + 1
        return TurnLease(self, key.name, limits if stored else None)

    def _model_refusal(self, key: ClientKey, model: str | None) -> Refused | None:
        limits = key.limits
        if limits.models is not None and model not in limits.models:
            allowed = ", ".join(limits.models)
            asked = f"Model '{_shown(model)}' is" if model else "A request that names no model is"
            return self._refused(
                key.name,
                MODEL_NOT_ALLOWED,
                f"{asked} not allowed for key '{key.name}'; it may use: {allowed}.",
                status=403,
            )
        if limits.budget_per_month is not None and (model is None or self.prices.cost(model, 0, 0, 0) is None):
            asked = f"Model '{_shown(model)}' has no price" if model else "A request that names no model has no price"
            return self._refused(
                key.name,
                MODEL_NOT_ALLOWED,
                f"{asked}, and key '{key.name}' has a monthly budget: only priced models may be used.",
                status=403,
                reason="model_not_priced",
            )
        return None

    def _turn_finished(self, key: str, limits: KeyLimitsConfig | None, tokens: int | None, cost: float | None) -> None:
        self._in_flight[key] = max(0, self._in_flight.get(key, 0) - 1)
        if limits is not None:
            self._settle(self.store.finish(key, self.clock.seconds(), limits, tokens, cost), "finish", key)

    # seeding

    def seed(self, key_name: str, tokens_today: int, spent_this_month: float) -> Deferred[None]:
        """Start the UTC day's tokens and the UTC month's spend from the ledger's figures
        (``LedgerStore.spent``); never lowers what is counted already."""
        return self.store.seed(key_name, self.clock.seconds(), tokens_today, spent_this_month)

    # refusals

    def _refuse(self, key: str, breach: Breach) -> Refused:
        reason, limit, used, wait = breach.reason, breach.limit, breach.used, breach.retry_after
        now = self.clock.seconds()
        if reason == "budget_per_month":
            resets = utc_month(now)[1]
            return self._refused(
                key,
                NO_QUOTA,
                f"Key '{key}' has spent its monthly budget (${used:.2f} of ${limit:.2f} this UTC month);"
                f" it resets at {_iso(resets)}.",
                status=429,
                reason=reason,
                resets_at=resets,
            )
        if reason == CLUSTER_UNAVAILABLE:
            return self._refused(
                key,
                CLUSTER_UNAVAILABLE,
                f"Limits for key '{key}' cannot be checked right now (the shared limit store is"
                f" unreachable). Please try again in {wait}s.",
                status=503,
                retry_after=wait,
                reason=reason,
            )
        if wait is not None and wait > LONG_WAIT:
            # Codex sleeps a Retry-After silently, however long (docs/codex.md#rate-limits-and-
            # quotas-what-codex-shows): a long wait is a usage limit that says when it resets.
            resets = now + wait
            return self._refused(
                key,
                RATE_LIMITED,
                f"Usage limit reached for key '{key}': {_USED[reason](limit, used)}; it resets at {_iso(resets)}.",
                status=429,
                reason=reason,
                resets_at=resets,
            )
        again = f" Please try again in {wait}s." if wait is not None else ""
        what = _USED[reason](limit, used)
        return self._refused(
            key, RATE_LIMITED, f"Rate limit reached for key '{key}': {what}.{again}", status=429,
            retry_after=wait, reason=reason,
        )

    def _refused(
        self,
        key: str,
        code: str,
        message: str,
        *,
        status: int,
        retry_after: int | None = None,
        reason: str | None = None,
        resets_at: float | None = None,
    ) -> Refused:
        reason = reason or code
        if resets_at is not None:
            kind = USAGE_LIMIT  # Codex shows when it resets and does not retry
        elif code == CLUSTER_UNAVAILABLE:
            kind = "server_error"
        else:
            kind = "invalid_request_error" if code == MODEL_NOT_ALLOWED else code
        self._refusals[(key, reason)] = self._refusals.get((key, reason), 0) + 1
        log.info("key_limit_refused", key=key, reason=reason, retry_after=retry_after)
        if resets_at is None:
            return Refused(status, kind, code, message, retry_after, reason)
        at = math.ceil(resets_at)
        return Refused(status, kind, code, message, None, reason, at, max(0, at - math.floor(self.clock.seconds())))

    def _settle(self, d: Deferred[None], what: str, key: str) -> None:
        """A give-back is fire-and-forget: a store failure is logged, never raised to the turn."""
        d.addErrback(lambda failure: log.failure("key_limit_store_failed", failure, op=what, key=key))

    # metrics

    def collect(self) -> Iterator[Metric]:
        """The limiter's figures, read at scrape time (cch.metrics)."""
        refusals = CounterMetricFamily("cch_key_refusals", "Connections and turns refused by a key's limits.", labels=["key", "reason"])
        for (key, reason), count in sorted(self._refusals.items()):
            refusals.add_metric([key, reason], count)
        yield refusals
        in_flight = GaugeMetricFamily("cch_key_turns_in_flight", "Turns in flight on this replica, by key.", labels=["key"])
        for key, count in sorted(self._in_flight.items()):
            in_flight.add_metric([key], count)
        yield in_flight
        connections = GaugeMetricFamily("cch_key_connections", "Client WebSocket connections on this replica, by key.", labels=["key"])
        for key, count in sorted(self._connections.items()):
            connections.add_metric([key], count)
        yield connections
