"""The Chat Completions translation (cch.translate.chat): the request Codex's Responses body
becomes, the Responses events a chunk stream becomes (golden files under tests/golden/chat/,
rewritten with ``CCH_UPDATE_GOLDEN=1``), upstream error bodies, and properties: however the
upstream cuts its answer into chunks the events are the same (up to how deltas are cut), and
always well formed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock

from cch.sse import SSEDecoder
from cch.testing import FakeUpstream
from cch.testing.chat_scripts import (
    ToolCall,
    chat_chunk,
    chat_error_after,
    chat_events,
    chat_like,
    chat_usage,
    split_text,
)
from cch.testing.scripts import CREATED_AT
from cch.translate import api_named
from cch.translate.api import Untranslatable
from cch.translate.chat import ChatApi, ChatStream
from cch.translate.custom_input import CustomInput
from tests.test_translate_responses import (
    assert_golden,
    check_well_formed,
    coalesced,
    event_lines,
)

API = ChatApi()

APPLY_PATCH_GRAMMAR = 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\n'

# What Codex sends, in little: instructions, a developer message, a user message with images,
# a reasoning item, text + calls of the last turn and their outputs, its tools.
CODEX_BODY: dict[str, Any] = {
    "model": "gpt-5.5",
    "instructions": "You are Codex.",
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [
                {"type": "input_text", "text": "<permissions>workspace-write</permissions>"}
            ],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in "},
                {"type": "input_text", "text": "these pictures?"},
                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "high"},
            ],
        },
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Look first."}],
            "encrypted_content": "gAAAA",
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look."}],
        },
        {
            "type": "function_call",
            "name": "shell",
            "arguments": '{"command":["ls"]}',
            "call_id": "call_ls",
        },
        {
            "type": "custom_tool_call",
            "name": "apply_patch",
            "input": "*** Begin Patch\n*** End Patch\n",
            "call_id": "call_patch",
        },
        {"type": "function_call_output", "call_id": "call_ls", "output": "a.png\nb.jpg\n"},
        {"type": "custom_tool_call_output", "call_id": "call_patch", "output": "Done!"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks."}]},
    ],
    "tools": [
        {
            "type": "function",
            "name": "shell",
            "description": "Runs a shell command.",
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                "required": ["command"],
                "additionalProperties": False,
            },
        },
        {
            "type": "custom",
            "name": "apply_patch",
            "description": "Edit files with a patch.",
            "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_GRAMMAR},
        },
        {"type": "web_search", "external_web_access": False},
        {"type": "local_shell"},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199-session",
    "text": {"verbosity": "low"},
    "client_metadata": {"request_kind": "turn"},
}


def request(body: dict[str, Any], **kwargs: Any) -> Any:
    return API.request(
        body, model=kwargs.pop("model", "deepseek-chat"), api_key=kwargs.pop("api_key", "sk-up")
    )


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    return request(body).body["messages"]


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


# --- the request ---------------------------------------------------------------------------------


def test_codex_request_golden() -> None:
    translated = request(CODEX_BODY)
    assert translated.path == "/chat/completions"
    assert translated.headers == {"authorization": "Bearer sk-up"}
    assert translated.dropped == ("tool web_search", "tool local_shell")
    text = json.dumps(translated.body, indent=2, ensure_ascii=False) + "\n"
    assert_golden("chat_request_codex.json", text)


def test_instructions_are_the_first_system_message_and_developer_messages_are_system() -> None:
    messages = messages_of(CODEX_BODY)
    assert messages[0] == {"role": "system", "content": "You are Codex."}
    assert messages[1] == {
        "role": "system",
        "content": "<permissions>workspace-write</permissions>",
    }


def test_images_become_image_url_parts_data_and_http_urls_alike() -> None:
    assert messages_of(CODEX_BODY)[2] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in "},
            {"type": "text", "text": "these pictures?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {
                "type": "image_url",
                "image_url": {"url": "https://example.com/a.jpg", "detail": "high"},
            },
        ],
    }


def test_text_and_calls_are_one_assistant_message_followed_by_tool_messages() -> None:
    messages = messages_of(CODEX_BODY)
    assert messages[3] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_ls",
                "type": "function",
                "function": {"name": "shell", "arguments": '{"command":["ls"]}'},
            },
            {
                "id": "call_patch",
                "type": "function",
                "function": {
                    "name": "apply_patch",
                    "arguments": '{"input":"*** Begin Patch\\n*** End Patch\\n"}',
                },
            },
        ],
    }
    assert messages[4:] == [
        {"role": "tool", "tool_call_id": "call_ls", "content": "a.png\nb.jpg\n"},
        {"role": "tool", "tool_call_id": "call_patch", "content": "Done!"},
        {"role": "user", "content": "Thanks."},
    ]


def test_reasoning_items_are_dropped_quietly() -> None:
    translated = request({"input": [user("a"), {"type": "reasoning", "summary": []}, user("b")]})
    assert translated.body["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    assert translated.dropped == ()


def test_a_call_without_text_before_it_opens_an_assistant_message() -> None:
    body = {
        "input": [
            user("go"),
            {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": "c1"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": "c2"},
        ]
    }
    messages = messages_of(body)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] is None
    assert [c["id"] for c in messages[3]["tool_calls"]] == ["c2"]


def test_tool_output_images_follow_the_tool_messages_as_a_user_message() -> None:
    body = {
        "input": [
            {"type": "function_call", "name": "view_image", "arguments": "{}", "call_id": "c1"},
            {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": "c2"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [
                    {"type": "input_text", "text": "the image:"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
            {"type": "function_call_output", "call_id": "c2", "output": "ok"},
            user("and?"),
        ]
    }
    assert messages_of(body)[1:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "the image:"},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        },
        {"role": "user", "content": "and?"},
    ]


def test_a_string_input_is_one_user_message() -> None:
    assert messages_of({"input": "hello"}) == [{"role": "user", "content": "hello"}]


def test_custom_tools_are_functions_with_one_string_parameter() -> None:
    tools = request(CODEX_BODY).body["tools"]
    patch = tools[1]["function"]
    assert patch["name"] == "apply_patch"
    assert patch["parameters"] == {
        "type": "object",
        "properties": {"input": {"type": "string", "description": "The tool's whole input."}},
        "required": ["input"],
        "additionalProperties": False,
    }
    assert patch["description"].startswith("Edit files with a patch.\n\n")
    assert "lark grammar" in patch["description"] and APPLY_PATCH_GRAMMAR in patch["description"]
    plain = request({"input": "x", "tools": [{"type": "custom", "name": "note"}]}).body["tools"]
    assert plain[0]["function"]["description"] == (
        "Put the tool's whole input, free-form text, in the string parameter `input`."
    )


def test_function_tools_keep_strict_and_their_parameters() -> None:
    shell = request(CODEX_BODY).body["tools"][0]
    assert shell == {
        "type": "function",
        "function": {
            "name": "shell",
            "description": "Runs a shell command.",
            "parameters": CODEX_BODY["tools"][0]["parameters"],
            "strict": False,
        },
    }


@pytest.mark.parametrize(
    ("choice", "sent", "dropped"),
    [
        ("auto", "auto", ()),
        ("none", "none", ()),
        ("required", "required", ()),
        (
            {"type": "function", "name": "shell"},
            {"type": "function", "function": {"name": "shell"}},
            (),
        ),
        (
            {"type": "custom", "name": "apply_patch"},
            {"type": "function", "function": {"name": "apply_patch"}},
            (),
        ),
        (
            {"type": "allowed_tools", "mode": "required", "tools": []},
            "required",
            ("tool_choice allowed_tools",),
        ),
        ({"type": "web_search"}, "auto", ("tool_choice web_search",)),
    ],
)
def test_tool_choice(choice: Any, sent: Any, dropped: tuple[str, ...]) -> None:
    body = {"input": "x", "tools": [CODEX_BODY["tools"][0]], "tool_choice": choice}
    translated = request(body)
    assert translated.body["tool_choice"] == sent
    assert translated.dropped == dropped


def test_without_tools_no_tool_choice_or_parallel_tool_calls_is_sent() -> None:
    body = {
        "input": "x",
        "tools": [{"type": "web_search"}],
        "tool_choice": "required",
        "parallel_tool_calls": True,
    }
    translated = request(body)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & translated.body.keys()
    assert translated.dropped == ("tool web_search",)


def test_sampling_limits_reasoning_and_format_are_mapped() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "input": "x",
        "max_output_tokens": 512,
        "temperature": 0.2,
        "top_p": 0.9,
        "reasoning": {"effort": "high", "summary": "detailed"},
        "text": {
            "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
        },
        "user": "u-1",
    }
    assert request(body).body == {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "x"}],
        "max_completion_tokens": 512,
        "temperature": 0.2,
        "top_p": 0.9,
        "reasoning_effort": "high",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
        "user": "u-1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    json_object = {"input": "x", "text": {"format": {"type": "json_object"}}}
    assert request(json_object).body["response_format"] == {"type": "json_object"}
    assert (
        "response_format" not in request({"input": "x", "text": {"format": {"type": "text"}}}).body
    )


def test_responses_only_fields_are_dropped_quietly_and_unknown_ones_by_name() -> None:
    body = {
        "input": "x",
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "k",
        "client_metadata": {"a": "b"},
        "metadata": {"a": "b"},
        "service_tier": "priority",
        "generate": False,
        "truncation": "auto",
        "background": False,
        "seed": 7,
        "frobnicate": True,
    }
    translated = request(body)
    assert translated.body == {
        "model": "deepseek-chat",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert translated.dropped == ("field seed", "field frobnicate")


def test_unsupported_items_and_parts_are_dropped_by_name() -> None:
    body = {
        "input": [
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "see"},
                    {"type": "input_file", "file_id": "file-1"},
                    {"type": "input_image", "file_id": "file-2"},
                ],
            },
        ]
    }
    translated = request(body)
    assert translated.body["messages"] == [{"role": "user", "content": "see"}]
    assert translated.dropped == (
        "input item web_search_call",
        "content part input_file",
        "content part input_image",
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "background": True}, "background"),
        ({"input": []}, "input"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input"),
    ],
)
def test_untranslatable_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(Untranslatable) as raised:
        request(body)
    assert raised.value.param == param


def test_no_authorization_without_a_key() -> None:
    assert API.request({"input": "x"}, model="m", api_key=None).headers == {}


def test_api_named_finds_the_chat_api() -> None:
    assert api_named("chat").name == "chat"
    with pytest.raises(ValueError):
        api_named("responses")


# --- the stream ----------------------------------------------------------------------------------

STREAM_BODY: dict[str, Any] = {
    "model": "gpt-5.5",
    "input": "hi",
    "tools": [
        {"type": "function", "name": "shell", "parameters": {"type": "object"}},
        {"type": "custom", "name": "apply_patch"},
    ],
    "store": False,
}


def translate(
    events: list[dict[str, Any] | str], *, end: bool = True, body: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Feed chunk objects (and "[DONE]") to a translation as SSE data texts."""
    stream = API.stream(
        STREAM_BODY if body is None else body,
        response_id="resp_c1",
        model="gpt-5.5",
        created_at=CREATED_AT,
    )
    out = stream.start()
    for event in events:
        out += stream.feed(event if isinstance(event, str) else json.dumps(event))
    if end:
        out += stream.end()
    return out


