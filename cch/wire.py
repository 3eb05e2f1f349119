"""Facts of the Responses wire, each in one place: event types and the terminal set, the error
event and the JSON error body the gateway writes itself, and a turn's body from the client's
frame towards an upstream.

Every module that needs one of these imports it from here; a second copy is a bug waiting for
the first change.
"""

from __future__ import annotations

import json
from typing import Any

from cch.jsoncodec import dumps, dumps_bytes, loads

TERMINAL_EVENT_TYPES = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
"""Events that end a turn; none of them closes the client connection."""

CONNECTION_LIMIT = "websocket_connection_limit_reached"
"""The error code of an upstream socket that reached its connection-age cap."""

PREVIOUS_NOT_FOUND = "previous_response_not_found"
"""The error code that makes Codex resend its full context."""


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


_last_response: tuple[str, dict[str, Any] | None] = ("", None)


def response_of(data: str) -> dict[str, Any] | None:
    """The ``response`` object of an event (a terminal's, ``response.created``'s), or None.

    The transcript and the usage meter both read a turn's terminal event: the last one parsed is
    kept (by identity), so the second reader does not parse it again."""
    global _last_response
    seen, response = _last_response
    if seen is data:
        return response
    try:
        value = loads(data)
    except ValueError:
        value = None
    response = value.get("response") if isinstance(value, dict) else None
    response = response if isinstance(response, dict) else None
    _last_response = (data, response)
    return response


def error_event(
    code: str,
    message: str,
    *,
    status: int | None = None,
    kind: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> str:
    """The one ``error`` event (WebSocket frame or SSE data) the gateway writes itself:
    ``{"type":"error"[,"status"],"error":{["type",]"code","message"[,"param"]}[,"headers"]}``.

    ``status`` and ``headers`` are what Codex reads to tell a rate limit (and its
    ``retry-after``) from a failure; ``kind`` is the OpenAI error type; ``extra`` fields join
    the error object (``resets_at`` of a usage limit).
    """
    frame: dict[str, Any] = {"type": "error"}
    if status is not None:
        frame["status"] = status
    error: dict[str, Any] = {"type": kind} if kind is not None else {}
    error["code"] = code
    error["message"] = message
    if param is not None:
        error["param"] = param
    error.update(extra)
    frame["error"] = error
    if headers:
        frame["headers"] = headers
    return dumps(frame)


def error_event_from_body(body: bytes) -> str:
    """The ``error`` event carrying the error object of a JSON error body (:func:`error_body`)."""
    return dumps({"type": "error", **loads(body)})


def error_body(message: str, type_: str, code: str | None, **extra: Any) -> bytes:
    """The bytes of an OpenAI-style JSON error: ``{"error":{"message","type","code",...}}``."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    error.update(extra)
    return json.dumps({"error": error}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_too_large(limit: int) -> tuple[str, str]:
    """Code and message of the error that ends a turn when one upstream event (an SSE event or
    a WebSocket message) is over ``limits.max_upstream_event_bytes``: HTTP and WebSocket
    upstreams report it alike."""
    return "upstream_event_too_large", f"an upstream event exceeded the gateway's limit of {limit} bytes"


def error_code(data: str | bytes) -> str | None:
    """``error.code`` of an error event or a JSON error body, or None."""
    try:
        value = loads(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    except ValueError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def is_connection_limit(data: str) -> bool:
    """Is this the error of an upstream socket at its connection-age cap?"""
    return CONNECTION_LIMIT in data and error_code(data) == CONNECTION_LIMIT


def is_previous_not_found(data: str | bytes) -> bool:
    """Does this event or JSON error body say the upstream lost ``previous_response_id``?"""
    marker = PREVIOUS_NOT_FOUND if isinstance(data, str) else PREVIOUS_NOT_FOUND.encode()
    return marker in data and error_code(data) == PREVIOUS_NOT_FOUND  # type: ignore[operator]


def previous_not_found(response_id: str) -> str:
    """The canonical error event for a ``previous_response_id`` nobody can serve any more."""
    return error_event(
        PREVIOUS_NOT_FOUND,
        f"Previous response with id '{response_id}' not found.",
        kind="invalid_request_error",
        param="previous_response_id",
    )


# -- a turn's body -----------------------------------------------------------------------------
# ``type`` names the WebSocket frame and ``background`` is refused by a streaming gateway; neither
# belongs to the Responses request a turn makes, and every turn streams
# (docs/reference-behaviour.md, "Inbound frames and the queue"). Key order is kept, so the bytes an
# upstream receives are the client's, less those fields.

FRAME_ONLY = ("type", "background")
"""Fields of a client frame that describe the frame or the transport, not the request."""


def turn_body(fields: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The Responses request of a turn: ``fields`` less :data:`FRAME_ONLY`, ``model`` filled in
    when the frame has none (the ``?model=`` fallback), and ``stream`` true."""
    body = dict(fields)  # copied whole, then trimmed: the same order, faster than a filter
    for name in FRAME_ONLY:
        body.pop(name, None)
    if model and body.get("model") in (None, ""):
        body["model"] = model
    body["stream"] = True
    return body


def upstream_ws_frame(body: dict[str, Any]) -> bytes:
    """The frame for an upstream Responses WebSocket (UTF-8): ``type`` first, then the body less
    what only HTTP or the client's frame carries (docs/reference-behaviour.md, "The upstream
    WebSocket pool")."""
    # Copied whole, then trimmed (as turn_body): "type" stays first, with the frame's own value.
    frame: dict[str, Any] = {"type": "response.create", **body}
    frame["type"] = "response.create"
    for name in _NOT_IN_UPSTREAM_FRAME:
        frame.pop(name, None)
    return dumps_bytes(frame)


_NOT_IN_UPSTREAM_FRAME = tuple(name for name in ("stream", *FRAME_ONLY) if name != "type")
