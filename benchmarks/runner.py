"""One benchmark run: every target, every scenario, ``runs`` times, plus the profile.

Targets (each against the same fake upstream build, in fresh processes for every repeat):

* ``direct``      the load client talks to the fake upstream itself: the baseline
* ``inproc-http`` cch, in-process tunnel, upstream over HTTP SSE (provider websocket = off)
* ``pooled-ws``   cch, in-process tunnel, pooled upstream WebSocket (provider websocket = on)
* ``http-tunnel`` cch, HTTP tunnel (each turn POSTed to its own /v1/responses), pooled
  upstream WebSocket: the same as ``pooled-ws`` plus the loopback HTTP hop
* ``pooled-ws-limits``  ``pooled-ws`` with a client key whose limits count every turn, in memory
* ``pooled-ws-cluster`` the same limits kept in Redis (``[cluster]``): against the one before,
  the cost of the shared limits; skipped when Redis does not answer (``--redis``)
* ``external``    any ``--target ws://127.0.0.1:PORT/v1/responses`` (another gateway)

Targets are interleaved within each repeat (direct, b, c, d, direct, b, ...) so a slow
minute of the machine does not land on one target only.
"""

from __future__ import annotations

import os
import platform
import pstats
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import cluster, httpload, load, procstats
from benchmarks.processes import (
    REPO,
    Child,
    KeyedGateway,
    gateway_toml,
    start_gateway,
    start_relay,
    start_upstream,
)
from benchmarks.upstream import raise_nofile_limit


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    tunnel: str | None = None  # None: not a cch process we start
    websocket: str | None = None  # provider websocket setting
    usage_database: str | None = None  # [usage] database; None: the default (SQLite, on)
    limits: bool = False  # a client key with limits (benchmarks.processes.KEY_LIMITS)
    cluster: bool = False  # ... kept in Redis ([cluster]) rather than in memory
    relay: bool = False  # a bare TCP relay (benchmarks.relay) rather than cch

    @property
    def gateway(self) -> bool:
        return self.tunnel is not None

    @property
    def upstream_ws(self) -> bool:
        return self.websocket == "on"


TARGETS: dict[str, Target] = {
    "direct": Target("direct", "fake upstream directly (baseline)"),
    "inproc-http": Target(
        "inproc-http", "cch: in-process tunnel, HTTP upstream", "in-process", "off"
    ),
    "pooled-ws": Target(
        "pooled-ws", "cch: in-process tunnel, pooled upstream WS", "in-process", "on"
    ),
    "http-tunnel": Target("http-tunnel", "cch: HTTP tunnel, pooled upstream WS", "http", "on"),
    # The floor of any gateway on this machine: one more process passing bytes, nothing else.
    "tcp-relay": Target("tcp-relay", "bare TCP relay (no parsing): the floor of a 2nd process", relay=True),
    # The usage ledger's cost: the same path with the ledger off (cch with a ledger only).
    "pooled-ws-no-ledger": Target(
        "pooled-ws-no-ledger", "cch: pooled upstream WS, usage ledger off", "in-process", "on", "off"
    ),
    # The shared limits' cost (issue 15): the same key limits in memory, and in Redis.
    "pooled-ws-limits": Target(
        "pooled-ws-limits",
        "cch: pooled upstream WS, a key with limits kept in memory",
        "in-process",
        "on",
        limits=True,
    ),
    "pooled-ws-cluster": Target(
        "pooled-ws-cluster",
        "cch: pooled upstream WS, the same key limits kept in Redis ([cluster])",
        "in-process",
        "on",
        limits=True,
        cluster=True,
    ),
}
DEFAULT_TARGETS = ("direct", "tcp-relay", "inproc-http", "pooled-ws", "http-tunnel")
NO_REUSE_SOCKET_AGE = 1e-6  # upstream_websocket.max_socket_age: retire the socket before every turn


