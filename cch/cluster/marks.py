"""What one replica learns about the providers, told to the others: :class:`SharedMarks`.

Two discoveries are worth sharing: an endpoint that refused the WebSocket upgrade (the
unsupported-endpoint mark: the others skip the probe) and a provider breaker that opened or
closed (the others stop sending to a failing provider, or start again). Each is one field of a
Redis hash, ``<prefix>marks``, written when it happens here; every replica reads the hash every
``interval`` seconds (and whenever it connects to Redis) and applies what is newer than what it
knows. Times are the replicas' clocks (NTP): a mark carries its expiry, a breaker change the
moment it happened, and the latest change of a breaker wins.

Redis unavailable: nothing is shared meanwhile, each replica keeps its own marks and breakers
(as without ``[cluster]``), and the next read after Redis is back catches up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from cch.cluster.redis import RedisConnection
from cch.handler.routing import CLOSED, OPEN, CircuitBreaker
from cch.upstream.unsupported import UnsupportedCache

__all__ = ["SharedMarks"]

log = Logger()

MARKS_INTERVAL = 2.0  # how stale another replica's discovery may be here, at most (seconds)
_HASH_TTL_MS = 24 * 3600 * 1000  # the hash outlives its newest field by a day
_UNSUPPORTED, _BREAKER = "unsupported", "breaker"


class SharedMarks(Service):
    """Shares ``unsupported``'s marks and ``breakers``' changes through ``redis``."""

    def __init__(
        self,
        redis: RedisConnection,
        clock: IReactorTime,
        *,
        prefix: str,
        unsupported: UnsupportedCache,
        breakers: Iterable[CircuitBreaker],
        interval: float = MARKS_INTERVAL,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.hash = f"{prefix}marks"
        self.unsupported = unsupported
        self.breakers = {breaker.name: breaker for breaker in breakers}
        self.interval = interval
        self.published = {_UNSUPPORTED: 0, _BREAKER: 0}
        self.learned = {_UNSUPPORTED: 0, _BREAKER: 0}
        self._loop: LoopingCall | None = None
        self._reading: Deferred[None] | None = None

    # -- life cycle -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.unsupported.listeners.append(self._marked)
        for breaker in self.breakers.values():
            breaker.listeners.append(self._breaker_changed)
        self.redis.on_connect(self.read)
        loop = LoopingCall(self.read)
        loop.clock = self.clock
        loop.start(self.interval, now=False)
        self._loop = loop

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.unsupported.listeners.remove(self._marked)
        for breaker in self.breakers.values():
            breaker.listeners.remove(self._breaker_changed)
        self.redis.forget(self.read)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        reading = self._reading
        if reading is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        reading.addBoth(lambda _: done.callback(None))  # a read in flight has its reply deadline
        return done

    # -- telling the others ---------------------------------------------------------------

    def _marked(self, key: str, expires: float, reason: str) -> None:
        self._publish(_UNSUPPORTED, key, f"{expires!r} {reason}")

    def _breaker_changed(self, provider: str, state: str, at: float) -> None:
        self._publish(_BREAKER, provider, f"{state} {at!r}")

    def _publish(self, kind: str, name: str, value: str) -> None:
        if not self.running:
            return
        self.published[kind] += 1
        field = f"{kind}|{name}"
        written = self.redis.execute("HSET", self.hash, field, value)
        written.addCallback(lambda _: self.redis.execute("PEXPIRE", self.hash, _HASH_TTL_MS))
        written.addErrback(self._failed, "publish")

    # -- hearing from them ----------------------------------------------------------------

    def read(self) -> Deferred[None]:
        """Read the hash once and apply what is news (one read at a time)."""
        if self._reading is not None:
            return self._reading
        reading = self.redis.execute("HGETALL", self.hash)
        reading.addCallback(self._apply)
        reading.addErrback(self._failed, "read")

        def over(result: object) -> object:
            self._reading = None
            return result

        reading.addBoth(over)
        if not reading.called:
            self._reading = reading
        return reading

    def _apply(self, reply: Any) -> None:
        fields = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
        for field, value in fields:
            kind, _, name = str(field).partition("|")
            try:
                if kind == _UNSUPPORTED:
                    expires, _, reason = str(value).partition(" ")
                    news = self.unsupported.learn(name, float(expires), reason)
                elif kind == _BREAKER and name in self.breakers:
                    state, _, at = str(value).partition(" ")
                    news = state in (OPEN, CLOSED) and self.breakers[name].learn(state, float(at))
                else:
                    continue  # a provider this replica is not configured with
            except ValueError:
                log.warn("cluster_mark_unreadable", field=str(field))
                continue
            if news:
                self.learned[kind] += 1

    def _failed(self, failure: Failure, what: str) -> None:
        # The connection counts the error; a lost mark or read costs at most a probe.
        log.debug("cluster_marks_failed", what=what, error=failure.getErrorMessage())

    # -- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for name, counts, text in (
            ("cch_cluster_marks_published", self.published, "Unsupported-endpoint marks and breaker changes told to the other replicas."),
            ("cch_cluster_marks_learned", self.learned, "Unsupported-endpoint marks and breaker changes learned from other replicas."),
        ):
            family = CounterMetricFamily(name, text, labels=["kind"])
            for kind, count in sorted(counts.items()):
                family.add_metric([kind], count)
            yield family
