"""The usage ledger end to end: a real gateway (makeService, real sockets on 127.0.0.1) in front
of the fake upstream, its ledger on a real SQLite file and on the machine's real PostgreSQL, and
the rows read back from the database with plain SQL (docs/usage.md, docs/architecture.md "The
path of one turn").

Gateway timers (drain deadline, idle timeout, the ledger's flush interval) run on a task.Clock;
the database work runs on the store's real threads and a test waits for it with
``ledger.flush()`` or the service's stop. The SIGTERM test runs the gateway as a child process.
"""

from __future__ import annotations

import io
import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import eventually, response_create, within
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from usage_e2e_support import (
    AUTH,
    COST,
    DAY,
    KEY,
    PRICED,
    REPLICA,
    SNAPSHOT,
    TOKENS,
    UNPRICED,
    answer,
    by_status,
    flushed_rows,
    gateway_clock,
    get,
    json_event,
    ledger_config,
    request_ids,
    rows,
    scrape,
    spawn_gateway,
    start,
)
from usage_fixtures import PostgresDatabase, postgres_admin

from cch.cli import usage
from cch.testing import Drop, FakeUpstream, Hold, Script, error_json
from cch.testing.client import ResponsesWSClient

pytest_plugins = ["usage_fixtures"]

NO_TOKENS = (None, None, None, None)


def drop_after_two(script: Script) -> Script:
    """``script``'s first two events (created, a delta), then the connection dropped."""
    return replace(script, steps=(*script.steps[:2], Drop()))


def tokens(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["input_tokens"],
        row["cached_input_tokens"],
        row["output_tokens"],
        row["reasoning_tokens"],
    )


def metric(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest_twisted.async_yield_fixture
async def launch() -> Any:
    """Start gateways; any still running at teardown (a failed test) is stopped, its clients
    dropped and its drain deadline passed on its clock."""
    started: list[tuple[Any, Clock]] = []

    async def go(config: Any, clock: Clock, run_dir: Path) -> Any:
        running = await start(config, clock, run_dir)
        started.append((running, clock))
        return running

    yield go
    for running, clock in started:
        if not running.service.running:
            continue
        for client in running.clients:
            if client.close_info is None:
                client.abort()
        stopping = running.service.stopService()

        def stopped(clock: Clock = clock, stopping: Deferred[Any] = stopping) -> bool:
            clock.advance(10)  # past the drain deadline and the close handshake's bound
            return stopping.called

        await eventually(stopped, "the gateway's stop at teardown", 30)


class BodyReader(Protocol):
    """A streamed HTTP body: ``saw`` fires once ``marker`` has arrived, ``done`` at its end;
    ``leave()`` drops the connection the way a client that goes away does."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.data = b""
        self.saw: Deferred[None] = Deferred()
        self.done: Deferred[BaseException] = Deferred()  # fires with why it ended

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.marker in self.data and not self.saw.called:
            self.saw.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback(reason.value)

    def leave(self) -> None:
        self.transport.stopProducing()  # twisted.web.client: abort the response's connection


async def post_stream(
    running: Any, pool: HTTPConnectionPool, body: dict[str, Any], marker: bytes
) -> BodyReader:
    response = await within(
        treq.post(running.http_url + "/v1/responses", json=body, headers=AUTH, pool=pool),
        "the response head",
    )
    assert response.code == 200
    reader = BodyReader(marker)
    response.deliverBody(reader)
    return reader


# -- 1. one row per turn, with the upstream's counts ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_row_per_websocket_turn_with_the_upstream_token_counts(
    fake: FakeUpstream, database: Any, launch: Any, tunnel_mode: str, upstream_transport: str
) -> None:
    """Two turns on one connection are two rows (per turn, not per connection), each with the
    counts of its terminal's ``usage``, the cost from [[prices]] (a dated snapshot billed as its
    model; null, never 0, without a price), and the time to the first event and the duration on
    the gateway's clock. Through the HTTP tunnel the turn still reaches one handler: one row,
    client transport websocket, the edge's request id."""
    clock = gateway_clock()
    fake.clock = clock
    fake.enqueue(answer(before_first=0.25, before_terminal=0.5), answer(served=None))
    running = await launch(
        ledger_config(fake, database, tunnel=tunnel_mode, upstream=upstream_transport),
        clock,
        database.run_dir,
    )
    with request_ids("ws_request_started") as edge_ids:
        client = await running.connect(headers=AUTH)
        client.send_json(response_create(model=PRICED))
        await within(fake.wait_for_requests(1), "the first turn upstream")
        clock.advance(0.25)
        assert (await within(client.recv(), "response.created"))["type"] == "response.created"
        clock.advance(0.5)
        first = await within(Deferred.fromCoroutine(client.recv_turn()), "the first terminal")
        assert first[-1]["type"] == "response.completed"
        client.send_json(response_create(model=UNPRICED))
        second = await within(Deferred.fromCoroutine(client.recv_turn()), "the second terminal")
        assert second[-1]["type"] == "response.completed"
    await running.service.ledger.flush()

    found = rows(database)
    assert [r["request_id"] for r in found] == edge_ids and len(set(edge_ids)) == 2
    one, two = found
    common = {
        "key": KEY.name,
        "provider": "primary",
        "client_transport": "websocket",
        "upstream_transport": upstream_transport,
        "status": "completed",
        "error_code": None,
        "attempts": 1,
        "replayed": False,
        "replica": REPLICA,
    }
    assert {k: one[k] for k in common} == common
    assert {k: two[k] for k in common} == common
    assert (one["response_id"], two["response_id"]) == (
        fake.requests[0].response_id,
        fake.requests[1].response_id,
    )
    assert (one["model_requested"], one["model_served"]) == (PRICED, SNAPSHOT)
    assert (two["model_requested"], two["model_served"]) == (UNPRICED, UNPRICED)
    assert tokens(one) == TOKENS and tokens(two) == TOKENS
    assert one["cost"] == pytest.approx(COST)
    assert two["cost"] is None  # no price: unknown, never 0
    assert (one["first_event_ms"], one["duration_ms"]) == (pytest.approx(250), pytest.approx(750))
    assert one["ended_at"] - one["started_at"] == pytest.approx(0.75)
    assert (two["first_event_ms"], two["duration_ms"]) == (0, 0)

    samples = await scrape(running)
    # One handler per turn, whatever the tunnel: each turn counted once.
    assert metric(samples, "cch_turns_total", key=KEY.name, status="completed") == 2
    assert metric(samples, "cch_usage_rows_written_total") == 2
    for kind, count in zip(("input", "cached_input", "output", "reasoning"), TOKENS, strict=True):
        labels = {"key": KEY.name, "provider": "primary", "kind": kind}
        assert metric(samples, "cch_tokens_total", model=SNAPSHOT, **labels) == count
        assert metric(samples, "cch_tokens_total", model=UNPRICED, **labels) == count
    assert metric(samples, "cch_usage_rows_dropped_total") == 0
    assert len(fake.requests) == 2
    await running.stop()
    assert [r["request_id"] for r in rows(database)] == edge_ids  # the stop wrote nothing twice


