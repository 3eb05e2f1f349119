"""docs/examples/embed.py really embeds cch: its host application (own MultiService, own
heartbeat service, the gateway attached) serves a WebSocket turn on 127.0.0.1:0 and stops clean."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.task import Clock

from cch.config import Config, ProviderConfig, ServerConfig
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.scripts import SSE_HEADERS, Delay, Event, Script

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "embed.py"

# A bound for a gateway that never answers (the thread method dumps every stack).
pytestmark = pytest.mark.timeout(120, method="thread")

CREATED = {"type": "response.created", "response": {"id": "resp_embed", "status": "in_progress"}}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_embed", "status": "completed"}}


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cch_embed_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest_twisted.ensureDeferred
async def test_embedded_gateway_serves_a_websocket_turn_beside_the_hosts_own_service(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default usage ledger is a SQLite file in the run directory
    embed = load_example()
    config = Config(
        server=ServerConfig(listen="tcp:0:interface=127.0.0.1"),
        providers=(ProviderConfig(name="fake", base_url=fake.base_url, websocket="off"),),
        source="<test>",
    )
    heartbeat_clock, upstream_clock = Clock(), Clock()
    fake.clock = upstream_clock
    fake.enqueue(Script(steps=(Event(CREATED), Delay(1), Event(COMPLETED)), headers=SSE_HEADERS))

    app = embed.make_application(config, reactor, heartbeat_interval=60, clock=heartbeat_clock)
    assert isinstance(app, MultiService)
    gateway: Any = app.getServiceNamed("cch")
    heartbeat: Any = app.getServiceNamed("heartbeat")
    app.startService()
    client: ResponsesWSClient | None = None
    try:
        await gateway.when_listening()
        assert gateway.base_url.startswith("http://127.0.0.1:")
        assert heartbeat.running and heartbeat.last == {"connections": 0, "turns_in_flight": 0}

        url = gateway.base_url.replace("http://", "ws://") + "/v1/responses"
        client = await ResponsesWSClient.connect(reactor, url)
        client.send_json(
            {"type": "response.create", "model": "gpt-5.5", "input": "hi", "store": False}
        )
        assert (await client.recv()) == CREATED
        # The host's own service sees the embedded gateway at work.
        heartbeat_clock.advance(60)
        assert heartbeat.last == {"connections": 1, "turns_in_flight": 1}
        upstream_clock.advance(1)
        assert (await client.recv()) == COMPLETED
        assert client.close_info is None
        assert fake.requests[0].body["input"] == "hi"
    finally:
        stopping = app.stopService()
        if client is not None:
            info = await client.wait_closed()
            assert (info.code, info.reason) == (1001, "going_away")
        await stopping
    assert not app.running and not heartbeat.running and not gateway.running
    assert gateway.edge_factory.live == set()
    assert gateway.handler.active == 0
