"""The cluster's part of the service tree: :class:`ClusterService`, built from ``[cluster]``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from cch.cluster.fallback import FallbackLimitStore
from cch.cluster.limits import RedisLimitStore
from cch.cluster.marks import SharedMarks
from cch.cluster.owners import RedisOwners
from cch.cluster.redis import RedisAddress, RedisConnection
from cch.config import ClusterConfig
from cch.handler.routing import CircuitBreaker
from cch.upstream.unsupported import UnsupportedCache

__all__ = ["ClusterService"]


class ClusterService(MultiService):
    """What the replicas share through Redis: the connection, the limit store (``store`` is
    what a :class:`cch.keylimits.KeyLimiter` is given), the response-id owners (``owners``, for
    the ledger) and, once :meth:`share_marks` is called, the unsupported-endpoint marks and the
    breakers. Started in that order and stopped one after the other in the reverse order (the
    store gives its leases back before the connection closes).

    ``reactor`` connects to Redis; ``clock`` times leases, windows and outages (the gateway's
    injected clock). Add it to the gateway's tree so that it stops after the drain: leases are
    renewed while turns finish."""

    def __init__(self, config: ClusterConfig, reactor: Any, clock: IReactorTime | None = None) -> None:
        super().__init__()
        if not config.enabled:
            raise ValueError("[cluster] redis is not set")
        clock = clock if clock is not None else reactor
        self.config = config
        self.replica = config.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.redis = RedisConnection(RedisAddress.from_url(config.redis), reactor)
        self.limits = RedisLimitStore(
            self.redis, clock, replica=self.replica, lease_ttl=config.lease_ttl, prefix=config.key_prefix
        )
        self.store = FallbackLimitStore(
            self.limits, clock, mode=config.on_redis_down, expected_replicas=config.expected_replicas
        )
        self.owners = RedisOwners(self.redis, prefix=config.key_prefix)
        self.marks: SharedMarks | None = None
        self.clock = clock
        self.redis.setServiceParent(self)
        self.limits.setServiceParent(self)

    def share_marks(self, unsupported: UnsupportedCache, breakers: list[CircuitBreaker]) -> None:
        """Share ``unsupported``'s marks and the ``breakers``' changes with the other replicas."""
        self.marks = SharedMarks(
            self.redis, self.clock, prefix=self.config.key_prefix, unsupported=unsupported, breakers=breakers
        )
        self.marks.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for child in reversed(list(self)):
            await maybeDeferred(child.stopService)

    @property
    def ready(self) -> bool:
        """Redis is connected (for /readyz: with ``on_redis_down = "local"`` the replica still
        serves without it, so report it rather than fail on it)."""
        return self.redis.up

    def collect(self) -> Iterator[Metric]:
        """Every cluster figure, read at scrape time (cch.metrics)."""
        yield from self.redis.collect()
        yield from self.limits.collect()
        yield from self.store.collect()
        yield from self.owners.collect()
        if self.marks is not None:
            yield from self.marks.collect()
