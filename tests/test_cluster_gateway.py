"""Two gateways with ``[cluster] redis`` hold a key to one limit between them, and a gateway
that may not do without Redis (``on_redis_down = "refuse"``) refuses turns with a 503 while
it is down (issue 15; the three-process test is still to come)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest_twisted
import treq
from conftest import RunningGateway, gateway_config, start_gateway
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from cch.cluster.testing import close_test_redis, open_test_redis
from cch.config import ClientKey, ClusterConfig, KeyLimitsConfig
from cch.service import makeService
from cch.testing import FakeUpstream

KEY = "sk-cch-alice-0123456789abcdef"
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()


async def post(running: Any) -> tuple[int, dict[str, Any] | None, str | None]:
    """One HTTP turn on a connection of its own: status, JSON error body (if any), Retry-After."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json.dumps({"model": "m", "input": "hi"}).encode(),
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
            pool=pool,
        )
        content = await response.content()
        retry = response.headers.getRawHeaders("retry-after", [None])[0]
        body = json.loads(content) if response.code >= 400 else None
        return response.code, body, retry.decode() if isinstance(retry, bytes) else retry
    finally:
        await pool.closeCachedConnections()


def config(fake: FakeUpstream, redis: str, prefix: str, **cluster: Any) -> Any:
    key = ClientKey("alice", KEY, limits=KeyLimitsConfig(requests_per_minute=2))
    return gateway_config(
        fake, keys=(key,), cluster=ClusterConfig(redis=redis, key_prefix=prefix, replica="r", **cluster)
    )


@pytest_twisted.ensureDeferred
async def test_two_gateways_share_a_keys_requests_per_minute_through_redis(fake: FakeUpstream, redis_url: str) -> None:
    keys = open_test_redis(reactor)  # a prefix of this test's own, deleted after
    clock = Clock()
    clock.advance(NOW)
    first = await start_gateway(config(fake, redis_url, keys.prefix), clock)
    second = await start_gateway(config(fake, redis_url, keys.prefix), clock)
    try:
        assert (await post(first))[0] == 200
        assert (await post(second))[0] == 200
        # The minute's two requests were used, one on each gateway: both refuse the third.
        for running in (first, second):
            status, body, retry = await post(running)
            assert status == 429 and body is not None and body["error"]["code"] == "rate_limit_exceeded"
            assert retry == "60"
        assert len(fake.requests) == 2
        clock.advance(60)
        assert (await post(second))[0] == 200
    finally:
        await first.stop()
        await second.stop()
        await close_test_redis(keys)


@pytest_twisted.ensureDeferred
async def test_refuse_mode_answers_503_while_redis_is_unreachable(fake: FakeUpstream) -> None:
    clock = Clock()
    clock.advance(NOW)
    # Nothing listens on port 1: Redis is down from the start (and the gateway does not wait
    # the first connect_timeout for a first connection).
    service = makeService(config(fake, "redis://127.0.0.1:1/0", "cch-test-down:", on_redis_down="refuse"), reactor, clock)
    assert service.cluster is not None
    service.cluster.redis.connect_timeout = 0
    service.startService()
    await service.when_listening()
    running = RunningGateway(service)
    try:
        status, body, retry = await post(running)
        assert status == 503 and body is not None
        assert body["error"]["code"] == "cluster_unavailable" and body["error"]["type"] == "server_error"
        assert retry == "5"
        assert fake.requests == []
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_that_restarts_empty_gets_the_days_tokens_from_the_ledger_again(
    fake: FakeUpstream, redis_url: str, tmp_path: Any
) -> None:
    from conftest import eventually, within
    from test_limits_seed import row, write_rows

    from cch.cluster.testing import RedisProxy, delete_prefix
    from cch.config import UsageConfig

    database = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    await write_rows(database, [row("a", NOW - 60, 1000)])  # today's allowance, used before
    keys = open_test_redis(reactor)
    proxy = RedisProxy(reactor, redis_url)
    proxy.start()
    clock = Clock()
    clock.advance(NOW)
    key = ClientKey("alice", KEY, limits=KeyLimitsConfig(tokens_per_day=1000))
    cluster = ClusterConfig(redis=proxy.url, key_prefix=keys.prefix, replica="r")
    service = makeService(gateway_config(fake, keys=(key,), usage=UsageConfig(database=database), cluster=cluster), reactor, clock)
    assert service.cluster is not None
    redis = service.cluster.redis
    redis.reconnect_delay = redis.max_reconnect_delay = 0.05
    service.startService()
    await service.when_listening()
    running = RunningGateway(service)
    try:
        await within(service.seeded, "the first seeding")
        assert (await post(running))[0] == 429
        # Redis goes away and comes back empty: its day counter is gone.
        await proxy.stop()
        await delete_prefix(keys, keys.prefix)
        proxy.start()
        await eventually(lambda: redis.connects >= 2, "the gateway to reconnect to Redis")
        await within(service.seeded, "the seeding after the reconnect")
        status, body, _ = await post(running)
        assert status == 429 and body is not None and "1000 of 1000 tokens" in body["error"]["message"]
        assert fake.requests == []
    finally:
        await running.stop()
        await proxy.stop()
        await close_test_redis(keys)
