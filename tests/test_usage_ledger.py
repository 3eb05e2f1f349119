"""The usage ledger on real SQLite and real PostgreSQL: rows written in batches on the clock,
kept while the database is down, spilled past the bound and replayed, flushed at stop, never
dropped; owners that survive a restart (cch/usage/ledger.py).

The flush timer runs on a task.Clock; the database work runs on the store's real threads, and a
test waits for it with ``ledger.flush()`` (one more cycle, after the one in progress)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from test_usage_store import row
from twisted.internet.task import Clock

from cch.metrics import Metrics
from cch.usage.ledger import NullLedger, UsageLedger, open_ledger
from cch.usage.store import LedgerStore, StoreError, open_store

if TYPE_CHECKING:
    from usage_fixtures import TestDatabase

pytest_plugins = ["usage_fixtures"]


def make_ledger(store: LedgerStore, clock: Clock, run_dir: Path, **options: Any) -> UsageLedger:
    return UsageLedger(store, clock, spill_path=str(run_dir / "spill.jsonl"), flush_interval=1.0, **options)


def spill_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "spill.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def spilled_ids(run_dir: Path) -> list[str]:
    return sorted(line["row"]["request_id"] for line in spill_lines(run_dir) if "row" in line)


async def started(database: TestDatabase, reactor: Any, clock: Clock, **options: Any) -> UsageLedger:
    ledger = make_ledger(database.open(reactor), clock, database.run_dir, **options)
    ledger.startService()
    await ledger.flush()
    return ledger


@pytest_twisted.ensureDeferred
async def test_rows_written_in_one_batch_at_each_flush_interval(database: TestDatabase, reactor: Any) -> None:
    """record() only queues; the clock's tick hands the whole queue to the database at once."""
    clock = Clock()
    ledger = await started(database, reactor, clock)
    for i in range(3):
        ledger.record(row(f"r{i}"))
    assert ledger.pending == 3 and database.count() == 0
    clock.advance(0.5)
    assert len(ledger.rows) == 3  # not yet
    clock.advance(0.5)
    assert len(ledger.rows) == 0 and ledger.in_flight == 3  # the tick took them, one batch
    await ledger.flush()
    assert database.request_ids() == ["r0", "r1", "r2"]
    assert ledger.pending == 0 and ledger.written == 3
    await ledger.stopService()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_stop_service_writes_pending_rows_before_it_fires(database: TestDatabase, reactor: Any, no_stray_threads: None) -> None:
    """A gateway stopping (SIGTERM, drain) loses no row that was recorded but not yet flushed,
    and leaves no database thread behind."""
    clock = Clock()
    ledger = await started(database, reactor, clock)
    for i in range(5):
        ledger.record(row(f"r{i}"))
    await ledger.stopService()
    assert database.count() == 5
    assert spill_lines(database.run_dir) == []
    assert ledger.dropped == 0


@pytest_twisted.ensureDeferred
async def test_stop_during_a_write_waits_for_it_then_writes_the_rest(database: TestDatabase, reactor: Any) -> None:
    """Stop may come while the tick's batch is in the database's hands; rows recorded after
    that batch was taken follow it."""
    clock = Clock()
    ledger = await started(database, reactor, clock, batch_size=2)
    for i in range(3):
        ledger.record(row(f"r{i}"))
    clock.advance(1.0)
    assert ledger.in_flight == 2
    ledger.record(row("r3"))
    await ledger.stopService()
    assert database.request_ids() == ["r0", "r1", "r2", "r3"]
    assert ledger.pending == 0 and spill_lines(database.run_dir) == []
    assert await ledger.flush() is None  # a flush after stop is a no-op, not a hang


