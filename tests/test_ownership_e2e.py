"""Response-id ownership end to end (issue 14, docs/usage.md#ownership): a
``previous_response_id`` created under one key is honoured only for that key; another key gets
the canonical ``previous_response_not_found`` and the id never reaches the upstream. Ownership
lives beside the usage ledger, so with the ledger on SQLite it survives a restart. Real gateways
on 127.0.0.1 in front of the fake upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from conftest import RunningGateway, eventually, gateway_config, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, Config, KeyLimitsConfig, UsageConfig
from cch.service import makeService
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient

MODEL = "gpt-5.5"
ALICE = ClientKey(name="alice", key="sk-cch-alice-0123456789abcdef")
BOB = ClientKey(name="bob", key="sk-cch-bob-0123456789abcdef00")


def bearer(client_key: ClientKey | None) -> dict[str, str]:
    return {} if client_key is None else {"Authorization": f"Bearer {client_key.key}"}


def not_found_event(response_id: str) -> dict[str, Any]:
    """The canonical error event for an id nobody may continue from (what Codex resends its
    whole context on)."""
    return {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": f"Previous response with id '{response_id}' not found.",
            "param": "previous_response_id",
        },
    }


def create(**fields: Any) -> dict[str, Any]:
    # store: true, so the upstream keeps the response for anyone who names it: what ownership guards.
    frame: dict[str, Any] = {
        "type": "response.create",
        "model": MODEL,
        "store": True,
        "input": "hi",
    }
    frame.update(fields)
    return frame


def post_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "store": True, "input": "hi"}
    body.update(fields)
    return body


class Harness:
    """One test's gateways, HTTP client pool and WebSocket clients; all closed at the end."""

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.running: list[tuple[RunningGateway, Clock]] = []

    async def start(self, config: Config, run_dir: Path | None = None) -> RunningGateway:
        clock = Clock()
        service = makeService(
            config, reactor, clock, run_dir=None if run_dir is None else str(run_dir)
        )
        service.startService()
        await service.when_listening()
        running = RunningGateway(service)
        self.running.append((running, clock))
        return running

    async def stop(self, running: RunningGateway) -> None:
        for entry in self.running:
            if entry[0] is running:
                self.running.remove(entry)
                await self._stop(*entry)
                return

    async def _stop(self, running: RunningGateway, clock: Clock) -> None:
        # Clients first, while the Clock stands still (a keepalive must not cut a close short).
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

    async def post(
        self, running: RunningGateway, client_key: ClientKey | None, body: dict[str, Any]
    ) -> tuple[int, Any]:
        return await within(
            Deferred.fromCoroutine(self._post(running, client_key, body)), "the answer to a POST"
        )

    async def _post(
        self, running: RunningGateway, client_key: ClientKey | None, body: dict[str, Any]
    ) -> tuple[int, Any]:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json=body,
            headers=bearer(client_key),
            pool=self.pool,
            reactor=reactor,
        )
        return response.code, json.loads(await treq.content(response))

    async def close(self) -> None:
        for entry in list(self.running):
            await self._stop(*entry)
        self.running.clear()
        await self.pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


async def connect(running: RunningGateway, client_key: ClientKey | None) -> ResponsesWSClient:
    return await within(
        Deferred.fromCoroutine(running.connect(headers=bearer(client_key))), "the WebSocket to open"
    )


async def turn(
    client: ResponsesWSClient, running: RunningGateway, frame: dict[str, Any]
) -> list[Any]:
    client.send_json(frame)
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the end of the turn")
    await eventually(lambda: running.service.handler.active == 0, "the turn to end")
    return events


def created_id(events: list[Any]) -> str:
    assert events[-1]["type"] == "response.completed", events[-1]
    rid = events[-1]["response"]["id"]
    assert isinstance(rid, str)
    return rid


def forwarded(fake: FakeUpstream, response_id: str) -> list[Any]:
    """The upstream requests that named ``response_id`` as their previous response."""
    return [r for r in fake.requests if r.body.get("previous_response_id") == response_id]


def keyed(
    fake: FakeUpstream, tunnel: str = "in-process", upstream: str = "http", **overrides: Any
) -> Config:
    return gateway_config(fake, tunnel=tunnel, upstream=upstream, keys=(ALICE, BOB), **overrides)


