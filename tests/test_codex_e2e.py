"""Opt-in end-to-end test with the real OpenAI Codex CLI (``CCH_CODEX_E2E=1``).

A real gateway runs in-process on 127.0.0.1 in front of the fake upstream (over WebSocket);
``codex exec`` from the npm package ``@openai/codex`` talks to it as a user's Codex would, with
the provider block of docs/codex.md. See docs/codex.md ("The end-to-end test") for how to run
it and what it checks. The usage-ledger and per-key-limit tests run it against a gateway with a
client key, prices and the SQLite ledger; what they capture is recorded in docs/codex.md ("Rate
limits and quotas: what Codex shows").

Environment:

- ``CCH_CODEX_E2E=1``: run this test (skipped otherwise; it needs npm and the npm registry, or
  a Codex binary).
- ``CCH_CODEX_E2E_BIN``: a ``codex`` executable to use instead of installing one.
- ``CCH_CODEX_E2E_VERSION``: the ``@openai/codex`` version to install (default 0.169.0). The
  install prefix is cached under ``~/.cache/cch-codex-e2e/<version>`` so reruns are fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import RunningGateway, gateway_config, start_gateway
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from cch.config import ClientKey, KeyLimitsConfig, PriceConfig, UsageConfig
from cch.service import makeService
from cch.testing import Event, FakeUpstream, Recorded, Script, codex_events, hold

ENABLED = os.environ.get("CCH_CODEX_E2E") == "1"
DEFAULT_VERSION = "0.169.0"
CACHE = Path.home() / ".cache" / "cch-codex-e2e"
RUN_TIMEOUT = 120  # seconds for one `codex exec`
INSTALL_TIMEOUT = 600  # seconds for `npm install`
PROMPT = "say hi"
EXPECTED_TEXT = f"echo: {PROMPT}"  # what the fake's default (codex_like) script answers
CLIENT_KEY = "sk-cch-e2e-client-key-do-not-forward"

pytestmark = [
    pytest.mark.skipif(
        not ENABLED,
        reason="real Codex CLI end-to-end test: set CCH_CODEX_E2E=1 to run it "
        "(needs npm and the npm registry, or CCH_CODEX_E2E_BIN)",
    ),
    # npm install (first run only) plus one bounded `codex exec`.
    pytest.mark.timeout(INSTALL_TIMEOUT + RUN_TIMEOUT + 120, method="thread"),
]

# Config written into CODEX_HOME: exactly the provider block of docs/codex.md.
CONFIG_TOML = """\
model = "gpt-5.5"
model_provider = "cch"

