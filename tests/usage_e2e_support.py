"""Helpers for tests/test_usage_e2e.py: a gateway whose usage ledger writes to a real database,
upstream scripts that report ``usage``, the rows read back with plain SQL, the metrics scraped
over HTTP, and the gateway as a child process (SIGTERM)."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import treq
from conftest import RunningGateway, gateway_config
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, Config, PriceConfig, ServerConfig, UsageConfig
from cch.service import makeService
from cch.testing import FakeUpstream
from cch.testing.fake_upstream import Recorded
from cch.testing.scripts import SSE_HEADERS, Body, Delay, Event, Hold, Script, Step
from cch.usage.rows import COLUMNS

KEY = ClientKey(name="alice", key="sk-alice-0123456789")
AUTH = {"authorization": f"Bearer {KEY.key}"}
ADMIN_TOKEN = "admin-token-0123456789"
REPLICA = "replica-a"
PRICED = "gpt-5.5"  # [[prices]] has it: a dated snapshot of it is billed as it
SNAPSHOT = "gpt-5.5-2026-11-01"
UNPRICED = "no-price-model"
PRICES = (
    PriceConfig(
        model=PRICED, input_per_mtok=1.25, output_per_mtok=10.0, cached_input_per_mtok=0.125
    ),
)
# 2026-12-06T00:00:00Z: the gateway's Clock starts here, so rows have believable epochs and days.
T0 = 1796515200.0
DAY = "2026-12-06"

USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 800},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 120},
    "total_tokens": 1500,
}
TOKENS = (1200, 800, 300, 120)  # input, cached input, output, reasoning, as the row holds them
# (1200 - 800) x 1.25 + 800 x 0.125 + 300 x 10, per million tokens.
COST = (400 * 1.25 + 800 * 0.125 + 300 * 10.0) / 1_000_000


def gateway_clock() -> Clock:
    clock = Clock()
    clock.advance(T0)
    return clock


def ledger_config(
    fake: FakeUpstream,
    database: Any,
    *,
    tunnel: str = "in-process",
    upstream: str = "http",
    flush_interval: float = 3600.0,
    max_pending_rows: int = 10000,
    drain_timeout: float = 30.0,
    idle_timeout: float = 300.0,
    admin_report: bool = True,
) -> Config:
    """The conftest's gateway with one key, prices, an admin token, a replica name and the
    ledger on ``database`` (a usage_fixtures TestDatabase). The flush interval defaults to an
    hour: a test says when rows are written (``ledger.flush()``, or the stop)."""
    config = gateway_config(fake, tunnel=tunnel, upstream=upstream)
    provider = replace(config.providers[0], idle_timeout=idle_timeout)
    return replace(
        config,
        server=ServerConfig(
            listen="tcp:0:interface=127.0.0.1",
            admin_token=ADMIN_TOKEN,
            replica=REPLICA,
            drain_timeout=drain_timeout,
        ),
        keys=(KEY,),
        providers=(provider,),
        prices=PRICES,
        usage=UsageConfig(
            database=database.url,
            flush_interval=flush_interval,
            max_pending_rows=max_pending_rows,
            admin_report=admin_report,
        ),
    )


async def start(config: Config, clock: Clock, run_dir: Path) -> RunningGateway:
    """A started gateway whose SQLite file and spill file live in ``run_dir``; its ledger has
    applied the migrations when this returns."""
    service = makeService(config, global_reactor, clock, run_dir=str(run_dir))
    service.startService()
    await service.when_listening()
    await service.ledger.flush()
    return RunningGateway(service)


# -- what the fake upstream answers ----------------------------------------------------------


def answer(
    *,
    terminal: str = "response.completed",
    served: str | None = SNAPSHOT,
    usage: dict[str, Any] | None = USAGE,
    before_first: float = 0.0,
    before_terminal: float = 0.0,
    end: str = "finish",
) -> Callable[[Recorded], Script]:
    """A script source: ``response.created``, one delta, then ``terminal`` (whose ``response``
    carries ``usage`` and the model ``served``), with ``Delay`` steps on the fake's clock before
    the first event and before the terminal. ``end="hold"`` never sends the terminal. A plain
    (non-stream) HTTP request gets the terminal's response object as JSON."""

    def script(recorded: Recorded) -> Script:
        rid = recorded.response_id
        model = served or recorded.body.get("model")
        status = {
            "response.completed": "completed",
            "response.failed": "failed",
            "response.incomplete": "incomplete",
        }.get(terminal, "completed")
        response: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "status": status,
            "model": model,
            "output": [],
            "error": {"code": "server_error", "message": "The model failed."}
            if status == "failed"
            else None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "usage": usage,
        }
        if recorded.transport == "http" and not recorded.body.get("stream"):
            data = json.dumps(response).encode()
            steps: list[Step] = [Delay(before_first)] if before_first else []
            return Script((*steps, Body(data)), headers=(("content-type", "application/json"),))
        created = {
            "type": "response.created",
            "response": {**response, "status": "in_progress", "usage": None, "error": None},
        }
        delta = {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "hi",
        }
        if terminal == "error":
            last: dict[str, Any] = {
                "type": "error",
                "status": 500,
                "error": {
                    "type": "server_error",
                    "code": "server_is_overloaded",
                    "message": "Overloaded.",
                },
            }
        else:
            last = {"type": terminal, "response": response}
        steps = [Delay(before_first)] if before_first else []
        steps += [Event(created), Event(delta)]
        if end == "hold":
            steps.append(Hold())
        else:
            steps += [Delay(before_terminal)] if before_terminal else []
            steps.append(Event(last))
        return Script(tuple(steps), headers=SSE_HEADERS)

    return script