@pytest_twisted.ensureDeferred
async def test_nothing_lost_when_the_database_goes_down_mid_run_and_comes_back(database: TestDatabase, reactor: Any) -> None:
    """Rows recorded during an outage wait in memory, are retried at every tick, and arrive once
    the database is back; a repeated attempt never writes a row twice."""
    clock = Clock()
    ledger = await started(database, reactor, clock)
    ledger.record(row("before"))
    clock.advance(1.0)
    await ledger.flush()
    assert database.request_ids() == ["before"]

    database.down()
    for i in range(4):
        ledger.record(row(f"during{i}"))
    for _ in range(3):
        clock.advance(1.0)
        await ledger.flush()
    assert ledger.failing and ledger.write_errors >= 3
    assert ledger.pending == 4 and ledger.dropped == 0 and ledger.spilled == 0

    database.up()
    clock.advance(1.0)
    await ledger.flush()
    assert not ledger.failing
    assert database.request_ids() == ["before", "during0", "during1", "during2", "during3"]
    assert ledger.pending == 0 and ledger.dropped == 0
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_database_down_at_start_then_up(database: TestDatabase, reactor: Any) -> None:
    """A gateway may start before its database: migrations are retried with the rows."""
    first = database.open(reactor)
    await first.start()  # an existing database (the SQLite file must exist to be locked)
    first.close()
    database.down()
    clock = Clock()
    ledger = await started(database, reactor, clock)
    ledger.record(row("a"))
    clock.advance(1.0)
    await ledger.flush()
    assert ledger.failing and ledger.pending == 1
    database.up()
    clock.advance(1.0)
    await ledger.flush()
    assert database.request_ids() == ["a"] and ledger.pending == 0
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_sqlite_file_in_a_directory_that_appears_later(tmp_path: Path, reactor: Any) -> None:
    """A data directory not mounted yet: the file cannot be opened, rows wait, then arrive."""
    store = open_store("sqlite:///data/usage.sqlite3", str(tmp_path), reactor, busy_timeout=0)
    clock = Clock()
    ledger = make_ledger(store, clock, tmp_path)
    ledger.startService()
    ledger.record(row("a"))
    clock.advance(1.0)
    await ledger.flush()
    assert ledger.failing and ledger.pending == 1
    (tmp_path / "data").mkdir()
    clock.advance(1.0)
    await ledger.flush()
    assert ledger.pending == 0 and not ledger.failing
    await ledger.stopService()
    with sqlite3.connect(tmp_path / "data" / "usage.sqlite3") as conn:
        assert conn.execute("SELECT request_id FROM cch_usage").fetchall() == [("a",)]


@pytest_twisted.ensureDeferred
async def test_rows_past_the_bound_spill_to_the_file_and_replay_at_the_next_start(database: TestDatabase, reactor: Any) -> None:
    """Past max_pending_rows the oldest rows go to the spill file; what is still held at stop
    follows them; the next start writes the file into the database and only then empties it."""
    clock = Clock()
    ledger = await started(database, reactor, clock, max_pending_rows=3)
    database.down()
    for i in range(5):
        ledger.record(row(f"r{i}"))
    clock.advance(1.0)  # the tick spills the two oldest before it tries the database
    assert spilled_ids(database.run_dir) == ["r0", "r1"]
    assert ledger.spilled == 2 and len(ledger.rows) + ledger.in_flight == 3
    await ledger.flush()
    ledger.record(row("r5"))
    await ledger.stopService()  # the database is still down: the rest goes to the file too
    assert spilled_ids(database.run_dir) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert ledger.dropped == 0 and database.count() == 0

    # Next start, database still down: the file is kept as it is.
    clock = Clock()
    again = await started(database, reactor, clock)
    assert spilled_ids(database.run_dir) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    database.up()
    clock.advance(1.0)
    await again.flush()
    assert database.request_ids() == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert spill_lines(database.run_dir) == []
    await again.stopService()
    assert database.count() == 6 and again.dropped == 0


@pytest_twisted.ensureDeferred
async def test_spill_file_replayed_once_the_database_is_back_in_the_same_run(database: TestDatabase, reactor: Any) -> None:
    """A long outage need not wait for a restart: the spilled rows follow the queue back in."""
    clock = Clock()
    ledger = await started(database, reactor, clock, max_pending_rows=1)
    database.down()
    for i in range(3):
        ledger.record(row(f"r{i}"))
    clock.advance(1.0)
    await ledger.flush()
    assert spilled_ids(database.run_dir) == ["r0", "r1"]
    database.up()
    clock.advance(1.0)
    await ledger.flush()
    assert database.request_ids() == ["r0", "r1", "r2"]
    assert spill_lines(database.run_dir) == []
    assert ledger.written == 3 and ledger.dropped == 0
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_a_row_already_written_and_also_spilled_counts_once(database: TestDatabase, reactor: Any) -> None:
    """A crash between the replay's insert and the file's truncation replays rows again; the
    request id keeps each counted once."""
    clock = Clock()
    ledger = await started(database, reactor, clock)
    ledger.record(row("a"))
    await ledger.stopService()
    (database.run_dir / "spill.jsonl").write_text(json.dumps({"row": row("a").to_dict()}) + "\n" + json.dumps({"row": row("b").to_dict()}) + "\n")
    again = await started(database, reactor, Clock())
    assert database.request_ids() == ["a", "b"]
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_spent_and_totals_wait_for_the_migrations(database: TestDatabase, reactor: Any) -> None:
    """Limit windows are seeded, and /admin/usage answered, right at start on a fresh database."""
    ledger = make_ledger(database.open(reactor), Clock(), database.run_dir)
    spent = ledger.spent("alice", 0.0)  # before start: waits for it
    ledger.startService()
    assert await spent == (0, 0.0)
    ledger.record(row("a"))
    await ledger.flush()
    assert await ledger.spent("alice", 0.0) == (1100, ledger_cost())
    assert [(g["key"], g["turns"]) for g in await ledger.totals(by=("key",))] == [("alice", 1)]
    await ledger.stopService()


