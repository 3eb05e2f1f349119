"""Codex's metadata, faithfully, at the byte level (docs/protocol.md#codex-metadata).

What Codex puts in a turn (``client_metadata``: installation, session, thread, window and turn
ids, the ``x-codex-turn-metadata`` JSON string, W3C trace context) reaches the upstream as the
client wrote it; what the upstream sends besides the response (``codex.rate_limits``, which
comes before ``response.created``, and ``codex.response.metadata``) reaches the client byte for
byte. On both upstream transports, and when the gateway replays a conversation
(docs/architecture.md#continuity).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from conftest import gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.scripts import CONNECTION_LIMIT_ERROR, SSE_HEADERS, Event, Script, codex_events

# As Codex writes it (codex-rs CodexRequestIdentity::client_metadata), plus trace context;
# non-ASCII and escaped quotes inside the turn-metadata string on purpose.
TURN_METADATA = '{"installation_id":"inst-7","request_kind":"turn","sandbox":"workspace-write","model":"gpt-5.5","note":"é ✓"}'
CLIENT_METADATA = {
    "x-codex-installation-id": "inst-7",
    "session_id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "thread_id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "x-codex-window-id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b:0",
    "turn_id": "turn-42",
    "x-codex-turn-metadata": TURN_METADATA,
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=a,other=b",
}
METADATA_BYTES = json.dumps(CLIENT_METADATA, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

HANDSHAKE = {
    "x-codex-turn-metadata": '{"request_kind":"prewarm","sandbox":"read-only"}',
    "x-codex-turn-state": "ts_8f2c",
    "x-codex-window-id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b:0",
    "originator": "codex_exec",
}

# Written as an upstream might: spaces, key order, escapes. Forwarded as they are.
RATE_LIMITS = (
    '{"type":"codex.rate_limits", "plan_type":"pro","rate_limits":{"allowed":true,"limit_reached":false,'
    '"primary":{"used_percent":7,"window_minutes":300,"reset_at":1779398785}},"credits":null,'
    '"note":"caf\\u00e9"}'
)
RESPONSE_METADATA = '{"type":"codex.response.metadata","headers":{"x-codex-safety-buffering-enabled":"true"}}'
BARE_METADATA = '{"type":"response.metadata", "metadata":{"k":"v"}}'


class RawClient(ResponsesWSClient):
    """Keeps every message's text as it came off the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def _message(self, payload: bytes, is_binary: bool) -> None:
        self.texts.append(payload.decode("utf-8"))
        super()._message(payload, is_binary)


def frame(**fields: Any) -> str:
    """A Codex-like turn frame, compact, with ``client_metadata`` where Codex puts it."""
    body: dict[str, Any] = {
        "type": "response.create",
        "model": "gpt-5.5",
        "store": False,
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "client_metadata": CLIENT_METADATA,
        **fields,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def with_extras(recorded: Any) -> Script:
    """``codex.rate_limits`` first (as the real server sends it), then the response with its
    metadata event after ``response.created``."""
    events = codex_events(recorded)
    steps = [Event(RATE_LIMITS), Event(events[0]), Event(RESPONSE_METADATA), Event(BARE_METADATA)]
    steps += [Event(e) for e in events[1:]]
    return Script(tuple(steps), headers=SSE_HEADERS)


async def connect(gateway: Any) -> RawClient:
    client = await RawClient.connect(reactor, gateway.ws_url, HANDSHAKE)
    gateway.clients.append(client)
    return client


async def turn_of(client: ResponsesWSClient) -> list[Any]:
    return await within(Deferred.fromCoroutine(client.recv_turn()), "a turn")


def upstream_headers(fake: FakeUpstream, index: int) -> dict[str, str]:
    recorded = fake.requests[index]
    if recorded.transport == "websocket":
        assert recorded.connection_index is not None
        return fake.ws_connections[recorded.connection_index].headers
    return recorded.headers


@pytest.mark.parametrize("tunnel", ["in-process", "http"])
@pytest.mark.parametrize("upstream", ["websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_client_metadata_and_codex_events_pass_untouched(fake: FakeUpstream, upstream: str, tunnel: str) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream=upstream, tunnel=tunnel))
    try:
        fake.enqueue(with_extras)
        client = await connect(gateway)
        client.send_text(frame())
        events = await turn_of(client)
        # Up: the member as the client wrote it, byte for byte.
        (recorded,) = fake.requests
        assert recorded.transport == upstream
        assert b'"client_metadata":' + METADATA_BYTES in recorded.raw
        assert recorded.body["client_metadata"] == CLIENT_METADATA
        headers = upstream_headers(fake, 0)
        for name in ("x-codex-turn-metadata", "x-codex-turn-state", "x-codex-window-id", "originator"):
            assert headers[name] == HANDSHAKE[name], name
        # Down: the extra events exactly as the upstream wrote them, in their places.
        assert client.texts[0] == RATE_LIMITS
        assert client.texts[2:4] == [RESPONSE_METADATA, BARE_METADATA]
        assert [e["type"] for e in events][:4] == [
            "codex.rate_limits",
            "response.created",
            "codex.response.metadata",
            "response.metadata",
        ]
        assert events[-1]["type"] == "response.completed"
    finally:
        await gateway.stop()


@pytest.mark.parametrize("upstream", ["websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_client_metadata_survives_a_replayed_continuation(fake: FakeUpstream, upstream: str) -> None:
    """The gateway rebuilds the input from the transcript (a new socket after the 60-minute
    cap on WebSocket; ``store=false`` on HTTP): the turn's own ``client_metadata`` still goes up
    untouched, and the upstream's extra events still come down untouched."""
    gateway = await start_gateway(gateway_config(fake, upstream=upstream))
    try:
        client = await connect(gateway)
        fake.enqueue(with_extras)
        client.send_text(frame())
        first = await turn_of(client)
        previous = first[-1]["response"]["id"]
        if upstream == "websocket":
            fake.enqueue(Script((Event(CONNECTION_LIMIT_ERROR),), headers=SSE_HEADERS), with_extras)
        else:
            fake.enqueue(with_extras)
        texts_before = len(client.texts)
        second_metadata = {**CLIENT_METADATA, "turn_id": "turn-43"}
        client.send_text(frame(previous_response_id=previous, client_metadata=second_metadata))
        events = await turn_of(client)
        assert events[-1]["type"] == "response.completed", events[-1]
        replayed = fake.requests[-1]
        assert "previous_response_id" not in replayed.body  # the conversation went up whole
        assert len(replayed.body["input"]) == 3
        second_bytes = json.dumps(second_metadata, separators=(",", ":"), ensure_ascii=False).encode()
        assert b'"client_metadata":' + second_bytes in replayed.raw
        assert client.texts[texts_before] == RATE_LIMITS
        assert client.texts[texts_before + 2 : texts_before + 4] == [RESPONSE_METADATA, BARE_METADATA]
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_lanes_metadata_passes_too_with_only_its_stream_id_added(fake: FakeUpstream) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        fake.enqueue(with_extras)
        client = await connect(gateway)
        client.send_text(frame(stream_id="lane-1"))
        await turn_of(client)
        (recorded,) = fake.requests
        assert b'"client_metadata":' + METADATA_BYTES in recorded.raw and b"stream_id" not in recorded.raw
        assert client.texts[0] == RATE_LIMITS[:-1] + ',"stream_id":"lane-1"}'
        assert client.texts[2] == RESPONSE_METADATA[:-1] + ',"stream_id":"lane-1"}'
    finally:
        await gateway.stop()