# -- the database, read directly ---------------------------------------------------------------


def rows(database: Any) -> list[dict[str, Any]]:
    """Every row of ``cch_usage`` as a dict of its columns, oldest first (booleans as bool)."""
    found = database.query(
        f"SELECT {', '.join(COLUMNS)} FROM cch_usage ORDER BY started_at, request_id"
    )
    out = []
    for record in found:
        entry = dict(zip(COLUMNS, record, strict=True))
        entry["replayed"] = bool(entry["replayed"])
        out.append(entry)
    return out


async def flushed_rows(running: RunningGateway, database: Any) -> list[dict[str, Any]]:
    """The ledger's rows once everything recorded so far is written."""
    await running.service.ledger.flush()
    return rows(database)


def by_status(found: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in found:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


# -- logs and metrics --------------------------------------------------------------------------


@contextmanager
def request_ids(event_name: str) -> Iterator[list[str]]:
    """The ``request_id`` of every log event named ``event_name`` while inside ``with``."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_format") == event_name and event.get("request_id"):
            seen.append(event["request_id"])

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observe)


async def get(
    running: RunningGateway, path: str, token: str | None = ADMIN_TOKEN
) -> tuple[int, bytes]:
    pool = HTTPConnectionPool(global_reactor, persistent=False)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = await treq.get(running.http_url + path, headers=headers, pool=pool)
    body = await treq.content(response)
    return response.code, body


async def scrape(running: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` (with the admin token) as {(sample name, sorted labels): value}."""
    code, body = await get(running, "/metrics")
    assert code == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# -- the gateway as a child process --------------------------------------------------------------


class Child(ProcessProtocol):
    """``python -m cch.cli ARGS``: its output as lines and its end, as Deferreds."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ended: Deferred[Any] = Deferred()  # ProcessDone or ProcessTerminated
        self.reason: Failure | None = None
        self._partial: dict[int, bytes] = {}
        self._waiting: list[tuple[Callable[[str], Any], Deferred[Any]]] = []

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *complete, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for entry in list(self._waiting):
                found = entry[0](line)
                if found is not None:
                    self._waiting.remove(entry)
                    entry[1].callback(found)

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        assert reason.check(ProcessDone, ProcessTerminated), reason
        self.reason = reason
        for _, d in self._waiting:
            d.errback(AssertionError("the gateway ended:\n" + self.output))
        self._waiting = []
        self.ended.callback(reason.value)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def running(self) -> bool:
        return self.reason is None

    def wait_for(self, find: Callable[[str], Any]) -> Deferred[Any]:
        """The first (later) output line for which ``find`` returns something, that thing."""
        for line in self.lines:
            found = find(line)
            if found is not None:
                d: Deferred[Any] = Deferred()
                d.callback(found)
                return d
        d = Deferred(lambda d: self._waiting.remove(entry) if entry in self._waiting else None)
        entry = (find, d)
        self._waiting.append(entry)
        return d

    def signal(self, name: str) -> None:
        if self.running and self.transport is not None:
            self.transport.signalProcess(name)


def spawn_gateway(config_path: Path, run_dir: Path) -> Child:
    """The real gateway, ``python -m cch.cli --config FILE``, run in ``run_dir``."""
    child = Child()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCH_")}
    argv = [sys.executable, "-m", "cch.cli", "--config", str(config_path)]
    global_reactor.spawnProcess(child, sys.executable, argv, env=env, path=str(run_dir))
    return child


def json_event(name: str) -> Callable[[str], dict[str, Any] | None]:
    """Finds a JSON log line whose event is ``name``."""
    pattern = re.compile(r'"' + re.escape(name) + r'"')

    def find(line: str) -> dict[str, Any] | None:
        if not pattern.search(line):
            return None
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return event if isinstance(event, dict) and name in event.values() else None

    return find
