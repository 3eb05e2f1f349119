"""The upstream WebSocket pool: which socket an exchange rides, and when a socket goes.

One :class:`UpstreamWSPool` per process (a child service of the gateway) keeps at most one idle
socket per client connection (session id), so a Codex session's warm-up and every following
turn ride the same upstream connection. :meth:`UpstreamWSPool.exchange` sends a frame for a
:class:`Target` and returns a Deferred firing with the first event's typed outcome
(cch/upstream/exchange.py). The pool alone keeps, idles and retires sockets.
The rules: docs/reference-behaviour.md#the-upstream-websocket-pool.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cch.config import LimitsConfig, UpstreamWebSocketConfig
from cch.upstream.exchange import Exchange, Outcome
from cch.upstream.tls import trust_root
from cch.upstream.ws import OPEN, UpstreamConnection

log = Logger()


@dataclass(frozen=True, slots=True)
class Target:
    """Where one attempt goes, computed once per attempt: the socket's URL and upgrade
    headers, the client session it belongs to, and what a new socket is opened with.
    ``fingerprint`` says which retained socket may serve it."""

    provider: str
    url: str
    headers: tuple[tuple[str, str], ...]
    session_id: str | None
    tls_ca: str | None = None
    max_event_bytes: int = LimitsConfig.max_upstream_event_bytes
    fingerprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", _fingerprint(self.provider, self.url, self.headers))

    @classmethod
    def of(
        cls,
        provider: str,
        url: str,
        headers: Mapping[str, str],
        session_id: str | None,
        *,
        tls_ca: str | None = None,
        max_event_bytes: int = LimitsConfig.max_upstream_event_bytes,
    ) -> Target:
        return cls(provider, url, tuple(headers.items()), session_id, tls_ca, max_event_bytes)


@functools.lru_cache(maxsize=1024)
def _fingerprint(provider: str, url: str, headers: tuple[tuple[str, str], ...]) -> str:
    """SHA-256 over what makes a socket reusable: provider, URL, upgrade headers (every turn
    asks with what is nearly always the same target as last time, hence the cache)."""
    pairs = sorted([k.lower(), v] for k, v in headers)
    blob = json.dumps(
        {"providerId": provider, "upstreamUrl": url, "headers": pairs},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(eq=False)
class PoolEntry:
    session_id: str
    fingerprint: str
    conn: UpstreamConnection
    active: bool
    created_at: float
    last_used_at: float
    idle_timer: IDelayedCall | None = None
    reuses: int = field(default=0)


class UpstreamWSPool(Service):
    """Retained upstream sockets keyed by client session id; stopping the service closes them all."""

    name = "upstream-ws-pool"

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        config: UpstreamWebSocketConfig,
        open_socket: Callable[[Target], UpstreamConnection] | None = None,
    ) -> None:
        """``open_socket`` makes an unconnected socket for a target (default: a real
        :class:`UpstreamConnection`; tests/test_pool.py passes in-memory ones)."""
        self.reactor = reactor
        self.clock = clock
        self.config = config
        self.open_socket = open_socket or self._new_socket
        self.max_entries = config.pool_max_entries
        self.entries: dict[str, PoolEntry] = {}
        self.sockets: set[UpstreamConnection] = set()  # every live socket, retained or not
        self._fresh: dict[Exchange, Target] = {}  # fresh retainable sockets before their first event
        self.stats = {"connects": 0, "reuses": 0, "busy_fresh": 0, "pruned": 0, "idle_closed": 0, "rotated": 0}

    # -- acquiring ------------------------------------------------------------------------

    def _aged(self, entry: PoolEntry) -> bool:
        return self.clock.seconds() - entry.created_at >= self.config.max_socket_age

    def peek(self, target: Target) -> int | None:
        """The id of the socket :meth:`exchange` would reuse right now, or None for a new one."""
        entry = self.entries.get(target.session_id) if target.session_id else None
        if (
            entry is not None
            and not entry.active
            and entry.conn.state == OPEN
            and not self._aged(entry)
            and entry.fingerprint == target.fingerprint
        ):
            return entry.conn.id
        return None

    def exchange(self, target: Target, frame: str | bytes) -> Deferred[Outcome]:
        """Send ``frame`` on a socket for ``target`` (docs/reference-behaviour.md#acquire-rules);
        fires with the first event's outcome. Cancel it to abort before the first event.

        A new socket refuses upstream messages over ``target.max_event_bytes`` (0: no cap); a
        reused one keeps the cap it was opened with.
        """
        session_id = target.session_id
        entry = self.entries.get(session_id) if session_id else None
        retainable = session_id is not None
        if entry is not None:
            if entry.active and entry.conn.usable:
                log.warn("upstream_ws_session_busy", sessionId=session_id)
                self.stats["busy_fresh"] += 1
                retainable = False
            elif entry.fingerprint == target.fingerprint and entry.conn.state == OPEN and not self._aged(entry):
                entry.active = True
                entry.last_used_at = self.clock.seconds()
                entry.reuses += 1
                self._cancel_idle(entry)
                self.stats["reuses"] += 1
                exchange = Exchange(self, entry.conn, frame, reused=True)
                exchange.held = entry
                exchange.start()
                return exchange.result
            elif entry.conn.state == OPEN and not self._aged(entry):
                # Another provider/key: keep the idle socket until a new one has proved itself
                # (first event), so a dead provider tried first does not cost the session its
                # working socket (replaced in first_event).
                pass
            else:
                if entry.conn.state == OPEN:
                    # Retire it before the provider's connection-age cap does it mid-turn.
                    log.info("upstream_ws_session_rotated", sessionId=session_id)
                    self.stats["rotated"] += 1
                self._forget(entry)
                entry.conn.safe_close(1000)
        conn = self._open(target)
        exchange = Exchange(self, conn, frame, reused=False)
        if retainable:
            self._fresh[exchange] = target
        exchange.start()
        try:
            conn.connect()
        except Exception as exc:
            # Refused before any byte left (a host name TLS cannot check, say): the socket
            # ends here, its exchange fails over to HTTP, nothing stays behind.
            conn.abort(f"upstream WebSocket could not start connecting: {exc}")
        return exchange.result

    def _new_socket(self, target: Target) -> UpstreamConnection:
        return UpstreamConnection(
            self.reactor,
            self.clock,
            target.url,
            dict(target.headers),
            handshake_timeout=self.config.handshake_timeout,
            max_message_bytes=target.max_event_bytes,
            trust=trust_root(target.tls_ca),
            deflate_window_bits=self.config.compression_window_bits if self.config.compression else None,
        )

    def _open(self, target: Target) -> UpstreamConnection:
        conn = self.open_socket(target)
        self.sockets.add(conn)
        conn.on_gone.append(self.sockets.discard)
        self.stats["connects"] += 1
        return conn

    # -- what exchanges tell the pool (cch.upstream.exchange.ExchangeOwner) -------------------

    def first_event(self, exchange: Exchange) -> None:
        """A fresh socket proved itself: keep it for its session (at most one per session)."""
        target = self._fresh.pop(exchange, None)
        if target is None:
            return  # reused, or request-scoped
        session_id = target.session_id
        assert session_id is not None
        previous = self.entries.get(session_id)
        if previous is not None:
            if previous.active:
                return  # someone is using the old socket: this one stays request-scoped
            self._forget(previous)
            previous.conn.safe_close(1000)
        if len(self.entries) >= self.max_entries:
            idle = sorted((e for e in self.entries.values() if not e.active), key=lambda e: e.last_used_at)
            for victim in idle[: len(self.entries) - self.max_entries + 1]:
                log.warn("upstream_ws_session_pruned", sessionId=victim.session_id)
                self.stats["pruned"] += 1
                self._forget(victim)
                victim.conn.safe_close(1000)
        if len(self.entries) >= self.max_entries:
            log.warn("upstream_ws_session_cap_reached", sessionId=session_id, maxEntries=self.max_entries)
            return
        now = self.clock.seconds()
        entry = PoolEntry(session_id, target.fingerprint, exchange.conn, True, now, now)
        self.entries[session_id] = entry
        exchange.held = entry
        exchange.conn.on_gone.append(lambda conn: self._forget(entry))

    def retire(self, exchange: Exchange, code: int) -> None:
        """Close the exchange's socket now (its consumer stopped producing)."""
        if isinstance(exchange.held, PoolEntry):
            self._forget(exchange.held)
        exchange.conn.safe_close(code)

    def ended(self, exchange: Exchange, close: int | None) -> None:
        """An exchange is over: idle its retained socket, or close the socket (1000 when it
        was request-scoped or detached from its session meanwhile, else ``close``)."""
        self._fresh.pop(exchange, None)
        entry = exchange.held
        if close is not None:
            if isinstance(entry, PoolEntry):
                self._forget(entry)
            exchange.conn.safe_close(close)
        if not isinstance(entry, PoolEntry):
            exchange.conn.safe_close(1000)
            return
        entry.active = False
        entry.last_used_at = self.clock.seconds()
        if self.entries.get(entry.session_id) is not entry:
            entry.conn.safe_close(1000)
        elif entry.conn.state == OPEN:
            entry.conn.resume()  # a sink may have left it paused; the next turn must hear it
            self._cancel_idle(entry)
            entry.idle_timer = self.clock.callLater(self.config.idle_timeout, self._idle_expired, entry)

    def _idle_expired(self, entry: PoolEntry) -> None:
        entry.idle_timer = None
        if self.entries.get(entry.session_id) is entry and not entry.active:
            log.info("upstream_ws_session_idle_closed", sessionId=entry.session_id, idleMs=int(self.config.idle_timeout * 1000))
            self.stats["idle_closed"] += 1
            self._forget(entry)
            entry.conn.safe_close(1000)

    def _forget(self, entry: PoolEntry) -> None:
        if self.entries.get(entry.session_id) is entry:
            del self.entries[entry.session_id]
        self._cancel_idle(entry)

    @staticmethod
    def _cancel_idle(entry: PoolEntry) -> None:
        timer, entry.idle_timer = entry.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- hooks ----------------------------------------------------------------------------

    def cleanup(self, session_id: str) -> None:
        """The client connection closed: close its retained socket 1000, even mid-request."""
        entry = self.entries.get(session_id)
        if entry is None:
            return
        log.info("upstream_ws_session_cleaned", sessionId=session_id)
        self._forget(entry)
        entry.conn.safe_close(1000)

    def close_all(self) -> Deferred[Any]:
        """Close every socket 1000 (service stop); fires when all are gone."""
        for entry in list(self.entries.values()):
            self._forget(entry)
        waiting = []
        for conn in list(self.sockets):
            d: Deferred[None] = Deferred()
            conn.on_gone.append(lambda _c, d=d: d.callback(None))
            waiting.append(d)
            conn.safe_close(1000)
        if not waiting:
            return succeed(None)
        return DeferredList(waiting)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.close_all()

    @property
    def size(self) -> int:
        return len(self.entries)

    def collect(self) -> Iterator[Metric]:
        """The pool's figures, read at scrape time (cch.metrics)."""
        yield GaugeMetricFamily("cch_upstream_ws_pool_size", "Retained upstream WebSocket sessions.", value=self.size)
        yield GaugeMetricFamily("cch_upstream_ws_sockets", "Open upstream WebSocket sockets.", value=len(self.sockets))
        events = CounterMetricFamily("cch_upstream_ws_pool_events", "Upstream WebSocket pool events.", labels=["event"])
        for key, count in sorted(self.stats.items()):
            events.add_metric([key], count)
        yield events
