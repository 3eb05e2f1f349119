"""The Anthropic Messages translation: Responses requests → Messages requests, Messages streams →
the Responses events Codex renders, and Anthropic errors → Responses errors.

Golden files (``tests/golden/anthropic/*.json``) hold the exact translation of each scenario,
byte for byte (key order included). After a deliberate change, rewrite them with
``CCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_translate_anthropic.py`` and read
the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.web.client import Agent, HTTPConnectionPool

from cch.sse import SSEDecoder
from cch.testing import FakeUpstream
from cch.testing import anthropic_scripts as fake
from cch.testing.scripts import Raw
from cch.translate.anthropic import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    REDACTED_PREFIX,
    THINKING_PREFIX,
    AnthropicApi,
)
from cch.translate.api import Untranslatable, UpstreamRequest

GOLDEN = Path(__file__).parent / "golden" / "anthropic"
UPDATE = os.environ.get("CCH_UPDATE_GOLDEN") == "1"

RESPONSE_ID = "resp_golden"
CREATED_AT = 1767225600
MODEL = "claude-sonnet-4-5"
SIGNATURE = "EqQBCkYIARgCKkCx3l+9rS/4Qk2wq0m7vP1Zf0Tt8Yx2Qe+ZJ0n7G5h6p/Kz9w==\u00e9"
REDACTED = (
    "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB8URj"
)

APPLY_PATCH_GRAMMAR = (
    'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\n'
    'end_patch: "*** End Patch" LF?\n'
)
CODEX_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command and returns its output.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "array", "items": {"type": "string"}},
                "workdir": {"type": "string"},
                "timeout_ms": {"type": "number"},
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files.",
        "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_GRAMMAR},
    },
    {
        "type": "function",
        "name": "update_plan",
        "description": "Updates the task plan.",
        "strict": False,
        "parameters": {
            "type": "object",
            "properties": {"plan": {"type": "array", "items": {"type": "object"}}},
            "required": ["plan"],
        },
    },
    {"type": "web_search", "external_web_access": False},
    {"type": "local_shell"},
    {"type": "image_generation", "output_format": "png"},
]


def developer(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "developer",
        "content": [{"type": "input_text", "text": text}],
    }


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}


def output(call_id: str, text: Any) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def codex_body(input: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A turn as Codex 0.169 sends it (docs/codex.md), ``previous_response_id`` resolved."""
    body: dict[str, Any] = {
        "type": "response.create",
        "model": "gpt-5.5",
        "instructions": "You are Codex, a coding agent.",
        "input": input,
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a0c2-5b1e-7c3d-9e2f-1a2b3c4d5e6f",
        "text": {"verbosity": "low"},
        "client_metadata": {"request_kind": "turn"},
    }
    body.pop("type")
    return {**body, **fields}


def translate(body: dict[str, Any], api: AnthropicApi | None = None) -> UpstreamRequest:
    return (api or AnthropicApi()).request(body, model=MODEL, api_key="sk-ant-test")


def request_json(request: UpstreamRequest) -> dict[str, Any]:
    return {
        "path": request.path,
        "headers": request.headers,
        "body": request.body,
        "dropped": list(request.dropped),
    }


def run(events: list[Any], body: dict[str, Any] | None = None, *, end: bool = True) -> list[Any]:
    """Everything a translation makes for ``events`` (objects or raw data text)."""
    stream = AnthropicApi().stream(
        body if body is not None else codex_body([user("hi")]),
        response_id=RESPONSE_ID,
        model="gpt-5.5",
        created_at=CREATED_AT,
    )
    out = stream.start()
    for event in events:
        out += stream.feed(event if isinstance(event, str) else json.dumps(event))
    if end:
        out += stream.end()
    assert stream.finished
    return out


# What a stream golden keeps of each ``response`` object: the rest echoes the request, which is
# the builder's business (cch/translate/responses.py), not this translation's.
RESPONSE_FIELDS = ("id", "status", "error", "incomplete_details", "model", "output", "usage")


def trimmed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**e, "response": {k: e["response"][k] for k in RESPONSE_FIELDS}} if "response" in e else e
        for e in events
    ]


def golden(name: str, value: Any) -> None:
    """``value`` must be exactly the golden file ``name`` (rewritten with CCH_UPDATE_GOLDEN=1)."""
    if isinstance(value, list):
        value = trimmed(value)
    path = GOLDEN / f"{name}.json"
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}: run with CCH_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


def terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1]["response"]


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --- request: golden ---------------------------------------------------------------------------


def test_request_first_codex_turn_golden() -> None:
    body = codex_body(
        [
            developer(
                "<permissions instructions>sandbox: workspace-write</permissions instructions>"
            ),
            user("<environment_context><cwd>/work</cwd></environment_context>"),
            user("List the files, please."),
        ]
    )
    request = translate(body)
    golden("request_first_turn", request_json(request))
    assert request.dropped == ("tool web_search", "tool local_shell", "tool image_generation")


