"""Fake-upstream scripts that answer like the Anthropic Messages API (``POST /v1/messages``).

Anthropic's SSE names every event twice, in an ``event:`` line and in the data's ``type``::

    event: content_block_delta
    data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}

so these scripts are written with :class:`~cch.testing.scripts.Raw` steps, byte for byte. Each
scenario comes twice: ``*_events`` (the event objects, for translation tests that feed them
one by one) and the :class:`~cch.testing.scripts.Script` the fake plays (``messages_sse`` of
those events). :func:`anthropic_like` is a script source for any ``/messages`` request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cch.testing.scripts import SSE_HEADERS, Raw, Script, Step, json_response

if TYPE_CHECKING:
    from cch.testing.fake_upstream import Recorded

__all__ = [
    "MODEL",
    "anthropic_error",
    "anthropic_like",
    "error_event",
    "error_mid_stream",
    "error_mid_stream_events",
    "max_tokens_stop",
    "max_tokens_stop_events",
    "message_delta",
    "message_start",
    "message_stop",
    "messages_sse",
    "ping",
    "redacted_thinking_block",
    "sse_event",
    "split",
    "text_answer",
    "text_answer_events",
    "text_block",
    "thinking_answer",
    "thinking_answer_events",
    "thinking_block",
    "tool_call_chunked",
    "tool_call_chunked_events",
    "tool_use_block",
    "two_tool_calls",
    "two_tool_calls_events",
]

Event = dict[str, Any]

#: The model name the fake reports (any string does; the translation reports the client's).
MODEL = "claude-fake-4"


# --- the wire ----------------------------------------------------------------------------------


def sse_event(event: Event | str, *, name: str | None = None) -> bytes:
    """One Anthropic SSE event: an ``event:`` line with the data's type, then the data."""
    if isinstance(event, str):
        return f"event: {name or 'message'}\ndata: {event}\n\n".encode()
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name or event['type']}\ndata: {data}\n\n".encode()


def messages_sse(
    events: Sequence[Event | str], *, chunk_size: int | None = None, status: int = 200
) -> Script:
    """An Anthropic SSE stream of ``events``; ``chunk_size`` cuts the bytes into fragments of
    that size, so events straddle writes."""
    if chunk_size is None:
        steps: list[Step] = [Raw(sse_event(e)) for e in events]
    else:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        stream = b"".join(sse_event(e) for e in events)
        steps = [Raw(stream[i : i + chunk_size]) for i in range(0, len(stream), chunk_size)]
    return Script(tuple(steps), status=status, headers=SSE_HEADERS)


def anthropic_error(status: int, type: str, message: str) -> Script:
    """An Anthropic JSON error answer: ``{"type":"error","error":{"type","message"}}``."""
    return json_response(status, {"type": "error", "error": {"type": type, "message": message}})


# --- events ------------------------------------------------------------------------------------


def message_start(
    *,
    id: str = "msg_fake",
    model: str = MODEL,
    input_tokens: int = 25,
    cache_read: int = 0,
    cache_creation: int = 0,
) -> Event:
    return {
        "type": "message_start",
        "message": {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": cache_creation,
                "cache_read_input_tokens": cache_read,
                "output_tokens": 1,
            },
        },
    }


def split(text: str, pieces: int) -> list[str]:
    """``text`` cut into about ``pieces`` fragments (none empty unless ``text`` is)."""
    if pieces <= 1 or len(text) <= 1:
        return [text]
    size = -(-len(text) // pieces)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) or [text]


def text_block(index: int, text: str, pieces: Sequence[str] | None = None) -> list[Event]:
    """A text block: start, one ``text_delta`` per piece (words by default), stop."""
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": p},
            }
            for p in (pieces if pieces is not None else _words(text))
        ),
        {"type": "content_block_stop", "index": index},
    ]


def thinking_block(
    index: int, thinking: str, signature: str, pieces: Sequence[str] | None = None
) -> list[Event]:
    """A thinking block: ``thinking_delta`` pieces, then the ``signature_delta``, then stop."""
    start = {"type": "thinking", "thinking": "", "signature": ""}
    return [
        {"type": "content_block_start", "index": index, "content_block": start},
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "thinking_delta", "thinking": p},
            }
            for p in (pieces if pieces is not None else _words(thinking))
        ),
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "signature_delta", "signature": signature},
        },
        {"type": "content_block_stop", "index": index},
    ]


def redacted_thinking_block(index: int, data: str) -> list[Event]:
    """A redacted thinking block: all of it in the start event."""
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "redacted_thinking", "data": data},
        },
        {"type": "content_block_stop", "index": index},
    ]


