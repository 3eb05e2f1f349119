"""The twistd plugins for real: `twistd -n cch ...` and `twistd -n cch-fake-upstream ...` run in
a child process with a minimal, explicit environment.

Every wait is on the child's output or exit, bounded by a timeout so a hung child fails the test
instead of hanging CI; every child still running at the end is killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from cch.sse import SSEDecoder
from cch.testing.client import ResponsesWSClient

TIMEOUT = 30  # seconds; generous, only ever reached by a broken or hung child
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"


@dataclass(frozen=True)
class Ended:
    exit_code: int | None  # None when a signal ended the process
    signal: int | None


class Child(ProcessProtocol):
    """A child process's output as lines, and its end, as Deferreds."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.reason: Ended | None = None
        self._partial = {1: b"", 2: b""}
        self._line_waiters: list[tuple[re.Pattern[str], Deferred[re.Match[str]]]] = []
        self._end_waiters: list[Deferred[Ended]] = []

    # ProcessProtocol
    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *complete, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(b"\n")
        for raw in complete:
            self._line(raw.decode("utf-8", "replace").rstrip("\r"))

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        for fd, rest in self._partial.items():
            if rest:
                self._partial[fd] = b""
                self._line(rest.decode("utf-8", "replace"))
        assert reason.check(ProcessDone, ProcessTerminated), reason
        self.reason = Ended(reason.value.exitCode, reason.value.signal)
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(self.reason)
        lines, self._line_waiters = self._line_waiters, []
        for pattern, d in lines:
            d.errback(
                AssertionError(f"child ended without printing {pattern.pattern!r}:\n{self.output}")
            )

    def _line(self, line: str) -> None:
        self.lines.append(line)
        for entry in list(self._line_waiters):
            match = entry[0].search(line)
            if match is not None:
                self._line_waiters.remove(entry)
                entry[1].callback(match)

    # API
    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def running(self) -> bool:
        return self.reason is None

    def wait_for(self, pattern: str) -> Deferred[re.Match[str]]:
        """The first output line (stdout or stderr) matching ``pattern``, as a regex match."""
        compiled = re.compile(pattern)
        for line in self.lines:
            if match := compiled.search(line):
                d: Deferred[re.Match[str]] = Deferred()
                d.callback(match)
                return d
        if not self.running:
            raise AssertionError(f"child ended without printing {pattern!r}:\n{self.output}")
        entry: tuple[re.Pattern[str], Deferred[re.Match[str]]]

        def cancel(_: Deferred[Any]) -> None:
            if entry in self._line_waiters:
                self._line_waiters.remove(entry)

        d = Deferred(cancel)
        entry = (compiled, d)
        self._line_waiters.append(entry)
        return d.addTimeout(TIMEOUT, reactor)

    def wait_ended(self) -> Deferred[Ended]:
        """How the child ended: its exit code, or the signal that ended it."""
        if self.reason is not None:
            done: Deferred[Ended] = Deferred()
            done.callback(self.reason)
            return done
        d: Deferred[Ended] = Deferred(lambda d: self._end_waiters.remove(d))
        self._end_waiters.append(d)
        return d.addTimeout(TIMEOUT, reactor)

    def terminate(self) -> Deferred[Ended]:
        assert self.transport is not None
        self.transport.signalProcess("TERM")
        return self.wait_ended()


@pytest_twisted.async_yield_fixture
async def twistd(tmp_path: Path) -> Any:
    """Start ``twistd ARGS`` in ``tmp_path``; children still running at teardown are killed."""
    children: list[Child] = []

    def start(*args: str) -> Child:
        child = Child()
        env = {"PATH": os.environ.get("PATH", os.defpath)}
        argv = [sys.executable, "-c", TWISTD, *args]
        reactor.spawnProcess(child, sys.executable, argv, env=env, path=str(tmp_path))
        children.append(child)
        return child

    yield start
    for child in children:
        if child.running:
            assert child.transport is not None
            child.transport.signalProcess("KILL")
        await child.wait_ended()


def create(**fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "response.create",
        "model": "gpt-5.5",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hello there"}],
            }
        ],
    }
    frame.update(fields)
    return frame


