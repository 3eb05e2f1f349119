"""Real databases for the ledger tests: a SQLite file in tmp_path, or a schema of its own in the
machine's PostgreSQL (127.0.0.1:5432, database ``test``), each able to go down and come back.

PostgreSQL tests skip when it does not answer, except under ``CI=true``, where they fail: CI runs
PostgreSQL as a service, so a skip there would hide a broken ledger.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cch.usage.store import LedgerStore, open_store

PG_ADMIN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=5"


def postgres_admin() -> Any:
    """An autocommit superuser connection, or the test skips (fails under CI=true)."""
    try:
        import psycopg

        return psycopg.connect(PG_ADMIN, autocommit=True)
    except Exception as exc:
        reason = f"PostgreSQL at 127.0.0.1:5432 (database test, user postgres) is unreachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: the ledger tests must run on PostgreSQL)")
        pytest.skip(reason)


class TestDatabase:
    """One test's database, reached through the store as the gateway would, and directly (so a
    test checks what is really stored, not what the store says)."""

    __test__ = False
    kind: str
    url: str

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stores: list[LedgerStore] = []

    def open(self, reactor: Any) -> LedgerStore:
        # busy_timeout 0: a locked SQLite file fails a write at once instead of after 5 s.
        store = open_store(self.url, str(self.run_dir), reactor, busy_timeout=0, connect_timeout=5)
        self.stores.append(store)
        return store

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def count(self) -> int:
        return self.query("SELECT COUNT(*) FROM cch_usage")[0][0]

    def request_ids(self) -> list[str]:
        return sorted(r[0] for r in self.query("SELECT request_id FROM cch_usage"))

    def down(self) -> None:
        """The database stops taking writes and new connections, as in an outage."""
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        for store in self.stores:
            store.close()


class SQLiteDatabase(TestDatabase):
    kind = "sqlite"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.url = "sqlite:///usage.sqlite3"  # relative: under the run directory
        self.path = run_dir / "usage.sqlite3"
        self.locker: sqlite3.Connection | None = None

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql, params).fetchall()

    def down(self) -> None:
        # Another process holding the write lock: every write of the gateway's fails.
        self.locker = sqlite3.connect(self.path, isolation_level=None)
        self.locker.execute("BEGIN EXCLUSIVE")

    def up(self) -> None:
        if self.locker is not None:
            self.locker.execute("ROLLBACK")
            self.locker.close()
            self.locker = None

    def cleanup(self) -> None:
        self.up()
        super().cleanup()


class PostgresDatabase(TestDatabase):
    kind = "postgresql"

    def __init__(self, run_dir: Path, admin: Any) -> None:
        super().__init__(run_dir)
        self.admin = admin
        # A login role and a schema of its own: tests run side by side and again and again.
        self.name = "cch_t_" + uuid.uuid4().hex[:12]
        admin.execute(f"CREATE ROLE {self.name} LOGIN")
        admin.execute(f"CREATE SCHEMA {self.name} AUTHORIZATION {self.name}")
        self.url = f"postgresql://{self.name}@127.0.0.1:5432/test?options=-csearch_path%3D{self.name}"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.admin.cursor() as cur:
            cur.execute(f"SET search_path TO {self.name}")
            cur.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def down(self) -> None:
        # New connections refused, open ones terminated: what the gateway sees of a stopped server.
        self.admin.execute(f"ALTER ROLE {self.name} NOLOGIN")
        self._terminate()

    def up(self) -> None:
        self.admin.execute(f"ALTER ROLE {self.name} LOGIN")

    def _terminate(self) -> None:
        self.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (self.name,))

    def cleanup(self) -> None:
        super().cleanup()
        self._terminate()
        self.admin.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
        self.admin.execute(f"DROP ROLE IF EXISTS {self.name}")
        self.admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestDatabase]:
    """Each ledger test on SQLite and on PostgreSQL."""
    db: TestDatabase
    if request.param == "sqlite":
        db = SQLiteDatabase(tmp_path)
    else:
        db = PostgresDatabase(tmp_path, postgres_admin())
    try:
        yield db
    finally:
        db.cleanup()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[SQLiteDatabase]:
    db = SQLiteDatabase(tmp_path)
    try:
        yield db
    finally:
        db.cleanup()


@pytest.fixture
def no_stray_threads() -> Iterator[None]:
    """Fail a test that leaves a database pool's threads running (the reactor's own pool is
    shared and stays)."""
    before = set(threading.enumerate())
    yield
    stray = [t for t in threading.enumerate() if t not in before and t.is_alive() and "twisted.internet.reactor" not in t.name]
    assert stray == [], f"threads left running: {stray}"
