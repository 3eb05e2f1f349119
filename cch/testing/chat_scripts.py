"""Scripts that play an OpenAI Chat Completions stream from the fake upstream.

The fake serves ``POST /v1/chat/completions`` with the same machinery as ``/v1/responses``; these
builders make what a Chat server streams: ``chat.completion.chunk`` objects (a first chunk with
the role, content and reasoning fragments, ``delta.tool_calls`` split across many chunks, a
finish chunk, the usage chunk of ``stream_options.include_usage``) and ``data: [DONE]``.

``chat_events`` gives the chunk objects (to cut short, reorder or feed a translation directly),
``chat_sse`` a streamed :class:`~cch.testing.scripts.Script` of them, ``chat_like`` the
``codex_like`` of Chat (``fake.default = chat_like``), and ``chat_error_after`` a stream that
carries an ``error`` object after some chunks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cch.testing.scripts import CREATED_AT, Script, error_object, sse

if TYPE_CHECKING:
    from cch.testing.fake_upstream import Recorded

__all__ = [
    "ToolCall",
    "chat_chunk",
    "chat_error_after",
    "chat_events",
    "chat_like",
    "chat_sse",
    "chat_usage",
    "split_text",
]

CHUNK_ID = "chatcmpl-fake"


@dataclass(frozen=True)
class ToolCall:
    """A tool call the fake streams: its ``arguments`` go out in ``pieces`` fragments."""

    call_id: str
    name: str
    arguments: str
    pieces: int = 3


def chat_chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    model: str = "gpt-fake",
    choices: bool = True,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` as OpenAI sends it (``usage`` null but on the usage
    chunk, which has no choices)."""
    chunk: dict[str, Any] = {
        "id": CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": CREATED_AT,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [],
    }
    if choices:
        chunk["choices"] = [
            {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
        ]
    chunk["usage"] = usage
    return chunk


def chat_usage(
    prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0, reasoning_tokens: int = 0
) -> dict[str, Any]:
    """The ``usage`` object of the last chunk."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def split_text(text: str, pieces: int) -> list[str]:
    """``text`` cut into ``pieces`` nearly equal fragments (fewer if it is shorter)."""
    pieces = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), pieces)
    out, start = [], 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        out.append(text[start:end])
        start = end
    return out or [""]


def chat_events(
    *,
    text: str | None = None,
    reasoning: str | None = None,
    tool_calls: Sequence[ToolCall] = (),
    interleave: bool = False,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    reasoning_field: str = "reasoning_content",
    model: str = "gpt-fake",
    done: bool = True,
) -> list[dict[str, Any] | str]:
    """The chunks of one Chat answer, in the order a Chat server sends them: role, reasoning
    (``reasoning_field``: ``reasoning_content`` or ``reasoning``) and text word by word, tool
    calls (id and name in the first fragment, arguments in ``pieces`` fragments; with
    ``interleave`` the calls' fragments alternate), the finish chunk (``finish_reason``
    defaults to ``tool_calls`` with calls, else ``stop``), the usage chunk when ``usage`` is
    given, and ``[DONE]`` when ``done``."""
    chunks: list[dict[str, Any] | str] = [
        chat_chunk({"role": "assistant", "content": ""}, model=model)
    ]
    for piece in _words(reasoning):
        chunks.append(chat_chunk({reasoning_field: piece}, model=model))
    for piece in _words(text):
        chunks.append(chat_chunk({"content": piece}, model=model))
    streams = [_call_fragments(index, call) for index, call in enumerate(tool_calls)]
    if interleave:
        for round_ in range(max((len(s) for s in streams), default=0)):
            for stream in streams:
                if round_ < len(stream):
                    chunks.append(chat_chunk({"tool_calls": [stream[round_]]}, model=model))
    else:
        for stream in streams:
            for fragment in stream:
                chunks.append(chat_chunk({"tool_calls": [fragment]}, model=model))
    reason = finish_reason or ("tool_calls" if tool_calls else "stop")
    chunks.append(chat_chunk({}, finish_reason=reason, model=model))
    if usage is not None:
        chunks.append(chat_chunk(choices=False, usage=usage, model=model))
    if done:
        chunks.append("[DONE]")
    return chunks


def chat_sse(events: Sequence[dict[str, Any] | str], **options: Any) -> Script:
    """A Script streaming ``events`` (chunk objects and ``"[DONE]"``) as SSE; ``options`` are
    those of :func:`cch.testing.scripts.sse` (``chunk_size``, ``delay``, ``crlf``)."""
    return sse(list(events), **options)


def chat_like(recorded: Recorded, *, text: str | None = None) -> Script:
    """What a Chat server answers a streaming request: ``text`` (default "echo: <last user
    text>") word by word, ``stop``, a usage chunk, ``[DONE]``."""
    if text is None:
        last = _last_user_text(recorded.body.get("messages"))
        text = f"echo: {last}" if last else "echo"
    usage = chat_usage(len(recorded.raw) // 4, len(_words(text)))
    model = recorded.body.get("model")
    return chat_sse(
        chat_events(text=text, usage=usage, model=model if isinstance(model, str) else "gpt-fake")
    )


def chat_error_after(
    events: Sequence[dict[str, Any] | str],
    n: int,
    *,
    code: str | int | None = "server_error",
    message: str = "The server had an error while processing your request.",
    type: str = "server_error",
) -> Script:
    """The first ``n`` of ``events``, then an ``error`` object as OpenAI sends one in a
    stream (``data: {"error": {...}}``); the body then ends."""
    error = error_object(code if isinstance(code, str) or code is None else None, message, type)
    if isinstance(code, int):
        error["code"] = code
    return chat_sse([*events[:n], {"error": error}])


def _call_fragments(index: int, call: ToolCall) -> list[dict[str, Any]]:
    first = {
        "index": index,
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    rest = [
        {"index": index, "function": {"arguments": piece}}
        for piece in split_text(call.arguments, call.pieces)
        if piece
    ]
    return [first, *rest]


def _words(text: str | None) -> list[str]:
    if not text:
        return []
    return re.findall(r"\S+\s*|\s+", text)


def _last_user_text(messages: object) -> str:
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return ""
