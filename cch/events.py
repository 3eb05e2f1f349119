"""Facts about Responses events, and the error event the gateway emits itself."""

from __future__ import annotations

from cch.jsoncodec import dumps, loads


def event_type(data: str) -> str | None:
    """The top-level ``type`` of a JSON event, or None (not JSON, not an object, no type).

    Always a full parse: an event is only an event once it all parses (an upstream's garbage
    with a plausible prefix is not a terminal, and the edge forwards it as text). Whoever has
    the type passes it along with the event (``ResponseSink.sse_event(data, kind)``) so it is
    found once per event.
    """
    try:
        value = loads(data)
    except ValueError:
        return None
    if isinstance(value, dict):
        found = value.get("type")
        return found if isinstance(found, str) else None
    return None


def error_event(code: str, message: str) -> str:
    """A terminal ``error`` event the gateway itself emits into a stream."""
    return dumps({"type": "error", "error": {"code": code, "message": message}})


def event_too_large(limit: int) -> tuple[str, str]:
    """Code and message of the error that ends a turn when one upstream event (an SSE event or
    a WebSocket message) is over ``limits.max_upstream_event_bytes``: HTTP and WebSocket
    upstreams report it alike."""
    return "upstream_event_too_large", f"an upstream event exceeded the gateway's limit of {limit} bytes"
