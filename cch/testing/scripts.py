"""The scripting vocabulary of the fake Responses upstream.

A `Script` says what the fake does for one HTTP request or one WebSocket turn: steps played in
order. Every step means the analogous thing on both transports, so one scenario can be run over
HTTP and over WebSocket unchanged. The builders below produce the common scenarios.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from cch.testing.fake_upstream import Recorded

__all__ = [
    "CONNECTION_LIMIT_ERROR",
    "Body",
    "Close",
    "Delay",
    "Drop",
    "Event",
    "Hold",
    "Raw",
    "Script",
    "Step",
    "codex_events",
    "codex_like",
    "drop_after",
    "error_json",
    "hold",
    "json_response",
    "sse",
    "ws_close_after",
]

EventLike = dict[str, Any] | str

SSE_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
)

# Fixed so that scripted output is byte-for-byte reproducible (2026-01-01T00:00:00Z).
CREATED_AT = 1767225600

# What an OpenAI Responses WebSocket sends when the socket reached its 60-minute age cap.
CONNECTION_LIMIT_ERROR: dict[str, Any] = {
    "type": "error",
    "status": 400,
    "error": {
        "type": "invalid_request_error",
        "code": "websocket_connection_limit_reached",
        "message": "Responses websocket connection limit reached (60 minutes).",
    },
}


# --- steps -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One Responses event: an SSE `data:` block over HTTP, one text message over WebSocket.

    A dict is sent as compact JSON; a str is sent as-is (the raw data text).
    """

    obj: EventLike


@dataclass(frozen=True)
class Raw:
    """Bytes exactly as given: written as-is over HTTP (CRLF, fragments, comments, garbage),
    one text message over WebSocket."""

    data: bytes


@dataclass(frozen=True)
class Body:
    """Response body bytes over HTTP (JSON bodies); one text message over WebSocket."""

    data: bytes


@dataclass(frozen=True)
class Delay:
    """Wait this long on the fake's clock before the next step."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Abort the TCP connection: no close frame, no chunk terminator. Ends the script."""


@dataclass(frozen=True)
class Close:
    """WebSocket: send a close frame (any code, 1011 included). HTTP: finish normally.

    Ends the script."""

    code: int = 1000
    reason: str = ""


@dataclass(frozen=True)
class Hold:
    """Never finish: the request stays open until the peer goes away or the fake stops."""


Step = Event | Raw | Body | Delay | Drop | Close | Hold


@dataclass(frozen=True)
class Script:
    """What the fake does for one request or turn. `status` and `headers` apply to HTTP only;
    without a content-type header the fake sends text/event-stream if the script has any
    `Event`, else application/json."""

    steps: tuple[Step, ...]
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Accept any sequence of steps, so a list literal is fine at call sites.
        object.__setattr__(self, "steps", tuple(self.steps))


# --- playing a script --------------------------------------------------------------------------


class Sink(Protocol):
    """Where a played script goes: one implementation per transport (in fake_upstream)."""

    def event(self, text: str) -> None: ...
    def raw(self, data: bytes) -> None: ...
    def body(self, data: bytes) -> None: ...
    def drop(self) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def end(self) -> None: ...


async def play(steps: Sequence[Step], sink: Sink, clock: IReactorTime) -> None:
    """Play steps into a sink. Run it with `Deferred.fromCoroutine`; cancelling that Deferred
    stops the script where it waits and cancels a pending `Delay`'s DelayedCall."""
    for step in steps:
        match step:
            case Event(obj=obj):
                sink.event(event_text(obj))
            case Raw(data=data):
                sink.raw(data)
            case Body(data=data):
                sink.body(data)
            case Delay(seconds=seconds):
                await deferLater(clock, seconds)
            case Drop():
                sink.drop()
                return
            case Close(code=code, reason=reason):
                sink.close(code, reason)
                return
            case Hold():
                await Deferred()
            case _:
                raise TypeError(f"not a script step: {step!r}")
    sink.end()


def event_text(obj: EventLike) -> str:
    """The text an event is sent as: compact JSON for a dict, the string itself otherwise."""
    if isinstance(obj, str):
        return obj
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse_block(text: str, *, crlf: bool = False) -> bytes:
    """One SSE event carrying `text` as its data (one `data:` line per line of text)."""
    nl = "\r\n" if crlf else "\n"
    lines = "".join(f"data: {line}{nl}" for line in text.split("\n"))
    return (lines + nl).encode("utf-8")


# --- builders ----------------------------------------------------------------------------------


