"""Conversation continuity on every upstream (issue: transcript replay, local warm-up,
canonical errors). A Codex-style conversation — ``generate:false`` warm-up, then turns that
send only new items with ``previous_response_id`` and ``store:false`` — must reach the upstream
with exactly the conversation so far, whatever happens to the upstream connection."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest_twisted
from conftest import gateway_config, start_gateway
from twisted.internet import reactor
from twisted.internet.task import Clock

from cch.config import ContinuityConfig, ProviderConfig, UpstreamWebSocketConfig
from cch.testing import FakeUpstream
from cch.testing.scripts import (
    CONNECTION_LIMIT_ERROR,
    Close,
    Event,
    Script,
    codex_events,
    error_json,
)
from cch.transcript import as_items

DEVELOPER = {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be brief"}]}


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


class Conversation:
    """Drives a Codex-style conversation and knows what context each turn must carry."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.history: list[Any] = []
        self.expected: dict[str, list[Any]] = {}  # response id -> full context it needed
        self.last_id: str | None = None

    async def turn(self, items: list[Any], **extra: Any) -> list[dict[str, Any]]:
        frame: dict[str, Any] = {"type": "response.create", "model": "gpt-5.5", "store": False, "input": items}
        if self.last_id is None:
            frame["generate"] = False
        else:
            frame["previous_response_id"] = self.last_id
        frame.update(extra)
        self.client.send_json(frame)
        events = await self.client.recv_turn()
        terminal = events[-1]
        assert terminal["type"] == "response.completed", terminal
        response = terminal["response"]
        self.expected[response["id"]] = self.history + items
        self.history = self.history + items + response["output"]
        self.last_id = response["id"]
        return events

    async def run(self, turns: int, before: Any = None) -> None:
        await self.turn([DEVELOPER])
        for n in range(1, turns):
            if before is not None:
                await before(n)
            await self.turn([user(f"turn {n}")])


def context_seen(fake: FakeUpstream, recorded: Any) -> list[Any]:
    """The whole context an upstream request stood for: its previous_response_id chain (as
    the fake remembers it) plus its own input."""
    previous = recorded.body.get("previous_response_id")
    base = fake.conversation(previous) if previous else []
    return base + as_items(recorded.body.get("input"))


def assert_every_turn_whole(conversation: Conversation, *fakes: FakeUpstream) -> None:
    produced = {r.response_id: (fake, r) for fake in fakes for r in fake.requests if r.response_id}
    for response_id, needed in conversation.expected.items():
        if response_id.startswith("resp_cch_"):
            continue  # answered by the gateway itself
        fake, recorded = produced[response_id]
        assert context_seen(fake, recorded) == needed, f"turn {response_id} lost context"


