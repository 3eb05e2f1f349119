"""Per-key limits end to end (issue 14, docs/usage.md#limits): a real gateway on 127.0.0.1 with
``[[keys]]`` carrying limits, in front of the fake upstream. Every window runs on the gateway's
``task.Clock``, set to a real epoch where UTC day and month boundaries matter.

WebSocket turns get the error frame Codex understands and the connection stays open; HTTP POST
gets the same as 429/403 JSON with ``Retry-After``; a refused turn never reaches the upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import RunningGateway, eventually, gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, Config, KeyLimitsConfig, LimitsConfig, PriceConfig, load_config
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient
from cch.testing.fake_upstream import Recorded
from cch.testing.scripts import SSE_HEADERS, Delay, Event, Script, hold, json_response

MODEL = "gpt-5.5"
DEC_6_23_59 = datetime(2026, 12, 6, 23, 59, tzinfo=UTC).timestamp()
DEC_31_23_59 = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC).timestamp()

# What a WebSocket client sends to open the handshake (RFC 6455 §4.1 sample key).
UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def key(name: str, **limits: Any) -> ClientKey:
    return ClientKey(
        name=name, key=f"sk-cch-{name}-0123456789abcdef", limits=KeyLimitsConfig(**limits)
    )


def bearer(client_key: ClientKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {client_key.key}"}


def clock_at(epoch: float) -> Clock:
    clock = Clock()
    clock.advance(epoch)
    return clock


def keyed(
    fake: FakeUpstream, tunnel: str, *keys: ClientKey, upstream: str = "http", **overrides: Any
) -> Config:
    # No keepalive pings unless asked: the Clock jumps whole windows while connections stay open.
    overrides.setdefault("limits", LimitsConfig(auto_ping_interval=0))
    return gateway_config(fake, tunnel=tunnel, upstream=upstream, keys=keys, **overrides)


def spending(
    input_tokens: int, output_tokens: int, *, wait: float | None = None
) -> Callable[[Recorded], Script]:
    """A turn that reports this ``usage`` on its terminal event; with ``wait`` it holds
    between ``response.created`` and the terminal until the fake's clock passes it."""

    def script(recorded: Recorded) -> Script:
        rid = recorded.response_id or "resp_x"
        model = recorded.body.get("model", MODEL)
        created = {
            "type": "response.created",
            "response": {"id": rid, "object": "response", "status": "in_progress", "model": model},
        }
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        response = {
            "id": rid,
            "object": "response",
            "status": "completed",
            "model": model,
            "output": [],
            "usage": usage,
        }
        steps: list[Any] = [Event(created)]
        if wait is not None:
            steps.append(Delay(wait))
        steps.append(Event({"type": "response.completed", "response": response}))
        return Script(tuple(steps), headers=SSE_HEADERS)

    return script


def create(model: str = MODEL, text: str = "hi") -> dict[str, Any]:
    return {"type": "response.create", "model": model, "store": False, "input": text}


def post_body(model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "input": "hi", "stream": True}


def rate_limited(frame: dict[str, Any], retry_after: int) -> None:
    """The exact WebSocket error frame of a rate limit, as Codex reads it."""
    message = frame.get("error", {}).get("message")
    assert isinstance(message, str) and message
    assert frame == {
        "type": "error",
        "status": 429,
        "error": {"type": "rate_limit_exceeded", "code": "rate_limit_exceeded", "message": message},
        "headers": {"retry-after": str(retry_after)},
    }


class Reply:
    """A fully read HTTP response."""

    def __init__(self, response: Any, body: bytes) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self, status: int, type_: str, code: str, retry_after: str | None, **extra: Any) -> str:
        """Assert an OpenAI JSON error with this status and Retry-After; its message."""
        assert self.code == status, self.body
        assert self.header("content-type") == "application/json"
        assert self.header("retry-after") == retry_after
        body = self.json()
        message = body["error"]["message"]
        assert isinstance(message, str) and message
        assert body == {"error": {"message": message, "type": type_, "code": code, **extra}}
        return message  # type: ignore[no-any-return]

    def sse_types(self) -> list[str]:
        return [
            json.loads(line[len("data:") :])["type"]
            for line in self.body.decode("utf-8").split("\n")
            if line.startswith("data:")
        ]


