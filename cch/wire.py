"""Facts of the Responses wire, each in one place: event types and the terminal set, the error
event and the JSON error body the gateway writes itself, and a turn's body from the client's
frame towards an upstream.

Every module that needs one of these imports it from here; a second copy is a bug waiting for
the first change.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cch.jsoncodec import FAST_PARSE, dumps, dumps_bytes, loads, object_type

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
    found once per event. With orjson, its verdict answers for the events nobody reads further
    (the deltas: most of a turn); a terminal or ``response.created``, and whatever orjson
    refuses, get the standard library's parse, whose objects the readers use.
    """
    global _last_response
    if FAST_PARSE and not data.startswith(_RESPONSE_EVENT_OPENINGS):
        kind = object_type(data)
        if kind is not None and kind not in _RESPONSE_EVENTS:
            return kind
    try:
        value = loads(data)
    except ValueError:
        return None
    if isinstance(value, dict):
        found = value.get("type")
        if not isinstance(found, str):
            return None
        if found in _RESPONSE_EVENTS:
            # Its readers ask for its response next (response_of): parsed once, not twice.
            response = value.get("response")
            _last_response = (data, response if isinstance(response, dict) else None)
        return found
    return None


_last_response: tuple[str, dict[str, Any] | None] = ("", None)
_RESPONSE_EVENTS = TERMINAL_EVENT_TYPES | {"response.created"}  # events whose response is read
# How those events open as upstreams write them: they go straight to the full parse (a hint
# only: whatever else they start with, the verdicts agree).
_RESPONSE_EVENT_OPENINGS = tuple(f'{{"type":"{kind}"' for kind in sorted(_RESPONSE_EVENTS))


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

FRAME_ONLY = ("type", "background", "stream_id")
"""Fields of a client frame that describe the frame or the transport, not the request
(``stream_id`` names the client connection's lane: it never reaches an upstream)."""


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


# -- the WebSocket mode's lanes and control frames (docs/protocol.md) ------------------------------

CANCEL = "response.cancel"
STEER = "response.steer"
INJECT = "response.inject"
INTERRUPT = "response.interrupt"
CONTROL_EVENT_TYPES = frozenset({CANCEL, STEER, INJECT, INTERRUPT})
"""Client frames acted on as they arrive, not queued behind the turn in flight."""

STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
"""A lane's ``stream_id``: 1 to 256 ASCII letters, digits, ``_``, ``.`` or ``-``."""

MAX_STREAM_IDS = 32
"""Distinct named lanes one connection may use (the default lane does not count)."""

MAX_ACTIVE_RESPONSES = 16
"""Responses in flight at once on one connection; further creates wait for a slot."""

INVALID_STREAM_ID = "invalid_stream_id"
STREAM_LIMIT = "websocket_stream_limit_reached"
CANCEL_NOT_ACTIVE = "response_cancel_not_active"
MESSAGE_TOO_BIG = "upstream_message_too_big"
"""The error that ends a turn whose frame the upstream refused with close 1009; the client
connection is then closed 1009 too, so the client learns its message was too big."""

CLOSE_MESSAGE_TOO_BIG = 1009


def valid_stream_id(value: Any) -> bool:
    return isinstance(value, str) and STREAM_ID_PATTERN.fullmatch(value) is not None


def with_stream_id(text: str, stream_id: str) -> str:
    """A JSON object's text with ``"stream_id"`` added as its last member (so it wins over one
    the object may already carry); anything else unchanged. The id needs no escaping
    (:data:`STREAM_ID_PATTERN`), so the rest of the text stays byte for byte."""
    stripped = text.rstrip()
    if not stripped.endswith("}") or not stripped.lstrip().startswith("{"):
        return text
    body = stripped[:-1]
    if body.strip() == "{":
        return f'{{"stream_id":"{stream_id}"}}'
    return f'{body},"stream_id":"{stream_id}"}}'


def invalid_stream_id() -> str:
    """The error for a frame whose ``stream_id`` is not a string of :data:`STREAM_ID_PATTERN`."""
    return error_event(
        INVALID_STREAM_ID,
        "Invalid 'stream_id': expected 1 to 256 ASCII letters, digits, underscores, hyphens or periods.",
        status=400,
        kind="invalid_request_error",
        param="stream_id",
    )


