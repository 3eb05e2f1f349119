"""Endpoints that refused a WebSocket upgrade recently: skip them for a while.

See docs/reference-behaviour.md#unsupported-endpoint-cache. With several replicas the marks are
shared (cch.cluster.marks): a mark made here is told to ``listeners``; one made elsewhere comes
back through :meth:`UnsupportedCache.learn`, which tells nobody.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

# (cache key, expiry on the clock, reason) of a mark made by this process.
MarkListener = Callable[[str, float, str], object]


class UnsupportedCache:
    """In-memory, per process; keyed by ``provider:endpoint`` (no endpoint = ``default``)."""

    def __init__(self, clock: IReactorTime, ttl: float = 300.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self._entries: dict[str, tuple[float, str]] = {}
        self.listeners: list[MarkListener] = []

    @staticmethod
    def _key(provider: str, endpoint: str | None) -> str:
        return f"{provider}:{endpoint if endpoint is not None else 'default'}"

    def mark(self, provider: str, endpoint: str | None, reason: str, ttl: float | None = None) -> None:
        expires = self.clock.seconds() + max(1.0, self.ttl if ttl is None else ttl)
        key = self._key(provider, endpoint)
        self._entries[key] = (expires, reason)
        for listener in self.listeners:
            listener(key, expires, reason)

    def learn(self, key: str, expires: float, reason: str) -> bool:
        """A mark another replica made: kept until ``expires`` unless a later one is kept.
        True when it was news."""
        held = self._entries.get(key)
        if expires <= self.clock.seconds() or (held is not None and held[0] >= expires):
            return False
        self._entries[key] = (expires, reason)
        return True

    def lookup(self, provider: str, endpoint: str | None) -> str | None:
        """The reason an endpoint is marked, or None when it may be tried."""
        key = self._key(provider, endpoint)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, reason = entry
        if self.clock.seconds() >= expires:
            del self._entries[key]
            return None
        return reason

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
