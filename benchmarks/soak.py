"""Soak: N clients running Codex-style turns for a bounded time through one gateway, with random
client disconnects and upstream faults; reports lost turns, leaks and the gateway's RSS over time.

    python -m benchmarks.soak [--clients N] [--duration S] [--disconnect-rate p]
                              [--fault-rate p] [--seed K] [--json out.json]

Processes (127.0.0.1 only, each on its own, as in ``python -m benchmarks``): the fault-injecting
fake upstream (``python -m benchmarks.soak_upstream``), the gateway (``python -m cch.cli
--config <generated toml>``, JSON logs at ``info``) with two providers on that upstream, one
with the pooled upstream WebSocket (``websocket = "on"``, model ``gpt-soak-ws``) and one over
HTTP SSE (``websocket = "off"``, model ``gpt-soak-http``), and this process: ``--clients``
client slots on the Twisted reactor.

A slot opens a connection, picks a model for it (HTTP with probability ``--http-share``) and
runs up to ``--turns`` turns on it, one at a time: ``response.create`` with ``store: false`` and
``previous_response_id`` chained from the last completed response (a chain restarts every
``--chain`` completed turns; after an ``error`` the next turn continues from the last completed
response, as a Codex retry does, so the gateway must replay a chain whose upstream socket is
gone). Per turn, with probability ``--fault-rate`` the frame asks the upstream for a fault (see
``benchmarks.soak_upstream.FAULTS``), and with probability ``--disconnect-rate`` the client
goes away mid-turn (TCP abort, or a close frame for a quarter of them) and a new client takes
its slot. After ``--turns`` turns the client closes normally and is replaced too.

Verdicts:

* **turns lost among clients that stayed** (must be 0): a turn whose client did not plan to go
  away and that got no terminal event (response.completed/failed/incomplete or error) within
  ``--turn-timeout`` seconds, or whose connection closed before its terminal event. A terminal
  ``error`` (what every fault but ``delay``/``ws_drop_first``/``close_idle`` must produce) is an
  answer, not a loss; outcomes that differ from what the fault implies are listed as
  ``unexpected`` (informational).
* **leaks** (must be 0): after every client closed, the gateway's ``GET /metrics`` gauges
  ``cch_client_connections``, ``cch_requests_in_progress``, ``cch_upstream_ws_sockets``,
  ``cch_upstream_ws_pool_size`` and ``cch_transcript_bytes`` must all reach 0 (polled for at
  most ``--settle`` seconds); ``leaks`` is the number of them that did not.
* **RSS** (must be flat): sampled every ``--sample-interval`` seconds. After the warm-up
  (``--warmup`` seconds), the samples are cut into thirds; flat means the median of the last
  third is within 5 % of the median of the first third. Runs shorter
  than 60 s give no RSS verdict.

Everything is bounded: each turn by ``--turn-timeout``, each slot by the duration and a turn
count, connection opening by a timeout and a retry count, the settle wait, and the whole run by
a watchdog (duration + turn timeout + settle + 180 s). Exit status 0 when every verdict holds,
1 otherwise, 2 when the run could not be carried out.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater

from benchmarks import procstats
from benchmarks.load import TERMINAL, event_type
from benchmarks.processes import Child, port_when_ready, start_gateway, upstream_ready
from benchmarks.runner import machine, make_workdir, prepare_process, remove_workdir
from benchmarks.soak_upstream import AT_KEY, COMPLETING, DELAY_KEY, FAULT_KEY
from benchmarks.wsclient import OP_CLOSE, WSClientProtocol, check_loopback

WS_MODEL = "gpt-soak-ws"
HTTP_MODEL = "gpt-soak-http"
LEAK_GAUGES = (
    "cch_client_connections",
    "cch_requests_in_progress",
    "cch_upstream_ws_sockets",
    "cch_upstream_ws_pool_size",
    "cch_transcript_bytes",
)
SAMPLED_GAUGES = LEAK_GAUGES
# How often each fault is drawn, when a turn gets one.
FAULT_WEIGHTS: dict[str, float] = {
    "drop": 0.22,
    "close1011": 0.18,
    "error_event": 0.12,
    "stall": 0.05,
    "delay": 0.18,
    "ws_drop_first": 0.12,
    "close_idle": 0.13,
}
MIN_VERDICT_SECONDS = 60.0  # shorter runs give no RSS verdict


@dataclass
class Settings:
    clients: int = 16
    duration: float = 180.0
    disconnect_rate: float = 0.02
    fault_rate: float = 0.1
    seed: int = 1
    turns: int = 60  # turns per connection before a normal close
    chain: int = 8  # completed turns per previous_response_id chain
    http_share: float = 0.25  # share of connections using the HTTP-upstream provider
    events: int = 24
    delta_bytes: int = 16
    request_bytes: int = 1024
    think_ms: float = 5.0  # mean pause between a client's turns (uniform 0 .. 2x)
    turn_timeout: float = 30.0
    connect_timeout: float = 10.0
    stall_timeout: float = 2.0  # providers' idle_timeout: what ends a `stall` fault
    sample_interval: float | None = None  # default: min(5, duration / 30)
    warmup: float | None = None  # default: min(30, duration / 6)
    flat_tolerance: float = 0.05
    settle: float = 10.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.sample_interval is None:
            self.sample_interval = max(0.2, min(5.0, self.duration / 30))
        if self.warmup is None:
            self.warmup = min(30.0, self.duration / 6)


# --- the client --------------------------------------------------------------------------------


class SoakProtocol(WSClientProtocol):
    """``WSClientProtocol`` that remembers the close frame the server sent."""

    close_code: int | None = None
    close_reason: str = ""

    def _frame(self, fin: int, opcode: int, payload: bytes, now: float) -> None:
        if opcode == OP_CLOSE and self.close_code is None:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close_reason = payload[2:].decode("utf-8", "replace")
        super()._frame(fin, opcode, payload, now)


def connect(reactor: Any, url: str, timeout: float) -> Deferred[SoakProtocol]:
    """``benchmarks.wsclient.connect`` with :class:`SoakProtocol`."""
    host, port, path = check_loopback(url)
    proto = SoakProtocol(host, port, path, {})
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(Factory.forProtocol(lambda: proto))

    def failed(failure: Any) -> None:
        if not proto.opened.called:
            proto.opened.errback(failure)

    d.addErrback(failed)
    timer = reactor.callLater(timeout, lambda: proto.opened.called or proto.abort())

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return proto.opened.addBoth(done)


@dataclass
class Plan:
    """What one turn is meant to be."""

    fault: str | None = None
    at: int = 0
    delay_ms: float = 0.0
    disconnect: str | None = None  # "abort" | "close"
    disconnect_after: int = 0  # events; 0 = after disconnect_ms instead
    disconnect_ms: float = 0.0


@dataclass
class Outcome:
    how: str  # "terminal" | "timeout" | "closed" | "disconnected"
    kind: str | None = None  # terminal event type
    events: int = 0
    seconds: float = 0.0
    first: str | None = None
    code: str | None = None  # error code of an error terminal
    message: str | None = None
    response_id: str | None = None


class Turn:
    """One turn on a connection: send the frame, count events up to the terminal one, or carry
    out the planned disconnect. ``done`` fires with an :class:`Outcome` (never errbacks)."""

    def __init__(
        self,
        reactor: Any,
        proto: SoakProtocol,
        plan: Plan,
        timeout: float,
        handshakes: list[float],
    ) -> None:
        self.reactor = reactor
        self.handshakes = handshakes  # seconds from our close frame to the TCP close
        self.proto = proto
        self.plan = plan
        self.timeout = timeout
        self.done: Deferred[Outcome] = Deferred()
        self.events = 0
        self.first: str | None = None
        self.t0 = 0.0
        self._timers: list[Any] = []

    def start(self, frame: bytes) -> Deferred[Outcome]:
        self.proto.on_message = self._message
        self.proto.on_close = self._closed
        self.t0 = time.monotonic()
        if self.proto.is_closed:
            self._finish(Outcome("closed"))
            return self.done
        self._timers.append(self.reactor.callLater(self.timeout, self._timed_out))
        self.proto.send_text(frame)
        if self.plan.disconnect and self.plan.disconnect_after == 0:
            self._timers.append(
                self.reactor.callLater(self.plan.disconnect_ms / 1000, self._disconnect)
            )
        return self.done

    def _message(self, payload: bytes, now: float) -> None:
        self.events += 1
        kind = event_type(payload)
        text = kind.decode("utf-8", "replace") if kind is not None else None
        if self.events == 1:
            self.first = text
        if kind in TERMINAL:
            outcome = Outcome("terminal", text, self.events, self._elapsed(), self.first)
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                error = obj.get("error")
                if isinstance(error, dict):
                    outcome.code = str(error.get("code"))
                    outcome.message = str(error.get("message"))[:200]
                response = obj.get("response")
                if isinstance(response, dict) and isinstance(response.get("id"), str):
                    outcome.response_id = response["id"]
            self._finish(outcome)
        elif self.plan.disconnect and 0 < self.plan.disconnect_after <= self.events:
            self._disconnect()

    def _disconnect(self) -> None:
        if self.done.called:
            return
        outcome = Outcome("disconnected", None, self.events, self._elapsed(), self.first)
        if self.plan.disconnect == "close":
            self.proto.close(1000)
            timer = self.reactor.callLater(5.0, self.proto.abort)  # bounded close handshake
            sent = time.monotonic()

            def closed(_: object) -> None:
                if timer.active():
                    timer.cancel()
                self.handshakes.append(time.monotonic() - sent)

            self.proto.closed.addCallback(closed)
        else:
            self.proto.abort()
        self._finish(outcome)

    def _timed_out(self) -> None:
        self._finish(Outcome("timeout", None, self.events, self._elapsed(), self.first))
        self.proto.abort()

    def _closed(self) -> None:
        self._finish(Outcome("closed", None, self.events, self._elapsed(), self.first))

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _finish(self, outcome: Outcome) -> None:
        if self.done.called:
            return
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        self.done.callback(outcome)


@dataclass
class Tally:
    """Everything the clients saw."""

    turns_sent: int = 0
    turns_done: int = 0  # ended with a terminal event (completed or error), disconnects excluded
    completed: int = 0
    errors: int = 0
    turns_lost_among_stayers: int = 0
    disconnected_turns: int = 0
    disconnects: Counter[str] = field(default_factory=Counter)
    connections_opened: int = 0
    normal_closes: int = 0
    connect_failures: int = 0
    by_model: dict[str, Counter[str]] = field(default_factory=dict)
    by_fault: dict[str, Counter[str]] = field(default_factory=dict)
    error_codes: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    lost: list[dict[str, Any]] = field(default_factory=list)
    unexpected_samples: list[dict[str, Any]] = field(default_factory=list)
    stray_events: int = 0
    server_closes: Counter[str] = field(default_factory=Counter)  # "code:reason"
    server_closes_after: Counter[str] = field(default_factory=Counter)  # "fault:model"
    sent_into_announced_close: int = 0
    client_crashes: list[str] = field(default_factory=list)  # soak bugs, not gateway ones
    turn_seconds: list[float] = field(default_factory=list)
    close_handshakes: list[float] = field(default_factory=list)  # mid-turn close frames
    normal_close_seconds: list[float] = field(default_factory=list)

    def count(self, table: dict[str, Counter[str]], key: str, what: str) -> None:
        table.setdefault(key, Counter())[what] += 1


class Soak:
    def __init__(self, reactor: Any, s: Settings, url: str, say: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.s = s
        self.url = url
        self.say = say
        self.tally = Tally()
        self.open: set[SoakProtocol] = set()
        self.instructions = ("You are a soak test. " * (s.request_bytes // 21 + 1))[
            : s.request_bytes
        ]
        weights = sorted(FAULT_WEIGHTS.items())
        self.fault_names = [name for name, _ in weights]
        self.fault_weights = [w for _, w in weights]
        self.stop_at = 0.0

    # -- planning -------------------------------------------------------------------------------

    def plan(self, rng: random.Random) -> Plan:
        s = self.s
        plan = Plan()
        if rng.random() < s.fault_rate:
            plan.fault = rng.choices(self.fault_names, self.fault_weights)[0]
            plan.at = rng.randint(1, s.events - 2)
            plan.delay_ms = rng.uniform(200, 1500) if plan.fault == "delay" else 0.0
        if rng.random() < s.disconnect_rate:
            plan.disconnect = "close" if rng.random() < 0.25 else "abort"
            if rng.random() < 0.25:
                plan.disconnect_ms = rng.uniform(0, 30)  # maybe before the first event
            else:
                plan.disconnect_after = rng.randint(1, s.events - 1)
        return plan

    def frame(self, model: str, tag: str, n: int, previous: str | None, plan: Plan) -> bytes:
        body: dict[str, Any] = {
            "type": "response.create",
            "model": model,
            "instructions": self.instructions,
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": f"{tag} turn {n}: continue"}],
                }
            ],
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "store": False,
            "stream": True,
        }
        if plan.fault is not None:
            body["metadata"] = {
                FAULT_KEY: plan.fault,
                AT_KEY: str(plan.at),
                DELAY_KEY: f"{plan.delay_ms:.0f}",
            }
        if previous is not None:
            body["previous_response_id"] = previous
        return json.dumps(body, separators=(",", ":")).encode()

    # -- running --------------------------------------------------------------------------------

    def time_left(self) -> bool:
        return time.monotonic() < self.stop_at

    async def slot(self, index: int) -> None:
        s = self.s
        rng = random.Random(f"{s.seed}:{index}")
        connects = 0
        # Bounded: every pass opens one connection; a pass ends after at most s.turns turns.
        for generation in range(100_000):
            if not self.time_left():
                return
            connects += 1
            try:
                proto = await connect(self.reactor, self.url, s.connect_timeout)
            except Exception as exc:
                self.tally.connect_failures += 1
                if self.tally.connect_failures <= 5:
                    self.say(f"slot {index}: connect failed: {exc}")
                await sleep(self.reactor, 0.2)
                continue
            self.tally.connections_opened += 1
            self.open.add(proto)
            proto.closed.addBoth(lambda _, p=proto: self.open.discard(p))
            model = HTTP_MODEL if rng.random() < s.http_share else WS_MODEL
            await self.connection(proto, rng, model, f"s{index}g{generation}")
        return

    async def connection(
        self, proto: SoakProtocol, rng: random.Random, model: str, tag: str
    ) -> None:
        s = self.s
        t = self.tally
        previous: str | None = None
        position = 0
        last: tuple[str, Outcome] | None = None  # the previous turn's fault and outcome
        for n in range(s.turns):
            if not self.time_left():
                break
            # Always yield to the reactor: a close frame right behind an error frame is read
            # before the next frame goes out.
            await sleep(self.reactor, rng.uniform(0, 2 * s.think_ms) / 1000 if n else 0)
            if proto.close_code is not None or proto.is_closed:
                # The gateway closed (or is closing) the connection between turns, after the
                # previous turn got its terminal event: no turn is lost, the client reconnects.
                self.server_closed(proto, tag, model, last)
                await close(self.reactor, proto)
                return
            plan = self.plan(rng)
            if position >= s.chain:
                previous, position = None, 0
            turn = Turn(self.reactor, proto, plan, s.turn_timeout, t.close_handshakes)
            t.turns_sent += 1
            outcome = await turn.start(self.frame(model, tag, n, previous, plan))
            fault = plan.fault or "none"
            if outcome.how == "disconnected":
                t.disconnected_turns += 1
                t.disconnects[plan.disconnect or "?"] += 1
                t.count(t.by_fault, fault, "disconnected")
                return
            if (
                outcome.how == "closed"
                and outcome.events == 0
                and last is not None
                and last[1].kind == "error"
                and proto.close_code is not None
                and proto.close_reason == last[1].code
            ):
                # The frame crossed a close the gateway had announced with the previous turn's
                # error: the gateway never took the turn (its close frame was already sent).
                t.sent_into_announced_close += 1
                self.server_closed(proto, tag, model, last)
                return
            if outcome.how != "terminal":
                t.turns_lost_among_stayers += 1
                t.count(t.by_fault, fault, "lost")
                t.count(t.by_model, model, "lost")
                if len(t.lost) < 50:
                    t.lost.append(
                        {
                            "at_s": round(time.monotonic() - self.started, 3),
                            "client": tag,
                            "turn": n,
                            "model": model,
                            "previous_response_id": previous,
                            "plan": asdict(plan),
                            "outcome": asdict(outcome),
                            "close_code": proto.close_code,
                            "close_reason": proto.close_reason,
                        }
                    )
                proto.abort()
                return
            t.turns_done += 1
            t.turn_seconds.append(outcome.seconds)
            completed = outcome.kind == "response.completed"
            t.count(t.by_fault, fault, "completed" if completed else "error")
            t.count(t.by_model, model, "completed" if completed else "error")
            if completed:
                t.completed += 1
                if outcome.response_id:
                    previous, position = outcome.response_id, position + 1
            else:
                t.errors += 1
                t.error_codes[f"{outcome.kind}:{outcome.code}"] += 1
            expect_completed = plan.fault is None or plan.fault in COMPLETING
            problem = None
            if completed != expect_completed:
                problem = "error_without_fault" if expect_completed else "fault_not_seen"
                if expect_completed and plan.fault is not None:
                    problem = f"error_after_{plan.fault}"
            elif completed and outcome.events != s.events:
                problem = "completed_with_wrong_event_count"
            elif completed and outcome.first != "response.created":
                problem = "completed_not_starting_with_created"
            if problem:
                t.unexpected[problem] += 1
                if len(t.unexpected_samples) < 30:
                    t.unexpected_samples.append(
                        {
                            "at_s": round(time.monotonic() - self.started, 3),
                            "problem": problem,
                            "client": tag,
                            "turn": n,
                            "model": model,
                            "previous_response_id": previous,
                            "plan": asdict(plan),
                            "outcome": asdict(outcome),
                        }
                    )
            if plan.disconnect:  # planned to leave, but the turn ended first: leave now
                t.disconnects[plan.disconnect + "_after_terminal"] += 1
                proto.abort()
                return
            # events between turns belong to no turn: count them
            proto.on_message = self._stray
            last = (fault, outcome)
        t.normal_closes += 1
        started = time.monotonic()
        await close(self.reactor, proto)
        t.normal_close_seconds.append(time.monotonic() - started)

    def server_closed(
        self, proto: SoakProtocol, tag: str, model: str, last: tuple[str, Outcome] | None
    ) -> None:
        t = self.tally
        code = proto.close_code if proto.close_code is not None else "no_close_frame"
        t.server_closes[f"{code}:{proto.close_reason}"] += 1
        fault = last[0] if last is not None else "none"
        t.server_closes_after[f"{fault}:{model}"] += 1
        if last is None or last[1].kind != "error":
            t.unexpected["server_close_after_non_error_turn"] += 1
            if len(t.unexpected_samples) < 30:
                t.unexpected_samples.append(
                    {
                        "at_s": round(time.monotonic() - self.started, 3),
                        "problem": "server_close_after_non_error_turn",
                        "client": tag,
                        "model": model,
                        "close": [proto.close_code, proto.close_reason],
                        "previous_turn": None if last is None else [last[0], asdict(last[1])],
                    }
                )

    def _stray(self, payload: bytes, now: float) -> None:
        self.tally.stray_events += 1

    async def run(self) -> None:
        self.started = time.monotonic()
        self.stop_at = self.started + self.s.duration
        results = await DeferredList(
            [ensureDeferred(self.slot(i)) for i in range(self.s.clients)], consumeErrors=True
        )
        for ok, value in results:
            if not ok:  # a bug in the soak itself: report it, the run is not valid
                self.tally.client_crashes.append(value.getTraceback()[-2000:])
        # Whatever is still open (a `close` disconnect in its handshake): bounded wait, then abort.
        for _ in range(100):
            if not self.open:
                break
            await sleep(self.reactor, 0.05)
        for proto in list(self.open):
            proto.abort()


async def close(reactor: Any, proto: SoakProtocol) -> None:
    d = proto.close(1000)
    timer = reactor.callLater(5.0, proto.abort)
    await d
    if timer.active():
        timer.cancel()


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


# --- the gateway's side ------------------------------------------------------------------------


def gateway_config(upstream_port: int, stall_timeout: float, ledger: Path) -> str:
    """Two providers on the soak upstream; the usage ledger on, in SQLite at ``ledger``."""
    base = f"http://127.0.0.1:{upstream_port}/v1"
    provider = (
        "[[providers]]\n"
        'name = "{name}"\n'
        f'base_url = "{base}"\n'
        'websocket = "{ws}"\n'
        'models = ["{model}"]\n'
        f"idle_timeout = {stall_timeout!r}\n"
    )
    return "\n".join(
        [
            "[server]",
            'listen = "tcp:0:interface=127.0.0.1"',
            "drain_timeout = 2.0",
            "",
            "[usage]",
            f'database = "sqlite:///{ledger}"',
            "",
            provider.format(name="soak-ws", ws="on", model=WS_MODEL),
            provider.format(name="soak-http", ws="off", model=HTTP_MODEL),
        ]
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return values


async def scrape(reactor: Any, port: int, timeout: float = 5.0) -> dict[str, float]:
    """GET /metrics on the gateway (a non-persistent connection: it must not look like a leak)."""
    import treq

    url = f"http://127.0.0.1:{port}/metrics"
    response = await treq.get(url, persistent=False, reactor=reactor, timeout=timeout)
    data = await treq.content(response)
    if response.code != 200:
        raise RuntimeError(f"/metrics answered {response.code}: {data[:200]!r}")
    return parse_metrics(data.decode("utf-8", "replace"))


def rss_verdict(
    samples: list[dict[str, Any]], warmup: float, tolerance: float, duration: float
) -> dict[str, Any]:
    after = [x for x in samples if x["t"] >= warmup and x.get("rss_mib") is not None]
    verdict: dict[str, Any] = {
        "definition": f"after {warmup:g} s of warm-up the samples are cut into thirds; flat = the "
        f"median of the last third is within {tolerance:.0%} of the median of the first third",
        "warmup_s": warmup,
        "samples_after_warmup": len(after),
        "flat": None,
    }
    if len(after) < 6:
        verdict["why_no_verdict"] = "fewer than 6 samples after the warm-up"
        return verdict
    third = len(after) // 3
    first = statistics.median(x["rss_mib"] for x in after[:third])
    last = statistics.median(x["rss_mib"] for x in after[-third:])
    change = (last - first) / first
    ts = [x["t"] for x in after]
    ys = [x["rss_mib"] for x in after]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den if den else 0.0
    verdict.update(
        {
            "first_third_median_mib": round(first, 2),
            "last_third_median_mib": round(last, 2),
            "change_pct": round(change * 100, 2),
            "slope_mib_per_min": round(slope * 60, 3),
            "min_mib": round(min(ys), 2),
            "max_mib": round(max(ys), 2),
        }
    )
    if duration < MIN_VERDICT_SECONDS:
        verdict["why_no_verdict"] = f"runs shorter than {MIN_VERDICT_SECONDS:g} s give no verdict"
    else:
        verdict["flat"] = abs(change) <= tolerance
    return verdict


def scan_log(path: Path, limit: int = 20) -> dict[str, Any]:
    """Levels of the gateway's JSON log lines; warning-and-above messages counted, the first
    error-and-above lines kept verbatim."""
    levels: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    errors: list[str] = []
    other = 0
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return {"missing": str(path)}
    with f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                other += 1
                if len(errors) < limit and raw.strip():
                    errors.append(raw.decode("utf-8", "replace").rstrip()[:2000])
                continue
            if not isinstance(obj, dict):
                continue
            level = str(obj.get("level"))
            levels[level] += 1
            if level in ("warn", "error", "critical"):
                warnings[f"{level}:{obj.get('msg')}"] += 1
            if level in ("error", "critical") and len(errors) < limit:
                errors.append(raw.decode("utf-8", "replace").rstrip()[:2000])
    return {
        "lines_by_level": dict(levels),
        "non_json_lines": other,
        "warnings_and_errors": dict(warnings.most_common()),
        "first_error_lines": errors,
    }


# --- the run -----------------------------------------------------------------------------------


async def start_upstream(
    reactor: Any, workdir: Path, events: int, delta_bytes: int
) -> tuple[Child, int]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.soak_upstream",
        "--events",
        str(events),
        "--delta-bytes",
        str(delta_bytes),
    ]
    child = Child("upstream", argv, workdir)
    return child, await port_when_ready(reactor, child, upstream_ready("upstream"))


class Sampler:
    """The gateway's RSS, open descriptors, CPU and gauges every ``interval`` seconds."""

    def __init__(self, reactor: Any, pid: int, port: int, interval: float) -> None:
        self.reactor = reactor
        self.pid = pid
        self.port = port
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.stopped = False
        self.scrape_failures = 0
        self._sleeping: Deferred[None] | None = None

    async def sample(self) -> None:
        rss = procstats.rss_bytes(self.pid)
        row: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 2),
            "rss_mib": round(rss / 2**20, 2) if rss is not None else None,
            "fds": procstats.open_fds(self.pid),
            "cpu_s": procstats.cpu_seconds(self.pid),
        }
        try:
            metrics = await scrape(self.reactor, self.port)
        except Exception:
            self.scrape_failures += 1
            metrics = {}
        for name in SAMPLED_GAUGES:
            row[name] = metrics.get(name)
        row["breaker"] = {
            key.split('provider="', 1)[1].split('"', 1)[0]: value
            for key, value in metrics.items()
            if key.startswith("cch_provider_breaker_state{") and 'provider="' in key
        }
        self.samples.append(row)

    async def run(self, until: float) -> None:
        # Bounded by time and count.
        for i in range(100_000):
            if self.stopped or time.monotonic() >= until:
                return
            await self.sample()
            next_at = self.t0 + (i + 1) * self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._sleeping = deferLater(self.reactor, min(delay, self.interval))
                try:
                    await self._sleeping
                except CancelledError:
                    return
                finally:
                    self._sleeping = None

    def stop(self) -> None:
        self.stopped = True
        if self._sleeping is not None:
            self._sleeping.cancel()