def sse(
    events: Sequence[EventLike],
    *,
    chunk_size: int | None = None,
    crlf: bool = False,
    done: bool = False,
    delay: float = 0.0,
    status: int = 200,
) -> Script:
    """An SSE stream of `events`. `chunk_size` cuts the byte stream into fragments of that size,
    `delay` waits between fragments (between events without `chunk_size`), `crlf` uses CRLF
    line endings, `done` appends `data: [DONE]`."""
    items: list[EventLike] = [*events, "[DONE]"] if done else list(events)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        stream = b"".join(sse_block(event_text(e), crlf=crlf) for e in items)
        pieces: list[Step] = [
            Raw(stream[i : i + chunk_size]) for i in range(0, len(stream), chunk_size)
        ]
    elif crlf:
        pieces = [Raw(sse_block(event_text(e), crlf=True)) for e in items]
    else:
        pieces = [Event(e) for e in items]
    steps: list[Step] = []
    for i, piece in enumerate(pieces):
        if i and delay > 0:
            steps.append(Delay(delay))
        steps.append(piece)
    return Script(tuple(steps), status=status, headers=SSE_HEADERS)


def json_response(
    status: int, body: dict[str, Any] | bytes, content_type: str = "application/json"
) -> Script:
    """A complete (non-streamed) response with a Content-Length."""
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    headers = (("content-type", content_type), ("content-length", str(len(data))))
    return Script((Body(data),), status=status, headers=headers)


def error_object(
    code: str | None, message: str, type: str = "server_error", param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object (the value of "error"); "param" only when there is one."""
    error: dict[str, Any] = {"message": message, "type": type, "code": code}
    if param is not None:
        error["param"] = param
    return error


def error_json(status: int, code: str | None, message: str, type: str = "server_error") -> Script:
    """An OpenAI-shaped JSON error response: {"error": {message, type, code}}."""
    return json_response(status, {"error": error_object(code, message, type)})


def drop_after(events: Sequence[EventLike], n: int) -> Script:
    """Stream the first `n` events, then abort the TCP connection."""
    return Script((*(Event(e) for e in events[:n]), Drop()), headers=SSE_HEADERS)


def hold(events: Sequence[EventLike] = ()) -> Script:
    """Stream `events`, then keep the request open until the peer goes away or the fake stops."""
    return Script((*(Event(e) for e in events), Hold()), headers=SSE_HEADERS)


def ws_close_after(
    events: Sequence[EventLike], n: int, code: int = 1011, reason: str = ""
) -> Script:
    """Send the first `n` events, then a WebSocket close frame with `code` and `reason`."""
    return Script((*(Event(e) for e in events[:n]), Close(code, reason)), headers=SSE_HEADERS)


# --- what a real Responses server streams ------------------------------------------------------


def codex_like(recorded: Recorded, *, text: str | None = None) -> Script:
    """What a real Responses server answers, in the full item sequence Codex needs to render a
    message. The text defaults to "echo: <last user text>". `generate: false` (Codex warm-up)
    gets only response.created + response.completed; a non-streaming HTTP request gets the
    final response object as JSON."""
    events = codex_events(recorded, text=text)
    if recorded.transport == "http" and not recorded.body.get("stream"):
        return json_response(200, events[-1]["response"])
    return Script(tuple(Event(e) for e in events), headers=SSE_HEADERS)


def codex_events(recorded: Recorded, *, text: str | None = None) -> list[dict[str, Any]]:
    """The events of `codex_like`, for scripts that cut them short (`drop_after`, `hold`)."""
    body = recorded.body
    rid = recorded.response_id or "resp_fake"
    seq = _Sequence()
    if body.get("generate") is False:
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        return [
            seq("response.created", response=_response(rid, body, "in_progress", [], None)),
            seq("response.completed", response=_response(rid, body, "completed", [], usage)),
        ]

    if text is None:
        last = _last_user_text(body.get("input"))
        text = f"echo: {last}" if last else "echo"
    pieces = re.findall(r"\S+\s*|\s+", text)
    item_id = f"msg_{rid}"
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": []}
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant"}
    done_item = {**item, "status": "completed", "content": [part]}
    input_tokens = len(recorded.raw) // 4
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(pieces),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + len(pieces),
    }
    return [
        seq("response.created", response=_response(rid, body, "in_progress", [], None)),
        seq("response.in_progress", response=_response(rid, body, "in_progress", [], None)),
        seq("response.output_item.added", output_index=0, item={**item, "content": []}),
        seq("response.content_part.added", **where, part=empty_part),
        *(seq("response.output_text.delta", **where, delta=p, logprobs=[]) for p in pieces),
        seq("response.output_text.done", **where, text=text, logprobs=[]),
        seq("response.content_part.done", **where, part=part),
        seq("response.output_item.done", output_index=0, item=done_item),
        seq("response.completed", response=_response(rid, body, "completed", [done_item], usage)),
    ]


class _Sequence:
    """Builds events with a running "sequence_number", as the real server numbers them."""

    def __init__(self) -> None:
        self._n = 0

    def __call__(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "sequence_number": self._n, **fields}
        self._n += 1
        return event


def _response(
    rid: str,
    body: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": CREATED_AT,
        "status": status,
        "model": body.get("model", "gpt-fake"),
        "output": output,
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store") is not False,
        "error": None,
        "incomplete_details": None,
        "usage": usage,
    }


def _last_user_text(items: object) -> str:
    """The text of the last user message in a Responses `input` (a string or a list of items)."""
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        return ""
    for item in reversed(items):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return ""
