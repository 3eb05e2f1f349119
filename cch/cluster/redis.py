"""One connection to Redis for the whole process: a service with a Deferred API.

:class:`RedisConnection` wraps a lazy ``txredisapi`` pool (``poolsize`` 1 by default: one
connection pipelines every command in the order they were issued, so a turn's ``finish`` is
seen by Redis before the next turn's admission; Redis runs one command at a time anyway).
The pool reconnects by itself with a capped back-off after Redis restarts or drops the client.

While no connection is up a command fails at once with :class:`RedisUnavailable` instead of
queueing behind the reconnect (the caller falls back, docs/scaling.md); only in the first
``connect_timeout`` seconds after start does a command wait for the first connection. A command
without a reply within ``timeout`` seconds fails the same way and the connection is dropped and
made again (a hung Redis must not hold turns).

Lua scripts (:class:`Script`) run with EVALSHA; a ``NOSCRIPT`` answer (Redis restarted or its
script cache was flushed) loads the script with SCRIPT LOAD and runs it once more.

This module is the one place that knows ``txredisapi``'s internals (its factory, pool size and
back-off attributes); tests/test_cluster_redis.py fails when an upgrade removes them. The
package imports the global reactor when imported, so it is imported only when the service
starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from cch.waiters import Waiters

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = ["RedisAddress", "RedisConnection", "RedisError", "RedisUnavailable", "Script"]

log = Logger()


class RedisError(Exception):
    """Redis refused a command (``reply`` is its error line), or could not answer
    (:class:`RedisUnavailable`). Messages name the server without its password."""

    def __init__(self, message: str, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class RedisUnavailable(RedisError):
    """Redis could not answer: not connected (down, restarting, stopped), the connection was
    lost before the reply, or no reply came in time."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: a ``redis://[[user]:password@]host[:port][/db]`` URL taken apart
    (cch.config has checked its form)."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError("not a redis:// URL with a host")
        db = parts.path.removeprefix("/")
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(db) if db else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


@dataclass(frozen=True)
class Script:
    """A Lua script, run by its SHA-1 (EVALSHA)."""

    name: str  # for metrics and messages
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode("utf-8")).hexdigest())