def test_text_answer_with_usage_golden() -> None:
    chunks = chat_events(
        text="Hello there, friend.", usage=chat_usage(120, 6, cached_tokens=100, reasoning_tokens=0)
    )
    events = translate(chunks)
    check_well_formed(events)
    assert events[-1]["response"]["usage"] == {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 126,
    }
    assert_golden("chat_stream_text.jsonl", event_lines(events))


def test_reasoning_then_text_golden() -> None:
    chunks = chat_events(
        reasoning="The user greets me.", text="Hi!", usage=chat_usage(10, 9, reasoning_tokens=5)
    )
    events = translate(chunks)
    check_well_formed(events)
    assert [e["type"] for e in events if e["type"].startswith("response.output_item")] == [
        "response.output_item.added",
        "response.output_item.done",
        "response.output_item.added",
        "response.output_item.done",
    ]
    assert events[-1]["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 5}
    assert_golden("chat_stream_reasoning.jsonl", event_lines(events))


def test_openrouter_reasoning_field_is_reasoning_too() -> None:
    events = translate(chat_events(reasoning="Hmm.", text="Yes.", reasoning_field="reasoning"))
    check_well_formed(events)
    output = events[-1]["response"]["output"]
    assert output[0]["summary"] == [{"type": "summary_text", "text": "Hmm."}]


def test_tool_calls_split_across_many_chunks_golden() -> None:
    chunks = chat_events(
        text="Running two commands.",
        tool_calls=[
            ToolCall("call_1", "shell", '{"command":["ls","-la"]}', pieces=5),
            ToolCall("call_2", "shell", '{"command":["pwd"]}', pieces=4),
        ],
        usage=chat_usage(300, 40),
    )
    events = translate(chunks)
    check_well_formed(events)
    output = events[-1]["response"]["output"]
    assert [(o["type"], o.get("call_id"), o.get("arguments")) for o in output] == [
        ("message", None, None),
        ("function_call", "call_1", '{"command":["ls","-la"]}'),
        ("function_call", "call_2", '{"command":["pwd"]}'),
    ]
    assert_golden("chat_stream_tool_calls.jsonl", event_lines(events))


def test_interleaved_tool_calls_golden() -> None:
    chunks = chat_events(
        tool_calls=[
            ToolCall("call_a", "shell", '{"command":["a"]}', pieces=3),
            ToolCall("call_b", "shell", '{"command":["b"]}', pieces=3),
        ],
        interleave=True,
    )
    events = translate(chunks)
    check_well_formed(events)
    output = events[-1]["response"]["output"]
    assert [o["arguments"] for o in output] == ['{"command":["a"]}', '{"command":["b"]}']
    assert_golden("chat_stream_interleaved.jsonl", event_lines(events))


def test_custom_tool_call_input_is_unwrapped_and_streamed_golden() -> None:
    patch = '*** Begin Patch\n*** Add File: a.txt\n+caf\u00e9 "quoted" \\ tab\t\U0001f600\n*** End Patch\n'
    arguments = json.dumps({"input": patch})  # escapes: \n, \", \\, \t, \u00e9, surrogates
    chunks = chat_events(tool_calls=[ToolCall("call_p", "apply_patch", arguments, pieces=9)])
    events = translate(chunks)
    check_well_formed(events)
    deltas = [e for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 3  # streamed as it decodes, not in one piece
    assert events[-1]["response"]["output"] == [
        {
            "id": "ctc_c1_0",
            "type": "custom_tool_call",
            "status": "completed",
            "call_id": "call_p",
            "input": patch,
            "name": "apply_patch",
        }
    ]
    assert_golden("chat_stream_custom_tool.jsonl", event_lines(events))


def test_custom_call_arguments_of_another_shape_are_given_whole() -> None:
    for arguments, expected in [
        ('{"patch": "P"}', "P"),
        ('{"a": "1", "b": "2"}', '{"a": "1", "b": "2"}'),
        ("*** raw text", "*** raw text"),
    ]:
        events = translate(chat_events(tool_calls=[ToolCall("c", "apply_patch", arguments)]))
        check_well_formed(events)
        assert events[-1]["response"]["output"][0]["input"] == expected


def test_length_stop_is_incomplete_golden() -> None:
    chunks = chat_events(text="This answer is cut", finish_reason="length", usage=chat_usage(5, 4))
    events = translate(chunks)
    check_well_formed(events)
    response = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert_golden("chat_stream_length.jsonl", event_lines(events))


def test_content_filter_is_incomplete() -> None:
    events = translate(chat_events(text="Well", finish_reason="content_filter"))
    check_well_formed(events)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_error_mid_stream_fails_the_response_golden() -> None:
    chunks = chat_events(
        text="Starting out", tool_calls=[ToolCall("call_1", "shell", '{"command":["ls"]}')]
    )
    error = {
        "error": {
            "message": "Overloaded, try again in 2s.",
            "type": "server_error",
            "code": "rate_limit_exceeded",
        }
    }
    events = translate([*chunks[:4], error, *chunks[4:]])
    check_well_formed(events)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {
        "code": "rate_limit_exceeded",
        "message": "Overloaded, try again in 2s.",
    }
    assert_golden("chat_stream_error.jsonl", event_lines(events))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ({"message": "boom", "type": "server_error", "code": None}, "upstream_error"),
        ({"code": 502, "message": "Provider returned error"}, "upstream_error"),
        ({"code": 429, "message": "slow down"}, "rate_limit_exceeded"),
        ("plain", "upstream_error"),
    ],
)
def test_error_objects_in_the_stream(error: Any, code: str) -> None:
    events = translate([chat_chunk({"content": "a"}), {"error": error}])
    check_well_formed(events)
    assert events[-1]["response"]["error"]["code"] == code


