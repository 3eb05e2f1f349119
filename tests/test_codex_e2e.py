"""Opt-in end-to-end test with the real OpenAI Codex CLI (``CCH_CODEX_E2E=1``).

A real gateway runs in-process on 127.0.0.1 in front of the fake upstream (over WebSocket);
``codex exec`` from the npm package ``@openai/codex`` talks to it as a user's Codex would, with
the provider block of docs/codex.md. See docs/codex.md ("The end-to-end test") for how to run
it and what it checks.

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
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import gateway_config, start_gateway
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from cch.testing import FakeUpstream

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
        binary = Path(given).expanduser()
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
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # A child of the child may still hold the pipes; stop waiting for them.
        self.transport.loseConnection()


async def run_process(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Finished:
    """Run ``argv`` to its end, killing it after ``timeout`` seconds (then TimeoutError)."""
    proto = _Collector()
    started = time.monotonic()
    reactor.spawnProcess(proto, argv[0], argv, env=env, path=str(cwd))
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
    except TimeoutError:
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
