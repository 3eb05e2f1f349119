"""The load client: Codex-style turns over WebSocket, and the scenarios built from them.

A *turn* is one ``response.create`` frame and the events up to its terminal event. Turns on a
connection are strictly sequential; a conversation chains ``previous_response_id`` for
``chain`` turns and then starts over, so bodies stay the same size for the whole run (Codex
sends ``store: false``; a gateway that cannot keep the upstream socket has to replay the
conversation, which is part of what is measured).

Everything is bounded: a turn by ``turn_timeout``, a phase by its turn count and its duration,
connection opening by ``connect_timeout`` and a concurrency cap. Only 127.0.0.1 is accepted.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.task import deferLater

from benchmarks import procstats
from benchmarks.upstream import GAP_KEY
from benchmarks.wsclient import WSClientProtocol, connect

TERMINAL = frozenset({b"response.completed", b"response.failed", b"response.incomplete", b"error"})
_TYPE_PREFIX = b'{"type":"'


class TurnFailed(Exception):
    """A turn that did not end with a terminal event (connection lost or timeout)."""


def event_type(payload: bytes) -> bytes | None:
    """The event's ``type`` without parsing when it is written first (cch and the fake do)."""
    if payload.startswith(_TYPE_PREFIX):
        end = payload.find(b'"', 9)
        if end > 0:
            return payload[9:end]
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind.encode() if isinstance(kind, str) else None


@dataclass
class LoadConfig:
    """How turns look and how long anything may take."""

    model: str = "gpt-5.5"
    store: bool = False
    request_bytes: int = 2048  # size of the ``instructions`` text of every frame
    chain: int = 10  # turns per conversation (previous_response_id chained)
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Authorization for a keyed gateway
    first_event_gap_ms: float = 0.0  # ask the upstream to pause after the first event
    turn_timeout: float = 30.0
    connect_timeout: float = 10.0
    connect_concurrency: int = 64


@dataclass
class TurnResult:
    ttfe: float  # seconds from send to the first event
    total: float  # seconds from send to the terminal event
    events: int
    kind: bytes
    terminal: bytes

    def response(self) -> dict[str, Any] | None:
        """The response object of a response.completed/incomplete terminal, else None."""
        if self.kind not in (b"response.completed", b"response.incomplete"):
            return None
        try:
            value = json.loads(self.terminal).get("response")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, dict) else None


