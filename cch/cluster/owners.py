"""Response-id ownership shared by every replica: :class:`RedisOwners`.

A turn's response id is written to Redis as soon as the turn knows it (``SET <prefix>owner:<id>
<key> NX PX <ttl>``: the first owner stays the owner, as in the ledger), so a follow-up that
reaches another replica a moment later is answered from Redis before the ledger's batch has
reached the database. Redis keeps an owner for ``ttl`` (a day); older ids are the ledger
database's to answer — a PostgreSQL ledger shared by the replicas (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cch.cluster.redis import RedisConnection

__all__ = ["OWNER_TTL", "RedisOwners"]

log = Logger()

OWNER_TTL = 24 * 3600.0


class RedisOwners:
    """The owner directory in Redis. ``put`` never fails (a lost write leaves the ledger to
    answer); ``get`` fails with :class:`cch.cluster.redis.RedisError` when Redis cannot say."""

    def __init__(self, redis: RedisConnection, *, prefix: str, ttl: float = OWNER_TTL) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000)
        self.written = 0
        self.write_errors = 0

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}owner:{response_id}"

    def put(self, response_id: str, key: str) -> Deferred[None]:
        """Record that ``key`` created ``response_id``; fires when Redis has it (or has failed)."""
        d = self.redis.execute("SET", self._key(response_id), key, "NX", "PX", self.ttl_ms)
        return d.addCallbacks(self._written, self._not_written)

    def _written(self, _: object) -> None:
        self.written += 1

    def _not_written(self, failure: Failure) -> None:
        self.write_errors += 1
        log.debug("cluster_owner_not_written", error=failure.getErrorMessage())

    def get(self, response_id: str) -> Deferred[str | None]:
        """The key that created ``response_id`` as Redis knows it, or None."""
        return self.redis.execute("GET", self._key(response_id))

    def collect(self) -> Iterator[Metric]:
        written = CounterMetricFamily("cch_cluster_owners_written", "Response-id owners written to Redis.")
        written.add_metric([], self.written)
        yield written
        failed = CounterMetricFamily(
            "cch_cluster_owner_write_errors", "Response-id owners Redis did not take (the ledger database still answers)."
        )
        failed.add_metric([], self.write_errors)
        yield failed
