"""Two gateways with ``[cluster] redis`` on one Redis share response-id ownership (issue 15): a
response created through one is refused to another key through the other, even before (or
without) any ledger database; with Redis unreachable and no database to ask, a continuation is
refused rather than risked. ``/readyz`` reports Redis and the usage database. Real gateways on
127.0.0.1 in front of the fake upstream, the machine's Redis (and a proxy to cut it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from conftest import eventually, within
from test_ownership_e2e import (
    ALICE,
    BOB,
    Harness,
    connect,
    create,
    created_id,
    forwarded,
    keyed,
    not_found_event,
    post_body,
    turn,
)
from twisted.internet import reactor

from cch.cluster.testing import (
    RedisProxy,
    TestRedis,
)
from cch.config import ClusterConfig, Config, UsageConfig
from cch.testing import FakeUpstream


@pytest_twisted.async_yield_fixture
async def harness() -> Any:
    h = Harness()
    yield h
    await h.close()


def clustered(fake: FakeUpstream, url: str, prefix: str, replica: str, **overrides: Any) -> Config:
    return keyed(fake, cluster=ClusterConfig(redis=url, key_prefix=prefix, replica=replica), **overrides)


async def readyz(running: Any) -> tuple[int, Any]:
    response = await treq.get(running.http_url + "/readyz", reactor=reactor, persistent=False)
    return response.code, json.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_a_response_made_through_one_replica_is_refused_to_another_key_through_the_next(
    fake: FakeUpstream, redis_url: str, redis: TestRedis, harness: Harness
) -> None:
    # No ledger database at all (the conftest's "off"): Redis alone tells the replicas apart.
    one = await harness.start(clustered(fake, redis_url, redis.prefix, "one"))
    two = await harness.start(clustered(fake, redis_url, redis.prefix, "two"))
    status, response = await harness.post(one, ALICE, post_body(input="alice's secret"))
    assert status == 200
    rid = response["id"]
    alice = await connect(one, ALICE)
    ws_rid = created_id(await turn(alice, one, create()))
    assert await redis.execute("GET", f"{redis.prefix}owner:{rid}") == "alice"
    assert two.service.ledger.recent.get(rid) is None  # two never saw it
    seen = len(fake.requests)

    status, refused = await harness.post(two, BOB, post_body(previous_response_id=rid, input="show me"))
    assert (status, refused) == (400, {"error": not_found_event(rid)["error"]})
    bob = await connect(two, BOB)
    assert await turn(bob, two, create(previous_response_id=ws_rid)) == [not_found_event(ws_rid)]
    assert len(fake.requests) == seen and forwarded(fake, rid) == [] and forwarded(fake, ws_rid) == []

    # Alice continues through two from what she made through one.
    status, response = await harness.post(two, ALICE, post_body(previous_response_id=rid))
    assert (status, response["status"]) == (200, "completed")
    assert len(forwarded(fake, rid)) == 1


@pytest_twisted.ensureDeferred
async def test_with_redis_unreachable_and_no_database_a_continuation_is_refused_not_risked(
    fake: FakeUpstream, redis_url: str, redis: TestRedis, proxy: RedisProxy, harness: Harness
) -> None:
    one = await harness.start(clustered(fake, redis_url, redis.prefix, "one"))
    two = await harness.start(clustered(fake, proxy.url, redis.prefix, "two"))
    await eventually(lambda: two.service.cluster.redis.up, "two to reach Redis")
    status, response = await harness.post(one, ALICE, post_body())
    rid = response["id"]
    await proxy.stop()
    await eventually(lambda: not two.service.cluster.redis.up, "two to lose Redis")
    seen = len(fake.requests)
    # Neither Redis nor a database can say whose it is: even its owner is refused (Codex
    # then resends the whole context), never a stranger let through.
    for key in (BOB, ALICE):
        status, refused = await harness.post(two, key, post_body(previous_response_id=rid))
        assert (status, refused) == (400, {"error": not_found_event(rid)["error"]})
    assert len(fake.requests) == seen
    proxy.start()
    await eventually(lambda: two.service.cluster.redis.up, "two to reach Redis again")
    status, response = await harness.post(two, ALICE, post_body(previous_response_id=rid))
    assert (status, response["status"]) == (200, "completed")


@pytest_twisted.ensureDeferred
async def test_with_redis_unreachable_the_database_still_knows_the_owner(
    fake: FakeUpstream, redis_url: str, redis: TestRedis, proxy: RedisProxy, harness: Harness, tmp_path: Path
) -> None:
    usage = UsageConfig(database="sqlite:///usage.sqlite3")
    one = await harness.start(clustered(fake, proxy.url, redis.prefix, "one", usage=usage), tmp_path)
    await eventually(lambda: one.service.cluster.redis.up, "one to reach Redis")
    status, response = await harness.post(one, ALICE, post_body())
    rid = response["id"]
    await within(one.service.ledger.flush(), "the ledger to write the owner")
    await harness.stop(one)
    await proxy.stop()
    again = await harness.start(clustered(fake, proxy.url, redis.prefix, "again", usage=usage), tmp_path)
    assert again.service.ledger.recent.get(rid) is None and not again.service.cluster.redis.up
    status, refused = await harness.post(again, BOB, post_body(previous_response_id=rid))
    assert (status, refused) == (400, {"error": not_found_event(rid)["error"]})
    status, response = await harness.post(again, ALICE, post_body(previous_response_id=rid))
    assert (status, response["status"]) == (200, "completed")


@pytest_twisted.ensureDeferred
async def test_readyz_reports_redis_and_the_database_and_stays_ready_while_they_are_down(
    fake: FakeUpstream, redis: TestRedis, proxy: RedisProxy, harness: Harness, tmp_path: Path
) -> None:
    usage = UsageConfig(database="sqlite:///usage.sqlite3")
    running = await harness.start(clustered(fake, proxy.url, redis.prefix, "one", usage=usage), tmp_path)
    await eventually(lambda: running.service.cluster.redis.up, "Redis to connect")
    await eventually(lambda: running.service.ledger.database_state == "up", "the database to start")
    assert await readyz(running) == (200, {"status": "ready", "redis": "up", "database": "up"})
    await proxy.stop()
    await eventually(lambda: not running.service.cluster.redis.up, "Redis to be lost")
    # Every replica shares Redis: out of rotation they would all go at once. Reported, not failed.
    assert await readyz(running) == (200, {"status": "ready", "redis": "down", "database": "up"})
    proxy.start()
    await eventually(lambda: running.service.cluster.redis.up, "Redis to come back")
    assert (await readyz(running))[1]["redis"] == "up"
    running.service.drain.start()
    assert await readyz(running) == (503, {"status": "draining", "redis": "up", "database": "up"})


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_reads_down_on_readyz(fake: FakeUpstream, harness: Harness) -> None:
    # A PostgreSQL URL on a port nothing listens on: the ledger's first start fails.
    usage = UsageConfig(database="postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    running = await harness.start(keyed(fake, usage=usage))
    await eventually(lambda: running.service.ledger.database_state == "down", "the start to fail", seconds=20)
    assert await readyz(running) == (200, {"status": "ready", "redis": "off", "database": "down"})


