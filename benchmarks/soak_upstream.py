"""The soak's fake upstream: ``cch.testing.FakeUpstream`` in its own process, whose default
script misbehaves when a request asks it to.

    python -m benchmarks.soak_upstream --port 0 --events 24 --delta-bytes 16

Every turn gets the Codex-shaped events of the benchmark upstream (``benchmarks.upstream``:
``events - 8`` output_text.delta events of ``delta-bytes`` bytes), unless the request's
``metadata`` names a fault (metadata values are strings, as the API requires):

* ``soak_fault``: one of :data:`FAULTS` (below), anything else plays the turn normally;
* ``soak_at``: how many events go out before the fault (clamped to 1 .. events - 1);
* ``soak_delay_ms``: for ``delay``, how long to pause there (at most 5,000 ms).

The soak (``benchmarks/soak.py``) draws the faults with its seeded RNG and writes them into the
frames, so it knows which turns were meant to fail and which were not; the gateway forwards
``metadata`` untouched (a replayed or retried attempt carries the same fault). Faults that only
make sense on the upstream WebSocket (``ws_drop_first``, ``close_idle``) play normally over HTTP.

Prints ``{"ready": true, "port": N}`` once it listens, like ``benchmarks.upstream`` (and trims
its records every second the same way). 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.upstream import output_text, raise_nofile_limit, serve
from cch.testing import (
    Close,
    Delay,
    Drop,
    Event,
    FakeUpstream,
    Hold,
    Recorded,
    Script,
    Step,
    codex_events,
    json_response,
)
from cch.testing.scripts import SSE_HEADERS

FAULT_KEY = "soak_fault"
AT_KEY = "soak_at"
DELAY_KEY = "soak_delay_ms"

#: fault name -> what the upstream does (and what the client should see).
FAULTS: dict[str, str] = {
    "drop": "TCP reset after `soak_at` events (no close frame / no chunk terminator)",
    "close1011": "WebSocket close 1011 after `soak_at` events (HTTP: the body ends there)",
    "error_event": "an `error` event after `soak_at` events, then the turn ends",
    "stall": "silence after `soak_at` events: the gateway's idle timeout must end the turn",
    "delay": "a pause of `soak_delay_ms` after `soak_at` events, then the rest (completes)",
    "ws_drop_first": "upstream WS: TCP reset before any event, so the gateway falls back to "
    "HTTP (completes); HTTP: plays normally",
    "close_idle": "upstream WS: the whole turn, then close 1011 while the socket is idle in "
    "the pool (completes); HTTP: plays normally",
}
#: faults after which the turn still ends with response.completed
COMPLETING = frozenset({"delay", "ws_drop_first", "close_idle"})


def fault_of(body: dict[str, Any]) -> tuple[str | None, int, float]:
    """(fault, events before it, delay seconds) as the request asks in its metadata."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        return None, 0, 0.0
    fault = metadata.get(FAULT_KEY)
    if fault not in FAULTS:
        return None, 0, 0.0
    try:
        at = int(metadata.get(AT_KEY, "1"))
    except (TypeError, ValueError):
        at = 1
    try:
        delay_ms = float(metadata.get(DELAY_KEY, "0"))
    except (TypeError, ValueError):
        delay_ms = 0.0
    return fault, at, min(max(delay_ms, 0.0), 5000.0) / 1000


def upstream_error(recorded: Recorded) -> dict[str, Any]:
    return {
        "type": "error",
        "status": 500,
        "error": {
            "type": "server_error",
            "code": "soak_injected",
            "message": f"injected upstream error ({recorded.response_id})",
        },
    }


def script_factory(events: int, delta_bytes: int) -> Callable[[Recorded], Script]:
    text = output_text(events, delta_bytes)

    def script(recorded: Recorded) -> Script:
        items = codex_events(recorded, text=text)
        if recorded.transport == "http" and not recorded.body.get("stream"):
            return json_response(200, items[-1]["response"])
        fault, at, delay = fault_of(recorded.body)
        websocket = recorded.transport == "websocket"
        if fault in ("ws_drop_first", "close_idle") and not websocket:
            fault = None
        at = min(max(at, 1), len(items) - 1)
        steps: list[Step] = [Event(item) for item in items]
        if fault == "drop":
            steps = [*steps[:at], Drop()]
        elif fault == "close1011":
            steps = [*steps[:at], Close(1011, "soak: injected") if websocket else Close()]
        elif fault == "error_event":
            steps = [*steps[:at], Event(upstream_error(recorded))]
        elif fault == "stall":
            steps = [*steps[:at], Hold()]
        elif fault == "delay":
            steps = [*steps[:at], Delay(delay), *steps[at:]]
        elif fault == "ws_drop_first":
            steps = [Drop()]
        elif fault == "close_idle":
            steps = [*steps, Close(1011, "soak: idle socket closed")]
        return Script(tuple(steps), headers=SSE_HEADERS)

    return script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak_upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any)")
    parser.add_argument("--events", type=int, default=24, help="events per turn (>= 9)")
    parser.add_argument("--delta-bytes", type=int, default=16, help="bytes of text per delta")
    args = parser.parse_args(argv)
    raise_nofile_limit()

    from twisted.internet import reactor

    fake = FakeUpstream(reactor, id_prefix="resp_soak")
    fake.default = script_factory(args.events, args.delta_bytes)
    return serve(fake, args.port)


if __name__ == "__main__":
    sys.exit(main())
