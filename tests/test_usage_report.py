"""Usage reports: the arguments ``cch usage`` and ``GET /admin/usage`` share, the JSON and the
table, and the ``cch usage`` command itself on real SQLite and PostgreSQL (cch/usage/report.py,
cch/cli.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from test_usage_store import DAY2, PRICES, row

from cch.cli import usage
from cch.usage.report import ReportError, parse_by, parse_when, render_json, render_table, report

if TYPE_CHECKING:
    from usage_fixtures import TestDatabase

pytest_plugins = ["usage_fixtures"]

FIELDS = ["turns", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost"]


def test_since_and_until_take_a_day_or_an_iso_datetime_in_utc() -> None:
    """A day in --until includes that day; an offset is converted; no offset means UTC."""
    assert parse_when("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_when("2026-12-01", end=True) == datetime(2026, 12, 2, tzinfo=UTC)
    assert parse_when("2026-12-01T10:30:00") == datetime(2026, 12, 1, 10, 30, tzinfo=UTC)
    assert parse_when("2026-12-01T10:30:00+02:00") == datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    assert parse_when("2026-12-01T10:30:00Z", end=True) == datetime(2026, 12, 1, 10, 30, tzinfo=UTC)
    for bad in ("yesterday", "2026-13-01", "12/01/2026", ""):
        with pytest.raises(ReportError, match="YYYY-MM-DD"):
            parse_when(bad)


def test_by_names_groups_in_the_order_asked() -> None:
    assert parse_by(None) == ("key", "model", "day")
    assert parse_by("") == ()
    assert parse_by("day, key") == ("day", "key")
    for bad in ("provider", "key,key", "key;model"):
        with pytest.raises(ReportError, match="--by takes key,model,day"):
            parse_by(bad)


def test_until_before_since_is_refused() -> None:
    with pytest.raises(ReportError, match="must be after"):
        report(None, since="2026-12-02", until="2026-12-01")  # type: ignore[arg-type]


async def filled(database: TestDatabase, reactor: Any) -> Any:
    store = database.open(reactor)
    await store.start()
    await store.insert([row("a"), row("b", started_at=DAY2), row("c", key="bob", model_served=None, model_requested="o3")])
    return store


@pytest_twisted.ensureDeferred
async def test_report_json_is_one_object_per_group_with_the_group_fields_and_totals(database: TestDatabase, reactor: Any) -> None:
    """The JSON both the command and /admin/usage give: group fields, then the six totals."""
    store = await filled(database, reactor)
    groups = json.loads(render_json(await report(store, since="2026-12-01", until="2026-12-01", by="key,model")))
    one = PRICES.cost("gpt-5", 1000, 200, 100)
    assert [list(g) for g in groups] == [["key", "model", *FIELDS]] * 2
    assert groups[0] == {"key": "alice", "model": "gpt-5-2025-08-07", "turns": 1, "input_tokens": 1000, "cached_input_tokens": 200, "output_tokens": 100, "reasoning_tokens": 40, "cost": pytest.approx(one)}
    assert groups[1]["key"] == "bob" and groups[1]["cost"] is None  # o3 has no price: null, not 0
    days = await report(store, by="day")
    assert [(g["day"], g["turns"]) for g in days] == [("2026-12-01", 2), ("2026-12-02", 1)]


def test_table_shows_unknown_as_a_dash_and_ends_with_a_total() -> None:
    groups = [
        {"key": "alice", "turns": 2, "input_tokens": 2000, "cached_input_tokens": 400, "output_tokens": 200, "reasoning_tokens": None, "cost": 0.0045},
        {"key": "bob", "turns": 1, "input_tokens": None, "cached_input_tokens": None, "output_tokens": None, "reasoning_tokens": None, "cost": None},
    ]
    lines = render_table(groups, ("key",)).splitlines()
    assert lines[0].split() == ["key", "turns", "input", "cached", "output", "reasoning", "cost_usd"]
    assert lines[2].split() == ["alice", "2", "2,000", "400", "200", "-", "0.0045"]
    assert lines[3].split() == ["bob", "1", "-", "-", "-", "-", "-"]
    assert lines[4].split() == ["total", "3", "2,000", "400", "200", "-", "0.0045"]


def write_config(tmp_path: Path, database: str) -> str:
    path = tmp_path / "cch.toml"
    path.write_text(f'[usage]\ndatabase = "{database}"\n')
    return str(path)


async def run_usage(args: list[str], reactor: Any, run_dir: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await usage(args, reactor, out, err, str(run_dir))
    return code, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_cch_usage_prints_json_and_a_table_from_the_configured_database(database: TestDatabase, reactor: Any, tmp_path: Path) -> None:
    """``cch usage --config F`` reads [usage] database, SQLite relative to the run directory."""
    (await filled(database, reactor)).close()
    config = write_config(tmp_path, database.url)
    code, out, err = await run_usage(["--config", config, "--json", "--by", "key", "--since", "2026-12-02"], reactor, database.run_dir)
    assert (code, err) == (0, "")
    assert [(g["key"], g["turns"]) for g in json.loads(out)] == [("alice", 1)]
    code, out, _ = await run_usage(["--config", config], reactor, database.run_dir)
    assert code == 0
    assert out.splitlines()[0].split() == ["key", "model", "day", "turns", "input", "cached", "output", "reasoning", "cost_usd"]
    assert out.splitlines()[-1].split()[:2] == ["total", "3"]


@pytest_twisted.ensureDeferred
async def test_cch_usage_explains_bad_arguments_and_a_missing_database(tmp_path: Path, reactor: Any) -> None:
    """Exit 2 for arguments, 1 for the database, with a line that says what to do."""
    config = write_config(tmp_path, "sqlite:///nowhere.sqlite3")
    code, _, err = await run_usage(["--config", config, "--since", "last week"], reactor, tmp_path)
    assert code == 2 and "not a date (YYYY-MM-DD)" in err
    code, _, err = await run_usage(["--config", config], reactor, tmp_path)
    assert code == 1 and f"no usage database at {tmp_path}/nowhere.sqlite3" in err
    assert not (tmp_path / "nowhere.sqlite3").exists()  # a report never creates a database
    code, _, err = await run_usage(["--config", write_config(tmp_path, "off")], reactor, tmp_path)
    assert code == 1 and "the usage ledger is off" in err
    code, _, err = await run_usage(["--config", str(tmp_path / "missing.toml")], reactor, tmp_path)
    assert code == 2 and "cannot read file" in err


@pytest_twisted.ensureDeferred
async def test_cch_usage_reports_an_unreachable_postgresql(tmp_path: Path, reactor: Any) -> None:
    """A refused connection is one line naming the server, never the password."""
    config = write_config(tmp_path, "postgresql://nobody:s3cret@127.0.0.1:1/none")
    code, _, err = await run_usage(["--config", config], reactor, tmp_path)
    assert code == 1 and "cannot read postgresql://127.0.0.1:1/none" in err
    assert "s3cret" not in err


def test_console_script_dispatches_usage_and_leaves_the_rest_to_twistd(sqlite_database: TestDatabase, tmp_path: Path) -> None:
    """``cch usage ...`` runs the report in its own process (its own reactor), exit code kept."""
    sqlite_database.query("CREATE TABLE probe (x)")  # the file exists; the command migrates it
    config = write_config(tmp_path, sqlite_database.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCH_")}
    command = [sys.executable, "-c", "import sys; from cch.cli import main; main(sys.argv[1:])"]
    done = subprocess.run([*command, "usage", "--config", config, "--json"], cwd=sqlite_database.run_dir, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "[]", "")
    bad = subprocess.run([*command, "usage", "--config", config, "--by", "nope"], cwd=sqlite_database.run_dir, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--by takes" in bad.stderr
    gateway = subprocess.run([*command, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert "twistd [options] cch" in gateway.stdout
