"""permessage-deflate (RFC 7692) on the client edge, end to end: a real gateway on 127.0.0.1:0
in front of the fake upstream, and a real Autobahn client that offers the extension (as Codex
and the Python SDK do) or does not.

- a client offering it gets compressed frames (RSV1) back, its compressed turn frame reaches the
  upstream whole, and the turn works, over either upstream transport;
- a client not offering it, or a gateway with ``limits.websocket_compression = false``, gets
  plain frames as before;
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
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from conftest import eventually, gateway_config, response_create, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

from cch.config import LimitsConfig
from cch.testing import FakeUpstream
from cch.testing.client import TERMINAL, CloseInfo

INSTRUCTIONS = "You are Codex, a coding agent. Follow the repository's conventions. " * 160  # ~11 KB


class RecordingClient(WebSocketClientProtocol):
    """An Autobahn client that keeps every byte the server sent after the upgrade, so a test can
    read the frames' first bytes (FIN, RSV1, opcode), and hands messages over as they come."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = bytearray()
        self.messages: DeferredQueue[Any] = DeferredQueue()
        self.opened: Deferred[RecordingClient] = Deferred()
        self.closed: Deferred[CloseInfo] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.raw += data
        super().dataReceived(data)

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason))
        self.closed.callback(CloseInfo(code, reason, wasClean))

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

    def negotiated(self) -> str | None:
        return self.http_headers.get("sec-websocket-extensions")

    def close(self) -> Deferred[CloseInfo]:
        if not self.closed.called:
            self.sendClose(1000)
        return self.closed


async def connect(url: str, *, deflate: bool) -> RecordingClient:
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = RecordingClient
    factory.setProtocolOptions(autoFragmentSize=0, openHandshakeTimeout=0, closeHandshakeTimeout=5)
    if deflate:
        # What Autobahn offers by default; the Python SDK's `websockets` offers the same
        # parameters but client_no_context_takeover.
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )
    parts = urlsplit(url)
    proto: RecordingClient = await within(
        TCP4ClientEndpoint(reactor, parts.hostname, parts.port).connect(factory), "the connection"
    )
    return await within(proto.opened, "the upgrade")


@pytest.mark.parametrize("upstream", ["http", "websocket"])
@pytest_twisted.ensureDeferred
async def test_a_client_offering_deflate_gets_compressed_frames_and_the_turn_works(
    fake: FakeUpstream, upstream: str
) -> None:
    running = await start_gateway(gateway_config(fake, upstream=upstream))
    try:
        client = await connect(running.ws_url, deflate=True)
        assert client.negotiated() == "permessage-deflate; client_max_window_bits=15"
        first = await client.turn(response_create(instructions=INSTRUCTIONS))
        second = await client.turn(
            response_create(instructions=INSTRUCTIONS, previous_response_id=first[-1]["response"]["id"])
        )
        assert first[-1]["type"] == second[-1]["type"] == "response.completed"
        # The compressed frames the client sent reached the upstream whole.
        assert [r.body["instructions"] for r in fake.requests] == [INSTRUCTIONS, INSTRUCTIONS]
        # Every frame the gateway wrote is a final text frame with RSV1: compressed.
        firsts = client.frame_firsts()
        assert len(firsts) == len(first) + len(second) and set(firsts) == {0xC1}
        stats = client.trafficStats
        assert stats.incomingOctetsWebSocketLevel < stats.incomingOctetsAppLevel / 2
        assert stats.outgoingOctetsWebSocketLevel < stats.outgoingOctetsAppLevel / 5
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
        client = await connect(running.ws_url, deflate=offers)
        assert client.negotiated() is None
        events = await client.turn(response_create(instructions=INSTRUCTIONS))
        assert events[-1]["type"] == "response.completed"
        assert set(client.frame_firsts()) == {0x81}  # final text, no RSV bit
        stats = client.trafficStats
        assert stats.incomingOctetsWebSocketLevel == stats.incomingOctetsAppLevel
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
        client = await connect(running.ws_url, deflate=True)
        # 32 MiB of JSON that deflates to about 32 KiB: far under the limit on the wire.
        bomb = json.dumps(response_create(instructions=" " * (32 * 1024 * 1024))).encode()
        client.sendMessage(bomb, isBinary=False)
        assert client.trafficStats.outgoingOctetsWebSocketLevel < limit
        closed = await within(client.closed, "the close")
        assert closed.code == 1009
        await eventually(lambda: not running.service.edge_factory.live, "the connection to be gone")
        assert fake.requests == [] and fake.ws_connections == []  # no turn ever started
        assert running.service.handler.active == 0
        # The gateway is fine: the next client's compressed turn goes through.
        again = await connect(running.ws_url, deflate=True)
        events = await again.turn(response_create(instructions=INSTRUCTIONS))
        assert events[-1]["type"] == "response.completed"
        await again.close()
    finally:
        await running.stop()
