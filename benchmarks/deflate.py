"""permessage-deflate (RFC 7692) on and off, in the same run: ``python -m benchmarks.deflate``.

    python -m benchmarks.deflate [--runs 3] [--connections 16] [--seconds 4] [--idle 200]

What compression costs the gateway and what it saves on each leg, with Codex-like traffic: every
frame carries about 11 KiB of instructions (English text and Markdown from this repository's
docs) and 8 tool schemas (about 5 KiB), conversations of 10 turns chained with
``previous_response_id``; the fake upstream (``benchmarks.upstream --text-file --echo-request``)
answers 40 events, its deltas the words of a docs page, and echoes the instructions and tools in
``response.created``, ``response.in_progress`` and ``response.completed``, as OpenAI does. The load
client (``benchmarks/wsclient.py``) always offers permessage-deflate, as Codex and the Python SDK
do; each variant decides what the gateway accepts and offers:

===============  =========================================================================
``off``          ``limits.websocket_compression = false``, upstream compression off (baseline)
``edge-12``      the client edge compresses, windows of 2**12 bytes, upstream off
``edge-15``      the client edge with 32 KiB windows (``websocket_compression_window_bits = 15``)
``upstream-12``  edge off; the gateway offers permessage-deflate to the upstream, 2**12 windows
``upstream-15``  the same with 32 KiB windows
``both-15``      the edge and the upstream compress, 32 KiB windows
===============  =========================================================================

Each run starts, for every variant in turn, a fresh fake upstream, a byte-counting TCP proxy in
front of it (in this process: what crosses the upstream leg) and a fresh gateway, then:

- **memory**: ``--idle`` connections, one turn each, kept open: the gateway's RSS growth per
  connection (its zlib state on both legs, once allocated, is in it);
- **throughput**: ``--connections`` connections running turns back to back for ``--seconds``
  (after one warm-up turn each): gateway and upstream CPU per event (``/proc``), and bytes per
  turn on the client leg (counted by the client) and on the upstream leg (by the proxy).

Every variant's figures are divided by ``off``'s **of the same run**; the medians of those
ratios over the runs are reported. The JSON goes to ``--out`` (default
``benchmarks/deflate_results.json``, which ``python -m benchmarks report`` also reads for
docs/benchmarks.md) and the section "permessage-deflate" of ``--doc`` (default
docs/benchmarks.md) is rewritten.

The gateway runs as ``python -m benchmarks.deflate gateway --config FILE``: ``cch.cli`` with the
pool's sockets given ``upstream_websocket.compression`` (see :func:`gateway`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater, react

from benchmarks import procstats
from benchmarks.load import Conversation, CpuWindow, LoadConfig, Session, close_sessions, gather
from benchmarks.processes import REPO, Child, gateway_toml, port_when_ready, upstream_ready
from benchmarks.runner import make_workdir, prepare_process, remove_workdir
from benchmarks.wsclient import WSClientProtocol, connect

RESULTS = REPO / "benchmarks" / "deflate_results.json"
DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## permessage-deflate"


@dataclass(frozen=True)
class Variant:
    edge: bool
    upstream: bool
    bits: int = 12
    what: str = ""

    def toml(self) -> str:
        return (
            f"\n[limits]\nwebsocket_compression = {str(self.edge).lower()}\n"
            f"websocket_compression_window_bits = {self.bits}\n"
            f"\n[upstream_websocket]\ncompression = {str(self.upstream).lower()}\n"
            f"compression_window_bits = {self.bits}\n"
        )


VARIANTS = {
    "off": Variant(False, False, what="no compression (baseline)"),
    "edge-12": Variant(True, False, 12, what="client edge, 4 KiB windows"),
    "edge-15": Variant(True, False, 15, what="client edge, 32 KiB windows"),
    "upstream-12": Variant(False, True, 12, what="upstream leg, 4 KiB windows"),
    "upstream-15": Variant(False, True, 15, what="upstream leg, 32 KiB windows"),
    "both-15": Variant(True, True, 15, what="both legs, 32 KiB windows"),
}
BASELINE = "off"


# --- Codex-like traffic ------------------------------------------------------------------------


def docs_text(names: tuple[str, ...], size: int) -> str:
    """``size`` characters of this repository's docs (English and Markdown, like a prompt)."""
    text = "\n\n".join((REPO / "docs" / name).read_text(encoding="utf-8") for name in names)
    while len(text) < size:
        text += "\n\n" + text
    return text[:size]


