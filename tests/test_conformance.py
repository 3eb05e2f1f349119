"""RFC 6455 conformance (docs/conformance.md).

Always on: the echo-mode edge that the conformance run uses is the production edge with
only ``onMessage`` swapped: the same factory options (built by ``EdgeFactory.__init__``),
the same protocol class, served through the production resource tree.

Opt-in (``CCH_CONFORMANCE=1``): the Autobahn|Testsuite run, ``scripts/conformance.sh``: every
case but 9.* (performance) and, of the permessage-deflate groups 12.* and 13.*, the subcases
:data:`DEFLATE_SUBCASES` of every subgroup (355 cases, about 80 s here once the suite's Python
2.7 virtualenv exists, 30 s more when it must be made). The other deflate subcases send 1000
messages of 64 or 128 KiB each and take 10 minutes more; they run with
``CCH_CONFORMANCE_CASES='12.*,13.*' scripts/conformance.sh`` (docs/conformance.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock

from cch.config import LimitsConfig
from cch.edge.conformance import (
    EchoEdgeFactory,
    EchoEdgeProtocol,
    NoTunnel,
    build_echo_factory,
    build_site,
    compression_accepted,
)
from cch.edge.factory import EdgeFactory
from cch.edge.protocol import EdgeProtocol
from cch.testing.client import ResponsesWSClient

ROOT = Path(__file__).resolve().parent.parent

# Of each permessage-deflate subgroup (12.1-12.5: five kinds of data; 13.1-13.7: seven
# offer/accept pairs), 1000 messages of 16 B to 32 KiB each, whole (1-8), and of 8 KiB cut into
# 256-octet fragments (11).
DEFLATE_SUBCASES = (*range(1, 9), 11)
DEFLATE_CASES = [
    f"{group}.{sub}.{case}" for group, subgroups in ((12, 5), (13, 7)) for sub in range(1, subgroups + 1) for case in DEFLATE_SUBCASES
]
# Every group but 9 (limits/performance, CCH_CONFORMANCE_PERF=1) and the deflate subset.
CASES = ",".join([*(f"{group}.*" for group in (1, 2, 3, 4, 5, 6, 7, 10)), *DEFLATE_CASES])

# Factory attributes that are state, not protocol options.
_NOT_OPTIONS = {"_batched_timer", "reactor"}


def _option_names() -> list[str]:
    """Every attribute a plain Autobahn server factory has: its protocol options (set by
    ``resetProtocolOptions``) and its session parameters."""
    return sorted(set(vars(WebSocketServerFactory())) - _NOT_OPTIONS)


def _production(limits: LimitsConfig) -> EdgeFactory:
    return EdgeFactory(tunnel=NoTunnel(), limits=limits, clock=Clock(), reactor=global_reactor)


@pytest.mark.parametrize(
    "limits",
    [
        LimitsConfig(),
        LimitsConfig(
            max_message_bytes=4096,
            auto_ping_interval=7.0,
            auto_ping_timeout=3.0,
            websocket_compression_window_bits=9,
        ),
        LimitsConfig(websocket_compression=False),
    ],
    ids=["default", "custom", "no-compression"],
)
def test_echo_factory_options_equal_edge_factory(limits: LimitsConfig) -> None:
    production = _production(limits)
    echo = build_echo_factory(limits, reactor=global_reactor)
    names = _option_names()
    assert "maxMessagePayloadSize" in names and "perMessageCompressionAccept" in names
    for name in names:
        # perMessageCompressionAccept included: a value (cch.wsframes.DeflateAccept) or the
        # one module-level refusal, so equal options answer offers alike.
        assert getattr(echo, name) == getattr(production, name), name
    assert echo.maxMessagePayloadSize == limits.max_message_bytes
    assert echo.autoPingInterval == limits.auto_ping_interval
    assert echo.failByDrop is False and echo.echoCloseCodeReason is True
    accepted = compression_accepted(production)
    assert compression_accepted(echo) is accepted is limits.websocket_compression


def test_echo_edge_is_the_production_edge_with_onmessage_swapped() -> None:
    assert issubclass(EchoEdgeFactory, EdgeFactory)
    assert EchoEdgeFactory.protocol is EchoEdgeProtocol
    assert issubclass(EchoEdgeProtocol, EdgeProtocol)
    # Nothing that sets options may be overridden, so they cannot drift.
    for name in ("__init__", "setProtocolOptions", "resetProtocolOptions"):
        assert name not in vars(EchoEdgeFactory), name
    # Framing, close and failure handling stay the production protocol's.
    assert set(vars(EchoEdgeProtocol)) - {"__module__", "__doc__", "__annotations__"} == {
        "_open",
        "onMessage",
        "onClose",
    }


@pytest_twisted.ensureDeferred
async def test_echo_edge_echoes_text_and_binary_through_the_production_site() -> None:
    factory = build_echo_factory(reactor=global_reactor)
    port = global_reactor.listenTCP(0, build_site(factory), interface="127.0.0.1")
    try:
        url = f"ws://127.0.0.1:{port.getHost().port}/v1/responses"
        client = await ResponsesWSClient.connect(global_reactor, url)
        assert len(factory.live) == 1
        client.send_text("héllo")
        assert await client.recv() == "héllo"
        client.send_bytes(b"\x00\xffbin")
        assert await client.recv() == b"\x00\xffbin"
        info = await client.close(1000)
        assert (info.code, info.was_clean) == (1000, True)
        await factory.wait_empty()
    finally:
        await port.stopListening()


@pytest.mark.skipif(os.environ.get("CCH_CONFORMANCE") != "1", reason="set CCH_CONFORMANCE=1 to run the Autobahn|Testsuite")
def test_autobahn_testsuite_conformance() -> None:
    assert compression_accepted(build_echo_factory(reactor=global_reactor))  # else 12.*/13.* would not run
    env = dict(os.environ, CCH_PYTHON=sys.executable, CCH_CONFORMANCE_CASES=CASES)
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "conformance.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"{summary}\n{run.stderr[-4000:]}"
    m = re.fullmatch(r"conformance: (\d+) OK, (\d+) NON-STRICT, (\d+) INFORMATIONAL, (\d+) FAILED", summary)
    assert m is not None, run.stdout
    ok, non_strict, informational, failed = map(int, m.groups())
    assert failed == 0
    # Every case of groups 1-7 and 10, and the deflate subset, ran.
    assert ok + non_strict + informational >= 247 + len(DEFLATE_CASES)