def test_request_tool_history_golden() -> None:
    """Calls (parallel, custom, unparseable arguments, no arguments) and their outputs (a
    string, an empty string, parts with an image) become tool_use and tool_result blocks."""
    body = codex_body(
        [
            user("Fix the bug."),
            assistant("I'll look around."),
            call("toolu_01", "shell", '{"command":["ls"]}'),
            call("toolu_02", "shell", '{"command":["cat","a.py"]'),  # cut off
            output("toolu_01", "a.py\nb.py\n"),
            output("toolu_02", ""),
            {
                "type": "custom_tool_call",
                "call_id": "toolu_03",
                "name": "apply_patch",
                "input": "*** Begin Patch\n*** Update File: a.py\n-x\n+y\n*** End Patch\n",
                "status": "completed",
            },
            {"type": "custom_tool_call_output", "call_id": "toolu_03", "output": "Success."},
            call("toolu_04", "update_plan", ""),
            output(
                "toolu_04",
                [
                    {"type": "input_text", "text": "Plan updated"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                ],
            ),
            user("Thanks. Now run the tests."),
        ]
    )
    request = translate(body)
    golden("request_tool_history", request_json(request))


def test_request_images_golden() -> None:
    body = codex_body(
        [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in these?"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,iVBORw0KGgo=",
                        "detail": "high",
                    },
                    {"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="},
                    {"type": "input_image", "image_url": "https://example.com/cat.webp"},
                    {"type": "input_image", "file_id": "file-abc"},
                    {"type": "input_file", "file_id": "file-def"},
                ],
            }
        ],
        tools=[],
        reasoning=None,
    )
    request = translate(body)
    golden("request_images", request_json(request))
    assert request.dropped == ("input_image by file_id", "content part input_file")


def test_request_reasoning_golden() -> None:
    """Anthropic's own thinking comes back as thinking / redacted_thinking blocks, first in
    their assistant turn; reasoning from another provider is dropped."""
    body = codex_body(
        [
            user("Hi"),
            {
                "type": "reasoning",
                "id": "rs_openai",
                "summary": [{"type": "summary_text", "text": "**Greeting**"}],
                "encrypted_content": "gAAAAABo-openai-encrypted",
            },
            assistant("Hello!"),
            user("Run ls."),
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "I should run ls."}],
                "encrypted_content": THINKING_PREFIX + SIGNATURE,
            },
            {"type": "reasoning", "summary": [], "encrypted_content": REDACTED_PREFIX + REDACTED},
            call("toolu_01", "shell", '{"command":["ls"]}'),
            output("toolu_01", "a.py"),
        ],
        reasoning={"effort": "high"},
    )
    request = translate(body)
    golden("request_reasoning", request_json(request))
    assert request.body["thinking"] == {"type": "enabled", "budget_tokens": 20480}


def test_request_unknown_fields_and_items_dropped_golden() -> None:
    body = codex_body(
        [
            user("Hi"),
            {"type": "local_shell_call", "call_id": "c1", "status": "completed", "action": {}},
            {"type": "web_search_call", "status": "completed", "action": {"type": "search"}},
            {"type": "compaction", "encrypted_content": "opaque"},
            {"type": "item_reference", "id": "msg_1"},
            user("Again"),
        ],
        some_future_field={"x": 1},
        top_logprobs=0,
        text={
            "verbosity": "low",
            "format": {
                "type": "json_schema",
                "name": "answer",
                "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
            },
        },
    )
    request = translate(body)
    golden("request_dropped", request_json(request))
    assert request.dropped == (
        "field some_future_field",
        "input item local_shell_call",
        "input item web_search_call",
        "input item compaction",
        "input item item_reference",
        "text.format json_schema (asked for in the system prompt)",
        "tool web_search",
        "tool local_shell",
        "tool image_generation",
    )


# --- request: rules ----------------------------------------------------------------------------


def test_request_headers_path_and_no_key() -> None:
    request = AnthropicApi().request(codex_body([user("hi")]), model=MODEL, api_key=None)
    assert request.path == "/messages"
    assert request.headers == {"anthropic-version": ANTHROPIC_VERSION}
    with_key = translate(codex_body([user("hi")]))
    assert with_key.headers == {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-test"}


def test_request_string_input_and_model_name() -> None:
    body = translate({"model": "gpt-5.5", "input": "hello"}).body
    assert body == {
        "model": MODEL,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
        "stream": True,
    }


def test_request_consecutive_user_items_merge_and_developer_goes_to_system() -> None:
    body = codex_body([user("a"), developer("mid-conversation rule"), user("b"), user("c")])
    request = translate(body, AnthropicApi(prompt_caching=False))
    assert request.body["system"] == [
        {"type": "text", "text": "You are Codex, a coding agent."},
        {"type": "text", "text": "mid-conversation rule"},
    ]
    assert request.body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
                {"type": "text", "text": "c"},
            ],
        }
    ]


def test_request_empty_text_parts_and_empty_messages_are_skipped() -> None:
    body = codex_body([user(""), user("real"), assistant(""), user("more")])
    messages = translate(body, AnthropicApi(prompt_caching=False)).body["messages"]
    assert messages == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "real"}, {"type": "text", "text": "more"}],
        }
    ]