@pytest_twisted.ensureDeferred
async def test_another_keys_previous_response_id_gets_the_canonical_error_event_and_is_never_forwarded(
    fake: FakeUpstream, tunnel_mode: str, upstream_transport: str, harness: Harness
) -> None:
    running = await harness.start(keyed(fake, tunnel_mode, upstream_transport))
    alice, bob = await connect(running, ALICE), await connect(running, BOB)
    rid = created_id(await turn(alice, running, create(input="alice's secret")))
    seen = len(fake.requests)
    refused = await turn(bob, running, create(previous_response_id=rid, input="show me"))
    assert refused == [not_found_event(rid)]
    assert len(fake.requests) == seen and forwarded(fake, rid) == []
    # Bob's connection stays open and serves his own turns.
    assert bob.close_info is None
    created_id(await turn(bob, running, create(input="bob's own")))
    # Alice continues from her own response.
    follow_up = await turn(alice, running, create(previous_response_id=rid, input="go on"))
    assert follow_up[-1]["type"] == "response.completed"
    assert all(r.body.get("input") != "show me" for r in fake.requests)


@pytest_twisted.ensureDeferred
async def test_another_keys_previous_response_id_over_http_is_a_400_json_and_never_forwarded(
    fake: FakeUpstream, harness: Harness
) -> None:
    running = await harness.start(keyed(fake))
    status, response = await harness.post(running, ALICE, post_body())
    assert status == 200
    rid = response["id"]
    status, refused = await harness.post(running, BOB, post_body(previous_response_id=rid))
    assert (status, refused) == (400, {"error": not_found_event(rid)["error"]})
    assert len(fake.requests) == 1 and forwarded(fake, rid) == []
    # An id made over WebSocket is guarded over HTTP too, and the other way round.
    alice = await connect(running, ALICE)
    ws_rid = created_id(await turn(alice, running, create()))
    status, refused = await harness.post(running, BOB, post_body(previous_response_id=ws_rid))
    assert (status, refused) == (400, {"error": not_found_event(ws_rid)["error"]})
    bob = await connect(running, BOB)
    assert await turn(bob, running, create(previous_response_id=rid)) == [not_found_event(rid)]
    assert forwarded(fake, rid) == [] and forwarded(fake, ws_rid) == []
    # Alice continues from both.
    status, response = await harness.post(running, ALICE, post_body(previous_response_id=rid))
    assert (status, response["status"]) == (200, "completed")
    status, response = await harness.post(running, ALICE, post_body(previous_response_id=ws_rid))
    assert (status, response["status"]) == (200, "completed")
    assert len(forwarded(fake, rid)) == 1 and len(forwarded(fake, ws_rid)) == 1


@pytest_twisted.ensureDeferred
async def test_ownership_survives_a_restart_on_the_sqlite_ledger(
    fake: FakeUpstream, tmp_path: Path, harness: Harness
) -> None:
    config = keyed(fake, usage=UsageConfig(database="sqlite:///usage.sqlite3"))
    first = await harness.start(config, tmp_path)
    status, response = await harness.post(first, ALICE, post_body())
    assert status == 200
    rid = response["id"]
    alice = await connect(first, ALICE)
    ws_rid = created_id(await turn(alice, first, create()))
    await harness.stop(first)

    second = await harness.start(config, tmp_path)  # the same database, nothing in memory
    assert second.service.ledger.recent.get(rid) is None
    seen = len(fake.requests)
    status, refused = await harness.post(second, BOB, post_body(previous_response_id=rid))
    assert (status, refused) == (400, {"error": not_found_event(rid)["error"]})
    bob = await connect(second, BOB)
    assert await turn(bob, second, create(previous_response_id=ws_rid)) == [not_found_event(ws_rid)]
    assert len(fake.requests) == seen
    status, response = await harness.post(second, ALICE, post_body(previous_response_id=rid))
    assert (status, response["status"]) == (200, "completed")
    assert len(forwarded(fake, rid)) == 1
    # An id no key owns is the upstream's to judge, with the database asked too.
    status, unknown = await harness.post(
        second, BOB, post_body(previous_response_id="resp_elsewhere")
    )
    assert (status, unknown["error"]["code"]) == (400, "previous_response_not_found")
    assert len(forwarded(fake, "resp_elsewhere")) == 1