class Harness:
    """One test's gateways (each on its Clock), HTTP client pool and WebSocket clients; all
    closed at the end."""

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.running: list[tuple[RunningGateway, Clock]] = []

    async def start(self, config: Config, clock: Clock) -> RunningGateway:
        running = await start_gateway(config, clock)
        self.running.append((running, clock))
        return running

    async def fetch(self, method: str, url: str, **kwargs: Any) -> Reply:
        return await within(
            Deferred.fromCoroutine(self._fetch(method, url, **kwargs)),
            f"the answer to {method} {url}",
        )

    async def _fetch(self, method: str, url: str, **kwargs: Any) -> Reply:
        response = await treq.request(method, url, pool=self.pool, reactor=reactor, **kwargs)
        return Reply(response, await treq.content(response))

    async def post(
        self, running: RunningGateway, client_key: ClientKey, body: dict[str, Any]
    ) -> Reply:
        return await self.fetch(
            "POST", running.http_url + "/v1/responses", json=body, headers=bearer(client_key)
        )

    async def upgrade(self, running: RunningGateway, client_key: ClientKey) -> Reply:
        """An upgrade that is expected to be refused (read as a plain HTTP answer)."""
        headers = {**UPGRADE_HEADERS, **bearer(client_key)}
        return await self.fetch("GET", running.http_url + "/v1/responses", headers=headers)

    async def close(self) -> None:
        for running, clock in self.running:
            for client in running.clients:
                if client.close_info is None:
                    await within(client.close(), "the client to close")
            stopping = Deferred.fromCoroutine(running.stop())
            for _ in range(10):
                if stopping.called:
                    break
                clock.advance(running.service.config.server.drain_timeout)
                await deferLater(reactor, 0, lambda: None)
            await within(stopping, "the gateway to stop")
        await self.pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


async def settled(running: RunningGateway) -> None:
    """Every turn's end has been counted (its lease finished) before the next one starts."""
    await eventually(lambda: running.service.handler.active == 0, "the turns to end")


async def turn(
    client: ResponsesWSClient, running: RunningGateway, frame: dict[str, Any] | None = None
) -> list[Any]:
    client.send_json(frame or create())
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the end of the turn")
    await settled(running)
    return events


def sample(running: RunningGateway, name: str, **labels: str) -> float | None:
    return running.service.metrics.registry.get_sample_value(name, labels)


def connections(running: RunningGateway, name: str) -> float | None:
    return sample(running, "cch_key_connections", key=name)


async def connect(running: RunningGateway, client_key: ClientKey) -> ResponsesWSClient:
    return await within(
        Deferred.fromCoroutine(running.connect(headers=bearer(client_key))), "the WebSocket to open"
    )


# --- max_connections ------------------------------------------------------------------------


async def close_by_client(client: ResponsesWSClient) -> None:
    await within(client.close(), "the client close")


async def close_by_server(client: ResponsesWSClient) -> None:
    client.send_bytes(b"\x00")  # the edge closes 1003 after an error frame
    info = await within(client.wait_closed(), "the server close")
    assert info.code == 1003


async def close_by_drop(client: ResponsesWSClient) -> None:
    await within(client.abort(), "the dropped connection")


@pytest.mark.parametrize(
    "close",
    [close_by_client, close_by_server, close_by_drop],
    ids=["client-close", "server-close", "drop"],
)
@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_the_next_upgrade_429_and_frees_the_place_on_close(
    fake: FakeUpstream,
    tunnel_mode: str,
    harness: Harness,
    close: Callable[[ResponsesWSClient], Awaitable[None]],
) -> None:
    alice, bob = key("alice", max_connections=2), key("bob")
    running = await harness.start(keyed(fake, tunnel_mode, alice, bob), clock_at(DEC_6_23_59))
    first = await connect(running, alice)
    second = await connect(running, alice)
    refused = await harness.upgrade(running, alice)
    message = refused.error(429, "rate_limit_exceeded", "rate_limit_exceeded", "5")
    assert "alice" in message and "2" in message
    # Another key's connections are its own.
    assert (await connect(running, bob)).close_info is None
    # The two admitted connections still serve turns.
    for client in (first, second):
        assert (await turn(client, running))[-1]["type"] == "response.completed"
    await close(first)
    await eventually(lambda: connections(running, "alice") == 1, "alice's place to be given back")
    third = await connect(running, alice)
    assert (await turn(third, running))[-1]["type"] == "response.completed"
    # Full again.
    (await harness.upgrade(running, alice)).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "5"
    )
    assert len(fake.requests) == 3