def test_request_tool_results_come_first_in_their_user_message() -> None:
    """Codex sends an image a tool produced as a user message after the output: merged, the
    tool_result still leads."""
    body = codex_body(
        [
            user("Look at it"),
            call("toolu_1", "view_image", '{"path":"a.png"}'),
            user("(the image)"),
            output("toolu_1", "attached"),
        ]
    )
    messages = translate(body, AnthropicApi(prompt_caching=False)).body["messages"]
    assert [b["type"] for b in messages[2]["content"]] == ["tool_result", "text"]


def test_request_interleaved_parallel_calls_rejoin_their_assistant_turn() -> None:
    """call A, output A, call B, output B (how some Codex versions record parallel calls) keeps
    the thinking block first in one assistant turn, and thinking stays on."""
    body = codex_body(
        [
            user("go"),
            {"type": "reasoning", "summary": [], "encrypted_content": THINKING_PREFIX + "sig"},
            call("toolu_A", "shell", "{}"),
            output("toolu_A", "a"),
            call("toolu_B", "shell", "{}"),
            output("toolu_B", "b"),
        ]
    )
    request = translate(body, AnthropicApi(prompt_caching=False))
    messages = request.body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [b["type"] for b in messages[1]["content"]] == ["thinking", "tool_use", "tool_use"]
    assert [b["tool_use_id"] for b in messages[2]["content"]] == ["toolu_A", "toolu_B"]
    assert "thinking" in request.body


def test_request_missing_tool_result_is_made_and_orphan_result_becomes_text() -> None:
    body = codex_body(
        [
            user("go"),
            call("toolu_A", "shell", "{}"),
            user("never mind"),
            output("toolu_GONE", "late output"),
        ]
    )
    messages = translate(body, AnthropicApi(prompt_caching=False)).body["messages"]
    assert messages[2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_A",
                "content": "No result was recorded for this tool call.",
                "is_error": True,
            },
            {"type": "text", "text": "never mind"},
            {"type": "text", "text": "Result of tool call toolu_GONE:\nlate output"},
        ],
    }


def test_request_foreign_call_ids_are_made_valid_on_both_sides() -> None:
    body = codex_body(
        [user("go"), call("functions.shell:0", "shell", "{}"), output("functions.shell:0", "ok")],
        reasoning=None,
    )
    [_, turn, results] = translate(body, AnthropicApi(prompt_caching=False)).body["messages"]
    assert turn["content"][0]["id"] == "functions_shell_0"
    assert results["content"] == [
        {"type": "tool_result", "tool_use_id": "functions_shell_0", "content": "ok"}
    ]


def test_request_conversation_ending_in_a_call_gets_its_result() -> None:
    body = codex_body([user("go"), call("toolu_A", "shell", "{}")], reasoning=None)
    messages = translate(body, AnthropicApi(prompt_caching=False)).body["messages"]
    assert messages[-1]["role"] == "user"
    assert messages[-1]["content"][0]["tool_use_id"] == "toolu_A"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("   ", {}),
        ("[1, 2]", {"raw_arguments": "[1, 2]"}),
        ('"text"', {"raw_arguments": '"text"'}),
        ('{"a": ', {"raw_arguments": '{"a": '}),
    ],
)
def test_request_function_arguments(arguments: str, expected: dict[str, Any]) -> None:
    body = codex_body([user("go"), call("toolu_A", "shell", arguments), output("toolu_A", "ok")])
    assert translate(body).body["messages"][1]["content"][0]["input"] == expected


@pytest.mark.parametrize(
    ("choice", "expected", "dropped"),
    [
        ("auto", {"type": "auto"}, ()),
        (None, {"type": "auto"}, ()),
        ("none", {"type": "none"}, ()),
        ("required", {"type": "any"}, ()),
        ({"type": "function", "name": "shell"}, {"type": "tool", "name": "shell"}, ()),
        ({"type": "custom", "name": "apply_patch"}, {"type": "tool", "name": "apply_patch"}, ()),
        ({"type": "function", "name": "nope"}, {"type": "auto"}, ("tool_choice function nope",)),
        ({"type": "web_search"}, {"type": "auto"}, ("tool_choice web_search",)),
        (
            {"type": "allowed_tools", "mode": "required", "tools": []},
            {"type": "any"},
            ("tool_choice allowed_tools (every tool stays allowed)",),
        ),
    ],
)
def test_request_tool_choice(
    choice: Any, expected: dict[str, Any], dropped: tuple[str, ...]
) -> None:
    body = codex_body([user("go")], tool_choice=choice, reasoning=None, tools=CODEX_TOOLS[:3])
    request = translate(body)
    assert request.body["tool_choice"] == expected
    assert request.dropped == dropped


