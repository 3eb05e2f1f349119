"""A turn's body, shaped in one place: from the client's frame and towards an upstream."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cch.jsoncodec import loads, object_type
from cch.wire import event_type, response_of, turn_body, upstream_ws_frame


def test_a_turn_body_keeps_the_clients_order_less_the_frame_fields() -> None:
    frame = {"type": "response.create", "model": "m", "background": True, "input": [], "stream": False}
    body = turn_body(frame)
    assert list(body) == ["model", "input", "stream"]
    assert body["stream"] is True


def test_the_query_model_fills_in_only_a_missing_or_empty_model() -> None:
    assert turn_body({"input": []}, "q") == {"input": [], "model": "q", "stream": True}
    assert turn_body({"model": "", "input": []}, "q")["model"] == "q"
    assert turn_body({"model": "m"}, "q")["model"] == "m"


def test_a_turn_body_is_unchanged_by_shaping_it_again() -> None:
    # The HTTP tunnel shapes the body the edge already shaped: the bytes must not move.
    body = turn_body({"type": "response.create", "input": [], "model": "m"})
    assert json.dumps(turn_body(body)) == json.dumps(body)


def test_the_upstream_websocket_frame_puts_type_first_and_drops_transport_fields() -> None:
    frame = json.loads(upstream_ws_frame({"model": "m", "stream": True, "background": False, "input": []}))
    assert list(frame) == ["type", "model", "input"]
    assert frame["type"] == "response.create"


# --- an event's type: orjson's quick verdict is the standard library's -------------------------


def full_parse_type(text: str) -> str | None:
    """The verdict with the standard library alone (cch.jsoncodec.loads): what every reader of
    an event's type relied on before the quick verdict."""
    try:
        value = loads(text)
    except ValueError:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["type", "response", "delta", "x"]), inner, max_size=3),
    max_leaves=8,
)
_types = st.sampled_from(
    ["response.output_text.delta", "response.completed", "response.created", "error", "", "é\u2028"]
)


@st.composite
def event_texts(draw: st.DrawFn) -> str:
    """Events and near-events: objects with or without a string type (duplicated keys, nested
    decoys), other JSON, and damaged text (cut, spliced, NaN, escapes, deep nesting)."""
    kind = draw(_types)
    body = json.dumps(draw(_values))
    text = draw(
        st.sampled_from(
            [
                f'{{"type":{json.dumps(kind)},"v":{body}}}',
                f'{{"v":{body},"type":{json.dumps(kind)}}}',
                f'{{"type":"decoy","type":{json.dumps(kind)}}}',
                f'{{"type":{json.dumps(kind)},"type":{body}}}',
                body,
                f'{{"type":{json.dumps(kind)},"v":NaN}}',
                f'{{"type":"\\u0065rror","v":{body}}}',
                "[" * 300 + "]" * 300,
                f'{{"type":{json.dumps(kind)},"v":' + "[" * 300 + "]" * 300 + "}",
                f'\ufeff{{"type":{json.dumps(kind)}}}',  # a byte-order mark before the object
            ]
        )
    )
    cut = draw(st.integers(min_value=0, max_value=len(text)))
    damage = draw(st.sampled_from(["none", "cut", "splice"]))
    if damage == "cut":
        text = text[:cut]
    elif damage == "splice":
        text = text[:cut] + draw(st.sampled_from(["}", "\x00", " ", ",", '"', "\\"])) + text[cut:]
    return text


@settings(max_examples=600, deadline=None)
@given(event_texts())
def test_the_quick_type_is_the_full_parses_type_wherever_it_answers(text: str) -> None:
    quick = object_type(text)
    assert quick is None or quick == full_parse_type(text), text
    assert object_type(text.encode("utf-8", "surrogatepass")) in (None, quick)
    assert event_type(text) == full_parse_type(text), text  # event_type is exact either way


def test_a_terminal_is_typed_by_the_full_parse_whose_response_is_kept() -> None:
    text = '{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":18446744073709551617}}}'
    assert event_type(text) == "response.completed"
    response = response_of(text)
    assert response is not None and response["usage"]["input_tokens"] == 2**64 + 1  # exact
