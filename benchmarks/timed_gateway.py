"""The gateway (``cch.cli``) with CPU time counted per block of work, for docs/benchmarks.md.

    python -m benchmarks.timed_gateway run [--target pooled-ws] [--connections 16] [--seconds 10]
    python -m benchmarks.timed_gateway run --target inproc-http --sequential 500

``run`` starts a fake upstream and this gateway, puts the benchmark's load on it (16
connections for 10 s, or turns one after another) and prints the CPU per turn of each block.
The gateway process itself is ``python -m benchmarks.timed_gateway OUT.json --config FILE``.

A sampling profiler counts a process that waits for a core (three busy processes share two)
as busy wherever it waited, and cProfile slows small Python calls far more than system calls:
neither says where the CPU goes. This counts it: the main thread's CPU time
(``time.thread_time_ns``) spent inside each of a few entry points is added up, inclusive of what
they call, and the rest of the main thread's CPU is the reactor's own (polling, dispatch,
timers). SIGUSR2 starts counting afresh; SIGUSR1 writes ``OUT.json``: nanoseconds and calls per
block, the main thread's CPU and the process's (other threads: the usage ledger's SQLite).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_ns: dict[str, int] = {}
_calls: dict[str, int] = {}
_depth = [0]
_clock = time.thread_time_ns


def _timed(owner: Any, attr: str, name: str, top_only: bool = False) -> None:
    """Count the CPU time spent in ``owner.attr`` under ``name`` (once per call stack when
    ``top_only``: a block called from itself is not counted twice)."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = _clock()
        try:
            return original(*args, **kwargs)
        finally:
            _ns[name] = _ns.get(name, 0) + _clock() - start
            _calls[name] = _calls.get(name, 0) + 1

    setattr(owner, attr, wrapper)


def _install() -> None:
    from twisted.internet import base, tcp

    from cch import http11, httpchannel, httpclient, logs, tunnel, web, writes
    from cch.edge import connection, protocol
    from cch.handler import continuity, metering, pipeline
    from cch.upstream import exchange, ws
    from cch.upstream import http as upstream_http
    from cch.usage import ledger as ledger_mod

    _timed(tcp.Connection, "doRead", "socket read + its protocol (all)")
    _timed(tcp.Connection, "doWrite", "socket write (send)")
    _timed(base.ReactorBase, "runUntilCurrent", "timers and callLater")
    _timed(protocol.EdgeProtocol, "consumeData", "edge: client frames in (all)")
    _timed(connection.EdgeConnection, "text_received", "edge: a client frame handled (turn set-up)")
    _timed(pipeline.ResponsesHandler, "handle", "handler: handle() until it waits (routing, pool, frame sent)")
    _timed(ws._ClientProtocol, "consumeData", "upstream: frames in (all)")
    _timed(ws.UpstreamConnection, "_message", "upstream: a frame delivered (not relayed)")
    _timed(exchange.Exchange, "relay_frames", "upstream: relayed runs handed to the edge")
    _timed(exchange.Exchange, "_finish", "exchange: turn completion")
    _timed(logs._LineObserver, "__call__", "logs: events observed")
    _timed(logs._LineObserver, "flush", "logs: lines rendered and written")
    _timed(writes.WriteBatch, "__exit__", "write batches flushed (collect + transport.write)")
    _timed(exchange.Exchange, "_first_event", "exchange: first event (the handler resumes until it waits)")
    _timed(exchange.Exchange, "forward", "exchange: an event to the sink (a terminal: the turn ends)")
    _timed(metering.TurnMeter, "sse_event", "meter: an event (incl. the edge's)")
    _timed(metering.TurnMeter, "_terminal", "meter: the terminal's usage and transcript")
    _timed(connection._Turn, "sse_event", "edge: an event to the client")
    _timed(connection.EdgeConnection, "_turn_succeeded", "edge: turn succeeded (logs, next turn)")
    _timed(ws.UpstreamConnection, "send", "upstream: the frame masked and written")
    _timed(exchange, "event_type", "exchange: event_type (a parse for the type)")
    _timed(ledger_mod.UsageLedger, "record", "ledger: a row queued")
    # The HTTP upstream's path (inproc-http).
    _timed(http11.HTTP11Connection, "dataReceived", "upstream HTTP: reads (head, body, events on)")
    _timed(httpclient.HttpClient, "post", "upstream HTTP: the request written")
    _timed(pipeline, "upstream_headers", "upstream HTTP: the request's headers")
    _timed(pipeline, "dumps_bytes", "handler: a body serialised")
    _timed(continuity, "prepare", "continuity: the body to send (a replay)")
    _timed(pipeline, "read_body", "upstream HTTP: the body's reader set up")
    _timed(upstream_http._Events, "feed", "upstream HTTP: SSE events decoded and delivered")
    # The HTTP tunnel (http-tunnel): the edge POSTs each turn to the core's own listener.
    _timed(tunnel.HttpTunnel, "run_turn", "tunnel client: the turn POSTed")
    _timed(httpchannel.GuardedChannel, "dataReceived", "tunnel server: reads (twisted.web)")
    _timed(web.HttpTurns, "render", "tunnel server: the request rendered (parsed, handler started)")
    _timed(web.HttpResponseSink, "sse_event", "tunnel server: an event written as SSE")