@pytest_twisted.ensureDeferred
async def test_max_connections_place_is_given_back_when_the_keepalive_drops_a_silent_client(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", max_connections=1)
    pings = LimitsConfig(auto_ping_interval=25, auto_ping_timeout=20)
    running = await harness.start(keyed(fake, tunnel_mode, alice, limits=pings), clock)
    silent = await connect(running, alice)
    assert silent.protocol is not None
    silent.protocol.onPing = lambda payload: None  # type: ignore[method-assign]
    (await harness.upgrade(running, alice)).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "5"
    )
    clock.advance(25)  # ping sent
    clock.advance(20)  # no pong: the gateway drops the client
    info = await within(silent.wait_closed(), "the silent client to be dropped")
    assert (info.code, info.was_clean) == (1006, False)
    await eventually(lambda: connections(running, "alice") == 0, "alice's place to be given back")
    client = await connect(running, alice)
    assert (await turn(client, running))[-1]["type"] == "response.completed"


@pytest_twisted.ensureDeferred
async def test_max_connections_an_upgrade_that_fails_its_handshake_holds_no_place(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    alice = key("alice", max_connections=1)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock_at(DEC_6_23_59))
    headers = {**UPGRADE_HEADERS, "Sec-WebSocket-Version": "7", **bearer(alice)}
    failed = await harness.fetch("GET", running.http_url + "/v1/responses", headers=headers)
    assert failed.code >= 400
    assert connections(running, "alice") in (None, 0)
    client = await connect(running, alice)
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    (await harness.upgrade(running, alice)).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "5"
    )


# --- max_concurrent_turns -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_max_concurrent_turns_refuses_a_second_connections_turn_while_the_first_is_held(
    fake: FakeUpstream, tunnel_mode: str, upstream_transport: str, harness: Harness
) -> None:
    fake_clock = Clock()
    fake.clock = fake_clock
    alice = key("alice", max_concurrent_turns=1)
    config = keyed(fake, tunnel_mode, alice, upstream=upstream_transport)
    running = await harness.start(config, clock_at(DEC_6_23_59))
    first, second = await connect(running, alice), await connect(running, alice)
    fake.enqueue(spending(10, 5, wait=1))
    first.send_json(create(text="held"))
    assert (await within(first.recv(), "the held turn's first event"))["type"] == "response.created"
    second.send_json(create(text="refused"))
    (frame,) = await within(Deferred.fromCoroutine(second.recv_turn()), "the refusal")
    rate_limited(frame, 5)
    assert "at most 1 turns at once" in frame["error"]["message"]
    assert [r.body["input"] for r in fake.requests] == ["held"]
    fake_clock.advance(1)  # the held turn ends
    assert (await within(Deferred.fromCoroutine(first.recv_turn()), "the held turn's end"))[-1][
        "type"
    ] == "response.completed"
    await settled(running)
    # Same connection, open all along: its next turn is served.
    assert second.close_info is None
    assert (await turn(second, running, create(text="again")))[-1]["type"] == "response.completed"
    assert [r.body["input"] for r in fake.requests] == ["held", "again"]