@pytest_twisted.ensureDeferred
async def test_six_turns_against_an_http_only_upstream(fake: FakeUpstream, tunnel_mode: str) -> None:
    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode, upstream="http"))
    try:
        talk = Conversation(await running.connect())
        await talk.run(6)
        assert_every_turn_whole(talk, fake)
        assert len(fake.requests) == 5, "the warm-up is answered locally"
        assert all("previous_response_id" not in r.body for r in fake.requests)
        assert next(iter(talk.expected)).startswith("resp_cch_")
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_six_turns_when_the_upstream_socket_drops_between_turns_3_and_4(
    fake: FakeUpstream, tunnel_mode: str
) -> None:
    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode, upstream="websocket"))
    try:
        talk = Conversation(await running.connect())

        async def before(n: int) -> None:
            if n == 3:
                # Turn 3 completes, then the upstream closes its socket.
                fake.enqueue(lambda r: Script((*(Event(e) for e in codex_events(r)), Close(1001, "restart"))))
            if n == 4:
                await fake.wait_for_ws_close(0)

        await talk.run(6, before)
        assert_every_turn_whole(talk, fake)
        assert len(fake.ws_connections) == 2
        first_on_new_socket = fake.ws_connections[1].turns[0]
        assert "previous_response_id" not in first_on_new_socket.body, "replayed, not pointed at"
        assert fake.ws_connections[1].turns[1].body["previous_response_id"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_connection_limit_is_never_seen_by_the_client(fake: FakeUpstream, tunnel_mode: str) -> None:
    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode, upstream="websocket"))
    try:
        talk = Conversation(await running.connect())
        async def before(n: int) -> None:
            if n == 4:
                fake.enqueue(Script((Event(CONNECTION_LIMIT_ERROR),)))

        await talk.run(6, before)
        assert_every_turn_whole(talk, fake)
        assert len(fake.ws_connections) == 2
        assert fake.ws_connections[0].close_code == 1000
        assert running.service.handler.ws_figures.retries["connection_limit"] == 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_an_old_socket_is_rotated_before_the_next_turn(fake: FakeUpstream, tunnel_mode: str) -> None:
    clock = Clock()
    config = gateway_config(
        fake, tunnel=tunnel_mode, upstream="websocket", upstream_websocket=UpstreamWebSocketConfig(max_socket_age=3300)
    )
    running = await start_gateway(config, clock)
    try:
        talk = Conversation(await running.connect())

        async def before(n: int) -> None:
            if n == 3:
                clock.advance(3300)

        await talk.run(5, before)
        assert_every_turn_whole(talk, fake)
        assert len(fake.ws_connections) == 2
        await fake.wait_for_ws_close(0)
        assert fake.ws_connections[0].close_code == 1000
        assert "previous_response_id" not in fake.ws_connections[1].turns[0].body
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_failover_to_a_second_provider_mid_conversation(fake: FakeUpstream, tunnel_mode: str) -> None:
    second = FakeUpstream(id_prefix="resp_second")
    await second.listen(reactor)
    providers = (
        ProviderConfig(name="primary", base_url=fake.base_url, websocket="off", priority=0),
        ProviderConfig(name="secondary", base_url=second.base_url, websocket="off", priority=1),
    )
    running = await start_gateway(replace(gateway_config(fake, tunnel=tunnel_mode), providers=providers))
    try:
        talk = Conversation(await running.connect())

        async def before(n: int) -> None:
            if n == 4:
                fake.enqueue(error_json(503, "overloaded", "try later"))

        await talk.run(6, before)
        assert_every_turn_whole(talk, fake, second)
        assert len(second.requests) == 1
        assert "previous_response_id" not in second.requests[0].body
    finally:
        await running.stop()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_a_chain_evicted_beyond_the_bounds_gets_the_canonical_error(fake: FakeUpstream) -> None:
    config = gateway_config(fake, upstream="http", continuity=ContinuityConfig(max_responses_per_connection=2))
    running = await start_gateway(config)
    try:
        client = await running.connect()
        talk = Conversation(client)
        await talk.turn([DEVELOPER])
        await talk.turn([user("one")])
        await talk.turn([user("two")])  # the warm-up record is evicted now
        client.send_json(
            {"type": "response.create", "model": "gpt-5.5", "store": False, "previous_response_id": talk.last_id, "input": [user("three")]}
        )
        error = await client.recv()
        assert error == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "previous_response_not_found",
                "message": f"Previous response with id '{talk.last_id}' not found.",
                "param": "previous_response_id",
            },
        }
        requests = len(fake.requests)
        # Codex answers by resending the full context without previous_response_id.
        client.send_json({"type": "response.create", "model": "gpt-5.5", "store": False, "input": talk.history + [user("three")]})
        assert (await client.recv_turn())[-1]["type"] == "response.completed"
        assert len(fake.requests) == requests + 1
        assert client.close_info is None
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_transcript_memory_stays_within_its_bound(fake: FakeUpstream) -> None:
    cap = 64 * 1024
    config = gateway_config(fake, upstream="http", continuity=ContinuityConfig(max_bytes_per_connection=cap))
    running = await start_gateway(config)
    try:
        client = await running.connect()
        store = running.service.transcripts
        assert store is not None
        pushed = 0
        while pushed < 10 * cap:
            client.send_json({"type": "response.create", "model": "m", "store": False, "input": [user("x" * 8192)]})
            assert (await client.recv_turn())[-1]["type"] == "response.completed"
            pushed += 8192
            assert store.bytes <= cap
        transcript = next(iter(store.sessions.values()))
        assert 0 < transcript.bytes <= cap and transcript.evicted
        assert len(transcript.records) < 10
    finally:
        await running.stop()
    assert running.service.transcripts is not None and running.service.transcripts.sessions == {}


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_forgot_a_stored_response_gets_the_turn_replayed(fake: FakeUpstream) -> None:
    running = await start_gateway(gateway_config(fake, upstream="http"))
    try:
        client = await running.connect()
        talk = Conversation(client)
        await talk.turn([DEVELOPER], store=True)
        await talk.turn([user("one")], store=True)
        fake._global_ids.clear()  # the provider lost what it had stored
        await talk.turn([user("two")], store=True)
        assert_every_turn_whole(talk, fake)
        assert fake.requests[-1].body.get("previous_response_id") is None
    finally:
        await running.stop()