def codex_tools(text: str) -> list[dict[str, Any]]:
    """Eight function tools shaped like Codex's (about 5 KiB), described in docs prose."""
    names = ["shell", "apply_patch", "update_plan", "view_image", "read_file", "list_dir", "grep_files", "web_search"]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 400]
    tools = []
    for i, name in enumerate(names):
        tools.append(
            {
                "type": "function",
                "name": name,
                "description": " ".join(sentences[i * 3 : i * 3 + 3]),
                "strict": False,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "command": {"type": "array", "items": {"type": "string"}, "description": sentences[40 + i]},
                        "workdir": {"type": "string", "description": "The working directory to run the command in."},
                        "timeout_ms": {"type": "number", "description": "The timeout for the command in milliseconds."},
                    },
                    "required": ["command"],
                    "additionalProperties": False,
                },
            }
        )
    return tools


class CodexConversation(Conversation):
    """:class:`benchmarks.load.Conversation` with Codex's frame: instructions and tools on every
    turn, only the new user message as input."""

    def __init__(self, config: LoadConfig, tag: str, instructions: str, tools: list[dict[str, Any]]) -> None:
        super().__init__(config, tag)
        self.instructions = instructions
        self.tools = tools

    def frame(self, *, replay: bool = False) -> tuple[bytes, dict[str, Any]]:
        if self.position >= self.config.chain:
            self.reset()
        item = self.user_item()
        body: dict[str, Any] = {
            "type": "response.create",
            "model": self.config.model,
            "instructions": self.instructions,
            "input": [item],
            "tools": self.tools,
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "reasoning": {"effort": "medium", "summary": "auto"},
            "store": False,
            "stream": True,
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": f"{self.tag}-{uuid.uuid4()}",
        }
        if self.previous is not None:
            body["previous_response_id"] = self.previous
        return json.dumps(body, separators=(",", ":")).encode(), item


# --- the upstream leg: a byte-counting proxy -----------------------------------------------------


class Counts:
    def __init__(self) -> None:
        self.to_upstream = 0
        self.from_upstream = 0


class _Outbound(Protocol):
    """The proxy's connection to the upstream."""

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def connectionMade(self) -> None:
        self.inbound.outbound_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.inbound.counts.from_upstream += len(data)
        self.inbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.inbound.transport.loseConnection()


