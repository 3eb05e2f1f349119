"""Three real replicas for tests/test_cluster_replicas.py (issue 15): each one
``twistd -n cch --config FILE`` in a child process on a free 127.0.0.1 port, all sharing one
Redis (under a key prefix of the test's own) and one PostgreSQL ledger (a schema of the test's
own), all in front of one fake upstream run in the test process, so the test sees every turn any
replica sends upstream, and says when each held stream ends.

Every wait is on an event: a child's log line or its end, a client's frame, a request reaching
the fake. What only another process knows (its metrics, Redis, the database) is polled with a
short reactor delay under an overall deadline, which fails the test with what never happened.
Every child is reaped and every client socket closed at teardown, whatever the test did.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import treq
from conftest import within
from prometheus_client.parser import text_string_to_metric_families
from test_plugin import TWISTD, Child, Ended
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.web.client import HTTPConnectionPool
from usage_e2e_support import answer

from cch.cluster.testing import TestRedis
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.fake_upstream import Recorded
from cch.testing.scripts import Script

ADMIN_TOKEN = "admin-token-0123456789abcdef"
MODEL = "gpt-5.5"
HOLD = "hold"  # a turn whose input holds this word is held at the upstream until released
POLL = 0.05  # seconds between two looks at another process's state
START_TIMEOUT = 30.0  # a replica's start, generous: only a broken child reaches it
LEASE_TTL = 2.0  # every replica's cluster.lease_ttl: a killed replica's slots free this soon

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Key:
    """A client key as ``[[keys]]`` has it: its name, secret and limits (config field names)."""

    name: str
    limits: dict[str, int] = field(default_factory=dict)

    @property
    def secret(self) -> str:
        return f"sk-cch-{self.name}-0123456789abcdef"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def table(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.secret, **self.limits}


def create(text: str, **fields: Any) -> dict[str, Any]:
    """A Codex-like ``response.create`` frame whose input is ``text`` (include :data:`HOLD` to
    have the upstream hold it)."""
    frame: dict[str, Any] = {
        "type": "response.create",
        "model": MODEL,
        "store": False,
        "input": text,
    }
    frame.update(fields)
    return frame


# -- TOML ----------------------------------------------------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for anything the tests write
    raise TypeError(f"no TOML for {value!r}")


def render_toml(tables: dict[str, dict[str, Any] | list[dict[str, Any]]]) -> str:
    """Tables (a dict) and arrays of tables (a list of dicts) of scalar values, as TOML."""
    lines: list[str] = []
    for name, body in tables.items():
        entries = (
            [(f"[[{name}]]", entry) for entry in body]
            if isinstance(body, list)
            else [(f"[{name}]", body)]
        )
        for header, entry in entries:
            lines.append(header)
            lines += [f"{key} = {_value(value)}" for key, value in entry.items()]
            lines.append("")
    return "\n".join(lines)


# -- the upstream --------------------------------------------------------------------------------


class Upstream:
    """The fake every replica's provider points at. A turn whose input holds :data:`HOLD` sends
    ``response.created`` and a delta, then waits for :meth:`release`; any other ends at once.
    It counts the turns in flight at any moment, and the most there ever were."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.clock = Clock()  # held streams wait on it
        fake.clock = self.clock
        fake.default = self._script
        self._held = answer(before_terminal=1)
        self._quick = answer()
        self.peak = 0
        self.listeners: list[Callable[[], None]] = []

    def _script(self, recorded: Recorded) -> Script:
        self.peak = max(self.peak, self.in_flight)  # this request is in flight already
        for listener in list(self.listeners):
            listener()
        held = HOLD in json.dumps(recorded.body.get("input"))
        return (self._held if held else self._quick)(recorded)

    @property
    def in_flight(self) -> int:
        """Requests whose script has not ended: held, or being answered right now."""
        return sum(1 for r in self.fake.requests if not r.finished)

    def release(self) -> None:
        """Every held stream sends its terminal event and ends."""
        self.clock.advance(1)

    def with_input(self, text: str) -> list[Recorded]:
        return [r for r in self.fake.requests if r.body.get("input") == text]

    def forwarded(self, response_id: str) -> list[Recorded]:
        """The requests that named ``response_id`` as their previous response."""
        return [r for r in self.fake.requests if r.body.get("previous_response_id") == response_id]


