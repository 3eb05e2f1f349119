"""Failover across providers end to end: real sockets, a real gateway, two or three real fake
upstreams, through the WebSocket edge (both tunnel modes) and through plain HTTP POST.

Covers the attempt loop (which upstream answers fail over and which reach the client), the
priority order, the per-provider breaker (on an injected ``task.Clock``), the first-byte
timeout and the mid-stream idle timeout. Providers are reached over HTTP (``websocket="off"``):
the timeouts under test are the HTTP upstream's.

The gateway's ``Clock`` drives only its timers, never its sockets: every test awaits a real I/O
event (a frame at the client, a request at a fake) before it advances a clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from conftest import LogWatch, RunningGateway, gateway_config, start_gateway
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IResponse

from cch.config import BreakerConfig, ProviderConfig
from cch.sse import SSEDecoder
from cch.testing import FakeUpstream
from cch.testing.client import TERMINAL, ResponsesWSClient
from cch.testing.scripts import (
    SSE_HEADERS,
    Body,
    Delay,
    Drop,
    Event,
    Hold,
    Script,
    codex_like,
    drop_after,
    error_json,
    error_object,
    hold,
    json_response,
)

CREATED = {"type": "response.created", "response": {"id": "resp_held", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "still here"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_held", "status": "completed"}}

EDGES = ["ws", "ws-via-http-tunnel", "http"]

# Every wait here is on a real event; a gateway that never produces it would hang the run, so
# bound each test (the thread method dumps every stack, which shows where it hung).
pytestmark = pytest.mark.timeout(120, method="thread")


# --- upstreams ---------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def upstreams() -> Any:
    """Three fakes; each numbers its responses with its own prefix (resp_primary_1, ...)."""
    fakes = [
        FakeUpstream(reactor, id_prefix=f"resp_{name}")
        for name in ("primary", "secondary", "tertiary")
    ]
    for fake in fakes:
        await fake.listen(reactor)
    yield fakes
    for fake in fakes:
        await fake.stop()


def provider(
    name: str, target: FakeUpstream | str, priority: int, **options: Any
) -> ProviderConfig:
    base_url = target if isinstance(target, str) else target.base_url
    options.setdefault("websocket", "off")
    return ProviderConfig(name=name, base_url=base_url, priority=priority, **options)


async def closed_port_url() -> str:
    """The base URL of a loopback port nobody listens on (any more)."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}/v1"


def sse_script(*steps: Any) -> Script:
    return Script(steps=steps, headers=SSE_HEADERS)


# --- one request, whatever the edge ------------------------------------------------------------


@dataclass
class Reply:
    """How one request ended, as the client saw it."""

    status: int | None  # HTTP status; WebSocket: the error frame's "status" (200 on success)
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None  # the OpenAI error object, when the request failed
    raw: bytes = b""  # HTTP JSON bodies: the bytes as received
    content_type: str = ""  # HTTP only

    @property
    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    @property
    def response_id(self) -> str:
        assert self.events and self.events[-1]["type"] == "response.completed", self.events
        return str(self.events[-1]["response"]["id"])