class _Inbound(Protocol):
    """A gateway's connection to the proxy."""

    def __init__(self, counts: Counts, reactor: Any, port: int) -> None:
        self.counts, self.reactor, self.port = counts, reactor, port
        self.outbound: _Outbound | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        self.transport.pauseProducing()
        TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port).connect(
            Factory.forProtocol(lambda: _Outbound(self))
        ).addErrback(lambda _: self.transport.abortConnection())

    def outbound_ready(self, outbound: _Outbound) -> None:
        self.outbound = outbound
        outbound.transport.setTcpNoDelay(True)
        self.transport.setTcpNoDelay(True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.counts.to_upstream += len(data)
        assert self.outbound is not None
        self.outbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.outbound is not None:
            self.outbound.transport.loseConnection()


def start_proxy(reactor: Any, upstream_port: int) -> tuple[Any, Counts]:
    counts = Counts()
    factory = Factory.forProtocol(lambda: _Inbound(counts, reactor, upstream_port))
    factory.noisy = False
    return reactor.listenTCP(0, factory, interface="127.0.0.1"), counts


# --- the gateway -------------------------------------------------------------------------------


def gateway(argv: list[str]) -> None:
    """``cch.cli`` whose upstream pool opens sockets with ``upstream_websocket.compression``.

    cch/upstream/pool.py does not pass that setting to the sockets it opens yet; until it does,
    this wraps the pool's socket factory for the benchmark (and does nothing once it does)."""
    from cch.upstream.pool import UpstreamWSPool

    plain = UpstreamWSPool._new_socket

    def new_socket(self: UpstreamWSPool, target: Any) -> Any:
        conn = plain(self, target)
        if self.config.compression and conn.deflate_window_bits is None:
            conn.deflate_window_bits = self.config.compression_window_bits
        return conn

    UpstreamWSPool._new_socket = new_socket  # type: ignore[method-assign]
    from cch.cli import main as cch_main

    cch_main(argv)


async def start_gateway(reactor: Any, workdir: Path, name: str, config_text: str) -> tuple[Child, int]:
    config = workdir / f"{name}.toml"
    config.write_text(config_text)
    argv = [sys.executable, "-m", "benchmarks.deflate", "gateway", "--config", str(config)]
    child = Child(name, argv, workdir, {"CCH_LOG_FORMAT": "json", "CCH_LOG_LEVEL": "info"})

    def ready(obj: dict[str, Any]) -> int | None:
        return obj.get("port") if obj.get("msg") == "server_listening" else None

    return child, await port_when_ready(reactor, child, ready)


# --- one variant -------------------------------------------------------------------------------


@dataclass
class Traffic:
    instructions: str
    tools: list[dict[str, Any]]
    words_file: Path
    config: LoadConfig


async def open_sessions(reactor: Any, url: str, count: int, config: LoadConfig) -> list[Session]:
    sem = DeferredSemaphore(32)
    sessions: list[Session] = []

    async def one() -> None:
        proto = await connect(reactor, url, {}, config.connect_timeout, deflate=True)
        sessions.append(Session(reactor, proto, config))

    results = await DeferredList([sem.run(lambda: ensureDeferred(one())) for _ in range(count)], consumeErrors=True)
    failed = [str(r.value) for ok, r in results if not ok]
    if failed:
        for session in sessions:
            session.proto.abort()
        raise ConnectionError(f"{len(failed)} of {count} connections failed: {failed[0]}")
    return sessions


def _wire(sessions: list[Session]) -> tuple[int, int]:
    protos: list[WSClientProtocol] = [s.proto for s in sessions]
    return sum(p.wire_in for p in protos), sum(p.wire_out for p in protos)


async def wait_quiet(reactor: Any, cores: float = 0.3, wait: float = 10.0) -> float | None:
    """Wait (at most ``wait`` seconds) until the machine's other programs use less than
    ``cores`` cores, as benchmarks/runner.py does before each target; the last sample."""
    deadline = time.monotonic() + wait
    while True:
        before = procstats.machine_cpu()
        await deferLater(reactor, 0.5, lambda: None)
        after = procstats.machine_cpu()
        if before is None or after is None:
            return None
        sample = (after - before) / 0.5
        if sample < cores or time.monotonic() >= deadline:
            return sample
        print(f"  waiting for a quieter machine ({sample:.2f} cores busy)", file=sys.stderr, flush=True)


async def measure_variant(reactor: Any, workdir: Path, name: str, variant: Variant, traffic: Traffic, settings: argparse.Namespace) -> dict[str, Any]:
    upstream, upstream_port = await start_upstream_with_text(reactor, workdir, name, traffic, settings.events)
    proxy, counts = start_proxy(reactor, upstream_port)
    gw: Child | None = None
    try:
        toml = gateway_toml(
            proxy.getHost().port, tunnel="in-process", websocket="on", secret=str(uuid.uuid4())
        ) + variant.toml()
        gw, port = await start_gateway(reactor, workdir, f"{name}-gateway", toml)
        url = f"ws://127.0.0.1:{port}/v1/responses"
        config = traffic.config

        def conversation(tag: str) -> CodexConversation:
            return CodexConversation(config, tag, traffic.instructions, traffic.tools)

        # memory: one turn on each of `idle` connections, kept open
        warm = await open_sessions(reactor, url, 1, config)
        first = conversation("w")
        frame, item = first.frame()
        first.completed(await warm[0].turn(frame), item)
        await close_sessions(warm)
        await deferLater(reactor, 0.3, lambda: None)
        rss0 = procstats.rss_bytes(gw.pid)
        idle = await open_sessions(reactor, url, settings.idle, config)

        async def one_turn(session: Session, conv: CodexConversation) -> None:
            frame, item = conv.frame()
            conv.completed(await session.turn(frame), item)

        sem = DeferredSemaphore(32)
        await DeferredList(
            [sem.run(lambda s=s, i=i: ensureDeferred(one_turn(s, conversation(f"i{i}")))) for i, s in enumerate(idle)],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        await deferLater(reactor, 0.3, lambda: None)
        rss1 = procstats.rss_bytes(gw.pid)
        await close_sessions(idle)

        # throughput
        await wait_quiet(reactor)
        sessions = await open_sessions(reactor, url, settings.connections, config)
        conversations = [conversation(f"c{i}") for i in range(len(sessions))]
        counters = {"turns": 0, "events": 0, "errors": 0, "app_in": 0, "app_out": 0}
        try:
            await gather([one_turn(s, c) for s, c in zip(sessions, conversations, strict=True)])
            window = CpuWindow({"gateway": gw.pid, "upstream": upstream.pid})
            wire0, proxy0 = _wire(sessions), (counts.to_upstream, counts.from_upstream)
            window.start()
            stop_at = time.perf_counter() + settings.seconds

            async def loop(session: Session, conv: CodexConversation) -> None:
                while time.perf_counter() < stop_at:
                    frame, item = conv.frame()
                    result = await session.turn(frame)
                    conv.completed(result, item)
                    counters["turns"] += 1
                    counters["events"] += result.events
                    counters["errors"] += result.kind == b"error"
                    counters["app_out"] += len(frame)

            await gather([loop(s, c) for s, c in zip(sessions, conversations, strict=True)])
            measured = window.stop()
            wire1, proxy1 = _wire(sessions), (counts.to_upstream, counts.from_upstream)
            negotiated = sessions[0].proto.deflate is not None
        finally:
            await close_sessions(sessions)
    finally:
        if gw is not None:
            await gw.stop(reactor)
        await proxy.stopListening()
        await upstream.stop(reactor)
    turns, events = counters["turns"], counters["events"]
    cpu = measured["cpu_seconds"]
    return {
        "negotiated_with_client": negotiated,
        "turns": turns,
        "events": events,
        "errors": counters["errors"],
        "seconds": measured["seconds"],
        "turns_per_s": turns / measured["seconds"],
        "gateway_us_per_event": cpu["gateway"] / events * 1e6,
        "upstream_us_per_event": cpu["upstream"] / events * 1e6,
        "client_us_per_event": cpu["client"] / events * 1e6,
        "other_cpu_share": (cpu.get("other_processes") or 0.0) / measured["seconds"],
        "client_in_bytes_per_turn": (wire1[0] - wire0[0]) / turns,
        "client_out_bytes_per_turn": (wire1[1] - wire0[1]) / turns,
        "client_frame_bytes_per_turn": counters["app_out"] / turns,
        "upstream_out_bytes_per_turn": (proxy1[0] - proxy0[0]) / turns,
        "upstream_in_bytes_per_turn": (proxy1[1] - proxy0[1]) / turns,
        "idle_connections": settings.idle,
        "rss_kib_per_connection": ((rss1 or 0) - (rss0 or 0)) / settings.idle / 1024,
    }


async def start_upstream_with_text(reactor: Any, workdir: Path, name: str, traffic: Traffic, events: int) -> tuple[Child, int]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.upstream",
        "--port",
        "0",
        "--events",
        str(events),
        "--text-file",
        str(traffic.words_file),
        "--echo-request",
    ]
    child = Child(f"{name}-upstream", argv, workdir)
    return child, await port_when_ready(reactor, child, upstream_ready(name))


# --- the run -----------------------------------------------------------------------------------

METRICS = [
    ("gateway_us_per_event", "gateway CPU per event (µs)"),
    ("upstream_us_per_event", "fake upstream CPU per event (µs)"),
    ("turns_per_s", "turns/s ({connections} connections)"),
    ("client_in_bytes_per_turn", "client leg, gateway → client: bytes per turn"),
    ("client_out_bytes_per_turn", "client leg, client → gateway: bytes per turn"),
    ("upstream_in_bytes_per_turn", "upstream leg, upstream → gateway: bytes per turn"),
    ("upstream_out_bytes_per_turn", "upstream leg, gateway → upstream: bytes per turn"),
    ("rss_kib_per_connection", "gateway RSS per connection after one turn (KiB)"),
    ("other_cpu_share", "other programs' CPU meanwhile (cores)"),
]


async def run(reactor: Any, settings: argparse.Namespace) -> dict[str, Any]:
    workdir, temporary = make_workdir(settings.workdir)
    instructions = docs_text(("architecture.md", "operations.md"), settings.instructions_bytes)
    tools = codex_tools(docs_text(("configuration.md",), 60_000))
    words = workdir / "words.txt"
    words.write_text(docs_text(("reference-behaviour.md", "scaling.md"), 200_000), encoding="utf-8")
    traffic = Traffic(instructions, tools, words, LoadConfig(chain=settings.chain, turn_timeout=60.0))
    started = time.time()
    load0 = os.getloadavg()
    runs: list[dict[str, dict[str, Any]]] = []
    try:
        for r in range(settings.runs):
            one: dict[str, dict[str, Any]] = {}
            for name in settings.variants:
                print(f"run {r + 1}/{settings.runs}: {name}", file=sys.stderr, flush=True)
                one[name] = await measure_variant(reactor, workdir, f"r{r}-{name}", VARIANTS[name], traffic, settings)
            runs.append(one)
    finally:
        if temporary:
            remove_workdir(workdir)
    frame = CodexConversation(traffic.config, "x", instructions, tools).frame()[0]
    results = {
        "settings": {
            "runs": settings.runs,
            "connections": settings.connections,
            "seconds": settings.seconds,
            "idle": settings.idle,
            "events": settings.events,
            "chain": settings.chain,
            "frame_bytes": len(frame),
            "instructions_bytes": len(instructions.encode()),
            "tools_bytes": len(json.dumps(tools, separators=(",", ":"))),
            "variants": {name: VARIANTS[name].__dict__ for name in settings.variants},
        },
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "minutes": round((time.time() - started) / 60, 1),
            "load_start": [round(x, 2) for x in load0],
            "load_end": [round(x, 2) for x in os.getloadavg()],
        },
        "runs": runs,
    }
    results["summary"] = summarize(results)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians of each figure and of each variant's ratio to ``off`` of the same run."""
    runs = results["runs"]
    names = list(runs[0])
    median: dict[str, dict[str, float]] = {}
    ratio: dict[str, dict[str, float]] = {}
    for name in names:
        median[name] = {key: statistics.median(run[name][key] for run in runs) for key, _ in METRICS}
        if name != BASELINE:
            ratio[name] = {}
            for key, _ in METRICS:
                pairs = [run[name][key] / run[BASELINE][key] for run in runs if run[BASELINE][key]]
                ratio[name][key] = statistics.median(pairs) if pairs else None
    return {"median": median, "ratio": ratio}