def tool_use_block(
    index: int,
    id: str,
    name: str,
    arguments: str | dict[str, Any],
    *,
    chunks: int = 1,
) -> list[Event]:
    """A tool_use block whose input JSON comes in ``chunks`` ``input_json_delta`` fragments,
    after the empty first fragment Anthropic sends."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    block = {"type": "tool_use", "id": id, "name": name, "input": {}}
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": p},
            }
            for p in ["", *split(text, chunks)]
        ),
        {"type": "content_block_stop", "index": index},
    ]


def message_delta(stop_reason: str | None, output_tokens: int = 15) -> Event:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


def message_stop() -> Event:
    return {"type": "message_stop"}


def ping() -> Event:
    return {"type": "ping"}


def error_event(type: str = "overloaded_error", message: str = "Overloaded") -> Event:
    return {"type": "error", "error": {"type": type, "message": message}}


# --- scenarios ---------------------------------------------------------------------------------


def text_answer_events(text: str = "Hello from the fake.", **usage: int) -> list[Event]:
    """A plain answer: message_start, ping, one text block, end_turn."""
    return [
        message_start(**usage),
        ping(),
        *text_block(0, text),
        message_delta("end_turn", len(_words(text))),
        message_stop(),
    ]


def thinking_answer_events(
    thinking: str = "The user greets me. I should greet back.",
    signature: str = "EqQBCkYIARgCKkD0fake+signature/AAAA==",
    text: str = "Hello!",
) -> list[Event]:
    """Extended thinking, then the answer."""
    return [
        message_start(),
        *thinking_block(0, thinking, signature),
        *text_block(1, text),
        message_delta("end_turn", 40),
        message_stop(),
    ]


def tool_call_chunked_events(
    name: str = "shell",
    arguments: str | dict[str, Any] = '{"command":["ls","-la","/tmp"],"timeout_ms":1000}',
    *,
    chunks: int = 12,
    id: str = "toolu_01Fake",
    text: str | None = "Let me look.",
) -> list[Event]:
    """Optional text, then one tool_use whose input JSON arrives in ``chunks`` fragments."""
    blocks = text_block(0, text) if text else []
    index = 1 if text else 0
    return [
        message_start(),
        *blocks,
        *tool_use_block(index, id, name, arguments, chunks=chunks),
        message_delta("tool_use", 60),
        message_stop(),
    ]


def two_tool_calls_events(
    first: tuple[str, str, str] = ("toolu_01A", "shell", '{"command":["pwd"]}'),
    second: tuple[str, str, str] = ("toolu_01B", "shell", '{"command":["ls"]}'),
    *,
    chunks: int = 4,
) -> list[Event]:
    """Two tool_use blocks in one message (parallel tool calls): (id, name, arguments) each."""
    return [
        message_start(),
        *tool_use_block(0, *first, chunks=chunks),
        *tool_use_block(1, *second, chunks=chunks),
        message_delta("tool_use", 80),
        message_stop(),
    ]


def max_tokens_stop_events(text: str = "This answer is cut off in the mid") -> list[Event]:
    """A text answer stopped by ``max_tokens``."""
    return [
        message_start(),
        *text_block(0, text),
        message_delta("max_tokens", 16),
        message_stop(),
    ]


def error_mid_stream_events(
    type: str = "overloaded_error", message: str = "Overloaded", text: str = "Partial answ"
) -> list[Event]:
    """Some text, then an ``error`` event (the stream ends without message_stop)."""
    return [message_start(), *text_block(0, text)[:-1], error_event(type, message)]


def text_answer(text: str = "Hello from the fake.", *, chunk_size: int | None = None) -> Script:
    return messages_sse(text_answer_events(text), chunk_size=chunk_size)


def thinking_answer(**kwargs: str) -> Script:
    return messages_sse(thinking_answer_events(**kwargs))


def tool_call_chunked(*, chunk_size: int | None = None, **kwargs: Any) -> Script:
    return messages_sse(tool_call_chunked_events(**kwargs), chunk_size=chunk_size)


def two_tool_calls(**kwargs: Any) -> Script:
    return messages_sse(two_tool_calls_events(**kwargs))


def max_tokens_stop(text: str = "This answer is cut off in the mid") -> Script:
    return messages_sse(max_tokens_stop_events(text))


def error_mid_stream(type: str = "overloaded_error", message: str = "Overloaded") -> Script:
    return messages_sse(error_mid_stream_events(type, message))


def anthropic_like(recorded: Recorded, *, text: str | None = None) -> Script:
    """A Messages answer to any request: "echo: <last user text>" unless ``text`` is given;
    a request without ``"stream": true`` gets the final message as JSON."""
    if text is None:
        last = _last_user_text(recorded.body.get("messages"))
        text = f"echo: {last}" if last else "echo"
    input_tokens = len(recorded.raw) // 4
    if not recorded.body.get("stream"):
        message = message_start(input_tokens=input_tokens)["message"]
        message["content"] = [{"type": "text", "text": text}]
        message["stop_reason"] = "end_turn"
        message["usage"]["output_tokens"] = len(_words(text))
        return json_response(200, message)
    return messages_sse(text_answer_events(text, input_tokens=input_tokens))


def _last_user_text(messages: object) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = [
                b["text"]
                for b in content
                if isinstance(b, dict)
                and b.get("type") == "text"
                and isinstance(b.get("text"), str)
            ]
            if texts:
                return "".join(texts)
    return ""