[model_providers.cch]
name = "cch"
base_url = "{base_url}/v1"
env_key = "CCH_KEY"
wire_api = "responses"
supports_websockets = true
"""


# --- getting a Codex binary ----------------------------------------------------------------------


def _version_of(binary: Path) -> str:
    """``codex --version`` (e.g. "codex-cli 0.169.0"), or "" if it does not run."""
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _install(version: str) -> Path:
    """``npm install -g --prefix DIR @openai/codex@VERSION`` into the cache; the codex path."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("CCH_CODEX_E2E=1 needs npm on PATH (or CCH_CODEX_E2E_BIN=/path/to/codex)")
    exact = re.fullmatch(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?", version) is not None
    prefix = CACHE / version
    binary = prefix / "bin" / "codex"
    if exact and binary.exists() and version in _version_of(binary):
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    # Install next to the cache entry, then move it in: an interrupted install never looks
    # like a cached one.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=CACHE))
    try:
        done = subprocess.run(
            [npm, "install", "-g", "--no-fund", "--no-audit", "--prefix", str(staging),
             f"@openai/codex@{version}"],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(
                f"npm install @openai/codex@{version} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        if prefix.exists():
            shutil.rmtree(prefix)
        try:
            staging.rename(prefix)
        except OSError:
            if not binary.exists():  # not another run that won the race: give up
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


@pytest.fixture(scope="module")
def codex() -> tuple[Path, str]:
    """The Codex executable and its ``--version`` line."""
    given = os.environ.get("CCH_CODEX_E2E_BIN")
    if given:
        binary = Path(given).expanduser().absolute()
        if not os.access(binary, os.X_OK):
            pytest.fail(f"CCH_CODEX_E2E_BIN={given} is not an executable file")
    else:
        binary = _install(os.environ.get("CCH_CODEX_E2E_VERSION", DEFAULT_VERSION))
    version = _version_of(binary)
    if not version:
        pytest.fail(f"{binary} --version did not run")
    return binary, version


# --- running it ----------------------------------------------------------------------------------


@dataclass
class Finished:
    code: int | None  # exit code, None when killed by a signal
    signal: int | None
    stdout: str
    stderr: str
    seconds: float


class _Collector(ProcessProtocol):
    """Closes the child's stdin (no TTY, nothing to read) and keeps what it writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.status: Any = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.status = reason.value
        self.ended.callback(None)

    def kill(self) -> None:
        # The npm package's `codex` is a node script that runs the native binary as its child:
        # SIGKILL to the script alone would leave the binary running. The child leads its own
        # process group (run_process), so the whole group goes.
        try:
            os.killpg(self.transport.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):  # the group is gone already (pid None once reaped)
            pass
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # A child of the child may still hold the pipes; stop waiting for them.
        self.transport.loseConnection()


async def run_process(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Finished:
    """Run ``argv`` to its end, killing it and its children after ``timeout`` seconds (then
    TimeoutError). It runs in a session of its own, so the kill reaches every process it started."""
    proto = _Collector()
    started = time.monotonic()
    leader = [sys.executable, "-c", "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"]
    reactor.spawnProcess(proto, sys.executable, [*leader, *argv], env=env, path=str(cwd))
    watch: Deferred[None] = Deferred(lambda _: proto.kill())
    proto.ended.addCallback(lambda _: None if watch.called else watch.callback(None))
    watch.addTimeout(timeout, reactor)
    try:
        await watch
    except Exception:
        await proto.ended  # killed: reap it so nothing is left behind
        raise TimeoutError(
            f"{argv[0]} still running after {timeout}s; stdout:\n{proto.out.decode(errors='replace')}"
            f"\nstderr:\n{proto.err.decode(errors='replace')}"
        ) from None
    return Finished(
        code=getattr(proto.status, "exitCode", None),
        signal=getattr(proto.status, "signal", None),
        stdout=proto.out.decode("utf-8", "replace"),
        stderr=proto.err.decode("utf-8", "replace"),
        seconds=time.monotonic() - started,
    )


class GatewayLog:
    """The gateway's own log events (``cch.*``) while the test runs, one line each."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        namespace = event.get("log_namespace") or ""
        if not namespace.startswith(("cch", "autobahn")):
            return
        fields = {k: v for k, v in event.items() if not k.startswith("log_") and k != "format"}
        level = getattr(event.get("log_level"), "name", "?")
        text = event.get("log_format") or ""
        self.lines.append(f"{namespace} [{level}] {text} {fields if fields else ''}".rstrip())

    def __enter__(self) -> GatewayLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


async def _within(d: Deferred[Any], seconds: float) -> bool:
    """Did ``d`` fire within ``seconds``?"""
    try:
        await d.addTimeout(seconds, reactor)
    except DeferredTimeout:
        return False
    return True


def _how_it_left(proto: Any) -> str:
    """Close frame code from the client, or that it dropped the TCP connection without one."""
    code = getattr(proto, "remoteCloseCode", None)
    clean = getattr(proto, "wasClean", None)
    if code is None:
        return f"no close frame (wasClean={clean})"
    return f"close frame {code} (wasClean={clean})"


def _summary(frame: dict[str, Any]) -> dict[str, Any]:
    """A frame without its bulky parts (instructions, tools), for failure messages."""
    return {
        k: (f"<{len(v)} items>" if isinstance(v, list) else v)
        for k, v in frame.items()
        if k not in ("instructions", "client_metadata")
    }


def _texts(items: Any) -> list[str]:
    """Every text of the input items of a frame."""
    found: list[str] = []
    for item in items if isinstance(items, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            found.append(content)
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                found.append(part["text"])
    return found


# --- the test ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_codex_exec_over_one_websocket(
    fake: FakeUpstream, codex: tuple[Path, str], tmp_path: Path, record_property: Any
) -> None:
    binary, version = codex
    record_property("codex_version", version)
    print(f"Codex under test: {version} ({binary})")

    with GatewayLog() as gateway_log:
        running = await start_gateway(gateway_config(fake, upstream="websocket"))
        factory = running.service.edge_factory
        client_handshakes: list[dict[str, str]] = []
        client_protocols: list[Any] = []
        opened = factory.connection_opened

        def counting(proto: Any) -> None:
            client_handshakes.append(dict(getattr(proto, "http_headers", {}) or {}))
            client_protocols.append(proto)
            opened(proto)

        factory.connection_opened = counting  # type: ignore[method-assign]
        try:
            home = tmp_path / "home"
            codex_home = tmp_path / "codex-home"
            work = tmp_path / "work"
            for directory in (home, codex_home, work):
                directory.mkdir()
            (codex_home / "config.toml").write_text(CONFIG_TOML.format(base_url=running.http_url))
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "HOME": str(home),
                "CODEX_HOME": str(codex_home),
                "CCH_KEY": CLIENT_KEY,
            }
            if os.environ.get("RUST_LOG"):  # for debugging Codex itself
                env["RUST_LOG"] = os.environ["RUST_LOG"]
            argv = [
                str(binary), "exec", "--skip-git-repo-check", "--sandbox", "read-only",
                "--color", "never", PROMPT,
            ]
            finished = await run_process(argv, env, work, RUN_TIMEOUT)
            # Codex drops its connection when it exits; let the gateway see that before
            # looking at what the upstream saw and before stopping it.
            client_gone = await _within(factory.wait_empty(), 10)
            upstream_gone = await _within(fake.wait_for_idle(), 10)
        finally:
            await running.stop()

    print(f"codex exec took {finished.seconds:.2f}s, exit {finished.code}")
    record_property("codex_exec_seconds", round(finished.seconds, 2))
    frames = [
        [json.dumps(_summary(turn.body), sort_keys=True) for turn in conn.turns]
        for conn in fake.ws_connections
    ]
    context = (
        f"\n--- codex {version}: exit={finished.code} signal={finished.signal} "
        f"({finished.seconds:.1f}s)\n--- stdout:\n{finished.stdout}\n--- stderr:\n{finished.stderr}"
        f"\n--- gateway log:\n" + "\n".join(gateway_log.lines)
        + f"\n--- client handshakes: {len(client_handshakes)}; gateway saw the client leave: "
        f"{client_gone}; upstream socket closed: {upstream_gone}; how the client left: "
        f"{[_how_it_left(p) for p in client_protocols]}"
        + f"\n--- upstream requests: {[(r.transport, r.method, r.path) for r in fake.requests]}"
        + f"\n--- upstream WebSocket frames: {frames}"
    )
    # Shown with `pytest -rP`: what Codex sent, for docs/codex.md and bug reports.
    print(context)
    if client_handshakes:
        print("--- client handshake headers:", json.dumps(client_handshakes[0], indent=1))
    if fake.ws_connections:
        print("--- upstream handshake headers:", json.dumps(fake.ws_connections[0].headers, indent=1))

    assert finished.code == 0, context
    assert EXPECTED_TEXT in finished.stdout, context

    # One client connection for the whole `codex exec`, and one upstream connection for it.
    assert len(client_handshakes) == 1, context
    assert len(fake.ws_connections) == 1, context
    # Codex drops the TCP connection when it exits; the gateway must let go of both ends.
    assert client_gone and upstream_gone, context
    assert all(r.transport == "websocket" for r in fake.requests), context
    upstream = fake.ws_connections[0]
    assert len(upstream.turns) == 2, context

    # The warm-up, then the turn chained to it.
    warmup, turn = (t.body for t in upstream.turns)
    assert warmup.get("type") == "response.create", context
    assert warmup.get("generate") is False, context
    warmup_id = upstream.turns[0].response_id
    assert warmup_id, context
    assert turn.get("type") == "response.create", context
    assert "generate" not in turn or turn["generate"] is not False, context
    assert turn.get("previous_response_id") == warmup_id, context
    assert any(PROMPT in text for text in _texts(turn.get("input"))), context

    # Handshake headers: Codex's own reach the upstream, its credentials and the hop's do not.
    client = {k.lower(): v for k, v in client_handshakes[0].items()}
    sent = upstream.headers
    assert client.get("authorization") == f"Bearer {CLIENT_KEY}", context
    assert client.get("originator"), context
    for name in ("originator", "openai-beta", "session-id", "user-agent"):
        if name in client:
            assert sent.get(name) == client[name], f"{name} not passed through{context}"
    for name, value in client.items():
        if name.startswith("x-codex-"):
            assert sent.get(name) == value, f"{name} not passed through{context}"
    # No provider key is configured, so the upstream gets no authorization at all; in no case
    # the client's key.
    assert "authorization" not in sent, context
    assert all(CLIENT_KEY not in value for value in sent.values()), context
    assert sent.get("sec-websocket-key") != client.get("sec-websocket-key"), context


# --- the usage ledger and per-key limits, as Codex meets them -----------------------------------

KEY_NAME = "e2e"
MODEL = "gpt-5.5"  # what CONFIG_TOML makes Codex ask for
# What the fake reports for a generating turn (the warm-up reports zeros, as codex_like does).
USAGE = {
    "input_tokens": 1200,
    "input_tokens_details": {"cached_tokens": 200},
    "output_tokens": 34,
    "output_tokens_details": {"reasoning_tokens": 7},
    "total_tokens": 1234,
}
PRICE = PriceConfig(model=MODEL, input_per_mtok=1.25, cached_input_per_mtok=0.125, output_per_mtok=10.0)
# (1000 uncached x 1.25 + 200 cached x 0.125 + 34 output x 10) / 1e6 USD
TURN_COST = 0.001615
LIMIT_RUN_TIMEOUT = 180  # seconds for one `codex exec` that meets a limit: long enough to see retries
LONG_WAIT_BOUND = 30  # seconds a `codex exec` facing an hours-long Retry-After is given


def reporting_usage(recorded: Recorded) -> Script:
    """``codex_like``, with :data:`USAGE` on a generating turn's ``response.completed``."""
    events = codex_events(recorded)
    if recorded.body.get("generate") is not False:
        events[-1]["response"]["usage"] = json.loads(json.dumps(USAGE))
    return Script(tuple(Event(e) for e in events))


async def start_ledger_gateway(fake: FakeUpstream, run_dir: Path, limits: KeyLimitsConfig) -> RunningGateway:
    """A gateway with one client key under ``limits``, a price for :data:`MODEL` and the usage
    ledger in SQLite under ``run_dir`` (the default ``[usage]``, flushed every 0.2 s)."""
    config = gateway_config(
        fake,
        upstream="websocket",
        keys=(ClientKey(name=KEY_NAME, key=CLIENT_KEY, limits=limits),),
        prices=(PRICE,),
        usage=UsageConfig(database="sqlite:///usage.sqlite3", flush_interval=0.2),
    )
    service = makeService(config, reactor, None, str(run_dir))
    service.startService()
    await service.when_listening()
    return RunningGateway(service)


def usage_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every row of the ledger's database, read directly (not through the gateway), oldest first."""
    with sqlite3.connect(run_dir / "usage.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM cch_usage ORDER BY started_at, request_id")]


class CodexSession:
    """A scratch ``CODEX_HOME`` with the provider block of docs/codex.md for the gateway, and
    ``codex exec`` runs in it; counts the client WebSocket connections the gateway accepts."""

    def __init__(self, binary: Path, root: Path, running: RunningGateway) -> None:
        self.binary = binary
        self.home, self.codex_home, self.work = root / "home", root / "codex-home", root / "work"
        for directory in (self.home, self.codex_home, self.work):
            directory.mkdir(parents=True)
        (self.codex_home / "config.toml").write_text(CONFIG_TOML.format(base_url=running.http_url))
        self.factory = running.service.edge_factory
        self.connections = 0
        opened = self.factory.connection_opened

        def counting(proto: Any) -> None:
            self.connections += 1
            opened(proto)

        self.factory.connection_opened = counting  # type: ignore[method-assign]

    async def exec(self, fake: FakeUpstream, timeout: float, *, settle: bool = True, prompt: str = PROMPT) -> Finished:
        """One ``codex exec`` of ``prompt``; with ``settle``, then until the gateway and the
        fake have let go of its connections (skip it when another client holds one open)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.home),
            "CODEX_HOME": str(self.codex_home),
            "CCH_KEY": CLIENT_KEY,
        }
        if os.environ.get("RUST_LOG"):
            env["RUST_LOG"] = os.environ["RUST_LOG"]
        argv = [
            str(self.binary), "exec", "--skip-git-repo-check", "--sandbox", "read-only",
            "--color", "never", prompt,
        ]
        finished = await run_process(argv, env, self.work, timeout)
        if settle:
            await _within(self.factory.wait_empty(), 10)
            await _within(fake.wait_for_idle(), 10)
        return finished


class RefusalLog:
    """The gateway's ``key_limit_refused`` events while the test runs: (reason, retry_after)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format") == "key_limit_refused":
            self.events.append((event.get("reason"), event.get("retry_after")))

    def __enter__(self) -> RefusalLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def _quiet(stderr: str) -> str:
    """Codex's stderr without its banner and the scratch-setup warnings (section 6)."""
    noise = ("WARNING: proceeding", "warning: Codex could not find bubblewrap", "Reading additional input")
    lines = stderr.splitlines()
    if "user" in lines:  # the banner ends with the prompt: "user" then the prompt's lines
        lines = lines[lines.index("user") + 2:]
    return "\n".join(line for line in lines if not line.startswith(noise))


def _shown(label: str, finished: Finished, rows: list[dict[str, Any]], connections: int, start: float) -> str:
    """One `codex exec` as docs/codex.md records it: exit, time, output, what the ledger saw."""
    brief = "\n".join(
        f"  +{r['started_at'] - start:6.2f}s {r['client_transport']:9} {r['status']:9} {r['error_code'] or '-':20} "
        f"tokens={r['input_tokens']}/{r['output_tokens']} cost={r['cost']}"
        for r in rows
    )
    return (
        f"\n=== {label}: exit={finished.code} signal={finished.signal} ({finished.seconds:.1f}s), "
        f"client WebSocket connections: {connections}\n--- stdout:\n{finished.stdout}"
        f"--- stderr after the banner:\n{_quiet(finished.stderr)}\n--- ledger rows of this run:\n{brief}"
    )


def refusals(running: RunningGateway, reason: str) -> float:
    """``cch_key_refusals_total{key=KEY_NAME, reason}`` as a scrape reads it."""
    value = running.service.metrics.registry.get_sample_value(
        "cch_key_refusals_total", {"key": KEY_NAME, "reason": reason}
    )
    return value or 0.0


def _refused(rows: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [r for r in rows if (r["status"], r["error_code"]) == ("refused", code)]


@pytest_twisted.ensureDeferred
async def test_codex_turn_writes_one_usage_row_with_the_upstreams_tokens(
    fake: FakeUpstream, codex: tuple[Path, str], tmp_path: Path, record_property: Any
) -> None:
    binary, version = codex
    record_property("codex_version", version)
    fake.default = reporting_usage
    running = await start_ledger_gateway(fake, tmp_path, KeyLimitsConfig())
    try:
        session = CodexSession(binary, tmp_path / "codex", running)
        finished = await session.exec(fake, RUN_TIMEOUT)
        await running.service.ledger.flush()
        before_stop = usage_rows(tmp_path)
    finally:
        await running.stop()
    rows = usage_rows(tmp_path)
    context = _shown(f"codex {version}", finished, rows, session.connections, rows[0]["started_at"] if rows else 0.0)
    context += f"\n--- rows: {rows}"
    print(context)

    assert finished.code == 0, context
    assert EXPECTED_TEXT in finished.stdout, context
    # The row was in the database before the stop; the stop's flush neither lost nor doubled it.
    assert rows == before_stop, context
    served = [t for conn in fake.ws_connections for t in conn.turns]
    assert [t.body.get("generate") for t in served] == [False, None], context
    warmup_id, turn_id = (t.response_id for t in served)
    # One row per turn the upstream served: the warm-up (zero tokens, cost 0) and the turn.
    assert [r["response_id"] for r in rows] == [warmup_id, turn_id], context
    warmup, turn = rows
    assert (warmup["input_tokens"], warmup["output_tokens"], warmup["cost"]) == (0, 0, 0.0), context
    # Exactly one row carries the tokens the fake reported for the turn, and their cost.
    assert [r for r in rows if r["input_tokens"]] == [turn], context
    assert turn["status"] == "completed" and turn["error_code"] is None, context
    assert turn["key"] == KEY_NAME, context
    assert (turn["input_tokens"], turn["cached_input_tokens"], turn["output_tokens"], turn["reasoning_tokens"]) == (
        1200, 200, 34, 7
    ), context
    assert turn["cost"] == pytest.approx(TURN_COST), context
    assert (turn["model_requested"], turn["model_served"]) == (MODEL, MODEL), context
    assert (turn["client_transport"], turn["upstream_transport"], turn["provider"]) == (
        "websocket", "websocket", "primary"
    ), context
    # The key's secret is nowhere in the database.
    assert CLIENT_KEY not in json.dumps(rows), context


LIMIT_TIMEOUT = INSTALL_TIMEOUT + 2 * LIMIT_RUN_TIMEOUT + 120


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(LIMIT_TIMEOUT, method="thread")
async def test_codex_waits_out_a_requests_per_minute_limit_then_succeeds(
    fake: FakeUpstream, codex: tuple[Path, str], tmp_path: Path, record_property: Any
) -> None:
    """``requests_per_minute = 2``: the first `codex exec` (warm-up + turn) uses the minute;
    the second is refused ``rate_limit_exceeded`` with a Retry-After, waits it out, succeeds."""
    binary, version = codex
    record_property("codex_version", version)
    fake.default = reporting_usage
    with RefusalLog() as refused_log:
        running = await start_ledger_gateway(fake, tmp_path, KeyLimitsConfig(requests_per_minute=2))
        try:
            session = CodexSession(binary, tmp_path / "codex", running)
            start = time.time()
            first = await session.exec(fake, LIMIT_RUN_TIMEOUT)
            await running.service.ledger.flush()
            first_rows = usage_rows(tmp_path)
            first_connections = session.connections
            second = await session.exec(fake, LIMIT_RUN_TIMEOUT)
            await running.service.ledger.flush()
            second_rows = usage_rows(tmp_path)[len(first_rows):]
            metric = refusals(running, "requests_per_minute")
        finally:
            await running.stop()
    refused = _refused(second_rows, "rate_limit_exceeded")
    context = (
        f"\n### codex {version}, requests_per_minute = 2"
        + _shown("run 1", first, first_rows, first_connections, start)
        + _shown("run 2 (rate limited)", second, second_rows, session.connections - first_connections, start)
        + f"\n--- key_limit_refused (reason, retry_after): {refused_log.events}"
        + f"\n--- cch_key_refusals_total{{reason=requests_per_minute}}: {metric}"
    )
    print(context)
    record_property("rate_limited_refusals", len(refused))

    assert first.code == 0 and EXPECTED_TEXT in first.stdout, context
    assert [r["status"] for r in first_rows] == ["completed", "completed"], context
    # The second run: refused (never upstream), then Codex retried after the Retry-After it was
    # given and the turn went through; the refusals are counted alike in rows and the metric.
    assert second.code == 0 and EXPECTED_TEXT in second.stdout, context
    assert refused and second_rows[: len(refused)] == refused, context
    assert [r["status"] for r in second_rows[len(refused):]] == ["completed"], context
    assert all(r["upstream_transport"] is None for r in refused), context
    assert metric == len(refused), context
    waits = [after for reason, after in refused_log.events if reason == "requests_per_minute"]
    assert waits and all(w is not None for w in waits), context
    assert second_rows[-1]["started_at"] - refused[-1]["started_at"] >= min(waits) - 1, context
    # Bounded: the warm-up and the turn's first attempt, not a retry per second.
    assert len(refused) <= 6, context


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(LIMIT_TIMEOUT, method="thread")
async def test_codex_gives_up_on_a_rate_limit_that_does_not_clear(
    fake: FakeUpstream, codex: tuple[Path, str], tmp_path: Path, record_property: Any
) -> None:
    """``max_concurrent_turns = 1`` with another turn of the key held open for the whole run:
    every turn Codex sends is refused ``rate_limit_exceeded`` with ``retry-after: 5``."""
    binary, version = codex
    record_property("codex_version", version)
    fake.default = reporting_usage
    # The holder's turn: a first event (so no first-event timeout ends it), then nothing.
    fake.enqueue(lambda recorded: hold(codex_events(recorded)[:1]))
    running = await start_ledger_gateway(fake, tmp_path, KeyLimitsConfig(max_concurrent_turns=1))
    try:
        holder = await running.connect(headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        holder.send_json({
            "type": "response.create", "model": MODEL, "store": False,
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hold"}]}],
        })
        await fake.wait_for_requests(1)
        session = CodexSession(binary, tmp_path / "codex", running)
        start = time.time()
        finished = await session.exec(fake, LIMIT_RUN_TIMEOUT, settle=False)
        await running.service.ledger.flush()
        rows = usage_rows(tmp_path)  # the holder's turn is still in flight: no row yet
        metric = refusals(running, "max_concurrent_turns")
        upstream_turns = len(fake.requests)
    finally:
        await running.stop()
    refused = _refused(rows, "rate_limit_exceeded")
    context = (
        f"\n### codex {version}, max_concurrent_turns = 1, the slot held"
        + _shown("run", finished, rows, session.connections, start)
        + f"\n--- cch_key_refusals_total{{reason=max_concurrent_turns}}: {metric}; upstream turns: {upstream_turns}"
    )
    print(context)
    record_property("busy_refusals", len(refused))

    assert finished.code not in (0, None), context
    assert "429" in finished.stderr, context  # the refusal reached Codex
    assert rows == refused and metric == len(refused), context
    assert upstream_turns == 1, context  # only the holder's turn
    # Bounded: Codex retries over the WebSocket, then over HTTP, then gives up.
    assert {r["client_transport"] for r in refused} <= {"websocket", "http"}, context
    assert 1 < len(refused) <= 20, context


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(LIMIT_TIMEOUT, method="thread")
async def test_codex_shows_when_a_spent_day_resets_and_stops(
    fake: FakeUpstream, codex: tuple[Path, str], tmp_path: Path, record_property: Any
) -> None:
    """``tokens_per_day = 1000``: the first `codex exec`'s turn reports 1,234 tokens; the second
    is refused until the next UTC midnight (hours). A Retry-After that long, Codex 0.169.0
    sleeps silently, so the gateway sends a usage limit with ``resets_at`` instead: Codex says
    when to try again and exits (docs/codex.md#rate-limits-and-quotas-what-codex-shows)."""
    binary, version = codex
    record_property("codex_version", version)
    if 86400 - time.time() % 86400 < 300:
        pytest.skip("less than 5 minutes to UTC midnight: the day's Retry-After would be short")
    fake.default = reporting_usage
    with RefusalLog() as refused_log:
        running = await start_ledger_gateway(fake, tmp_path, KeyLimitsConfig(tokens_per_day=1000))
        try:
            session = CodexSession(binary, tmp_path / "codex", running)
            start = time.time()
            first = await session.exec(fake, LIMIT_RUN_TIMEOUT)
            await running.service.ledger.flush()
            first_rows = usage_rows(tmp_path)
            first_connections = session.connections
            second: Finished | str
            try:
                second = await session.exec(fake, LONG_WAIT_BOUND)
            except TimeoutError as still_running:
                second = str(still_running)
            await running.service.ledger.flush()
            second_rows = usage_rows(tmp_path)[len(first_rows):]
        finally:
            await running.stop()
    refused = _refused(second_rows, "rate_limit_exceeded")
    shown = (
        _shown("run 2 (daily tokens spent)", second, second_rows, session.connections - first_connections, start)
        if isinstance(second, Finished)
        else f"\n=== run 2 (daily tokens spent): killed after {LONG_WAIT_BOUND}s; {second}\n--- rows: {second_rows}"
    )
    context = (
        f"\n### codex {version}, tokens_per_day = 1000"
        + _shown("run 1", first, first_rows, first_connections, start)
        + shown
        + f"\n--- key_limit_refused (reason, retry_after): {refused_log.events}"
    )
    print(context)
    record_property("long_wait_exited", isinstance(second, Finished))

    assert first.code == 0 and [r["status"] for r in first_rows] == ["completed", "completed"], context
    assert isinstance(second, Finished) and second.code not in (0, None), context
    assert "usage limit" in second.stderr and "Try again at" in second.stderr, context
    # Codex does not spin on the gateway: the warm-up and one attempt of the turn at most.
    assert refused and second_rows == refused and len(refused) <= 2, context
    assert all(after is None for _, after in refused_log.events), context


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(LIMIT_TIMEOUT, method="thread")
async def test_codex_stops_at_once_on_an_exhausted_budget(
    fake: FakeUpstream, codex: tuple[Path, str], tmp_path: Path, record_property: Any
) -> None:
    """``budget_per_month = 0.001`` USD: the first `codex exec`'s turn costs more than that
    (admitted: the budget was unspent); the second is refused ``insufficient_quota``."""
    binary, version = codex
    record_property("codex_version", version)
    fake.default = reporting_usage
    running = await start_ledger_gateway(fake, tmp_path, KeyLimitsConfig(budget_per_month=0.001))
    try:
        session = CodexSession(binary, tmp_path / "codex", running)
        start = time.time()
        first = await session.exec(fake, LIMIT_RUN_TIMEOUT)
        await running.service.ledger.flush()
        first_rows = usage_rows(tmp_path)
        first_connections = session.connections
        upstream_turns = len(fake.requests)
        second = await session.exec(fake, LIMIT_RUN_TIMEOUT)
        await running.service.ledger.flush()
        second_rows = usage_rows(tmp_path)[len(first_rows):]
        metric = refusals(running, "budget_per_month")
    finally:
        await running.stop()
    refused = _refused(second_rows, "insufficient_quota")
    context = (
        f"\n### codex {version}, budget_per_month = 0.001"
        + _shown("run 1 (spends the budget)", first, first_rows, first_connections, start)
        + _shown("run 2 (budget spent)", second, second_rows, session.connections - first_connections, start)
        + f"\n--- cch_key_refusals_total{{reason=budget_per_month}}: {metric}"
    )
    print(context)
    record_property("quota_refusals", len(refused))

    assert first.code == 0 and EXPECTED_TEXT in first.stdout, context
    assert [r["status"] for r in first_rows] == ["completed", "completed"], context
    assert sum(r["cost"] for r in first_rows) == pytest.approx(TURN_COST), context
    assert second.code not in (0, None), context
    # A usage limit with resets_at: Codex says when the budget resets (not "Quota exceeded").
    assert "usage limit" in second.stderr and "Try again at" in second.stderr, context
    assert len(fake.requests) == upstream_turns, context  # nothing reached upstream
    assert second_rows == refused and metric == len(refused), context
    # Not retried: at most the warm-up and the turn, each refused once.
    assert 1 <= len(refused) <= 2, context
