"""The usage ledger: one row per turn, recorded without waiting and written in batches.

``record(row)`` only appends to a queue. Every ``flush_interval`` (on the injected clock) one
*cycle* runs: start the store if it has not started (migrations), write the queue in batches, then
replay the spill file if it may hold rows. When the database is down the rows wait and the next
cycle retries them; past ``max_pending_rows`` the oldest are appended to the spill file (JSON
lines), which is replayed, and only then emptied, once the database takes writes again — at the
next start at the latest. ``stopService`` writes what is left, or spills it, before it fires.
Nothing is ever dropped unless both the database and the spill file refuse it at stop, and the
``cch_usage_rows_dropped`` counter says so (docs/usage.md#when-the-database-is-down).

Response-id ownership is kept beside the rows: a bounded map of recent owners answers a follow-up
turn before the owner reaches the database; older ids are looked up in the store. With several
replicas an owner directory shared through Redis (:meth:`Ledger.share_owners`) answers between
the two: a follow-up on another replica, before the owner's batch reached the database.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cch.usage.rows import UsageRow, row_problem
from cch.usage.store import LedgerStore, StoreError, open_store

log = Logger()

TOKEN_KINDS = ("input", "cached_input", "output", "reasoning")


class RecentOwners:
    """The owners of the most recent response ids, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._owners: OrderedDict[str, str] = OrderedDict()

    def add(self, response_id: str, key: str) -> None:
        # The first owner of an id stays its owner, as in the store.
        if response_id not in self._owners:
            self._owners[response_id] = key
            if len(self._owners) > self.size:
                self._owners.popitem(last=False)

    def get(self, response_id: str) -> str | None:
        return self._owners.get(response_id)


class OwnerDirectory(Protocol):
    """Owners shared with other replicas (:class:`cch.cluster.owners.RedisOwners`)."""

    def put(self, response_id: str, key: str) -> Deferred[None]: ...

    def get(self, response_id: str) -> Deferred[str | None]: ...


class Ledger(Service):
    """What the gateway records turns and owners into: :class:`UsageLedger`, or
    :class:`NullLedger` when the ledger is off. Both count tokens and turns for the metrics and
    keep recent owners in memory."""

    store: LedgerStore | None = None

    def __init__(self, *, recent_owners: int = 65536) -> None:
        self.recent = RecentOwners(recent_owners)
        self.tokens: dict[tuple[str, str, str, str], int] = {}
        self.turns: dict[tuple[str, str], int] = {}
        self.shared_owners: OwnerDirectory | None = None

    def share_owners(self, directory: OwnerDirectory) -> None:
        """Also write owners to ``directory`` and ask it before the database (several replicas)."""
        self.shared_owners = directory

    def record(self, row: UsageRow) -> None:
        """Count one turn; never blocks, never raises."""
        try:
            self._count(row)
        except Exception:
            log.failure("usage_record_failed")

    def _count(self, row: UsageRow) -> None:
        key = row.key or ""
        self.turns[(key, row.status)] = self.turns.get((key, row.status), 0) + 1
        labels = (key, row.provider or "", row.model_served or row.model_requested or "")
        counts = (row.input_tokens, row.cached_input_tokens, row.output_tokens, row.reasoning_tokens)
        for kind, count in zip(TOKEN_KINDS, counts, strict=True):
            if count:
                series = (*labels, kind)
                self.tokens[series] = self.tokens.get(series, 0) + count
        if row.response_id and row.key:
            self.recent.add(row.response_id, row.key)

    def owns(self, response_id: str, key: str) -> None:
        """``key`` created ``response_id``: only ``key`` may continue from it."""
        self.recent.add(response_id, key)
        if self.shared_owners is not None:
            self.shared_owners.put(response_id, key)

    def owner_of(self, response_id: str) -> Deferred[str | None]:
        """The key that created ``response_id``, or None: this process's recent owners, then the
        shared directory, then the database. Fails when the database cannot say (the caller
        must then refuse the continuation: "no owner" would let any key continue from it)."""
        known = self.recent.get(response_id)
        if known is not None:
            return succeed(known)
        if self.shared_owners is None:
            return self._stored_owner(response_id)
        return Deferred.fromCoroutine(self._shared_owner(response_id))

    async def _shared_owner(self, response_id: str) -> str | None:
        assert self.shared_owners is not None
        try:
            owner = await self.shared_owners.get(response_id)
        except CancelledError:
            raise
        except Exception as exc:
            if self.store is None:
                raise  # no database to ask instead: nobody can say (the caller refuses)
            log.debug("shared_owner_unknown", error=_describe(exc))  # the database still may
            owner = None
        if owner is not None:
            return owner
        return await self._stored_owner(response_id)

    def _stored_owner(self, response_id: str) -> Deferred[str | None]:
        """What the database says; nothing is kept here."""
        return succeed(None)

    @property
    def database_state(self) -> str:
        """For /readyz: ``off`` (no database), ``starting``, ``up`` or ``down`` (the last
        operation failed; rows wait or spill meanwhile)."""
        return "off"

    def flush(self) -> Deferred[None]:
        return succeed(None)

    def spent(self, key: str, since: float) -> Deferred[tuple[int, float]]:
        """Nothing is kept: every window starts empty."""
        return succeed((0, 0.0))

    @property
    def pending(self) -> int:
        return 0

    def collect(self) -> Iterator[Metric]:
        """The ledger's figures, read at scrape time (cch.metrics)."""
        tokens = CounterMetricFamily(
            "cch_tokens", "Tokens reported by upstreams, by key, provider, model and kind.", labels=["key", "provider", "model", "kind"]
        )
        for series, count in sorted(self.tokens.items()):
            tokens.add_metric(list(series), count)
        yield tokens
        turns = CounterMetricFamily("cch_turns", "Turns recorded in the usage ledger, by key and status.", labels=["key", "status"])
        for series, count in sorted(self.turns.items()):
            turns.add_metric(list(series), count)
        yield turns


