"""The keyed targets' checks, and the cluster target's Redis.

``pooled-ws-limits`` and ``pooled-ws-cluster`` run the gateway with one client key whose limits
are counted on every turn (``benchmarks.processes.KEY_LIMITS``): in memory, and in Redis. A
number measured on a gateway that fell back to local limits, or refused turns, would not be
the cost of Redis: after its scenarios each keyed gateway's ``/metrics`` is read and
:func:`limits_problems` says what is wrong with it (the runner fails the run on any).

:class:`BenchRedis` is the runner's own connection to that Redis (the project's client,
``cch.cluster.redis``): it finds the server's pid (its CPU is measured beside the gateway's),
hands each gateway process a key prefix of its own (``cchbench:<random>:``) and deletes the
prefix once that gateway has stopped. Only a runner killed outright leaves keys behind; every
key the gateway writes carries a TTL (the longest, a response id's owner, a day).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
# Redis round trips a turn's limits take: one script admits it, one finishes it. (Whatever
# else [cluster] shares per turn comes on top.)
COMMANDS_PER_TURN = 2
# Counters of cch.cluster whose growth means Redis failed somewhere: any sample of a cch_redis_*
# or cch_cluster_* family with one of these words in its name must stay 0.
_FAILURE_WORDS = ("error", "failure", "fallback", "outage")


def shown_url(url: str) -> str:
    """``url`` as results and messages show it: without a password."""
    from cch.cluster.redis import RedisAddress

    try:
        return str(RedisAddress.from_url(url))
    except ValueError:
        return "<not a redis:// URL>"


class MetricsUnavailable(Exception):
    """The gateway's /metrics could not be read."""


def samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page: ``name`` or ``name{a="x",b="y"}`` → value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def total(found: Mapping[str, float], name: str) -> float | None:
    """The sum of the samples called ``name`` (over all labels); None if there is none."""
    values = [v for k, v in found.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


async def scrape(reactor: Any, port: int, token: str, timeout: float = 10.0) -> dict[str, float]:
    """GET /metrics of the gateway on 127.0.0.1:``port`` with the admin token."""
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, connectTimeout=timeout)
    headers = Headers({b"authorization": [f"Bearer {token}".encode()]})
    request = agent.request(b"GET", f"http://127.0.0.1:{port}/metrics".encode(), headers)
    response = await request.addTimeout(timeout, reactor)
    body = await readBody(response).addTimeout(timeout, reactor)
    if response.code != 200:
        raise MetricsUnavailable(f"GET /metrics answered {response.code}: {body[:200]!r}")
    return samples(body.decode("utf-8"))


def limits_check(found: Mapping[str, float], *, cluster: bool) -> dict[str, Any]:
    """What a keyed gateway's /metrics says about its limits, and its ``problems`` (none: the
    numbers are what the target claims to measure)."""
    turns = total(found, "cch_turns_started_total") or 0.0
    commands = total(found, "cch_redis_commands_total")
    check: dict[str, Any] = {
        "turns_started": turns,
        "key_refusals": total(found, "cch_key_refusals_total") or 0.0,
        "redis_commands": commands,
        "redis_commands_per_turn": commands / turns if commands is not None and turns else None,
        "redis_errors": total(found, "cch_redis_errors_total"),
        "redis_up": total(found, "cch_redis_up"),
        "cluster_fallbacks": total(found, "cch_cluster_fallbacks_total"),
        "cluster_redis_outages": total(found, "cch_cluster_redis_outages_total"),
        "lease_renewal_failures": total(found, "cch_cluster_lease_renewal_failures_total"),
        "redis_down": total(found, "cch_cluster_redis_down"),
        # every other failure counter of the cluster (e.g. owner writes Redis did not take)
        "other_failures": {
            name: value
            for name, value in sorted(found.items())
            if name.startswith(("cch_redis_", "cch_cluster_"))
            and any(word in name.split("{")[0] for word in _FAILURE_WORDS)
            and value
        },
    }
    check["problems"] = limits_problems(check, cluster=cluster)
    return check


def limits_problems(check: Mapping[str, Any], *, cluster: bool) -> list[str]:
    """Why the figures of :func:`limits_check` do not show limits counted as the target says."""
    problems = []
    turns = check["turns_started"]
    if not turns:
        problems.append("no turns started (cch_turns_started_total is 0)")
    if check["key_refusals"]:
        problems.append(
            f"the key's limits refused {check['key_refusals']:.0f} connections or turns"
        )
    commands = check["redis_commands"]
    if not cluster:
        if commands is not None:
            problems.append(
                "the local-limits gateway talks to Redis (cch_redis_commands_total is there)"
            )
        return problems
    if commands is None:
        problems.append("no cch_redis_* metrics: the gateway does not keep its limits in Redis")
        return problems
    if commands < COMMANDS_PER_TURN * turns:
        problems.append(
            f"{commands:.0f} Redis commands for {turns:.0f} turns: fewer than the "
            f"{COMMANDS_PER_TURN} per turn that counting them in Redis takes"
        )
    for name, what in (
        ("redis_errors", "Redis commands failed"),
        ("cluster_fallbacks", "connections or turns were answered without Redis (fallback)"),
        ("cluster_redis_outages", "Redis outages were seen"),
        ("lease_renewal_failures", "lease renewals failed"),
    ):
        if check[name]:
            problems.append(f"{check[name]:.0f} {what}")
    if check["redis_up"] != 1:
        problems.append("cch_redis_up is not 1 at the end of the run")
    if check["redis_down"]:
        problems.append("cch_cluster_redis_down is 1: limits are being answered without Redis")
    named = ("cch_redis_errors", "cch_cluster_fallbacks", "cch_cluster_redis_outages")
    named += ("cch_cluster_lease_renewal_failures",)
    for name, value in check["other_failures"].items():
        if not name.startswith(named):
            problems.append(f"{name} = {value:.0f}")
    return problems


class BenchRedis:
    """The runner's connection to the cluster target's Redis at ``url``."""

    def __init__(self, reactor: Any, url: str) -> None:
        from cch.cluster.redis import RedisAddress, RedisConnection

        self.url = url
        self.shown = shown_url(url)
        self.connection = RedisConnection(RedisAddress.from_url(url), reactor)
        self.pid: int | None = None
        self.cleaned: dict[str, int] = {}  # key prefix → keys deleted

    async def open(self) -> None:
        """Connect and find the server's pid (None unless it is a redis-server on this host:
        Redis may run in another pid namespace, where its process_id names someone else)."""
        self.connection.startService()
        info = await self.connection.execute("INFO", "server")
        for line in str(info).splitlines():
            if line.startswith("process_id:"):
                pid = int(line.split(":", 1)[1])
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = ""
                self.pid = pid if name.startswith("redis") else None

    @staticmethod
    def new_prefix() -> str:
        """A ``[cluster] key_prefix`` for one gateway process."""
        return f"cchbench:{secrets.token_hex(6)}:"

    async def clean(self, prefix: str) -> int:
        """Delete every key under ``prefix``; how many there were."""
        from cch.cluster.testing import delete_prefix

        deleted = await delete_prefix(self.connection, prefix)
        self.cleaned[prefix] = deleted
        return deleted

    async def close(self) -> None:
        await self.connection.stopService()


def redis_problem(url: str) -> str | None:
    """Why the cluster target cannot run against ``url`` (None: Redis answers PING)."""
    from cch.cluster.testing import redis_problem as problem

    return problem(url)
