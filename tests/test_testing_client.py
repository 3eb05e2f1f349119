"""cch.testing.client's ``deflate`` option against a real gateway on 127.0.0.1:0 (in front of
the fake upstream): it offers permessage-deflate as the OpenAI Python SDK and Codex do, so tests
that use it see what those clients get, and it changes the bytes on the wire, not the events."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from conftest import (
    RunningGateway,
    eventually,
    gateway_config,
    response_create,
    start_gateway,
    within,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient

INSTRUCTIONS = "You are Codex, a coding agent. Follow the repository's conventions. " * 40


async def connect(running: RunningGateway, **options: Any) -> ResponsesWSClient:
    client = await within(ResponsesWSClient.connect(reactor, running.ws_url, **options), "the upgrade")
    running.clients.append(client)  # so RunningGateway.stop closes it if the test fails first
    return client


def offered(running: RunningGateway) -> list[str | None]:
    """The Sec-WebSocket-Extensions header of each open connection, as the gateway read it."""
    return [proto.http_headers.get("sec-websocket-extensions") for proto in running.service.edge_factory.live]


async def one_turn(client: ResponsesWSClient) -> list[Any]:
    client.send_json(response_create(instructions=INSTRUCTIONS))
    return await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")


@pytest_twisted.ensureDeferred
async def test_deflate_is_offered_only_when_asked_and_changes_the_wire_not_the_events(
    fake: FakeUpstream,
) -> None:
    running = await start_gateway(gateway_config(fake))
    try:
        plain = await connect(running)
        assert offered(running) == [None]  # connect() alone offers no extension
        assert plain.deflate is None
        plain_events = await one_turn(plain)
        assert (await plain.close()).code == 1000
        await eventually(lambda: not running.service.edge_factory.live, "the gateway to drop it")

        deflated = await connect(running, deflate=True)
        assert offered(running) == ["permessage-deflate; client_max_window_bits"]  # the SDK's offer
        assert deflated.deflate is not None
        assert (deflated.deflate.server_max_window_bits, deflated.deflate.client_max_window_bits) == (15, 15)
        events = await one_turn(deflated)
        assert (await deflated.close()).code == 1000

        assert events[-1]["type"] == "response.completed"
        # The same events, but for the upstream's response id (one per turn).
        first_id, second_id = plain_events[-1]["response"]["id"], events[-1]["response"]["id"]
        assert json.loads(json.dumps(events).replace(second_id, first_id)) == plain_events
        assert [r.body["instructions"] for r in fake.requests] == [INSTRUCTIONS, INSTRUCTIONS]
        assert deflated.bytes_received < plain.bytes_received / 2
        assert deflated.bytes_sent < plain.bytes_sent / 2
    finally:
        await running.stop()
