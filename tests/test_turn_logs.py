"""Log lines of a turn: one request id throughout, no secret anywhere."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import SECRET, gateway_config, start_gateway
from twisted.logger import globalLogPublisher

from cch.config import ClientKey, ProviderConfig
from cch.logs import json_line
from cch.testing import FakeUpstream

CLIENT_KEY = "sk-cch-alice-0123456789"
PROVIDER_KEY = "sk-provider-secret-987654"


@pytest_twisted.ensureDeferred
async def test_every_line_of_a_turn_carries_its_request_id_and_no_secret(
    fake: FakeUpstream, tunnel_mode: str, upstream_transport: str
) -> None:
    websocket = "off" if upstream_transport == "http" else "on"
    config = gateway_config(
        fake,
        tunnel=tunnel_mode,
        keys=(ClientKey(name="alice", key=CLIENT_KEY),),
        providers=(ProviderConfig(name="primary", base_url=fake.base_url, api_key=PROVIDER_KEY, websocket=websocket),),
    )
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        running = await start_gateway(config)
        try:
            client = await running.connect(headers={"authorization": f"Bearer {CLIENT_KEY}"})
            client.send_json({"type": "response.create", "model": "m", "input": "secret-free prompt"})
            await client.recv_turn()
        finally:
            await running.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    named = [e for e in events if e.get("log_format") in ("ws_request_started", "upstream_attempt_started", "ws_terminal_event_sent", "ws_turn_completed")]
    assert [e["log_format"] for e in named] == [
        "ws_request_started",
        "upstream_attempt_started",
        "ws_terminal_event_sent",
        "ws_turn_completed",
    ]
    ids = {e["request_id"] for e in named}
    assert len(ids) == 1 and all(ids)
    rendered = "\n".join(filter(None, (json_line(e) for e in events)))
    for secret in (CLIENT_KEY, PROVIDER_KEY, SECRET, "secret-free prompt"):
        assert secret not in rendered