def test_finish_reason_error_fails() -> None:
    events = translate([chat_chunk({"content": "a"}), chat_chunk({}, finish_reason="error")])
    check_well_formed(events)
    assert events[-1]["type"] == "response.failed"


def test_a_body_ending_before_the_finish_fails() -> None:
    chunks = chat_events(text="Half an answer")[:3]
    events = translate(chunks)
    check_well_formed(events)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "upstream_stream_error"


def test_a_malformed_event_fails() -> None:
    events = translate([chat_chunk({"content": "a"}), "{not json", chat_chunk({"content": "b"})])
    check_well_formed(events)
    assert events[-1]["response"]["error"] == {
        "code": "upstream_stream_error",
        "message": "malformed upstream event",
    }


def test_the_terminal_event_waits_for_the_usage_chunk_and_done() -> None:
    stream = API.stream(STREAM_BODY, response_id="resp_c1", model="gpt-5.5", created_at=CREATED_AT)
    stream.start()
    stream.feed(json.dumps(chat_chunk({"content": "Hi"})))
    finished = stream.feed(json.dumps(chat_chunk({}, finish_reason="stop")))
    assert finished == [] and not stream.finished
    assert stream.feed(json.dumps(chat_chunk(choices=False, usage=chat_usage(3, 1)))) == []
    events = stream.feed("[DONE]")
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] == 4
    assert stream.finished and stream.end() == [] and stream.feed("[DONE]") == []


