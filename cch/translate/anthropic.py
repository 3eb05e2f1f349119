"""The Anthropic Messages API (``providers[].api = "anthropic"``): requests and streams.

A Responses request becomes one streaming ``POST {base_url}/messages``; the Messages SSE stream
comes back as the Responses events Codex renders, made by :class:`ResponseBuilder`.

Request: the fate of every field
================================

"Listed" means named in :attr:`UpstreamRequest.dropped` (one warning line per turn).

=============================================  ==================================================
Responses (what Codex sends)                   Messages
=============================================  ==================================================
``model``                                      ``model``: the provider's name (after model_map)
``instructions``                               first block of ``system`` (a list of text blocks)
``input`` as a string                          one user message
message, role ``developer`` / ``system``       a further ``system`` block each, in input order
message, role ``user`` / ``assistant``         a message of that role; ``input_text`` /
                                               ``output_text`` / ``refusal`` parts → ``text``
                                               blocks (empty ones skipped: Anthropic rejects
                                               them); ``input_image`` → ``image`` (base64 from a
                                               ``data:`` URL, ``url`` source for http(s)); an
                                               image by ``file_id`` or an ``input_file`` part is
                                               dropped (listed)
``function_call``                              assistant ``tool_use`` {id: call_id, name,
                                               input: the parsed arguments}. Arguments that are
                                               not a JSON object are wrapped, deliberately, as
                                               ``{"raw_arguments": "<the text>"}`` (the model
                                               sees what it sent); ``""`` is ``{}``
``function_call_output``                       user ``tool_result`` {tool_use_id, content: the
                                               string, or text/image blocks for a list}
``call_id`` (both sides)                       ``id`` / ``tool_use_id``, characters Anthropic
                                               refuses (other providers' ids) turned into ``_``
``custom_tool_call`` (Codex's freeform         ``tool_use`` with ``input`` = ``{"input": text}``
``apply_patch``)
``custom_tool_call_output``                    ``tool_result``, as for a function's
``reasoning`` made by this module              ``thinking`` {thinking: the summary text,
                                               signature} or ``redacted_thinking`` {data},
                                               decoded from ``encrypted_content`` (see
                                               :data:`THINKING_PREFIX`), first in their
                                               assistant message
``reasoning`` from any other provider          dropped (listed): nothing Anthropic can verify
other items (``local_shell_call``,             dropped (listed)
``web_search_call``, ``compaction``, ...)
item ``id`` / ``status`` / ``phase``           ignored
``tools``: ``function``                        ``{name, description, input_schema: parameters}``
``tools``: ``custom``                          the same with one string property ``input``; the
                                               grammar (``format.definition``) is quoted in the
                                               description
``tools``: hosted / unknown types              dropped (listed): ``web_search``,
                                               ``local_shell``, ``file_search``, ...
``tool_choice``                                ``auto``→auto, ``none``→none, ``required``→any, a
                                               named function/custom tool→tool; a hosted tool or
                                               an unknown name → auto (listed); omitted with tools
``parallel_tool_calls: false``                 ``tool_choice.disable_parallel_tool_use: true``
``max_output_tokens``                          ``max_tokens`` (required by Anthropic: default
                                               :data:`DEFAULT_MAX_TOKENS`, set per provider)
``reasoning.effort``                           ``thinking: {type: enabled, budget_tokens}`` from
                                               :data:`THINKING_BUDGETS`, capped at ``max_tokens``
                                               − :data:`ANSWER_RESERVE`; ``none`` / absent → no
                                               thinking. Left out (listed) below the 1024-token
                                               minimum, when ``tool_choice`` forces a tool
                                               (Anthropic refuses both), and in a tool loop
                                               whose last assistant turn has no thinking block
                                               (Anthropic requires one there)
``temperature``                                ``temperature`` clamped to [0, 1] (listed when
                                               clamped); left out (listed) with thinking on
``top_p``                                      ``top_p``; left out (listed) with a temperature
                                               (newer Claude models refuse both) or, with
                                               thinking on, below 0.95
``text.format`` json_schema / json_object      no native equivalent: a closing ``system`` block
                                               asks for JSON (with the schema); listed, as it is
                                               asked for, not enforced
``text.format`` text, ``text.verbosity``       ignored
``stream``                                     ``stream: true`` always
``store``, ``include``, ``prompt_cache_key``,  ignored: nothing to say upstream (the gateway
``client_metadata``, ``metadata``, ``user``,   answers ``generate: false`` itself and resolves
``safety_identifier``, ``service_tier``,       ``previous_response_id`` before translating;
``truncation``, ``background: false``,         Codex leaves the rest at their defaults)
``stream_options``, ``reasoning.summary``,
``generate``, ``previous_response_id``,
``prompt_cache_retention``, ``top_logprobs``,
``max_tool_calls``
``background: true``, ``prompt``,              untranslatable (400): state on an OpenAI server
``conversation``
any other top-level field                      dropped (listed as ``field <name>``)
(prompt caching)                               ``cache_control: ephemeral`` on the last
                                               ``system`` block and on the last cacheable block
                                               of the last message (Codex resends the whole
                                               conversation each turn), unless the Api is made
                                               with ``prompt_caching=False``
=============================================  ==================================================

Messages are built in input order: consecutive items of one role merge into one message (the
API rejects two user messages in a row); in a user message ``tool_result`` blocks come first, in
an assistant message ``thinking`` blocks do. A tool call recorded after the results of the
calls before it (``call A, output A, call B, output B``) joins the assistant message of call A,
so the turn keeps its thinking block first. Every ``tool_use`` gets a result in the next user
message (a missing one is made, ``is_error`` with a note) and a ``tool_result`` with no
``tool_use`` before it becomes text: Anthropic rejects both.

Stream: Messages events → Responses events
==========================================

=============================================  ==================================================
``message_start``                              input usage kept (``start()`` already sent
                                               ``response.created`` / ``in_progress``)
``text`` block, ``text_delta``                 a ``message`` item, text deltas
``thinking`` block, ``thinking_delta``         a ``reasoning`` item, one summary part
``signature_delta``                            the item's ``encrypted_content``:
                                               :data:`THINKING_PREFIX` + signature
``redacted_thinking`` block                    a ``reasoning`` item with no summary,
                                               ``encrypted_content`` = :data:`REDACTED_PREFIX`
                                               + data
``tool_use`` block, ``input_json_delta``       a ``function_call`` item, argument deltas as they
                                               come (``{}`` when none came)
``tool_use`` of a request's custom tool        a ``custom_tool_call``; the ``input`` string of
                                               the ``{"input": ...}`` JSON is decoded and sent
                                               as it arrives (held back only inside an escape);
                                               JSON of another shape is buffered and, at the
                                               block's stop, its ``input`` string (or the raw
                                               JSON text, if it has none) sent at once
other blocks (server tools, citations)         ignored
``content_block_stop``                         the item is done
``message_delta``                              stop reason and output usage kept
``message_stop``                               the terminal event by stop reason: ``end_turn`` /
                                               ``tool_use`` / ``stop_sequence`` / ``pause_turn``
                                               (server tools only, never asked for) / none →
                                               completed; ``max_tokens`` /
                                               ``model_context_window_exceeded`` → incomplete
                                               ``max_output_tokens``; ``refusal`` → incomplete
                                               ``content_filter`` (as OpenAI reports a filtered
                                               answer); unknown → completed
``ping``, ``[DONE]``, unknown event types      ignored
``error`` event                                ``response.failed``, code as for HTTP errors
malformed event / delta for no block           ``response.failed`` ``upstream_stream_error``
body ends before ``message_stop``              ``response.failed`` ``upstream_stream_error``
usage                                          input = input + cache_read + cache_creation,
                                               cached = cache_read, output = output_tokens,
                                               reasoning = 0 (Anthropic counts thinking in
                                               output_tokens without a breakdown)
=============================================  ==================================================

Errors (:meth:`AnthropicApi.error` and the ``error`` event) map Anthropic's
``{"type": "error", "error": {"type", "message"}}`` (or any JSON / text body) by error type,
then by status: see :data:`ERROR_CODES`. A 400 whose message says the prompt is too long becomes
``context_length_exceeded`` (what Codex recognises as a full context window).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cch import jsoncodec
from cch.translate.api import Untranslatable, UpstreamRequest
from cch.translate.custom_input import CustomInput
from cch.translate.responses import ResponseBuilder, Usage

__all__ = [
    "ANSWER_RESERVE",
    "ANTHROPIC_VERSION",
    "DEFAULT_MAX_TOKENS",
    "ERROR_CODES",
    "MIN_THINKING_BUDGET",
    "PATH",
    "REDACTED_PREFIX",
    "THINKING_BUDGETS",
    "THINKING_PREFIX",
    "AnthropicApi",
    "AnthropicStream",
    "error_code",
]

PATH = "/messages"
ANTHROPIC_VERSION = "2023-06-01"

#: ``max_tokens`` when the request has no ``max_output_tokens`` (Anthropic requires one).
#: Models with a smaller output cap need ``AnthropicApi(default_max_tokens=...)``.
DEFAULT_MAX_TOKENS = 32000

#: ``reasoning.effort`` → ``thinking.budget_tokens`` (before the cap below).
THINKING_BUDGETS: dict[str, int] = {
    "minimal": 1024,
    "low": 4096,
    "medium": 10240,
    "high": 20480,
    "xhigh": 28672,
}
#: Anthropic's smallest thinking budget.
MIN_THINKING_BUDGET = 1024
#: Tokens of ``max_tokens`` kept for the answer: the budget is at most max_tokens minus this.
ANSWER_RESERVE = 1024

#: ``encrypted_content`` of a reasoning item made from a ``thinking`` block: this prefix and
#: the block's signature. The request side turns exactly these back into ``thinking`` blocks.
THINKING_PREFIX = "cch-anthropic:thinking:"
#: ``encrypted_content`` of a reasoning item made from a ``redacted_thinking`` block.
REDACTED_PREFIX = "cch-anthropic:redacted:"

#: Anthropic error type → Responses (error type, code).
ERROR_CODES: dict[str, tuple[str, str]] = {
    "invalid_request_error": ("invalid_request_error", "invalid_request_error"),
    "authentication_error": ("authentication_error", "upstream_auth_error"),
    "permission_error": ("authentication_error", "upstream_auth_error"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "not_found_error": ("invalid_request_error", "model_not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", "upstream_error"),
    "timeout_error": ("server_error", "upstream_error"),
    # What Codex treats as "server overloaded" (and retries).
    "overloaded_error": ("server_error", "server_is_overloaded"),
}
# The same by HTTP status, for bodies that name no known type.
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_CONTEXT_FULL = re.compile(r"prompt is too long|context (window|limit|length)", re.IGNORECASE)

# Top-level request fields with nothing to say upstream (the table above).
_IGNORED_FIELDS = frozenset(
    {
        "model",
        "stream",
        "store",
        "include",
        "prompt_cache_key",
        "prompt_cache_retention",
        "client_metadata",
        "metadata",
        "user",
        "safety_identifier",
        "service_tier",
        "truncation",
        "background",
        "stream_options",
        "top_logprobs",
        "max_tool_calls",
        "generate",
        "previous_response_id",
    }
)
# Fields naming state on an OpenAI server: a request with them cannot be carried.
_UNTRANSLATABLE = ("prompt", "conversation")
# Top-level fields this module translates.
_TRANSLATED_FIELDS = frozenset(
    {
        "instructions",
        "input",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "reasoning",
        "temperature",
        "top_p",
        "text",
    }
)

# Copied into each request (deep enough that no caller can change these).
_CUSTOM_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "input": {
            "type": "string",
            "description": "The tool's whole input as free-form text (not JSON).",
        }
    },
    "required": ["input"],
    "additionalProperties": False,
}
_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
_MISSING_RESULT = "No result was recorded for this tool call."
_ID_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")
_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)


class AnthropicApi:
    """The ``anthropic`` :class:`~cch.translate.api.Api`.

    ``default_max_tokens`` is ``max_tokens`` for requests without ``max_output_tokens``;
    ``prompt_caching`` puts ``cache_control`` breakpoints on the system prompt and the last
    message (see the module docstring)."""

    name = "anthropic"

    def __init__(
        self, *, default_max_tokens: int = DEFAULT_MAX_TOKENS, prompt_caching: bool = True
    ) -> None:
        if default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        self.default_max_tokens = default_max_tokens
        self.prompt_caching = prompt_caching

    def request(self, body: dict[str, Any], *, model: str, api_key: str | None) -> UpstreamRequest:
        translation = _Request(body, self.default_max_tokens, self.prompt_caching)
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return UpstreamRequest(
            path=PATH,
            headers=headers,
            body=translation.build(model),
            dropped=tuple(dict.fromkeys(translation.dropped)),
        )

    def stream(
        self, body: dict[str, Any], *, response_id: str, model: str, created_at: int
    ) -> AnthropicStream:
        return AnthropicStream(body, response_id=response_id, model=model, created_at=created_at)

    def error(self, status: int, body: bytes) -> dict[str, Any]:
        kind, message = _read_error(status, body)
        error_type, code = error_code(kind, message, status)
        return {"error": {"type": error_type, "code": code, "message": message, "param": None}}


def error_code(kind: str | None, message: str, status: int | None = None) -> tuple[str, str]:
    """The Responses (error type, code) for an Anthropic error ``kind`` (its ``error.type``)
    and ``message``; ``status`` decides when the type is unknown."""
    if kind not in ERROR_CODES and status is not None:
        kind = _STATUS_TYPES.get(status, "api_error" if status >= 500 else kind)
    if kind == "invalid_request_error" and _CONTEXT_FULL.search(message):
        return "invalid_request_error", "context_length_exceeded"
    if kind in ERROR_CODES:
        return ERROR_CODES[kind]
    if status is not None and status < 500:
        return "invalid_request_error", "invalid_request_error"
    return "server_error", "upstream_error"


def _read_error(status: int, body: bytes) -> tuple[str | None, str]:
    """Anthropic's error type and message from a body of any shape."""
    try:
        parsed = jsoncodec.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return None, text[:2000] or f"upstream answered HTTP {status}"
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        kind = error.get("type")
        message = error.get("message")
        return (
            kind if isinstance(kind, str) else None,
            message if isinstance(message, str) else f"upstream answered HTTP {status}",
        )
    if isinstance(error, str):
        return None, error
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return None, parsed["message"]
    return None, f"upstream answered HTTP {status}"