@pytest_twisted.ensureDeferred
async def test_max_concurrent_turns_http_post_gets_429_json_with_retry_after(
    fake: FakeUpstream, harness: Harness
) -> None:
    fake_clock = Clock()
    fake.clock = fake_clock
    alice = key("alice", max_concurrent_turns=1)
    running = await harness.start(keyed(fake, "in-process", alice), clock_at(DEC_6_23_59))
    fake.enqueue(spending(10, 5, wait=1))
    held = Deferred.fromCoroutine(harness.post(running, alice, post_body()))
    await within(fake.wait_for_requests(1), "the held request upstream")
    refused = await harness.post(running, alice, post_body())
    refused.error(429, "rate_limit_exceeded", "rate_limit_exceeded", "5")
    assert len(fake.requests) == 1
    fake_clock.advance(1)
    assert (await within(held, "the held response")).sse_types()[-1] == "response.completed"
    await settled(running)
    assert (await harness.post(running, alice, post_body())).sse_types()[-1] == "response.completed"
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_max_concurrent_turns_slot_is_given_back_when_the_client_drops_mid_turn(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    alice = key("alice", max_concurrent_turns=1)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock_at(DEC_6_23_59))
    first, second = await connect(running, alice), await connect(running, alice)
    fake.enqueue(
        hold(
            [{"type": "response.created", "response": {"id": "resp_held", "status": "in_progress"}}]
        )
    )
    first.send_json(create(text="held"))
    assert (await within(first.recv(), "the held turn's first event"))["type"] == "response.created"
    second.send_json(create(text="refused"))
    rate_limited((await within(Deferred.fromCoroutine(second.recv_turn()), "the refusal"))[0], 5)
    await within(first.abort(), "the dropped connection")
    await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")
    await settled(running)
    assert sample(running, "cch_key_turns_in_flight", key="alice") == 0
    assert sample(running, "cch_turns_total", key="alice", status="cancelled") == 1
    assert (await turn(second, running, create(text="after")))[-1]["type"] == "response.completed"
    assert [r.body["input"] for r in fake.requests] == ["held", "after"]


class _PostThenHangUp(Protocol):
    """Sends one ``POST /v1/responses`` and hangs up when told."""

    def __init__(self, host: str, client_key: ClientKey) -> None:
        payload = json.dumps(post_body()).encode()
        self.request = (
            b"POST /v1/responses HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        ) % (host.encode(), client_key.key.encode(), len(payload)) + payload
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_max_concurrent_turns_slot_is_given_back_when_an_http_client_goes_away(
    fake: FakeUpstream, harness: Harness
) -> None:
    alice = key("alice", max_concurrent_turns=1)
    running = await harness.start(keyed(fake, "in-process", alice), clock_at(DEC_6_23_59))
    fake.enqueue(
        hold(
            [{"type": "response.created", "response": {"id": "resp_held", "status": "in_progress"}}]
        )
    )
    address = running.service.listener.port.getHost()  # type: ignore[union-attr]
    client = _PostThenHangUp(f"{address.host}:{address.port}", alice)
    await connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), client)
    await within(fake.wait_for_requests(1), "the held request upstream")
    (await harness.post(running, alice, post_body())).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "5"
    )
    client.transport.abortConnection()
    await within(client.lost, "the client connection to go")
    await within(fake.wait_for_cancelled(0), "the upstream request to be aborted")
    await settled(running)
    assert sample(running, "cch_key_turns_in_flight", key="alice") == 0
    assert sample(running, "cch_turns_total", key="alice", status="cancelled") == 1
    assert (await harness.post(running, alice, post_body())).sse_types()[-1] == "response.completed"
    assert len(fake.requests) == 2


# --- requests_per_minute --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_per_minute_refuses_exactly_at_the_threshold_then_admits_after_the_window(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", requests_per_minute=2)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock)
    client = await connect(running, alice)
    assert (await turn(client, running))[-1]["type"] == "response.completed"  # t0
    clock.advance(10)
    assert (await turn(client, running))[-1]["type"] == "response.completed"  # t0 + 10
    clock.advance(10)
    (frame,) = await turn(client, running)  # t0 + 20: the third in a minute
    rate_limited(frame, 40)  # until the first leaves the window at t0 + 60
    assert "2 requests per minute" in frame["error"]["message"]
    clock.advance(39)
    (frame,) = await turn(client, running)
    rate_limited(frame, 1)
    assert len(fake.requests) == 2
    clock.advance(1)  # t0 + 60: the first request has left the window
    assert client.close_info is None
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    assert len(fake.requests) == 3
    (frame,) = await turn(client, running)  # t0 + 10 and t0 + 60 in the window again
    rate_limited(frame, 10)
    # Each refusal is a turn of its own in the ledger's figures, and a limiter refusal.
    refusals = {"key": "alice", "reason": "requests_per_minute"}
    assert sample(running, "cch_key_refusals_total", **refusals) == 3
    assert sample(running, "cch_turns_total", key="alice", status="refused") == 3
    assert sample(running, "cch_turns_total", key="alice", status="completed") == 3
    assert sample(running, "cch_key_turns_in_flight", key="alice") == 0


