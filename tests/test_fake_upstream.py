"""The fake Responses upstream, over real sockets on 127.0.0.1: what it streams, what it records,
how previous_response_id behaves, and that stop() leaves nothing behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived

from cch.testing import (
    Body,
    Close,
    Delay,
    Event,
    FakeUpstream,
    Hold,
    Raw,
    Script,
    codex_events,
    codex_like,
    drop_after,
    error_json,
    hold,
    sse,
    ws_close_after,
)
from cch.testing.plugin import Options, makeService
from cch.testing.scripts import event_text, sse_block

T = TypeVar("T")

TIMEOUT = 10  # failsafe only: every wait below fires on an event, never on time


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def leak_check(reactor: Any) -> Any:
    """Requested first, so it runs after every other teardown: nothing of the test may remain."""
    before = set(reactor.getDelayedCalls())
    yield
    leftover = [c for c in reactor.getDelayedCalls() if c.active() and c not in before]
    assert leftover == []


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_twisted.async_yield_fixture
async def upstream(leak_check: None, reactor: Any, clock: Clock) -> Any:
    fake = FakeUpstream(clock)
    await fake.listen(reactor)
    yield fake
    await fake.stop()
    assert fake.open_connections == 0
    assert clock.getDelayedCalls() == []


@pytest_twisted.async_yield_fixture
async def http(leak_check: None, reactor: Any) -> Any:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def ws(upstream: FakeUpstream, reactor: Any) -> Any:
    clients: list[WSClient] = []

    async def connect(*, deflate: bool = False) -> WSClient:
        client = await ws_connect(reactor, upstream.ws_url, deflate=deflate)
        clients.append(client)
        await within(client.opened)
        return client

    yield connect
    for client in clients:
        if not client.closed.called:
            client.transport.abortConnection()
        await within(client.closed)


async def ws_connect(reactor: Any, url: str, *, deflate: bool = False) -> WSClient:
    factory = WebSocketClientFactory(url)
    factory.protocol = WSClient
    if deflate:
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )
    address = urlsplit(url)
    endpoint = TCP4ClientEndpoint(reactor, address.hostname, address.port)
    return await within(endpoint.connect(factory))


def within(d: Deferred[T]) -> Deferred[T]:
    """A failsafe so a broken test fails instead of hanging; the timer is gone once d fires."""
    from twisted.internet import reactor

    return d.addTimeout(TIMEOUT, reactor)


class WSClient(WebSocketClientProtocol):
    """A WebSocket client that collects parsed messages and lets a test wait for them."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Any] = []
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.close_info: tuple[bool, int | None, str | None] | None = None
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(json.loads(payload))
        self._check()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_info = (wasClean, code, reason)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        # Autobahn leaves this timer behind when the connection dies mid close handshake.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        self.closed.callback(None)

    def send(self, frame: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(frame).encode(), isBinary=False)

    def until(self, predicate: Callable[[list[Any]], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((lambda: predicate(self.messages), d))
        self._check()
        return within(d)

    async def turn(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Send a frame; the events up to and including the terminal one."""
        start = len(self.messages)
        self.send(frame)
        await self.until(lambda messages: any(_terminal(m) for m in messages[start:]))
        return self.messages[start:]

    def _check(self) -> None:
        for entry in list(self._waiting):
            if entry[0]():
                self._waiting.remove(entry)
                entry[1].callback(None)


class Stream:
    """Collects a streamed HTTP body as it arrives, so a test can wait for a prefix."""

    def __init__(self, response: Any) -> None:
        self.data = b""
        self._waiting: list[tuple[bytes, Deferred[None]]] = []
        self.done = within(treq.collect(response, self._received))

    def until_contains(self, needle: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((needle, d))
        self._received(b"")
        return within(d)

    def _received(self, data: bytes) -> None:
        self.data += data
        for entry in list(self._waiting):
            if entry[0] in self.data:
                self._waiting.remove(entry)
                entry[1].callback(None)


def _terminal(message: dict[str, Any]) -> bool:
    return message.get("type") in {"response.completed", "response.failed", "error"}


def sse_events(data: bytes) -> list[Any]:
    blocks = data.replace(b"\r\n", b"\n").split(b"\n\n")
    return [json.loads(block[len(b"data: ") :]) for block in blocks if block.startswith(b"data: ")]


def user(text: str) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]


def codex_types(deltas: int) -> list[str]:
    """The event types of a codex_like stream with that many text deltas."""
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


# --- HTTP --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_sse_codex_like_streams_full_item_sequence_and_records_request(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    body = {"model": "gpt-5.5", "stream": True, "input": user("hi there")}
    response = await within(
        http.post(
            upstream.base_url + "/responses?trace=1",
            json=body,
            headers={"Authorization": "Bearer k", "X-Thing": "a"},
        )
    )
    data = await within(treq.content(response))

    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    events = sse_events(data)
    assert [e["type"] for e in events] == codex_types(3)  # "echo: ", "hi ", "there"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "echo: hi there"
    completed = events[-1]["response"]
    assert completed["id"] == "resp_fake_1" and completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == "echo: hi there"
    usage = completed["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    [recorded] = upstream.requests
    assert (recorded.transport, recorded.method, recorded.path, recorded.query) == (
        "http",
        "POST",
        "/v1/responses",
        "trace=1",
    )
    assert recorded.headers["authorization"] == "Bearer k"
    assert recorded.headers["x-thing"] == "a"
    assert recorded.body == body
    assert json.loads(recorded.raw) == body
    assert recorded.connection_index is None
    assert recorded.response_id == "resp_fake_1"
    assert recorded.finished and not recorded.cancelled


@pytest_twisted.ensureDeferred
async def test_http_non_streaming_request_gets_response_object_as_json(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    response = await within(http.post(upstream.base_url + "/responses", json={"input": "hello"}))
    payload = await within(response.json())

    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert payload["object"] == "response" and payload["id"] == "resp_fake_1"
    assert payload["output"][0]["content"][0]["text"] == "echo: hello"


@pytest_twisted.ensureDeferred
async def test_error_json_sets_status_and_openai_error_shape(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    upstream.enqueue(error_json(429, "rate_limit_exceeded", "Slow down.", type="rate_limit_error"))
    response = await within(http.post(upstream.base_url + "/responses", json={"stream": True}))

    assert response.code == 429
    assert await within(response.json()) == {
        "error": {
            "message": "Slow down.",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        },
    }


@pytest_twisted.ensureDeferred
async def test_chunked_crlf_done_bytes_arrive_exactly_as_scripted(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    events = [{"type": "response.created", "n": 1}, {"type": "response.completed", "n": 2}]
    script = sse(events, chunk_size=5, crlf=True, done=True)
    upstream.enqueue(script, Script([Raw(b": comment\n\ngarbage\r\n"), Event("plain text")]))

    first = await within(http.post(upstream.base_url + "/responses", json={"stream": True}))
    second = await within(http.post(upstream.base_url + "/responses", json={"stream": True}))

    assert await within(treq.content(first)) == (
        b'data: {"type":"response.created","n":1}\r\n\r\n'
        b'data: {"type":"response.completed","n":2}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    assert all(len(step.data) <= 5 for step in script.steps if isinstance(step, Raw))
    assert await within(treq.content(second)) == b": comment\n\ngarbage\r\ndata: plain text\n\n"
    assert second.headers.getRawHeaders("content-type") == ["text/event-stream"]


@pytest_twisted.ensureDeferred
async def test_http_response_streams_each_step_before_the_script_ends(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    upstream.enqueue(hold([{"type": "response.created"}, {"type": "response.in_progress"}]))
    response = await within(http.post(upstream.base_url + "/responses", json={"stream": True}))
    stream = Stream(response)

    await stream.until_contains(b"response.in_progress")
    assert not upstream.requests[0].finished

    await upstream.stop()
    with pytest.raises(ResponseFailed):
        await stream.done
    assert upstream.requests[0].cancelled


@pytest_twisted.ensureDeferred
async def test_drop_mid_stream_aborts_the_connection_without_terminator(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    upstream.enqueue(lambda recorded: drop_after(codex_events(recorded), 2))
    response = await within(http.post(upstream.base_url + "/responses", json={"stream": True}))
    stream = Stream(response)

    with pytest.raises(ResponseFailed):
        await stream.done
    assert [e["type"] for e in sse_events(stream.data)] == codex_types(1)[:2]
    finished = await within(upstream.wait_for_finished(0))
    assert finished.finished and not finished.cancelled


@pytest_twisted.ensureDeferred
async def test_delay_waits_on_the_injected_clock(
    upstream: FakeUpstream, http: HTTPClient, clock: Clock
) -> None:
    upstream.enqueue(sse([{"type": "a"}, {"type": "b"}], delay=5))
    response = await within(http.post(upstream.base_url + "/responses", json={"stream": True}))
    stream = Stream(response)
    await stream.until_contains(b'"a"')

    assert b'"b"' not in stream.data
    assert [call.getTime() for call in clock.getDelayedCalls()] == [5]
    clock.advance(5)
    await stream.done
    assert [e["type"] for e in sse_events(stream.data)] == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_default_clock_is_the_reactor(
    leak_check: None, reactor: Any, http: HTTPClient
) -> None:
    fake = FakeUpstream()
    await fake.listen(reactor)
    try:
        fake.enqueue(Script([Event({"type": "a"}), Delay(0), Event({"type": "b"})]))
        response = await within(http.post(fake.base_url + "/responses", json={}))
        assert sse_events(await within(treq.content(response))) == [{"type": "a"}, {"type": "b"}]
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_client_going_away_cancels_the_pending_delay(
    upstream: FakeUpstream, http: HTTPClient, clock: Clock
) -> None:
    upstream.enqueue(Script([Delay(60), Event({"type": "late"})]))
    request = http.post(upstream.base_url + "/responses", json={"stream": True})
    await within(upstream.wait_for_requests(1))
    assert len(clock.getDelayedCalls()) == 1

    request.cancel()
    with pytest.raises(ResponseNeverReceived):
        await request
    recorded = await within(upstream.wait_for_finished(0))

    assert recorded.cancelled
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_models_lists_configured_models(upstream: FakeUpstream, http: HTTPClient) -> None:
    response = await within(http.get(upstream.base_url + "/models"))
    assert await within(response.json()) == {
        "object": "list",
        "data": [{"id": "gpt-5.5", "object": "model", "created": 0, "owned_by": "cch-fake"}],
    }


@pytest_twisted.ensureDeferred
async def test_http_unknown_previous_response_id_gets_400_and_keeps_the_queue(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    upstream.enqueue(error_json(500, "boom", "scripted"))
    body = {"stream": True, "previous_response_id": "resp_nope", "input": "x"}
    response = await within(http.post(upstream.base_url + "/responses", json=body))

    assert response.code == 400
    assert await within(response.json()) == {
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": "Previous response with id 'resp_nope' not found.",
            "param": "previous_response_id",
        }
    }
    next_response = await within(http.post(upstream.base_url + "/responses", json={}))
    assert next_response.code == 500
    await within(next_response.content())


# --- WebSocket ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ws_warmup_then_turn_continues_store_false_on_the_same_connection_only(
    upstream: FakeUpstream, ws: Any
) -> None:
    client = await ws()
    warmup = {
        "type": "response.create",
        "model": "gpt-5.5",
        "stream": True,
        "generate": False,
        "store": False,
        "input": [{"role": "developer", "content": "be brief"}],
    }
    events = await client.turn(warmup)
    assert [e["type"] for e in events] == ["response.created", "response.completed"]
    warmup_id = events[-1]["response"]["id"]
    assert events[-1]["response"]["usage"]["total_tokens"] == 0
    assert events[-1]["response"]["output"] == []

    turn = {
        "type": "response.create",
        "model": "gpt-5.5",
        "stream": True,
        "store": False,
        "previous_response_id": warmup_id,
        "input": user("fix the bug"),
    }
    events = await client.turn(turn)
    assert [e["type"] for e in events] == codex_types(4)
    turn_id = events[-1]["response"]["id"]
    assert (warmup_id, turn_id) == ("resp_fake_1", "resp_fake_2")
    assert upstream.conversation(turn_id) == [
        {"role": "developer", "content": "be brief"},
        *user("fix the bug"),
        *events[-1]["response"]["output"],
    ]

    other = await ws()
    [error] = await other.turn({**turn, "previous_response_id": turn_id})
    assert error == {
        "type": "error",
        "status": 400,
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": f"Previous response with id '{turn_id}' not found.",
            "param": "previous_response_id",
        },
    }
    # The connection stays open and serves the next turn.
    events = await other.turn({"type": "response.create", "input": "again"})
    assert events[-1]["type"] == "response.completed"

    first, second = upstream.ws_connections
    assert [t.body["type"] for t in first.turns] == ["response.create"] * 2
    assert [t.connection_index for t in second.turns] == [1, 1]
    assert first.opened_at_index == 0 and second.opened_at_index == 2
    assert all(t.transport == "websocket" and t.path == "/v1/responses" for t in upstream.requests)


@pytest_twisted.ensureDeferred
async def test_stored_response_is_known_across_connections_and_transports(
    upstream: FakeUpstream, ws: Any, http: HTTPClient
) -> None:
    response = await within(http.post(upstream.base_url + "/responses", json={"input": "one"}))
    stored_id = (await within(response.json()))["id"]

    client = await ws()
    events = await client.turn(
        {"type": "response.create", "previous_response_id": stored_id, "input": "two"}
    )
    assert events[-1]["type"] == "response.completed"
    conversation = upstream.conversation(events[-1]["response"]["id"])
    user_items = [item for item in conversation if item.get("role") == "user"]
    assert user_items == [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert len(conversation) == 4  # two inputs, two outputs


@pytest_twisted.ensureDeferred
async def test_ws_invalid_frames_get_error_events_and_connection_stays_open(
    upstream: FakeUpstream, ws: Any
) -> None:
    client = await ws()
    client.sendMessage(b"not json", isBinary=False)
    client.send({"type": "response.cancel"})
    await client.until(lambda messages: len(messages) == 2)
    assert [m["error"]["code"] for m in client.messages] == ["invalid_request"] * 2

    events = await client.turn({"type": "response.create", "input": "ok"})
    assert events[-1]["response"]["id"] == "resp_fake_1"
    assert [r.body for r in upstream.requests[:2]] == [{}, {"type": "response.cancel"}]


@pytest_twisted.ensureDeferred
async def test_ws_turns_on_one_connection_run_one_at_a_time_in_order(
    upstream: FakeUpstream, ws: Any, clock: Clock
) -> None:
    upstream.enqueue(
        Script([Event({"type": "a"}), Delay(1), Event({"type": "response.completed"})]),
        Script([Event({"type": "c"})]),
    )
    client = await ws()
    client.send({"type": "response.create"})
    client.send({"type": "response.create"})
    await within(upstream.wait_for_requests(2))
    await client.until(lambda messages: len(messages) == 1)
    assert not upstream.requests[1].finished

    clock.advance(1)
    await client.until(lambda messages: len(messages) == 3)
    assert [m["type"] for m in client.messages] == ["a", "response.completed", "c"]


@pytest_twisted.ensureDeferred
async def test_ws_close_after_sends_close_code_and_records_peer_reply(
    upstream: FakeUpstream, ws: Any
) -> None:
    upstream.enqueue(lambda recorded: ws_close_after(codex_events(recorded), 2, 1011, "boom"))
    client = await ws()
    client.send({"type": "response.create"})
    await within(client.closed)

    assert [m["type"] for m in client.messages] == codex_types(1)[:2]
    assert client.close_info == (True, 1011, "boom")
    record = await within(upstream.wait_for_ws_close(0))
    assert record.closed and record.close_code == 1000  # autobahn answers 1000
    assert not upstream.requests[0].cancelled


@pytest_twisted.ensureDeferred
async def test_ws_records_peer_close_code_or_none_when_tcp_drops(
    upstream: FakeUpstream, ws: Any
) -> None:
    polite = await ws()
    rude = await ws()
    polite.sendClose(4001, "bye")
    rude.transport.abortConnection()

    assert (await within(upstream.wait_for_ws_close(0))).close_code == 4001
    assert (await within(upstream.wait_for_ws_close(1))).close_code is None


@pytest_twisted.ensureDeferred
async def test_ws_peer_going_away_cancels_the_running_turn_and_its_delay(
    upstream: FakeUpstream, ws: Any, clock: Clock
) -> None:
    upstream.enqueue(Script([Event({"type": "a"}), Delay(30), Event({"type": "b"})]))
    client = await ws()
    client.send({"type": "response.create"})
    await client.until(lambda messages: len(messages) == 1)
    assert len(clock.getDelayedCalls()) == 1

    client.transport.abortConnection()
    recorded = await within(upstream.wait_for_cancelled(0))
    assert recorded.finished
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_ws_accepts_offered_permessage_deflate(upstream: FakeUpstream, ws: Any) -> None:
    client = await ws(deflate=True)
    events = await client.turn({"type": "response.create", "input": "squeeze"})

    assert [type(e).__name__ for e in client.websocket_extensions_in_use] == ["PerMessageDeflate"]
    assert events[-1]["type"] == "response.completed"
    assert (
        upstream.ws_connections[0]
        .headers["sec-websocket-extensions"]
        .startswith("permessage-deflate")
    )


@pytest_twisted.ensureDeferred
async def test_upgrade_status_refuses_websocket_with_json_error(
    upstream: FakeUpstream, http: HTTPClient
) -> None:
    upstream.upgrade_status = 426
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        "Authorization": "Bearer k",
    }
    response = await within(http.get(upstream.base_url + "/responses", headers=headers))

    assert response.code == 426
    assert (await within(response.json()))["error"]["code"] == "websocket_upgrade_refused"
    assert upstream.ws_connections == []
    assert upstream.refused_upgrades[0]["authorization"] == "Bearer k"


@pytest_twisted.ensureDeferred
async def test_one_script_means_the_same_over_http_and_websocket(
    upstream: FakeUpstream, http: HTTPClient, ws: Any
) -> None:
    script = Script([Event({"type": "a"}), Body(b'{"type":"b"}'), Close()])
    upstream.enqueue(script, script)

    response = await within(http.post(upstream.base_url + "/responses", json={}))
    assert await within(response.content()) == b'data: {"type":"a"}\n\n{"type":"b"}'
    client = await ws()
    client.send({"type": "response.create"})
    await within(client.closed)
    assert client.messages == [{"type": "a"}, {"type": "b"}]
    assert client.close_info == (True, 1000, None)


# --- stop() ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_drops_held_http_and_ws_connections_and_leaves_nothing(
    leak_check: None, reactor: Any, clock: Clock, http: HTTPClient
) -> None:
    fake = FakeUpstream(clock)
    await fake.listen(reactor)
    fake.enqueue(hold([{"type": "response.created"}]), Script([Delay(10), Hold()]))

    response = await within(http.post(fake.base_url + "/responses", json={"stream": True}))
    stream = Stream(response)
    await stream.until_contains(b"response.created")
    client = await ws_connect(reactor, fake.ws_url)
    await within(client.opened)
    client.send({"type": "response.create"})
    await within(fake.wait_for_requests(2))
    assert fake.open_connections == 2 and len(clock.getDelayedCalls()) == 1

    await fake.stop()

    assert fake.open_connections == 0
    assert clock.getDelayedCalls() == []
    assert [r.cancelled for r in fake.requests] == [True, True]
    assert fake.ws_connections[0].closed and fake.ws_connections[0].close_code is None
    with pytest.raises(ResponseFailed):
        await stream.done
    await within(client.closed)
    with pytest.raises(RuntimeError):
        fake.base_url  # noqa: B018


@pytest_twisted.ensureDeferred
async def test_stop_drops_idle_keep_alive_connections(
    leak_check: None, reactor: Any, clock: Clock
) -> None:
    fake = FakeUpstream(clock)
    await fake.listen(reactor)
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = HTTPClient(Agent(reactor, pool=pool))
    response = await within(client.post(fake.base_url + "/responses", json={"input": "hi"}))
    await within(response.content())
    assert fake.open_connections == 1  # kept alive by the client's pool

    await fake.stop()

    assert fake.open_connections == 0
    await pool.closeCachedConnections()


# --- scripts and plugin ------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text())
events_strategy = st.lists(
    st.dictionaries(st.text(min_size=1), json_scalars, max_size=3), max_size=5
)


@given(
    events=events_strategy, chunk_size=st.integers(1, 64), crlf=st.booleans(), done=st.booleans()
)
def test_sse_chunking_never_changes_the_byte_stream(
    events: list[dict[str, Any]], chunk_size: int, crlf: bool, done: bool
) -> None:
    whole = sse(events, crlf=crlf, done=done)
    chunked = sse(events, chunk_size=chunk_size, crlf=crlf, done=done)

    def stream(script: Script) -> bytes:
        return b"".join(
            step.data if isinstance(step, Raw) else sse_block(event_text(step.obj))
            for step in script.steps
            if isinstance(step, Raw | Event)
        )

    assert stream(chunked) == stream(whole)
    assert all(len(step.data) <= chunk_size for step in chunked.steps if isinstance(step, Raw))


def test_codex_like_uses_the_allotted_response_id_and_echoes_last_user_text() -> None:
    from cch.testing import Recorded

    body = {
        "stream": True,
        "input": [
            *user("first"),
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "second"},
        ],
    }
    recorded = Recorded("websocket", "GET", "/v1/responses", "", {}, body, b"{}", response_id="r_9")
    events = [step.obj for step in codex_like(recorded).steps if isinstance(step, Event)]

    assert {e["response"]["id"] for e in events if "response" in e} == {"r_9"}
    assert events[-2]["item"]["content"][0]["text"] == "echo: second"


@pytest_twisted.ensureDeferred
async def test_plugin_serves_a_fake_upstream_on_the_listen_endpoint(leak_check: None) -> None:
    options = Options()
    options.parseOptions([])
    assert options["listen"] == "tcp:8090:interface=127.0.0.1"

    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    service = makeService(options)
    service.startService()
    await service.stopService()