# --- the request -------------------------------------------------------------------------------


def _tool_kinds(tools: object) -> dict[str, str]:
    """Name → ``"function"`` / ``"custom"`` for the request's tools that are sent upstream."""
    kinds: dict[str, str] = {}
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict) and tool.get("type") in ("function", "custom"):
                name = tool.get("name")
                if isinstance(name, str) and name:
                    kinds[name] = tool["type"]
    return kinds


class _Request:
    """One request's translation; ``dropped`` collects what was left out."""

    def __init__(self, body: dict[str, Any], default_max_tokens: int, caching: bool) -> None:
        self.body = body
        self.default_max_tokens = default_max_tokens
        self.caching = caching
        self.dropped: list[str] = []
        self.system: list[str] = []
        self.messages = _Messages()

    def build(self, model: str) -> dict[str, Any]:
        body = self.body
        for name in _UNTRANSLATABLE:
            if body.get(name) is not None:
                raise Untranslatable(f"{name} names state the Anthropic API does not have", name)
        if body.get("background") is True:
            raise Untranslatable("background responses are not available here", "background")
        for name in body:
            if name not in _TRANSLATED_FIELDS and name not in _IGNORED_FIELDS:
                self.dropped.append(f"field {name}")
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            self.system.append(instructions)
        self._input(body.get("input"))
        self._text_format(body.get("text"))
        messages = self.messages.finish()
        if not messages:
            raise Untranslatable("input has no user or assistant message to send", "input")

        max_tokens = self._max_tokens()
        out: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
        if self.system:
            system = [{"type": "text", "text": text} for text in self.system]
            if self.caching:
                system[-1]["cache_control"] = {"type": "ephemeral"}
            out["system"] = system
        if self.caching:
            _mark_last_block(messages)
        out["messages"] = messages

        tools = self._tools(body.get("tools"))
        choice = self._tool_choice(body.get("tool_choice"), tools) if tools else None
        if tools:
            out["tools"] = tools
            if body.get("parallel_tool_calls") is False and choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
            out["tool_choice"] = choice
        elif body.get("tool_choice") not in (None, "auto", "none"):
            self.dropped.append("tool_choice (no tool to choose)")

        thinking = self._thinking(max_tokens, choice, messages)
        if thinking is not None:
            out["thinking"] = thinking
        self._sampling(out, thinking is not None)
        out["stream"] = True
        return out

    # --- input ----------------------------------------------------------------------------------

    def _input(self, items: object) -> None:
        if isinstance(items, str):
            self.messages.add("user", [{"type": "text", "text": items}] if items else [])
            return
        if not isinstance(items, list):
            raise Untranslatable("input must be a string or a list of items", "input")
        for item in items:
            if not isinstance(item, dict):
                raise Untranslatable("input items must be objects", "input")
            self._item(item)

    def _item(self, item: dict[str, Any]) -> None:
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            self._message(item)
        elif kind == "function_call":
            arguments = item.get("arguments")
            self.messages.add_call(_tool_use(item, _arguments(arguments)))
        elif kind == "custom_tool_call":
            text = item.get("input")
            self.messages.add_call(
                _tool_use(item, {"input": text if isinstance(text, str) else ""})
            )
        elif kind in ("function_call_output", "custom_tool_call_output"):
            self.messages.add("user", [self._tool_result(item)])
        elif kind == "reasoning":
            block = _thinking_block(item)
            if block is None:
                self.dropped.append("reasoning items from another provider")
            else:
                self.messages.add("assistant", [block])
        else:
            self.dropped.append(f"input item {kind}")

    def _message(self, item: dict[str, Any]) -> None:
        role = item.get("role")
        content = item.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise Untranslatable(f"a {role} message has no content list", "input")
        if role in ("developer", "system"):
            text = "\n\n".join(
                p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
            if text:
                self.system.append(text)
            return
        if role not in ("user", "assistant"):
            raise Untranslatable(f"unknown message role {role!r}", "input")
        self.messages.add(role, self._blocks(parts))

    def _blocks(self, parts: Iterable[object]) -> list[dict[str, Any]]:
        """Content parts (a message's, or a tool output's list) as Anthropic blocks."""
        blocks: list[dict[str, Any]] = []
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("input_text", "output_text", "text", "refusal"):
                text = part.get("text") if kind != "refusal" else part.get("refusal")
                if isinstance(text, str) and text:
                    blocks.append({"type": "text", "text": text})
            elif kind == "input_image":
                image = self._image(part)
                if image is not None:
                    blocks.append(image)
            else:
                self.dropped.append(f"content part {kind}")
        return blocks

    def _image(self, part: dict[str, Any]) -> dict[str, Any] | None:
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            by_file = part.get("file_id") is not None
            self.dropped.append(
                "input_image by file_id" if by_file else "input_image without a URL"
            )
            return None
        match = _DATA_URL.fullmatch(url)
        if match is not None:
            media_type, params, data = match.groups()
            if ";base64" not in params.lower():
                raise Untranslatable("an image data URL must be base64", "input")
            source = {"type": "base64", "media_type": media_type or "image/png", "data": data}
            return {"type": "image", "source": source}
        if url.startswith(("http://", "https://")):
            return {"type": "image", "source": {"type": "url", "url": url}}
        self.dropped.append("input_image that is neither a data: nor an http(s) URL")
        return None

    def _tool_result(self, item: dict[str, Any]) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": _call_id(item)}
        output = item.get("output")
        if isinstance(output, list):
            content = self._blocks(output)
            if content:
                block["content"] = content
        elif isinstance(output, str):
            if output:
                block["content"] = output
        elif output is not None:
            block["content"] = jsoncodec.dumps(output)
        return block

    def _text_format(self, text: object) -> None:
        fmt = text.get("format") if isinstance(text, dict) else None
        if not isinstance(fmt, dict):
            return
        if fmt.get("type") == "json_schema":
            schema = jsoncodec.dumps(fmt.get("schema", {}))
            self.system.append(
                "Answer with one JSON value that matches this JSON Schema, and nothing else "
                f"(no prose, no code fences):\n{schema}"
            )
            self.dropped.append("text.format json_schema (asked for in the system prompt)")
        elif fmt.get("type") == "json_object":
            self.system.append("Answer with one JSON object, and nothing else.")
            self.dropped.append("text.format json_object (asked for in the system prompt)")

    # --- tools ----------------------------------------------------------------------------------

    def _tools(self, tools: object) -> list[dict[str, Any]]:
        if not isinstance(tools, list):
            return []
        out: list[dict[str, Any]] = []
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, dict) else None
            name = tool.get("name") if isinstance(tool, dict) else None
            if kind not in ("function", "custom") or not isinstance(name, str) or not name:
                self.dropped.append(f"tool {kind or '?'}")
                continue
            assert isinstance(tool, dict)
            description = tool.get("description")
            description = description if isinstance(description, str) else ""
            if kind == "function":
                schema = tool.get("parameters")
                schema = (
                    schema if isinstance(schema, dict) and schema else copy.deepcopy(_EMPTY_SCHEMA)
                )
            else:
                description = _custom_description(description, tool.get("format"))
                schema = copy.deepcopy(_CUSTOM_INPUT_SCHEMA)
            entry: dict[str, Any] = {"name": name}
            if description:
                entry["description"] = description
            entry["input_schema"] = schema
            out.append(entry)
        return out

    def _tool_choice(self, choice: object, tools: list[dict[str, Any]]) -> dict[str, Any]:
        if choice is None or choice == "auto":
            return {"type": "auto"}
        if choice == "none":
            return {"type": "none"}
        if choice == "required":
            return {"type": "any"}
        if isinstance(choice, dict):
            kind = choice.get("type")
            name = choice.get("name")
            if kind in ("function", "custom") and any(t["name"] == name for t in tools):
                return {"type": "tool", "name": name}
            if kind == "allowed_tools":
                self.dropped.append("tool_choice allowed_tools (every tool stays allowed)")
                return {"type": "any" if choice.get("mode") == "required" else "auto"}
            self.dropped.append(f"tool_choice {kind}{' ' + name if isinstance(name, str) else ''}")
            return {"type": "auto"}
        self.dropped.append(f"tool_choice {choice}")
        return {"type": "auto"}

    # --- sampling -------------------------------------------------------------------------------

    def _max_tokens(self) -> int:
        value = self.body.get("max_output_tokens")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return self.default_max_tokens

    def _thinking(
        self,
        max_tokens: int,
        choice: dict[str, Any] | None,
        messages: list[dict[str, Any]],
    ) -> dict[str, Any] | None:
        reasoning = self.body.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
        if effort is None or effort == "none":
            return None
        if effort not in THINKING_BUDGETS:
            self.dropped.append(f"reasoning.effort {effort}")
            return None
        budget = min(THINKING_BUDGETS[effort], max_tokens - ANSWER_RESERVE)
        if budget < MIN_THINKING_BUDGET:
            self.dropped.append("reasoning.effort (max_output_tokens too small for thinking)")
            return None
        if choice is not None and choice["type"] in ("any", "tool"):
            self.dropped.append("reasoning.effort (tool_choice forces a tool)")
            return None
        if _tool_loop_without_thinking(messages):
            self.dropped.append("reasoning.effort (last tool-calling turn has no thinking block)")
            return None
        return {"type": "enabled", "budget_tokens": budget}

    def _sampling(self, out: dict[str, Any], thinking: bool) -> None:
        temperature = _number(self.body.get("temperature"))
        top_p = _number(self.body.get("top_p"))
        if temperature is not None:
            if thinking:
                self.dropped.append("temperature (thinking is on)")
                temperature = None
            elif not 0 <= temperature <= 1:
                self.dropped.append("temperature (clamped to [0, 1])")
                temperature = min(max(temperature, 0.0), 1.0)
        if temperature is not None:
            out["temperature"] = temperature
        if top_p is not None:
            if temperature is not None:
                self.dropped.append("top_p (a temperature is set)")
            elif thinking and top_p < 0.95:
                self.dropped.append("top_p (below 0.95 with thinking on)")
            else:
                out["top_p"] = top_p