class WSCall:
    def __init__(self, client: ResponsesWSClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []

    async def recv(self) -> dict[str, Any]:
        event = await self.client.recv()
        self.events.append(event)
        return event

    async def finish(self) -> Reply:
        while not self.events or self.events[-1].get("type") not in TERMINAL:
            await self.recv()
        last = self.events[-1]
        if last["type"] == "error":
            return Reply(last.get("status"), self.events, last["error"])
        return Reply(200, self.events)

    async def cancel(self) -> None:
        await self.client.abort()


class _SSEReader(Protocol):
    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.queue: DeferredQueue[dict[str, Any] | None] = DeferredQueue()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        for text in self.decoder.feed(data):
            self.queue.put(json.loads(text))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason
        self.queue.put(None)


class _BodyReader(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(b"".join(self.chunks))


class HTTPCall:
    def __init__(self, pending: Deferred[IResponse]) -> None:
        self.pending = pending
        self.response: IResponse | None = None
        self.reader: _SSEReader | None = None
        self.events: list[dict[str, Any]] = []
        self.raw = b""
        self.content_type = ""

    async def _headers(self) -> IResponse:
        if self.response is None:
            self.response = response = await self.pending
            values = response.headers.getRawHeaders(b"content-type") or [b""]
            self.content_type = values[0].decode("latin-1")
            if self.content_type.startswith("text/event-stream"):
                self.reader = _SSEReader()
                response.deliverBody(self.reader)
            else:
                body = _BodyReader()
                response.deliverBody(body)
                self.raw = await body.done
        return self.response

    async def recv(self) -> dict[str, Any]:
        await self._headers()
        assert self.reader is not None, f"not an event stream: {self.content_type} {self.raw!r}"
        event = await self.reader.queue.get()
        assert event is not None, "the event stream ended"
        self.events.append(event)
        return event

    async def finish(self) -> Reply:
        response = await self._headers()
        if self.reader is None:
            if response.code >= 400:
                try:
                    error = json.loads(self.raw).get("error")
                except ValueError:
                    error = None
                return Reply(response.code, [], error, self.raw, self.content_type)
            parsed = json.loads(self.raw)
            completed = {"type": "response.completed", "response": parsed}
            return Reply(response.code, [completed], None, self.raw, self.content_type)
        while (event := await self.reader.queue.get()) is not None:
            self.events.append(event)
        assert self.reader.reason is not None and self.reader.reason.check(ResponseDone), (
            self.reader.reason
        )
        last = self.events[-1] if self.events else {}
        error = last.get("error") if last.get("type") == "error" else None
        return Reply(response.code, self.events, error, content_type=self.content_type)

    async def cancel(self) -> None:
        self.pending.cancel()
        try:
            await self.pending
        except Exception:
            pass


def request_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-5.5",
        "store": False,
        "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
        ],
    }
    body.update(fields)
    return body


class Harness:
    """A gateway in front of the fakes, reached through one edge."""

    def __init__(self, edge: str, fakes: list[FakeUpstream]) -> None:
        self.edge = edge
        self.fakes = fakes
        self.running: RunningGateway | None = None
        self.client: ResponsesWSClient | None = None
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    async def start(
        self,
        *providers: ProviderConfig,
        clock: Clock | None = None,
        breaker: BreakerConfig | None = None,
    ) -> RunningGateway:
        overrides: dict[str, Any] = {"providers": providers}
        if breaker is not None:
            overrides["breaker"] = breaker
        tunnel = "http" if self.edge == "ws-via-http-tunnel" else "in-process"
        config = gateway_config(self.fakes[0], tunnel=tunnel, **overrides)
        self.running = await start_gateway(config, clock=clock)
        return self.running

    async def call(self, *, separate: bool = False, **fields: Any) -> WSCall | HTTPCall:
        """Start one request. WebSocket edges reuse one client connection unless ``separate``."""
        assert self.running is not None
        body = request_body(**fields)
        if self.edge == "http":
            body.setdefault("stream", True)
            url = self.running.http_url + "/v1/responses"
            return HTTPCall(self.http.post(url, json=body, unbuffered=True))
        client = self.client
        if client is None or separate:
            client = await self.running.connect()
            if self.client is None:
                self.client = client
        client.send_json({"type": "response.create", **body})
        return WSCall(client)

    async def turn(self, **fields: Any) -> Reply:
        return await (await self.call(**fields)).finish()

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
        await self.pool.closeCachedConnections()