@pytest_twisted.ensureDeferred
async def test_the_http_tunnel_carries_a_websocket_turn_to_one_handler_and_one_row(
    fake: FakeUpstream, database: Any, launch: Any, upstream_transport: str
) -> None:
    """``tunnel.mode = "http"``: each WebSocket turn is POSTed to the gateway's own listener,
    and only the handler behind that POST records it: one row per turn, with the edge's
    request id and client transport websocket; no second row for the internal HTTP hop."""
    clock = gateway_clock()
    fake.default = answer()
    config = ledger_config(fake, database, tunnel="http", upstream=upstream_transport)
    running = await launch(config, clock, database.run_dir)
    with request_ids("ws_request_started") as edge_ids:
        await ws_turns(running, 3)
    found = await flushed_rows(running, database)
    assert sorted(r["request_id"] for r in found) == sorted(edge_ids) and len(set(edge_ids)) == 3
    assert {r["client_transport"] for r in found} == {"websocket"}
    samples = await scrape(running)
    assert metric(samples, "cch_turns_total", key=KEY.name, status="completed") == 3
    assert metric(samples, "cch_usage_rows_dropped_total") == 0
    await running.stop()
    assert database.count() == 3


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest_twisted.ensureDeferred
async def test_one_row_per_http_post_turn_with_the_upstream_token_counts(
    fake: FakeUpstream, database: Any, launch: Any, stream: bool
) -> None:
    """A plain ``POST /v1/responses``, streamed (SSE) or not (one JSON body): one row with the
    counts of the terminal's (or the body's) ``usage``."""
    clock = gateway_clock()
    fake.clock = clock
    fake.enqueue(answer(before_first=0.25, before_terminal=0.5))
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    pool = HTTPConnectionPool(reactor, persistent=False)
    with request_ids("upstream_attempt_started") as handler_ids:
        posting = treq.post(
            running.http_url + "/v1/responses",
            json={"model": PRICED, "input": "hi", "stream": stream},
            headers=AUTH,
            pool=pool,
        )
        await within(fake.wait_for_requests(1), "the turn upstream")
        clock.advance(0.25)
        response = await within(posting, "the response head")
        assert response.code == 200
        if stream:
            reader = BodyReader(b"response.created")
            response.deliverBody(reader)
            await within(reader.saw, "response.created")
            clock.advance(0.5)
            await within(reader.done, "the end of the stream")
            assert b"response.completed" in reader.data
        else:
            body = json.loads(await within(treq.content(response), "the JSON body"))
            assert body["usage"]["output_tokens"] == 300
    await running.service.ledger.flush()

    [row] = rows(database)
    assert row["request_id"] == handler_ids[0]
    assert {
        k: row[k]
        for k in (
            "response_id",
            "key",
            "provider",
            "model_requested",
            "model_served",
            "client_transport",
            "upstream_transport",
        )
    } == {
        "response_id": fake.requests[0].response_id,
        "key": KEY.name,
        "provider": "primary",
        "model_requested": PRICED,
        "model_served": SNAPSHOT,
        "client_transport": "http",
        "upstream_transport": "http",
    }
    assert (row["status"], row["error_code"], row["attempts"], row["replayed"], row["replica"]) == (
        "completed",
        None,
        1,
        False,
        REPLICA,
    )
    assert tokens(row) == TOKENS and row["cost"] == pytest.approx(COST)
    assert row["first_event_ms"] == pytest.approx(250)
    assert row["duration_ms"] == pytest.approx(750 if stream else 250)
    await running.stop()
    assert len(rows(database)) == 1