UNRATIOED = {"other_cpu_share"}  # noise, reported as it was


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    summary, settings = results["summary"], results["settings"]
    names = list(summary["median"])
    head = "| metric | " + " | ".join(f"`{n}`" for n in names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    for key, label in METRICS:
        cells = []
        for n in names:
            cell = _fmt(summary["median"][n][key])
            r = summary["ratio"].get(n, {}).get(key)
            if r is not None and key not in UNRATIOED:
                cell += f" ({r:.2f}×)"
            cells.append(cell)
        lines.append(f"| {label.format(connections=settings['connections'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def section(results: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md: the table of this run and how it was made. What the
    defaults are and why is written around it (see :data:`DECISION`)."""
    s, m = results["settings"], results["machine"]
    return (
        f"{HEADING}\n\n"
        f"{DECISION}\n"
        f"Medians of {s['runs']} runs; in parentheses each variant's ratio to `off` of the same run "
        f"(the median of the per-run ratios). Every frame the client sends is {s['frame_bytes']:,} "
        f"bytes of JSON ({s['instructions_bytes']:,} bytes of instructions, {s['tools_bytes']:,} of "
        f"tools); every turn is answered with {s['events']} events, three of which echo the "
        f"instructions and tools; conversations of {s['chain']} turns. Throughput: "
        f"{s['connections']} connections for {s['seconds']:g} s; memory: {s['idle']} connections, "
        "one turn each.\n\n"
        f"{table(results)}\n"
        f"The gateway, the fake upstream and the load client (which inflates and compresses too) "
        f"share the machine's cores, so turns/s moves less than the gateway's CPU per event. "
        f"The run: {m['cores']} cores, Python {m['python']}; started {m['started']}, "
        f"{m['minutes']:g} minutes; load average {', '.join(map(str, m['load_start']))} at the "
        f"start and {', '.join(map(str, m['load_end']))} at the end. Reproduce (about "
        f"{max(1, round(m['minutes']))} minutes; `--doc` elsewhere to leave this page alone):\n\n"
        "```sh\n.venv/bin/python -m benchmarks.deflate\n```\n"
    )


# What the numbers decided, written once they were in (docs/benchmarks.md keeps it with them).
DECISION = """\
`python -m benchmarks.deflate` measures permessage-deflate on each leg against none, in the same
run, with Codex-like traffic (its docstring has the details); the load client offers the
extension as Codex and the Python SDK do (`permessage-deflate; client_max_window_bits`).

**The defaults, from the run below:** the client edge compresses (`limits.websocket_compression =
true`) with 32 KiB windows (`limits.websocket_compression_window_bits = 15`); towards upstreams
compression is off (`upstream_websocket.compression = false`; 32 KiB windows when it is on).

- **32 KiB windows.** Codex sends its instructions and tools in every frame (here 21 KB of a
  frame) and OpenAI echoes them in `response.created`, `response.in_progress` and
  `response.completed`. Only a window that reaches back to the previous copy makes a repeat cost
  a few bytes: with 32 KiB a turn's bytes fall to 1–2% on each leg, with 4 KiB only to about a
  third, and the smaller window costs *more* CPU per event (2.65× against 1.58× at the edge:
  zlib looks for many short matches instead of copying long ones). It saves memory only: about
  30 KiB per connection instead of about 190 KiB.
- **The edge: on.** A Codex turn here is 68 KB to the client and 21 KB from it; compressed,
  1.6 KB and 0.3 KB. That is the gateway's egress (what a deployment pays for) and the client's
  download. The gateway pays about 13 µs of CPU per event (1.58×, about 0.5 ms for a 40-event
  turn that takes seconds) and, once a connection has run a turn, about 190 KiB of zlib state;
  connections that never ran one allocate none (Autobahn makes the zlib objects at the first
  message). A gateway whose clients all run on its own host gains nothing from it and may turn
  it off.
- **Upstreams: off.** There it costs the gateway about 9 µs per event (1.34×: compressed frames
  skip the fast path of `cch/wsframes.py` and Autobahn inflates them), about 130 KiB per
  upstream socket and the upstream 1.5× its own CPU per event, and what it saves is mostly the
  68 KB per turn coming in from the upstream (ingress) and 20 KB of the gateway's egress per
  turn. Turn it on for upstreams behind slow or metered links; one that does not accept the
  offer is used uncompressed.
- **Context takeover is never refused.** Without it every message starts a fresh zlib stream:
  on a turn's events (zlib alone, same traffic) 3× the CPU per message for 2.7× compression
  instead of 38×, and no memory saved, since Autobahn keeps a connection's zlib objects between
  messages. Clients that ask for it (`server_no_context_takeover`) get it.
- **zlib's `memLevel` 4** instead of its default 8: a 32 KiB-window compressor holds about
  144 KiB instead of 230 KiB, for about 1% less compression and 15% more time per message (zlib
  alone, same traffic).
- The inflated size of a message is held to `limits.max_message_bytes` (edge) and
  `limits.max_upstream_event_bytes` (upstream): a zip bomb is refused with close 1009 before it
  is inflated past the limit (tests/test_wsframes.py, tests/test_edge_deflate.py).
"""


def write_doc(results: dict[str, Any], doc: Path) -> None:
    """Replace the section (from its heading to the next ``## ``) or add it before
    "## Profile: the per-event path"."""
    text = doc.read_text(encoding="utf-8")
    new = section(results)
    start = text.find(HEADING + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + new + ("\n" + text[end + 1 :] if end >= 0 else "")
    else:
        anchor = text.find("## Profile: the per-event path")
        text = text[:anchor] + new + "\n" + text[anchor:] if anchor >= 0 else text + "\n" + new
    doc.write_text(text, encoding="utf-8")


def recorded_section(path: Path = RESULTS) -> str | None:
    """The section as last measured (for ``python -m benchmarks report``), if it was."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return section(results)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        gateway(argv[1:])
        return
    p = argparse.ArgumentParser(prog="python -m benchmarks.deflate", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--idle", type=int, default=200, help="connections of the memory phase")
    p.add_argument("--events", type=int, default=40)
    p.add_argument("--chain", type=int, default=10)
    p.add_argument("--instructions-bytes", type=int, default=11_000)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--doc", default=str(DOC), help="the page whose section is rewritten ('' for none)")
    p.add_argument("--workdir")
    p.add_argument("--quick", action="store_true", help="1 run, 2 s, 20 idle connections (a smoke test)")
    settings = p.parse_args(argv)
    settings.variants = [v.strip() for v in settings.variants.split(",") if v.strip()]
    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown or BASELINE not in settings.variants:
        p.error(f"variants must include {BASELINE} and be among {', '.join(VARIANTS)} (got {unknown or settings.variants})")
    settings.variants = [BASELINE] + [v for v in settings.variants if v != BASELINE]
    if settings.quick:
        settings.runs, settings.seconds, settings.idle = 1, 2.0, 20
    prepare_process()

    async def go(reactor: Any) -> None:
        results = await run(reactor, settings)
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        settings.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(table(results))
        if settings.doc:
            write_doc(results, Path(settings.doc))

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))


if __name__ == "__main__":
    main()
