"""Server keepalive pings (``limits.auto_ping_*``, docs/configuration.md#limits), on the
gateway's clock."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import gateway_config, start_gateway
from twisted.internet.task import Clock

from cch.config import LimitsConfig
from cch.testing import FakeUpstream


def config(fake: FakeUpstream) -> Any:
    return gateway_config(fake, limits=LimitsConfig(auto_ping_interval=25, auto_ping_timeout=20))


@pytest_twisted.ensureDeferred
async def test_a_client_that_answers_pings_stays_connected_for_an_hour(fake: FakeUpstream) -> None:
    clock = Clock()
    running = await start_gateway(config(fake), clock)
    try:
        client = await running.connect()
        pongs = []
        protocol = client.protocol
        assert protocol is not None
        original = protocol.onPing

        def on_ping(payload: bytes) -> None:
            pongs.append(payload)
            original(payload)

        protocol.onPing = on_ping  # type: ignore[method-assign]
        for minute in range(60):
            clock.advance(60)
            client.send_json({"type": "response.create", "model": "m", "input": f"minute {minute}"})
            assert (await client.recv_turn())[-1]["type"] == "response.completed"
        assert len(pongs) >= 60 and client.close_info is None
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_silent_peer_is_dropped_and_cleaned_up(fake: FakeUpstream) -> None:
    clock = Clock()
    running = await start_gateway(config(fake), clock)
    try:
        client = await running.connect()
        protocol = client.protocol
        assert protocol is not None
        protocol.onPing = lambda payload: None  # type: ignore[method-assign]
        clock.advance(25)  # ping sent
        clock.advance(20)  # no pong: the gateway drops the peer
        info = await client.wait_closed()
        assert (info.code, info.was_clean) == (1006, False)
        await running.service.edge_factory.wait_empty()
        assert running.service.edge_factory.live == set()
    finally:
        await running.stop()