@dataclass
class Settings:
    runs: int = 5
    targets: tuple[str, ...] = DEFAULT_TARGETS
    external_url: str | None = None
    external_pid: int | None = None
    upstream_port: int = 0  # fixed port of the upstream of the external target (0 = any)
    source: Path = REPO  # the cch source tree under test (gateway and fake upstream)
    redis_url: str = cluster.DEFAULT_REDIS  # the Redis of the pooled-ws-cluster target
    # the fake upstream's turns
    events: int = 40
    delta_bytes: int = 16
    delay: float = 0.0
    # the client's turns
    client: load.LoadConfig = field(default_factory=load.LoadConfig)
    seq_turns: int = 200
    seq_gap_ms: float = 2.0  # the upstream pauses this long after the first event (sequential)
    warmup: int = 5
    connections: tuple[int, ...] = (16, 64)
    duration: float = 4.0
    max_turns: int = 100_000
    idle_counts: tuple[int, ...] = (1000, 5000)
    settle: float = 1.0
    reuse_turns: int = 20
    phase_limit: float = 120.0  # no phase runs longer than this
    quiet_wait: float = 10.0  # before each target: wait this long at most for a quiet machine
    quiet_cores: float = 0.3  # "quiet": other programs use less than this many cores
    noise_retries: int = 1  # re-run a timed phase disturbed by other programs this many times
    retry_budget: float = 120.0  # seconds of re-runs per benchmark run, at most
    log_level: str = "info"
    profile: bool = True
    profile_duration: float = 8.0
    profile_connections: int = 16
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> Settings:
        """A few seconds end to end: for the smoke test, not for numbers."""
        values: dict[str, Any] = {
            "runs": 1,
            "seq_turns": 5,
            "warmup": 1,
            "connections": (2, 4),
            "duration": 0.3,
            "idle_counts": (5, 10),
            "settle": 0.1,
            "reuse_turns": 3,
            "profile": False,
            "phase_limit": 20.0,
            "quiet_wait": 0.0,
            "noise_retries": 0,
            "quick": True,
        }
        values.update(overrides)
        return cls(**values)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["client"] = {k: v for k, v in data["client"].items() if k != "headers"}
        data["source"] = str(self.source)
        data["redis_url"] = cluster.shown_url(self.redis_url)
        return data