def test_a_body_ending_after_the_finish_without_done_completes() -> None:
    events = translate(chat_events(text="ok", done=False))
    check_well_formed(events)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"] is None


def test_done_without_a_finish_reason_completes() -> None:
    events = translate([chat_chunk({"content": "ok"}), "[DONE]"], end=False)
    check_well_formed(events)
    assert events[-1]["type"] == "response.completed"


def test_usage_on_the_finish_chunk_counts_too() -> None:
    last = chat_chunk({}, finish_reason="stop", usage=chat_usage(7, 2))
    events = translate([chat_chunk({"content": "ok"}), last, "[DONE]"])
    assert events[-1]["response"]["usage"]["input_tokens"] == 7


def test_a_call_without_arguments_gets_an_empty_object() -> None:
    fragment = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "shell"}}
    events = translate(
        [chat_chunk({"tool_calls": [fragment]}), chat_chunk({}, finish_reason="tool_calls")]
    )
    check_well_formed(events)
    assert events[-1]["response"]["output"][0]["arguments"] == "{}"


def test_calls_without_index_or_reusing_index_0_are_separate_calls() -> None:
    first = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "shell", "arguments": '{"a":1}'},
    }
    second = {"index": 0, "id": "call_2", "function": {"name": "shell", "arguments": '{"b":2}'}}
    events = translate(
        [
            chat_chunk({"tool_calls": [first]}),
            chat_chunk({"tool_calls": [second]}),
            chat_chunk({}, finish_reason="tool_calls"),
        ]
    )
    check_well_formed(events)
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["arguments"]) for o in output] == [
        ("call_1", '{"a":1}'),
        ("call_2", '{"b":2}'),
    ]