@pytest_twisted.ensureDeferred
async def test_requests_per_minute_http_post_gets_429_json_with_retry_after(
    fake: FakeUpstream, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", requests_per_minute=1)
    running = await harness.start(keyed(fake, "in-process", alice), clock)
    assert (await harness.post(running, alice, post_body())).code == 200
    await settled(running)
    clock.advance(15)
    message = (await harness.post(running, alice, post_body())).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "45"
    )
    assert "1 requests per minute" in message
    assert len(fake.requests) == 1
    clock.advance(45)
    assert (await harness.post(running, alice, post_body())).sse_types()[-1] == "response.completed"
    assert len(fake.requests) == 2


# --- tokens_per_minute / tokens_per_day -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_per_minute_counts_the_upstreams_usage_and_lets_a_started_turn_finish(
    fake: FakeUpstream, tunnel_mode: str, upstream_transport: str, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", tokens_per_minute=150)
    config = keyed(fake, tunnel_mode, alice, upstream=upstream_transport)
    running = await harness.start(config, clock)
    client = await connect(running, alice)
    fake.enqueue(spending(60, 40), spending(70, 30), spending(1, 1))
    assert (await turn(client, running))[-1]["type"] == "response.completed"  # 100 at t0
    clock.advance(10)
    # 100 < 150: admitted, and it finishes although it takes the window to 200.
    events = await turn(client, running)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] == 100
    (frame,) = await turn(client, running)
    rate_limited(frame, 50)  # at t0 + 60 the first 100 leave: 100 < 150
    assert "200 of 150 tokens used in the last minute" in frame["error"]["message"]
    assert len(fake.requests) == 2
    clock.advance(49)
    rate_limited((await turn(client, running))[0], 1)
    clock.advance(1)
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    assert len(fake.requests) == 3