class _Messages:
    """Anthropic messages built in input order (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []

    def add(self, role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if self._messages and self._messages[-1]["role"] == role:
            self._messages[-1]["content"].extend(blocks)
        else:
            self._messages.append({"role": role, "content": list(blocks)})

    def add_call(self, block: dict[str, Any]) -> None:
        """A tool_use; after a user message of nothing but tool results for an assistant
        message that ended in tool_use, it joins that assistant message (parallel calls
        recorded call, output, call, output)."""
        msgs = self._messages
        if (
            len(msgs) >= 2
            and msgs[-1]["role"] == "user"
            and all(b["type"] == "tool_result" for b in msgs[-1]["content"])
            and msgs[-2]["content"][-1]["type"] == "tool_use"
        ):
            msgs[-2]["content"].append(block)
            return
        self.add("assistant", [block])

    def finish(self) -> list[dict[str, Any]]:
        msgs = self._messages
        for message in msgs:
            if message["role"] == "assistant":
                message["content"] = _first(message["content"], ("thinking", "redacted_thinking"))
        # User messages are ordered there, once their orphan results became text.
        _pair_tool_results(msgs)
        return msgs


def _first(blocks: list[dict[str, Any]], kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """``blocks`` with those of ``kinds`` moved to the front, order otherwise kept."""
    return [b for b in blocks if b["type"] in kinds] + [b for b in blocks if b["type"] not in kinds]


def _pair_tool_results(msgs: list[dict[str, Any]]) -> None:
    """Give every tool_use a tool_result in the next message; turn orphan results into text."""
    i = 0
    while i < len(msgs):
        message = msgs[i]
        if message["role"] == "assistant":
            ids = [b["id"] for b in message["content"] if b["type"] == "tool_use"]
            if ids:
                if i + 1 == len(msgs) or msgs[i + 1]["role"] != "user":
                    msgs.insert(i + 1, {"role": "user", "content": []})
                nxt = msgs[i + 1]
                have = {b["tool_use_id"] for b in nxt["content"] if b["type"] == "tool_result"}
                missing = [
                    {
                        "type": "tool_result",
                        "tool_use_id": call,
                        "content": _MISSING_RESULT,
                        "is_error": True,
                    }
                    for call in ids
                    if call not in have
                ]
                nxt["content"][:0] = missing
        else:
            before = msgs[i - 1] if i > 0 else None
            ids = {
                b["id"] for b in (before["content"] if before else []) if b["type"] == "tool_use"
            }
            content: list[dict[str, Any]] = []
            for block in message["content"]:
                if block["type"] == "tool_result" and block["tool_use_id"] not in ids:
                    content.extend(_orphan_result(block))
                else:
                    content.append(block)
            message["content"] = _first(content, ("tool_result",))
        i += 1


def _orphan_result(block: dict[str, Any]) -> list[dict[str, Any]]:
    """A tool_result with no tool_use before it, as text (and its images)."""
    head = f"Result of tool call {block['tool_use_id']}:"
    content = block.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": f"{head}\n{content}" if content else head}]
    return [{"type": "text", "text": head}, *content]


def _mark_last_block(messages: list[dict[str, Any]]) -> None:
    """A prompt-cache breakpoint on the last block of the last message that may carry one."""
    for block in reversed(messages[-1]["content"]):
        if block["type"] not in ("thinking", "redacted_thinking"):
            block["cache_control"] = {"type": "ephemeral"}
            return


def _tool_loop_without_thinking(messages: list[dict[str, Any]]) -> bool:
    """The conversation ends in tool results for an assistant turn with no thinking block
    first: Anthropic refuses thinking for such a request."""
    if len(messages) < 2 or messages[-1]["role"] != "user":
        return False
    if messages[-1]["content"][0]["type"] != "tool_result":
        return False
    first = messages[-2]["content"][0]["type"]
    return first not in ("thinking", "redacted_thinking")


def _call_id(item: dict[str, Any]) -> str:
    """The item's call id as a tool_use id: Anthropic allows ``[a-zA-Z0-9_-]`` only, and ids
    made by other providers (``functions.shell:0``) are mapped the same way for the call and
    its output."""
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise Untranslatable(f"a {item.get('type')} item has no call_id", "input")
    return _ID_UNSAFE.sub("_", call_id)


def _tool_use(item: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise Untranslatable(f"a {item.get('type')} item has no name", "input")
    return {"type": "tool_use", "id": _call_id(item), "name": name, "input": arguments}


def _arguments(arguments: object) -> dict[str, Any]:
    """A function call's arguments as the object ``tool_use.input`` must be."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = jsoncodec.loads(arguments)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {"raw_arguments": arguments}