def test_a_call_without_an_id_gets_one_from_the_response() -> None:
    fragment = {"index": 0, "function": {"name": "shell", "arguments": "{}"}}
    events = translate(
        [chat_chunk({"tool_calls": [fragment]}), chat_chunk({}, finish_reason="tool_calls")]
    )
    assert events[-1]["response"]["output"][0]["call_id"] == "call_c1_0"


def test_text_after_a_call_is_a_new_message_after_it() -> None:
    fragment = {"index": 0, "id": "c", "function": {"name": "shell", "arguments": "{}"}}
    events = translate(
        [
            chat_chunk({"content": "Before."}),
            chat_chunk({"tool_calls": [fragment]}),
            chat_chunk({"content": "After."}),
            chat_chunk({}, finish_reason="tool_calls"),
        ]
    )
    check_well_formed(events)
    output = events[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "message"]


# --- upstream error bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            429,
            b'{"error":{"message":"Rate limit reached. Please try again in 20s.","type":"requests","code":"rate_limit_exceeded"}}',
            (
                "rate_limit_error",
                "rate_limit_exceeded",
                "Rate limit reached. Please try again in 20s.",
            ),
        ),
        (
            429,
            b'{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","code":"insufficient_quota"}}',
            ("insufficient_quota", "insufficient_quota", "You exceeded your current quota."),
        ),
        (
            401,
            b'{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","code":"invalid_api_key"}}',
            ("authentication_error", "upstream_auth_error", "Incorrect API key provided."),
        ),
        (403, b"Forbidden", ("authentication_error", "upstream_auth_error", "Forbidden")),
        (
            404,
            b'{"error":{"message":"The model `gpt-9` does not exist","type":"invalid_request_error","code":"model_not_found"}}',
            ("invalid_request_error", "model_not_found", "The model `gpt-9` does not exist"),
        ),
        (
            404,
            b'{"error":"model \\"llama9\\" not found, try pulling it first"}',  # Ollama
            (
                "invalid_request_error",
                "model_not_found",
                'model "llama9" not found, try pulling it first',
            ),
        ),
        (
            404,
            b"<html>Not Found</html>",
            ("invalid_request_error", "upstream_not_found", "<html>Not Found</html>"),
        ),
        (
            400,
            b'{"object":"error","message":"This model\'s maximum context length is 8192 tokens.","type":"BadRequestError","param":null,"code":400}',  # vLLM
            (
                "invalid_request_error",
                "context_length_exceeded",
                "This model's maximum context length is 8192 tokens.",
            ),
        ),
        (
            400,
            b'{"error":{"message":"Invalid value for \'tool_choice\'.","type":"invalid_request_error","param":"tool_choice","code":null}}',
            ("invalid_request_error", "invalid_request_error", "Invalid value for 'tool_choice'."),
        ),
        (
            422,
            b'{"detail":[{"loc":["body","x"],"msg":"Extra inputs are not permitted"}]}',  # FastAPI
            (
                "invalid_request_error",
                "invalid_request_error",
                '[{"loc": ["body", "x"], "msg": "Extra inputs are not permitted"}]',
            ),
        ),
        (
            400,
            b'[{"error":{"code":400,"message":"Invalid JSON payload.","status":"INVALID_ARGUMENT"}}]',  # Gemini
            ("invalid_request_error", "invalid_request_error", "Invalid JSON payload."),
        ),
        (503, b"", ("server_error", "upstream_error", "The upstream answered HTTP 503.")),
        (500, b"upstream exploded", ("server_error", "upstream_error", "upstream exploded")),
    ],
)
def test_error_bodies(status: int, body: bytes, expected: tuple[str, str, str]) -> None:
    error = API.error(status, body)["error"]
    assert list(error) == ["type", "code", "message", "param"]
    assert (error["type"], error["code"], error["message"]) == expected


