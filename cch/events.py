"""Cheap facts about Responses events without decoding them whole."""

from __future__ import annotations

import re

from cch.jsoncodec import dumps, loads
from cch.turn import TERMINAL_EVENT_TYPES

# Upstreams write "type" first; when they do, the type is read without parsing the event.
_LEADING_TYPE = re.compile(r'\{\s*"type"\s*:\s*"([A-Za-z0-9_.]+)"\s*[,}]')


def leading_type(data: str) -> str | None:
    """The ``type`` of an event object that starts with it (how upstreams write events)."""
    match = _LEADING_TYPE.match(data)
    return match.group(1) if match is not None else None


def event_type(data: str) -> str | None:
    """The top-level ``type`` of a JSON event, or None (not JSON, not an object, no type).

    Fast for the common case (``type`` first, not terminal); a terminal type is only believed
    once the whole event parses, since ending a turn on garbage would lose the real terminal.
    """
    match = _LEADING_TYPE.match(data)
    if match is not None and match.group(1) not in TERMINAL_EVENT_TYPES:
        return match.group(1)
    try:
        value = loads(data)
    except ValueError:
        return None
    if isinstance(value, dict):
        found = value.get("type")
        return found if isinstance(found, str) else None
    return None


def is_terminal(data: str) -> bool:
    """True for ``response.completed|failed|incomplete`` and ``error`` events."""
    return event_type(data) in TERMINAL_EVENT_TYPES


def error_event(code: str, message: str) -> str:
    """A terminal ``error`` event the gateway itself emits into a stream."""
    return dumps({"type": "error", "error": {"code": code, "message": message}})
