"""permessage-deflate (RFC 7692) on the client edge, end to end: a real gateway on 127.0.0.1:0
in front of the fake upstream, and a real Autobahn client that offers the extension (as Codex
and the Python SDK do: ``ResponsesWSClient.connect(..., deflate=True)``) or does not.

- a client offering it negotiates it, its compressed turn frames reach the upstream whole, and
  the turns work with far fewer bytes on the wire, over either upstream transport;
- a client not offering it, or a gateway with ``limits.websocket_compression = false``, gets
  plain frames as before;
- every frame the gateway writes has RSV1 (compressed) once negotiated and none otherwise, read
  off the wire by :class:`RecordingClient`;
- a compressed message that inflates past ``limits.max_message_bytes`` (a zip bomb) is refused
  with close 1009 before any turn starts, and nothing is left behind (the ``no_leaks`` fixture,
  ``RunningGateway.stop``'s checks).

The byte-level rules (which frames the fast path takes, the 1009 without inflating the bomb in
memory) are in tests/test_wsframes.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
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
from twisted.internet.endpoints import TCP4ClientEndpoint
from wire import RawRecordingClient

from cch.config import LimitsConfig
from cch.testing import FakeUpstream
from cch.testing.client import TERMINAL, CloseInfo, ResponsesWSClient

INSTRUCTIONS = "You are Codex, a coding agent. Follow the repository's conventions. " * 160  # ~11 KB


async def connect(running: RunningGateway, *, deflate: bool) -> ResponsesWSClient:
    client = await within(ResponsesWSClient.connect(reactor, running.ws_url, deflate=deflate), "the upgrade")
    running.clients.append(client)  # so RunningGateway.stop closes it if the test fails first
    return client


async def turn(client: ResponsesWSClient, frame: dict[str, Any]) -> list[dict[str, Any]]:
    client.send_json(frame)
    return await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")


@pytest.mark.parametrize("upstream", ["http", "websocket"])
@pytest_twisted.ensureDeferred
async def test_a_client_offering_deflate_negotiates_it_and_its_compressed_turns_work(
    fake: FakeUpstream, upstream: str
) -> None:
    running = await start_gateway(gateway_config(fake, upstream=upstream))
    try:
        client = await connect(running, deflate=True)
        assert client.protocol is not None
        answer = client.protocol.http_headers["sec-websocket-extensions"]
        assert answer == "permessage-deflate; client_max_window_bits=15"
        assert client.deflate is not None
        assert (client.deflate.server_max_window_bits, client.deflate.client_max_window_bits) == (15, 15)
        # Context takeover stays on both ways: the repeated instructions cost a few bytes.
        assert not client.deflate.server_no_context_takeover and not client.deflate.client_no_context_takeover
        first = await turn(client, response_create(instructions=INSTRUCTIONS))
        second = await turn(
            client, response_create(instructions=INSTRUCTIONS, previous_response_id=first[-1]["response"]["id"])
        )
        assert first[-1]["type"] == second[-1]["type"] == "response.completed"
        # The compressed frames the client sent reached the upstream whole.
        assert [r.body["instructions"] for r in fake.requests] == [INSTRUCTIONS, INSTRUCTIONS]
        stats = client.protocol.trafficStats
        assert client.bytes_received < stats.incomingOctetsAppLevel / 2
        assert client.bytes_sent < stats.outgoingOctetsAppLevel / 5
        assert (await client.close()).code == 1000
    finally:
        await running.stop()


@pytest.mark.parametrize("offers", [False, True], ids=["not-offered", "refused-by-config"])
@pytest_twisted.ensureDeferred
async def test_without_deflate_the_frames_are_plain_and_the_turn_works(fake: FakeUpstream, offers: bool) -> None:
    config = gateway_config(fake)
    if offers:
        config = replace(config, limits=LimitsConfig(websocket_compression=False))
    running = await start_gateway(config)
    try:
        client = await connect(running, deflate=offers)
        assert client.protocol is not None and client.deflate is None
        assert "sec-websocket-extensions" not in client.protocol.http_headers
        events = await turn(client, response_create(instructions=INSTRUCTIONS))
        assert events[-1]["type"] == "response.completed"
        stats = client.protocol.trafficStats
        assert stats.incomingOctetsWebSocketLevel == stats.incomingOctetsAppLevel < client.bytes_received
        assert (await client.close()).code == 1000
    finally:
        await running.stop()


class RecordingClient(RawRecordingClient):
    """Every byte the server sent after the upgrade, so a test can read the frames' first bytes
    (FIN, RSV1, opcode); messages handed over as they come, parsed."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(json.loads(payload))

    async def turn(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        self.sendMessage(json.dumps(frame).encode(), isBinary=False)
        events = []
        while not events or events[-1]["type"] not in TERMINAL:
            events.append(await within(self.messages.get(), "the next event"))
        return events

    def frame_firsts(self) -> list[int]:
        """The first byte of every frame the server sent (frames from a server are unmasked)."""
        data, pos, firsts = bytes(self.raw), 0, []
        while pos < len(data):
            firsts.append(data[pos])
            length = data[pos + 1] & 0x7F
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if length >= 126:
                length = int.from_bytes(data[pos + 2 : pos + head], "big")
            pos += head + length
        return firsts

    def close(self) -> Deferred[CloseInfo]:
        if not self.closed.called:
            self.sendClose(1000)
        return self.closed


async def connect_recording(url: str, *, deflate: bool) -> RecordingClient:
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = RecordingClient
    factory.setProtocolOptions(autoFragmentSize=0, openHandshakeTimeout=0, closeHandshakeTimeout=5)
    if deflate:
        # Autobahn's default offer, which unlike the SDK's (ResponsesWSClient's) also allows
        # client_no_context_takeover: a second offer the gateway must answer the same way.
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )
    parts = urlsplit(url)
    proto: RecordingClient = await within(
        TCP4ClientEndpoint(reactor, parts.hostname, parts.port).connect(factory), "the connection"
    )
    return await within(proto.opened, "the upgrade")