class RedisConnection(Service):
    """The process's connection to Redis at ``address``.

    ``reactor`` connects (and is the clock of the reply deadline). Each command returns a
    Deferred that fires with Redis's reply (strings decoded as UTF-8, numbers as Redis sent
    them: integers as ``int``, everything else as ``str``) or fails with :class:`RedisError`.
    Cancelling it abandons the reply (the command may still run in Redis).
    """

    def __init__(
        self,
        address: RedisAddress,
        reactor: Any,
        *,
        timeout: float = 2.0,
        connect_timeout: float = 5.0,
        reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 5.0,
        poolsize: int = 1,
    ) -> None:
        self.address = address
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.poolsize = poolsize
        self._factory: Any = None
        self._started_at = 0.0
        self._ever_connected = False
        self.commands = 0
        self.errors: dict[str, int] = {"unavailable": 0, "refused": 0}
        self.script_loads = 0
        self.connects = 0
        self._hooks: list[Callable[[], object]] = []
        self._in_flight = 0  # commands sent and not answered yet
        self._idle: Waiters[None] = Waiters()  # fired when none is in flight

    # -- life cycle -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        import txredisapi  # the cluster extra; imported only when Redis is used

        address = self.address
        holder = self

        class Factory(txredisapi.RedisFactory):  # type: ignore[misc]
            def addConnection(self, conn: Any) -> None:
                super().addConnection(conn)
                if conn in self.pool:
                    holder._connected()

        factory = Factory(
            f"{address.host}:{address.port}",
            address.db,
            self.poolsize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset="utf-8",
            password=address.password,
            replyTimeout=self.timeout,
            convertNumbers=False,  # "1.5" stays a string: the caller knows what it stored
            username=address.username,
        )
        factory.initialDelay = self.reconnect_delay
        factory.maxDelay = self.max_reconnect_delay
        factory.startConnecting(HostnameEndpoint(self.reactor, address.host, address.port, timeout=self.connect_timeout))
        self._factory = factory
        self._started_at = self.clock.seconds()
        self._ever_connected = False

    def stopService(self) -> Deferred[None]:
        """Take no new command, wait for the replies of those in flight (each has its
        deadline: a turn's last ``finish`` is not lost at shutdown), stop reconnecting and
        close the connection; fires once it is closed."""
        super().stopService()
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        return Deferred.fromCoroutine(self._close(factory))

    async def _close(self, factory: Any) -> None:
        if self._in_flight:
            await self._idle.wait()
        await factory.disconnect()

    def _answered(self, result: Any) -> Any:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.fire(None)
        return result

    def on_connect(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` each time a connection to Redis is ready: the first one and every
        one made again after a loss (Redis may have restarted empty: seed what must survive
        a restart, put back the leases held)."""
        self._hooks.append(hook)

    def forget(self, hook: Callable[[], object]) -> None:
        """Stop calling ``hook``."""
        if hook in self._hooks:
            self._hooks.remove(hook)

    def _connected(self) -> None:
        self.connects += 1
        self._ever_connected = True
        for hook in list(self._hooks):
            try:
                hook()
            except Exception:
                log.failure("redis_connect_hook_failed")

    @property
    def up(self) -> bool:
        """A connection to Redis is open and ready (for /readyz and the metrics)."""
        factory = self._factory
        return factory is not None and factory.size > 0

    # -- commands -------------------------------------------------------------------------

    def execute(self, *args: str | int) -> Deferred[Any]:
        """Send one command (``execute("GET", "k")``)."""
        factory = self._factory
        if factory is None:
            self.errors["unavailable"] += 1
            return fail(RedisUnavailable(f"{self.address}: not started"))
        wait = self.timeout
        if factory.size > 0:
            self._ever_connected = True
        else:
            connecting = self._started_at + self.connect_timeout - self.clock.seconds()
            if self._ever_connected or connecting <= 0:
                self.errors["unavailable"] += 1
                return fail(RedisUnavailable(f"{self.address}: not connected"))
            wait = max(wait, connecting)  # the first connection is on its way
        self.commands += 1
        self._in_flight += 1
        d: Deferred[Any] = factory.handler.execute_command(*(str(arg) for arg in args))
        d.addTimeout(wait, self.clock)
        d.addBoth(self._answered)
        return d.addErrback(self._translate)

    def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Deferred[Any]:
        """Run ``script`` (EVALSHA; loaded first when Redis does not know it)."""
        d = self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Any:
            if not (failure.check(RedisError) and failure.value.reply.startswith("NOSCRIPT")):
                return failure
            self.script_loads += 1
            loaded = self.execute("SCRIPT", "LOAD", script.source)
            return loaded.addCallback(lambda _: self.execute("EVALSHA", script.sha, len(keys), *keys, *args))

        return d.addErrback(unknown)

    def _translate(self, failure: Failure) -> Failure:
        import txredisapi

        if failure.check(CancelledError):
            return failure  # the caller cancelled
        if failure.check(txredisapi.ResponseError):
            self.errors["refused"] += 1
            reply = failure.getErrorMessage()
            return Failure(RedisError(f"{self.address}: {reply}", reply))
        self.errors["unavailable"] += 1
        if failure.check(TimeoutError, txredisapi.TimeoutError):
            return Failure(RedisUnavailable(f"{self.address}: no reply within {self.timeout:g}s"))
        return Failure(RedisUnavailable(f"{self.address}: {failure.getErrorMessage() or failure.type.__name__}"))

    # -- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The connection's figures, read at scrape time (cch.metrics)."""
        up = GaugeMetricFamily("cch_redis_up", "1 while a connection to Redis is open.")
        up.add_metric([], 1 if self.up else 0)
        yield up
        commands = CounterMetricFamily("cch_redis_commands", "Commands sent to Redis.")
        commands.add_metric([], self.commands)
        yield commands
        errors = CounterMetricFamily(
            "cch_redis_errors", "Redis commands that failed: unavailable (down, lost, no reply) or refused.", labels=["kind"]
        )
        for kind, count in sorted(self.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        loads = CounterMetricFamily("cch_redis_script_loads", "Lua scripts loaded after a NOSCRIPT answer.")
        loads.add_metric([], self.script_loads)
        yield loads
        connects = CounterMetricFamily("cch_redis_connects", "Connections to Redis made (the first and every one after a loss).")
        connects.add_metric([], self.connects)
        yield connects