def test_request_parallel_tool_calls_false_disables_parallel_use() -> None:
    body = codex_body([user("go")], parallel_tool_calls=False)
    assert translate(body).body["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    body = codex_body([user("go")], parallel_tool_calls=False, tool_choice="none")
    assert translate(body).body["tool_choice"] == {"type": "none"}


def test_request_without_sendable_tools_omits_tools_and_choice() -> None:
    body = codex_body([user("go")], tools=[{"type": "web_search"}], tool_choice="required")
    request = translate(body)
    assert "tools" not in request.body and "tool_choice" not in request.body
    assert request.dropped == ("tool web_search", "tool_choice (no tool to choose)")


def test_request_custom_tool_schema_and_grammar_in_description() -> None:
    [tool] = translate(codex_body([user("go")], tools=[CODEX_TOOLS[1]])).body["tools"]
    assert tool["input_schema"]["properties"]["input"]["type"] == "string"
    assert tool["input_schema"]["required"] == ["input"]
    assert APPLY_PATCH_GRAMMAR in tool["description"]
    assert tool["description"].startswith("Use the `apply_patch` tool to edit files.\n\n")


@pytest.mark.parametrize(
    ("effort", "max_output_tokens", "budget"),
    [
        ("minimal", None, 1024),
        ("low", None, 4096),
        ("medium", None, 10240),
        ("high", None, 20480),
        ("xhigh", None, 28672),
        ("high", 8000, 8000 - 1024),
        ("minimal", 2048, 1024),
        ("none", None, None),
        (None, None, None),
        ("low", 2047, None),
    ],
)
def test_request_reasoning_effort_to_thinking_budget(
    effort: str | None, max_output_tokens: int | None, budget: int | None
) -> None:
    body = codex_body(
        [user("go")], reasoning={"effort": effort}, max_output_tokens=max_output_tokens
    )
    request = translate(body)
    assert request.body["max_tokens"] == (max_output_tokens or DEFAULT_MAX_TOKENS)
    if budget is None:
        assert "thinking" not in request.body
    else:
        assert request.body["thinking"] == {"type": "enabled", "budget_tokens": budget}
        assert budget < request.body["max_tokens"]


def test_request_forced_tool_turns_thinking_off() -> None:
    request = translate(codex_body([user("go")], tool_choice="required"))
    assert "thinking" not in request.body
    assert "reasoning.effort (tool_choice forces a tool)" in request.dropped


def test_request_tool_loop_without_thinking_block_turns_thinking_off() -> None:
    """History from another provider has tool calls without thinking blocks: Anthropic would
    refuse thinking for this request, so it is left out (and said)."""
    body = codex_body([user("go"), call("toolu_A", "shell", "{}"), output("toolu_A", "ok")])
    request = translate(body)
    assert "thinking" not in request.body
    assert "reasoning.effort (last tool-calling turn has no thinking block)" in request.dropped


def test_request_sampling_rules() -> None:
    plain = translate(codex_body([user("go")], reasoning=None, temperature=0.2, top_p=0.5))
    assert plain.body["temperature"] == 0.2 and "top_p" not in plain.body
    assert plain.dropped[-1] == "top_p (a temperature is set)"

    clamped = translate(codex_body([user("go")], reasoning=None, temperature=1.7))
    assert clamped.body["temperature"] == 1.0

    thinking = translate(codex_body([user("go")], temperature=0.2, top_p=0.97))
    assert "temperature" not in thinking.body and thinking.body["top_p"] == 0.97
    low_p = translate(codex_body([user("go")], top_p=0.5))
    assert "top_p" not in low_p.body
    assert "top_p (below 0.95 with thinking on)" in low_p.dropped


def test_request_prompt_caching_can_be_turned_off() -> None:
    body = translate(codex_body([user("go")]), AnthropicApi(prompt_caching=False)).body
    assert "cache_control" not in json.dumps(body)


def test_request_cache_breakpoint_skips_a_trailing_thinking_block() -> None:
    body = codex_body(
        [
            user("go"),
            {"type": "reasoning", "summary": [], "encrypted_content": THINKING_PREFIX + "s"},
        ],
        reasoning=None,
    )
    [_, last] = translate(body).body["messages"]
    assert last["content"] == [{"type": "thinking", "thinking": "", "signature": "s"}]


def test_request_does_not_mutate_the_client_body() -> None:
    body = codex_body([user("go"), call("toolu_A", "shell", "{}"), output("toolu_A", "ok")])
    before = json.dumps(body)
    translate(body)
    translate(body)
    assert json.dumps(body) == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": [developer("only instructions")]}, "input"),
        ({"model": "m", "input": 42}, "input"),
        ({"model": "m", "input": [{"type": "message", "role": "tool", "content": []}]}, "input"),
        ({"model": "m", "input": [user("x"), {"type": "function_call", "name": "f"}]}, "input"),
        (
            {
                "model": "m",
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "data:image/png,raw"}],
                    }
                ],
            },
            "input",
        ),
        ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
        ({"model": "m", "input": "x", "background": True}, "background"),
    ],
)
def test_request_untranslatable(body: dict[str, Any], param: str) -> None:
    with pytest.raises(Untranslatable) as caught:
        translate(body)
    assert caught.value.param == param


# --- stream: golden ----------------------------------------------------------------------------


def test_stream_text_answer_golden() -> None:
    events = run(fake.text_answer_events("Hello there, friend.", cache_read=100, cache_creation=7))
    golden("stream_text", events)
    assert terminal(events)["usage"] == {
        "input_tokens": 25 + 100 + 7,
        "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 135,
    }