@pytest_twisted.ensureDeferred
async def test_an_id_the_gateway_never_saw_is_forwarded_for_the_upstream_to_decide(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    running = await harness.start(keyed(fake, tunnel_mode))
    bob = await connect(running, BOB)
    events = await turn(bob, running, create(previous_response_id="resp_from_elsewhere"))
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "previous_response_not_found"
    assert len(forwarded(fake, "resp_from_elsewhere")) == 1
    status, _ = await harness.post(
        running, BOB, post_body(previous_response_id="resp_from_elsewhere")
    )
    assert status == 400
    assert len(forwarded(fake, "resp_from_elsewhere")) == 2


@pytest_twisted.ensureDeferred
async def test_a_keyless_gateway_does_no_ownership_check(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    running = await harness.start(replace(keyed(fake, tunnel_mode), keys=()))
    first, second = await connect(running, None), await connect(running, None)
    rid = created_id(await turn(first, running, create()))
    events = await turn(second, running, create(previous_response_id=rid))
    assert events[-1]["type"] == "response.completed"
    assert len(forwarded(fake, rid)) == 1
    status, response = await harness.post(running, None, post_body(previous_response_id=rid))
    assert (status, response["status"]) == (200, "completed")
    assert len(forwarded(fake, rid)) == 2


@pytest_twisted.ensureDeferred
async def test_a_refused_foreign_id_uses_none_of_the_keys_requests_per_minute(
    fake: FakeUpstream, tunnel_mode: str, harness: Harness
) -> None:
    limited = replace(BOB, limits=KeyLimitsConfig(requests_per_minute=1))
    running = await harness.start(replace(keyed(fake, tunnel_mode), keys=(ALICE, limited)))
    alice, bob = await connect(running, ALICE), await connect(running, limited)
    rid = created_id(await turn(alice, running, create()))
    assert await turn(bob, running, create(previous_response_id=rid)) == [not_found_event(rid)]
    created_id(await turn(bob, running, create(input="bob's own")))  # his one request this minute
    refused = await turn(bob, running, create(input="one too many"))
    assert refused[0]["error"]["code"] == "rate_limit_exceeded"
    assert forwarded(fake, rid) == [] and len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_an_owner_waiting_in_the_spill_file_is_honoured_before_it_is_replayed(
    fake: FakeUpstream, tmp_path: Path, harness: Harness
) -> None:
    # Alice's response, stored upstream; a previous run spilled its owner while the database
    # was down (docs/usage.md#when-the-database-is-down: {"owner": [response_id, key]}).
    status, response = await harness.post(await harness.start(keyed(fake)), ALICE, post_body())
    assert status == 200
    rid = response["id"]
    spill = tmp_path / "cch-usage-spill.jsonl"
    spill.write_text(json.dumps({"owner": [rid, ALICE.name]}) + "\n", encoding="utf-8")

    # The database is slow to take the replay (the write is held until released).
    config = keyed(fake, usage=UsageConfig(database="sqlite:///usage.sqlite3"))
    clock = Clock()
    service = makeService(config, reactor, clock, run_dir=str(tmp_path))
    store = service.ledger.store
    assert store is not None
    write = store.write
    replaying: Deferred[None] = Deferred()
    release: Deferred[None] = Deferred()

    def held_write(rows: Any, owners: Any) -> Deferred[int]:
        if not replaying.called:
            replaying.callback(None)
            return release.addCallback(lambda _: write(rows, owners))
        return write(rows, owners)

    store.write = held_write  # type: ignore[method-assign]
    service.startService()
    await service.when_listening()
    running = RunningGateway(service)
    harness.running.append((running, clock))
    await within(replaying, "the spill file's replay to start")
    seen = len(fake.requests)
    # Bob's turn asks whose the id is while the replay is held: it waits for the replay...
    posting = Deferred.fromCoroutine(harness.post(running, BOB, post_body(previous_response_id=rid)))
    try:
        await eventually(lambda: running.service.handler.active == 1, "Bob's turn to be in the handler")
        assert not posting.called
    finally:
        release.callback(None)
    # ...and is then refused like an unknown id, never forwarded.
    status, refused = await within(posting, "Bob's answer")
    assert forwarded(fake, rid) == [] and len(fake.requests) == seen
    assert (status, refused) == (400, {"error": not_found_event(rid)["error"]})
