"""The ledger's database on real SQLite and real PostgreSQL: migrations, idempotent rows, totals,
spend and response-id owners (cch/usage/store.py)."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from cch.config import PriceConfig
from cch.usage.prices import PriceSheet
from cch.usage.rows import COLUMNS, UsageRow, usage_counts
from cch.usage.store import LATEST, MIGRATIONS, TEXT_LIMIT, StoreError, open_store

if TYPE_CHECKING:
    from usage_fixtures import TestDatabase

pytest_plugins = ["usage_fixtures"]

DAY1 = datetime(2026, 12, 1, 23, 30, tzinfo=UTC).timestamp()  # late on Dec 1 (UTC)
DAY2 = datetime(2026, 12, 2, 0, 30, tzinfo=UTC).timestamp()  # an hour later, the next UTC day
PRICES = PriceSheet([PriceConfig(model="gpt-5", input_per_mtok=1.25, cached_input_per_mtok=0.125, output_per_mtok=10.0)])


def row(request_id: str, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": request_id,
        "started_at": DAY1,
        "ended_at": DAY1 + 2,
        "response_id": f"resp_{request_id}",
        "key": "alice",
        "provider": "primary",
        "model_requested": "gpt-5",
        "model_served": "gpt-5-2025-08-07",
        "client_transport": "websocket",
        "upstream_transport": "websocket",
        "status": "completed",
        "error_code": None,
        "attempts": 1,
        "replayed": False,
        "input_tokens": 1000,
        "cached_input_tokens": 200,
        "output_tokens": 100,
        "reasoning_tokens": 40,
        "cost": None,
        "first_event_ms": 120.5,
        "duration_ms": 2000.0,
        "replica": "r1",
    }
    values.update(fields)
    if values["cost"] is None and "cost" not in fields:
        model = values["model_served"] or values["model_requested"]
        values["cost"] = PRICES.cost(model, values["input_tokens"], values["cached_input_tokens"], values["output_tokens"])
    return UsageRow(**values)


@pytest_twisted.ensureDeferred
async def test_migrations_applied_once_and_again_safely_at_next_start(database: TestDatabase, reactor: Any) -> None:
    """Every start runs the migrations; a database already at the latest version is left as is."""
    first = database.open(reactor)
    assert await first.start() == LATEST
    await first.insert([row("a")])
    first.close()
    again = database.open(reactor)
    assert await again.start() == LATEST
    assert await again.start() == LATEST
    assert database.query("SELECT version FROM cch_schema ORDER BY version") == [(v,) for v, _ in MIGRATIONS]
    assert database.request_ids() == ["a"]


@pytest_twisted.ensureDeferred
async def test_replicas_starting_together_migrate_once(database: TestDatabase, reactor: Any) -> None:
    """Two gateways on one database at once: one migrates, the other waits and finds it done."""
    stores = [open_store(database.url, str(database.run_dir), reactor) for _ in range(3)]
    database.stores.extend(stores)
    assert await gatherResults([store.start() for store in stores]) == [LATEST] * 3
    assert database.query("SELECT version FROM cch_schema ORDER BY version") == [(v,) for v, _ in MIGRATIONS]


@pytest_twisted.ensureDeferred
async def test_schema_newer_than_this_cch_is_refused(database: TestDatabase, reactor: Any) -> None:
    """A downgrade must not write rows into a schema it does not know."""
    store = database.open(reactor)
    await store.start()
    database.query("INSERT INTO cch_schema (version, applied_at) VALUES (?, ?)", (LATEST + 1, 0.0))
    with pytest.raises(StoreError, match="newer than this cch knows"):
        await store.start()


@pytest_twisted.ensureDeferred
async def test_one_row_per_insert_and_a_repeated_request_id_counted_once(database: TestDatabase, reactor: Any) -> None:
    """The request id makes a write idempotent: a batch retried after an unclear failure adds nothing."""
    store = database.open(reactor)
    await store.start()
    assert await store.insert([row("a"), row("b"), row("c")]) == 3
    assert await store.insert([row("b", input_tokens=5), row("d")]) == 1
    assert await store.insert([row("e"), row("e")]) == 1
    assert database.request_ids() == ["a", "b", "c", "d", "e"]
    assert database.query("SELECT input_tokens FROM cch_usage WHERE request_id = ?", ("b",)) == [(1000,)]


@pytest_twisted.ensureDeferred
async def test_row_fields_stored_as_given(database: TestDatabase, reactor: Any) -> None:
    """Every field of a row is a column and comes back unchanged, nulls included."""
    store = database.open(reactor)
    await store.start()
    given = row("a", replayed=True, error_code="upstream_timeout", status="error", reasoning_tokens=None, first_event_ms=None, upstream_transport=None)
    await store.insert([given])
    (stored,) = database.query(f"SELECT {', '.join(COLUMNS)} FROM cch_usage")
    values = dict(zip(COLUMNS, stored, strict=True))
    assert UsageRow(**{**values, "replayed": bool(values["replayed"])}) == given


@pytest_twisted.ensureDeferred
async def test_client_chosen_text_cannot_fail_a_batch(database: TestDatabase, reactor: Any) -> None:
    """A model name is the client's: NUL, a lone surrogate or a megabyte of it is stored cut and
    cleaned, never failing the batch (which would be retried, and fail, forever)."""
    store = database.open(reactor)
    await store.start()
    hostile = [row("nul", model_requested="gpt\x00-5"), row("surrogate", model_requested="gpt-\ud800"), row("long", model_requested="m" * 1_000_000)]
    assert await store.insert([*hostile, row("fine")]) == 4
    stored = dict(database.query("SELECT request_id, model_requested FROM cch_usage"))
    assert stored == {"nul": "gpt\ufffd-5", "surrogate": "gpt-?", "long": "m" * TEXT_LIMIT, "fine": "gpt-5"}
    long_id = "resp_" + "x" * 1000
    await store.own([(long_id, "alice")])
    assert await store.owner(long_id) == "alice"


@pytest_twisted.ensureDeferred
async def test_totals_by_key_model_and_utc_day_with_unknown_cost_kept_null(database: TestDatabase, reactor: Any) -> None:
    """Groups follow the model served (else asked), the UTC day; no price sums to null, not 0."""
    store = database.open(reactor)
    await store.start()
    await store.insert(
        [
            row("a"),
            row("b", started_at=DAY2),
            row("c", key="bob", model_served=None, model_requested="o3"),  # o3 has no price
            row("d", key="bob", model_served=None, model_requested="o3", input_tokens=None, output_tokens=None, cached_input_tokens=None, reasoning_tokens=None),
            row("e", key=None, started_at=DAY2),
        ]
    )
    one = PRICES.cost("gpt-5", 1000, 200, 100)
    groups = await store.totals(by=("key", "model", "day"))
    assert groups == [
        {"key": None, "model": "gpt-5-2025-08-07", "day": "2026-12-02", "turns": 1, "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100, "reasoning_tokens": 40, "cost": pytest.approx(one)},
        {"key": "alice", "model": "gpt-5-2025-08-07", "day": "2026-12-01", "turns": 1, "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100, "reasoning_tokens": 40, "cost": pytest.approx(one)},
        {"key": "alice", "model": "gpt-5-2025-08-07", "day": "2026-12-02", "turns": 1, "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100, "reasoning_tokens": 40, "cost": pytest.approx(one)},
        {"key": "bob", "model": "o3", "day": "2026-12-01", "turns": 2, "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100, "reasoning_tokens": 40, "cost": None},
    ]
    by_key = await store.totals(by=("key",))
    assert [(g["key"], g["turns"], g["cost"]) for g in by_key] == [(None, 1, pytest.approx(one)), ("alice", 2, pytest.approx(2 * one)), ("bob", 2, None)]
    (everything,) = await store.totals()
    assert everything["turns"] == 5 and everything["cost"] == pytest.approx(3 * one)
    assert isinstance(everything["input_tokens"], int)


@pytest_twisted.ensureDeferred
async def test_totals_between_since_and_until(database: TestDatabase, reactor: Any) -> None:
    """since is inclusive, until exclusive, both in UTC; an empty range has no groups."""
    store = database.open(reactor)
    await store.start()
    await store.insert([row("a"), row("b", started_at=DAY2)])
    midnight = datetime(2026, 12, 2, tzinfo=UTC)
    assert [g["day"] for g in await store.totals(since=midnight, by=("day",))] == ["2026-12-02"]
    assert [g["day"] for g in await store.totals(until=midnight, by=("day",))] == ["2026-12-01"]
    naive = datetime(2026, 12, 2)  # read as UTC
    assert [g["day"] for g in await store.totals(since=naive, by=("day",))] == ["2026-12-02"]
    assert await store.totals(since=datetime(2027, 1, 1, tzinfo=UTC), by=("key",)) == []
    assert await store.totals(since=datetime(2027, 1, 1, tzinfo=UTC)) == []


def test_totals_refuse_unknown_groups(database: TestDatabase, reactor: Any) -> None:
    store = database.open(reactor)
    with pytest.raises(ValueError, match="group by any of key, model, day"):
        store.totals(by=("provider",))
    with pytest.raises(ValueError):
        store.totals(by=("key", "key"))


@pytest_twisted.ensureDeferred
async def test_spent_sums_a_keys_tokens_and_cost_since_a_time(database: TestDatabase, reactor: Any) -> None:
    """What a restarted gateway seeds its daily-token and monthly-budget windows with."""
    store = database.open(reactor)
    await store.start()
    await store.insert([row("a"), row("b", started_at=DAY2), row("c", key="bob"), row("d", started_at=DAY2, input_tokens=None, output_tokens=7, cost=None)])
    tokens, cost = await store.spent("alice", DAY2)
    assert tokens == 1100 + 7
    assert cost == pytest.approx(PRICES.cost("gpt-5", 1000, 200, 100))
    assert await store.spent("carol", 0.0) == (0, 0.0)


@pytest_twisted.ensureDeferred
async def test_response_owner_is_the_first_key_and_comes_with_each_row(database: TestDatabase, reactor: Any) -> None:
    """Ownership is stored beside the rows; a later claim on the same id changes nothing."""
    store = database.open(reactor)
    await store.start()
    await store.own([("resp_x", "alice")])
    await store.own([("resp_x", "mallory")])
    await store.insert([row("a", key="bob"), row("b", key=None)])
    assert await store.owner("resp_x") == "alice"
    assert await store.owner("resp_a") == "bob"
    assert await store.owner("resp_b") is None  # no key, no owner
    assert await store.owner("resp_unknown") is None


@pytest_twisted.ensureDeferred
async def test_close_stops_the_pools_threads(database: TestDatabase, reactor: Any, no_stray_threads: None) -> None:
    """A stopped ledger leaves no thread behind (a process would not exit cleanly)."""
    store = database.open(reactor)
    await store.start()
    await store.insert([row("a")])
    assert any(t.name.startswith("PoolThread-") and "reactor" not in t.name for t in threading.enumerate())
    store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_path_is_relative_to_the_run_directory(tmp_path: Any, reactor: Any) -> None:
    """``sqlite:///name`` lands in the run directory, ``sqlite:////abs`` at the absolute path."""
    relative = open_store("sqlite:///rel.sqlite3", str(tmp_path), reactor)
    absolute = open_store(f"sqlite:///{tmp_path}/abs.sqlite3", "/nonexistent", reactor)
    try:
        await relative.start()
        await absolute.start()
    finally:
        relative.close()
        absolute.close()
    assert (tmp_path / "rel.sqlite3").exists() and (tmp_path / "abs.sqlite3").exists()