@pytest_twisted.ensureDeferred
async def test_turns_admitted_under_a_token_limit_all_finish_though_together_they_pass_it(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    fake_clock = Clock()
    fake.clock = fake_clock
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", tokens_per_minute=150, tokens_per_day=150)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock)
    first, second = await connect(running, alice), await connect(running, alice)
    fake.enqueue(spending(60, 40, wait=1), spending(60, 40, wait=1))
    for client in (first, second):
        client.send_json(create())
        assert (await within(client.recv(), "the first event"))["type"] == "response.created"
    fake_clock.advance(1)  # both end, 200 tokens against a limit of 150
    for client in (first, second):
        events = await within(Deferred.fromCoroutine(client.recv_turn()), "the end of the turn")
        assert events[-1]["type"] == "response.completed"
    await settled(running)
    (frame,) = await turn(first, running)
    rate_limited(frame, 60)  # the day, which ends in 60 s too, is checked first
    assert "200 of 150 tokens used this UTC day" in frame["error"]["message"]
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_tokens_per_day_refuses_until_the_next_utc_midnight(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", tokens_per_day=150)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock)
    client = await connect(running, alice)
    fake.enqueue(spending(60, 40), spending(70, 30), spending(1, 1))
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    clock.advance(5)
    assert (await turn(client, running))[-1][
        "type"
    ] == "response.completed"  # 100 < 150: runs to 200
    (frame,) = await turn(client, running)
    rate_limited(frame, 55)  # 23:59:05 → midnight
    assert "200 of 150 tokens used this UTC day" in frame["error"]["message"]
    clock.advance(54)
    rate_limited((await turn(client, running))[0], 1)
    assert len(fake.requests) == 2
    clock.advance(1)  # 2026-12-07T00:00:00Z
    assert client.close_info is None
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    assert len(fake.requests) == 3


@pytest_twisted.ensureDeferred
async def test_a_day_spent_hours_before_midnight_is_a_usage_limit_that_says_when_it_resets(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    """A wait longer than LONG_WAIT is no Retry-After (Codex would sleep it silently, for
    hours): the frame says when the day resets, which Codex shows without retrying."""
    noon = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()
    midnight = int(datetime(2026, 12, 7, tzinfo=UTC).timestamp())
    clock = clock_at(noon)
    alice = key("alice", tokens_per_day=100)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock)
    client = await connect(running, alice)
    fake.enqueue(spending(60, 40))
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    (frame,) = await turn(client, running)
    message = frame["error"]["message"]
    assert frame == {
        "type": "error",
        "status": 429,
        "error": {
            "type": "usage_limit_reached",
            "code": "rate_limit_exceeded",
            "message": message,
            "resets_at": midnight,
            "resets_in_seconds": midnight - int(noon),
        },
    }
    assert "100 of 100 tokens used this UTC day" in message and "2026-12-07T00:00:00Z" in message
    assert len(fake.requests) == 1 and client.close_info is None


@pytest_twisted.ensureDeferred
async def test_token_limits_http_post_get_429_json_with_retry_after(
    fake: FakeUpstream, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", tokens_per_minute=100)
    bob = key("bob", tokens_per_day=100)
    running = await harness.start(keyed(fake, "in-process", alice, bob), clock)
    fake.enqueue(spending(60, 40), spending(60, 40))
    for who in (alice, bob):
        assert (await harness.post(running, who, post_body())).sse_types()[
            -1
        ] == "response.completed"
    await settled(running)
    clock.advance(20)
    (await harness.post(running, alice, post_body())).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "40"
    )
    (await harness.post(running, bob, post_body())).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "40"
    )
    assert len(fake.requests) == 2


def ending(terminal: str, input_tokens: int, output_tokens: int) -> Callable[[Recorded], Script]:
    """A turn whose terminal is ``response.failed`` / ``response.incomplete`` with ``usage``."""

    def script(recorded: Recorded) -> Script:
        rid = recorded.response_id or "resp_x"
        status = terminal.removeprefix("response.")
        usage = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        }
        response = {
            "id": rid,
            "object": "response",
            "status": status,
            "model": MODEL,
            "output": [],
            "usage": usage,
        }
        created = {
            "type": "response.created",
            "response": {**response, "status": "in_progress", "usage": None},
        }
        return Script(
            (Event(created), Event({"type": terminal, "response": response})), headers=SSE_HEADERS
        )

    return script


@pytest_twisted.ensureDeferred
async def test_tokens_of_failed_and_incomplete_terminals_count_too(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", tokens_per_minute=100)
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock)
    client = await connect(running, alice)
    fake.enqueue(ending("response.incomplete", 30, 20), ending("response.failed", 30, 20))
    assert (await turn(client, running))[-1]["type"] == "response.incomplete"
    assert (await turn(client, running))[-1]["type"] == "response.failed"
    rate_limited((await turn(client, running))[0], 60)
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_tokens_of_a_non_streamed_http_response_count(
    fake: FakeUpstream, harness: Harness
) -> None:
    clock = clock_at(DEC_6_23_59)
    alice = key("alice", tokens_per_minute=100)
    running = await harness.start(keyed(fake, "in-process", alice), clock)
    usage = {"input_tokens": 70, "output_tokens": 30, "total_tokens": 100}
    fake.enqueue(
        json_response(
            200,
            {
                "id": "resp_json",
                "object": "response",
                "status": "completed",
                "model": MODEL,
                "output": [],
                "usage": usage,
            },
        )
    )
    reply = await harness.post(running, alice, {"model": MODEL, "input": "hi"})
    assert (reply.code, reply.json()["usage"]) == (200, usage)
    await settled(running)
    (await harness.post(running, alice, post_body())).error(
        429, "rate_limit_exceeded", "rate_limit_exceeded", "60"
    )
    assert len(fake.requests) == 1


# --- budget_per_month -----------------------------------------------------------------------

PRICES = (
    PriceConfig(model=MODEL, input_per_mtok=10_000.0, output_per_mtok=10_000.0),
)  # $0.01 a token