def test_error_keeps_the_upstream_param() -> None:
    body = (
        b'{"error":{"message":"bad","type":"invalid_request_error","param":"tools[0]","code":null}}'
    )
    assert API.error(400, body)["error"]["param"] == "tools[0]"


# --- the fake upstream plays Chat scripts ----------------------------------------------------------


def sse_datas(raw: bytes) -> list[str]:
    decoder = SSEDecoder(0)
    return [*decoder.feed(raw), *decoder.finish()]


def test_fake_upstream_serves_chat_completions_with_chat_like() -> None:
    """The whole path without sockets: the translated request posted to the fake (recorded with
    its path), the fake's Chat stream, the translation of it."""
    fake = FakeUpstream(Clock())
    fake.default = chat_like
    client = StubTreq(fake.resource())
    translated = API.request({"model": "gpt-5.5", "input": "hi"}, model="up-model", api_key="k")
    response = client.post(
        "http://fake/v1" + translated.path,
        json=translated.body,
        headers=translated.headers,
    )
    client.flush()
    raw = client.content(response.result).result
    recorded = fake.requests[0]
    assert recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == "Bearer k"
    assert recorded.body["model"] == "up-model"
    stream = API.stream(
        {"model": "gpt-5.5", "input": "hi"}, response_id="resp_e2e", model="gpt-5.5", created_at=0
    )
    events = stream.start()
    for data in sse_datas(raw):
        events += stream.feed(data)
    events += stream.end()
    check_well_formed(events)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "echo: hi"
    assert events[-1]["response"]["usage"]["output_tokens"] == 2


def test_fake_upstream_serves_messages_from_the_queue_and_error_after() -> None:
    fake = FakeUpstream(Clock())
    fake.enqueue(chat_error_after(chat_events(text="one two three"), 2))
    client = StubTreq(fake.resource())
    response = client.post("http://fake/v1/messages", data=b"{}")
    client.flush()
    datas = sse_datas(client.content(response.result).result)
    assert fake.requests[0].path == "/v1/messages"
    assert json.loads(datas[-1])["error"]["code"] == "server_error"
    events = translate([*datas])
    check_well_formed(events)
    assert events[-1]["type"] == "response.failed"
    get = client.get("http://fake/v1/chat/completions")
    client.flush()
    assert get.result.code == 405


