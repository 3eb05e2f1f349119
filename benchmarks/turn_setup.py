"""The gateway's own work per pooled upstream WebSocket turn, in memory: no sockets, no reactor.

    python -m benchmarks.turn_setup [--turns N] [--repeats R] [--events E] [--relayed] [--profile [PHASE]]

Drives :class:`cch.handler.pipeline.ResponsesHandler` as the in-process tunnel does, on a real
:class:`cch.upstream.pool.UpstreamWSPool` whose one upstream socket is an in-memory stand-in
(the pool's ``open_socket``) and a ``task.Clock``: conversations like the load client's
(``benchmarks/load.py``: ``store: false``, ``previous_response_id`` chained for 10 turns, 2 KiB
of instructions) answered with the benchmark upstream's events (``benchmarks/upstream.py``).
Each turn is timed in three phases:

- **set-up**: ``handle()`` until the handler waits for the first event, the frame written to
  the upstream socket (auth, provider, eligibility, target, continuity, the exchange on the
  retained socket);
- **first event**: the upstream's first event until the handler waits for the next (classify,
  deliver, meter, the sink's call);
- **rest**: the other events and the terminal until the turn's Deferred fired (usage row,
  transcript, the socket idled); with ``--relayed``, only the events a client WebSocket's turn
  reads (output items and the terminal), as when the relay takes the others whole.

A socket's bytes leave only when the read that produced them is handled (cch/writes.py), so
set-up plus first event is what the handler adds to a turn's time to first event; the edge and
the sockets add the rest (docs/benchmarks.md). Figures are µs per turn: the minimum and the
median over ``--repeats`` repeats of ``--turns`` turns each; ``--profile`` adds a cProfile of
one more repeat, of one phase or of all three. Log events go to the gateway's observer (JSON
lines, level info, batched), rendered between turns into nothing, as the gateway renders them
a moment later.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogBeginner

from benchmarks.load import Conversation, LoadConfig
from benchmarks.upstream import output_text
from cch.config import (
    BreakerConfig,
    ContinuityConfig,
    LimitsConfig,
    ProviderConfig,
    UpstreamWebSocketConfig,
)
from cch.handler.auth import KeyRing
from cch.handler.pipeline import ResponsesHandler
from cch.handler.routing import ProviderRouter
from cch.logs import JsonLinesObserver
from cch.testing.fake_upstream import Recorded
from cch.testing.scripts import codex_events
from cch.transcript import TranscriptStore
from cch.turn import RequestContext
from cch.upstream.exchange import READ_EVENT_TYPES
from cch.upstream.pool import UpstreamWSPool
from cch.upstream.ws import CLOSED, CONNECTING, OPEN

PHASES = ("set-up", "first event", "rest")

# What a Codex client's upgrade carries on to the handler (the edge drops the handshake's own).
CLIENT_HEADERS = {
    "user-agent": "codex_cli_rs/0.93.0 (Linux 6.8; x86_64) xterm-256color",
    "originator": "codex_cli_rs",
    "openai-beta": "responses_websockets=2026-02-06",
    "version": "0.93.0",
}


class MemorySocket:
    """One upstream socket with :class:`cch.upstream.ws.UpstreamConnection`'s surface as the pool
    and an exchange use it; it opens when told and closes at once (never under a turn)."""

    def __init__(self, target: Any) -> None:
        self.id = 1
        self.state = CONNECTING
        self.consumer: Any = None
        self.on_gone: list[Callable[[Any], None]] = []
        self.status_text = ""
        self.frames = 0

    @property
    def usable(self) -> bool:
        return self.state in (CONNECTING, OPEN)

    def connect(self) -> None:
        pass

    def open(self) -> None:
        self.state = OPEN
        if self.consumer is not None:
            self.consumer.ws_opened()

    def send(self, text: str | bytes) -> None:
        self.frames += 1

    def message(self, text: str, size: int) -> None:
        if self.consumer is not None:
            self.consumer.ws_message(text, size)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def safe_close(self, code: int = 1000) -> None:
        self.abort("closed")

    def abort(self, failure: str) -> None:
        if self.state == CLOSED:
            return
        # Every turn ends with its terminal event: a socket closing under a turn is a failure.
        assert self.consumer is None, f"the upstream socket closed mid-turn: {failure}"
        self.state = CLOSED
        hooks, self.on_gone = self.on_gone, []
        for hook in hooks:
            hook(self)


class CountingSink:
    """A :class:`cch.turn.ResponseSink` that only counts (the edge's frame writing is not timed)."""

    def __init__(self) -> None:
        self.events = 0

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        pass

    def sse_event(self, data: str, kind: str | None = None) -> None:
        self.events += 1

    def json_body(self, status: int, body: bytes, content_type: str, headers: Any = None) -> None:
        raise AssertionError(f"the turn was answered with a JSON body: {status} {body!r}")

    def register_producer(self, producer: IPushProducer) -> None:
        pass

    def unregister_producer(self) -> None:
        pass


class _Nowhere(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


class Gateway:
    """The handler, its pool and its one upstream socket, as the service composes them."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.sockets: list[MemorySocket] = []
        ws = UpstreamWebSocketConfig()
        self.pool = UpstreamWSPool(None, self.clock, ws, open_socket=self._open_socket)
        self.pool.startService()
        provider = ProviderConfig(name="bench", base_url="http://127.0.0.1:1/v1", websocket="on")
        continuity = ContinuityConfig()
        self.handler = ResponsesHandler(
            keys=KeyRing(()),  # keyless, as the benchmark's gateway
            router=ProviderRouter((provider,), BreakerConfig(), self.clock),
            upstream=None,  # type: ignore[arg-type]  # never reached: every turn rides the socket
            clock=self.clock,
            limits=LimitsConfig(),
            ws_pool=self.pool,
            transcripts=TranscriptStore(
                continuity.max_bytes_per_connection,
                continuity.max_responses_per_connection,
                continuity.max_sessions,
            ),
        )
        self.session = uuid.uuid4().hex
        # The gateway's log observer (JSON lines, level info, batched), writing into nothing.
        self.log = JsonLinesObserver(_Nowhere(), LogLevel.info, batch=self.clock)
        globalLogBeginner.beginLoggingTo([self.log], redirectStandardIO=False)

    def _open_socket(self, target: Any) -> MemorySocket:
        sock = MemorySocket(target)
        self.sockets.append(sock)
        return sock

    def ctx(self) -> RequestContext:
        return RequestContext(
            headers=dict(CLIENT_HEADERS),
            via_websocket=True,
            ws_session=self.session,
            request_id=uuid.uuid4().hex,
        )


class Turns:
    """The load client's conversations, each turn's body and its upstream's events made ahead."""

    def __init__(self, events: int) -> None:
        self.config = LoadConfig()
        self.conversation = Conversation(self.config, "bench")
        self.text = output_text(events, 16)
        self.count = 0

    def next(self) -> tuple[dict[str, Any], list[tuple[str, int]], Any]:
        frame, item = self.conversation.frame()
        body = json.loads(frame)
        del body["type"]  # as cch.wire.turn_body leaves it
        self.count += 1
        rid = f"resp_bench_{self.count}"
        recorded = Recorded(
            "websocket", "GET", "/v1/responses", "", {}, body, frame, response_id=rid
        )
        texts = [
            json.dumps(event, separators=(",", ":"))
            for event in codex_events(recorded, text=self.text)
        ]
        return body, [(text, len(text.encode())) for text in texts], item


def run(
    gateway: Gateway,
    turns: Turns,
    count: int,
    sums: dict[str, int],
    profiler: cProfile.Profile | None = None,
    profiled: str = "all",
    relayed: bool = False,
) -> None:
    """``count`` turns, their phases' nanoseconds added to ``sums``; ``profiler`` sees the
    ``profiled`` phase (or all three), nothing else."""
    clock = time.perf_counter_ns
    handler = gateway.handler
    on = profiler.enable if profiler is not None else _nothing
    off = profiler.disable if profiler is not None else _nothing
    for _ in range(count):
        body, events, item = turns.next()
        ctx, sink = gateway.ctx(), CountingSink()
        first, *middle = events
        if relayed:  # what a client WebSocket's turn reads; the relay takes the rest whole
            middle = [(text, size) for text, size in middle if _read_type(text)]
        if profiled in ("all", "set-up"):
            on()
        t0 = clock()
        d: Deferred[None] = handler.handle(ctx, body, sink)
        t1 = clock()
        if profiled == "set-up":
            off()
        sock = gateway.sockets[-1]
        if sock.state == CONNECTING:
            sock.open()  # the first turn's socket (a warm-up turn)
            t1 = clock()
        if profiled == "first-event":
            on()
        sock.message(*first)
        t2 = clock()
        if profiled == "first-event":
            off()
        elif profiled == "rest":
            on()
        for text, size in middle:
            sock.message(text, size)
        t3 = clock()
        if profiled in ("all", "rest"):
            off()
        result: list[Any] = []
        d.addBoth(result.append)
        if result != [None] or sink.events != 1 + len(middle):
            raise SystemExit(f"turn {turns.count} did not complete on the socket: {result!r}")
        sums["set-up"] += t1 - t0
        sums["first event"] += t2 - t1
        sums["rest"] += t3 - t2
        turns.conversation.completed(_Result(events[-1][0]), item)
        if turns.count % 50 == 0:
            gateway.log.flush()  # what the gateway's batch timer does every 50 ms, between turns


def _read_type(text: str) -> bool:
    return json.loads(text)["type"] in READ_EVENT_TYPES


def _nothing() -> None:
    pass


class _Result:
    """What ``Conversation.completed`` reads of a turn: its terminal's response."""

    def __init__(self, terminal: str) -> None:
        self.terminal = terminal

    def response(self) -> dict[str, Any] | None:
        return json.loads(self.terminal)["response"]


def measure(
    turns_per_repeat: int, repeats: int, events: int, profile: str | None, relayed: bool = False
) -> dict[str, Any]:
    gateway, turns = Gateway(), Turns(events)
    run(gateway, turns, 50, {p: 0 for p in PHASES}, relayed=relayed)  # warm-up: caches, the socket
    per_repeat: list[dict[str, float]] = []
    for _ in range(repeats):
        gc.collect()
        sums = {p: 0 for p in PHASES}
        run(gateway, turns, turns_per_repeat, sums, relayed=relayed)
        per_repeat.append({p: sums[p] / turns_per_repeat / 1000 for p in PHASES})
    result: dict[str, Any] = {}
    for phase in (*PHASES, "set-up + first event", "total"):
        if phase == "set-up + first event":
            values = [r["set-up"] + r["first event"] for r in per_repeat]
        elif phase == "total":
            values = [sum(r.values()) for r in per_repeat]
        else:
            values = [r[phase] for r in per_repeat]
        result[phase] = {"min": min(values), "median": statistics.median(values)}
    if len(gateway.sockets) != 1:
        raise SystemExit(
            f"expected every turn on one retained socket, {len(gateway.sockets)} were opened"
        )
    if profile is not None:
        profiler = cProfile.Profile()
        run(gateway, turns, turns_per_repeat, {p: 0 for p in PHASES}, profiler, profile, relayed)
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        result["profile"] = out.getvalue()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.turn_setup", description=__doc__.split("\n")[0]
    )
    p.add_argument("--turns", type=int, default=2000, help="turns per repeat (default 2000)")
    p.add_argument(
        "--repeats", type=int, default=7, help="repeats; min and median reported (default 7)"
    )
    p.add_argument(
        "--events",
        type=int,
        default=40,
        help="upstream events per turn (default 40, as the benchmark)",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="all",
        choices=("all", "set-up", "first-event", "rest"),
        help="print a cProfile of one more repeat: one phase, or all (the default)",
    )
    p.add_argument(
        "--relayed",
        action="store_true",
        help="deliver only the events a client WebSocket's turn reads (the relay takes the rest)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    result = measure(args.turns, args.repeats, args.events, args.profile, args.relayed)
    profile = result.pop("profile", None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"µs per turn, {args.repeats} repeats of {args.turns} turns ({args.events} events each)"
        )
        print(f"{'phase':<22}{'min':>9}{'median':>9}")
        for phase, figures in result.items():
            print(f"{phase:<22}{figures['min']:>9.1f}{figures['median']:>9.1f}")
    if profile is not None:
        print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
