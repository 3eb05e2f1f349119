"""``cch ARGS`` is ``twistd -n cch ARGS``: the gateway in the foreground.

``cch usage [--config F] [--since D] [--until D] [--by key,model,day] [--json]`` prints usage
totals from the ledger's database instead (docs/usage.md#reports).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from twisted.internet.defer import Deferred


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["usage"]:
        from twisted.internet.task import react

        react(lambda reactor: Deferred.fromCoroutine(usage(args[1:], reactor, sys.stdout, sys.stderr)).addCallback(_exit_code))
        return
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "--logger=cch.logs.twistd_observer", "cch", *args]
    run()


def _exit_code(code: int) -> None:
    if code:
        raise SystemExit(code)


def usage_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cch usage",
        description="Usage totals (turns, tokens, USD) from the usage ledger's database. Times are UTC.",
    )
    parser.add_argument("--config", help="the gateway's TOML config (for [usage] database); CCH_* variables apply as for the gateway")
    parser.add_argument("--since", help="from this day (YYYY-MM-DD) or ISO datetime, inclusive")
    parser.add_argument("--until", help="to this day (YYYY-MM-DD, the whole day included) or ISO datetime, exclusive")
    parser.add_argument("--by", help="group by any of key,model,day, comma-separated (default key,model,day; '' for one total)")
    parser.add_argument("--json", action="store_true", help="a JSON list of objects, one per group")
    return parser


async def usage(argv: list[str], reactor: Any, out: TextIO, err: TextIO, run_dir: str | None = None) -> int:
    """``cch usage``: 0 on success, 1 when the database cannot be read, 2 for bad arguments.
    A relative SQLite path is relative to ``run_dir`` (default: the current directory), as for
    the gateway started there."""
    from cch.config import ConfigError, load_config
    from cch.usage.report import ReportError, arguments, render_json, render_table
    from cch.usage.store import StoreError, open_store, sqlite_path

    try:
        options = usage_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed why
        return int(exc.code or 0)
    try:
        config = load_config(options.config)
    except ConfigError as exc:
        print(f"cch usage: {exc}", file=err)
        return 2
    try:
        since, until, by = arguments(options.since, options.until, options.by)
    except ReportError as exc:
        print(f"cch usage: {exc}", file=err)
        return 2
    database = config.usage.database
    run_dir = os.getcwd() if run_dir is None else run_dir
    if database == "off":
        print("cch usage: the usage ledger is off ([usage] database = \"off\")", file=err)
        return 1
    if database.startswith("sqlite:///") and not os.path.exists(sqlite_path(database, run_dir)):
        print(f"cch usage: no usage database at {sqlite_path(database, run_dir)} (run cch usage where the gateway runs, or set [usage] database)", file=err)
        return 1
    try:
        store = open_store(database, run_dir, reactor)
    except StoreError as exc:
        print(f"cch usage: {exc}", file=err)
        return 1
    try:
        await store.start()
        groups = await store.totals(since, until, by)
    except Exception as exc:
        print(f"cch usage: cannot read {store.where}: {_describe(exc)}", file=err)
        return 1
    finally:
        store.close()
    print(render_json(groups) if options.json else render_table(groups, by), file=out)
    return 0


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


if __name__ == "__main__":
    main()