def code_version(source: Path = REPO) -> dict[str, Any]:
    """The commit of the source tree under test, and whether cch's code differs from it."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=source, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "cch", "twisted")
    return {
        "source": str(source),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def machine(source: Path = REPO) -> dict[str, Any]:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for module in ("twisted", "autobahn", "treq"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = None
    try:
        loadavg = os.getloadavg()
    except OSError:
        loadavg = None
    return {
        "code": code_version(source),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": loadavg,
    }


class Runner:
    def __init__(self, reactor: Any, settings: Settings, workdir: Path, say: Any = print) -> None:
        self.reactor = reactor
        self.s = settings
        self.workdir = workdir
        self.say = say
        self.children: list[Child] = []
        self.secret = secrets.token_hex(16)
        self._retry_spent = 0.0  # seconds spent re-running disturbed phases
        # The keyed targets' client key and /metrics token, and the cluster target's Redis.
        self.key = "bench-" + secrets.token_hex(16)
        self.admin_token = secrets.token_hex(16)
        self.redis: cluster.BenchRedis | None = None
        self.skipped: dict[str, str] = {}  # target → why it was not run
        self._prefixes: dict[Child, str] = {}  # gateway → its [cluster] key_prefix

    # -- processes --------------------------------------------------------------------------

    async def upstream(self, name: str, port: int = 0) -> tuple[Child, int]:
        child, port = await start_upstream(
            self.reactor,
            self.workdir,
            name,
            events=self.s.events,
            delta_bytes=self.s.delta_bytes,
            delay=self.s.delay,
            port=port,
            src=self.s.source,
        )
        self.children.append(child)
        return child, port

    async def gateway(
        self,
        name: str,
        target: Target,
        upstream_port: int,
        *,
        max_socket_age: float | None = None,
        profile_to: Path | None = None,
    ) -> tuple[Child, int]:
        prefix = None
        if target.cluster:
            assert self.redis is not None, "the cluster target runs only with Redis"
            prefix = self.redis.new_prefix()
        text = self.gateway_config(
            target, upstream_port, max_socket_age=max_socket_age, key_prefix=prefix
        )
        child, port = await start_gateway(
            self.reactor,
            self.workdir,
            name,
            text,
            log_level=self.s.log_level,
            profile_to=profile_to,
            src=self.s.source,
        )
        self.children.append(child)
        if prefix is not None:
            self._prefixes[child] = prefix
        return child, port

    def gateway_config(
        self,
        target: Target,
        upstream_port: int,
        *,
        max_socket_age: float | None = None,
        key_prefix: str | None = None,
    ) -> str:
        """The TOML of ``target``'s gateway; a cluster target's needs its ``key_prefix``."""
        assert target.tunnel is not None and target.websocket is not None
        keyed = None
        if target.limits:
            redis = self.s.redis_url if target.cluster else None
            keyed = KeyedGateway(self.key, self.admin_token, redis, key_prefix if redis else None)
        return gateway_toml(
            upstream_port,
            tunnel=target.tunnel,
            websocket=target.websocket,
            secret=self.secret,
            max_socket_age=max_socket_age,
            usage_database=target.usage_database,
            keyed=keyed,
        )

    def client_config(self, target: Target) -> load.LoadConfig:
        """The load client's settings for ``target``: its key on every upgrade if it has one."""
        cfg = self.s.client
        if not target.limits:
            return cfg
        return replace(cfg, headers={**cfg.headers, "Authorization": f"Bearer {self.key}"})

    async def stop(self, child: Child) -> None:
        """Stop ``child``; for a cluster gateway, then delete its keys from Redis."""
        await child.stop(self.reactor)
        if child in self.children:
            self.children.remove(child)
        prefix = self._prefixes.pop(child, None)
        if prefix is not None and self.redis is not None:
            try:
                await self.redis.clean(prefix)
            except Exception as exc:  # every key carries a TTL: it goes in time anyway
                self.say(f"  could not delete the Redis keys under {prefix}: {exc!r}")

    async def check_limits(self, tag: str, target: Target, port: int) -> dict[str, Any]:
        """What a keyed gateway's /metrics says about its limits (benchmarks.cluster); any
        problem is said loudly here and fails the run."""
        try:
            found = await cluster.scrape(self.reactor, port, self.admin_token)
        except Exception as exc:
            check: dict[str, Any] = {"problems": [f"could not read /metrics: {exc!r}"]}
        else:
            check = cluster.limits_check(found, cluster=target.cluster)
        for problem in check["problems"]:
            self.say(f"  {tag}: FAILED limits check: {problem}")
        return check

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()
        self.children.clear()

    # -- one target, one repeat ----------------------------------------------------------------

    async def run_target(self, target: Target, run: int) -> dict[str, Any]:
        s, reactor, cfg = self.s, self.reactor, self.client_config(target)
        tag = f"{target.name}-{run}"
        background = await self.wait_quiet()
        fixed = s.upstream_port if target.name == "external" else 0
        upstream, upstream_port = await self.upstream(f"upstream-{tag}", fixed)
        gateway: Child | None = None
        try:
            if target.name == "external":
                url, server_pid = s.external_url, s.external_pid
            elif target.gateway:
                gateway, port = await self.gateway(f"gateway-{tag}", target, upstream_port)
                url, server_pid = f"ws://127.0.0.1:{port}/v1/responses", gateway.pid
            elif target.relay:
                gateway, port = await start_relay(
                    reactor, self.workdir, f"relay-{tag}", upstream_port=upstream_port, src=s.source
                )
                self.children.append(gateway)
                url, server_pid = f"ws://127.0.0.1:{port}/v1/responses", gateway.pid
            else:
                url, server_pid = f"ws://127.0.0.1:{upstream_port}/v1/responses", upstream.pid
            assert url is not None
            pids = {"server": server_pid, "upstream": upstream.pid}
            if target.cluster and self.redis is not None and self.redis.pid is not None:
                pids["redis"] = self.redis.pid  # its CPU is the target's, not other programs'
            result: dict[str, Any] = {"target": target.name, "run": run, "url": url}
            result["background_cores_before"] = background
            rss = procstats.rss_bytes(server_pid)
            result["startup_rss_mib"] = rss / 2**20 if rss is not None else None

            async def guarded(name: str, work: Any) -> Any:
                """A scenario that fails is recorded as {"error": ...}; the run goes on."""
                try:
                    return await work
                except Exception as exc:
                    self.say(f"  {tag}: {name} failed: {exc!r}")
                    result.setdefault("errors", []).append(f"{name}: {exc!r}")
                    return {"error": repr(exc)}

            self.say(f"  {tag}: idle connections {list(s.idle_counts)}")
            result["idle"] = await guarded(
                "idle",
                load.idle(reactor, url, cfg, s.idle_counts, server_pid, s.settle, s.phase_limit),
            )
            self.say(f"  {tag}: sequential {s.seq_turns} turns")
            seq_cfg = replace(cfg, first_event_gap_ms=s.seq_gap_ms)
            result["sequential"] = await self.measured(
                tag,
                "sequential",
                lambda: load.sequential(
                    reactor, url, seq_cfg, s.seq_turns, s.warmup, s.phase_limit, pids
                ),
                guarded,
            )
            if target.name == "direct":
                # The fake upstream's own HTTP answer: what inproc-http's upstream side costs.
                self.say(f"  {tag}: sequential {s.seq_turns} turns over HTTP")
                http_url = f"http://127.0.0.1:{upstream_port}/v1/responses"
                result["sequential_http"] = await self.measured(
                    tag,
                    "sequential over HTTP",
                    lambda: httpload.sequential(
                        reactor, http_url, seq_cfg, s.seq_turns, s.warmup, s.phase_limit, pids
                    ),
                    guarded,
                )
            result["concurrent"] = {}
            for n in s.connections:
                self.say(f"  {tag}: {n} connections x {s.duration:g}s")
                result["concurrent"][str(n)] = await self.measured(
                    tag,
                    f"concurrent {n}",
                    lambda n=n: load.concurrent(
                        reactor, url, cfg, n, s.duration, s.max_turns, s.phase_limit, pids
                    ),
                    guarded,
                )
            self.say(f"  {tag}: turns 2..{s.reuse_turns} with and without upstream socket reuse")
            result["reuse"] = {
                "reuse": await guarded(
                    "reuse", load.reuse(reactor, url, cfg, s.reuse_turns, s.phase_limit)
                )
            }
            if target.name == "direct":
                direct_url = f"ws://127.0.0.1:{upstream_port}/v1/responses"
                result["reuse"]["no_reuse"] = await guarded(
                    "no reuse",
                    load.reuse(
                        reactor,
                        direct_url,
                        cfg,
                        s.reuse_turns,
                        s.phase_limit,
                        new_connection_per_turn=True,
                    ),
                )
            elif target.gateway and target.upstream_ws:
                result["reuse"]["no_reuse"] = await guarded(
                    "no reuse", self._no_reuse(tag, target, upstream_port)
                )
            else:
                result["reuse"]["no_reuse"] = None  # HTTP upstream: no socket to keep or drop
            rss = procstats.rss_bytes(server_pid)
            result["final_rss_mib"] = rss / 2**20 if rss is not None else None
            if target.limits and gateway is not None:
                result["limits_check"] = await self.check_limits(tag, target, port)
                no_reuse = result["reuse"].get("no_reuse") or {}
                problems = result["limits_check"]["problems"]
                problems += (no_reuse.get("limits_check") or {}).get("problems", [])
                if problems:
                    result["failed"] = problems
            return result
        finally:
            if gateway is not None:
                await self.stop(gateway)
            await self.stop(upstream)

    async def measured(self, tag: str, name: str, make: Any, guarded: Any) -> Any:
        """Run a timed phase; if other programs used more than ``quiet_cores`` cores meanwhile,
        wait for quiet and run it again (at most ``noise_retries`` times, within the run's
        ``retry_budget`` seconds), keeping the attempt with the least interference."""
        best = await guarded(name, make())
        attempts = 1
        while attempts <= self.s.noise_retries:
            noise = _noise(best)
            if noise is None or noise <= self.s.quiet_cores:
                break
            if self._retry_spent >= self.s.retry_budget:
                break
            self.say(f"  {tag}: {name}: other programs used {noise:.2f} cores; running it again")
            started = time.monotonic()
            await self.wait_quiet()
            again = await guarded(name, make())
            self._retry_spent += time.monotonic() - started
            attempts += 1
            if (_noise(again) if _noise(again) is not None else 99) < noise:
                best = again
        if isinstance(best, dict):
            best["attempts"] = attempts
        return best

    async def wait_quiet(self) -> float | None:
        """Wait (at most ``quiet_wait`` seconds) until other programs use less than
        ``quiet_cores`` cores, sampled over half a second; return the last sample. The machine
        may be shared, and a busy neighbour would land on whichever target runs next."""
        if self.s.quiet_wait <= 0:
            return None
        deadline = time.monotonic() + self.s.quiet_wait
        sample = None
        while True:
            before = procstats.machine_cpu()
            await load.sleep(self.reactor, 0.5)
            after = procstats.machine_cpu()
            if before is None or after is None:
                return None
            sample = (after - before) / 0.5
            if sample < self.s.quiet_cores or time.monotonic() >= deadline:
                if sample >= self.s.quiet_cores:
                    self.say(f"  machine still busy ({sample:.2f} cores used by others); going on")
                return sample
            self.say(f"  waiting for a quieter machine ({sample:.2f} cores busy)")

    async def _no_reuse(self, tag: str, target: Target, upstream_port: int) -> dict[str, Any]:
        """The reuse conversation on a gateway that retires its upstream socket every turn."""
        fresh, port = await self.gateway(
            f"gateway-{tag}-noreuse", target, upstream_port, max_socket_age=NO_REUSE_SOCKET_AGE
        )
        try:
            url = f"ws://127.0.0.1:{port}/v1/responses"
            cfg = self.client_config(target)
            result = await load.reuse(
                self.reactor, url, cfg, self.s.reuse_turns, self.s.phase_limit
            )
            if target.limits:
                result["limits_check"] = await self.check_limits(f"{tag}-noreuse", target, port)
            return result
        finally:
            await self.stop(fresh)

    # -- profile ------------------------------------------------------------------------------

    async def profile(self) -> dict[str, Any]:
        """The gateway (pooled upstream WS) under cProfile, for ``profile_connections``
        connections x ``profile_duration`` seconds."""
        s = self.s
        target = TARGETS["pooled-ws"]
        prof = self.workdir / "gateway-pooled-ws.prof"
        upstream, upstream_port = await self.upstream("upstream-profile")
        try:
            gateway, port = await self.gateway(
                "gateway-profile", target, upstream_port, profile_to=prof
            )
            try:
                url = f"ws://127.0.0.1:{port}/v1/responses"
                result = await load.concurrent(
                    self.reactor,
                    url,
                    s.client,
                    s.profile_connections,
                    s.profile_duration,
                    s.max_turns,
                    s.phase_limit,
                    {"server": gateway.pid, "upstream": upstream.pid},
                    around=(lambda: os.kill(gateway.pid, signal.SIGUSR2), lambda: None),
                )
                await gateway.signal_for_file(self.reactor, signal.SIGUSR1, prof)
            finally:
                await self.stop(gateway)
        finally:
            await self.stop(upstream)
        return {"load": result, "profile_file": str(prof), **profile_tables(prof, result["events"])}

    # -- everything -----------------------------------------------------------------------------

    async def open_redis(self, targets: list[Target]) -> list[Target]:
        """Connect to the cluster targets' Redis; without it they are skipped, with a reason
        printed (a benchmark is not a test: the other targets still run)."""
        wanted = [t for t in targets if t.cluster]
        if not wanted:
            return targets
        problem = cluster.redis_problem(self.s.redis_url)
        if problem is None:
            redis = cluster.BenchRedis(self.reactor, self.s.redis_url)
            try:
                await redis.open()
            except Exception as exc:
                await redis.close()
                problem = f"Redis at {redis.shown}: {exc}"
            else:
                self.redis = redis
                return targets
        for t in wanted:
            self.say(f"skipping {t.name}: {problem} (--redis URL names another Redis)")
            self.skipped[t.name] = problem
        return [t for t in targets if not t.cluster]

    async def close_redis(self) -> None:
        if self.redis is None:
            return
        for prefix in list(self._prefixes.values()):  # gateways killed, not stopped
            try:
                await self.redis.clean(prefix)
            except Exception:
                pass  # every key carries a TTL: it goes in time anyway
        self._prefixes.clear()
        await self.redis.close()

    async def run(self) -> dict[str, Any]:
        s = self.s
        targets = [TARGETS[name] for name in s.targets if name in TARGETS]
        if s.external_url:
            targets.append(Target("external", f"external gateway at {s.external_url}"))
        started = time.time()
        machine_info = machine(s.source)  # the code as it was when the run started
        runs: list[dict[str, Any]] = []
        targets = await self.open_redis(targets)
        try:
            for run in range(s.runs):
                for target in targets:
                    self.say(f"run {run + 1}/{s.runs}: {target.name} ({target.label})")
                    runs.append(await self.run_target(target, run))
            profile = None
            if s.profile:
                self.say(
                    f"profile: pooled-ws gateway under cProfile, {s.profile_connections} connections"
                )
                profile = await self.profile()
        finally:
            self.kill_all()
            await self.close_redis()
        redis = None
        if self.redis is not None:
            redis = {"url": self.redis.shown, "pid": self.redis.pid, "cleaned": self.redis.cleaned}
        return {
            "settings": s.as_json(),
            "machine": machine_info,
            "targets": {t.name: t.label for t in targets},
            "skipped": self.skipped,
            "redis": redis,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_seconds": time.time() - started,
            "runs": runs,
            "profile": profile,
        }