class NullLedger(Ledger):
    """``[usage] database = "off"``: rows are counted in the metrics and forgotten; owners live
    in memory only (the most recent ones): after a restart an id is one the gateway never saw,
    and is forwarded for the upstream to judge (docs/usage.md#ownership)."""


class UsageLedger(Ledger):
    """Rows written to a :class:`LedgerStore` in batches, off the hot path, never lost."""

    def __init__(
        self,
        store: LedgerStore,
        clock: IReactorTime,
        *,
        spill_path: str,
        flush_interval: float = 1.0,
        max_pending_rows: int = 10000,
        batch_size: int = 1000,
        recent_owners: int = 65536,
    ) -> None:
        super().__init__(recent_owners=recent_owners)
        self.store = store
        self.clock = clock
        self.spill_path = spill_path
        self.flush_interval = flush_interval
        self.max_pending_rows = max_pending_rows
        self.batch_size = batch_size
        self.rows: deque[UsageRow] = deque()
        self.owners: deque[tuple[str, str]] = deque()
        self.in_flight = 0
        self.written = 0
        self.spilled = 0
        self.dropped = 0
        self.write_errors = 0
        self.failing = False  # the last database operation failed
        self._store_started = False
        self._spill_may_hold_rows = True  # checked at the first cycle: left by a previous run?
        self._replaying = False
        self._cycle: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._stopped = False

    # -- the hot path ------------------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one turn's row; never blocks, never raises."""
        try:
            problem = row_problem(row)
            if problem is not None:  # a bug in the caller; the metric and the log say so
                self.dropped += 1
                log.critical("usage_row_invalid", problem=problem, row=repr(row))
                return
            self._count(row)
            if self._stopped:  # a turn that ended after the ledger stopped: straight to the file
                self._spill([row], [], at_stop=True)
            else:
                self.rows.append(row)
        except Exception:
            log.failure("usage_record_failed", request_id=getattr(row, "request_id", None))

    def owns(self, response_id: str, key: str) -> None:
        super().owns(response_id, key)
        self.owners.append((response_id, key))

    @property
    def database_state(self) -> str:
        if self.failing:
            return "down"
        return "up" if self._store_started else "starting"

    def _stored_owner(self, response_id: str) -> Deferred[str | None]:
        """The store's answer; it fails when the database is down (the caller refuses:
        previous_response_not_found makes Codex resend the context)."""
        if self._stopped:
            return fail(StoreError("the usage ledger has stopped"))
        if self._store_started and not self._spill_may_hold_rows:
            return self.store.owner(response_id)
        # Owners may still wait in the spill file (or the store has not started): the store can
        # answer only once a cycle has written them, else the lookup fails (refused: safe).
        return self.flush().addCallback(lambda _: self._owner_from_store(response_id))

    def _owner_from_store(self, response_id: str) -> Deferred[str | None]:
        if not self._store_started or self._spill_may_hold_rows:
            return fail(StoreError("the usage database does not hold every owner yet"))
        return self.store.owner(response_id)

    def spent(self, key: str, since: float) -> Deferred[tuple[int, float]]:
        """:meth:`LedgerStore.spent`, once the store has started (a fresh database has no table
        before its migrations): for seeding limit windows at start. Fails when the database does."""
        return self._after_start(lambda: self.store.spent(key, since))

    def totals(self, since: Any = None, until: Any = None, by: tuple[str, ...] = ()) -> Deferred[list[dict[str, Any]]]:
        """:meth:`LedgerStore.totals` once the store has started (``GET /admin/usage``)."""
        return self._after_start(lambda: self.store.totals(since, until, by))

    def _after_start(self, query: Any) -> Deferred[Any]:
        if self._stopped:  # the store's threads are gone: a query would never be answered
            return fail(StoreError("the usage ledger has stopped"))
        if self._store_started:
            return query()
        return self.flush().addCallback(lambda _: query())

    @property
    def pending(self) -> int:
        """Rows not yet in the database (queued or being written)."""
        return len(self.rows) + self.in_flight

    # -- the service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._tick()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.flush()
        if self.rows or self.owners:
            rows, owners = list(self.rows), list(self.owners)
            self.rows.clear()
            self.owners.clear()
            self._spill(rows, owners, at_stop=True)
        self._stopped = True
        self.store.close()

    def _tick(self) -> None:
        self._timer = self.clock.callLater(self.flush_interval, self._tick)
        self._spill_excess()
        if self._cycle is None:
            self._start_cycle()

    def flush(self) -> Deferred[None]:
        """One cycle, after the one in progress if any: fires once it is over, whatever the
        database did (a failure leaves the rows queued). For stop and for tests."""
        if self._stopped:  # the store is closed; rows recorded since went to the spill file
            return succeed(None)
        if self._cycle is None:
            return self._start_cycle()
        done: Deferred[None] = Deferred()

        def again(_: object) -> None:
            self.flush().chainDeferred(done)

        self._cycle.addBoth(again)
        return done

    def _start_cycle(self) -> Deferred[None]:
        cycle = self._cycle = Deferred.fromCoroutine(self._run_cycle())

        def over(_: object) -> None:
            if self._cycle is cycle:
                self._cycle = None

        cycle.addBoth(over)
        # A caller of flush() waits on a Deferred of its own.
        result: Deferred[None] = Deferred()
        cycle.addBoth(lambda _: result.callback(None))
        return result

    async def _run_cycle(self) -> None:
        try:
            if not self._store_started:
                if not await self._attempt(self.store.start()):
                    return
                self._store_started = True
            if not await self._write_queue():
                return
            if self._spill_may_hold_rows:
                await self._replay()
        except Exception:
            log.failure("usage_cycle_failed")

    async def _attempt(self, operation: Deferred[Any]) -> bool:
        try:
            await operation
        except Exception as exc:
            self.write_errors += 1
            if not self.failing:
                log.error("usage_database_unavailable", database=self.store.where, error=_describe(exc), pending=self.pending)
            self.failing = True
            return False
        if self.failing:
            log.info("usage_database_available", database=self.store.where, pending=self.pending)
        self.failing = False
        return True

    async def _write_queue(self) -> bool:
        while self.rows or self.owners:
            rows = [self.rows.popleft() for _ in range(min(self.batch_size, len(self.rows)))]
            owners = [self.owners.popleft() for _ in range(min(self.batch_size, len(self.owners)))]
            self.in_flight = len(rows)
            try:
                ok = await self._attempt(self.store.write(rows, owners))
            finally:
                self.in_flight = 0
            if not ok:
                self.rows.extendleft(reversed(rows))
                self.owners.extendleft(reversed(owners))
                return False
            self.written += len(rows)
        return True

    # -- the spill file ----------------------------------------------------------------------

    def _spill_excess(self) -> None:
        """Bound the memory held while the database is down: the oldest rows go to the file."""
        if self._replaying:  # the replay empties the file once its rows are in: not now
            return
        excess_rows = len(self.rows) - self.max_pending_rows
        excess_owners = len(self.owners) - self.max_pending_rows
        if excess_rows <= 0 and excess_owners <= 0:
            return
        rows = [self.rows.popleft() for _ in range(max(excess_rows, 0))]
        owners = [self.owners.popleft() for _ in range(max(excess_owners, 0))]
        if not self._spill(rows, owners, at_stop=False):
            self.rows.extendleft(reversed(rows))
            self.owners.extendleft(reversed(owners))

    def _spill(self, rows: Sequence[UsageRow], owners: Sequence[tuple[str, str]], *, at_stop: bool) -> bool:
        lines = [json.dumps({"row": row.to_dict()}, separators=(",", ":")) for row in rows]
        lines += [json.dumps({"owner": list(pair)}, separators=(",", ":")) for pair in owners]
        if not lines:
            return True
        try:
            with open(self.spill_path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if not at_stop:  # kept in memory; the next tick tries again
                log.error("usage_spill_failed", path=self.spill_path, error=_describe(exc), rows=len(rows))
                return False
            # Nowhere left to put them: say so, with the rows, in the log.
            self.dropped += len(rows)
            log.critical("usage_rows_dropped", path=self.spill_path, error=_describe(exc), rows=[r.to_dict() for r in rows])
            return False
        self.spilled += len(rows)
        self._spill_may_hold_rows = True
        log.warn("usage_rows_spilled", path=self.spill_path, rows=len(rows), owners=len(owners))
        return True

    async def _replay(self) -> None:
        """Write the spill file's rows, then empty it (only then: a crash in between replays
        them again, and the request ids keep them counted once)."""
        self._replaying = True
        try:
            try:
                with open(self.spill_path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                self._spill_may_hold_rows = False
                return
            rows, owners, rejected = _parse_spill(lines)
            for start in range(0, max(len(rows), len(owners)), self.batch_size):
                end = start + self.batch_size
                if not await self._attempt(self.store.write(rows[start:end], owners[start:end])):
                    return
            if rejected:
                with open(self.spill_path + ".rejected", "a", encoding="utf-8") as f:
                    f.write("\n".join(rejected) + "\n")
                log.error("usage_spill_lines_rejected", path=self.spill_path + ".rejected", lines=len(rejected))
            with open(self.spill_path, "w"):
                pass
            self._spill_may_hold_rows = False
            self.written += len(rows)
            if rows or owners:
                log.info("usage_spill_replayed", path=self.spill_path, rows=len(rows), owners=len(owners))
        except OSError as exc:
            log.error("usage_spill_unreadable", path=self.spill_path, error=_describe(exc))
        finally:
            self._replaying = False

    # -- metrics -----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("cch_usage_rows_pending", "Usage rows waiting for the database.", value=self.pending)
        for name, value, text in (
            ("cch_usage_rows_written", self.written, "Usage rows written to the database."),
            ("cch_usage_rows_spilled", self.spilled, "Usage rows written to the spill file while the database was down."),
            ("cch_usage_rows_dropped", self.dropped, "Usage rows lost: neither the database nor the spill file took them."),
            ("cch_usage_write_errors", self.write_errors, "Failed usage database operations (each retried)."),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield from super().collect()


def _parse_spill(lines: list[str]) -> tuple[list[UsageRow], list[tuple[str, str]], list[str]]:
    rows: list[UsageRow] = []
    owners: list[tuple[str, str]] = []
    rejected: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if "row" in entry:
                rows.append(UsageRow.from_dict(entry["row"]))
            else:
                response_id, key = entry["owner"]
                owners.append((str(response_id), str(key)))
        except (ValueError, TypeError, KeyError, AttributeError):
            rejected.append(line)  # e.g. a line cut short by a crash while it was written
    return rows, owners, rejected


def _describe(exc: BaseException) -> str:
    # The exception's type and first line: driver messages name hosts and users, never passwords.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def open_ledger(usage: Any, run_dir: str, reactor: Any, clock: IReactorTime | None = None) -> Ledger:
    """The ledger ``[usage]`` asks for (a :class:`cch.config.UsageConfig`): a
    :class:`NullLedger` when ``database = "off"``, else a :class:`UsageLedger` whose SQLite file
    and spill file are relative to ``run_dir``. Add it to the service after the parts that record
    rows, so it stops (and flushes) after them."""
    if usage.database == "off":
        return NullLedger()
    return UsageLedger(
        open_store(usage.database, run_dir, reactor),
        clock if clock is not None else reactor,
        spill_path=os.path.join(run_dir, usage.spill_file),
        flush_interval=usage.flush_interval,
        max_pending_rows=usage.max_pending_rows,
    )