def ledger_cost() -> Any:
    return pytest.approx(row("x").cost)


@pytest_twisted.ensureDeferred
async def test_owners_survive_a_restart(database: TestDatabase, reactor: Any) -> None:
    """A new ledger on the same database still knows which key created each response id."""
    clock = Clock()
    ledger = await started(database, reactor, clock)
    ledger.owns("resp_early", "alice")  # at response.created, before the turn's row exists
    ledger.record(row("t1", key="bob", response_id="resp_bob"))
    assert await ledger.owner_of("resp_early") == "alice"  # known before any flush
    assert await ledger.owner_of("resp_bob") == "bob"
    await ledger.stopService()

    again = await started(database, reactor, Clock())
    assert again.recent.get("resp_early") is None  # so the answers below come from the database
    assert await again.owner_of("resp_early") == "alice"
    assert await again.owner_of("resp_bob") == "bob"
    assert await again.owner_of("resp_unknown") is None
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_owner_lookup_while_the_database_was_never_reached_fails(sqlite_database: TestDatabase, reactor: Any) -> None:
    """Down since start: an id not in memory cannot be vouched for."""
    sqlite_database.down()
    ledger = await started(sqlite_database, reactor, Clock())
    with pytest.raises(StoreError, match="does not hold every owner yet"):
        await ledger.owner_of("resp_old")
    ledger.owns("resp_new", "alice")
    assert await ledger.owner_of("resp_new") == "alice"
    sqlite_database.up()
    assert await ledger.owner_of("resp_old") is None
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_owners_spilled_with_rows_while_the_database_is_down(database: TestDatabase, reactor: Any) -> None:
    """An owner recorded during an outage reaches the database through the spill file."""
    ledger = await started(database, reactor, Clock())
    database.down()
    ledger.owns("resp_1", "alice")
    await ledger.stopService()
    assert {"owner": ["resp_1", "alice"]} in spill_lines(database.run_dir)
    database.up()
    again = await started(database, reactor, Clock())
    assert await again.owner_of("resp_1") == "alice"
    await again.stopService()


@pytest_twisted.ensureDeferred
async def test_owner_lookup_during_an_outage_fails_rather_than_answering_no_owner(database: TestDatabase, reactor: Any) -> None:
    """"No owner" lets any key continue from an id; when the database cannot say, the lookup
    fails so that the caller refuses the continuation instead."""
    if database.kind == "sqlite":
        pytest.skip("a SQLite writer's lock leaves reads working (WAL): no outage to read through")
    ledger = await started(database, reactor, Clock())
    ledger.owns("resp_1", "alice")
    await ledger.flush()
    again = await started(database, reactor, Clock())
    database.down()
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for a lost server
        await again.owner_of("resp_1")
    database.up()
    assert await again.owner_of("resp_1") == "alice"
    await again.stopService()
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_count_rows_tokens_and_turns(sqlite_database: TestDatabase, reactor: Any) -> None:
    """The ledger exports its own figures; dropped stays 0."""
    clock = Clock()
    ledger = await started(sqlite_database, reactor, clock, max_pending_rows=1)
    metrics = Metrics()
    metrics.export(ledger)
    ledger.record(row("a"))
    ledger.record(row("b", key="bob", status="failed", output_tokens=None, reasoning_tokens=None))
    sqlite_database.down()
    ledger.record(row("c"))
    ledger.record(row("d"))
    clock.advance(1.0)
    await ledger.flush()
    text = metrics.render().decode()
    assert "cch_usage_rows_pending 1.0" in text
    assert "cch_usage_rows_spilled_total 3.0" in text  # a, b and c: one row may wait in memory
    assert "cch_usage_rows_dropped_total 0.0" in text
    assert "cch_usage_write_errors_total 2.0" in text  # the tick's attempt and flush()'s
    assert 'cch_tokens_total{key="alice",kind="input",model="gpt-5-2025-08-07",provider="primary"} 3000.0' in text
    assert 'cch_tokens_total{key="bob",kind="output"' not in text  # the upstream never said
    assert 'cch_turns_total{key="alice",status="completed"} 3.0' in text
    assert 'cch_turns_total{key="bob",status="failed"} 1.0' in text
    sqlite_database.up()
    clock.advance(1.0)
    await ledger.flush()
    text = metrics.render().decode()
    assert "cch_usage_rows_pending 0.0" in text and "cch_usage_rows_written_total 4.0" in text
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_spill_line_cut_short_is_set_aside_and_the_rest_replayed(sqlite_database: TestDatabase, reactor: Any) -> None:
    """A line half-written when the process died must not block the rows after it."""
    run_dir = sqlite_database.run_dir
    good = json.dumps({"row": row("a").to_dict()})
    (run_dir / "spill.jsonl").write_text(good + "\n" + good[:40] + "\n")
    ledger = await started(sqlite_database, reactor, Clock())
    assert sqlite_database.request_ids() == ["a"]
    assert spill_lines(run_dir) == []
    assert (run_dir / "spill.jsonl.rejected").read_text() == good[:40] + "\n"
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_rows_recorded_after_stop_go_to_the_spill_file(sqlite_database: TestDatabase, reactor: Any) -> None:
    """A turn that ends after the ledger stopped is kept for the next start, not lost."""
    ledger = await started(sqlite_database, reactor, Clock())
    await ledger.stopService()
    ledger.record(row("late"))
    assert spilled_ids(sqlite_database.run_dir) == ["late"] and ledger.dropped == 0
    assert await ledger.owner_of("resp_late") == "alice"  # from memory; the store is closed
    with pytest.raises(StoreError, match="has stopped"):
        await ledger.owner_of("resp_unknown")
    with pytest.raises(StoreError, match="has stopped"):
        await ledger.spent("alice", 0.0)


