"""Graceful drain on stop (DESIGN "beyond" 4): idle clients get 1001 at once, turns in flight
finish until the deadline, then everyone gets 1001; nothing is left behind."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import gateway_config, start_gateway
from twisted.internet.task import Clock

from cch.config import ServerConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import Delay, Event, Script, hold

CREATED = {"type": "response.created", "response": {"id": "resp_d"}}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_d"}}
SSE = (("content-type", "text/event-stream"),)


def frame() -> dict[str, Any]:
    return {"type": "response.create", "model": "m", "input": []}


def drain_config(fake: FakeUpstream, tunnel: str, upstream: str, drain: float = 30) -> Any:
    return gateway_config(
        fake,
        tunnel=tunnel,
        upstream=upstream,
        server=ServerConfig(listen="tcp:0:interface=127.0.0.1", drain_timeout=drain),
    )


@pytest_twisted.ensureDeferred
async def test_in_flight_turn_finishes_during_drain_while_idle_client_gets_1001(
    fake: FakeUpstream, tunnel_mode: str, upstream_transport: str
) -> None:
    upstream_clock, gateway_clock = Clock(), Clock()
    fake.clock = upstream_clock
    fake.enqueue(Script(steps=(Event(CREATED), Delay(5), Event(COMPLETED)), headers=SSE))
    running = await start_gateway(drain_config(fake, tunnel_mode, upstream_transport), gateway_clock)
    idle = await running.connect()
    busy = await running.connect()
    busy.send_json(frame())
    assert (await busy.recv())["type"] == "response.created"

    stopping = running.service.stopService()
    closed = await idle.wait_closed()
    assert (closed.code, closed.reason) == (1001, "going_away")
    assert running.service.gateway.draining
    assert busy.close_info is None

    busy.send_json(frame())  # queued behind the turn in flight: never started
    upstream_clock.advance(5)
    assert (await busy.recv())["type"] == "response.completed"
    closed = await busy.wait_closed()
    assert (closed.code, closed.reason) == (1001, "going_away")
    await stopping
    assert len(fake.requests) == 1
    assert running.service.handler.active == 0 and running.service.ws_pool.sockets == set()


@pytest_twisted.ensureDeferred
async def test_turns_still_running_at_the_drain_deadline_are_closed_1001(
    fake: FakeUpstream, tunnel_mode: str, upstream_transport: str
) -> None:
    gateway_clock = Clock()
    fake.enqueue(hold([CREATED]))
    running = await start_gateway(drain_config(fake, tunnel_mode, upstream_transport, drain=30), gateway_clock)
    client = await running.connect()
    client.send_json(frame())
    await client.recv()
    stopping = running.service.stopService()
    gateway_clock.advance(29)
    assert client.close_info is None
    gateway_clock.advance(1)
    closed = await client.wait_closed()
    assert (closed.code, closed.reason) == (1001, "going_away")
    await stopping
    await fake.wait_for_cancelled(0)
    assert running.service.handler.active == 0