def _thinking_block(item: dict[str, Any]) -> dict[str, Any] | None:
    """A reasoning item this module made, as the block it came from; None for any other."""
    encrypted = item.get("encrypted_content")
    if not isinstance(encrypted, str):
        return None
    if encrypted.startswith(REDACTED_PREFIX):
        return {"type": "redacted_thinking", "data": encrypted.removeprefix(REDACTED_PREFIX)}
    if encrypted.startswith(THINKING_PREFIX):
        summary = item.get("summary")
        text = "".join(
            part["text"]
            for part in (summary if isinstance(summary, list) else [])
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
        signature = encrypted.removeprefix(THINKING_PREFIX)
        return {"type": "thinking", "thinking": text, "signature": signature}
    return None


def _custom_description(description: str, fmt: object) -> str:
    if not isinstance(fmt, dict) or fmt.get("type") != "grammar":
        note = "Put the tool's free-form input in the `input` string."
    else:
        syntax = fmt.get("syntax") if isinstance(fmt.get("syntax"), str) else "a"
        definition = fmt.get("definition") if isinstance(fmt.get("definition"), str) else ""
        note = (
            f"Put the tool's free-form input in the `input` string; it must follow this "
            f"{syntax} grammar:\n{definition}"
        )
    return f"{description}\n\n{note}" if description else note


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


# --- the stream --------------------------------------------------------------------------------


@dataclass
class _Block:
    """One content block of the upstream message, as far as the translation needs it."""

    kind: str  # text | thinking | redacted_thinking | function | custom | ignored
    signature: str = ""
    json: str = ""  # tool_use: the input JSON text received
    initial: str = ""  # tool_use: content_block_start's input, when it had one
    custom: CustomInput | None = None  # custom tool: its input, decoded as it comes


class AnthropicStream:
    """One turn's Messages stream as Responses events (see the module docstring)."""

    def __init__(
        self, body: dict[str, Any], *, response_id: str, model: str, created_at: int
    ) -> None:
        self._builder = ResponseBuilder(
            body, response_id=response_id, model=model, created_at=created_at
        )
        self._custom = {n for n, k in _tool_kinds(body.get("tools")).items() if k == "custom"}
        self._blocks: dict[int, _Block] = {}
        self._usage: dict[str, int] = {}
        self._stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self._builder.finished

    def start(self) -> list[dict[str, Any]]:
        return self._builder.start()

    def end(self) -> list[dict[str, Any]]:
        return self._builder.fail(
            "upstream_stream_error", "upstream stream ended before message_stop"
        )

    def feed(self, data: str) -> list[dict[str, Any]]:
        if self.finished or data == "[DONE]":
            return []
        try:
            event = jsoncodec.loads(data)
        except ValueError:
            return self._malformed("upstream event is not JSON")
        if not isinstance(event, dict):
            return self._malformed("upstream event is not a JSON object")
        try:
            return self._event(event)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            return self._malformed(f"upstream {event.get('type')} event could not be read ({e})")

    def _malformed(self, message: str) -> list[dict[str, Any]]:
        return self._builder.fail("upstream_stream_error", message)

    def _event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        b = self._builder
        match event.get("type"):
            case "message_start":
                self._add_usage(event["message"].get("usage"))
                return b.start()
            case "content_block_start":
                return self._block_start(_index(event), event["content_block"])
            case "content_block_delta":
                return self._block_delta(_index(event), event["delta"])
            case "content_block_stop":
                return self._block_stop(_index(event))
            case "message_delta":
                delta = event.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                    self._stop_reason = delta["stop_reason"]
                self._add_usage(event.get("usage"))
                return []
            case "message_stop":
                return self._finish()
            case "error":
                kind, message = _event_error(event)
                return b.fail(error_code(kind, message)[1], message)
            case _:  # ping, and event types added after this was written
                return []

    def _block_start(self, index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
        b = self._builder
        if index in self._blocks:
            raise ValueError(f"content block {index} started twice")
        kind = block["type"]
        if kind == "text":
            self._blocks[index] = _Block("text")
            return b.text(_str(block.get("text")), key=index)
        if kind == "thinking":
            self._blocks[index] = _Block("thinking", signature=_str(block.get("signature")))
            return b.reasoning(_str(block.get("thinking")), key=index)
        if kind == "redacted_thinking":
            self._blocks[index] = _Block("redacted_thinking")
            return b.redacted_reasoning(REDACTED_PREFIX + _str(block["data"]), key=index)
        if kind == "tool_use":
            call_id, name = block["id"], block["name"]
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise ValueError("tool_use without id or name")
            initial = block.get("input")
            first = jsoncodec.dumps(initial) if isinstance(initial, dict) and initial else ""
            if name in self._custom:
                self._blocks[index] = _Block("custom", initial=first, custom=CustomInput())
                return b.custom_tool_call(index, call_id=call_id, name=name)
            self._blocks[index] = _Block("function", initial=first)
            return b.function_call(index, call_id=call_id, name=name)
        self._blocks[index] = _Block("ignored")
        return []

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        b = self._builder
        block = self._blocks.get(index)
        if block is None:
            raise ValueError(f"delta for content block {index}, which never started")
        kind = delta["type"]
        if kind == "text_delta" and block.kind == "text":
            return b.text(_str(delta["text"]), key=index)
        if kind == "thinking_delta" and block.kind == "thinking":
            return b.reasoning(_str(delta["thinking"]), key=index)
        if kind == "signature_delta" and block.kind == "thinking":
            block.signature += _str(delta["signature"])
            return []
        if kind == "input_json_delta" and block.kind in ("function", "custom"):
            fragment = _str(delta["partial_json"])
            block.json += fragment
            if block.kind == "function":
                return b.function_arguments(index, fragment)
            assert block.custom is not None
            return b.custom_input(index, block.custom.feed(fragment))
        return []  # citations_delta and kinds added after this was written

    def _block_stop(self, index: int) -> list[dict[str, Any]]:
        b = self._builder
        block = self._blocks.get(index)
        if block is None:
            raise ValueError(f"content block {index} stopped, but never started")
        events: list[dict[str, Any]] = []
        if block.kind == "thinking" and block.signature:
            events += b.reasoning_encrypted(THINKING_PREFIX + block.signature, key=index)
        elif block.kind == "function" and not block.json:
            events += b.function_arguments(index, block.initial or "{}")
        elif block.kind == "custom":
            assert block.custom is not None
            if not block.json and block.initial:  # the whole input came with the block's start
                events += b.custom_input(index, block.custom.feed(block.initial))
            events += b.custom_input(index, block.custom.finish())
        return events + b.close(index)

    def _finish(self) -> list[dict[str, Any]]:
        u = self._usage
        usage = None
        if u:
            cached = u.get("cache_read_input_tokens", 0)
            usage = Usage(
                input_tokens=u.get("input_tokens", 0)
                + cached
                + u.get("cache_creation_input_tokens", 0),
                output_tokens=u.get("output_tokens", 0),
                cached_tokens=cached,
            )
        reason = self._stop_reason
        if reason in ("max_tokens", "model_context_window_exceeded"):
            return self._builder.finish(incomplete="max_output_tokens", usage=usage)
        if reason == "refusal":
            return self._builder.finish(incomplete="content_filter", usage=usage)
        return self._builder.finish(usage=usage)

    def _add_usage(self, usage: object) -> None:
        """Keep Anthropic's counts; a later event's count replaces an earlier one (message_delta
        counts are cumulative)."""
        if isinstance(usage, dict):
            for name, value in usage.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    self._usage[name] = value


def _index(event: dict[str, Any]) -> int:
    index = event["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError("content block index is not an integer")
    return index


def _str(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _event_error(event: dict[str, Any]) -> tuple[str | None, str]:
    error = event.get("error")
    if isinstance(error, dict):
        kind = error.get("type")
        message = error.get("message")
        return (
            kind if isinstance(kind, str) else None,
            message if isinstance(message, str) else "upstream reported an error",
        )
    return None, "upstream reported an error"