@pytest_twisted.ensureDeferred
async def test_a_turn_continued_by_replaying_the_transcript_is_marked_replayed(
    fake: FakeUpstream, database: Any, launch: Any, tunnel_mode: str
) -> None:
    """An HTTP upstream cannot continue a ``store: false`` response: the gateway replays the
    conversation from the transcript, and the row says so."""
    clock = gateway_clock()
    fake.default = answer()
    config = ledger_config(fake, database, tunnel=tunnel_mode, upstream="http")
    running = await launch(config, clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    first = await within(Deferred.fromCoroutine(client.recv_turn()), "the first turn")
    previous = first[-1]["response"]["id"]
    client.send_json(response_create(model=PRICED, previous_response_id=previous))
    second = await within(Deferred.fromCoroutine(client.recv_turn()), "the second turn")
    assert second[-1]["type"] == "response.completed"
    assert "previous_response_id" not in fake.requests[1].body  # replayed, not continued
    await running.service.ledger.flush()
    assert {r["response_id"]: r["replayed"] for r in rows(database)} == {
        previous: False,
        fake.requests[1].response_id: True,
    }
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_turn_served_by_the_second_provider_counts_two_attempts(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """The first provider answers 500: failover before the first byte; the row names the
    provider that served the turn and both attempts."""
    clock = gateway_clock()
    fake.enqueue(error_json(500, "server_error", "Down."), answer())
    config = ledger_config(fake, database)
    primary = config.providers[0]
    secondary = replace(primary, name="secondary", priority=1)
    running = await launch(replace(config, providers=(primary, secondary)), clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")
    assert events[-1]["type"] == "response.completed"
    [row] = await flushed_rows(running, database)
    assert (row["provider"], row["attempts"], row["status"], tokens(row)) == (
        "secondary",
        2,
        "completed",
        TOKENS,
    )
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_fallback_from_the_upstream_websocket_to_http_is_the_same_attempt(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """The upstream refuses the WebSocket upgrade: the turn goes over HTTP to the same
    provider, one attempt, upstream transport http."""
    clock = gateway_clock()
    fake.upgrade_status = 404
    fake.enqueue(answer())
    config = ledger_config(fake, database, upstream="websocket")
    running = await launch(config, clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")
    assert events[-1]["type"] == "response.completed"
    assert len(fake.refused_upgrades) == 1 and fake.requests[0].transport == "http"
    [row] = await flushed_rows(running, database)
    assert (row["provider"], row["attempts"], row["upstream_transport"], tokens(row)) == (
        "primary",
        1,
        "http",
        TOKENS,
    )
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_frame_without_model_is_recorded_with_the_model_of_the_connection_url(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    clock = gateway_clock()
    fake.enqueue(answer(served=None))
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    client = await running.connect(f"?model={PRICED}", headers=AUTH)
    frame = response_create()
    del frame["model"]
    client.send_json(frame)
    await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")
    [row] = await flushed_rows(running, database)
    assert (row["model_requested"], row["model_served"]) == (PRICED, PRICED)
    assert row["cost"] == pytest.approx(COST)
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_warm_up_the_gateway_answers_itself_is_a_row_without_upstream(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """``generate: false`` over an HTTP upstream is answered by the gateway: completed, 0
    tokens (known, so the cost is 0, not null), no upstream transport, nothing sent upstream."""
    clock = gateway_clock()
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED, generate=False))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the warm-up")
    assert events[-1]["type"] == "response.completed"
    assert fake.requests == []
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["upstream_transport"], tokens(row), row["cost"]) == (
        "completed",
        None,
        (0, 0, 0, 0),
        0,
    )
    assert row["response_id"] == events[-1]["response"]["id"]
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_many_turns_at_once_are_one_row_each(
    fake: FakeUpstream, database: Any, launch: Any, tunnel_mode: str
) -> None:
    clock = gateway_clock()
    fake.default = answer()
    running = await launch(
        ledger_config(fake, database, tunnel=tunnel_mode), clock, database.run_dir
    )
    clients = [await running.connect(headers=AUTH) for _ in range(20)]
    for client in clients:
        client.send_json(response_create(model=PRICED))
    for client in clients:
        await within(Deferred.fromCoroutine(client.recv_turn()), "a turn")
    found = await flushed_rows(running, database)
    assert len(found) == 20 and len({r["request_id"] for r in found}) == 20
    assert sorted(r["response_id"] for r in found) == sorted(r.response_id for r in fake.requests)
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_model_name_the_database_cannot_store_as_is_does_not_lose_the_batch(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """A client's model name with a NUL (PostgreSQL refuses it) and 300 characters is stored
    cut to 256 with the NUL replaced, in the same batch as an ordinary turn."""
    clock = gateway_clock()
    fake.default = answer(served=None)
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    odd = "m\x00" + "x" * 300
    for model in (PRICED, odd):
        client.send_json(response_create(model=model))
        await within(Deferred.fromCoroutine(client.recv_turn()), "a turn")
    found = await flushed_rows(running, database)
    assert len(found) == 2
    stored = {r["model_requested"] for r in found} - {PRICED}
    assert [(len(m), m[:2]) for m in stored] == [(256, "m\ufffd")]
    samples = await scrape(running)
    assert metric(samples, "cch_usage_rows_dropped_total") == 0
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_gateway_without_keys_records_turns_with_a_null_key(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """No [[keys]]: the turn is still a row, its key null (docs/usage.md), and the report
    groups it under a null key."""
    clock = gateway_clock()
    fake.enqueue(answer())
    running = await launch(replace(ledger_config(fake, database), keys=()), clock, database.run_dir)
    client = await running.connect()
    client.send_json(response_create(model=PRICED))
    await within(Deferred.fromCoroutine(client.recv_turn()), "the turn")
    [row] = await flushed_rows(running, database)
    assert (row["key"], row["status"], tokens(row)) == (None, "completed", TOKENS)
    code, body = await get(running, "/admin/usage?by=key")
    assert code == 200
    assert [(g["key"], g["turns"]) for g in json.loads(body)] == [(None, 1)]
    await running.stop()


# -- 2. every terminal kind, and a client that leaves ----------------------------------------------


@pytest.mark.parametrize(
    ("terminal", "status", "code", "counts", "cost"),
    [
        ("response.failed", "failed", "server_error", TOKENS, COST),
        ("response.incomplete", "incomplete", None, TOKENS, COST),
        ("error", "error", "server_is_overloaded", NO_TOKENS, None),
    ],
    ids=["failed", "incomplete", "error"],
)
@pytest_twisted.ensureDeferred
async def test_every_upstream_terminal_kind_is_exactly_one_row(
    fake: FakeUpstream,
    database: Any,
    launch: Any,
    tunnel_mode: str,
    upstream_transport: str,
    terminal: str,
    status: str,
    code: str | None,
    counts: tuple[Any, ...],
    cost: float | None,
) -> None:
    clock = gateway_clock()
    fake.enqueue(answer(terminal=terminal))
    config = ledger_config(fake, database, tunnel=tunnel_mode, upstream=upstream_transport)
    running = await launch(config, clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the terminal")
    assert events[-1]["type"] == terminal
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["error_code"], tokens(row)) == (status, code, counts)
    assert row["cost"] == (pytest.approx(cost) if cost is not None else None)
    assert (row["response_id"], row["upstream_transport"]) == (
        fake.requests[0].response_id,
        upstream_transport,
    )
    await running.stop()
    assert len(rows(database)) == 1


@pytest.mark.parametrize(
    ("script", "status", "code", "counts"),
    [
        (answer(terminal="response.incomplete"), "incomplete", None, TOKENS),
        (answer(terminal="response.failed"), "failed", "server_error", TOKENS),
        (error_json(400, "invalid_prompt", "No."), "error", "invalid_prompt", NO_TOKENS),
    ],
    ids=["incomplete", "failed", "http-400"],
)
@pytest_twisted.ensureDeferred
async def test_every_non_streamed_http_outcome_is_exactly_one_row(
    fake: FakeUpstream,
    database: Any,
    launch: Any,
    script: Any,
    status: str,
    code: str | None,
    counts: tuple[Any, ...],
) -> None:
    """A plain ``POST`` without ``stream``: the upstream's one JSON body is the terminal."""
    clock = gateway_clock()
    fake.enqueue(script)
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await within(
        treq.post(
            running.http_url + "/v1/responses",
            json={"model": PRICED, "input": "hi"},
            headers=AUTH,
            pool=pool,
        ),
        "the response",
    )
    await within(treq.content(response), "the body")
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["error_code"], tokens(row), row["client_transport"]) == (
        status,
        code,
        counts,
        "http",
    )
    await running.stop()
    assert len(rows(database)) == 1


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_drops_mid_stream_is_one_error_row(
    fake: FakeUpstream, database: Any, launch: Any, upstream_transport: str
) -> None:
    """The upstream connection cut after two events: the client gets the gateway's ``error``
    event, and the row has its code and no tokens."""
    clock = gateway_clock()
    fake.enqueue(lambda recorded: drop_after_two(answer()(recorded)))
    running = await launch(
        ledger_config(fake, database, upstream=upstream_transport), clock, database.run_dir
    )
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the terminal")
    assert events[-1]["type"] == "error"
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["error_code"], tokens(row), row["cost"]) == (
        "error",
        events[-1]["error"]["code"],
        NO_TOKENS,
        None,
    )
    assert row["response_id"] == fake.requests[0].response_id
    await running.stop()
    assert len(rows(database)) == 1


@pytest_twisted.ensureDeferred
async def test_a_turn_every_provider_failed_is_an_error_row_without_upstream_transport(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    clock = gateway_clock()
    fake.enqueue(error_json(503, "server_overloaded", "Busy."))
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the error")
    assert events[-1]["type"] == "error"
    [row] = await flushed_rows(running, database)
    assert (
        row["status"],
        row["error_code"],
        row["provider"],
        row["attempts"],
        row["upstream_transport"],
        tokens(row),
        row["cost"],
    ) == ("error", "server_overloaded", "primary", 1, None, NO_TOKENS, None)
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_an_upstream_stream_that_ends_without_a_terminal_is_one_error_row(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """An SSE body that ends cleanly after two events: the row says the stream ended without a
    terminal event (docs/usage.md)."""
    clock = gateway_clock()
    fake.enqueue(lambda recorded: replace(answer()(recorded), steps=answer()(recorded).steps[:2]))
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    events = await within(Deferred.fromCoroutine(client.recv_turn()), "the terminal")
    assert events[-1]["type"] == "error"
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["error_code"], tokens(row)) == (
        "error",
        events[-1]["error"]["code"],
        NO_TOKENS,
    )
    assert row["error_code"] == "stream_ended_without_terminal"
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_an_upstream_gone_silent_is_a_gateway_made_error_row(
    fake: FakeUpstream, database: Any, launch: Any, tunnel_mode: str, upstream_transport: str
) -> None:
    """The idle timeout ends the turn with the gateway's own ``error`` event: one row, status
    error with its code, tokens null (the upstream never said)."""
    clock = gateway_clock()
    fake.enqueue(answer(end="hold"))
    running = await launch(
        ledger_config(
            fake, database, tunnel=tunnel_mode, upstream=upstream_transport, idle_timeout=5
        ),
        clock,
        database.run_dir,
    )
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    assert (await within(client.recv(), "response.created"))["type"] == "response.created"
    assert (await within(client.recv(), "the delta"))["type"] == "response.output_text.delta"
    clock.advance(5)
    error = await within(client.recv(), "the idle timeout's error event")
    assert (error["type"], error["error"]["code"]) == ("error", "upstream_idle_timeout")
    await within(fake.wait_for_finished(0), "the upstream request aborted")
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["error_code"], tokens(row), row["cost"]) == (
        "error",
        "upstream_idle_timeout",
        NO_TOKENS,
        None,
    )
    assert row["response_id"] == fake.requests[0].response_id
    await running.stop()
    assert len(rows(database)) == 1


@pytest.mark.parametrize("when", ["mid-stream", "before-any-event"])
@pytest.mark.parametrize("how", ["abort", "close"])
@pytest_twisted.ensureDeferred
async def test_a_websocket_client_that_leaves_mid_turn_is_one_cancelled_row(
    fake: FakeUpstream,
    database: Any,
    launch: Any,
    tunnel_mode: str,
    upstream_transport: str,
    how: str,
    when: str,
) -> None:
    """The client drops the TCP connection (or closes 1000) mid-stream, or before the upstream
    said anything: one row, cancelled, tokens null (and no response id nor first event when
    none came)."""
    clock = gateway_clock()
    fake.enqueue(answer(end="hold") if when == "mid-stream" else Script((Hold(),)))
    config = ledger_config(fake, database, tunnel=tunnel_mode, upstream=upstream_transport)
    running = await launch(config, clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    client.send_json(response_create(model=PRICED))
    if when == "mid-stream":
        assert (await within(client.recv(), "response.created"))["type"] == "response.created"
    else:
        await within(fake.wait_for_requests(1), "the turn upstream")
    await within(client.abort() if how == "abort" else client.close(), "the client gone")
    await within(fake.wait_for_cancelled(0), "the upstream request aborted")
    await within(running.service.handler.wait_idle(), "the turn over")
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["client_transport"], tokens(row), row["cost"]) == (
        "cancelled",
        "websocket",
        NO_TOKENS,
        None,
    )
    if when == "mid-stream":
        assert row["response_id"] == fake.requests[0].response_id
        assert row["first_event_ms"] == 0
    else:
        assert (row["response_id"], row["first_event_ms"]) == (None, None)
    await running.stop()
    assert len(rows(database)) == 1


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
@pytest_twisted.ensureDeferred
async def test_an_http_client_that_leaves_mid_turn_is_one_cancelled_row(
    fake: FakeUpstream, database: Any, launch: Any, stream: bool
) -> None:
    """A streamed POST whose client drops the connection after ``response.created``, or a plain
    one dropped while the upstream has said nothing: one cancelled row."""
    clock = gateway_clock()
    fake.enqueue(answer(end="hold") if stream else Script((Hold(),)))
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    pool = HTTPConnectionPool(reactor, persistent=False)
    body = {"model": PRICED, "input": "hi", "stream": stream}
    if stream:
        reader = await post_stream(running, pool, body, b"response.created")
        await within(reader.saw, "response.created")
        reader.leave()
        await within(reader.done, "the connection gone")
    else:
        posting = treq.post(running.http_url + "/v1/responses", json=body, headers=AUTH, pool=pool)
        posting.addErrback(lambda _: None)  # cancelled below
        await within(fake.wait_for_requests(1), "the turn upstream")
        posting.cancel()
    await within(fake.wait_for_cancelled(0), "the upstream request aborted")
    await within(running.service.handler.wait_idle(), "the turn over")
    [row] = await flushed_rows(running, database)
    assert (row["status"], row["client_transport"], tokens(row), row["cost"]) == (
        "cancelled",
        "http",
        NO_TOKENS,
        None,
    )
    assert row["first_event_ms"] == (0 if stream else None)
    await running.stop()
    assert len(rows(database)) == 1


# -- 3. drain --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_turns_cut_by_the_drain_deadline_are_drained_rows_written_before_stop_fires(
    fake: FakeUpstream,
    database: Any,
    no_stray_threads: None,
    launch: Any,
    tunnel_mode: str,
    upstream_transport: str,
) -> None:
    """A turn that completed, a WebSocket turn and an HTTP POST turn still running at the
    deadline: three rows (completed, drained, drained) in the database when stopService fires,
    though the flush interval never passed."""
    clock = gateway_clock()
    fake.enqueue(answer(), answer(end="hold"), answer(end="hold"))
    config = ledger_config(
        fake, database, tunnel=tunnel_mode, upstream=upstream_transport, drain_timeout=30
    )
    running = await launch(config, clock, database.run_dir)
    done = await running.connect(headers=AUTH)
    done.send_json(response_create(model=PRICED))
    first = await within(Deferred.fromCoroutine(done.recv_turn()), "the first turn")
    assert first[-1]["type"] == "response.completed"
    busy = await running.connect(headers=AUTH)
    busy.send_json(response_create(model=PRICED))
    assert (await within(busy.recv(), "response.created"))["type"] == "response.created"
    pool = HTTPConnectionPool(reactor, persistent=False)
    reader = await post_stream(
        running, pool, {"model": PRICED, "input": "hi", "stream": True}, b"response.created"
    )
    await within(reader.saw, "response.created")
    assert rows(database) == []  # nothing flushed yet

    stopping = running.service.stopService()
    clock.advance(30)
    closed = await within(busy.wait_closed(), "the 1001")
    assert closed.code == 1001
    await within(reader.done, "the HTTP turn cut short")
    assert b'"draining"' in reader.data
    await within(stopping, "the stop")
    found = rows(database)
    assert by_status(found) == {"completed": 1, "drained": 2}
    assert sorted(r["response_id"] for r in found) == sorted(r.response_id for r in fake.requests)
    assert {r["client_transport"] for r in found if r["status"] == "drained"} == {
        "websocket",
        "http",
    }
    assert all(tokens(r) == NO_TOKENS for r in found if r["status"] == "drained")
    assert len({r["request_id"] for r in found}) == 3


# -- 4. the database down, the spill file ----------------------------------------------------------


async def ws_turns(running: Any, n: int) -> None:
    client = await running.connect(headers=AUTH)
    for _ in range(n):
        client.send_json(response_create(model=PRICED))
        events = await within(Deferred.fromCoroutine(client.recv_turn()), "a turn")
        assert events[-1]["type"] == "response.completed"
    await within(client.close(), "the client's close")


@pytest_twisted.ensureDeferred
async def test_nothing_lost_when_the_database_goes_down_mid_run_and_comes_back(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    clock = gateway_clock()
    fake.default = answer()
    running = await launch(ledger_config(fake, database, flush_interval=1), clock, database.run_dir)
    ledger = running.service.ledger
    await ws_turns(running, 1)
    clock.advance(1)
    await within(ledger.flush(), "a flush")
    assert database.count() == 1

    database.down()
    await ws_turns(running, 2)
    clock.advance(1)  # the tick's write fails (SQLite: after the gateway's 5 s busy timeout)
    await eventually(lambda: ledger.failing, "the tick's write failed", 30)
    assert ledger.pending == 2
    assert database.count() == 1

    database.up()
    clock.advance(1)
    await within(ledger.flush(), "a flush once the database is back", 30)
    assert not ledger.failing and ledger.pending == 0
    await ws_turns(running, 1)
    samples = await scrape(running)
    assert metric(samples, "cch_usage_rows_dropped_total") == 0
    assert metric(samples, "cch_usage_rows_spilled_total") == 0
    assert metric(samples, "cch_usage_write_errors_total") >= 1
    await running.stop()
    found = rows(database)
    assert len(found) == 4 and len({r["request_id"] for r in found}) == 4
    assert sorted(r["response_id"] for r in found) == sorted(r.response_id for r in fake.requests)
    assert all(tokens(r) == TOKENS and r["status"] == "completed" for r in found)


@pytest.fixture
def postgres_database(tmp_path: Path) -> Any:
    """The machine's PostgreSQL only (usage_fixtures: fails, not skips, under CI=true)."""
    db = PostgresDatabase(tmp_path, postgres_admin())
    try:
        yield db
    finally:
        db.cleanup()


@pytest_twisted.ensureDeferred
async def test_a_postgresql_outage_that_loses_nothing_logs_nothing_critical(
    fake: FakeUpstream, postgres_database: Any, launch: Any
) -> None:
    clock = gateway_clock()
    fake.default = answer()
    running = await launch(ledger_config(fake, postgres_database), clock, postgres_database.run_dir)
    critical: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.critical:
            critical.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        postgres_database.down()
        await ws_turns(running, 1)
        await within(running.service.ledger.flush(), "a failed flush", 30)
        assert running.service.ledger.failing
    finally:
        globalLogPublisher.removeObserver(observe)
        postgres_database.up()
    await running.stop()
    assert postgres_database.count() == 1
    assert [e.get("log_format") for e in critical] == []


def spill_row_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(line["row"]["request_id"] for line in lines if "row" in line)


@pytest_twisted.ensureDeferred
async def test_rows_past_the_bound_spill_to_the_file_and_are_replayed_after_a_restart(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    """The database down: past ``max_pending_rows`` the oldest rows go to the spill file at the
    next tick; the gateway stopped while it is still down spills the rest; a second gateway on
    the same database and run directory replays them all, once, and empties the file."""
    clock = gateway_clock()
    fake.default = answer()
    spill = database.run_dir / "cch-usage-spill.jsonl"
    config = ledger_config(fake, database, flush_interval=1, max_pending_rows=2)
    first = await launch(config, clock, database.run_dir)
    database.down()
    with request_ids("upstream_attempt_started") as ids:
        await ws_turns(first, 5)
    clock.advance(1)  # the tick spills the 3 oldest at once, then tries the database
    assert spill_row_ids(spill) == sorted(ids[:3])
    assert first.service.ledger.pending == 2
    samples = await scrape(first)
    assert metric(samples, "cch_usage_rows_spilled_total") == 3
    assert metric(samples, "cch_usage_rows_dropped_total") == 0
    await within(
        first.service.stopService(), "the first gateway's stop while the database is down", 60
    )
    assert first.service.ledger.dropped == 0
    assert spill_row_ids(spill) == sorted(ids)
    assert database.count() == 0

    database.up()
    second = await launch(config, gateway_clock(), database.run_dir)  # its first cycle replays
    found = rows(database)
    assert sorted(r["request_id"] for r in found) == sorted(ids)
    assert all(
        tokens(r) == TOKENS and r["status"] == "completed" and r["key"] == KEY.name for r in found
    )
    assert spill_row_ids(spill) == []
    # The owners spilled with the rows: every response id is still alice's.
    owners = dict(database.query("SELECT response_id, key FROM cch_response_owner"))
    assert {r.response_id: owners.get(r.response_id) for r in fake.requests} == {
        r.response_id: KEY.name for r in fake.requests
    }
    samples = await scrape(second)
    assert metric(samples, "cch_usage_rows_dropped_total") == 0
    await second.stop()
    assert database.count() == 5


# -- 5. SIGTERM with turns in flight ---------------------------------------------------------------


GATEWAY_TOML = """\
[server]
listen = "tcp:0:interface=127.0.0.1"
drain_timeout = {drain}
replica = "child"

[[keys]]
name = "{key_name}"
key = "{key}"

[tunnel]
mode = "{tunnel}"

[[providers]]
name = "primary"
base_url = "{base_url}"
websocket = "{websocket}"

[usage]
database = "{database}"
flush_interval = 3600
"""


@pytest_twisted.async_yield_fixture
async def gateway_process(tmp_path: Path) -> Any:
    """Spawn the real gateway; one still running at teardown is killed (SIGKILL)."""
    children: list[Any] = []

    def go(config_path: Path) -> Any:
        child = spawn_gateway(config_path, tmp_path)
        children.append(child)
        return child

    yield go
    for child in children:
        if child.running:
            child.signal("KILL")
        await within(child.ended, "the child's end", 30)


# The child's drain deadline runs on its real clock, which the test cannot advance. A test whose
# turns must finish during the drain gives it longer than any wait of the test (30 s): were it
# short, a test process that reacts late to ``shutdown_received`` (a loaded machine) would see
# those turns cut at the deadline. A test that waits for the deadline's cut gives it 1 s and
# has nothing else in flight that the cut could catch first.
NO_DEADLINE = 600.0
SHORT_DEADLINE = 1.0


async def child_gateway(
    gateway_process: Any,
    fake: FakeUpstream,
    database: Any,
    tunnel: str,
    upstream: str,
    *,
    drain: float,
) -> tuple[Any, str]:
    """The gateway as a child process in ``database.run_dir``, with ``server.drain_timeout``
    ``drain``; (child, its WebSocket URL)."""
    config = database.run_dir / "cch.toml"
    config.write_text(
        GATEWAY_TOML.format(
            drain=drain,
            key_name=KEY.name,
            key=KEY.key,
            base_url=fake.base_url,
            database=database.url,
            tunnel=tunnel,
            websocket="on" if upstream == "websocket" else "off",
        )
    )
    child = gateway_process(config)
    listening = await within(
        child.wait_for(json_event("server_listening")), "the gateway listening", 30
    )
    return child, f"ws://127.0.0.1:{listening['port']}/v1/responses"


async def sigterm_with_turns_in_flight(
    child: Any,
    url: str,
    fake: FakeUpstream,
    upstream_clock: Clock,
    *,
    finishing: int = 0,
    leaving: int = 0,
    cut: int = 0,
    tracebacks: bool = False,
) -> Any:
    """``finishing + leaving + cut`` WebSocket turns, each on its own connection, in flight
    (the fake's scripts in that order); SIGTERM. Then, each step waiting on an event, never on
    a duration: the first ``finishing`` end during the drain (their upstream sends its
    terminal once the drain has started) and are closed 1001; the next ``leaving`` have their
    client leave during the drain; the last ``cut`` are closed 1001 at the drain deadline.

    ``cut`` needs a child started with ``SHORT_DEADLINE`` and nothing else in flight; the
    others need ``NO_DEADLINE``: a turn the test lets finish during the drain must not race the
    child's real-time deadline. Returns how the child ended."""
    assert not (cut and (finishing or leaving)), "the deadline would race the other turns"
    clients: list[ResponsesWSClient] = []
    try:
        for i in range(finishing + leaving + cut):
            client = await within(ResponsesWSClient.connect(reactor, url, AUTH), "a connection")
            clients.append(client)
            client.send_json(response_create(model=PRICED))
            assert (await within(client.recv(), "response.created"))["type"] == "response.created"
            await within(fake.wait_for_requests(i + 1), "the turn upstream")
        done, left, held = (
            clients[:finishing],
            clients[finishing : finishing + leaving],
            clients[finishing + leaving :],
        )

        child.signal("TERM")
        await within(child.wait_for(json_event("shutdown_received")), "the drain started", 30)
        upstream_clock.advance(1)  # the finishing turns' terminals, now the drain is on
        for client in done:
            events = await within(
                Deferred.fromCoroutine(client.recv_turn()), "a turn finished in the drain", 30
            )
            assert events[-1]["type"] == "response.completed"
            closed = await within(client.wait_closed(), "the 1001 after the turn", 30)
            assert closed.code == 1001
        for client in left:
            # The drain let it run: the gateway has not closed it.
            assert client.close_info is None
            await within(client.abort(), "a client leaving during the drain")
        for client in held:
            closed = await within(client.wait_closed(), "the 1001 at the drain deadline", 30)
            assert closed.code == 1001
        ended = await within(child.ended, "the gateway's exit", 30)
    finally:
        for client in clients:
            if client.close_info is None:
                await within(client.abort(), "a client dropped")
    # twistd stops cleanly, then re-raises the signal for a supervisor to see.
    assert (ended.exitCode, ended.signal) == (None, signal.SIGTERM), child.output
    # The deadline cut the turns it was meant to cut, and no other.
    assert ("shutdown_drain_timeout" in child.output) == bool(cut), child.output
    if not tracebacks:
        assert "Traceback" not in child.output
    return ended


@pytest_twisted.ensureDeferred
async def test_sigterm_with_turns_in_flight_leaves_exactly_one_row_per_turn(
    fake: FakeUpstream,
    database: Any,
    gateway_process: Any,
    tunnel_mode: str,
    upstream_transport: str,
) -> None:
    """``python -m cch.cli --config F``, four WebSocket turns in flight, SIGTERM: the two whose
    upstream finishes during the drain are ``completed``, the two whose client leaves during
    the drain are ``drained``; all four are in the database once the process has exited (as
    soon as its last connection is gone), though the flush interval (an hour) never passed.
    The turns cut at the drain deadline: the next test."""
    upstream_clock = Clock()
    fake.clock = upstream_clock
    fake.enqueue(
        answer(before_terminal=1), answer(before_terminal=1), answer(end="hold"), answer(end="hold")
    )
    child, url = await child_gateway(
        gateway_process, fake, database, tunnel_mode, upstream_transport, drain=NO_DEADLINE
    )
    await sigterm_with_turns_in_flight(child, url, fake, upstream_clock, finishing=2, leaving=2)

    found = rows(database)
    statuses = {r["response_id"]: r["status"] for r in found}
    assert len(found) == 4 and len({r["request_id"] for r in found}) == 4
    assert statuses == {
        fake.requests[0].response_id: "completed",
        fake.requests[1].response_id: "completed",
        fake.requests[2].response_id: "drained",
        fake.requests[3].response_id: "drained",
    }
    assert {(r["key"], r["replica"], r["client_transport"]) for r in found} == {
        (KEY.name, "child", "websocket")
    }
    assert [tokens(r) for r in found if r["status"] == "completed"] == [TOKENS, TOKENS]
    assert {r["upstream_transport"] for r in found} == {upstream_transport}
    assert spill_row_ids(database.run_dir / "cch-usage-spill.jsonl") == []


@pytest_twisted.ensureDeferred
async def test_sigterm_with_turns_still_running_at_the_drain_deadline_leaves_drained_rows(
    fake: FakeUpstream,
    database: Any,
    gateway_process: Any,
    tunnel_mode: str,
    upstream_transport: str,
) -> None:
    """``python -m cch.cli --config F``, two WebSocket turns the upstream holds, SIGTERM: the
    drain deadline closes both 1001 and cuts their turns (``drained``, no tokens); both rows
    are in the database once the process has exited."""
    upstream_clock = Clock()
    fake.clock = upstream_clock
    fake.enqueue(answer(end="hold"), answer(end="hold"))
    child, url = await child_gateway(
        gateway_process, fake, database, tunnel_mode, upstream_transport, drain=SHORT_DEADLINE
    )
    await sigterm_with_turns_in_flight(child, url, fake, upstream_clock, cut=2)

    found = rows(database)
    assert len(found) == 2 and len({r["request_id"] for r in found}) == 2
    assert {r["response_id"]: r["status"] for r in found} == {
        fake.requests[0].response_id: "drained",
        fake.requests[1].response_id: "drained",
    }
    assert [tokens(r) for r in found] == [NO_TOKENS, NO_TOKENS]
    assert {(r["key"], r["replica"], r["client_transport"]) for r in found} == {
        (KEY.name, "child", "websocket")
    }
    assert {r["upstream_transport"] for r in found} == {upstream_transport}
    assert spill_row_ids(database.run_dir / "cch-usage-spill.jsonl") == []


@pytest_twisted.ensureDeferred
async def test_sigterm_while_the_database_is_down_spills_and_the_next_start_replays(
    fake: FakeUpstream, database: Any, gateway_process: Any, launch: Any
) -> None:
    """The database down when SIGTERM comes: the stopping child (two turns finished during the
    drain, one whose client left during it) writes its three rows to the spill file; a gateway
    started on the same database and run directory once it is back replays them, each once."""
    upstream_clock = Clock()
    fake.clock = upstream_clock
    fake.enqueue(answer(before_terminal=1), answer(before_terminal=1), answer(end="hold"))
    child, url = await child_gateway(
        gateway_process, fake, database, "in-process", "http", drain=NO_DEADLINE
    )
    # The child migrated the database at start: wait for its table, then take the database down.
    await eventually_table(database)
    database.down()
    # adbapi logs the failed rollback of a connection PostgreSQL terminated, with a traceback.
    await sigterm_with_turns_in_flight(
        child, url, fake, upstream_clock, finishing=2, leaving=1, tracebacks=True
    )
    spill = database.run_dir / "cch-usage-spill.jsonl"
    spilled = spill_row_ids(spill)
    assert len(spilled) == 3
    assert "usage_rows_dropped" not in child.output
    database.up()
    assert database.count() == 0

    running = await launch(ledger_config(fake, database), gateway_clock(), database.run_dir)
    found = rows(database)
    assert sorted(r["request_id"] for r in found) == spilled
    assert by_status(found) == {"completed": 2, "drained": 1}
    assert sorted(r["response_id"] for r in found) == sorted(r.response_id for r in fake.requests)
    assert spill_row_ids(spill) == []
    await running.stop()
    assert database.count() == 3


async def eventually_table(database: Any) -> None:
    """Until the usage table exists (a child gateway migrated the database)."""

    def migrated() -> bool:
        try:
            database.count()
        except Exception:  # no table yet (the admin connection autocommits: nothing to undo)
            return False
        return True

    await eventually(migrated, "the child's migrations", 30)


# -- 6. reports --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_admin_usage_and_cch_usage_report_the_same_groups(
    fake: FakeUpstream, database: Any, launch: Any, tmp_path: Path
) -> None:
    clock = gateway_clock()
    fake.enqueue(answer(), answer(served=None))
    running = await launch(ledger_config(fake, database), clock, database.run_dir)
    client = await running.connect(headers=AUTH)
    for model in (PRICED, UNPRICED):
        client.send_json(response_create(model=model))
        await within(Deferred.fromCoroutine(client.recv_turn()), "a turn")
    await running.service.ledger.flush()

    code, body = await get(running, "/admin/usage")
    assert code == 200, body
    groups = json.loads(body)
    counts = dict(
        zip(
            ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens"),
            TOKENS,
            strict=True,
        )
    )
    assert groups == [
        {
            "key": KEY.name,
            "model": SNAPSHOT,
            "day": DAY,
            "turns": 1,
            **counts,
            "cost": pytest.approx(COST),
        },
        {"key": KEY.name, "model": UNPRICED, "day": DAY, "turns": 1, **counts, "cost": None},
    ]
    code, body = await get(running, f"/admin/usage?by=key&since={DAY}")
    assert code == 200
    by_key = json.loads(body)
    assert [(g["key"], g["turns"], g["input_tokens"]) for g in by_key] == [(KEY.name, 2, 2400)]
    assert by_key[0]["cost"] == pytest.approx(COST)  # a sum over known costs; the unknown is not 0

    assert (await get(running, "/admin/usage", token=None))[0] == 403
    # A client key is not the admin token.
    assert (await get(running, "/admin/usage", token=KEY.key))[0] == 403
    code, body = await get(running, "/admin/usage?since=last%20week")
    assert code == 400 and json.loads(body)["error"]["code"] == "invalid_report"

    path = tmp_path / "report.toml"
    path.write_text(f'[usage]\ndatabase = "{database.url}"\n')
    for args, expected in (([], groups), (["--by", "key", "--since", DAY], by_key)):
        out, err = io.StringIO(), io.StringIO()
        status = await usage(
            ["--config", str(path), "--json", *args], reactor, out, err, str(database.run_dir)
        )
        assert (status, err.getvalue()) == (0, "")
        assert json.loads(out.getvalue()) == expected
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_admin_report_off_does_not_serve_admin_usage_even_with_the_token(
    fake: FakeUpstream, database: Any, launch: Any
) -> None:
    running = await launch(
        ledger_config(fake, database, admin_report=False), gateway_clock(), database.run_dir
    )
    code, _ = await get(running, "/admin/usage")
    assert code == 404
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_admin_usage_while_postgresql_is_down_is_a_503_then_answers_again(
    fake: FakeUpstream, postgres_database: Any, launch: Any
) -> None:
    running = await launch(
        ledger_config(fake, postgres_database), gateway_clock(), postgres_database.run_dir
    )
    postgres_database.down()
    try:
        code, body = await get(running, "/admin/usage")
        assert code == 503 and json.loads(body)["error"]["code"] == "usage_unavailable"
    finally:
        postgres_database.up()
    code, body = await get(running, "/admin/usage")
    assert (code, json.loads(body)) == (200, [])
    await running.stop()
