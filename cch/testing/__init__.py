"""Test helpers for cch and for users' own tests: a scriptable fake Responses upstream.

    fake = FakeUpstream()
    await fake.listen(reactor)
    fake.enqueue(drop_after(events, 3))
    ...  # point the code under test at fake.base_url / fake.ws_url
    await fake.stop()
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
