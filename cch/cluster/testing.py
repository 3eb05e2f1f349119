"""Helpers for tests against a real Redis: is it there, a key prefix of one's own cleaned up
after, and a proxy in front of it that can be stopped and started again (an outage and a
restart, without touching the server other tests use)."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.protocols import portforward

from cch.cluster.redis import RedisAddress, RedisConnection

__all__ = [
    "REDIS_ENV",
    "RedisProxy",
    "TestRedis",
    "close_test_redis",
    "delete_prefix",
    "open_test_redis",
    "redis_problem",
    "require_redis",
    "test_redis_url",
]

REDIS_ENV = "CCH_TEST_REDIS"
"""Names the Redis tests use (default redis://127.0.0.1:6379/0, the one CI runs)."""


def test_redis_url() -> str:
    return os.environ.get(REDIS_ENV) or "redis://127.0.0.1:6379/0"


test_redis_url.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


def redis_problem(url: str, timeout: float = 2.0) -> str | None:
    """Why the Redis at ``url`` cannot be used for tests (None: it answers PING)."""
    address = RedisAddress.from_url(url)
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
            if address.password is not None:
                user = f" {address.username}" if address.username else ""
                sock.sendall(f"AUTH{user} {address.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"Redis at {address} does not answer ({exc})"
    if not answer.startswith(b"+PONG"):
        return f"Redis at {address} answered PING with {answer[:40]!r}"
    return None


def require_redis() -> str:
    """The test Redis's URL; the calling test skips when it does not answer, or fails under
    CI=true (CI runs Redis as a service: a skip there would hide a broken cluster)."""
    import pytest

    url = test_redis_url()
    problem = redis_problem(url)
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem + " (CI=true: the cluster tests must run on Redis)")
        pytest.skip(problem)
    return url


class TestRedis(RedisConnection):
    """A connection for one test, whose keys start with :attr:`prefix` (unique to it), so tests
    run side by side and again without meeting each other's keys."""

    __test__ = False  # not a pytest test class

    def __init__(self, address: RedisAddress, reactor: Any, **options: Any) -> None:
        super().__init__(address, reactor, **options)
        self.prefix = f"cchtest:{uuid.uuid4().hex[:12]}:"


def open_test_redis(reactor: Any, url: str | None = None) -> TestRedis:
    """A started :class:`TestRedis` to ``url`` (default: :func:`require_redis`). A test whose
    async fixture opens it should take the URL from a plain fixture calling
    :func:`require_redis`: a skip raised inside an async fixture upsets pytest-twisted."""
    connection = TestRedis(RedisAddress.from_url(url or require_redis()), reactor)
    connection.startService()
    return connection


async def close_test_redis(connection: TestRedis) -> None:
    """Delete the test's keys and close the connection."""
    await delete_prefix(connection, connection.prefix)
    await connection.stopService()


async def delete_prefix(redis: RedisConnection, prefix: str) -> int:
    """Delete every key starting with ``prefix``; how many there were."""
    cursor, deleted = "0", 0
    while True:
        cursor, keys = await redis.execute("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        if keys:
            deleted += int(await redis.execute("DEL", *keys))
        if cursor == "0":
            return deleted


class _Server(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.live.discard(self)
        super().connectionLost(reason)


class _Client(portforward.ProxyClient):
    def connectionMade(self) -> None:
        self.peer.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.peer.factory.live.discard(self)
        super().connectionLost(reason)


class _ClientFactory(portforward.ProxyClientFactory):
    protocol = _Client
    noisy = False


class _Factory(portforward.ProxyFactory):
    protocol = _Server
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.live: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.clientProtocolFactory = _ClientFactory
        return protocol


class RedisProxy:
    """A TCP proxy on 127.0.0.1 to the Redis at ``url``; :attr:`url` reaches Redis through it.
    :meth:`stop` closes its port and every connection through it (Redis is "down"),
    :meth:`start` listens again on the same port (Redis is "back")."""

    def __init__(self, reactor: Any, url: str) -> None:
        self.reactor = reactor
        self.target = RedisAddress.from_url(url)
        self.factory = _Factory(self.target.host, self.target.port)
        self.port = 0
        self._listening: IListeningPort | None = None

    @property
    def url(self) -> str:
        secret = f":{self.target.password}@" if self.target.password is not None else ""
        return f"redis://{secret}127.0.0.1:{self.port}/{self.target.db}"

    def start(self) -> None:
        self._listening = self.reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port

    def stop(self) -> Deferred[None]:
        """Stop listening and drop every connection; fires once all are closed."""
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            waits.append(Deferred.fromCoroutine(_ended(self._listening.stopListening())))
            self._listening = None
        for protocol in list(self.factory.live):
            protocol.transport.abortConnection()
        waits.append(Deferred.fromCoroutine(self._drained()))
        return gatherResults(waits).addCallback(lambda _: None)

    async def _drained(self) -> None:
        from twisted.internet.task import deferLater

        while self.factory.live:
            await deferLater(self.reactor, 0.001, lambda: None)


async def _ended(d: Any) -> None:
    if d is not None:
        await d
