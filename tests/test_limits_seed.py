"""A restart does not hand out a second allowance: each key's UTC day tokens and UTC month spend
start from the usage ledger (cch.service.GatewayService._seed_limits), and while the database
cannot say, the gateway keeps asking on its clock until it can."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from conftest import gateway_config, start_gateway, within
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, KeyLimitsConfig, UsageConfig
from cch.service import SEED_RETRY
from cch.testing import FakeUpstream
from cch.usage.rows import UsageRow
from cch.usage.store import open_store

KEY = "sk-cch-alice-0123456789abcdef"
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()


def row(request_id: str, started_at: float, tokens: int) -> UsageRow:
    return UsageRow(
        request_id=request_id,
        started_at=started_at,
        ended_at=started_at + 1,
        response_id=f"resp_{request_id}",
        key="alice",
        provider="primary",
        model_requested="m",
        model_served="m",
        client_transport="http",
        upstream_transport="http",
        status="completed",
        error_code=None,
        attempts=1,
        replayed=False,
        input_tokens=tokens,
        cached_input_tokens=0,
        output_tokens=0,
        reasoning_tokens=0,
        cost=None,
        first_event_ms=1.0,
        duration_ms=1000.0,
        replica="r",
    )


async def write_rows(database: str, rows: list[UsageRow]) -> None:
    store = open_store(database, "/", reactor)
    try:
        await store.start()
        await store.insert(rows)
    finally:
        store.close()


def config(fake: FakeUpstream, database: str, tokens_per_day: int) -> Any:
    key = ClientKey("alice", KEY, limits=KeyLimitsConfig(tokens_per_day=tokens_per_day))
    return gateway_config(fake, keys=(key,), usage=UsageConfig(database=database))


async def post(running: Any) -> tuple[int, bytes]:
    """One HTTP turn on a connection of its own (closed after it)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        response = await treq.post(
            running.http_url + "/v1/responses",
            json.dumps({"model": "m", "input": "hi"}).encode(),
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
            pool=pool,
        )
        return response.code, await response.content()
    finally:
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_todays_tokens_in_the_ledger_count_against_the_day_after_a_restart(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    # Used today before the restart: the whole allowance; yesterday's tokens do not count.
    await write_rows(database, [row("a", NOW - 3600, 600), row("b", NOW - 60, 400), row("old", NOW - 86400, 5000)])
    clock = Clock()
    clock.advance(NOW)
    running = await start_gateway(config(fake, database, tokens_per_day=1000), clock)
    try:
        await within(running.service.seeded, "the limits to be seeded")
        status, content = await post(running)
        body = json.loads(content)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert "1000 of 1000 tokens used this UTC day" in body["error"]["message"]
        assert fake.requests == []
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_day_below_its_limit_is_admitted(fake: FakeUpstream, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    await write_rows(database, [row("a", NOW - 60, 999)])
    clock = Clock()
    clock.advance(NOW)
    running = await start_gateway(config(fake, database, tokens_per_day=1000), clock)
    try:
        await within(running.service.seeded, "the limits to be seeded")
        status, _ = await post(running)
        assert status == 200
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_seeding_waits_for_a_database_that_is_not_there_yet(fake: FakeUpstream, tmp_path: Path) -> None:
    later = tmp_path / "not-yet"
    database = f"sqlite:///{later / 'usage.sqlite3'}"
    clock = Clock()
    clock.advance(NOW)
    running = await start_gateway(config(fake, database, tokens_per_day=1000), clock)
    try:
        seeded = running.service.seeded
        # The first try failed (no such directory) and a retry waits on the clock.
        await within_clock(clock, SEED_RETRY)
        assert not seeded.called
        later.mkdir()
        await write_rows(database, [row("a", NOW - 60, 1000)])
        clock.advance(SEED_RETRY)
        await within(seeded, "the retried seeding")
        status, _ = await post(running)
        assert status == 429
    finally:
        await running.stop()


async def within_clock(clock: Clock, delay: float) -> None:
    """Until a call ``delay`` seconds ahead waits on ``clock`` (the seeding's retry)."""
    from conftest import eventually

    await eventually(
        lambda: any(abs(call.getTime() - (clock.seconds() + delay)) < 1e-6 for call in clock.getDelayedCalls()),
        "the seeding to wait for its retry",
    )
