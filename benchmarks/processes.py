"""Child processes of a benchmark run: the fake upstream and the gateway, each on its own.

Both listen on port 0 (other programs on the machine may hold any fixed port) and say where
they listen on stdout: the upstream prints ``{"ready": true, "port": N}``, the gateway logs its
``server_listening`` event. Output goes to a log file in the run's work directory. Every wait
is bounded; :meth:`Child.stop` ends the process by its pid (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater

REPO = Path(__file__).resolve().parent.parent


class ChildFailed(Exception):
    """A child process exited or did not get ready in time."""


def child_env(extra: dict[str, str] | None = None, src: Path = REPO) -> dict[str, str]:
    """The environment of a child: ours minus every CCH_* setting (a stray override would
    change what is measured), plus ``extra``; ``src`` (the cch under test) first on the import
    path, then this checkout (for ``benchmarks``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCH_")}
    paths = dict.fromkeys([str(src), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


class Child:
    """One spawned process with its output in ``workdir/<name>.log``, run in ``workdir`` (so
    what it writes, the usage ledger's SQLite file included, goes there) with ``src`` (the cch
    source tree under test) first on its import path."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        env: dict[str, str] | None = None,
        src: Path = REPO,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env, src),
            cwd=workdir,
        )
        self._offset = 0
        self._partial = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _new_lines(self) -> list[bytes]:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return lines

    async def wait_for(
        self, reactor: Any, find: Callable[[dict[str, Any]], Any], timeout: float
    ) -> Any:
        """Poll the output for a JSON line ``find`` returns something for; return that."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self._new_lines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    found = find(obj)
                    if found is not None:
                        return found
            if self.popen.poll() is not None:
                raise ChildFailed(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} not ready after {timeout:g}s:\n{self.tail()}")
            await deferLater(reactor, 0.05, lambda: None)

    async def stop(self, reactor: Any, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful stop: cProfile writes its file, the gateway drains), then
        SIGKILL after ``timeout`` seconds."""
        if self.popen.poll() is None:
            self.popen.terminate()
            deadline = time.monotonic() + timeout
            while self.popen.poll() is None and time.monotonic() < deadline:
                await deferLater(reactor, 0.05, lambda: None)
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    async def signal_for_file(
        self, reactor: Any, signum: int, path: Path, timeout: float = 30.0
    ) -> bool:
        """Send ``signum`` and wait until ``path`` exists (e.g. a profile being written)."""
        if path.exists():
            path.unlink()
        if self.popen.poll() is not None:
            return False
        os.kill(self.pid, signum)
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline and self.popen.poll() is None:
            await deferLater(reactor, 0.05, lambda: None)
        return path.exists()

    def kill(self) -> None:
        """Last resort (the run is being abandoned): SIGKILL this child if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()


async def start_upstream(
    reactor: Any,
    workdir: Path,
    name: str,
    *,
    events: int,
    delta_bytes: int,
    delay: float,
    port: int = 0,
    src: Path = REPO,
) -> tuple[Child, int]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.upstream",
        "--port",
        str(port),
        "--events",
        str(events),
        "--delta-bytes",
        str(delta_bytes),
        "--delay",
        repr(delay),
    ]
    child = Child(name, argv, workdir, src=src)
    return child, await port_when_ready(reactor, child, upstream_ready(name))


async def start_relay(
    reactor: Any, workdir: Path, name: str, *, upstream_port: int, src: Path = REPO
) -> tuple[Child, int]:
    """A bare TCP relay (``benchmarks.relay``) in front of the fake upstream at ``upstream_port``."""
    argv = [sys.executable, "-m", "benchmarks.relay", "--upstream-port", str(upstream_port)]
    child = Child(name, argv, workdir, src=src)
    return child, await port_when_ready(reactor, child, upstream_ready(name))


def upstream_ready(name: str) -> Callable[[dict[str, Any]], int | None]:
    """Reads a fake upstream's ready line: its port, or why it could not start."""

    def ready(obj: dict[str, Any]) -> int | None:
        if obj.get("ready") is False:
            raise ChildFailed(f"{name}: {obj.get('error')}")
        return obj.get("port") if obj.get("ready") else None

    return ready


async def port_when_ready(
    reactor: Any, child: Child, ready: Callable[[dict[str, Any]], int | None], timeout: float = 30.0
) -> int:
    """The port ``ready`` finds in the child's output; a child that never gets there is killed."""
    try:
        return await child.wait_for(reactor, ready, timeout)
    except BaseException:
        child.kill()
        raise


# The limits of the keyed targets' client key: every limit a turn is counted against
# (docs/configuration.md#key_defaults--per-key-limits), each far above what a benchmark reaches,
# so that the limits are counted on every turn and never refuse one.
KEY_LIMITS: dict[str, int] = {
    "max_concurrent_turns": 100_000,
    "requests_per_minute": 1_000_000_000,
    "tokens_per_minute": 1_000_000_000_000,
}
KEY_NAME = "bench"


@dataclass(frozen=True)
class KeyedGateway:
    """A gateway with one client key holding :data:`KEY_LIMITS`: counted in memory, or in the
    Redis at ``redis`` under ``key_prefix`` (``[cluster]``). ``admin_token`` opens its
    ``/metrics`` (a gateway with keys serves it only with the token)."""

    key: str = field(repr=False)
    admin_token: str = field(repr=False)
    redis: str | None = None
    key_prefix: str | None = None

    def __post_init__(self) -> None:
        if (self.redis is None) != (self.key_prefix is None):
            raise ValueError("redis and key_prefix go together")


def gateway_toml(
    upstream_port: int,
    *,
    tunnel: str,
    websocket: str,
    secret: str,
    max_socket_age: float | None = None,
    usage_database: str | None = None,
    keyed: KeyedGateway | None = None,
) -> str:
    """A gateway config: one provider at the benchmark upstream, defaults elsewhere (the usage
    ledger too: SQLite in the working directory); ``usage_database`` sets ``[usage] database``
    (cch before the ledger knows no such table); ``keyed`` adds the client key with its limits
    and, for the cluster target, ``[cluster]``."""
    lines = [
        "[server]",
        'listen = "tcp:0:interface=127.0.0.1"',
        "drain_timeout = 2.0",
    ]
    if keyed is not None:
        lines.append(f'admin_token = "{keyed.admin_token}"')
    lines += [
        "",
        "[[providers]]",
        'name = "bench"',
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"',
        f'websocket = "{websocket}"',
        "",
        "[tunnel]",
        f'mode = "{tunnel}"',
        f'secret = "{secret}"',
    ]
    if usage_database is not None:
        lines += ["", "[usage]", f'database = "{usage_database}"']
    if max_socket_age is not None:
        lines += ["", "[upstream_websocket]", f"max_socket_age = {max_socket_age!r}"]
    if keyed is not None:
        lines += ["", "[[keys]]", f'name = "{KEY_NAME}"', f'key = "{keyed.key}"']
        lines += [f"{name} = {value}" for name, value in KEY_LIMITS.items()]
        if keyed.redis is not None:
            lines += [
                "",
                "[cluster]",
                f"redis = {json.dumps(keyed.redis)}",  # a TOML basic string
                f'key_prefix = "{keyed.key_prefix}"',
            ]
    return "\n".join(lines) + "\n"


async def start_gateway(
    reactor: Any,
    workdir: Path,
    name: str,
    config_text: str,
    *,
    log_level: str = "info",
    profile_to: Path | None = None,
    profiler: str = "benchmarks.profiled_gateway",
    src: Path = REPO,
) -> tuple[Child, int]:
    """``python -m cch.cli --config FILE`` (the ``cch`` console script, i.e. ``twistd -n cch``),
    optionally under a profiler: cProfile (``benchmarks.profiled_gateway``) or CPU time per
    block (``benchmarks.timed_gateway``); SIGUSR2 starts it, SIGUSR1 writes ``profile_to``."""
    config = workdir / f"{name}.toml"
    config.write_text(config_text)
    if profile_to is not None:
        argv = [
            sys.executable,
            "-m",
            profiler,
            str(profile_to),
            "--config",
            str(config),
        ]
    else:
        argv = [sys.executable, "-m", "cch.cli", "--config", str(config)]
    child = Child(
        name, argv, workdir, {"CCH_LOG_FORMAT": "json", "CCH_LOG_LEVEL": log_level}, src=src
    )

    def ready(obj: dict[str, Any]) -> int | None:
        return obj.get("port") if obj.get("msg") == "server_listening" else None

    return child, await port_when_ready(reactor, child, ready)
