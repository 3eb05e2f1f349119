"""The service as its user sees it: the children it is composed of, and a stop that drains
first (readiness 503, upgrades refused, idle clients 1001, turns in flight finish) and only
then stops the upstream pool, the upstream connections and the listeners, leaving no port, no
socket and no timer behind (docs/operations.md#draining-and-rolling-deploys)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import RunningGateway, eventually, gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import HTTPConnectionPool

from cch.config import ServerConfig
from cch.drain import Drain
from cch.service import makeService
from cch.testing import FakeUpstream
from cch.testing.scripts import SSE_HEADERS, Delay, Event, Script

CREATED = {"type": "response.created", "response": {"id": "resp_s"}}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_s"}}
UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
LOOPBACK = "tcp:0:interface=127.0.0.1"

Get = Callable[..., Awaitable[tuple[int, Any]]]


@pytest_twisted.async_yield_fixture
async def get() -> AsyncIterator[Get]:
    """``await get(url, headers=...)`` -> (status, JSON body), on a pool closed at the end."""
    pool = HTTPConnectionPool(reactor, persistent=False)

    async def go(url: str, **kwargs: Any) -> tuple[int, Any]:
        response = await treq.get(url, pool=pool, **kwargs)
        return response.code, await treq.json_content(response)

    yield go
    await pool.closeCachedConnections()


def names(service: Any) -> list[str]:
    return [child.name for child in service]


def test_children_are_the_upstream_parts_then_the_listener_in_start_order(fake: FakeUpstream) -> None:
    service = makeService(gateway_config(fake), MemoryReactorClock(), Clock())
    assert names(service) == ["usage-ledger", "upstream-ws-pool", "upstream-http", "listener"]


def test_the_http_tunnel_and_the_metrics_listener_are_children_when_configured(fake: FakeUpstream) -> None:
    config = gateway_config(fake, tunnel="http", server=ServerConfig(listen=LOOPBACK, metrics_listen=LOOPBACK))
    service = makeService(config, MemoryReactorClock(), Clock())
    assert names(service) == ["usage-ledger", "upstream-ws-pool", "upstream-http", "tunnel", "listener", "metrics-listener"]


async def refused(port: int) -> bool:
    """Whether a TCP connection to ``port`` on loopback is refused (nothing listens there)."""
    try:
        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
    except ConnectionRefusedError:
        return True
    protocol.transport.loseConnection()  # type: ignore[union-attr]
    return False


def drain_config(fake: FakeUpstream, tunnel_mode: str) -> Any:
    return gateway_config(
        fake,
        tunnel=tunnel_mode,
        upstream="websocket",
        server=ServerConfig(listen=LOOPBACK, metrics_listen=LOOPBACK, drain_timeout=30),
    )


@pytest_twisted.ensureDeferred
async def test_stop_drains_before_the_pool_and_the_listeners_stop_and_leaves_nothing(
    fake: FakeUpstream, tunnel_mode: str, get: Get
) -> None:
    upstream_clock, gateway_clock = Clock(), Clock()
    fake.clock = upstream_clock
    fake.enqueue(Script(steps=(Event(CREATED), Delay(5), Event(COMPLETED)), headers=SSE_HEADERS))
    sockets_before = set(reactor.getReaders()) | set(reactor.getWriters())
    running: RunningGateway = await start_gateway(drain_config(fake, tunnel_mode), gateway_clock)
    service = running.service
    ports = [service.listener.port.getHost().port]  # type: ignore[union-attr]
    assert service.metrics_listener is not None and service.metrics_listener.port is not None
    ports.append(service.metrics_listener.port.getHost().port)  # type: ignore[attr-defined]
    idle = await running.connect()
    busy = await running.connect()
    busy.send_json({"type": "response.create", "model": "m", "input": []})
    assert (await busy.recv())["type"] == "response.created"

    stopping = service.stopService()
    closed = await within(idle.wait_closed(), "the idle client's close")
    assert (closed.code, closed.reason) == (1001, "going_away")
    # Draining, not stopped: the listener answers (no new work), the pool holds the busy socket.
    assert await get(running.http_url + "/readyz") == (503, {"status": "draining", "redis": "off", "database": "off"})
    status, body = await get(running.http_url + "/v1/responses", headers=UPGRADE_HEADERS)
    assert (status, body["error"]["code"]) == (503, "draining")
    assert service.ws_pool.running and len(service.ws_pool.sockets) == 1
    assert not stopping.called

    upstream_clock.advance(5)
    assert (await busy.recv())["type"] == "response.completed"
    closed = await within(busy.wait_closed(), "the busy client's close after its turn")
    assert (closed.code, closed.reason) == (1001, "going_away")
    await within(stopping, "stopService")

    assert not service.running and not any(child.running for child in service)
    assert [await refused(port) for port in ports] == [True, True]
    assert service.edge_factory.live == set() and service.ws_pool.sockets == set()
    await within(fake.wait_for_idle(), "the upstream to see every gateway socket gone")
    await eventually(
        lambda: set(reactor.getReaders()) | set(reactor.getWriters()) <= sockets_before, "every gateway socket closed"
    )
    assert gateway_clock.getDelayedCalls() == []


def test_a_drain_tells_whoever_waits_once_when_it_starts() -> None:
    drain = Drain()
    told: list[None] = []
    drain.wait().addCallback(told.append)
    assert not drain.draining and told == []
    drain.start()
    drain.start()  # a second start (a second SIGTERM) changes nothing
    assert drain.draining and told == [None]
    assert drain.wait().called  # whoever asks once it has started is told at once


def test_a_cancelled_wait_is_forgotten() -> None:
    drain = Drain()
    d = drain.wait()
    d.cancel()
    with pytest.raises(CancelledError):
        d.result.raiseException()
    d.addErrback(lambda _: None)
    drain.start()  # nothing left to tell: no AlreadyCalledError


def test_a_reset_drain_welcomes_work_until_it_starts_again() -> None:
    drain = Drain()
    drain.start()
    drain.reset()  # the service started again
    assert not drain.draining
    again = drain.wait()
    assert not again.called
    drain.start()
    assert again.called