def test_stream_thinking_then_text_golden() -> None:
    events = run(fake.thinking_answer_events(signature=SIGNATURE))
    golden("stream_thinking", events)
    reasoning = terminal(events)["output"][0]
    assert reasoning["encrypted_content"] == THINKING_PREFIX + SIGNATURE


def test_stream_tool_call_in_many_chunks_golden() -> None:
    upstream = fake.tool_call_chunked_events(chunks=12)
    fragments = [
        e["delta"]["partial_json"]
        for e in upstream
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    events = run(upstream)
    golden("stream_tool_call_chunked", events)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(fragments) > 10 and deltas == [f for f in fragments if f]
    arguments = terminal(events)["output"][1]["arguments"]
    assert json.loads(arguments) == {"command": ["ls", "-la", "/tmp"], "timeout_ms": 1000}


def test_stream_two_tool_calls_golden() -> None:
    events = run(fake.two_tool_calls_events())
    golden("stream_two_tool_calls", events)
    calls = terminal(events)["output"]
    assert [(c["call_id"], c["arguments"]) for c in calls] == [
        ("toolu_01A", '{"command":["pwd"]}'),
        ("toolu_01B", '{"command":["ls"]}'),
    ]


def test_stream_custom_tool_call_streams_unwrapped_input_golden() -> None:
    patch = '*** Begin Patch\n*** Add File: hello.py\n+print("hi\\tthere")\n*** End Patch\n'
    events = run(
        fake.tool_call_chunked_events(
            name="apply_patch", arguments={"input": patch}, chunks=9, text=None
        )
    )
    golden("stream_custom_tool_call", events)
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 5 and "".join(deltas) == patch
    [item] = terminal(events)["output"]
    assert (item["type"], item["name"], item["input"]) == ("custom_tool_call", "apply_patch", patch)


def test_stream_redacted_thinking_golden() -> None:
    events = run(
        [
            fake.message_start(),
            *fake.redacted_thinking_block(0, REDACTED),
            *fake.thinking_block(1, "Visible part.", SIGNATURE),
            *fake.text_block(2, "Done."),
            fake.message_delta("end_turn"),
            fake.message_stop(),
        ]
    )
    golden("stream_redacted_thinking", events)
    redacted = terminal(events)["output"][0]
    assert redacted == {
        "id": "rs_golden_0",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": REDACTED_PREFIX + REDACTED,
    }


def test_stream_max_tokens_is_incomplete_golden() -> None:
    events = run(fake.max_tokens_stop_events())
    golden("stream_max_tokens", events)
    assert events[-1]["type"] == "response.incomplete"
    assert terminal(events)["incomplete_details"] == {"reason": "max_output_tokens"}


def test_stream_error_event_mid_stream_fails_golden() -> None:
    events = run(fake.error_mid_stream_events())
    golden("stream_error_mid_stream", events)
    assert events[-1]["type"] == "response.failed"
    assert terminal(events)["error"] == {"code": "server_is_overloaded", "message": "Overloaded"}
    assert "response.output_item.done" not in types(events)


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("overloaded_error", "server_is_overloaded"),
        ("api_error", "upstream_error"),
        ("rate_limit_error", "rate_limit_exceeded"),
        ("invalid_request_error", "invalid_request_error"),
        ("something_new", "upstream_error"),
    ],
)
def test_stream_error_event_codes(kind: str, code: str) -> None:
    events = run([fake.message_start(), fake.error_event(kind, "boom")])
    assert terminal(events)["error"] == {"code": code, "message": "boom"}


@pytest.mark.parametrize(
    ("stop_reason", "terminal_type", "details"),
    [
        ("end_turn", "response.completed", None),
        ("tool_use", "response.completed", None),
        ("stop_sequence", "response.completed", None),
        ("pause_turn", "response.completed", None),
        (None, "response.completed", None),
        ("max_tokens", "response.incomplete", {"reason": "max_output_tokens"}),
        ("model_context_window_exceeded", "response.incomplete", {"reason": "max_output_tokens"}),
        ("refusal", "response.incomplete", {"reason": "content_filter"}),
        ("a_new_reason", "response.completed", None),
    ],
)
def test_stream_stop_reasons(
    stop_reason: str | None, terminal_type: str, details: dict[str, str] | None
) -> None:
    events = run(
        [
            fake.message_start(),
            *fake.text_block(0, "x"),
            fake.message_delta(stop_reason),
            fake.message_stop(),
        ]
    )
    assert events[-1]["type"] == terminal_type
    assert terminal(events)["incomplete_details"] == details


def test_stream_body_ending_before_message_stop_fails() -> None:
    events = run([fake.message_start(), *fake.text_block(0, "Hi"), fake.message_delta("end_turn")])
    assert events[-1]["type"] == "response.failed"
    assert terminal(events)["error"]["code"] == "upstream_stream_error"


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[1, 2]",
        json.dumps(
            {
                "type": "content_block_delta",
                "index": 5,
                "delta": {"type": "text_delta", "text": "x"},
            }
        ),
        json.dumps({"type": "content_block_start", "index": 0}),
        json.dumps({"type": "content_block_stop", "index": "0"}),
        json.dumps({"type": "message_start"}),
    ],
)
def test_stream_malformed_event_fails(bad: str) -> None:
    events = run([bad, fake.message_stop()])
    assert types(events)[-1] == "response.failed"
    assert terminal(events)["error"]["code"] == "upstream_stream_error"


