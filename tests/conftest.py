"""Shared fixtures: a real gateway on 127.0.0.1:0 in front of a real fake upstream, and a
check that every test leaves the reactor clean (no DelayedCall, no open connection)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from cch.cluster.testing import RedisProxy, close_test_redis, open_test_redis, require_redis
from cch.config import Config, LimitsConfig, ProviderConfig, ServerConfig, TunnelConfig, UsageConfig
from cch.service import GatewayService, makeService
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient

# Helper modules shared by several test files: their asserts show values when they fail.
pytest.register_assert_rewrite("upstream_ws_support", "doubles", "usage_fixtures")

SECRET = "0b7c5f1e-9a7d-4c55-8a43-2f8d6c1e9b10"


@pytest.fixture
def reactor() -> Any:
    return global_reactor


@pytest_twisted.async_yield_fixture
async def fake() -> Any:
    upstream = FakeUpstream(global_reactor)
    await upstream.listen(global_reactor)
    yield upstream
    await upstream.stop()


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis; the test skips (fails under CI=true) when it does not answer."""
    return require_redis()


@pytest_twisted.async_yield_fixture
async def redis(redis_url: str) -> Any:
    """A connection to it whose keys start with a prefix of this test's own, deleted after."""
    connection = open_test_redis(global_reactor, redis_url)
    yield connection
    await close_test_redis(connection)


@pytest_twisted.async_yield_fixture
async def proxy(redis_url: str) -> Any:
    """A proxy to that Redis that the test can stop (an outage) and start again."""
    cut = RedisProxy(global_reactor, redis_url)
    cut.start()
    yield cut
    await cut.stop()


def gateway_config(
    fake: FakeUpstream, *, tunnel: str = "in-process", upstream: str = "http", **overrides: Any
) -> Config:
    """One provider at ``fake``, reached over ``upstream`` ("http" or "websocket")."""
    websocket = "off" if upstream == "http" else "on"
    config = Config(
        server=ServerConfig(listen="tcp:0:interface=127.0.0.1"),
        providers=(ProviderConfig(name="primary", base_url=fake.base_url, websocket=websocket),),
        tunnel=TunnelConfig(mode=tunnel, secret=SECRET),
        limits=LimitsConfig(),
        # The ledger's own tests give it a database; elsewhere rows are counted and forgotten.
        usage=UsageConfig(database="off"),
        source="<test>",
    )
    return replace(config, **overrides)


class RunningGateway:
    """A started gateway plus helpers to reach it."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service
        self.clients: list[ResponsesWSClient] = []
        providers = service.config.providers
        self.upstream = "websocket" if providers and providers[0].websocket != "off" else "http"

    @property
    def http_url(self) -> str:
        return self.service.base_url

    @property
    def ws_url(self) -> str:
        return self.service.base_url.replace("http://", "ws://") + "/v1/responses"

    async def connect(self, query: str = "", headers: dict[str, str] | None = None) -> ResponsesWSClient:
        client = await ResponsesWSClient.connect(global_reactor, self.ws_url + query, headers)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            if client.close_info is None:
                await client.close()
        await self.service.stopService()
        # Nothing may be left in flight once every connection is gone.
        assert self.service.edge_factory.live == set()
        assert self.service.handler.active == 0
        assert self.service.ws_pool.sockets == set()


async def start_gateway(config: Config, clock: Any = None) -> RunningGateway:
    service = makeService(config, global_reactor, clock)
    service.startService()
    await service.when_listening()
    return RunningGateway(service)


@pytest.fixture(params=["in-process", "http"])
def tunnel_mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["http", "websocket"])
def upstream_transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest_twisted.async_yield_fixture
async def gateway(fake: FakeUpstream, tunnel_mode: str, upstream_transport: str) -> Any:
    """A running gateway, for every tunnel mode x upstream transport."""
    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode, upstream=upstream_transport))
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def http_gateway(fake: FakeUpstream, tunnel_mode: str) -> Any:
    """A running gateway reaching its upstream over HTTP only, for every tunnel mode."""
    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode, upstream="http"))
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def ws_gateway(fake: FakeUpstream, tunnel_mode: str) -> Any:
    """A running gateway reaching its upstream over WebSocket, for every tunnel mode."""
    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode, upstream="websocket"))
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture(autouse=True)
async def no_leaks() -> Any:
    """Fail a test that leaves a DelayedCall behind once its connections have closed."""
    before = set(global_reactor.getDelayedCalls())
    yield
    for _ in range(500):
        leftover = [c for c in global_reactor.getDelayedCalls() if c not in before and c.active()]
        if not leftover:
            return
        await deferLater(global_reactor, 0, lambda: None)
    pytest.fail(f"DelayedCalls left behind: {leftover!r}")


async def within(d: Deferred[Any], what: str, seconds: float = 10.0) -> Any:
    """``await d``, failing the test (not hanging it) if it has not fired in ``seconds``."""
    timer = global_reactor.callLater(seconds, d.cancel)
    try:
        return await d
    except CancelledError:
        pytest.fail(f"timed out waiting for {what}")
    finally:
        if timer.active():
            timer.cancel()


async def eventually(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Spin the reactor until ``check()`` holds (for state no event announces)."""
    deadline = global_reactor.seconds() + seconds
    while not check():
        if global_reactor.seconds() > deadline:
            pytest.fail(f"never happened: {what}")
        await deferLater(global_reactor, 0.002, lambda: None)


class LogWatch:
    """Within ``with``: ``seen`` fires (on the next reactor turn) at the first log event named
    ``name``, so the caller may advance a clock right after the code that logged it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: Deferred[dict[str, Any]] = Deferred()
        self.fired = False

    def __enter__(self) -> LogWatch:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        globalLogPublisher.removeObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format") == self.name and not self.fired:
            self.fired = True
            global_reactor.callLater(0, self.seen.callback, event)


def response_create(**fields: Any) -> dict[str, Any]:
    """A Codex-like ``response.create`` frame (``store: false``, one user message), with ``fields``."""
    frame: dict[str, Any] = {
        "type": "response.create",
        "model": "gpt-5.5",
        "store": False,
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    }
    frame.update(fields)
    return frame


def event_types(events: list[Any]) -> list[str]:
    return [e["type"] for e in events]