@pytest_twisted.ensureDeferred
async def test_budget_per_month_refuses_insufficient_quota_as_a_usage_limit_until_the_next_utc_month(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    clock = clock_at(DEC_31_23_59)
    alice = key("alice", budget_per_month=1.0)
    running = await harness.start(keyed(fake, tunnel_mode, alice, prices=PRICES), clock)
    client = await connect(running, alice)
    fake.enqueue(spending(60, 40), spending(1, 1))
    assert (await turn(client, running))[-1]["type"] == "response.completed"  # $1.00 spent
    (frame,) = await turn(client, running)
    message = frame["error"]["message"]
    # A usage limit that says when it resets, with no Retry-After: Codex shows the time and does
    # not retry (docs/codex.md#rate-limits-and-quotas-what-codex-shows).
    assert frame == {
        "type": "error",
        "status": 429,
        "error": {
            "type": "usage_limit_reached",
            "code": "insufficient_quota",
            "message": message,
            "resets_at": int(JAN_1),
            "resets_in_seconds": 60,
        },
    }
    assert "2027-01-01T00:00:00Z" in message and "$1.00 of $1.00" in message
    clock.advance(59)
    assert (await turn(client, running))[0]["error"]["code"] == "insufficient_quota"
    assert len(fake.requests) == 1
    clock.advance(1)  # 2027-01-01T00:00:00Z: a new month
    assert client.close_info is None
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_budget_per_month_http_post_gets_429_insufficient_quota_without_retry_after(
    fake: FakeUpstream, harness: Harness
) -> None:
    clock = clock_at(DEC_31_23_59)
    alice = key("alice", budget_per_month=1.0)
    running = await harness.start(keyed(fake, "in-process", alice, prices=PRICES), clock)
    fake.enqueue(spending(60, 40))
    assert (await harness.post(running, alice, post_body())).sse_types()[-1] == "response.completed"
    await settled(running)
    (await harness.post(running, alice, post_body())).error(
        429, "usage_limit_reached", "insufficient_quota", None, resets_at=int(JAN_1), resets_in_seconds=60
    )
    assert len(fake.requests) == 1


# --- models ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_models_refuses_another_model_403_model_not_allowed_and_the_connection_stays_open(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    alice = key("alice", models=(MODEL,))
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock_at(DEC_6_23_59))
    client = await connect(running, alice)
    (frame,) = await turn(client, running, create(model="gpt-other"))
    message = frame["error"]["message"]
    assert frame == {
        "type": "error",
        "status": 403,
        "error": {"type": "invalid_request_error", "code": "model_not_allowed", "message": message},
    }
    assert "gpt-other" in message and MODEL in message
    assert fake.requests == []
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    assert [r.body["model"] for r in fake.requests] == [MODEL]


@pytest_twisted.ensureDeferred
async def test_models_http_post_gets_403_json(fake: FakeUpstream, harness: Harness) -> None:
    alice = key("alice", models=(MODEL,))
    running = await harness.start(keyed(fake, "in-process", alice), clock_at(DEC_6_23_59))
    (await harness.post(running, alice, post_body("gpt-other"))).error(
        403, "invalid_request_error", "model_not_allowed", None
    )
    assert fake.requests == []
    assert (await harness.post(running, alice, post_body())).sse_types()[-1] == "response.completed"


def model_not_allowed(frame: dict[str, Any]) -> str:
    """The exact WebSocket error frame of a model the key may not use; its message."""
    message = frame.get("error", {}).get("message")
    assert isinstance(message, str) and message
    assert frame == {
        "type": "error",
        "status": 403,
        "error": {"type": "invalid_request_error", "code": "model_not_allowed", "message": message},
    }
    return message


