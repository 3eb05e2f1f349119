"""HTTP POST turns and a client that stops reading: backpressure pauses the upstream, and a
client that reads nothing for ``limits.outbound_send_timeout`` loses its turn, as a WebSocket
client does (docs/architecture.md). Real sockets; the deadline runs on the gateway's Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from conftest import LogWatch, RunningGateway, eventually, gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from cch.testing import FakeUpstream
from cch.testing.scripts import SSE_HEADERS, Event, Hold, Script

CREATED = {"type": "response.created", "response": {"id": "resp_h", "status": "in_progress"}}
CHUNK = {"type": "response.output_text.delta", "delta": "z" * (1024 * 1024)}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_h", "status": "completed"}}
# Far more than the loopback socket buffers hold: the rest has to wait upstream.
MANY = 24




class RawHTTPClient(Protocol):
    """Sends one ``POST /v1/responses`` as bytes and, unless told otherwise, never reads."""

    def __init__(self, host: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.request = (
            b"POST /v1/responses HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (host.encode(), len(payload))
        ) + payload
        self.chunks: list[bytes] = []
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # stops reading: the client never reads its socket
        self.transport.write(self.request)

    def read_again(self) -> None:
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


async def post_without_reading(running: RunningGateway, body: dict[str, Any]) -> RawHTTPClient:
    address = running.service.listener.port.getHost()  # type: ignore[union-attr]
    client = RawHTTPClient(f"{address.host}:{address.port}", body)
    await connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), client)
    return client


async def stop(running: RunningGateway, clock: Clock) -> None:
    """Stop the gateway; a turn left running (the bug) is cut at the drain deadline instead
    of hanging the test."""
    stopping = Deferred.fromCoroutine(running.stop())
    for _ in range(10):
        if stopping.called:
            break
        clock.advance(running.service.config.server.drain_timeout)
        await deferLater(reactor, 0, lambda: None)
    await within(stopping, "the gateway to stop")


def http_turns(running: RunningGateway, outcome: str) -> float | None:
    return running.service.metrics.registry.get_sample_value("cch_http_turns_total", {"outcome": outcome})


def stream_body() -> dict[str, Any]:
    return {"model": "gpt-5.5", "input": "hi", "stream": True}


@pytest_twisted.ensureDeferred
async def test_http_client_that_stops_reading_loses_its_turn_at_the_send_deadline(fake: FakeUpstream) -> None:
    clock = Clock()
    fake.enqueue(Script(steps=(Event(CREATED), *[Event(CHUNK)] * MANY, Hold()), headers=SSE_HEADERS))
    running = await start_gateway(gateway_config(fake), clock)
    try:
        client = await post_without_reading(running, stream_body())
        await within(fake.wait_for_requests(1), "the upstream request")
        turns = running.service.http_turns
        await eventually(lambda: any(turn.paused for turn in turns.live), "the client transport to push back")
        with LogWatch("http_send_timeout") as timeout:
            clock.advance(running.service.config.limits.outbound_send_timeout - 1)
            assert not timeout.fired and running.service.handler.active == 1
            clock.advance(1)
            event = await within(timeout.seen, "the http_send_timeout log event")
        assert event["timeout"] == running.service.config.limits.outbound_send_timeout
        assert running.service.handler.active == 0 and turns.live == set()
        assert (await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")).cancelled
        client.read_again()  # to see the connection go
        await within(client.lost, "the client connection to be closed")
        received = client.received
        assert received.startswith(b"HTTP/1.1 200 ")
        assert not received.endswith(b"\r\n0\r\n\r\n")  # cut, not finished
        assert len(received) < MANY * len(CHUNK["delta"])
        assert http_turns(running, "cancelled") == 1 and http_turns(running, "completed") == 0
    finally:
        await stop(running, clock)


@pytest_twisted.ensureDeferred
async def test_http_client_that_reads_again_before_the_deadline_gets_the_whole_stream(fake: FakeUpstream) -> None:
    clock = Clock()
    fake.enqueue(Script(steps=(Event(CREATED), *[Event(CHUNK)] * MANY, Event(COMPLETED)), headers=SSE_HEADERS))
    running = await start_gateway(gateway_config(fake), clock)
    try:
        client = await post_without_reading(running, stream_body())
        turns = running.service.http_turns
        await eventually(lambda: any(turn.paused for turn in turns.live), "the client transport to push back")
        with LogWatch("http_send_timeout") as timeout:
            clock.advance(running.service.config.limits.outbound_send_timeout - 1)
            client.read_again()
            await within(client.lost, "the end of the response", seconds=30)
            clock.advance(running.service.config.limits.outbound_send_timeout)
            assert not timeout.fired
        received = client.received
        assert received.endswith(b"\r\n0\r\n\r\n")
        assert json.dumps(COMPLETED, separators=(",", ":")).encode() in received[-4096:]
        assert http_turns(running, "completed") == 1 and http_turns(running, "cancelled") == 0
        assert turns.live == set()
    finally:
        await stop(running, clock)


@pytest_twisted.ensureDeferred
async def test_each_http_turn_is_counted_once_by_how_it_ended(fake: FakeUpstream) -> None:
    fake.enqueue(
        Script(steps=(Event(CREATED), Event(COMPLETED)), headers=SSE_HEADERS),
        Script(steps=(Event(CREATED), Hold()), headers=SSE_HEADERS),
    )
    running = await start_gateway(gateway_config(fake))
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        url = running.http_url + "/v1/responses"
        response = await treq.post(url, json=stream_body(), pool=pool)
        await treq.content(response)
        client = await post_without_reading(running, stream_body())
        await within(fake.wait_for_requests(2), "the second upstream request")
        client.transport.abortConnection()  # the client hangs up mid-stream
        await within(fake.wait_for_cancelled(1), "the upstream request to be aborted")
        await within(client.lost, "the client connection to go")
        assert http_turns(running, "completed") == 1
        assert http_turns(running, "cancelled") == 1
        assert http_turns(running, "failed") == 0
        assert running.service.http_turns.live == set()
    finally:
        await pool.closeCachedConnections()
        await running.stop()
