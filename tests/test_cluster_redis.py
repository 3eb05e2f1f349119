"""The connection to Redis (cch/cluster/redis.py): commands and scripts, a clear error while
Redis is down, reconnecting after Redis drops the client, and nothing left behind (no
connection, no DelayedCall) after stopService. Against the machine's Redis, as
tests/test_cluster_limits.py says."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from cch.cluster.redis import RedisAddress, RedisConnection, RedisError, RedisUnavailable, Script
from cch.cluster.testing import (
    RedisProxy,
    TestRedis,
)


async def eventually(check: Any, what: str, seconds: float = 10.0) -> None:
    deadline = global_reactor.seconds() + seconds
    while not await check():
        if global_reactor.seconds() > deadline:
            pytest.fail(f"never happened: {what}")
        await deferLater(global_reactor, 0.01, lambda: None)


async def client_ids(redis: TestRedis) -> set[int]:
    """The ids of every client connected to Redis now."""
    listing = await redis.execute("CLIENT", "LIST")
    return {int(field.removeprefix("id=")) for line in listing.splitlines() for field in line.split() if field.startswith("id=")}


def connection(url: str, **options: Any) -> RedisConnection:
    redis = RedisConnection(RedisAddress.from_url(url), global_reactor, **options)
    redis.startService()
    return redis


# -- commands --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_commands_answer_with_redis_replies_as_sent(redis: TestRedis) -> None:
    key = redis.prefix + "k"
    assert await redis.execute("SET", key, "1.50") == "OK"
    assert await redis.execute("GET", key) == "1.50"  # no number conversion
    assert await redis.execute("INCRBY", redis.prefix + "n", 2) == 2
    assert await redis.execute("GET", redis.prefix + "missing") is None
    assert redis.up


@pytest_twisted.ensureDeferred
async def test_a_refused_command_is_a_redis_error_with_its_reply_not_unavailable(redis: TestRedis) -> None:
    await redis.execute("SET", redis.prefix + "s", "x")
    with pytest.raises(RedisError) as info:
        await redis.execute("LPUSH", redis.prefix + "s", "y")
    assert not isinstance(info.value, RedisUnavailable)
    assert info.value.reply.startswith("WRONGTYPE")
    assert redis.errors["refused"] == 1


@pytest_twisted.ensureDeferred
async def test_a_script_unknown_to_redis_is_loaded_and_run(redis: TestRedis) -> None:
    script = Script("echo", f"-- {redis.prefix}\nreturn {{KEYS[1], ARGV[1], 7}}")
    assert await redis.execute("SCRIPT", "EXISTS", script.sha) == [0]
    assert await redis.run(script, ["k"], ["v"]) == ["k", "v", 7]
    assert redis.script_loads == 1
    assert await redis.run(script, ["k"], ["w"]) == ["k", "w", 7]
    assert redis.script_loads == 1  # known now: EVALSHA alone


@pytest_twisted.ensureDeferred
async def test_address_and_messages_never_show_the_password(proxy: RedisProxy) -> None:
    address = RedisAddress.from_url("redis://user:s%40cret@127.0.0.1:1/3")
    assert (address.username, address.password, address.db) == ("user", "s@cret", 3)
    assert "s@cret" not in repr(address) and "cret" not in str(address)
    await proxy.stop()
    redis = connection(f"redis://:s3cret@127.0.0.1:{proxy.port}/0", connect_timeout=0.05)
    try:
        await deferLater(global_reactor, 0.1, lambda: None)
        with pytest.raises(RedisUnavailable) as info:
            await redis.execute("PING")
        assert "s3cret" not in str(info.value)
        assert str(info.value).startswith(f"redis://127.0.0.1:{proxy.port}/0: ")
    finally:
        await redis.stopService()


# -- outages and reconnects ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_at_once_with_redis_unavailable(proxy: RedisProxy) -> None:
    await proxy.stop()
    redis = connection(proxy.url, connect_timeout=0.2)
    try:
        # In the first connect_timeout a command waits for the first connection...
        started = global_reactor.seconds()
        with pytest.raises(RedisUnavailable):
            await redis.execute("PING")
        assert global_reactor.seconds() - started < 2.5
        # ...after it, a command fails without waiting.
        started = global_reactor.seconds()
        with pytest.raises(RedisUnavailable, match="not connected"):
            await redis.execute("PING")
        assert global_reactor.seconds() - started < 0.05
        assert not redis.up
    finally:
        await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_reconnects_after_redis_drops_the_client(redis: TestRedis, redis_url: str) -> None:
    connects: list[int] = []
    victim = connection(redis_url, reconnect_delay=0.05)
    victim.on_connect(lambda: connects.append(1))
    try:
        own_id = int(await victim.execute("CLIENT", "ID"))
        assert connects == [1]
        assert await redis.execute("CLIENT", "KILL", "ID", own_id) == 1
        await eventually(lambda: _fails(victim), "a command failing while the client is gone", 5)
        await eventually(lambda: _answers(victim), "the connection made again")
        assert int(await victim.execute("CLIENT", "ID")) != own_id
        assert len(connects) == 2 and victim.connects == 2
        assert own_id not in await client_ids(redis)
    finally:
        await victim.stopService()


async def _fails(redis: TestRedis) -> bool:
    try:
        await redis.execute("PING")
    except RedisUnavailable:
        return True
    return False


async def _answers(redis: TestRedis) -> bool:
    try:
        return await redis.execute("PING") == "PONG"
    except RedisUnavailable:
        return False


@pytest_twisted.ensureDeferred
async def test_redis_stopped_and_started_again_is_reconnected_by_itself(proxy: RedisProxy) -> None:
    redis = connection(proxy.url, reconnect_delay=0.05, max_reconnect_delay=0.2)
    try:
        assert await redis.execute("PING") == "PONG"
        await proxy.stop()
        with pytest.raises(RedisUnavailable):
            await redis.execute("PING")
        await deferLater(global_reactor, 0.3, lambda: None)  # a few refused reconnects
        assert not redis.up
        proxy.start()
        await eventually(lambda: _answers(redis), "the connection made again")
        assert redis.up and redis.connects == 2
    finally:
        await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_no_reply_in_time_is_unavailable() -> None:
    class Silent(Protocol):
        pass

    port = global_reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    redis = connection(f"redis://127.0.0.1:{port.getHost().port}/0", timeout=0.1, connect_timeout=0.1)
    try:
        with pytest.raises(RedisUnavailable, match="no reply within 0.1s|not connected"):
            await redis.execute("PING")
    finally:
        await redis.stopService()
        await port.stopListening()


# -- stopping ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_connection_and_leaves_no_delayed_call(redis: TestRedis, redis_url: str) -> None:
    other = connection(redis_url)
    own_id = int(await other.execute("CLIENT", "ID"))
    assert own_id in await client_ids(redis)
    await other.stopService()
    assert not other.up
    await eventually(lambda: _gone(redis, own_id), "the client gone from CLIENT LIST", 5)
    with pytest.raises(RedisUnavailable, match="not started"):
        await other.execute("PING")
    # The autouse no_leaks fixture (tests/conftest.py) fails the test on a DelayedCall left.


async def _gone(redis: RedisConnection, client: int) -> bool:
    return client not in await client_ids(redis)


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_the_replies_of_commands_in_flight(redis: TestRedis, redis_url: str) -> None:
    other = connection(redis_url)
    assert await other.execute("PING") == "PONG"
    sent = [other.execute("INCRBY", redis.prefix + "n", 1) for _ in range(200)]
    stopped = other.stopService()
    with pytest.raises(RedisUnavailable, match="not started"):
        await other.execute("PING")  # nothing new once stopping
    await stopped
    assert [await d for d in sent] == list(range(1, 201))
    assert await redis.execute("GET", redis.prefix + "n") == "200"


@pytest_twisted.ensureDeferred
async def test_stop_while_reconnecting_leaves_no_delayed_call(proxy: RedisProxy) -> None:
    redis = connection(proxy.url, reconnect_delay=5.0, max_reconnect_delay=5.0)
    assert await redis.execute("PING") == "PONG"
    await proxy.stop()
    await deferLater(global_reactor, 0.05, lambda: None)  # the retry is now waiting 5 s
    assert any(call.getTime() > global_reactor.seconds() + 1 for call in global_reactor.getDelayedCalls())
    await redis.stopService()
    assert not [call for call in global_reactor.getDelayedCalls() if call.getTime() > global_reactor.seconds() + 1]


@pytest_twisted.ensureDeferred
async def test_stop_before_any_connection_leaves_nothing(proxy: RedisProxy) -> None:
    await proxy.stop()
    redis = connection(proxy.url)
    await redis.stopService()
    assert not redis.running and not redis.up


# -- the adapter ------------------------------------------------------------------------------


def test_the_txredisapi_internals_the_connection_uses_are_there() -> None:
    import txredisapi

    factory = txredisapi.RedisFactory("h:1", 0, 1, isLazy=True, handler=txredisapi.ConnectionHandler, convertNumbers=False)
    for name in ("initialDelay", "maxDelay", "size", "pool", "handler", "startConnecting", "disconnect", "addConnection"):
        assert hasattr(factory, name), name
    assert factory.size == 0 and factory.pool == []
    assert issubclass(txredisapi.TimeoutError, txredisapi.ConnectionError)
    assert hasattr(txredisapi, "ResponseError")
    assert callable(txredisapi.BaseRedisProtocol.execute_command)