@pytest_twisted.ensureDeferred
async def test_models_a_frame_without_model_needs_the_connections_model_query(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    alice = key("alice", models=(MODEL,))
    running = await harness.start(keyed(fake, tunnel_mode, alice), clock_at(DEC_6_23_59))
    bare = await connect(running, alice)
    no_model = {"type": "response.create", "store": False, "input": "hi"}
    message = model_not_allowed((await turn(bare, running, no_model))[0])
    assert "names no model" in message
    with_query = await within(
        Deferred.fromCoroutine(running.connect(f"?model={MODEL}", bearer(alice))),
        "the WebSocket to open",
    )
    assert (await turn(with_query, running, no_model))[-1]["type"] == "response.completed"
    model_not_allowed((await turn(with_query, running, create(model="gpt-other")))[0])
    assert [r.body["model"] for r in fake.requests] == [MODEL]


@pytest_twisted.ensureDeferred
async def test_budget_admits_only_priced_models_and_their_dated_snapshots(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    alice = key("alice", budget_per_month=1.0)
    config = keyed(fake, tunnel_mode, alice, prices=PRICES)
    running = await harness.start(config, clock_at(DEC_31_23_59))
    client = await connect(running, alice)
    message = model_not_allowed((await turn(client, running, create(model="gpt-other")))[0])
    assert "only priced models" in message
    no_model = {"type": "response.create", "store": False, "input": "hi"}
    model_not_allowed((await turn(client, running, no_model))[0])
    assert fake.requests == []
    fake.enqueue(spending(30, 20))
    snapshot = f"{MODEL}-2026-12-01"
    assert (await turn(client, running, create(model=snapshot)))[-1]["type"] == "response.completed"
    # Its $0.50 counts against the budget as the model's own.
    fake.enqueue(spending(30, 20))
    assert (await turn(client, running))[-1]["type"] == "response.completed"
    assert (await turn(client, running))[0]["error"]["code"] == "insufficient_quota"
    assert [r.body["model"] for r in fake.requests] == [snapshot, MODEL]


# --- [key_defaults] -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_key_defaults_apply_to_a_key_that_sets_nothing_and_a_keys_own_value_wins(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness, tmp_path: Path
) -> None:
    toml = tmp_path / "cch.toml"
    toml.write_text(
        "[key_defaults]\nrequests_per_minute = 1\n\n"
        '[[keys]]\nname = "plain"\nkey = "sk-cch-plain-0123456789abcdef"\n\n'
        '[[keys]]\nname = "own"\nkey = "sk-cch-own-0123456789abcdef"\nrequests_per_minute = 3\n',
        encoding="utf-8",
    )
    loaded = load_config(toml, env={})
    plain, own = loaded.keys
    assert plain.limits.requests_per_minute == 1 and own.limits.requests_per_minute == 3
    config = replace(keyed(fake, tunnel_mode), keys=loaded.keys, key_defaults=loaded.key_defaults)
    running = await harness.start(config, clock_at(DEC_6_23_59))
    plain_client, own_client = await connect(running, plain), await connect(running, own)
    assert (await turn(plain_client, running))[-1]["type"] == "response.completed"
    rate_limited((await turn(plain_client, running))[0], 60)
    for _ in range(3):
        assert (await turn(own_client, running))[-1]["type"] == "response.completed"
    rate_limited((await turn(own_client, running))[0], 60)
    assert len(fake.requests) == 4


@pytest_twisted.ensureDeferred
async def test_a_keys_models_list_replaces_the_defaults_list(
    fake: FakeUpstream, harness: Harness, tmp_path: Path
) -> None:
    toml = tmp_path / "cch.toml"
    toml.write_text(
        '[key_defaults]\nmodels = ["gpt-5.5", "gpt-old"]\n\n'
        '[[keys]]\nname = "plain"\nkey = "sk-cch-plain-0123456789abcdef"\n\n'
        '[[keys]]\nname = "own"\nkey = "sk-cch-own-0123456789abcdef"\nmodels = ["gpt-5.5"]\n',
        encoding="utf-8",
    )
    loaded = load_config(toml, env={})
    plain, own = loaded.keys
    config = replace(keyed(fake, "in-process"), keys=loaded.keys, key_defaults=loaded.key_defaults)
    running = await harness.start(config, clock_at(DEC_6_23_59))
    (await harness.post(running, own, post_body("gpt-old"))).error(
        403, "invalid_request_error", "model_not_allowed", None
    )
    assert fake.requests == []
    reply = await harness.post(running, plain, post_body("gpt-old"))
    assert reply.sse_types()[-1] == "response.completed"
    reply = await harness.post(running, own, post_body())
    assert reply.sse_types()[-1] == "response.completed"
    assert [r.body["model"] for r in fake.requests] == ["gpt-old", MODEL]