def _proc_cpu_ns(path: str) -> int:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


async def _drive(reactor: Any, target_name: str, connections: int, seconds: float, sequential: int) -> None:
    from dataclasses import replace

    from benchmarks import load
    from benchmarks.processes import start_gateway
    from benchmarks.runner import TARGETS, Runner, Settings, make_workdir, remove_workdir

    settings = Settings()
    workdir, made = make_workdir(None)
    runner = Runner(reactor, settings, workdir, say=lambda *_: None)
    upstream, upstream_port = await runner.upstream("upstream")
    out = workdir / "timed.json"
    config = runner.gateway_config(TARGETS[target_name], upstream_port)
    gateway, port = await start_gateway(
        reactor, workdir, "gateway", config, profile_to=out, profiler="benchmarks.timed_gateway"
    )
    url = f"ws://127.0.0.1:{port}/v1/responses"
    try:
        if sequential:
            cfg = replace(settings.client, first_event_gap_ms=settings.seq_gap_ms)
            await load.sequential(reactor, url, cfg, 20, 5, 60)
            os.kill(gateway.pid, signal.SIGUSR2)
            result = await load.sequential(reactor, url, cfg, sequential, 0, 600)
            os.kill(gateway.pid, signal.SIGUSR1)
        else:
            await load.concurrent(reactor, url, settings.client, connections, 1.0, settings.max_turns, 60, {})
            result = await load.concurrent(
                reactor,
                url,
                settings.client,
                connections,
                seconds,
                settings.max_turns,
                600,
                {"server": gateway.pid},
                around=(lambda: os.kill(gateway.pid, signal.SIGUSR2), lambda: os.kill(gateway.pid, signal.SIGUSR1)),
            )
        for _ in range(100):
            if out.exists():
                break
            await load.sleep(reactor, 0.1)
        data = json.loads(out.read_text())
    finally:
        await runner.stop(gateway)
        await runner.stop(upstream)
        if made:
            remove_workdir(workdir)
    turns = result["turns"]
    mode = f"{sequential} turns one after another" if sequential else f"{connections} connections, {seconds:g} s"
    print(f"{target_name}: {mode}, {turns} turns; CPU µs per turn (main thread's time inside each block)")
    print(f"  process {data['process_ns'] / turns / 1e3:7.1f}   main thread {data['main_thread_ns'] / turns / 1e3:7.1f}")
    for name, block in sorted(data["blocks"].items(), key=lambda kv: -kv[1]["ns"]):
        print(f"  {block['ns'] / turns / 1e3:7.1f}  ({block['calls'] / turns:5.2f} calls)  {name}")


def _run(argv: list[str]) -> None:
    import argparse

    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    parser = argparse.ArgumentParser(prog="python -m benchmarks.timed_gateway run")
    parser.add_argument("--target", default="pooled-ws", help="a cch target of the benchmark (default pooled-ws)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument("--sequential", type=int, default=0, help="instead: this many turns one after another")
    args = parser.parse_args(argv)
    task.react(
        lambda reactor: ensureDeferred(_drive(reactor, args.target, args.connections, args.seconds, args.sequential))
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["run"]:
        _run(argv[1:])
        return
    out = Path(argv[0])
    pid = os.getpid()
    start: dict[str, int] = {}

    def reset(signum: int, frame: Any) -> None:
        _ns.clear()
        _calls.clear()
        start["thread"] = _clock()
        start["process"] = _proc_cpu_ns(f"/proc/{pid}/stat")
        start["wall"] = time.monotonic_ns()

    def dump(signum: int, frame: Any) -> None:
        data = {
            "blocks": {name: {"ns": ns, "calls": _calls[name]} for name, ns in _ns.items()},
            "main_thread_ns": _clock() - start.get("thread", 0),
            "process_ns": _proc_cpu_ns(f"/proc/{pid}/stat") - start.get("process", 0),
            "wall_ns": time.monotonic_ns() - start.get("wall", 0),
        }
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)

    signal.signal(signal.SIGUSR2, reset)
    signal.signal(signal.SIGUSR1, dump)
    _install()
    from cch.cli import main as cch_main

    cch_main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
