"""The OpenAI Chat Completions API (``providers[].api = "chat"``).

Codex's Responses request becomes one streaming ``POST /chat/completions``; the chunk stream
comes back as the Responses events Codex renders (:class:`~cch.translate.responses.ResponseBuilder`).

What happens to each field of a Responses request:

====================== ===================================================================
``model``              replaced by the upstream's name (``providers[].model_map`` applied)
``instructions``       the first message, role ``system``
``input``              ``messages`` (below)
``tools``              ``function`` → a Chat function tool (``strict`` kept); ``custom``
                       (Codex's freeform ``apply_patch``) → a function with one required
                       string parameter ``input``, the grammar quoted in its description;
                       hosted tools (``web_search``, ``file_search``, ``local_shell``, any
                       unknown type) dropped and named in ``dropped``
``tool_choice``        ``auto``/``none``/``required`` kept; a named function or custom tool
                       → ``{"type":"function","function":{"name"}}``; ``allowed_tools`` →
                       its mode (the restriction is dropped, named); a hosted tool → ``auto``
                       (named). Sent only with tools, as is ``parallel_tool_calls``.
``parallel_tool_calls`` passed (with tools only: OpenAI refuses it without)
``max_output_tokens``  → ``max_completion_tokens``
``temperature``        passed
``top_p``              passed
``reasoning``          ``effort`` → ``reasoning_effort``; ``summary`` dropped (Chat has none)
``text``               ``format`` json_schema → ``response_format`` json_schema, json_object
                       → json_object, text → nothing; ``verbosity`` dropped
``user``               passed
``stream``             always ``true``, with ``stream_options: {include_usage: true}`` (the
                       usage chunk feeds ``response.completed``'s usage)
``store``              dropped: Chat's ``store`` means stored completions, not the same thing
``include``            dropped: Chat returns no encrypted reasoning
``prompt_cache_key``   dropped: not a field of most Chat servers (they cache by prefix)
``client_metadata``    dropped: Codex's own telemetry for a Responses server
``metadata``           dropped: Chat accepts it only with ``store``
``service_tier``       dropped: values differ between Chat providers
``safety_identifier``  dropped
``truncation``,        dropped (no Chat equivalent, Codex leaves them at their defaults)
``top_logprobs``,
``max_tool_calls``,
``stream_options``
``generate``           dropped: ``false`` is Codex's warm-up, which a Chat server cannot do
                       without generating (the gateway should answer it itself)
``previous_response_id`` ignored: the gateway resolved it into ``input`` already
``background``         ``true`` is untranslatable (400); ``false`` dropped
``prompt``,            untranslatable (400): they name state on an OpenAI server
``conversation``
anything else          dropped and named in ``dropped``
====================== ===================================================================

``input`` items: ``message`` → a message of its role (``developer`` and ``system`` →
``system``); text parts are joined (``input_text``/``output_text``/``refusal``), as Codex's own
Chat client did, and a user message with images becomes a list of ``text`` and ``image_url``
parts (data URLs and http URLs alike, ``detail`` kept); an image by ``file_id`` and
``input_file`` parts are dropped (named). ``function_call`` / ``custom_tool_call`` /
``local_shell_call`` → a ``tool_calls`` entry of an assistant message (a custom call's input
as the arguments ``{"input": "..."}``, a shell call's action as its arguments), merged into the
assistant message just before it, so text followed by calls is one message as Chat requires;
their outputs → ``tool`` messages (images in a tool output follow the run of tool messages as a
user message, since a tool message carries text only). ``reasoning`` items are dropped (Chat
has nothing to send them back as); other item types (``web_search_call``, compaction, ...) are
dropped and named.

Stream: ``delta.content`` (and ``delta.refusal``) → a message; ``delta.reasoning_content`` or
``delta.reasoning`` (DeepSeek, vLLM, OpenRouter) → a reasoning item shown as a summary, closed
when the text or a tool call starts; ``delta.tool_calls`` are collected by ``index`` (id and name
in the first fragment, arguments after, indexes interleaved) → ``function_call`` items, or
``custom_tool_call`` items for the request's custom tools, whose ``input`` is unwrapped from the
arguments ``{"input": "..."}`` and streamed as it decodes (arguments of another shape are
buffered and given whole when the call ends). The first call streams live; the calls after it
are sent when it is done (see ``responses``: one open item at a time). ``finish_reason``
``length`` → ``response.incomplete`` (``max_output_tokens``), ``content_filter`` →
``response.incomplete`` (``content_filter``), ``error`` → ``response.failed``, anything else
→ ``response.completed``; the terminal event waits for ``[DONE]`` (or the end of the body) so
the usage chunk that follows the finish chunk is in it. ``[DONE]`` without a ``finish_reason``
counts as completed (the upstream said it was done); a body that ends with neither, or an
``error`` object in the stream, ends the turn with ``response.failed``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from cch.translate.api import Untranslatable, UpstreamRequest
from cch.translate.custom_input import CustomInput
from cch.translate.responses import REASONING, TEXT, ResponseBuilder, Usage

__all__ = ["ChatApi", "ChatStream", "chat_error"]

PATH = "/chat/completions"

# Responses fields dropped on purpose, without a word (see the table above).
_SILENT = frozenset(
    {
        "store",
        "include",
        "prompt_cache_key",
        "client_metadata",
        "metadata",
        "service_tier",
        "safety_identifier",
        "truncation",
        "top_logprobs",
        "max_tool_calls",
        "stream_options",
        "generate",
        "previous_response_id",
        "stream",
        "background",
    }
)
# Fields the translation reads.
_READ = frozenset(
    {
        "model",
        "instructions",
        "input",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "reasoning",
        "text",
        "user",
    }
)
_UNTRANSLATABLE = ("prompt", "conversation")

_INPUT_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The tool's whole input."}},
    "required": ["input"],
    "additionalProperties": False,
}


class ChatApi:
    """The ``chat`` :class:`~cch.translate.api.Api`."""

    name = "chat"

    def request(self, body: dict[str, Any], *, model: str, api_key: str | None) -> UpstreamRequest:
        return chat_request(body, model=model, api_key=api_key)

    def stream(
        self, body: dict[str, Any], *, response_id: str, model: str, created_at: int
    ) -> ChatStream:
        return ChatStream(body, response_id=response_id, model=model, created_at=created_at)

    def error(self, status: int, body: bytes) -> dict[str, Any]:
        return chat_error(status, body)


# --- the request -------------------------------------------------------------------------------


def chat_request(body: dict[str, Any], *, model: str, api_key: str | None) -> UpstreamRequest:
    """The Chat Completions request for a Responses request ``body``."""
    dropped: list[str] = []
    for name in _UNTRANSLATABLE:
        if body.get(name) is not None:
            raise Untranslatable(f"'{name}' cannot be sent to a Chat Completions provider", name)
    if body.get("background") is True:
        raise Untranslatable("background responses need a Responses provider", "background")
    for name in body:
        if name not in _READ and name not in _SILENT and name not in _UNTRANSLATABLE:
            dropped.append(f"field {name}")

    messages = _messages(body, dropped)
    if not messages:
        raise Untranslatable("the request has no input to send", "input")
    out: dict[str, Any] = {"model": model, "messages": messages}

    tools = _tools(body.get("tools"), dropped)
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"), dropped)
        if choice is not None:
            out["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            out["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    if body.get("user") is not None:
        out["user"] = body["user"]
    out["stream"] = True
    out["stream_options"] = {"include_usage": True}

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return UpstreamRequest(PATH, headers, out, tuple(dropped))


class _Messages:
    """The Chat ``messages`` list, with the merging Chat requires."""

    def __init__(self) -> None:
        self.list: list[dict[str, Any]] = []
        self._tool_images: list[dict[str, Any]] = []

    def add(self, message: dict[str, Any]) -> None:
        self._flush_images()
        self.list.append(message)

    def tool_call(self, call: dict[str, Any]) -> None:
        """A call joins the assistant message just before it (its text or its other calls)."""
        self._flush_images()
        last = self.list[-1] if self.list else None
        if last is None or last.get("role") != "assistant":
            last = {"role": "assistant", "content": None}
            self.list.append(last)
        last.setdefault("tool_calls", []).append(call)

    def tool_result(self, call_id: str, output: object, dropped: list[str]) -> None:
        text, images = _output_parts(output, dropped)
        self.list.append({"role": "tool", "tool_call_id": call_id, "content": text})
        self._tool_images += images

    def finish(self) -> list[dict[str, Any]]:
        self._flush_images()
        return self.list

    def _flush_images(self) -> None:
        if self._tool_images:
            images, self._tool_images = self._tool_images, []
            self.list.append({"role": "user", "content": images})


def _messages(body: dict[str, Any], dropped: list[str]) -> list[dict[str, Any]]:
    messages = _Messages()
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.add({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list):
        items = []
    for item in items:
        if not isinstance(item, dict):
            raise Untranslatable("an input item is not an object", "input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            message = _message(item, dropped)
            if message is not None:
                messages.add(message)
        elif kind == "function_call":
            messages.tool_call(
                _call(item.get("call_id"), item.get("name"), _str(item.get("arguments")))
            )
        elif kind == "custom_tool_call":
            arguments = json.dumps(
                {"input": _str(item.get("input"))}, separators=(",", ":"), ensure_ascii=False
            )
            messages.tool_call(_call(item.get("call_id"), item.get("name"), arguments))
        elif kind == "local_shell_call":
            arguments = json.dumps(item.get("action") or {}, ensure_ascii=False)
            call_id = item.get("call_id") or item.get("id")
            messages.tool_call(_call(call_id, "local_shell", arguments))
        elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            messages.tool_result(_str(item.get("call_id")), item.get("output"), dropped)
        elif kind == "reasoning":
            continue
        else:
            dropped.append(f"input item {kind}")
    return messages.finish()


def _message(item: dict[str, Any], dropped: list[str]) -> dict[str, Any] | None:
    role = item.get("role")
    if role in ("developer", "system"):
        role = "system"
    elif role not in ("user", "assistant"):
        raise Untranslatable(f"a message has an unknown role {role!r}", "input")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    has_image = False
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(_str(part.get("text")))
            parts.append({"type": "text", "text": _str(part.get("text"))})
        elif kind == "refusal":
            texts.append(_str(part.get("refusal")))
            parts.append({"type": "text", "text": _str(part.get("refusal"))})
        elif kind == "input_image" and role == "user" and _image_url(part) is not None:
            has_image = True
            parts.append(_image_part(part))
        else:
            dropped.append(f"content part {kind}")
    if has_image:
        return {"role": role, "content": parts}
    if not texts:
        return None
    return {"role": role, "content": "".join(texts)}


def _image_url(part: dict[str, Any]) -> str | None:
    url = part.get("image_url")
    if isinstance(url, dict):  # tolerate Chat's own shape
        url = url.get("url")
    return url if isinstance(url, str) and url else None


def _image_part(part: dict[str, Any]) -> dict[str, Any]:
    image: dict[str, Any] = {"url": _image_url(part)}
    if isinstance(part.get("detail"), str):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _output_parts(output: object, dropped: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """A tool output as the tool message's text and the images to send after it."""
    if isinstance(output, str):
        return output, []
    if isinstance(output, dict):  # {"content": ..., "success": ...} in some clients
        return _output_parts(output.get("content", ""), dropped)
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for part in output if isinstance(output, list) else []:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(_str(part.get("text")))
        elif kind == "input_image" and _image_url(part) is not None:
            images.append(_image_part(part))
        else:
            dropped.append(f"tool output part {kind}")
    return "".join(texts), images


