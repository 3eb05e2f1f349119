"""Graceful drain on stop: idle clients get 1001 at once, turns in flight finish until the
deadline, then everyone gets 1001 and HTTP POST turns end with the ``draining`` error
(docs/operations.md#draining-and-rolling-deploys); nothing is left behind."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from conftest import gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from cch.config import ServerConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import Delay, Event, Hold, Script, hold

CREATED = {"type": "response.created", "response": {"id": "resp_d"}}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_d"}}
SSE = (("content-type", "text/event-stream"),)
DRAINING = {
    "type": "error",
    "error": {"type": "service_unavailable_error", "code": "draining", "message": "The gateway is shutting down."},
}


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
    assert running.service.drain.draining
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



def sse_events(body: bytes) -> list[Any]:
    return [
        json.loads(block.removeprefix("data: "))
        for block in body.decode("utf-8").split("\n\n")
        if block.startswith("data: ")
    ]


def http_turns(running: Any, outcome: str) -> float | None:
    return running.service.metrics.registry.get_sample_value("cch_http_turns_total", {"outcome": outcome})


@pytest_twisted.ensureDeferred
async def test_http_post_stream_still_running_at_the_drain_deadline_ends_with_a_draining_error_event(
    fake: FakeUpstream,
) -> None:
    gateway_clock = Clock()
    fake.enqueue(hold([CREATED]))
    running = await start_gateway(drain_config(fake, "in-process", "http", drain=30), gateway_clock)
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True}, pool=pool
        )
        assert response.code == 200
        body = treq.content(response)  # fails on a truncated body (no chunked terminator)
        stopping = running.service.stopService()
        gateway_clock.advance(29)
        assert not body.called and not fake.requests[0].finished
        gateway_clock.advance(1)
        assert sse_events(await within(body, "the end of the SSE stream")) == [CREATED, DRAINING]
        assert (await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")).cancelled
        await within(stopping, "stopService")
        assert running.service.handler.active == 0
        assert running.service.http_turns.live == set()
        assert http_turns(running, "cancelled") == 1
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_http_post_not_yet_answered_at_the_drain_deadline_gets_503_draining(fake: FakeUpstream) -> None:
    gateway_clock = Clock()
    fake.enqueue(Script(steps=(Hold(),)))  # never sends the response headers
    running = await start_gateway(drain_config(fake, "in-process", "http", drain=30), gateway_clock)
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        reply = treq.post(running.http_url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True}, pool=pool)
        await fake.wait_for_requests(1)
        stopping = running.service.stopService()
        gateway_clock.advance(30)
        response = await within(reply, "the answer")
        assert response.code == 503
        assert json.loads(await treq.content(response)) == {"error": {**DRAINING["error"]}}
        await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")
        await within(stopping, "stopService")
        assert running.service.handler.active == 0 and running.service.http_turns.live == set()
    finally:
        await pool.closeCachedConnections()
