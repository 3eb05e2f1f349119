"""Translated providers end to end (issue 16, docs/providers.md): a gateway whose provider speaks
Chat Completions or Anthropic Messages serves WebSocket and HTTP clients the Responses events
Codex renders; a conversation continues by replay (these upstreams store nothing); upstream
errors come back in the Responses shapes, and failover crosses API kinds. Real gateways on
127.0.0.1 in front of the fake upstream, which serves /v1/chat/completions and /v1/messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import RunningGateway, event_types, gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, Config, ProviderConfig
from cch.testing import FakeUpstream, Recorded, Script
from cch.testing.anthropic_scripts import anthropic_error, anthropic_like
from cch.testing.chat_scripts import ToolCall, chat_events, chat_like, chat_sse, chat_usage
from cch.testing.scripts import codex_like, drop_after, error_json, hold

KEY = ClientKey(name="alice", key="sk-cch-alice-0123456789abcdef")
PROVIDER_KEY = "sk-upstream-provider-key"
MODEL = "gpt-5.5"
SERVED = "qwen3-coder"


def by_path(recorded: Recorded) -> Script:
    """Whatever API the request was made in, the fake answers in it."""
    if recorded.path.endswith("/chat/completions"):
        return chat_like(recorded)
    if recorded.path.endswith("/messages"):
        return anthropic_like(recorded)
    return codex_like(recorded)


@pytest.fixture
def fake(fake: FakeUpstream) -> FakeUpstream:
    fake.default = by_path
    return fake


def provider(fake: FakeUpstream, api: str, name: str | None = None, **fields: Any) -> ProviderConfig:
    return ProviderConfig(
        name=name or api,
        base_url=fake.base_url,
        api=api,
        websocket="off" if api != "responses" else "auto",
        api_key=PROVIDER_KEY,
        model_map=((MODEL, SERVED),),
        **fields,
    )


def translated(fake: FakeUpstream, *providers: ProviderConfig, **overrides: Any) -> Config:
    return gateway_config(fake, providers=providers, **{"keys": (KEY,), **overrides})


@pytest_twisted.async_yield_fixture
async def gateways() -> AsyncIterator[list[RunningGateway]]:
    started: list[RunningGateway] = []
    yield started
    for running in started:
        await running.stop()


async def start(gateways: list[RunningGateway], config: Config) -> RunningGateway:
    running = await start_gateway(config)
    gateways.append(running)
    return running


def create(**fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "response.create", "model": MODEL, "store": False, "input": "hi"}
    frame.update(fields)
    return frame


async def turn(client: Any, frame: dict[str, Any]) -> list[dict[str, Any]]:
    client.send_json(frame)
    events: list[dict[str, Any]] = await within(Deferred.fromCoroutine(client.recv_turn()), "the end of the turn")
    return events


def final_text(events: list[dict[str, Any]]) -> str:
    response = events[-1]["response"]
    return "".join(
        part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]
    )


async def post(running: RunningGateway, body: dict[str, Any], key: ClientKey = KEY) -> tuple[int, str, bytes]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json.dumps(body).encode(),
            headers={"authorization": f"Bearer {key.key}", "content-type": "application/json"},
            pool=pool,
        )
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        return response.code, kind, await response.content()
    finally:
        await pool.closeCachedConnections()


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("api", ["chat", "anthropic"])
@pytest_twisted.ensureDeferred
async def test_a_websocket_turn_reaches_a_translated_provider_and_comes_back_as_responses_events(
    fake: FakeUpstream, gateways: list[RunningGateway], api: str
) -> None:
    running = await start(gateways, translated(fake, provider(fake, api)))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    events = await turn(client, create(instructions="be brief"))
    assert event_types(events)[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert event_types(events)[-1] == "response.completed"
    assert final_text(events) == "echo: hi"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # The client sees its own model name; the upstream was asked for the mapped one.
    assert events[-1]["response"]["model"] == MODEL
    (sent,) = fake.requests
    assert sent.path == ("/v1/chat/completions" if api == "chat" else "/v1/messages")
    assert sent.body["model"] == SERVED and sent.body["stream"] is True
    if api == "chat":
        assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert sent.body["messages"][0] == {"role": "system", "content": "be brief"}
    else:
        assert sent.headers["x-api-key"] == PROVIDER_KEY and "authorization" not in sent.headers
        assert sent.headers["anthropic-version"] == "2023-06-01"
    assert all(KEY.key not in value for value in sent.headers.values())


@pytest.mark.parametrize("api", ["chat", "anthropic"])
@pytest_twisted.ensureDeferred
async def test_a_continuation_is_replayed_whole_to_a_stateless_upstream(
    fake: FakeUpstream, gateways: list[RunningGateway], api: str
) -> None:
    running = await start(gateways, translated(fake, provider(fake, api)))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    first = await turn(client, create(input="first question"))
    rid = first[-1]["response"]["id"]
    second = await turn(client, create(input="second question", previous_response_id=rid))
    assert final_text(second) == "echo: second question"
    replayed = fake.requests[1].body
    assert "previous_response_id" not in replayed
    texts = json.dumps(replayed["messages"])
    assert "first question" in texts and "echo: first question" in texts and "second question" in texts


@pytest_twisted.ensureDeferred
async def test_a_tool_call_round_trip_through_a_chat_provider(fake: FakeUpstream, gateways: list[RunningGateway]) -> None:
    running = await start(gateways, translated(fake, provider(fake, "chat")))
    call = ToolCall(call_id="call_1", name="shell", arguments='{"command":["ls","-la"]}', pieces=5)
    fake.enqueue(chat_sse(chat_events(tool_calls=[call], usage=chat_usage(50, 9))))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    tools = [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}]
    events = await turn(client, create(input="list files", tools=tools))
    (item,) = events[-1]["response"]["output"]
    assert (item["type"], item["call_id"], item["name"]) == ("function_call", "call_1", "shell")
    assert json.loads(item["arguments"]) == {"command": ["ls", "-la"]}
    assert events[-1]["response"]["usage"]["input_tokens"] == 50
    output = {"type": "function_call_output", "call_id": "call_1", "output": "a.txt\nb.txt"}
    answer = await turn(client, create(input=[output], tools=tools, previous_response_id=events[-1]["response"]["id"]))
    assert event_types(answer)[-1] == "response.completed"
    messages = fake.requests[1].body["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_1"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt"}


@pytest_twisted.ensureDeferred
async def test_http_clients_get_an_event_stream_or_the_final_response_object(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    running = await start(gateways, translated(fake, provider(fake, "chat")))
    status, kind, raw = await post(running, {"model": MODEL, "input": "hi", "stream": True})
    assert (status, kind) == (200, "text/event-stream")
    events = sse_events(raw)
    assert event_types(events)[0] == "response.created" and final_text(events) == "echo: hi"
    status, kind, raw = await post(running, {"model": MODEL, "input": "hi"})
    assert (status, kind) == (200, "application/json")
    response = json.loads(raw)
    assert response["object"] == "response" and response["status"] == "completed"
    assert response["output"][0]["content"][0]["text"] == "echo: hi"


@pytest_twisted.ensureDeferred
async def test_an_upstream_error_comes_back_in_the_responses_shape(fake: FakeUpstream, gateways: list[RunningGateway]) -> None:
    running = await start(gateways, translated(fake, provider(fake, "anthropic")))
    fake.enqueue(anthropic_error(400, "invalid_request_error", "messages: text content blocks must be non-empty"))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    (event,) = await turn(client, create())
    assert event["type"] == "error"
    assert event["error"]["type"] == "invalid_request_error"
    assert "non-empty" in event["error"]["message"]
    # A request the provider cannot carry is refused before it is sent.
    status, _, raw = await post(running, {"model": MODEL, "input": "hi", "background": True})
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_failover_crosses_api_kinds(fake: FakeUpstream, gateways: list[RunningGateway]) -> None:
    chat = provider(fake, "chat", priority=0)
    responses = provider(fake, "responses", name="openai", priority=1)
    running = await start(gateways, translated(fake, chat, responses))
    fake.enqueue(error_json(503, "server_error", "overloaded"))  # the chat provider is down: the next one serves
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    events = await turn(client, create())
    assert event_types(events)[-1] == "response.completed"
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/v1/responses"]
    assert fake.requests[1].body["model"] == SERVED  # model_map applies to every provider


@pytest_twisted.ensureDeferred
async def test_a_warm_up_is_answered_by_the_gateway(fake: FakeUpstream, gateways: list[RunningGateway]) -> None:
    running = await start(gateways, translated(fake, provider(fake, "chat")))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    warmup = await turn(client, create(generate=False))
    assert event_types(warmup) == ["response.created", "response.completed"]
    events = await turn(client, create(previous_response_id=warmup[-1]["response"]["id"]))
    assert final_text(events) == "echo: hi"
    assert len(fake.requests) == 1  # the warm-up never reached the upstream


@pytest_twisted.ensureDeferred
async def test_the_ledger_row_carries_the_tokens_the_translated_upstream_reported(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    running = await start(gateways, translated(fake, provider(fake, "chat")))
    fake.enqueue(chat_sse(chat_events(text="done", usage=chat_usage(120, 7, cached_tokens=20, reasoning_tokens=3))))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    await turn(client, create())
    ledger = running.service.ledger
    assert ledger.tokens[("alice", "chat", MODEL, "input")] == 120
    assert ledger.tokens[("alice", "chat", MODEL, "cached_input")] == 20
    assert ledger.tokens[("alice", "chat", MODEL, "output")] == 7
    assert ledger.tokens[("alice", "chat", MODEL, "reasoning")] == 3
    assert ledger.turns[("alice", "completed")] == 1


@pytest_twisted.ensureDeferred
async def test_a_providers_output_cap_fills_in_when_the_request_sets_none(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    running = await start(gateways, translated(fake, provider(fake, "anthropic", max_output_tokens=8192)))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    await turn(client, create())  # Codex sends no max_output_tokens
    await turn(client, create(max_output_tokens=1000))
    assert [r.body["max_tokens"] for r in fake.requests] == [8192, 1000]


@pytest_twisted.ensureDeferred
async def test_an_http_client_continues_a_stored_translated_response_of_its_own_key(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    other = ClientKey(name="bob", key="sk-cch-bob-0123456789abcdef00")
    running = await start(gateways, translated(fake, provider(fake, "chat"), keys=(KEY, other)))
    status, _, raw = await post(running, {"model": MODEL, "input": "first question"})
    assert status == 200
    rid = json.loads(raw)["id"]
    status, _, raw = await post(running, {"model": MODEL, "input": "second", "previous_response_id": rid})
    assert status == 200 and json.loads(raw)["output"][0]["content"][0]["text"] == "echo: second"
    texts = json.dumps(fake.requests[1].body["messages"])
    assert "first question" in texts and "echo: first question" in texts
    # store=false keeps nothing, and another key's id is not found.
    status, _, raw = await post(running, {"model": MODEL, "input": "x", "store": False})
    unstored = json.loads(raw)["id"]
    status, _, raw = await post(running, {"model": MODEL, "input": "y", "previous_response_id": unstored})
    assert status == 400 and json.loads(raw)["error"]["code"] == "previous_response_not_found"
    seen = len(fake.requests)
    status, _, raw = await post(running, {"model": MODEL, "input": "z", "previous_response_id": rid}, key=other)
    assert status == 400 and json.loads(raw)["error"]["code"] == "previous_response_not_found"
    assert len(fake.requests) == seen


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_mid_stream_cancels_the_translated_upstream_request(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    running = await start(gateways, translated(fake, provider(fake, "chat")))
    fake.enqueue(hold(chat_events(text="partial answer", done=False)[:3]))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    client.send_json(create())
    seen = [await within(client.recv(), "an event") for _ in range(3)]
    assert event_types(seen) == ["response.created", "response.in_progress", "response.output_item.added"]
    await client.close()
    cancelled = await within(fake.wait_for_cancelled(0), "the upstream request to be cancelled")
    assert cancelled.path == "/v1/chat/completions"
    await within(running.service.handler.wait_idle(), "the turn to end")


@pytest_twisted.ensureDeferred
async def test_a_stream_cut_mid_answer_ends_the_turn_with_an_error_event(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    running = await start(gateways, translated(fake, provider(fake, "chat")))
    fake.enqueue(drop_after(chat_events(text="a long answer that never ends"), 4))
    client = await running.connect(headers={"Authorization": f"Bearer {KEY.key}"})
    events = await turn(client, create())
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "upstream_stream_error"
    assert client.close_info is None  # the connection carries on
    fake.default = by_path
    assert final_text(await turn(client, create(input="again"))) == "echo: again"


@pytest_twisted.ensureDeferred
async def test_a_stream_id_in_an_http_body_never_reaches_the_upstream(
    fake: FakeUpstream, gateways: list[RunningGateway]
) -> None:
    responses = provider(fake, "responses", name="openai")
    running = await start(gateways, translated(fake, responses, provider(fake, "chat", priority=1)))
    status, _, _ = await post(running, {"model": MODEL, "input": "hi", "stream_id": "lane-1"})
    assert status == 200
    assert "stream_id" not in fake.requests[0].body and fake.requests[0].path == "/v1/responses"