def test_stream_ping_done_and_unknown_events_are_ignored() -> None:
    plain = run(fake.text_answer_events("Hi"))
    noisy = run(
        [
            fake.ping(),
            *fake.text_answer_events("Hi")[:-1],
            fake.ping(),
            {"type": "some_future_event", "x": 1},
            "[DONE]",
            fake.message_stop(),
        ]
    )
    assert noisy == plain


def test_stream_ignores_unknown_blocks_and_deltas() -> None:
    events = run(
        [
            fake.message_start(),
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {
                    "type": "server_tool_use",
                    "id": "s",
                    "name": "web_search",
                    "input": {},
                },
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "{}"},
            },
            {"type": "content_block_stop", "index": 0},
            *fake.text_block(1, "Answer."),
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "citations_delta", "citation": {}},
            },
            fake.message_delta("end_turn"),
            fake.message_stop(),
        ]
    )
    assert [item["type"] for item in terminal(events)["output"]] == ["message"]


def test_stream_tool_use_without_input_deltas_has_empty_object_arguments() -> None:
    start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "update_plan", "input": {}},
    }
    events = run(
        [
            fake.message_start(),
            start,
            {"type": "content_block_stop", "index": 0},
            fake.message_delta("tool_use"),
            fake.message_stop(),
        ]
    )
    assert terminal(events)["output"][0]["arguments"] == "{}"


def test_stream_message_delta_usage_replaces_message_start_counts() -> None:
    """Newer Messages streams repeat the input counts, cumulatively, in message_delta."""
    delta = fake.message_delta("end_turn", 30)
    delta["usage"].update(input_tokens=40, cache_read_input_tokens=500)
    events = run(
        [fake.message_start(input_tokens=10), *fake.text_block(0, "x"), delta, fake.message_stop()]
    )
    usage = terminal(events)["usage"]
    assert (usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]) == (540, 500)
    assert usage["output_tokens"] == 30


def test_stream_from_sse_bytes_in_small_fragments_matches_event_by_event() -> None:
    """The script's bytes (``event:`` lines and all), cut into 7-byte writes and decoded as the
    gateway decodes them, translate exactly as the event objects do."""
    events = fake.thinking_answer_events(signature=SIGNATURE)
    script = fake.messages_sse(events, chunk_size=7)
    decoder = SSEDecoder()
    data: list[str] = []
    for step in script.steps:
        assert isinstance(step, Raw) and len(step.data) <= 7
        data += decoder.feed(step.data)
    assert run(data) == run(events)


def test_stream_events_after_the_terminal_are_ignored() -> None:
    stream = AnthropicApi().stream(
        codex_body([user("hi")]), response_id=RESPONSE_ID, model="m", created_at=0
    )
    stream.start()
    for event in fake.text_answer_events("Hi"):
        stream.feed(json.dumps(event))
    assert stream.finished
    assert stream.feed(json.dumps(fake.error_event())) == []
    assert stream.end() == []


# --- round trip --------------------------------------------------------------------------------


def test_thinking_signature_round_trips_byte_identical() -> None:
    """A thinking block streamed in one turn comes back, in the next turn's request, as the same
    thinking block: same text, byte-identical signature; a redacted block keeps its data."""
    thinking = "The user wants the files listed.\nI'll run `ls` — carefully."
    events = run(
        [
            fake.message_start(),
            *fake.thinking_block(0, thinking, SIGNATURE, pieces=fake.split(thinking, 7)),
            *fake.redacted_thinking_block(1, REDACTED),
            *fake.text_block(2, "Listing."),
            *fake.tool_use_block(3, "toolu_9", "shell", '{"command":["ls"]}', chunks=3),
            fake.message_delta("tool_use"),
            fake.message_stop(),
        ]
    )
    produced = terminal(events)["output"]
    # What Codex sends back: the items as received, then the tool's output.
    body = codex_body([user("List files"), *produced, output("toolu_9", "a.py")])
    request = translate(body, AnthropicApi(prompt_caching=False))
    [_, turn, results] = request.body["messages"]
    assert turn["content"] == [
        {"type": "thinking", "thinking": thinking, "signature": SIGNATURE},
        {"type": "redacted_thinking", "data": REDACTED},
        {"type": "text", "text": "Listing."},
        {"type": "tool_use", "id": "toolu_9", "name": "shell", "input": {"command": ["ls"]}},
    ]
    assert results["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": "a.py"}
    ]
    assert request.body["thinking"]["type"] == "enabled"
    golden("round_trip_request", request_json(request))


def test_custom_tool_call_round_trips() -> None:
    patch = "*** Begin Patch\n*** Delete File: x\n*** End Patch"
    events = run(
        fake.tool_call_chunked_events(name="apply_patch", arguments={"input": patch}, text=None)
    )
    [item] = terminal(events)["output"]
    body = codex_body(
        [
            user("Delete x"),
            item,
            {"type": "custom_tool_call_output", "call_id": item["call_id"], "output": "Done"},
        ],
        reasoning=None,
    )
    [_, turn, _] = translate(body).body["messages"]
    assert turn["content"] == [
        {"type": "tool_use", "id": "toolu_01Fake", "name": "apply_patch", "input": {"input": patch}}
    ]