# --- twistd -n cch --demo -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_demo_serves_two_chained_turns_then_drains_and_stops_on_sigterm(twistd: Any) -> None:
    child = twistd("-n", "--pidfile=", "cch", "--demo", "--listen", LOOPBACK_ANY_PORT)
    match = await child.wait_for(r"cch demo is up: (ws://127\.0\.0\.1:\d+/v1/responses)\s*$")
    client = await ResponsesWSClient.connect(reactor, match.group(1))
    try:
        client.send_json(create(store=True))
        first = await client.recv_turn()
        assert first[0]["type"] == "response.created"
        assert first[-1]["type"] == "response.completed"
        first_id = first[-1]["response"]["id"]
        client.send_json(create(store=True, previous_response_id=first_id))
        second = await client.recv_turn()
        assert second[-1]["type"] == "response.completed"
        assert second[-1]["response"]["previous_response_id"] == first_id
        text = "".join(e["delta"] for e in second if e["type"] == "response.output_text.delta")
        assert text == "echo: hello there"
        assert client.close_info is None

        # SIGTERM: the idle client is told the gateway is going away, then the process ends.
        ended = child.terminate()
        info = await client.wait_closed().addTimeout(TIMEOUT, reactor)
        assert (info.code, info.reason) == (1001, "going_away")
        reason = await ended
    finally:
        if client.close_info is None:
            await client.abort()
    # twistd shuts down cleanly, then re-raises the signal so a supervisor sees why it stopped
    # (twisted.scripts.twistd.runApp -> app._exitWithSignal): killed by SIGTERM, not exit 0.
    assert "Server Shut Down." in child.output
    assert reason == Ended(exit_code=None, signal=signal.SIGTERM)
    assert "Traceback" not in child.output


# --- start-up refusals ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_config_file_with_unknown_key_exits_nonzero_with_one_line_naming_file_and_key(
    twistd: Any, tmp_path: Path
) -> None:
    path = tmp_path / "cch.toml"
    path.write_text(
        '[server]\nlisten = "tcp:0:interface=127.0.0.1"\nlisen_backlog = 5\n\n'
        '[[providers]]\nname = "p"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    child = twistd("-n", "--pidfile=", "cch", "--config", str(path))
    ended = await child.wait_ended()
    assert ended.exit_code not in (0, None), ended
    naming = [line for line in child.lines if str(path) in line and "server.lisen_backlog" in line]
    assert len(naming) == 1, child.output
    assert "unknown key" in naming[0]
    assert "Traceback" not in child.output
    assert "starting on" not in child.output


@pytest.mark.parametrize("source", ["demo", "config"])
@pytest_twisted.ensureDeferred
async def test_listening_on_all_interfaces_without_keys_is_refused_with_a_message_about_keys(
    twistd: Any, tmp_path: Path, source: str
) -> None:
    if source == "demo":
        args = ["--demo"]
    else:
        path = tmp_path / "cch.toml"
        path.write_text('[[providers]]\nname = "p"\nbase_url = "http://127.0.0.1:9/v1"\n')
        args = ["--config", str(path)]
    child = twistd("-n", "--pidfile=", "cch", *args, "--listen", "tcp:0")
    ended = await child.wait_ended()
    assert ended.exit_code not in (0, None), ended
    refusal = [line for line in child.lines if "tcp:0" in line and "[[keys]]" in line]
    assert len(refusal) == 1, child.output
    assert "--listen" in refusal[0]
    assert "interface=127.0.0.1" in refusal[0]  # says how to bind loopback instead
    assert "Traceback" not in child.output
    assert "starting on" not in child.output


# --- twistd -n cch-fake-upstream --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fake_upstream_plugin_serves_post_v1_responses(twistd: Any) -> None:
    child = twistd("-n", "--pidfile=", "cch-fake-upstream", "--listen", LOOPBACK_ANY_PORT)
    port = (await child.wait_for(r"Site starting on (\d+)")).group(1)
    url = f"http://127.0.0.1:{port}/v1/responses"
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        streamed = await http.post(url, json={**create(), "stream": True}).addTimeout(
            TIMEOUT, reactor
        )
        assert streamed.code == 200
        assert streamed.headers.getRawHeaders("content-type") == ["text/event-stream"]
        events = [json.loads(data) for data in SSEDecoder().feed(await treq.content(streamed))]
        assert events[0]["type"] == "response.created"
        assert events[-1]["type"] == "response.completed"
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == "echo: hello there"

        plain = await http.post(url, json=create()).addTimeout(TIMEOUT, reactor)
        assert plain.code == 200
        body = json.loads(await treq.content(plain))
        assert (body["object"], body["status"]) == ("response", "completed")
    finally:
        await pool.closeCachedConnections()
    reason = await child.terminate()
    assert "Server Shut Down." in child.output
    assert reason == Ended(exit_code=None, signal=signal.SIGTERM)
