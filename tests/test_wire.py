"""A turn's body, shaped in one place: from the client's frame and towards an upstream."""

from __future__ import annotations

import json

from cch.wire import turn_body, upstream_ws_frame


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