# --- errors ------------------------------------------------------------------------------------


def anthropic_error(kind: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            429,
            anthropic_error("rate_limit_error", "Slow down"),
            ("rate_limit_error", "rate_limit_exceeded", "Slow down"),
        ),
        (
            529,
            anthropic_error("overloaded_error", "Overloaded"),
            ("server_error", "server_is_overloaded", "Overloaded"),
        ),
        (
            401,
            anthropic_error("authentication_error", "invalid x-api-key"),
            ("authentication_error", "upstream_auth_error", "invalid x-api-key"),
        ),
        (
            403,
            anthropic_error("permission_error", "no access"),
            ("authentication_error", "upstream_auth_error", "no access"),
        ),
        (
            400,
            anthropic_error("invalid_request_error", "messages: roles must alternate"),
            ("invalid_request_error", "invalid_request_error", "messages: roles must alternate"),
        ),
        (
            400,
            anthropic_error(
                "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"
            ),
            (
                "invalid_request_error",
                "context_length_exceeded",
                "prompt is too long: 210000 tokens > 200000 maximum",
            ),
        ),
        (
            404,
            anthropic_error("not_found_error", "model: claude-nope"),
            ("invalid_request_error", "model_not_found", "model: claude-nope"),
        ),
        (
            402,
            anthropic_error("billing_error", "credit balance too low"),
            ("insufficient_quota", "insufficient_quota", "credit balance too low"),
        ),
        (
            413,
            anthropic_error("request_too_large", "too big"),
            ("invalid_request_error", "request_too_large", "too big"),
        ),
        (
            500,
            anthropic_error("api_error", "Internal server error"),
            ("server_error", "upstream_error", "Internal server error"),
        ),
        (
            429,
            b'{"error":{"message":"OpenAI-shaped","type":"requests","code":"rate_limit_exceeded"}}',
            ("rate_limit_error", "rate_limit_exceeded", "OpenAI-shaped"),
        ),
        (
            503,
            b"<html>Service Unavailable</html>",
            ("server_error", "upstream_error", "<html>Service Unavailable</html>"),
        ),
        (
            418,
            b"",
            ("invalid_request_error", "invalid_request_error", "upstream answered HTTP 418"),
        ),
        (502, b'{"message":"bad gateway"}', ("server_error", "upstream_error", "bad gateway")),
        (401, b'{"error":"no key"}', ("authentication_error", "upstream_auth_error", "no key")),
    ],
)
def test_error_bodies(status: int, body: bytes, expected: tuple[str, str, str]) -> None:
    error_type, code, message = expected
    assert AnthropicApi().error(status, body) == {
        "error": {"type": error_type, "code": code, "message": message, "param": None}
    }


# --- the fake upstream plays these scripts -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fake_upstream_serves_messages_scripts_that_translate(reactor: Any) -> None:
    upstream = FakeUpstream(reactor)
    await upstream.listen(reactor)
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        upstream.enqueue(fake.tool_call_chunked(chunk_size=5))
        body = codex_body([user("hi")])
        request = translate(body)
        response = await treq.post(
            upstream.base_url + request.path,
            json=request.body,
            headers=request.headers,
            agent=Agent(reactor, pool=pool),
        )
        data = await treq.content(response)
        assert response.code == 200
        assert data.startswith(b"event: message_start\ndata: {")
        [recorded] = upstream.requests
        assert recorded.path == "/v1/messages"
        assert recorded.headers["anthropic-version"] == "2023-06-01"
        assert recorded.body["messages"][0]["content"][0]["text"] == "hi"
        decoded = SSEDecoder().feed(data)
        assert run(decoded, body) == run(fake.tool_call_chunked_events(), body)
    finally:
        await pool.closeCachedConnections()
        await upstream.stop()


def test_anthropic_like_echoes_the_last_user_text() -> None:
    from cch.testing.fake_upstream import Recorded

    request = translate(codex_body([user("first"), assistant("ok"), user("second")]))
    raw = json.dumps(request.body).encode()
    recorded = Recorded("http", "POST", "/v1/messages", "", {}, request.body, raw)
    script = fake.anthropic_like(recorded)
    data: list[str] = []
    decoder = SSEDecoder()
    for step in script.steps:
        assert isinstance(step, Raw)
        data += decoder.feed(step.data)
    events = run(data)
    assert terminal(events)["output"][0]["content"][0]["text"] == "echo: second"


# --- property: any valid Messages stream makes a well-formed event sequence ---------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@st.composite
def blocks(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A message's content blocks: (kind, what it holds)."""
    kinds = draw(
        st.lists(
            st.sampled_from(["text", "thinking", "redacted", "function", "custom"]), max_size=6
        )
    )
    out: list[tuple[str, Any]] = []
    for kind in kinds:
        if kind in ("text", "thinking"):
            out.append((kind, draw(st.lists(_text, min_size=0, max_size=5))))
        elif kind == "redacted":
            out.append(
                (kind, draw(st.text(alphabet="ABCDEFabcdef0123456789+/=", min_size=1, max_size=20)))
            )
        elif kind == "function":
            args = draw(
                st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), _text), max_size=3)
            )
            out.append((kind, args))
        else:
            out.append((kind, draw(_text)))
    return out