def test_unknown_database_url_is_refused(tmp_path: Any, reactor: Any) -> None:
    with pytest.raises(StoreError, match="not a usage database URL"):
        open_store("mysql://x@y/z", str(tmp_path), reactor)


def test_usage_counts_read_the_responses_usage_object() -> None:
    """Counts come from the terminal event's response.usage; what the upstream did not say is None."""
    full = {
        "usage": {
            "input_tokens": 1200,
            "input_tokens_details": {"cached_tokens": 1000},
            "output_tokens": 300,
            "output_tokens_details": {"reasoning_tokens": 250},
            "total_tokens": 1500,
        }
    }
    assert usage_counts(full) == (1200, 1000, 300, 250)
    assert usage_counts({"usage": {"input_tokens": 5, "output_tokens": 6}}) == (5, None, 6, None)
    assert usage_counts({"usage": None}) == (None, None, None, None)
    assert usage_counts({}) == (None, None, None, None)
    assert usage_counts(None) == (None, None, None, None)
    assert usage_counts({"usage": {"input_tokens": "12", "output_tokens": True}}) == (None, None, None, None)


def test_row_round_trips_through_a_dict() -> None:
    """A spill-file line is the row's dict; reading it back gives the same row."""
    given = row("a")
    assert UsageRow.from_dict(given.to_dict()) == given
    assert replace(given, cost=None).to_dict()["cost"] is None