def _call(call_id: object, name: object, arguments: str) -> dict[str, Any]:
    return {
        "id": _str(call_id),
        "type": "function",
        "function": {"name": _str(name), "arguments": arguments},
    }


def _tools(tools: object, dropped: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools if isinstance(tools, list) else []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            function: dict[str, Any] = {"name": tool.get("name")}
            for name in ("description", "parameters", "strict"):
                if tool.get(name) is not None:
                    function[name] = tool[name]
            out.append({"type": "function", "function": function})
        elif kind == "custom":
            function = {
                "name": tool.get("name"),
                "description": _custom_description(tool),
                "parameters": _INPUT_PARAMETERS,
            }
            out.append({"type": "function", "function": function})
        else:
            dropped.append(f"tool {kind}")
    return out


def _custom_description(tool: dict[str, Any]) -> str:
    description = _str(tool.get("description"))
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        how = (
            f"Put the tool's whole input in the string parameter `input`; it must follow this "
            f"{_str(fmt.get('syntax')) or 'grammar'} grammar:\n{_str(fmt.get('definition'))}"
        )
    else:
        how = "Put the tool's whole input, free-form text, in the string parameter `input`."
    return f"{description}\n\n{how}" if description else how


def _tool_choice(choice: object, dropped: list[str]) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("function", "custom") and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if kind == "allowed_tools":
            dropped.append("tool_choice allowed_tools")
            return "required" if choice.get("mode") == "required" else "auto"
        dropped.append(f"tool_choice {kind}")
        return "auto"
    dropped.append("tool_choice")
    return None


def _response_format(text: object) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") != "json_schema":
        return None
    schema: dict[str, Any] = {"name": fmt.get("name") or "response"}
    for name in ("description", "schema", "strict"):
        if fmt.get(name) is not None:
            schema[name] = fmt[name]
    return {"type": "json_schema", "json_schema": schema}


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


# --- the stream --------------------------------------------------------------------------------


@dataclass
class _ToolCall:
    """One ``tool_calls`` entry being assembled from its fragments."""

    ordinal: int  # its place among the response's calls
    id: str = ""
    name: str = ""
    pending: str = ""  # argument text not yet given to the builder
    opened: bool = False
    custom: CustomInput | None = None
    arguments: bool = False  # any argument text came
    closed: bool = False

    @property
    def key(self) -> Hashable:
        return ("tool", self.ordinal)


class ChatStream:
    """One turn of Chat Completions chunks into Responses events (a
    :class:`~cch.translate.api.StreamTranslation`)."""

    def __init__(
        self, body: dict[str, Any], *, response_id: str, model: str, created_at: int
    ) -> None:
        self._response_id = response_id
        self._builder = ResponseBuilder(
            body, response_id=response_id, model=model, created_at=created_at
        )
        tools = body.get("tools")
        self._custom = frozenset(
            tool["name"]
            for tool in (tools if isinstance(tools, list) else [])
            if isinstance(tool, dict)
            and tool.get("type") == "custom"
            and isinstance(tool.get("name"), str)
        )
        self._calls: dict[int, _ToolCall] = {}  # by Chat's tool_calls[].index
        self._order: list[_ToolCall] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self._builder.finished

    def start(self) -> list[dict[str, Any]]:
        return self._builder.start()

    def feed(self, data: str) -> list[dict[str, Any]]:
        if self.finished:
            return []
        if data.strip() == "[DONE]":
            return self._complete()
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            return self._builder.fail("upstream_stream_error", "malformed upstream event")
        error = chunk.get("error")
        if error:
            code, message = _stream_error(error)
            return self._builder.fail(code, message)
        events = self._builder.start()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage(usage)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n = 1: only the first choice exists
            delta = choice.get("delta")
            if isinstance(delta, dict):
                events += self._delta(delta)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._finish_reason = reason
        if self._finish_reason == "error":
            events += self._builder.fail("upstream_error", "the upstream stopped with an error")
        return events

    def end(self) -> list[dict[str, Any]]:
        if self.finished:
            return []
        if self._finish_reason is not None:
            return self._complete()
        return self._builder.fail(
            "upstream_stream_error", "the upstream stream ended before it finished"
        )

    # --- internals ----------------------------------------------------------------------------

    def _delta(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        b = self._builder
        events: list[dict[str, Any]] = []
        reasoning = _reasoning_text(delta)
        if reasoning:
            events += b.reasoning(reasoning)
        for name in ("content", "refusal"):
            text = delta.get(name)
            if isinstance(text, str) and text:
                events += b.close(REASONING)
                events += b.text(text)
        calls = delta.get("tool_calls")
        for position, fragment in enumerate(calls if isinstance(calls, list) else []):
            if isinstance(fragment, dict):
                events += self._tool_fragment(position, fragment)
        return events

    def _tool_fragment(self, position: int, fragment: dict[str, Any]) -> list[dict[str, Any]]:
        b = self._builder
        index = fragment.get("index")
        index = index if isinstance(index, int) else position
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        call_id = _str(fragment.get("id"))
        name = _str(function.get("name"))
        events: list[dict[str, Any]] = []
        call = self._calls.get(index)
        if call is not None and call_id and call.id and call_id != call.id:
            # A new call reusing an index (some servers number every call 0): the old is done.
            events += self._close_call(call)
            call = None
        if call is None:
            call = self._calls[index] = _ToolCall(len(self._order))
            self._order.append(call)
        if call_id and not call.id:
            call.id = call_id
        if name and not call.name:
            call.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.pending += arguments
            call.arguments = True
        if not call.opened and call.name:
            events += b.close(REASONING) + b.close(TEXT)
            events += self._open_call(call)
        if call.opened:
            events += self._flush_call(call)
        return events

    def _open_call(self, call: _ToolCall) -> list[dict[str, Any]]:
        call.opened = True
        call_id = call.id or f"call_{self._response_id.removeprefix('resp_')}_{call.ordinal}"
        if call.name in self._custom:
            call.custom = CustomInput()
            return self._builder.custom_tool_call(call.key, call_id=call_id, name=call.name)
        return self._builder.function_call(call.key, call_id=call_id, name=call.name)

    def _flush_call(self, call: _ToolCall) -> list[dict[str, Any]]:
        pending, call.pending = call.pending, ""
        if call.custom is not None:
            return self._builder.custom_input(call.key, call.custom.feed(pending))
        return self._builder.function_arguments(call.key, pending)

    def _close_call(self, call: _ToolCall) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if call.closed:
            return events
        call.closed = True
        if not call.opened:
            if not call.pending and not call.id:
                return events  # nothing but an index: no call
            events += self._open_call(call)  # a call that never said its name
        events += self._flush_call(call)
        if call.custom is not None:
            events += self._builder.custom_input(call.key, call.custom.finish())
        elif not call.arguments:
            # Some servers send no arguments for a call without parameters; Codex parses them.
            events += self._builder.function_arguments(call.key, "{}")
        return events + self._builder.close(call.key)

    def _complete(self) -> list[dict[str, Any]]:
        events = self._builder.start()
        for call in self._order:
            events += self._close_call(call)
        self._calls.clear()
        self._order.clear()
        incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(
            self._finish_reason or ""
        )
        return events + self._builder.finish(
            incomplete=incomplete,  # type: ignore[arg-type]
            usage=self._usage,
        )


def _reasoning_text(delta: dict[str, Any]) -> str:
    """The reasoning text of a delta: ``reasoning_content`` (DeepSeek, older vLLM) or
    ``reasoning`` (OpenRouter, newer vLLM; a string, or an object with ``text``/``content``)."""
    for name in ("reasoning_content", "reasoning"):
        value = delta.get(name)
        if isinstance(value, dict):
            value = value.get("text") or value.get("content")
        if isinstance(value, str) and value:
            return value
    return ""


def _usage(usage: dict[str, Any]) -> Usage:
    def count(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    total = usage.get("total_tokens")
    return Usage(
        input_tokens=count(usage.get("prompt_tokens")),
        output_tokens=count(usage.get("completion_tokens")),
        cached_tokens=count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else 0,
        reasoning_tokens=(
            count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else 0
        ),
        total_tokens=count(total) if isinstance(total, int) else None,
    )


# --- errors ------------------------------------------------------------------------------------

# Upstream codes Codex acts on, kept as they are.
_KEPT_CODES = frozenset(
    {"context_length_exceeded", "insufficient_quota", "rate_limit_exceeded", "model_not_found"}
)
_CONTEXT_PATTERNS = re.compile(
    r"maximum context length|context length|context_length_exceeded|too many tokens|"
    r"prompt is too long|context window",
    re.IGNORECASE,
)


def chat_error(status: int, body: bytes) -> dict[str, Any]:
    """A Chat server's error answer (OpenAI ``{"error": {...}}``, vLLM ``{"object": "error",
    ...}``, Ollama ``{"error": "..."}``, FastAPI ``{"detail": ...}``, a list of those, plain
    text) as the Responses error body."""
    message, upstream_code, param = _parse_error(body)
    if not message:
        message = f"The upstream answered HTTP {status}."
    type_, code = _classify(status, upstream_code, message)
    return {"error": {"type": type_, "code": code, "message": message, "param": param}}


def _parse_error(body: bytes) -> tuple[str, str | None, str | None]:
    text = body.decode("utf-8", "replace").strip()
    try:
        value: Any = json.loads(text)
    except ValueError:
        return text[:2000], None, None
    if isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, dict):
        return text[:2000], None, None
    error = value.get("error", value)
    if isinstance(error, str):
        return error, None, None
    if not isinstance(error, dict):
        return text[:2000], None, None
    message = error.get("message") or error.get("detail") or error.get("msg")
    if not isinstance(message, str):
        message = json.dumps(message) if message is not None else ""
    code = error.get("code")
    if not isinstance(code, str):
        code = error.get("type") if isinstance(error.get("type"), str) else None
    param = error.get("param")
    return message, code, param if isinstance(param, str) else None


def _classify(status: int, upstream_code: str | None, message: str) -> tuple[str, str]:
    """``(type, code)`` of the Responses error for an upstream status and its own code."""
    if status == 429:
        if upstream_code == "insufficient_quota":
            return "insufficient_quota", "insufficient_quota"
        return "rate_limit_error", "rate_limit_exceeded"
    if status in (401, 403):
        return "authentication_error", "upstream_auth_error"
    if status >= 500:
        return "server_error", "upstream_error"
    if upstream_code in _KEPT_CODES:
        return "invalid_request_error", upstream_code
    if status == 404:
        if "model" in message.lower():
            return "invalid_request_error", "model_not_found"
        return "invalid_request_error", "upstream_not_found"
    if _CONTEXT_PATTERNS.search(message):
        return "invalid_request_error", "context_length_exceeded"
    return "invalid_request_error", "invalid_request_error"


def _stream_error(error: object) -> tuple[str, str]:
    """Code and message of an ``error`` object in the middle of a stream."""
    if isinstance(error, str):
        return "upstream_error", error
    if not isinstance(error, dict):
        return "upstream_error", "the upstream reported an error"
    message = error.get("message")
    message = message if isinstance(message, str) and message else "the upstream reported an error"
    code = error.get("code")
    if isinstance(code, str) and code:
        return code, message
    if isinstance(code, int):
        return _classify(code, None, message)[1], message
    return "upstream_error", message