class Conversation:
    """Builds the frames of Codex-like conversations of ``chain`` turns."""

    def __init__(self, config: LoadConfig, tag: str) -> None:
        self.config = config
        self.tag = tag
        self.instructions = ("You are a benchmark. " * (config.request_bytes // 21 + 1))[
            : config.request_bytes
        ]
        self.previous: str | None = None
        self.position = 0  # turns done in the current chain
        self.history: list[dict[str, Any]] = []  # for clients that replay themselves
        self.turns = 0

    def user_item(self) -> dict[str, Any]:
        text = f"{self.tag} turn {self.turns}: continue"
        return {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }

    def frame(self, *, replay: bool = False) -> tuple[bytes, dict[str, Any]]:
        """The next frame; with ``replay`` the whole conversation goes as input instead of a
        previous_response_id (what a gateway does when it cannot reuse the upstream socket)."""
        if self.position >= self.config.chain:
            self.reset()
        item = self.user_item()
        body: dict[str, Any] = {
            "type": "response.create",
            "model": self.config.model,
            "instructions": self.instructions,
            "input": [*self.history, item] if replay else [item],
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "store": self.config.store,
            "stream": True,
        }
        if self.config.first_event_gap_ms > 0:
            body["metadata"] = {GAP_KEY: f"{self.config.first_event_gap_ms:g}"}
        if self.previous is not None and not replay:
            body["previous_response_id"] = self.previous
        return json.dumps(body, separators=(",", ":")).encode(), item

    def completed(
        self, result: TurnResult, item: dict[str, Any], *, keep_history: bool = False
    ) -> None:
        self.turns += 1
        response = result.response()
        if response is None or not isinstance(response.get("id"), str):
            self.reset()  # an error ends the conversation; the next turn starts a new one
            return
        self.previous = response["id"]
        self.position += 1
        if keep_history:
            output = response.get("output")
            self.history += [item, *(output if isinstance(output, list) else [])]

    def reset(self) -> None:
        self.previous = None
        self.position = 0
        self.history = []


class Session:
    """One client connection running turns one at a time."""

    def __init__(self, reactor: Any, proto: WSClientProtocol, config: LoadConfig) -> None:
        self.reactor = reactor
        self.proto = proto
        self.config = config
        self._pending: Deferred[TurnResult] | None = None
        self._t0 = 0.0
        self._first = 0.0
        self._events = 0
        self._timer: Any = None
        proto.on_message = self._message
        proto.on_close = self._closed

    def turn(self, frame: bytes) -> Deferred[TurnResult]:
        if self.proto.is_closed:
            raise TurnFailed("connection closed")
        d: Deferred[TurnResult] = Deferred()
        self._pending = d
        self._events = 0
        self._first = 0.0
        self._timer = self.reactor.callLater(self.config.turn_timeout, self._timed_out)
        self._t0 = time.perf_counter()
        self.proto.send_text(frame)
        return d

    def _message(self, payload: bytes, now: float) -> None:
        d = self._pending
        if d is None:
            return
        self._events += 1
        if self._events == 1:
            self._first = now
        kind = event_type(payload)
        if kind in TERMINAL:
            self._pending = None
            self._cancel_timer()
            d.callback(
                TurnResult(self._first - self._t0, now - self._t0, self._events, kind, payload)
            )  # type: ignore[arg-type]

    def _fail(self, why: str) -> None:
        d, self._pending = self._pending, None
        self._cancel_timer()
        if d is not None:
            d.errback(TurnFailed(why))

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(f"no terminal event within {self.config.turn_timeout:g}s")
        self.proto.abort()

    def _closed(self) -> None:
        self._fail("connection lost mid-turn")

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def close(self) -> Deferred[None]:
        d = self.proto.close()
        timer = self.reactor.callLater(5.0, self.proto.abort)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "mean": (sum(ms) / len(ms)) if ms else None,
    }


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuWindow:
    """CPU seconds of the given processes, of this process (the client) and of everything else
    the machine ran (other programs) between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids

    _t0: float | None = None

    def start(self) -> None:
        self._cpu0 = {role: procstats.cpu_seconds(pid) for role, pid in self.pids.items()}
        self._client0 = client_cpu()
        self._machine0 = procstats.machine_cpu()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        if self._t0 is None:  # never started (the phase ended before its measured part)
            return {"seconds": 0.0, "cpu_seconds": {}, "cpu_utilization": {}}
        elapsed = time.perf_counter() - self._t0
        cpu1 = {role: procstats.cpu_seconds(pid) for role, pid in self.pids.items()}
        machine1 = procstats.machine_cpu()
        cpu: dict[str, float | None] = {
            role: (cpu1[role] - v0) if cpu1.get(role) is not None and v0 is not None else None  # type: ignore[operator]
            for role, v0 in self._cpu0.items()
        }
        cpu["client"] = client_cpu() - self._client0
        seen: set[int | None] = set()
        ours = 0.0
        for role, value in cpu.items():
            pid = self.pids.get(role)
            if value is None or (pid is not None and pid in seen):
                continue  # the same process under two roles (direct: server = upstream)
            seen.add(pid)
            ours += value
        busy = (
            machine1 - self._machine0
            if machine1 is not None and self._machine0 is not None
            else None
        )
        cpu["other_processes"] = max(0.0, busy - ours) if busy is not None else None
        return {
            "seconds": elapsed,
            "cpu_seconds": cpu,
            "cpu_utilization": {
                role: (v / elapsed if v is not None and elapsed > 0 else None)
                for role, v in cpu.items()
            },
        }


# --- helpers ---------------------------------------------------------------------------------


async def open_sessions(
    reactor: Any, url: str, count: int, config: LoadConfig, deadline: float
) -> list[Session]:
    """Open ``count`` connections, at most ``connect_concurrency`` handshakes at a time."""
    sem = DeferredSemaphore(config.connect_concurrency)
    sessions: list[Session] = []
    errors: list[str] = []

    async def one() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("phase deadline passed while connecting")
        proto = await connect(reactor, url, config.headers, config.connect_timeout)
        sessions.append(Session(reactor, proto, config))

    def guarded() -> Deferred[None]:
        return ensureDeferred(one())

    results = await DeferredList([sem.run(guarded) for _ in range(count)], consumeErrors=True)
    errors = [str(result.value) for ok, result in results if not ok]
    if errors:
        for session in sessions:
            session.proto.abort()
        raise ConnectionError(f"{len(errors)} of {count} connections failed: {errors[0]}")
    return sessions


async def close_sessions(sessions: list[Session]) -> None:
    await DeferredList([s.close() for s in sessions], consumeErrors=True)


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def gather(coros: Sequence[Awaitable[Any]]) -> Deferred[list[Any]]:
    return DeferredList(
        [ensureDeferred(c) for c in coros], fireOnOneErrback=True, consumeErrors=True
    ).addCallback(lambda results: [value for _, value in results])


# --- scenarios -------------------------------------------------------------------------------


async def sequential(
    reactor: Any,
    url: str,
    config: LoadConfig,
    turns: int,
    warmup: int,
    time_limit: float,
    pids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """One connection, ``turns`` measured turns after ``warmup`` turns, one after the other."""
    deadline = time.monotonic() + time_limit
    (session,) = await open_sessions(reactor, url, 1, config, deadline)
    try:
        return await one_after_another(
            session.turn, Conversation(config, "seq"), turns, warmup, deadline, pids
        )
    finally:
        await close_sessions([session])


async def one_after_another(
    turn: Callable[[bytes], Awaitable[TurnResult]],
    conversation: Conversation,
    turns: int,
    warmup: int,
    deadline: float,
    pids: dict[str, int | None] | None = None,
    *,
    replay: bool = False,
) -> dict[str, Any]:
    """``turn`` each frame of ``conversation`` in order (``replay``: the whole conversation as
    input, kept by the client); times and CPU of the measured turns."""
    window = CpuWindow(pids or {})
    ttfe: list[float] = []
    total: list[float] = []
    events = errors = 0
    for i in range(warmup + turns):
        if time.monotonic() > deadline:
            break
        if i == warmup:
            window.start()
        frame, item = conversation.frame(replay=replay)
        result = await turn(frame)
        conversation.completed(result, item, keep_history=replay)
        if result.kind == b"error":
            errors += 1
        if i >= warmup:
            ttfe.append(result.ttfe)
            total.append(result.total)
            events += result.events
    cpu = window.stop()
    return {
        **cpu,
        "turns": len(total),
        "errors": errors,
        "events_per_turn": events / len(total) if total else None,
        "ttfe_ms": summary_ms(ttfe),
        "turn_ms": summary_ms(total),
    }


async def concurrent(
    reactor: Any,
    url: str,
    config: LoadConfig,
    connections: int,
    duration: float,
    max_turns: int,
    time_limit: float,
    pids: dict[str, int | None],
    around: tuple[Callable[[], Any], Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """``connections`` connections each running turns back to back for ``duration`` seconds
    (at most ``max_turns`` each), after one warm-up turn each. CPU of every process in
    ``pids`` is sampled around the measured window; ``around`` is called at its start and end
    (the profiler uses it)."""
    deadline = time.monotonic() + time_limit
    sessions = await open_sessions(reactor, url, connections, config, deadline)
    conversations = [Conversation(config, f"c{i}") for i in range(connections)]
    totals: list[float] = []
    counts = {"turns": 0, "events": 0, "errors": 0}
    try:

        async def warm(session: Session, conversation: Conversation) -> None:
            frame, item = conversation.frame()
            conversation.completed(await session.turn(frame), item)

        await gather([warm(s, c) for s, c in zip(sessions, conversations, strict=True)])
        if around is not None:
            around[0]()
        window = CpuWindow(pids)
        window.start()
        t0 = time.perf_counter()
        stop_at = t0 + duration

        async def loop(session: Session, conversation: Conversation) -> None:
            for _ in range(max_turns):
                if time.perf_counter() >= stop_at or time.monotonic() > deadline:
                    return
                frame, item = conversation.frame()
                result = await session.turn(frame)
                conversation.completed(result, item)
                counts["turns"] += 1
                counts["events"] += result.events
                counts["errors"] += result.kind == b"error"
                totals.append(result.total)

        await gather([loop(s, c) for s, c in zip(sessions, conversations, strict=True)])
        measured = window.stop()
        if around is not None:
            around[1]()
    finally:
        await close_sessions(sessions)
    events = counts["events"]
    elapsed = measured["seconds"]
    cpu = measured["cpu_seconds"]
    return {
        "connections": connections,
        "seconds": elapsed,
        "turns": counts["turns"],
        "events": events,
        "errors": counts["errors"],
        "turns_per_s": counts["turns"] / elapsed if elapsed > 0 else None,
        "events_per_s": events / elapsed if elapsed > 0 else None,
        "turn_ms": summary_ms(totals),
        "cpu_seconds": cpu,
        "cpu_utilization": {
            role: (v / elapsed if v is not None and elapsed > 0 else None)
            for role, v in cpu.items()
        },
        "cpu_s_per_1k_events": {
            role: (v / events * 1000 if v is not None and events else None)
            for role, v in cpu.items()
        },
    }


async def idle(
    reactor: Any,
    url: str,
    config: LoadConfig,
    counts: Sequence[int],
    pid: int | None,
    settle: float,
    time_limit: float,
) -> dict[str, Any]:
    """Open connections up to each of ``counts`` (ascending) and hold them idle; the server's
    RSS growth over its idle RSS (after one warm-up turn) divided by the connections held."""
    deadline = time.monotonic() + time_limit
    # One turn first, so the code paths of a turn are loaded before the idle RSS is taken.
    (session,) = await open_sessions(reactor, url, 1, config, deadline)
    conversation = Conversation(config, "idle")
    frame, item = conversation.frame()
    await session.turn(frame)
    await close_sessions([session])
    await sleep(reactor, settle)
    rss0 = procstats.rss_bytes(pid)
    fds0 = procstats.open_fds(pid)
    result: dict[str, Any] = {
        "idle_rss_mib": rss0 / 2**20 if rss0 is not None else None,
        "held": {},
    }
    held: list[Session] = []
    try:
        for count in sorted(counts):
            t0 = time.perf_counter()
            held += await open_sessions(reactor, url, count - len(held), config, deadline)
            opened_in = time.perf_counter() - t0
            await sleep(reactor, settle)
            rss = procstats.rss_bytes(pid)
            alive = sum(1 for s in held if not s.proto.is_closed)
            result["held"][str(count)] = {
                "connections": alive,
                "open_seconds": opened_in,
                "rss_mib": rss / 2**20 if rss is not None else None,
                "rss_kib_per_connection": (rss - rss0) / 1024 / count
                if rss is not None and rss0 is not None
                else None,
            }
    finally:
        for s in held:
            s.proto.abort()
        # Let the server notice before the next phase (bounded).
        for _ in range(200):
            fds = procstats.open_fds(pid)
            if fds is None or fds0 is None or fds <= fds0 + 8:
                break
            await sleep(reactor, 0.05)
    return result


async def reuse(
    reactor: Any,
    url: str,
    config: LoadConfig,
    turns: int,
    time_limit: float,
    *,
    new_connection_per_turn: bool = False,
) -> dict[str, Any]:
    """One conversation of ``turns`` turns; turn 1 is excluded, turns 2..N are reported.

    ``new_connection_per_turn`` is the direct baseline without socket reuse: every turn opens
    a fresh connection (timed from the connect) and replays the conversation as input, as a
    gateway must when it cannot keep the upstream socket."""
    deadline = time.monotonic() + time_limit
    conversation = Conversation(replace(config, chain=turns), "reuse")
    ttfe: list[float] = []
    total: list[float] = []
    session: Session | None = None
    try:
        for i in range(turns):
            if time.monotonic() > deadline:
                break
            if new_connection_per_turn:
                started = time.perf_counter()
                (session,) = await open_sessions(reactor, url, 1, config, deadline)
                setup = time.perf_counter() - started
                frame, item = conversation.frame(replay=True)
                result = await session.turn(frame)
                conversation.completed(result, item, keep_history=True)
                await close_sessions([session])
                session = None
            else:
                setup = 0.0
                if session is None:
                    (session,) = await open_sessions(reactor, url, 1, config, deadline)
                frame, item = conversation.frame()
                result = await session.turn(frame)
                conversation.completed(result, item)
            if i >= 1:
                ttfe.append(setup + result.ttfe)
                total.append(setup + result.total)
    finally:
        if session is not None:
            await close_sessions([session])
    return {"turns": len(total), "ttfe_ms": summary_ms(ttfe), "turn_ms": summary_ms(total)}
