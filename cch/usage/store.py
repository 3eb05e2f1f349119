"""The usage ledger's database: SQLite (embedded default) or PostgreSQL, through
``twisted.enterprise.adbapi`` so every query runs on the pool's own threads, off the reactor.

One SQL text per statement, written with ``?`` placeholders; :meth:`Dialect.sql` turns them into
psycopg's ``%s`` (no statement here holds a literal ``?`` or ``%`` for PostgreSQL). Where the two
databases differ (column types, the UTC day of an epoch, how a batch is inserted), each dialect
has its own text.
The schema is versioned: :data:`MIGRATIONS` is the one list of steps, applied in order at
:meth:`LedgerStore.start` and recorded in ``cch_schema`` (docs/usage.md#the-database).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore

from cch.adapters import QuietRollbackConnection
from cch.usage.rows import COLUMNS, UsageRow

T = TypeVar("T")

GROUPS = ("key", "model", "day")
TOTAL_FIELDS = ("turns", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost")
# pg_advisory_xact_lock key: replicas starting together migrate one after the other.
_MIGRATION_LOCK = 0x63636855  # "cchU"


class StoreError(Exception):
    """The database cannot be used as configured (missing driver, newer schema, bad URL)."""


@dataclass(frozen=True)
class Dialect:
    name: str  # "sqlite" | "postgresql"
    day: str  # SQL for the UTC day ("YYYY-MM-DD") of started_at
    begin: str | None  # statement that opens the migration transaction, if one is needed

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.name == "postgresql" else text


SQLITE = Dialect("sqlite", day="strftime('%Y-%m-%d', started_at, 'unixepoch')", begin="BEGIN IMMEDIATE")
POSTGRESQL = Dialect(
    "postgresql",
    day="to_char(to_timestamp(started_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    begin=None,
)


def _usage_table(text: str, integer: str, real: str, boolean: str) -> str:
    return f"""CREATE TABLE cch_usage (
        request_id TEXT PRIMARY KEY,
        started_at {real} NOT NULL,
        ended_at {real} NOT NULL,
        response_id {text},
        key {text},
        provider {text},
        model_requested {text},
        model_served {text},
        client_transport {text} NOT NULL,
        upstream_transport {text},
        status {text} NOT NULL,
        error_code {text},
        attempts INTEGER NOT NULL,
        replayed {boolean} NOT NULL,
        input_tokens {integer},
        cached_input_tokens {integer},
        output_tokens {integer},
        reasoning_tokens {integer},
        cost {real},
        first_event_ms {real},
        duration_ms {real} NOT NULL,
        replica {text} NOT NULL
    )"""


_COMMON_INDEXES = (
    "CREATE INDEX cch_usage_started_at ON cch_usage (started_at)",
    "CREATE INDEX cch_usage_key_started_at ON cch_usage (key, started_at)",
)
_OWNER_TABLE = "CREATE TABLE cch_response_owner (response_id TEXT PRIMARY KEY, key TEXT NOT NULL, created_at {real} NOT NULL)"

# (version, {dialect name: statements}). Append a step; never edit one that has shipped.
MIGRATIONS: tuple[tuple[int, dict[str, tuple[str, ...]]], ...] = (
    (
        1,
        {
            "sqlite": (
                _usage_table("TEXT", "INTEGER", "REAL", "INTEGER"),
                *_COMMON_INDEXES,
                _OWNER_TABLE.format(real="REAL"),
            ),
            "postgresql": (
                _usage_table("TEXT", "BIGINT", "DOUBLE PRECISION", "BOOLEAN"),
                *_COMMON_INDEXES,
                _OWNER_TABLE.format(real="DOUBLE PRECISION"),
            ),
        },
    ),
)
LATEST = MIGRATIONS[-1][0]

_OWNER_COLUMNS = ("response_id", "key", "created_at")
TEXT_LIMIT = 256  # characters kept of any text field
_REPLAYED = COLUMNS.index("replayed")


class LedgerStore:
    """Usage rows and response-id owners in one database; every method returns a Deferred that
    fires on the reactor once the pool's thread has finished."""

    def __init__(self, pool: adbapi.ConnectionPool, dialect: Dialect, clock: Any, where: str) -> None:
        self.pool = pool
        self.dialect = dialect
        self.clock = clock
        self.where = where  # for messages: the file or the URL without its password
        self._closed = False

    def _run(self, interaction: Callable[..., T], *args: Any) -> Deferred[T]:
        return self.pool.runInteraction(interaction, *args)

    # -- schema ------------------------------------------------------------------------------

    def start(self) -> Deferred[int]:
        """Apply the migrations this database has not had yet; fires with the schema version.
        Safe to call at every start, and from replicas starting together."""
        return self._run(self._migrate, self.clock.seconds())

    def _migrate(self, txn: Any, now: float) -> int:
        d = self.dialect
        if d.begin:
            txn.execute(d.begin)
        else:
            txn.execute(d.sql("SELECT pg_advisory_xact_lock(?)"), (_MIGRATION_LOCK,))
        real = "REAL" if d.name == "sqlite" else "DOUBLE PRECISION"
        txn.execute(f"CREATE TABLE IF NOT EXISTS cch_schema (version INTEGER PRIMARY KEY, applied_at {real} NOT NULL)")
        txn.execute("SELECT MAX(version) FROM cch_schema")
        current = txn.fetchone()[0] or 0
        if current > LATEST:
            raise StoreError(
                f"the usage database {self.where} has schema version {current}, newer than this "
                f"cch knows ({LATEST}); upgrade cch or point [usage] database elsewhere"
            )
        for version, steps in MIGRATIONS:
            if version > current:
                for statement in steps[d.name]:
                    txn.execute(statement)
                txn.execute(d.sql("INSERT INTO cch_schema (version, applied_at) VALUES (?, ?)"), (version, now))
        return LATEST

    # -- writes ------------------------------------------------------------------------------

    def insert(self, rows: Sequence[UsageRow]) -> Deferred[int]:
        """Write rows (and the owner of each row's response id); fires with how many were new.
        A request id already present is skipped: recording a turn twice counts it once."""
        return self.write(rows, ())

    def own(self, pairs: Sequence[tuple[str, str]]) -> Deferred[int]:
        """Record (response id, key name) owners; the first owner of an id stays its owner."""
        return self.write((), pairs)

    def write(self, rows: Sequence[UsageRow], owners: Sequence[tuple[str, str]]) -> Deferred[int]:
        """:meth:`insert` and :meth:`own` in one transaction; fires with the new rows' count."""
        return self._run(self._write, list(rows), list(owners), self.clock.seconds())

    def _write(self, txn: Any, rows: list[UsageRow], owners: list[tuple[str, str]], now: float) -> int:
        pairs = [(_text(rid), _text(key), now) for rid, key in owners]
        pairs += [(_text(row.response_id), _text(row.key), now) for row in rows if row.response_id and row.key]
        added = self._insert_new(txn, "cch_usage", COLUMNS, "request_id", [self._values(row) for row in rows])
        self._insert_new(txn, "cch_response_owner", _OWNER_COLUMNS, "response_id", pairs)
        return added

    def _insert_new(self, txn: Any, table: str, columns: Sequence[str], unique: str, values: list[tuple[Any, ...]]) -> int:
        """Insert the rows whose ``unique`` column is not in ``table`` yet; returns how many.

        SQLite gets a few multi-row statements: each statement is one step with the GIL released,
        where a statement per row would hand the GIL back and forth with the reactor's thread
        for every row. PostgreSQL gets the batch by COPY into a temporary table and one
        INSERT ... SELECT from it: a statement per row, or one statement with thousands of
        parameters, costs it several times more (benchmarks/ledger.py)."""
        if not values:
            return 0
        names = ", ".join(columns)
        if self.dialect.name == "sqlite":
            row_marks = "(" + ", ".join("?" for _ in columns) + ")"
            per_statement = max(1, SQLITE_MAX_VARIABLES // len(columns))
            added = 0
            for start in range(0, len(values), per_statement):
                chunk = values[start : start + per_statement]
                marks = ", ".join([row_marks] * len(chunk))
                flat = [value for row in chunk for value in row]
                txn.execute(f"INSERT INTO {table} ({names}) VALUES {marks} ON CONFLICT ({unique}) DO NOTHING", flat)
                added += max(txn.rowcount, 0)
            return added
        batch = f"{table}_batch_v{LATEST}"  # per connection; emptied by each commit
        txn.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {batch} (LIKE {table}) ON COMMIT DELETE ROWS")
        with txn.copy(f"COPY {batch} ({names}) FROM STDIN") as copy:
            for value in values:
                copy.write_row(value)
        txn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {batch} ON CONFLICT ({unique}) DO NOTHING")
        return max(txn.rowcount, 0)

    def _values(self, row: UsageRow) -> tuple[Any, ...]:
        values = tuple(_text(getattr(row, name)) for name in COLUMNS)
        if self.dialect.name == "sqlite":
            return values
        # PostgreSQL's BOOLEAN column wants a bool; SQLite stores it as 0/1 either way.
        return values[:_REPLAYED] + (bool(values[_REPLAYED]),) + values[_REPLAYED + 1 :]

    # -- reads -------------------------------------------------------------------------------

    def totals(
        self, since: datetime | None = None, until: datetime | None = None, by: tuple[str, ...] = ()
    ) -> Deferred[list[dict[str, Any]]]:
        """Turns, tokens and cost per group of ``by`` (⊆ key, model, day), for turns started in
        [since, until). ``model`` is the model served, else the one asked for; ``day`` the UTC
        date. A sum over only unknown values (no price, no usage) stays None, never 0."""
        unknown = [g for g in by if g not in GROUPS]
        if unknown or len(set(by)) != len(by):
            raise ValueError(f"group by any of {', '.join(GROUPS)} (each once); got {', '.join(by) or 'nothing'}")
        return self._run(self._totals, _epoch(since), _epoch(until), tuple(by))

    def _totals(self, txn: Any, since: float | None, until: float | None, by: tuple[str, ...]) -> list[dict[str, Any]]:
        d = self.dialect
        expressions = {"key": "key", "model": "COALESCE(model_served, model_requested)", "day": d.day}
        cast = (lambda s: s) if d.name == "sqlite" else (lambda s: f"CAST({s} AS BIGINT)")
        selected = [expressions[g] for g in by] + [
            "COUNT(*)",
            *(cast(f"SUM({c})") for c in ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens")),
            "SUM(cost)",
        ]
        where, params = [], []
        if since is not None:
            where.append("started_at >= ?")
            params.append(since)
        if until is not None:
            where.append("started_at < ?")
            params.append(until)
        query = f"SELECT {', '.join(selected)} FROM cch_usage"
        if where:
            query += " WHERE " + " AND ".join(where)
        if by:
            query += " GROUP BY " + ", ".join(expressions[g] for g in by)
        txn.execute(d.sql(query), tuple(params))
        result = []
        for record in txn.fetchall():
            entry = dict(zip(by + TOTAL_FIELDS, record, strict=True))
            if entry["turns"]:
                result.append(entry)
        # One order on both databases (they sort NULL differently): unknown key/model first.
        result.sort(key=lambda e: tuple((e[g] is not None, e[g] or "") for g in by))
        return result

    def spent(self, key: str, since: float) -> Deferred[tuple[int, float]]:
        """(input + output tokens, USD) used by ``key`` in turns started at or after ``since``
        (epoch seconds): what a limit window starts from after a restart."""
        return self._run(self._spent, key, since)

    def _spent(self, txn: Any, key: str, since: float) -> tuple[int, float]:
        txn.execute(
            self.dialect.sql(
                "SELECT SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), SUM(cost) "
                "FROM cch_usage WHERE key = ? AND started_at >= ?"
            ),
            (key, since),
        )
        tokens, cost = txn.fetchone()
        return int(tokens or 0), float(cost or 0.0)

    def owner(self, response_id: str) -> Deferred[str | None]:
        """The key name that created ``response_id``, or None when no key did."""
        return self._run(self._owner, _text(response_id))

    def _owner(self, txn: Any, response_id: str) -> str | None:
        txn.execute(self.dialect.sql("SELECT key FROM cch_response_owner WHERE response_id = ?"), (response_id,))
        found = txn.fetchone()
        return found[0] if found else None

    def close(self) -> None:
        """Stop the pool's threads (waiting for a query in progress) and close its connections."""
        if not self._closed:
            self._closed = True
            self.pool.close()


SQLITE_MAX_VARIABLES = 999
"""Parameters one SQLite statement may take everywhere (SQLITE_MAX_VARIABLE_NUMBER before
SQLite 3.32; 32766 since): 45 rows a statement, a few dozen statements a batch."""


def _text(value: Any) -> Any:
    """A string as the database can take it: at most TEXT_LIMIT characters, no NUL (PostgreSQL
    refuses it), no lone surrogate (UTF-8 cannot encode it). Model names come from clients; one
    such name must not fail its batch every time it is retried."""
    if not isinstance(value, str):
        return value
    if len(value) > TEXT_LIMIT:
        value = value[:TEXT_LIMIT]
    if "\x00" in value or not value.isascii():
        value = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return value


def _epoch(when: datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def sqlite_path(database: str, run_dir: str) -> str:
    """The file of ``sqlite:///<path>``: relative paths are under the run directory."""
    return os.path.join(run_dir, database.removeprefix("sqlite:///"))


class LedgerPool(adbapi.ConnectionPool):
    """adbapi's pool; a connection the database dropped is a warning, not a critical error."""

    connectionFactory = QuietRollbackConnection


def open_store(database: str, run_dir: str, reactor: IReactorCore, *, busy_timeout: float = 5.0, connect_timeout: int = 5) -> LedgerStore:
    """A store for ``[usage] database`` (not ``"off"``); nothing is opened until the first query.

    ``busy_timeout`` is how long SQLite waits for another writer's lock before the write fails
    (and is retried by the ledger); ``connect_timeout`` bounds a PostgreSQL connection attempt
    unless the URL sets its own."""
    common: dict[str, Any] = {"cp_reactor": reactor, "cp_noisy": False, "cp_reconnect": True, "cp_min": 1}
    if database.startswith("sqlite:///"):
        path = sqlite_path(database, run_dir)
        pool = LedgerPool(
            "sqlite3",
            path,
            timeout=busy_timeout,
            check_same_thread=False,
            cp_max=1,
            cp_openfun=_sqlite_open,
            **common,
        )
        return LedgerStore(pool, SQLITE, reactor, path)
    if database.startswith(("postgresql://", "postgres://")):
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise StoreError("a PostgreSQL usage database needs psycopg: pip install 'cch[postgres]'") from None
        try:
            params = conninfo_to_dict(database)
        except Exception as exc:  # psycopg.ProgrammingError; the URL is never shown (password)
            raise StoreError(f"not a valid PostgreSQL URL: {type(exc).__name__}") from None
        params.setdefault("connect_timeout", connect_timeout)
        params.setdefault("application_name", "cch")
        shown = f"postgresql://{params.get('host', '')}:{params.get('port', 5432)}/{params.get('dbname', '')}"
        pool = LedgerPool("psycopg", cp_max=3, **params, **common)
        return LedgerStore(pool, POSTGRESQL, reactor, shown)
    raise StoreError(f"not a usage database URL: {database.split(':', 1)[0]}:...")


def _sqlite_open(connection: Any) -> None:
    # WAL: `cch usage` and other readers never block the gateway's writes. The mode is kept in
    # the file; when another connection holds the lock it needs, the next connection sets it.
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
        pass