@pytest.mark.parametrize(
    ("upstream", "deflate", "compression", "first_byte"),
    [
        ("http", True, True, 0xC1),
        ("websocket", True, True, 0xC1),
        ("http", False, True, 0x81),
        ("http", True, False, 0x81),
    ],
    ids=["deflate-http", "deflate-websocket", "not-offered", "refused-by-config"],
)
@pytest_twisted.ensureDeferred
async def test_every_frame_the_gateway_writes_is_compressed_exactly_when_negotiated(
    fake: FakeUpstream, upstream: str, deflate: bool, compression: bool, first_byte: int
) -> None:
    config = replace(gateway_config(fake, upstream=upstream), limits=LimitsConfig(websocket_compression=compression))
    running = await start_gateway(config)
    try:
        client = await connect_recording(running.ws_url, deflate=deflate)
        first = await client.turn(response_create(instructions=INSTRUCTIONS))
        second = await client.turn(
            response_create(instructions=INSTRUCTIONS, previous_response_id=first[-1]["response"]["id"])
        )
        assert first[-1]["type"] == second[-1]["type"] == "response.completed"
        # One final text frame per event: 0xC1 has RSV1 (compressed), 0x81 none.
        firsts = client.frame_firsts()
        assert len(firsts) == len(first) + len(second) and set(firsts) == {first_byte}
        assert (await client.close()).code == 1000
    finally:
        await running.stop()


@pytest.mark.parametrize("upstream", ["http", "websocket"])
@pytest_twisted.ensureDeferred
async def test_a_zip_bomb_is_refused_1009_before_any_turn_and_nothing_leaks(fake: FakeUpstream, upstream: str) -> None:
    limit = 256 * 1024
    config = replace(gateway_config(fake, upstream=upstream), limits=LimitsConfig(max_message_bytes=limit))
    running = await start_gateway(config)
    try:
        client = await connect(running, deflate=True)
        # 32 MiB of JSON that deflates to about 32 KiB: far under the limit on the wire.
        client.send_json(response_create(instructions=" " * (32 * 1024 * 1024)))
        assert client.bytes_sent < limit
        closed = await within(client.wait_closed(), "the close")
        assert closed.code == 1009
        await eventually(lambda: not running.service.edge_factory.live, "the connection to be gone")
        assert fake.requests == [] and fake.ws_connections == []  # no turn ever started
        assert running.service.handler.active == 0
        # The gateway is fine: the next client's compressed turn goes through.
        again = await connect(running, deflate=True)
        assert again.deflate is not None
        events = await turn(again, response_create(instructions=INSTRUCTIONS))
        assert events[-1]["type"] == "response.completed"
        assert (await again.close()).code == 1000
    finally:
        await running.stop()