@pytest_twisted.ensureDeferred
async def test_a_row_the_database_would_refuse_is_refused_at_record(sqlite_database: TestDatabase, reactor: Any) -> None:
    """A row missing a required field would fail its batch at every retry and hold back every
    other row; it is logged and counted as dropped (a caller's bug), the others are written."""
    ledger = await started(sqlite_database, reactor, Clock())
    ledger.record(row("bad", status=None))
    ledger.record(row("good"))
    await ledger.stopService()
    assert sqlite_database.request_ids() == ["good"]
    assert ledger.dropped == 1 and spill_lines(sqlite_database.run_dir) == []


@pytest_twisted.ensureDeferred
async def test_record_never_raises(sqlite_database: TestDatabase, reactor: Any) -> None:
    """A broken row is logged, not thrown into the turn that recorded it."""
    ledger = await started(sqlite_database, reactor, Clock())
    ledger.record(None)  # type: ignore[arg-type]
    await ledger.stopService()


@pytest_twisted.ensureDeferred
async def test_null_ledger_keeps_owners_in_memory_and_counts_turns(reactor: Any) -> None:
    """database = "off": no rows are kept, but ownership still holds and the metrics still count."""
    ledger = open_ledger(_Off(), "/nonexistent", reactor)
    assert isinstance(ledger, NullLedger) and ledger.store is None
    ledger.startService()
    ledger.owns("resp_1", "alice")
    ledger.record(row("t", response_id="resp_2", key="bob"))
    assert await ledger.owner_of("resp_1") == "alice"
    assert await ledger.owner_of("resp_2") == "bob"
    assert await ledger.owner_of("resp_3") is None
    metrics = Metrics()
    metrics.export(ledger)
    assert 'cch_turns_total{key="bob",status="completed"} 1.0' in metrics.render().decode()
    ledger.stopService()


def test_recent_owners_are_bounded() -> None:
    ledger = NullLedger(recent_owners=2)
    for i in range(3):
        ledger.owns(f"resp_{i}", "alice")
    assert [ledger.recent.get(f"resp_{i}") for i in range(3)] == [None, "alice", "alice"]


@pytest_twisted.ensureDeferred
async def test_open_ledger_uses_the_usage_config(tmp_path: Path, reactor: Any) -> None:
    """[usage] gives the database, the spill file (both under the run directory) and the bounds."""
    from cch.config import UsageConfig

    config = UsageConfig(database="sqlite:///u.sqlite3", flush_interval=2.5, max_pending_rows=7, spill_file="s.jsonl")
    ledger = open_ledger(config, str(tmp_path), reactor, Clock())
    assert isinstance(ledger, UsageLedger)
    assert (ledger.flush_interval, ledger.max_pending_rows, ledger.spill_path) == (2.5, 7, str(tmp_path / "s.jsonl"))
    ledger.startService()
    ledger.record(row("a"))
    await ledger.stopService()
    assert (tmp_path / "u.sqlite3").exists()


class _Off:
    database = "off"
