"""The Responses event sequence a translator builds (cch.translate.responses.ResponseBuilder):
whole sequences against golden files (tests/golden/chat/responses_*.jsonl), the shapes of the
reference fake (cch.testing.scripts.codex_events), and a property test that any sequence of
calls gives a well-formed stream.

Goldens are rewritten with ``CCH_UPDATE_GOLDEN=1``; review the diff before keeping it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cch.testing.fake_upstream import Recorded
from cch.testing.scripts import CREATED_AT, codex_events
from cch.translate.responses import ResponseBuilder, Usage, item_id

GOLDEN = Path(__file__).parent / "golden" / "chat"

BODY: dict[str, Any] = {
    "model": "gpt-5.5",
    "instructions": "Be brief.",
    "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    ],
    "tools": [
        {
            "type": "function",
            "name": "shell",
            "description": "Run a command.",
            "strict": False,
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
        },
        {"type": "custom", "name": "apply_patch", "description": "Edit files."},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "store": False,
    "stream": True,
    "reasoning": {"effort": "low", "summary": "auto"},
    "text": {"verbosity": "low"},
    "prompt_cache_key": "session-1",
}


def builder(body: dict[str, Any] | None = None, response_id: str = "resp_t1") -> ResponseBuilder:
    return ResponseBuilder(
        BODY if body is None else body,
        response_id=response_id,
        model="gpt-5.5",
        created_at=CREATED_AT,
    )


# --- golden files -------------------------------------------------------------------------------


def event_lines(events: list[dict[str, Any]]) -> str:
    """The events as the gateway sends them: compact JSON, one per line."""
    return "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n" for e in events)


def assert_golden(name: str, text: str) -> None:
    """``text`` equals tests/golden/chat/``name`` (rewritten with CCH_UPDATE_GOLDEN=1)."""
    path = GOLDEN / name
    if os.environ.get("CCH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no golden file {path}; run with CCH_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8")


# --- well-formedness (shared with test_translate_chat) -------------------------------------------

DELTA_FIELD = {
    "response.output_text.delta": "message",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.function_call_arguments.delta": "function_call",
    "response.custom_tool_call_input.delta": "custom_tool_call",
}
TERMINALS = ("response.completed", "response.incomplete", "response.failed")


def check_well_formed(events: list[dict[str, Any]]) -> None:
    """What Codex relies on: numbered from 0; created and in_progress first; one item on the
    wire at a time, each added once and done at most once (exactly once unless the response
    failed); every part and delta addressed to the open item and adding up to what its done
    events say; one terminal event, last, listing the done items as its output."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    terminals = [i for i, e in enumerate(events) if e["type"] in TERMINALS]
    assert terminals == [len(events) - 1], "exactly one terminal event, the last"
    terminal = events[-1]
    open_item: dict[str, Any] | None = None
    text: dict[int, str] = {}  # part index -> text of the open item
    parts_open: set[int] = set()
    done_items: list[dict[str, Any]] = []
    ids: set[str] = set()
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_item is None, "an item was added while another is open"
            open_item = event["item"]
            assert event["output_index"] == len(done_items)
            assert open_item["id"] not in ids
            ids.add(open_item["id"])
            text, parts_open = {}, set()
            continue
        assert open_item is not None, f"{kind} outside an item"
        assert event.get("item_id", open_item["id"]) == open_item["id"]
        assert event["output_index"] == len(done_items)
        index = event.get("content_index", event.get("summary_index", 0))
        if kind in ("response.content_part.added", "response.reasoning_summary_part.added"):
            assert index == len(text) and index not in parts_open
            text[index] = ""
            parts_open.add(index)
        elif kind in DELTA_FIELD:
            assert DELTA_FIELD[kind] == open_item["type"]
            if open_item["type"] in ("message", "reasoning"):
                assert index in parts_open
            text[index] = text.get(index, "") + event["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_summary_text.done"):
            assert event["text"] == text[index] and index in parts_open
        elif kind in ("response.content_part.done", "response.reasoning_summary_part.done"):
            assert event["part"]["text"] == text[index]
            parts_open.remove(index)
        elif kind == "response.function_call_arguments.done":
            assert event["arguments"] == text.get(0, "")
        elif kind == "response.custom_tool_call_input.done":
            assert event["input"] == text.get(0, "")
        elif kind == "response.output_item.done":
            item = event["item"]
            assert item["id"] == open_item["id"] and item["type"] == open_item["type"]
            assert not parts_open
            if item["type"] == "message":
                assert [p["text"] for p in item["content"]] == [text[i] for i in sorted(text)]
            elif item["type"] == "reasoning":
                assert [p["text"] for p in item["summary"]] == [text[i] for i in sorted(text)]
            elif item["type"] == "function_call":
                assert item["arguments"] == text.get(0, "")
            else:
                assert item["input"] == text.get(0, "")
            done_items.append(item)
            open_item = None
        else:
            raise AssertionError(f"unexpected event {kind}")
    if terminal["type"] != "response.failed":
        assert open_item is None, "an item was left open"
    assert terminal["response"]["output"] == done_items