def _noise(result: Any) -> float | None:
    """Cores other programs used during a phase (None if unknown or the phase failed)."""
    if not isinstance(result, dict):
        return None
    value = result.get("cpu_utilization", {}).get("other_processes")
    return value if isinstance(value, int | float) else None


def _where(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    path = filename
    if "/cch/" in path and "site-packages/" not in path:  # the cch under test, wherever it is
        return f"cch/{path.rsplit('/cch/', 1)[1]}:{line}({name})"
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        try:
            path = str(Path(filename).resolve().relative_to(Path(__file__).resolve().parent.parent))
        except ValueError:
            pass
    return f"{path}:{line}({name})"


# Where the gateway's time goes, for docs/benchmarks.md: (what, functions counted by cumulative
# time, functions counted by own time, functions whose cumulative time is subtracted). The groups
# do not overlap (for the code as of this commit: frames cut by cch.wsframes, one parse per
# event, client writes batched per upstream read).
SHARES: list[tuple[str, list[str], list[str], list[str]]] = [
    (
        "socket reads and frame cutting: Autobahn's `dataReceived`/`consumeData` and "
        "`wsframes.take_text_frames` (own time; upstream events and client turn frames)",
        [],
        [
            r"autobahn/twisted/websocket\.py:\d+\(dataReceived\)$",
            r"autobahn/websocket/protocol\.py:\d+\((_dataReceived|consumeData|processData)\)$",
            r"cch/upstream/ws\.py:\d+\((dataReceived|consumeData)\)$",
            r"cch/edge/protocol\.py:\d+\((consumeData|_text_frame)\)$",
            r"cch/wsframes\.py:\d+\(take_text_frames\)$",
        ],
        [],
    ),
    (
        "parsing each event once (`wire.event_type` → `jsoncodec.loads`)",
        [r"cch/wire\.py:\d+\(event_type\)$"],
        [],
        [],
    ),
    (
        "cch's per-event call chain, own time: `UpstreamConnection._message` → `ws_message` → "
        "`Exchange.forward` → `TurnMeter.sse_event` → `_Turn.sse_event` → `_Turn._send`",
        [],
        [
            r"cch/upstream/ws\.py:\d+\(_message\)$",
            r"cch/upstream/exchange\.py:\d+\((ws_message|forward)\)$",
            r"cch/handler/metering\.py:\d+\(sse_event\)$",
            r"cch/edge/connection\.py:\d+\((sse_event|_send)\)$",
        ],
        [],
    ),
    (
        "client frames out: `EdgeProtocol.send_text` (encode, header, collect) and one "
        "`flush_writes` per upstream read (Twisted `write`)",
        [r"cch/edge/protocol\.py:\d+\((send_text|flush_writes)\)$"],
        [],
        [],
    ),
    (
        "idle watchdog per event (`IdleWatchdog.poke`)",
        [r"cch/upstream/idle\.py:\d+\(poke\)$"],
        [],
        [],
    ),
    (
        "per-turn set-up: client frame → upstream frame written (`EdgeConnection.text_received`: "
        "parse, turn, logs, routing, pool, frame)",
        [r"cch/edge/connection\.py:\d+\(text_received\)$"],
        [],
        [],
    ),
    (
        "turn completion after the terminal event (`Exchange._finish`: pool bookkeeping, "
        "pipeline and edge wrap-up, usage row, metrics, logs)",
        [r"cch/upstream/exchange\.py:\d+\(_finish\)$"],
        [],
        [],
    ),
    (
        "log lines rendered and written in batches (`cch.logs` flush)",
        [r"cch/logs\.py:\d+\(flush\)$"],
        [],
        [],
    ),
    (
        "socket system calls (`send`, `recv`)",
        [],
        [r"method '(send|recv)' of '_socket\.socket' objects"],
        [],
    ),
    (
        "waiting for sockets (`epoll.poll`): the gateway is idle",
        [],
        [r"method 'poll' of 'select\.epoll' objects"],
        [],
    ),
]


def profile_tables(prof: Path, events: int, top: int = 30) -> dict[str, Any]:
    """Top functions by cumulative and by own time, per 1,000 forwarded events too."""
    if not prof.exists():
        return {"cumulative": [], "tottime": [], "error": "no profile written"}
    stats = pstats.Stats(str(prof))
    rows = []
    for func, (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": _where(func),
                "ncalls": nc,
                "primitive_calls": cc,
                "tottime": tt,
                "cumtime": ct,
                "calls_per_1k_events": nc / events * 1000 if events else None,
            }
        )
    total = getattr(stats, "total_tt", None)
    shares = []
    for label, cumulative, own, minus in SHARES:

        def total_of(patterns: list[str], key: str) -> float:
            return sum(r[key] for r in rows if any(re.search(p, r["function"]) for p in patterns))

        seconds = total_of(cumulative, "cumtime") + total_of(own, "tottime")
        seconds -= total_of(minus, "cumtime")
        shares.append(
            {"what": label, "seconds": seconds, "share": seconds / total if total else None}
        )
    return {
        "total_seconds": total,
        "events": events,
        "shares": shares,
        "cumulative": sorted(rows, key=lambda r: r["cumtime"], reverse=True)[:top],
        "tottime": sorted(rows, key=lambda r: r["tottime"], reverse=True)[:top],
    }


def make_workdir(path: str | None) -> tuple[Path, bool]:
    """(work directory, whether we created a temporary one that may be removed)."""
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        return p, False
    return Path(tempfile.mkdtemp(prefix="cch-bench-")), True


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prepare_process() -> int:
    """Raise our file-descriptor limit (children inherit it); return the new soft limit."""
    limit = raise_nofile_limit()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 2000))
    return limit
