"""Test helpers for cch and for users' own tests: a scriptable fake Responses upstream.

Listen with `FakeUpstream().listen(reactor)`, point the code under test at `base_url` or
`ws_url`, `enqueue` scripts (`codex_like`, `sse`, `drop_after`, ...), assert on `requests`
and `ws_connections`, and `stop()` it at the end of the test.
"""

from __future__ import annotations

from cch.testing.fake_upstream import FakeUpstream, Recorded, WSConnectionRecord
from cch.testing.scripts import (
    Body,
    Close,
    Delay,
    Drop,
    Event,
    Hold,
    Raw,
    Script,
    Step,
    codex_events,
    codex_like,
    drop_after,
    error_json,
    hold,
    json_response,
    sse,
    ws_close_after,
)

__all__ = [
    "Body",
    "Close",
    "Delay",
    "Drop",
    "Event",
    "FakeUpstream",
    "Hold",
    "Raw",
    "Recorded",
    "Script",
    "Step",
    "WSConnectionRecord",
    "codex_events",
    "codex_like",
    "drop_after",
    "error_json",
    "hold",
    "json_response",
    "sse",
    "ws_close_after",
]