def coalesced(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events without sequence numbers, consecutive deltas of one item merged: what does not
    depend on how the upstream cut its stream."""
    out: list[dict[str, Any]] = []
    for event in events:
        event = {k: v for k, v in event.items() if k != "sequence_number"}
        last = out[-1] if out else None
        if (
            last is not None
            and event["type"] in DELTA_FIELD
            and last["type"] == event["type"]
            and last.get("item_id") == event.get("item_id")
            and last.get("content_index", last.get("summary_index"))
            == event.get("content_index", event.get("summary_index"))
        ):
            last["delta"] += event["delta"]
            continue
        out.append(event)
    return out


# --- the sequences -------------------------------------------------------------------------------


def test_text_answer_golden() -> None:
    b = builder()
    events = b.start() + b.text("Hello") + b.text(", world.")
    events += b.finish(usage=Usage(100, 7, cached_tokens=64, reasoning_tokens=2))
    check_well_formed(events)
    assert_golden("responses_text.jsonl", event_lines(events))


def test_text_item_events_have_the_reference_fakes_shapes() -> None:
    """Between created and completed, a text answer is byte for byte what the reference fake
    (what a real Responses server sends) streams for the same text and item id."""
    text = "echo: hi there"
    recorded = Recorded("http", "POST", "/v1/responses", "", {}, BODY, b"x" * 40)
    recorded.response_id = "resp_t1"
    reference = codex_events(recorded, text=text)
    b = builder()
    events = b.start()
    for piece in ("echo: ", "hi ", "there"):
        events += b.text(piece)
    events += b.finish()
    ours = event_lines(events[2:-1]).replace(item_id("message", "resp_t1", 0), "msg_resp_t1")
    assert ours == event_lines(reference[2:-1])


def test_reasoning_then_tool_calls_golden() -> None:
    """A reasoning item with two summary parts and an encrypted_content, a message, a function
    call and a custom tool call, closed one after the other."""
    b = builder()
    events = b.start()
    events += b.reasoning("Look at the ", key=0) + b.reasoning("files.", key=0)
    events += b.reasoning_part(key=0) + b.reasoning("Then patch.", key=0)
    events += b.reasoning_encrypted("c2lnbmF0dXJl", key=0) + b.close(0)
    events += b.text("Patching now.", key=1) + b.close(1)
    events += b.function_call(2, call_id="call_shell", name="shell")
    events += b.function_arguments(2, '{"command":') + b.function_arguments(2, '"ls"}')
    events += b.close(2)
    events += b.custom_tool_call(3, call_id="call_patch", name="apply_patch")
    events += b.custom_input(3, "*** Begin Patch\n") + b.custom_input(3, "*** End Patch")
    events += b.finish(usage=Usage(1000, 80, reasoning_tokens=40))
    check_well_formed(events)
    assert_golden("responses_reasoning_tools.jsonl", event_lines(events))


def test_interleaved_items_go_out_one_at_a_time_golden() -> None:
    """Two calls fed alternately: the first streams, the second waits for it to be done and
    then goes out in one delta (Codex attributes deltas to the last added item)."""
    b = builder()
    events = b.start()
    events += b.function_call("a", call_id="call_a", name="shell")
    events += b.function_call("b", call_id="call_b", name="shell")
    for piece in ('{"command"', ':"ls"}'):
        events += b.function_arguments("a", piece) + b.function_arguments("b", piece)
    assert [e["type"] for e in events[2:]] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
    ]
    events += b.finish()
    check_well_formed(events)
    assert_golden("responses_interleaved.jsonl", event_lines(events))


def test_closing_the_live_item_releases_the_items_waiting_behind_it() -> None:
    b = builder()
    b.start()
    b.text("first", key="t")
    waiting = b.function_call("f", call_id="c", name="shell") + b.function_arguments("f", "{}")
    assert waiting == []
    b.close("f")  # complete, but still behind the message
    released = b.close("t")
    assert [e["type"] for e in released] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]


def test_redacted_reasoning_is_an_item_with_only_encrypted_content() -> None:
    b = builder()
    events = b.start() + b.redacted_reasoning("b3BhcXVl", key=0) + b.text("ok", key=1)
    events += b.finish()
    check_well_formed(events)
    assert events[2]["item"] == {"id": "rs_t1_0", "type": "reasoning", "summary": []}
    assert events[3] == {
        "type": "response.output_item.done",
        "sequence_number": 3,
        "output_index": 0,
        "item": {
            "id": "rs_t1_0",
            "type": "reasoning",
            "summary": [],
            "encrypted_content": "b3BhcXVl",
        },
    }


def test_length_stop_marks_the_open_items_incomplete_golden() -> None:
    b = builder()
    events = b.start() + b.reasoning("Thinking", key=0) + b.close(0)
    events += b.function_call(1, call_id="call_1", name="shell") + b.function_arguments(1, '{"comm')
    events += b.finish(incomplete="max_output_tokens", usage=Usage(10, 16))
    check_well_formed(events)
    terminal = events[-1]
    assert terminal["type"] == "response.incomplete"
    assert terminal["response"]["status"] == "incomplete"
    assert terminal["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item.get("status") for item in terminal["response"]["output"]] == [None, "incomplete"]
    assert_golden("responses_length.jsonl", event_lines(events))


def test_content_filter_is_an_incomplete_response() -> None:
    b = builder()
    events = b.start() + b.text("I can") + b.finish(incomplete="content_filter")
    check_well_formed(events)
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


def test_failure_leaves_a_half_streamed_call_undone_golden() -> None:
    """Codex runs a call on output_item.done; a call cut off by a failure must never run."""
    b = builder()
    events = b.start() + b.text("Running it.", key="t") + b.close("t")
    events += b.function_call("f", call_id="call_1", name="shell")
    events += b.function_arguments("f", '{"command":"rm')
    events += b.fail("upstream_error", "The upstream failed.")
    check_well_formed(events)
    assert [e["type"] for e in events].count("response.output_item.done") == 1
    assert events[-1]["response"]["error"] == {
        "code": "upstream_error",
        "message": "The upstream failed.",
    }
    assert events[-1]["response"]["status"] == "failed"
    assert_golden("responses_failed.jsonl", event_lines(events))


def test_failure_before_start_still_begins_with_created() -> None:
    b = builder()
    events = b.fail("upstream_stream_error", "no body")
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    check_well_formed(events)


def test_nothing_is_made_after_the_terminal_event() -> None:
    b = builder()
    b.start()
    b.finish()
    assert b.finished and b.terminal == "response.completed"
    assert b.text("late") == []
    assert b.finish() == []
    assert b.fail("x", "y") == []
    assert b.start() == []


def test_start_is_made_once_and_empty_deltas_open_nothing() -> None:
    b = builder()
    assert len(b.start()) == 2
    assert b.start() == []
    assert b.text("") == [] and b.reasoning("") == []
    assert not b.is_open("text")
    events = b.finish()
    assert [e["type"] for e in events] == ["response.completed"]
    assert events[0]["response"]["output"] == []


def test_response_object_echoes_the_request() -> None:
    b = builder()
    created = b.start()[0]["response"]
    assert created == {
        "id": "resp_t1",
        "object": "response",
        "created_at": CREATED_AT,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": "Be brief.",
        "max_output_tokens": None,
        "max_tool_calls": None,
        "model": "gpt-5.5",
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": "session-1",
        "reasoning": {"effort": "low", "summary": "auto"},
        "safety_identifier": None,
        "service_tier": "default",
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "low"},
        "tool_choice": "auto",
        "tools": BODY["tools"],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }


def test_usage_in_responses_terms() -> None:
    assert Usage(10, 5, cached_tokens=4, reasoning_tokens=3).as_json() == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 15,
    }
    assert Usage(10, 5, total_tokens=20).as_json()["total_tokens"] == 20


def test_item_ids_are_stable_per_response_and_unique_across_responses() -> None:
    def run(response_id: str) -> list[str]:
        b = builder(response_id=response_id)
        events = b.start() + b.reasoning("r") + b.text("t")
        events += b.function_call("f", call_id="c1", name="shell")
        events += b.custom_tool_call("p", call_id="c2", name="apply_patch")
        events += b.finish()
        return [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"]

    first = run("resp_abc")
    assert first == ["rs_abc_0", "msg_abc_1", "fc_abc_2", "ctc_abc_3"]
    assert run("resp_abc") == first
    assert set(run("resp_def")).isdisjoint(first)


def test_events_are_fresh_objects() -> None:
    """Nothing already emitted changes when the builder goes on (events may be queued)."""
    b = builder()
    b.start()
    added = b.text("a")
    snapshot = json.dumps(added)
    b.text("b")
    b.finish()
    assert json.dumps(added) == snapshot


def test_a_key_names_one_kind_of_item() -> None:
    b = builder()
    b.start()
    b.text("x", key=1)
    with pytest.raises(ValueError):
        b.reasoning("y", key=1)
    with pytest.raises(ValueError):
        b.function_call(1, call_id="c", name="n")
    with pytest.raises(ValueError):
        b.function_arguments(2, "{}")
    b.close(1)
    assert b.text("again", key=1) != [] or b.kind(1) == "message"  # a new item under the key


# --- property: any sequence of calls is well formed ----------------------------------------------

KEYS = st.sampled_from([0, 1, 2, "t"])
DELTAS = st.text(min_size=0, max_size=6)

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("text"), KEYS, DELTAS),
        st.tuples(st.just("reasoning"), KEYS, DELTAS),
        st.tuples(st.just("reasoning_part"), KEYS, st.just("")),
        st.tuples(st.just("encrypted"), KEYS, DELTAS),
        st.tuples(st.just("redacted"), KEYS, DELTAS),
        st.tuples(st.just("function"), KEYS, DELTAS),
        st.tuples(st.just("custom"), KEYS, DELTAS),
        st.tuples(st.just("close"), KEYS, st.just("")),
    ),
    max_size=30,
)
ENDINGS = st.sampled_from(["completed", "max_output_tokens", "content_filter", "failed"])


def apply(b: ResponseBuilder, operation: tuple[str, Any, str]) -> list[dict[str, Any]]:
    name, key, delta = operation
    kind = b.kind(key)
    wanted = {
        "text": "message",
        "reasoning": "reasoning",
        "reasoning_part": "reasoning",
        "encrypted": "reasoning",
        "function": "function_call",
        "custom": "custom_tool_call",
    }.get(name)
    if name == "close":
        return b.close(key)
    if name == "redacted":
        return [] if kind is not None else b.redacted_reasoning(delta, key=key)
    if kind is not None and kind != wanted:
        return b.close(key)  # a translator closes before reusing a key for another kind
    if name == "text":
        return b.text(delta, key=key)
    if name == "reasoning":
        return b.reasoning(delta, key=key)
    if name == "reasoning_part":
        return b.reasoning_part(key=key)
    if name == "encrypted":
        return b.reasoning_encrypted(delta, key=key)
    if name == "function":
        if kind is None:
            return b.function_call(key, call_id=f"call_{key}", name="shell")
        return b.function_arguments(key, delta)
    if kind is None:
        return b.custom_tool_call(key, call_id=f"call_{key}", name="apply_patch")
    return b.custom_input(key, delta)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, ENDINGS)
def test_any_sequence_of_calls_is_well_formed(
    operations: list[tuple[str, Any, str]], ending: str
) -> None:
    b = builder()
    events = b.start()
    for operation in operations:
        events += apply(b, operation)
    if ending == "failed":
        events += b.fail("upstream_error", "broke")
    elif ending == "completed":
        events += b.finish()
    else:
        events += b.finish(incomplete=ending)  # type: ignore[arg-type]
    check_well_formed(events)
    json.dumps(events)  # all of it is JSON