@pytest.fixture(params=EDGES)
def edge(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def harness(edge: str, upstreams: list[FakeUpstream]) -> Any:
    h = Harness(edge, upstreams)
    yield h
    await h.stop()


def assert_ws_open(h: Harness) -> None:
    if h.client is not None:
        assert h.client.close_info is None


# --- which failures fail over -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_primary_fails_over_to_secondary(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    _, secondary, _ = upstreams
    await harness.start(
        provider("primary", await closed_port_url(), 0), provider("secondary", secondary, 1)
    )
    reply = await harness.turn()
    assert reply.status == 200
    assert reply.types[0] == "response.created"
    assert reply.response_id == "resp_secondary_1"
    assert len(secondary.requests) == 1
    # The failure counted against the unreachable provider, not the one that served.
    router = harness.running.service.router  # type: ignore[union-attr]
    assert router.get("primary").breaker.failures == 1
    assert router.get("secondary").breaker.failures == 0


@pytest.mark.parametrize("edge", ["ws", "ws-via-http-tunnel"])
@pytest_twisted.ensureDeferred
async def test_unreachable_primary_fails_over_to_secondary_over_upstream_websocket(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    _, secondary, _ = upstreams
    await harness.start(
        provider("primary", await closed_port_url(), 0, websocket="on"),
        provider("secondary", secondary, 1, websocket="on"),
    )
    first = await harness.turn()
    assert first.response_id == "resp_secondary_1"
    # A store=false continuation still works while the primary stays down.
    second = await harness.turn(previous_response_id=first.response_id)
    assert second.response_id == "resp_secondary_2"
    assert [r.transport for r in secondary.requests] == ["websocket", "websocket"]


@pytest.mark.parametrize("edge", ["ws"])
@pytest_twisted.ensureDeferred
async def test_failed_attempt_at_dead_primary_keeps_the_sessions_socket_to_the_secondary(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    _, secondary, _ = upstreams
    await harness.start(
        provider("primary", await closed_port_url(), 0, websocket="on"),
        provider("secondary", secondary, 1, websocket="on"),
    )
    first = await harness.turn()
    await harness.turn(previous_response_id=first.response_id)
    assert len(secondary.ws_connections) == 1
    assert secondary.requests[1].body["previous_response_id"] == first.response_id


@pytest_twisted.ensureDeferred
async def test_primary_dropping_the_connection_before_headers_fails_over(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    primary.enqueue(Script(steps=(Drop(),)))
    await harness.start(provider("primary", primary, 0), provider("secondary", secondary, 1))
    reply = await harness.turn()
    assert reply.response_id == "resp_secondary_1"
    assert len(primary.requests) == 1
    assert len(secondary.requests) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 429])
@pytest_twisted.ensureDeferred
async def test_retryable_status_fails_over_and_primary_sees_exactly_one_request(
    harness: Harness, upstreams: list[FakeUpstream], status: int
) -> None:
    primary, secondary, _ = upstreams
    primary.enqueue(error_json(status, "overloaded", "Try another provider"))
    await harness.start(provider("primary", primary, 0), provider("secondary", secondary, 1))
    reply = await harness.turn()
    assert reply.status == 200
    assert reply.response_id == "resp_secondary_1"
    assert len(primary.requests) == 1
    assert len(secondary.requests) == 1
    # The secondary gets the very request the primary got.
    assert secondary.requests[0].raw == primary.requests[0].raw
    assert secondary.requests[0].body["stream"] is True
    assert_ws_open(harness)
    # The next request starts at the primary again (one failure does not open its breaker).
    follow_up = await harness.turn()
    assert follow_up.response_id == "resp_primary_2"


@pytest.mark.parametrize("status", [400, 404])
@pytest_twisted.ensureDeferred
async def test_client_error_is_not_failed_over_and_reaches_the_client_with_its_status(
    harness: Harness, upstreams: list[FakeUpstream], status: int
) -> None:
    primary, secondary, _ = upstreams
    primary.enqueue(
        error_json(status, "bad_thing", "You did a bad thing", type="invalid_request_error")
    )
    await harness.start(provider("primary", primary, 0), provider("secondary", secondary, 1))
    reply = await harness.turn()
    assert reply.status == status
    assert reply.error == {
        "message": "You did a bad thing",
        "type": "invalid_request_error",
        "code": "bad_thing",
    }
    if harness.edge != "http":
        assert reply.events == [{"type": "error", "status": status, "error": reply.error}]
    assert len(primary.requests) == 1
    assert secondary.requests == []
    # A client error is not the provider's fault.
    assert harness.running.service.router.get("primary").breaker.failures == 0  # type: ignore[union-attr]
    assert_ws_open(harness)
    assert (await harness.turn()).response_id == "resp_primary_2"


@pytest_twisted.ensureDeferred
async def test_all_providers_failing_report_the_last_upstream_error(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, tertiary = upstreams
    primary.enqueue(error_json(500, "primary_broke", "primary is down"))
    secondary.enqueue(error_json(429, "rate_limited", "slow down", type="rate_limit_error"))
    tertiary.enqueue(error_json(503, "tertiary_busy", "tertiary is overloaded"))
    await harness.start(
        provider("primary", primary, 0),
        provider("secondary", secondary, 1),
        provider("tertiary", tertiary, 2),
    )
    reply = await harness.turn()
    assert reply.status == 503
    assert reply.error == error_object("tertiary_busy", "tertiary is overloaded")
    if harness.edge == "http":
        assert json.loads(reply.raw) == {
            "error": error_object("tertiary_busy", "tertiary is overloaded")
        }
        assert reply.content_type == "application/json"
    assert [len(f.requests) for f in upstreams] == [1, 1, 1]
    assert_ws_open(harness)


@pytest_twisted.ensureDeferred
async def test_last_upstream_error_that_is_not_json_reaches_the_client(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    page = b"<html><body>502 Bad Gateway</body></html>"
    primary.enqueue(error_json(500, "primary_broke", "primary is down"))
    secondary.enqueue(json_response(502, page, content_type="text/html"))
    await harness.start(provider("primary", primary, 0), provider("secondary", secondary, 1))
    reply = await harness.turn()
    assert reply.status == 502
    if harness.edge == "http":
        assert reply.raw == page
        assert reply.content_type == "text/html"
    else:
        assert reply.error == {"code": "http_502", "message": page.decode()}
    assert_ws_open(harness)


@pytest_twisted.ensureDeferred
async def test_unreachable_last_provider_is_reported_as_502_upstream_unavailable(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, _, _ = upstreams
    primary.enqueue(error_json(503, "busy", "primary is busy"))
    await harness.start(
        provider("primary", primary, 0), provider("backup", await closed_port_url(), 1)
    )
    reply = await harness.turn()
    assert reply.status == 502
    assert reply.error is not None
    assert reply.error["code"] == "upstream_unavailable"
    assert "backup" in reply.error["message"]
    assert_ws_open(harness)


@pytest_twisted.ensureDeferred
async def test_lower_priority_number_is_tried_first_whatever_the_config_order(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, tertiary = upstreams
    primary.enqueue(error_json(500, "primary_broke", "primary is down"))
    await harness.start(
        provider("tertiary", tertiary, 2),
        provider("secondary", secondary, 1),
        provider("primary", primary, 0),
    )
    reply = await harness.turn()
    assert reply.response_id == "resp_secondary_1"
    assert [len(f.requests) for f in upstreams] == [1, 1, 0]


# --- what must not fail over --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mid_stream_break_ends_the_turn_with_upstream_stream_error_and_no_failover(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    primary.enqueue(drop_after([CREATED, COMPLETED], 1))
    await harness.start(provider("primary", primary, 0), provider("secondary", secondary, 1))
    reply = await harness.turn()
    assert reply.types == ["response.created", "error"]
    assert reply.error is not None and reply.error["code"] == "upstream_stream_error"
    assert secondary.requests == []
    assert_ws_open(harness)
    assert (await harness.turn()).response_id == "resp_primary_2"


@pytest_twisted.ensureDeferred
async def test_client_leaving_while_primary_withholds_headers_cancels_it_and_never_tries_secondary(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    primary.enqueue(Script(steps=(Hold(),)))
    secondary.enqueue(Script(steps=(Hold(),)))
    running = await harness.start(
        provider("primary", primary, 0), provider("secondary", secondary, 1)
    )
    handled = watch_handler(running)
    try:
        call = await harness.call()
        await primary.wait_for_requests(1)
        await call.cancel()
        await primary.wait_for_cancelled(0)
        # No verdict on the primary: the client left, the provider did not fail.
        assert running.service.router.get("primary").breaker.failures == 0
        # The turn is over (cancelled): nothing more goes to any provider.
        assert handled and all(d.called for d in handled)
        assert secondary.requests == []
    finally:
        await end_stray_attempt(handled, secondary)


def watch_handler(running: RunningGateway) -> list[Deferred[None]]:
    """Record when each request's handler Deferred has fired (cancelled or not)."""
    handler = running.service.handler
    original = handler.handle
    ended: list[Deferred[None]] = []

    def handle(*args: Any) -> Any:
        d = original(*args)
        done: Deferred[None] = Deferred()
        ended.append(done)

        def fired(result: Any) -> Any:
            done.callback(None)
            return result

        d.addBoth(fired)
        return d

    handler.handle = handle  # type: ignore[method-assign]
    return ended


async def end_stray_attempt(handled: list[Deferred[None]], fake: FakeUpstream) -> None:
    """Teardown help for the bug below: a turn that went on to ``fake`` after its client left
    is held there; abort it and wait until the handler is done, so teardown finds it idle."""
    if all(d.called for d in handled):
        return
    await fake.wait_for_requests(1).addTimeout(30, reactor)
    await fake.stop()
    for d in handled:
        await d.addTimeout(30, reactor)


# --- the breaker ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_breaker_opens_after_threshold_then_one_trial_after_cooldown_closes_it(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock = Clock()
    primary.enqueue(error_json(500, "down", "down"), error_json(503, "down", "down"))
    await harness.start(
        provider("primary", primary, 0),
        provider("secondary", secondary, 1),
        clock=clock,
        breaker=BreakerConfig(failure_threshold=2, cooldown=30),
    )
    for n in (1, 2):
        assert (await harness.turn()).response_id == f"resp_secondary_{n}"
        assert len(primary.requests) == n
    # Open: the primary gets nothing, even just before the cool-down ends.
    assert (await harness.turn()).response_id == "resp_secondary_3"
    clock.advance(29)
    assert (await harness.turn()).response_id == "resp_secondary_4"
    assert len(primary.requests) == 2
    # Half-open: exactly one trial reaches the primary; it succeeds and closes the breaker.
    clock.advance(1)
    assert (await harness.turn()).response_id == "resp_primary_3"
    assert len(primary.requests) == 3
    assert (await harness.turn()).response_id == "resp_primary_4"
    assert (await harness.turn()).response_id == "resp_primary_5"
    assert len(secondary.requests) == 4
    assert harness.running.service.router.get("primary").breaker.state == "closed"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_half_open_breaker_lets_exactly_one_concurrent_trial_through(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock, upstream_clock = Clock(), Clock()
    primary.clock = upstream_clock
    primary.enqueue(
        error_json(500, "down", "down"),
        # The trial: response headers withheld until the fake's clock moves.
        sse_script(Delay(1), Event(CREATED), Event(COMPLETED)),
    )
    await harness.start(
        provider("primary", primary, 0),
        provider("secondary", secondary, 1),
        clock=clock,
        breaker=BreakerConfig(failure_threshold=1, cooldown=30),
    )
    assert (await harness.turn()).response_id == "resp_secondary_1"
    clock.advance(30)
    trial = await harness.call()
    await primary.wait_for_requests(2)
    # While the trial is in flight, everyone else goes to the secondary.
    for n in (2, 3):
        other = await (await harness.call(separate=True)).finish()
        assert other.response_id == f"resp_secondary_{n}"
    assert len(primary.requests) == 2
    upstream_clock.advance(1)
    assert (await trial.finish()).response_id == "resp_held"
    assert (await harness.turn()).response_id == "resp_primary_3"


@pytest_twisted.ensureDeferred
async def test_failed_trial_reopens_the_breaker_for_another_cooldown(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock = Clock()
    primary.enqueue(
        error_json(500, "down", "down"),
        error_json(500, "down", "down"),
        error_json(502, "still", "still down"),
    )
    await harness.start(
        provider("primary", primary, 0),
        provider("secondary", secondary, 1),
        clock=clock,
        breaker=BreakerConfig(failure_threshold=2, cooldown=30),
    )
    await harness.turn()
    await harness.turn()
    clock.advance(30)
    # The trial fails: this request is still served, by the secondary.
    assert (await harness.turn()).response_id == "resp_secondary_3"
    assert len(primary.requests) == 3
    # The cool-down starts over from the failed trial.
    clock.advance(29)
    assert (await harness.turn()).response_id == "resp_secondary_4"
    assert len(primary.requests) == 3
    clock.advance(1)
    assert (await harness.turn()).response_id == "resp_primary_4"


@pytest_twisted.ensureDeferred
async def test_a_success_resets_the_consecutive_failure_count(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    primary.enqueue(error_json(500, "down", "down"), codex_like, error_json(500, "down", "down"))
    await harness.start(
        provider("primary", primary, 0),
        provider("secondary", secondary, 1),
        clock=Clock(),
        breaker=BreakerConfig(failure_threshold=2, cooldown=30),
    )
    assert (await harness.turn()).response_id == "resp_secondary_1"
    assert (await harness.turn()).response_id == "resp_primary_2"
    assert (await harness.turn()).response_id == "resp_secondary_2"
    # Failures 1 and 3 were not consecutive: the primary is still tried.
    assert (await harness.turn()).response_id == "resp_primary_4"


@pytest_twisted.ensureDeferred
async def test_every_breaker_open_answers_503_no_provider_without_calling_upstream(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, _, _ = upstreams
    primary.enqueue(error_json(500, "down", "down"))
    await harness.start(
        provider("primary", primary, 0),
        clock=Clock(),
        breaker=BreakerConfig(failure_threshold=1, cooldown=30),
    )
    first = await harness.turn()
    assert (first.status, first.error) == (500, error_object("down", "down"))
    second = await harness.turn()
    assert second.status == 503
    assert second.error is not None and second.error["code"] == "no_provider"
    assert len(primary.requests) == 1
    assert_ws_open(harness)


# --- first-byte timeout -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_byte_timeout_fails_over_to_secondary_and_cancels_the_primary(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock = Clock()
    # A script that starts with Hold never writes, so the fake never sends response headers.
    primary.enqueue(Script(steps=(Hold(),)))
    running = await harness.start(
        provider("primary", primary, 0, first_byte_timeout=5),
        provider("secondary", secondary, 1),
        clock=clock,
    )
    call = await harness.call()
    await primary.wait_for_requests(1)
    clock.advance(4.9)
    assert secondary.requests == []
    clock.advance(0.1)
    reply = await call.finish()
    assert reply.response_id == "resp_secondary_1"
    await primary.wait_for_cancelled(0)
    assert running.service.router.get("primary").breaker.failures == 1
    assert_ws_open(harness)


@pytest.mark.parametrize("edge", ["ws"])
@pytest_twisted.ensureDeferred
async def test_first_byte_timeout_is_logged_as_a_timeout(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock = Clock()
    primary.enqueue(Script(steps=(Hold(),)))
    await harness.start(
        provider("primary", primary, 0, first_byte_timeout=5),
        provider("secondary", secondary, 1),
        clock=clock,
    )
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        call = await harness.call()
        await primary.wait_for_requests(1)
        clock.advance(5)
        await call.finish()
    finally:
        globalLogPublisher.removeObserver(observer)
    (failed,) = [e for e in events if e.get("log_format") == "upstream_attempt_failed"]
    assert failed["provider"] == "primary"
    assert failed["error"] == "no response within 5s"


@pytest_twisted.ensureDeferred
async def test_first_byte_timeout_on_the_only_provider_is_a_502(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, _, _ = upstreams
    clock = Clock()
    primary.enqueue(Script(steps=(Hold(),)))
    await harness.start(provider("primary", primary, 0, first_byte_timeout=5), clock=clock)
    call = await harness.call()
    await primary.wait_for_requests(1)
    clock.advance(5)
    reply = await call.finish()
    assert reply.status == 502
    assert reply.error is not None and reply.error["code"] == "upstream_unavailable"
    await primary.wait_for_cancelled(0)
    assert_ws_open(harness)
    assert (await harness.turn()).response_id == "resp_primary_2"


@pytest_twisted.ensureDeferred
async def test_first_byte_timeout_stops_once_headers_arrived(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock, upstream_clock = Clock(), Clock()
    primary.clock = upstream_clock
    primary.enqueue(sse_script(Event(CREATED), Delay(1), Event(COMPLETED)))
    await harness.start(
        provider("primary", primary, 0, first_byte_timeout=5),
        provider("secondary", secondary, 1),
        clock=clock,
    )
    call = await harness.call()
    assert (await call.recv())["type"] == "response.created"
    clock.advance(60)
    upstream_clock.advance(1)
    reply = await call.finish()
    assert reply.types == ["response.created", "response.completed"]
    assert secondary.requests == []
    assert primary.requests[0].cancelled is False


# --- idle timeout mid-stream --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_silent_upstream_mid_stream_ends_the_turn_with_upstream_idle_timeout(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock = Clock()
    primary.enqueue(hold([CREATED]))
    await harness.start(
        provider("primary", primary, 0, idle_timeout=7),
        provider("secondary", secondary, 1),
        clock=clock,
    )
    call = await harness.call()
    assert (await call.recv()) == CREATED
    clock.advance(7)
    reply = await call.finish()
    assert reply.types == ["response.created", "error"]
    assert reply.error is not None
    assert reply.error["code"] == "upstream_idle_timeout"
    await primary.wait_for_cancelled(0)
    # Events were already sent: no failover.
    assert secondary.requests == []
    # The client connection stays open and carries the next turn.
    assert_ws_open(harness)
    assert (await harness.turn()).response_id == "resp_primary_2"
    assert_ws_open(harness)


@pytest_twisted.ensureDeferred
async def test_each_upstream_event_restarts_the_idle_timer(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, _, _ = upstreams
    clock, upstream_clock = Clock(), Clock()
    primary.clock = upstream_clock
    primary.enqueue(sse_script(Event(CREATED), Delay(1), Event(DELTA), Delay(1), Event(COMPLETED)))
    await harness.start(provider("primary", primary, 0, idle_timeout=10), clock=clock)
    call = await harness.call()
    assert (await call.recv())["type"] == "response.created"
    clock.advance(6)
    upstream_clock.advance(1)
    assert (await call.recv()) == DELTA
    clock.advance(6)  # 12 s since the headers, 6 s since the last event
    upstream_clock.advance(1)
    reply = await call.finish()
    assert reply.types == ["response.created", "response.output_text.delta", "response.completed"]


@pytest.mark.parametrize("edge", ["http"])
@pytest_twisted.ensureDeferred
async def test_json_body_stalling_after_headers_is_a_502_upstream_idle_timeout(
    harness: Harness, upstreams: list[FakeUpstream]
) -> None:
    primary, secondary, _ = upstreams
    clock = Clock()
    primary.enqueue(
        Script(
            steps=(Body(b'{"id":"resp_partial",'), Hold()),
            headers=(("content-type", "application/json"),),
        )
    )
    await harness.start(
        provider("primary", primary, 0, idle_timeout=7),
        provider("secondary", secondary, 1),
        clock=clock,
    )
    # Nothing reaches the client before the body is complete; the gateway's log says when it
    # has the response headers and starts reading the body (and watching it for silence).
    with LogWatch("upstream_attempt_started") as started:
        call = await harness.call(stream=False)
        await started.seen
    clock.advance(7)
    reply = await call.finish()
    assert reply.status == 502
    assert reply.error is not None and reply.error["code"] == "upstream_idle_timeout"
    await primary.wait_for_cancelled(0)
    assert secondary.requests == []
