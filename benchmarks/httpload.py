"""The load client's HTTP twin: Codex-like turns POSTed to the fake upstream, answered as SSE.

The ``direct`` baseline talks to the fake upstream over WebSocket; ``inproc-http`` makes the
gateway talk to it over HTTP, which costs the fake upstream itself more per turn (a
``twisted.web`` request, headers, a chunk per event) than a WebSocket frame. Measured here, in
the same run, the time to first event of the fake upstream's own HTTP answer lets the report
say what the gateway adds to an HTTP upstream's first event, apart from what HTTP costs the
upstream (docs/benchmarks.md). The client is the gateway's own (``cch.httpclient``): one write
per request, one pass per read. Each turn replays its conversation as input, as the gateway
does for an HTTP upstream (``store: false`` responses are not kept across HTTP requests).
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from benchmarks.load import (
    TERMINAL,
    Conversation,
    LoadConfig,
    TurnFailed,
    TurnResult,
    event_type,
    one_after_another,
)
from cch.httpclient import HttpClient

HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class _Events(Protocol):
    """Reads one SSE body; fires ``done`` with the turn's result at its terminal event."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first = 0.0
        self.events = 0
        self.buffer = b""
        self.done: Deferred[TurnResult] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].lstrip(b" ")
                self.events += 1
                if self.events == 1:
                    self.first = now
                kind = event_type(payload)
                if kind in TERMINAL and not self.done.called:
                    self.done.callback(
                        TurnResult(self.first - self.t0, now - self.t0, self.events, kind, payload)
                    )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(TurnFailed(f"body ended before a terminal event: {reason.value!r}"))


async def turn(client: HttpClient, url: str, frame: bytes) -> TurnResult:
    """POST one turn (the frame less its ``type``) and read its events."""
    body = json.loads(frame)
    body.pop("type", None)
    payload = json.dumps(body, separators=(",", ":")).encode()
    t0 = time.perf_counter()
    response = await client.post(url, HEADERS, payload)
    if response.code != 200:
        raise TurnFailed(f"HTTP {response.code}")
    events = _Events(t0)
    response.deliverBody(events)
    return await events.done


async def sequential(
    reactor: Any,
    url: str,
    config: LoadConfig,
    turns: int,
    warmup: int,
    time_limit: float,
    pids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """``load.sequential`` over HTTP: one kept-alive connection, ``turns`` measured turns."""
    deadline = time.monotonic() + time_limit
    client = HttpClient(reactor)
    try:
        return await one_after_another(
            lambda frame: turn(client, url, frame),
            Conversation(config, "seq-http"),
            turns,
            warmup,
            deadline,
            pids,
            replay=True,
        )
    finally:
        await client.close()