def stream_limit(stream_id: str) -> str:
    """The error for a connection's 33rd distinct ``stream_id`` (it echoes the id)."""
    return with_stream_id(
        error_event(
            STREAM_LIMIT,
            f"This WebSocket connection already uses {MAX_STREAM_IDS} stream_id values; open another"
            " connection for more lanes.",
            status=400,
            kind="invalid_request_error",
            param="stream_id",
        ),
        stream_id,
    )


def cancel_not_active() -> str:
    """The answer to a ``response.cancel`` with no response in progress to stop."""
    return error_event(
        CANCEL_NOT_ACTIVE,
        "Cancellation failed: no active response found.",
        status=400,
        kind="invalid_request_error",
    )


def cancelled(response: dict[str, Any] | None) -> str:
    """The terminal of a cancelled response: ``response.failed`` whose response has status
    ``cancelled`` (the response of its ``response.created`` when one arrived)."""
    body = dict(response) if response is not None else {"id": None, "object": "response", "output": []}
    body["status"] = "cancelled"
    return _text({"type": "response.failed", "response": body})


def steer_failed(code: str, message: str, steer: dict[str, Any]) -> str:
    """``response.steer.failed`` (code one of the API's, e.g. ``steering_not_supported``),
    giving the uncommitted input back; ``sequence_number`` 0: it belongs to no response stream."""
    return _text(
        {
            "type": "response.steer.failed",
            "sequence_number": 0,
            "error": {"type": "invalid_request_error", "code": code, "message": message},
            "steer": steer,
        }
    )


DISCARD_PARTIAL_ITEMS = "discard_partial_items"
"""The one ``response.interrupt`` mode: partial output items are dropped, finished ones kept."""
ITEM_ADDED = "response.output_item.added"
ITEM_DONE = "response.output_item.done"


def interrupt_failed(response_id: Any, code: str, message: str) -> str:
    """``response.interrupt.failed``: the interrupt did nothing; the response (if any) goes on.
    Never an ``error``: Codex ends its turn on one, and a late interrupt is normal."""
    return _text(
        {
            "type": "response.interrupt.failed",
            "response_id": response_id,
            "error": {"type": "invalid_request_error", "code": code, "message": message, "param": "response_id"},
        }
    )


def interrupt_accepted(response_id: str, sequence_number: int) -> str:
    return _text({"type": "response.interrupt.accepted", "response_id": response_id, "sequence_number": sequence_number})


def item_interrupted(response_id: str, item: dict[str, Any], output_index: Any, sequence_number: int) -> str:
    """The end of an output item an interrupt cut short (its partial content is discarded)."""
    return _text(
        {
            "type": "response.output_item.interrupted",
            "response_id": response_id,
            "item_id": item.get("id"),
            "output_index": output_index,
            "sequence_number": sequence_number,
        }
    )


def interrupted(response: dict[str, Any] | None, output: list[Any], sequence_number: int) -> str:
    """The terminal of an interrupted response (``mode: discard_partial_items``):
    ``response.incomplete``, reason ``interrupted``, with the output items that were complete."""
    body = dict(response) if response is not None else {"id": None, "object": "response"}
    body["status"] = "incomplete"
    body["incomplete_details"] = {"reason": "interrupted"}
    body["output"] = output
    return _text({"type": "response.incomplete", "sequence_number": sequence_number, "response": body})


def message_too_big(reason: str | None) -> tuple[str, str]:
    """Code and message of a turn whose upstream closed its WebSocket 1009."""
    message = "the upstream closed its WebSocket 1009 (message too big)"
    return MESSAGE_TOO_BIG, f"{message}: {reason}" if reason else message


def _text(obj: Any) -> str:
    """Compact JSON text that is sure to encode as UTF-8: a lone surrogate (``"\\ud800"`` in
    what a client or an upstream wrote) stays escaped instead of breaking the frame."""
    return dumps_bytes(obj).decode("utf-8")
