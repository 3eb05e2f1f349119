"""Endpoints that refused a WebSocket upgrade recently: skip them for a while.

See docs/reference-behaviour.md#unsupported-endpoint-cache.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class UnsupportedCache:
    """In-memory, per process; keyed by ``provider:endpoint`` (no endpoint = ``default``)."""

    def __init__(self, clock: IReactorTime, ttl: float = 300.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self._entries: dict[str, tuple[float, str]] = {}

    @staticmethod
    def _key(provider: str, endpoint: str | None) -> str:
        return f"{provider}:{endpoint if endpoint is not None else 'default'}"

    def mark(self, provider: str, endpoint: str | None, reason: str, ttl: float | None = None) -> None:
        expires = self.clock.seconds() + max(1.0, self.ttl if ttl is None else ttl)
        self._entries[self._key(provider, endpoint)] = (expires, reason)

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
