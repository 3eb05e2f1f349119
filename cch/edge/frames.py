"""Client frames in, WebSocket frames out: validation, error frames and SSE translation.

Pure functions (no transport, no state) so every rule of
docs/reference-behaviour.md#inbound-frames-and-the-queue, docs/reference-behaviour.md#error-frames
and docs/reference-behaviour.md#sse-parsing can be tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cch.jsoncodec import dumps, loads
from cch.wire import TERMINAL_EVENT_TYPES, turn_body


class FrameRejected(Exception):
    """A text frame that is not a usable ``response.create``; the connection stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _js_string(value: Any) -> str:
    """How JavaScript's ``String(value)`` prints a parsed JSON value (for the error text)."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict):
        return "[object Object]"
    if isinstance(value, list):
        return ",".join("" if v is None else _js_string(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parse_client_frame(text: str, query_model: str | None) -> dict[str, Any]:
    """Turn a client text frame into the body of the internal request.

    Raises :class:`FrameRejected` with ``invalid_json``, ``invalid_frame`` or
    ``unsupported_event_type``. The body is the frame minus ``type``, ``background`` and
    ``stream_id``, with the ``?model=`` fallback applied and ``stream`` forced true.
    """
    return create_body(load_client_frame(text), query_model)


def load_client_frame(text: str) -> Any:
    """The parsed frame; :class:`FrameRejected` ``invalid_json`` when it is not JSON."""
    try:
        return loads(text)
    except ValueError as exc:
        detail = getattr(exc, "msg", None) or "parse error"
        raise FrameRejected("invalid_json", f"Invalid JSON frame: {detail}") from None


def frame_type(frame: Any) -> Any:
    """The ``type`` of a parsed frame (None unless it is an object with one)."""
    return frame.get("type") if isinstance(frame, dict) else None


def create_body(frame: Any, query_model: str | None) -> dict[str, Any]:
    """The internal request's body of a parsed frame, checked in the reference's order
    (docs/reference-behaviour.md#inbound-frames-and-the-queue)."""
    if frame is None or isinstance(frame, (bool, int, float, str)):
        raise FrameRejected("invalid_frame", "Frame must be a JSON object")
    event_type = frame_type(frame)
    if event_type != "response.create":
        raise FrameRejected("unsupported_event_type", unsupported_message(event_type))
    return turn_body(frame, query_model)


def unsupported_message(event_type: Any) -> str:
    """The ``unsupported_event_type`` message, naming the type as JavaScript prints it."""
    shown = "(missing)" if event_type is None else _js_string(event_type)
    return f"Only type=response.create is supported; received: {shown}"


@dataclass(frozen=True, slots=True)
class OutFrame:
    """One frame for the client and, when it ends the turn, the terminal event type; ``kind``
    is the event's type when it is a JSON object event."""

    text: str
    terminal: str | None = None
    kind: str | None = None


DONE_FRAME = OutFrame('{"type":"response.completed","response":null}', "response.completed")


def translate_sse_data(data: str) -> OutFrame:
    """Map one SSE event's data text to the client frame (docs/reference-behaviour.md#sse-parsing).

    JSON objects and arrays are forwarded byte for byte as the upstream wrote them (the
    reference re-serialises; same JSON value, fewer surprises); a JSON string is sent as its
    raw value; other JSON scalars as their text; non-JSON data becomes an
    ``output_text.delta``. ``[DONE]`` is handled by the caller.
    """
    try:
        value = loads(data)
    except ValueError:
        return OutFrame(dumps({"type": "response.output_text.delta", "delta": data}))
    if isinstance(value, dict):
        event_type = value.get("type")
        if not isinstance(event_type, str):
            return OutFrame(data)
        return OutFrame(data, event_type if event_type in TERMINAL_EVENT_TYPES else None, event_type)
    if isinstance(value, str):
        return OutFrame(value)
    return OutFrame(data)


def _js_truthy(value: Any) -> bool:
    """JavaScript truthiness of a parsed JSON value ({} and [] are true)."""
    if isinstance(value, (dict, list)):
        return True
    return bool(value)


def translate_json_response(status: int, body: bytes) -> OutFrame:
    """Map a complete non-SSE internal response to one terminal frame
    (docs/reference-behaviour.md#error-frames)."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed: Any = loads(text)
    except ValueError:
        parsed = {"raw": text}
    if status >= 400:
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if not _js_truthy(error):
            error = {"code": f"http_{status}", "message": text[:512]}
        return OutFrame(dumps({"type": "error", "status": status, "error": error}), "error")
    return OutFrame(dumps({"type": "response.completed", "response": parsed}), "response.completed")