# --- properties ----------------------------------------------------------------------------------

ARGUMENT_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30
)


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    """The content of one Chat answer: reasoning, text, calls (function and custom)."""
    calls = []
    for n in range(draw(st.integers(0, 3))):
        custom = draw(st.booleans())
        if custom:
            arguments = json.dumps({"input": draw(ARGUMENT_TEXT)}, ensure_ascii=draw(st.booleans()))
        else:
            arguments = json.dumps({"command": [draw(ARGUMENT_TEXT)]})
        calls.append(("apply_patch" if custom else "shell", f"call_{n}", arguments))
    return {
        "reasoning": draw(st.text(max_size=20)),
        "text": draw(st.text(max_size=20)),
        "calls": calls,
        "finish": draw(st.sampled_from(["stop", "length", "content_filter", "tool_calls"])),
    }


def cuts(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut at arbitrary places (empty fragments included)."""
    points = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    edges = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def chunks_of(answer: dict[str, Any], draw: st.DrawFn | None) -> list[dict[str, Any] | str]:
    """The answer as Chat chunks; ``draw`` None gives the canonical cut (one fragment each)."""

    def cut(text: str) -> list[str]:
        return [text] if draw is None else cuts(draw, text)

    chunks: list[dict[str, Any] | str] = [chat_chunk({"role": "assistant", "content": ""})]
    chunks += [chat_chunk({"reasoning_content": p}) for p in cut(answer["reasoning"]) if p]
    chunks += [chat_chunk({"content": p}) for p in cut(answer["text"]) if p]
    streams = []
    for index, (name, call_id, arguments) in enumerate(answer["calls"]):
        first = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        rest = [{"index": index, "function": {"arguments": p}} for p in cut(arguments)]
        streams.append([first, *rest])
    interleave = draw is not None and draw(st.booleans())
    if interleave:
        for round_ in range(max((len(s) for s in streams), default=0)):
            for stream in streams:
                if round_ < len(stream):
                    chunks.append(chat_chunk({"tool_calls": [stream[round_]]}))
    else:
        for stream in streams:
            chunks += [chat_chunk({"tool_calls": [fragment]}) for fragment in stream]
    chunks.append(chat_chunk({}, finish_reason=answer["finish"]))
    chunks.append(chat_chunk(choices=False, usage=chat_usage(11, 7)))
    chunks.append("[DONE]")
    return chunks


@settings(max_examples=200, deadline=None)
@given(answers(), st.data())
def test_any_cut_of_an_answer_gives_the_same_events(
    answer: dict[str, Any], data: st.DataObject
) -> None:
    reference = translate(chunks_of(answer, None))
    check_well_formed(reference)
    cut_events = translate(chunks_of(answer, data.draw))
    check_well_formed(cut_events)
    assert coalesced(cut_events) == coalesced(reference)
    output = reference[-1]["response"]["output"]
    calls = [o for o in output if o["type"] in ("function_call", "custom_tool_call")]
    for (name, _, arguments), item in zip(answer["calls"], calls, strict=True):
        if name == "apply_patch":
            assert item["input"] == json.loads(arguments)["input"]
        else:
            assert item["arguments"] == arguments


@settings(max_examples=300, deadline=None)
@given(ARGUMENT_TEXT, st.booleans(), st.data())
def test_the_input_unwrapper_decodes_any_split(
    text: str, ascii_only: bool, data: st.DataObject
) -> None:
    arguments = json.dumps({"input": text}, ensure_ascii=ascii_only)
    unwrapper = CustomInput()
    out = "".join(unwrapper.feed(piece) for piece in cuts(data.draw, arguments))
    assert out + unwrapper.finish() == text
    assert out == text  # all of it streamed before the end


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=10), st.just("[DONE]"), st.just("{}")), max_size=8))
def test_any_garbage_still_ends_well_formed(datas: list[str]) -> None:
    stream = ChatStream(STREAM_BODY, response_id="resp_g", model="m", created_at=0)
    events = stream.start()
    for data in datas:
        events += stream.feed(data)
    events += stream.end()
    check_well_formed(events)


def test_split_text_helper() -> None:
    assert split_text("abcdefg", 3) == ["abc", "de", "fg"]
    assert split_text("", 3) == [""]
