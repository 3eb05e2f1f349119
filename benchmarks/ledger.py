"""Ledger throughput: rows per second the usage ledger writes to SQLite and to PostgreSQL.

    python -m benchmarks.ledger [--rows N] [--batch-size B] [--postgresql URL] [--json out.json]

Each run records ``--rows`` rows into a :class:`cch.usage.UsageLedger` and times its flush: the
rows go to the database in the ledger's own batches (``--batch-size``, one transaction each),
exactly as the flush timer writes them. SQLite is a fresh file in a temporary directory (WAL,
as the gateway opens it); PostgreSQL is a fresh schema in ``--postgresql`` (default: the local
``test`` database as user ``postgres``), dropped afterwards. The target is ≥ 5,000 rows/s on
each (issue 14); a run below it exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from typing import Any

from twisted.internet.defer import Deferred

from cch.usage.ledger import UsageLedger
from cch.usage.rows import UsageRow
from cch.usage.store import open_store

TARGET = 5000.0
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def make_rows(count: int, tag: str) -> list[UsageRow]:
    now = time.time()
    return [
        UsageRow(
            request_id=f"{tag}-{i}",
            started_at=now - 2.0,
            ended_at=now,
            response_id=f"resp_{tag}_{i}",
            key=f"key{i % 8}",
            provider="primary",
            model_requested="gpt-5",
            model_served="gpt-5-2025-08-07",
            client_transport="websocket",
            upstream_transport="websocket",
            status="completed",
            error_code=None,
            attempts=1,
            replayed=False,
            input_tokens=12000 + i % 100,
            cached_input_tokens=10000,
            output_tokens=300,
            reasoning_tokens=120,
            cost=0.0061,
            first_event_ms=180.0,
            duration_ms=2000.0,
            replica="bench",
        )
        for i in range(count)
    ]


async def measure(reactor: Any, database: str, run_dir: str, rows: int, batch_size: int) -> dict[str, Any]:
    store = open_store(database, run_dir, reactor)
    ledger = UsageLedger(store, reactor, spill_path=f"{run_dir}/spill.jsonl", flush_interval=3600.0, max_pending_rows=rows, batch_size=batch_size)
    ledger.startService()
    await ledger.flush()  # migrations, outside the timing
    batch = make_rows(rows, uuid.uuid4().hex[:8])
    started = time.perf_counter()
    for r in batch:
        ledger.record(r)
    await ledger.flush()
    elapsed = time.perf_counter() - started
    ok = ledger.pending == 0 and ledger.written == rows and ledger.dropped == 0 and ledger.spilled == 0
    await ledger.stopService()
    if not ok:
        raise SystemExit(f"{database.split(':')[0]}: rows not all written (pending {ledger.pending}, written {ledger.written})")
    return {"rows": rows, "batch_size": batch_size, "seconds": round(elapsed, 3), "rows_per_second": round(rows / elapsed)}


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        results["sqlite"] = await measure(reactor, "sqlite:///bench.sqlite3", run_dir, args.rows, args.batch_size)
    if args.postgresql != "off":
        import psycopg

        schema = "cch_bench_" + uuid.uuid4().hex[:8]
        with psycopg.connect(args.postgresql, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
            try:
                sep = "&" if "?" in args.postgresql else "?"
                url = f"{args.postgresql}{sep}options=-csearch_path%3D{schema}"
                with tempfile.TemporaryDirectory() as run_dir:
                    results["postgresql"] = await measure(reactor, url, run_dir, args.rows, args.batch_size)
            finally:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ledger", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=1000, help="rows per transaction (the ledger's default: 1000)")
    p.add_argument("--postgresql", default=DEFAULT_PG, help="PostgreSQL URL for a scratch schema, or 'off'")
    p.add_argument("--json", help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    from twisted.internet.task import react

    args = parser().parse_args(argv)
    outcome: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        outcome.update(await run(reactor, args))

    try:
        react(lambda r: Deferred.fromCoroutine(go(r)))
    except SystemExit as exc:
        if exc.code:
            raise
    for name, result in outcome.items():
        verdict = "ok" if result["rows_per_second"] >= TARGET else f"BELOW the {TARGET:,.0f} rows/s target"
        print(f"{name:<11} {result['rows']:>7,} rows in {result['seconds']:>6.3f} s = {result['rows_per_second']:>8,} rows/s  ({verdict})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=2)
    return 0 if outcome and all(r["rows_per_second"] >= TARGET for r in outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
