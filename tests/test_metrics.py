"""GET /metrics: what operators watch, and who may read it."""

from __future__ import annotations

from dataclasses import replace

import pytest_twisted
import treq
from conftest import gateway_config, start_gateway
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, ServerConfig
from cch.testing import FakeUpstream

KEY = "sk-cch-alice-0123456789"


async def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.get(url, headers=headers, pool=pool)
        text = (await response.content()).decode()
    finally:
        await pool.closeCachedConnections()
    if response.code != 200:
        return response.code, {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return 200, samples


@pytest_twisted.ensureDeferred
async def test_a_turn_shows_up_in_the_metrics(fake: FakeUpstream, upstream_transport: str) -> None:
    running = await start_gateway(gateway_config(fake, upstream=upstream_transport))
    try:
        client = await running.connect()
        client.send_json({"type": "response.create", "model": "m", "input": "hi"})
        events = await client.recv_turn()
        client.send_bytes(b"\x00")
        await client.wait_closed()
        status, m = await scrape(running.http_url + "/metrics")
        assert status == 200
        assert m[("cch_turns_started_total", ())] == 1
        assert m[("cch_turns_completed_total", (("terminal", "response.completed"),))] == 1
        assert m[("cch_client_frames_total", (("direction", "out"),))] == len(events) + 1
        assert m[("cch_client_frames_total", (("direction", "in"),))] == 1
        assert m[("cch_client_closes_total", (("code", "1003"), ("reason", "binary_not_supported")))] == 1
        assert m[("cch_turn_seconds_count", ())] == 1
        assert m[("cch_time_to_first_event_seconds_count", ())] == 1
        assert m[("cch_upstream_attempts_total", (("transport", upstream_transport),))] == 1
        assert m[("cch_provider_breaker_state", (("provider", "primary"),))] == 0
        assert m[("cch_requests_in_progress", ())] == 0
        if upstream_transport == "websocket":
            assert m[("cch_upstream_ws_pool_events_total", (("event", "connects"),))] == 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_open_connections_gauge(fake: FakeUpstream) -> None:
    running = await start_gateway(gateway_config(fake))
    try:
        await running.connect()
        await running.connect()
        _, m = await scrape(running.http_url + "/metrics")
        assert m[("cch_client_connections", ())] == 2
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_metrics_on_the_main_port_need_the_admin_token_when_keys_are_set(fake: FakeUpstream) -> None:
    config = gateway_config(fake, keys=(ClientKey(name="alice", key=KEY),))
    config = replace(config, server=replace(config.server, admin_token="admin-token-0123"))
    running = await start_gateway(config)
    try:
        assert (await scrape(running.http_url + "/metrics"))[0] == 403
        assert (await scrape(running.http_url + "/metrics", {"authorization": f"Bearer {KEY}"}))[0] == 403
        assert (await scrape(running.http_url + "/metrics", {"authorization": "Bearer admin-token-0123"}))[0] == 200
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_metrics_can_listen_on_their_own_endpoint(fake: FakeUpstream) -> None:
    server = ServerConfig(listen="tcp:0:interface=127.0.0.1", metrics_listen="tcp:0:interface=127.0.0.1")
    config = gateway_config(fake, keys=(ClientKey(name="alice", key=KEY),), server=server)
    running = await start_gateway(config)
    try:
        listener = running.service.metrics_listener
        assert listener is not None and listener.port is not None
        url = f"http://127.0.0.1:{listener.port.getHost().port}"
        status, m = await scrape(url + "/metrics")
        assert status == 200 and ("cch_client_connections", ()) in m
        assert (await scrape(running.http_url + "/metrics"))[0] == 403
    finally:
        await running.stop()