def stream_events(content: list[tuple[str, Any]], pieces: list[int], stop: str | None) -> list[Any]:
    events: list[Any] = [fake.message_start(), fake.ping()]
    for index, (kind, value) in enumerate(content):
        n = pieces[index % len(pieces)]
        if kind == "text":
            events += fake.text_block(index, "".join(value), pieces=value)
        elif kind == "thinking":
            events += fake.thinking_block(index, "".join(value), f"sig{index}", pieces=value)
        elif kind == "redacted":
            events += fake.redacted_thinking_block(index, value)
        elif kind == "function":
            events += fake.tool_use_block(
                index, f"toolu_{index}", "shell", json.dumps(value), chunks=n
            )
        else:
            events += fake.tool_use_block(
                index, f"toolu_{index}", "apply_patch", {"input": value}, chunks=n
            )
    return [*events, fake.message_delta(stop), fake.message_stop()]


def check_well_formed(events: list[dict[str, Any]]) -> None:
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert types(events)[:2] == ["response.created", "response.in_progress"]
    terminals = [
        i
        for i, e in enumerate(events)
        if e["type"] in ("response.completed", "response.incomplete", "response.failed")
    ]
    assert terminals == [len(events) - 1]
    failed = events[-1]["type"] == "response.failed"
    open_item: int | None = None
    added: list[int] = []
    done: list[int] = []
    for event in events[2:-1]:
        if event["type"] == "response.output_item.added":
            assert open_item is None, "two items open at once"
            open_item = event["output_index"]
            assert open_item == len(added)
            added.append(open_item)
        elif event["type"] == "response.output_item.done":
            assert event["output_index"] == open_item
            done.append(open_item)
            open_item = None
        else:
            assert event.get("output_index") == open_item, event
    assert done == added[: len(done)]
    if not failed:
        assert done == added
        assert [item["id"] for item in terminal(events)["output"]] == [
            e["item"]["id"] for e in events if e["type"] == "response.output_item.done"
        ]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=blocks(),
    pieces=st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=4),
    stop=st.sampled_from(
        ["end_turn", "tool_use", "max_tokens", "stop_sequence", "refusal", "pause_turn", None]
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=200)),
    error=st.booleans(),
    chunk=st.integers(min_value=1, max_value=64),
)
def test_property_any_valid_stream_is_well_formed(
    content: list[tuple[str, Any]],
    pieces: list[int],
    stop: str | None,
    cut: int | None,
    error: bool,
    chunk: int,
) -> None:
    events = stream_events(content, pieces, stop)
    # The same stream as bytes in ``chunk``-sized writes, decoded as the gateway does it.
    decoder = SSEDecoder()
    data: list[str] = []
    for step in fake.messages_sse(events, chunk_size=chunk).steps:
        assert isinstance(step, Raw)
        data += decoder.feed(step.data)
    assert run(data) == run(events)
    if cut is not None:
        events = events[: min(cut, len(events) - 1)]
        if error:
            events.append(fake.error_event())
    out = run(events)
    check_well_formed(out)
    if cut is not None:
        assert out[-1]["type"] == "response.failed"
        return
    assert out[-1]["type"] == (
        "response.incomplete" if stop in ("max_tokens", "refusal") else "response.completed"
    )
    # Every item says exactly what the upstream said, and deltas add up to it.
    expected: list[tuple[str, Any]] = []
    for index, (kind, value) in enumerate(content):
        if kind == "text" and "".join(value):
            expected.append(("message", "".join(value)))
        elif kind == "thinking":
            expected.append(("reasoning", ("".join(value), THINKING_PREFIX + f"sig{index}")))
        elif kind == "redacted":
            expected.append(("reasoning", ("", REDACTED_PREFIX + value)))
        elif kind == "function":
            expected.append(("function_call", json.dumps(value)))
        elif kind == "custom":
            expected.append(("custom_tool_call", value))
    got: list[tuple[str, Any]] = []
    for item in terminal(out)["output"]:
        if item["type"] == "message":
            got.append(("message", item["content"][0]["text"]))
        elif item["type"] == "reasoning":
            text = "".join(part["text"] for part in item["summary"])
            got.append(("reasoning", (text, item["encrypted_content"])))
        elif item["type"] == "function_call":
            got.append(("function_call", item["arguments"]))
        else:
            got.append(("custom_tool_call", item["input"]))
    assert got == expected
    for item in terminal(out)["output"]:
        item_deltas = "".join(
            e["delta"]
            for e in out
            if e.get("item_id") == item["id"] and e["type"].endswith(".delta")
        )
        if item["type"] == "message":
            assert item_deltas == item["content"][0]["text"]
        elif item["type"] == "function_call":
            assert item_deltas == item["arguments"]
        elif item["type"] == "custom_tool_call":
            assert item_deltas == item["input"]