async def settle(reactor: Any, port: int, seconds: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until every leak gauge is 0 or ``seconds`` passed."""
    t0 = time.monotonic()
    metrics: dict[str, float] = {}
    for _ in range(int(seconds / 0.25) + 1):
        try:
            metrics = await scrape(reactor, port)
        except Exception:
            metrics = {}
        if metrics and all(metrics.get(name) == 0 for name in LEAK_GAUGES):
            break
        if time.monotonic() - t0 >= seconds:
            break
        await sleep(reactor, 0.25)
    return metrics, time.monotonic() - t0


async def soak(
    reactor: Any,
    s: Settings,
    workdir: Path,
    say: Callable[[str], None],
    children: list[Child],
) -> dict[str, Any]:
    """The whole run; ``children`` holds the processes still running (for a watchdog)."""
    started = time.time()
    info = machine()
    try:
        upstream, upstream_port = await start_upstream(reactor, workdir, s.events, s.delta_bytes)
        children.append(upstream)
        gateway, port = await start_gateway(
            reactor,
            workdir,
            "gateway",
            gateway_config(upstream_port, s.stall_timeout, workdir.resolve() / "usage.sqlite3"),
            log_level=s.log_level,
        )
        children.append(gateway)
        url = f"ws://127.0.0.1:{port}/v1/responses"
        say(f"gateway pid {gateway.pid} on {url}; upstream pid {upstream.pid} on :{upstream_port}")
        fds_before = procstats.open_fds(gateway.pid)
        load = Soak(reactor, s, url, say)
        sampler = Sampler(reactor, gateway.pid, port, s.sample_interval or 5.0)
        say(
            f"soak: {s.clients} clients, {s.duration:g} s, disconnect-rate {s.disconnect_rate:g}, "
            f"fault-rate {s.fault_rate:g}, seed {s.seed}"
        )

        def report_progress() -> None:
            nonlocal progress
            t = load.tally
            last = sampler.samples[-1] if sampler.samples else {}
            say(
                f"  t={time.monotonic() - sampler.t0:5.0f}s turns done {t.turns_done} "
                f"(errors {t.errors}), disconnects {t.disconnected_turns}, "
                f"lost {t.turns_lost_among_stayers}, rss {last.get('rss_mib')} MiB, "
                f"fds {last.get('fds')}"
            )
            if load.time_left():
                progress = reactor.callLater(max(10.0, s.duration / 6), report_progress)

        progress = reactor.callLater(max(10.0, s.duration / 6), report_progress)
        sampling = ensureDeferred(sampler.run(time.monotonic() + s.duration + s.turn_timeout))
        await load.run()
        load_seconds = time.monotonic() - load.started
        sampler.stop()
        await sampling
        if progress.active():
            progress.cancel()
        say(f"load done after {load_seconds:.1f} s; settling (at most {s.settle:g} s)")
        end_metrics, settle_seconds = await settle(reactor, port, s.settle)
        await sampler.sample()  # one more RSS sample, idle
        fds_after = procstats.open_fds(gateway.pid)
        leak_gauges = {name: end_metrics.get(name) for name in LEAK_GAUGES}
        leaks = sum(1 for value in leak_gauges.values() if value != 0)
        upstream_fds = procstats.open_fds(upstream.pid)
        for child in reversed(children):
            await child.stop(reactor)
        children.clear()
        log = scan_log(gateway.log_path)
    finally:
        for child in children:
            child.kill()
    t = load.tally
    turn_ms = sorted(x * 1000 for x in t.turn_seconds)

    def pct(q: float) -> float | None:
        return round(turn_ms[min(len(turn_ms) - 1, int(q * len(turn_ms)))], 2) if turn_ms else None

    rss = rss_verdict(sampler.samples[:-1], s.warmup or 0.0, s.flat_tolerance, s.duration)
    final_rss = sampler.samples[-1].get("rss_mib") if sampler.samples else None
    ok = (
        t.turns_lost_among_stayers == 0
        and leaks == 0
        and rss["flat"] is not False
        and not t.client_crashes
    )
    return {
        "ok": ok,
        "parameters": asdict(s),
        "machine": info,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "load_seconds": round(load_seconds, 1),
        "turns_sent": t.turns_sent,
        "turns_done": t.turns_done,
        "turns_completed": t.completed,
        "turns_error": t.errors,
        "turns_lost_among_stayers": t.turns_lost_among_stayers,
        "turns_disconnected": t.disconnected_turns,
        "turns_per_s": round(t.turns_done / load_seconds, 1) if load_seconds else None,
        "turn_ms": {
            "p50": pct(0.5),
            "p99": pct(0.99),
            "max": round(turn_ms[-1], 1) if turn_ms else None,
        },
        "disconnects": dict(t.disconnects),
        "connections_opened": t.connections_opened,
        "normal_closes": t.normal_closes,
        "connect_failures": t.connect_failures,
        "by_fault": {k: dict(v) for k, v in sorted(t.by_fault.items())},
        "by_model": {k: dict(v) for k, v in sorted(t.by_model.items())},
        "error_terminals": dict(t.error_codes.most_common()),
        "unexpected": dict(t.unexpected),
        "unexpected_samples": t.unexpected_samples,
        "stray_events": t.stray_events,
        "close_handshake_ms": {
            "mid_turn_close_frames": spread(t.close_handshakes),
            "normal_closes": spread(t.normal_close_seconds),
        },
        "server_closes": dict(t.server_closes.most_common()),
        "server_closes_after": dict(t.server_closes_after.most_common()),
        "sent_into_announced_close": t.sent_into_announced_close,
        "lost": t.lost,
        "client_crashes": t.client_crashes,
        "leaks": leaks,
        "leak_gauges": leak_gauges,
        "settle_seconds": round(settle_seconds, 2),
        "gateway_fds": {"before_load": fds_before, "after_settle": fds_after},
        "upstream_fds_after_settle": upstream_fds,
        "turns_by_gateway": {
            k: v
            for k, v in end_metrics.items()
            if k.startswith(("cch_turns_started_total", "cch_turns_completed_total"))
        },
        "breaker_ever_left_closed": sorted(
            {name for x in sampler.samples for name, v in x.get("breaker", {}).items() if v}
        ),
        "rss": {**rss, "after_settle_mib": final_rss},
        "samples": sampler.samples,
        "metrics_scrape_failures": sampler.scrape_failures,
        "gateway_log": log,
    }


def spread(seconds: list[float]) -> dict[str, Any]:
    """Count, median and max (ms) of some durations, and how many reached the 5 s abort."""
    ms = sorted(x * 1000 for x in seconds)
    return {
        "count": len(ms),
        "p50": round(statistics.median(ms), 2) if ms else None,
        "max": round(ms[-1], 1) if ms else None,
        "aborted_after_5s": sum(1 for x in ms if x >= 4990),
    }


def summary(result: dict[str, Any], say: Callable[[str], None]) -> None:
    rss = result["rss"]
    say(
        f"turns done {result['turns_done']} ({result['turns_completed']} completed, "
        f"{result['turns_error']} error terminals) at {result['turns_per_s']} turns/s; "
        f"disconnected mid-turn {result['turns_disconnected']}"
    )
    say(f"turns lost among clients that stayed: {result['turns_lost_among_stayers']}")
    say(
        f"leaks: {result['leaks']} {result['leak_gauges']} (settled in {result['settle_seconds']} s)"
    )
    say(
        f"rss: first third {rss.get('first_third_median_mib')} MiB, last third "
        f"{rss.get('last_third_median_mib')} MiB ({rss.get('change_pct')} %), "
        f"flat: {rss['flat']}"
        + (f" ({rss['why_no_verdict']})" if rss.get("why_no_verdict") else "")
    )
    if result["unexpected"]:
        say(f"unexpected outcomes (informational): {result['unexpected']}")
    if result["breaker_ever_left_closed"]:
        say(f"provider breakers seen open/half-open: {result['breaker_ever_left_closed']}")
    log = result["gateway_log"]
    say(f"gateway log: {log.get('lines_by_level')}; non-JSON lines {log.get('non_json_lines')}")
    if log.get("warnings_and_errors"):
        say(f"gateway warnings/errors: {log['warnings_and_errors']}")
    for text in result["client_crashes"][:3]:
        say(f"  soak client crashed (a bug in the soak, the run is invalid):\n{text}")
    for line in result["lost"][:5]:
        say(f"  lost: {json.dumps(line)}")
    say("OK" if result["ok"] else "FAILED")


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--clients",
        type=_positive(int),
        default=d.clients,
        help=f"client slots (default {d.clients})",
    )
    p.add_argument(
        "--duration",
        type=_positive(float),
        default=d.duration,
        help=f"seconds of load (default {d.duration:g})",
    )
    p.add_argument(
        "--disconnect-rate",
        type=_rate,
        default=d.disconnect_rate,
        help=f"per turn: the client goes away mid-turn (default {d.disconnect_rate:g})",
    )
    p.add_argument(
        "--fault-rate",
        type=_rate,
        default=d.fault_rate,
        help=f"per turn: the upstream misbehaves (default {d.fault_rate:g})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"RNG seed (default {d.seed})")
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument(
        "--turns",
        type=_positive(int),
        default=d.turns,
        help=f"turns per connection before a normal close (default {d.turns})",
    )
    p.add_argument(
        "--chain",
        type=_positive(int),
        default=d.chain,
        help=f"completed turns per previous_response_id chain (default {d.chain})",
    )
    p.add_argument(
        "--http-share",
        type=_rate,
        default=d.http_share,
        help=f"share of connections on the HTTP-upstream provider (default {d.http_share:g})",
    )
    p.add_argument(
        "--events", type=int, default=d.events, help=f"events per turn, >= 9 (default {d.events})"
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=d.think_ms,
        help=f"mean pause between a client's turns (default {d.think_ms:g})",
    )
    p.add_argument(
        "--turn-timeout",
        type=_positive(float),
        default=d.turn_timeout,
        help=f"seconds a turn may take before it counts as lost (default {d.turn_timeout:g})",
    )
    p.add_argument(
        "--sample-interval",
        type=_positive(float),
        help="seconds between RSS samples (default min(5, duration/30))",
    )
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds of samples left out of the RSS verdict (default min(30, duration/6))",
    )
    p.add_argument(
        "--settle",
        type=_positive(float),
        default=d.settle,
        help=f"seconds to wait at most for the gauges to reach 0 (default {d.settle:g})",
    )
    p.add_argument("--log-level", default=d.log_level, help="gateway CCH_LOG_LEVEL (default info)")
    p.add_argument(
        "--workdir", help="keep the processes' logs and config here (default: a temp dir, removed)"
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.events < 9:
        raise SystemExit("--events must be at least 9")
    s = Settings(
        clients=args.clients,
        duration=args.duration,
        disconnect_rate=args.disconnect_rate,
        fault_rate=args.fault_rate,
        seed=args.seed,
        turns=args.turns,
        chain=args.chain,
        http_share=args.http_share,
        events=args.events,
        think_ms=args.think_ms,
        turn_timeout=args.turn_timeout,
        sample_interval=args.sample_interval,
        warmup=args.warmup,
        settle=args.settle,
        log_level=args.log_level,
    )
    prepare_process()
    workdir, temporary = make_workdir(args.workdir)

    from twisted.internet.task import react

    def say(text: str) -> None:
        print(text, flush=True)

    holder: dict[str, Any] = {}
    children: list[Child] = []
    budget = s.duration + s.turn_timeout + s.settle + 180.0

    async def run(reactor: Any) -> None:
        def give_up() -> None:
            print(f"error: the soak took longer than {budget:g} s; giving up", file=sys.stderr)
            for child in children:
                child.kill()
            reactor.stop()

        watchdog = reactor.callLater(budget, give_up)
        try:
            holder["result"] = await soak(reactor, s, workdir, say, children)
        finally:
            if watchdog.active():
                watchdog.cancel()

    try:
        react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None) or "result" not in holder:
            print(f"soak failed; logs are in {workdir}", file=sys.stderr)
            return 2
    result = holder["result"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    summary(result, say)
    if args.json:
        say(f"report: {args.json}")
    if temporary and result["ok"]:
        remove_workdir(workdir)
    else:
        say(f"logs and config: {workdir}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