# -- waiting -------------------------------------------------------------------------------------


class Progress:
    """Something changed in the test process (a frame came, a request reached the fake):
    :meth:`until` re-checks its condition after each :meth:`changed`, never on a timer.

    The check runs on the next reactor turn, not inside :meth:`changed`: whoever reported the
    change (the fake choosing a request's script) finishes what it was doing (scheduling the
    script's steps) before the waiter acts on it (releasing held streams)."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self._check: Any = None  # the DelayedCall of the next check

    def changed(self) -> None:
        if self._check is None and self._waiting:
            self._check = reactor.callLater(0, self._recheck)

    def _recheck(self) -> None:
        self._check = None
        for entry in list(self._waiting):
            if entry in self._waiting and entry[0]():
                self._waiting.remove(entry)
                entry[1].callback(None)

    async def until(self, check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
        if check():
            return
        entry: tuple[Callable[[], bool], Deferred[None]]
        d: Deferred[None] = Deferred(
            lambda _: self._waiting.remove(entry) if entry in self._waiting else None
        )
        entry = (check, d)
        self._waiting.append(entry)
        await within(d, what, seconds)


async def poll(
    check: Callable[[], Awaitable[bool] | bool], what: str, seconds: float = 20.0
) -> float:
    """Look at another process's state every :data:`POLL` seconds until ``check()`` holds;
    the reactor time when it did. Fails the test with ``what`` after ``seconds``."""
    deadline = reactor.seconds() + seconds
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return reactor.seconds()
        if reactor.seconds() > deadline:
            pytest.fail(f"within {seconds:g}s, never: {what}")
        await deferLater(reactor, POLL, lambda: None)


# -- the replicas --------------------------------------------------------------------------------


class Replica:
    """One ``twistd -n cch --config FILE`` child, run in a directory of its own (its spill
    file): its name, where it listens, its log lines and its end."""

    def __init__(self, name: str, child: Child) -> None:
        self.name = name
        self.child = child
        self.port = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/responses"

    async def logged(self, name: str) -> None:
        """Until the replica logs the event ``name`` (fails if it ends first)."""
        await self.child.wait_for(rf" {re.escape(name)}(?: |$)")

    def signal(self, name: str) -> None:
        if self.child.running and self.child.transport is not None:
            self.child.transport.signalProcess(name)

    async def ended(self) -> Ended:
        ended: Ended = await self.child.wait_ended()
        return ended

    def __repr__(self) -> str:
        return f"<replica {self.name} on {self.port}>"


class Cluster:
    """One test's replicas, fake upstream, WebSocket clients and HTTP pool; :meth:`close` ends
    them all (a replica still running is killed and reaped)."""

    def __init__(
        self,
        fake: FakeUpstream,
        tmp_path: Path,
        redis: TestRedis,
        redis_url: str,
        database_url: str,
    ) -> None:
        self.upstream = Upstream(fake)
        self.tmp_path = tmp_path
        self.redis = redis  # the test's own connection, for a look at what the replicas wrote
        self.redis_url = redis_url
        self.prefix = redis.prefix  # the replicas' cluster.key_prefix: this test's keys alone
        self.database_url = database_url
        self.replicas: list[Replica] = []
        self.clients: list[ResponsesWSClient] = []
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def config(
        self, name: str, keys: Sequence[Key], redis_url: str, cluster: dict[str, Any]
    ) -> str:
        """Replica ``name``'s TOML: ``keys``, the fake as its only provider (over HTTP), the
        shared ledger (rows written every 0.2 s) and Redis under this test's prefix, with
        ``cluster`` added to its ``[cluster]`` table."""
        return render_toml(
            {
                "server": {
                    "listen": "tcp:0:interface=127.0.0.1",
                    "replica": name,
                    "admin_token": ADMIN_TOKEN,
                    "drain_timeout": 20,
                    "max_connections": 256,
                },
                "keys": [key.table() for key in keys],
                "providers": [
                    {"name": "fake", "base_url": self.upstream.fake.base_url, "websocket": "off"}
                ],
                "usage": {"database": self.database_url, "flush_interval": 0.2},
                "cluster": {
                    "redis": redis_url,
                    "replica": name,
                    "key_prefix": self.prefix,
                    "lease_ttl": LEASE_TTL,
                    "expected_replicas": 3,
                    **cluster,
                },
            }
        )

    async def start(
        self,
        keys: Sequence[Key],
        *,
        count: int = 3,
        redis_url: str | None = None,
        cluster: dict[str, Any] | None = None,
        each: Sequence[dict[str, Any]] | None = None,
    ) -> list[Replica]:
        """``count`` replicas named r1, r2, …, all listening when this returns. ``cluster``
        adds to every replica's ``[cluster]`` table, ``each[i]`` to replica i's alone."""
        started = []
        for i in range(count):
            name = f"r{i + 1}"
            run_dir = self.tmp_path / name
            run_dir.mkdir()
            options = {**(cluster or {}), **(each[i] if each else {})}
            path = run_dir / "cch.toml"
            path.write_text(
                self.config(name, keys, redis_url or self.redis_url, options), encoding="utf-8"
            )
            replica = Replica(name, self._spawn(path, run_dir))
            self.replicas.append(replica)
            started.append(replica)

        async def listening(replica: Replica) -> None:
            bound = await replica.child.wait_for(r"GuardedSite starting on (\d+)$")
            await replica.logged("server_listening")
            replica.port = int(bound.group(1))

        await within(
            gatherResults([Deferred.fromCoroutine(listening(r)) for r in started]),
            "the replicas to listen",
            START_TIMEOUT,
        )
        return started

    def _spawn(self, config: Path, run_dir: Path) -> Child:
        child = Child()
        # A minimal environment and twistd's own log lines, as tests/test_plugin.py runs it.
        env = {"PATH": os.environ.get("PATH", os.defpath)}
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "cch", "--config", str(config)]
        reactor.spawnProcess(child, sys.executable, argv, env=env, path=str(run_dir))
        return child

    async def connect(self, replica: Replica, key: Key) -> ResponsesWSClient:
        client = await within(
            ResponsesWSClient.connect(reactor, replica.ws_url, key.headers),
            f"a WebSocket to {replica.name}",
        )
        self.clients.append(client)
        return client

    async def scrape(self, replica: Replica) -> Samples:
        """``GET /metrics`` of ``replica`` (with the admin token), as {(sample, labels): value}."""

        async def get() -> bytes:
            response = await treq.get(
                replica.http_url + "/metrics",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                pool=self.pool,
            )
            body: bytes = await treq.content(response)
            assert response.code == 200, body
            return body

        body = await within(Deferred.fromCoroutine(get()), f"{replica.name}'s metrics")
        samples: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def redis_key(self, key: Key, name: str) -> str:
        """The Redis key of ``key``'s ``name`` ("requests", "turns", …), as the replicas write it
        (cch/cluster/limits.py)."""
        return f"{self.prefix}{{{key.name}}}:{name}"

    async def close(self) -> None:
        """Drop every client still connected, then kill and reap every replica still running."""
        try:
            for client in self.clients:
                if client.close_info is None:
                    await within(client.abort(), "a client socket to close")
        finally:
            for replica in self.replicas:
                replica.signal("KILL")
            for replica in self.replicas:
                await replica.ended()
            await self.pool.closeCachedConnections()


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
