"""The client WebSocket edge end to end: real sockets, real gateway, real fake upstream,
in both tunnel modes (in-process and HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from conftest import event_types as types
from conftest import response_create as create
from twisted.internet import reactor
from twisted.internet.task import Clock

from cch.testing import FakeUpstream
from cch.testing.scripts import (
    Delay,
    Event,
    Hold,
    Raw,
    Script,
    drop_after,
    error_json,
    hold,
    sse,
    ws_close_after,
)

CREATED = {"type": "response.created", "response": {"id": "resp_x", "status": "in_progress"}}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_x", "status": "completed"}}


@pytest_twisted.ensureDeferred
async def test_two_turns_on_one_connection_with_previous_response_id(gateway: Any, fake: FakeUpstream) -> None:
    client = await gateway.connect()
    client.send_json(create(generate=False, store=True))
    warm = await client.recv_turn()
    assert types(warm) == ["response.created", "response.completed"]
    first_id = warm[-1]["response"]["id"]
    client.send_json(create(previous_response_id=first_id, store=True))
    turn = await client.recv_turn()
    assert turn[0]["type"] == "response.created"
    assert "response.output_text.delta" in types(turn)
    assert turn[-1]["type"] == "response.completed"
    assert client.close_info is None
    if gateway.upstream == "http":
        # An HTTP upstream cannot keep a warm-up: the gateway answered it, and the turn that
        # points at it carries the whole conversation instead.
        assert first_id.startswith("resp_cch_")
        assert len(fake.requests) == 1
        second = fake.requests[0]
        assert "previous_response_id" not in second.body
        assert second.body["input"] == create()["input"] * 2
        assert second.body["stream"] is True and "type" not in second.body
    else:
        # One upstream socket carried both turns; transport-only fields are stripped.
        assert len(fake.requests) == 2
        second = fake.requests[1]
        assert second.body["previous_response_id"] == first_id
        assert second.body["type"] == "response.create" and "stream" not in second.body
        assert fake.requests[0].connection_index == second.connection_index == 0
        assert len(fake.ws_connections) == 1
    assert not any(name.startswith("x-cch-") for name in second.headers)


@pytest_twisted.ensureDeferred
async def test_query_model_fills_in_and_client_headers_reach_upstream(gateway: Any, fake: FakeUpstream) -> None:
    client = await gateway.connect(
        "?model=from-query&api_key=secret",
        headers={"originator": "codex_exec", "x-cch-internal-secret": "forged", "x-cch-client-transport": "websocket"},
    )
    frame = create()
    del frame["model"]
    client.send_json(frame)
    await client.recv_turn()
    seen = fake.requests[0]
    assert seen.body["model"] == "from-query"
    assert seen.headers["originator"] == "codex_exec"
    assert not any(name.startswith("x-cch-") for name in seen.headers)


@pytest_twisted.ensureDeferred
async def test_recoverable_errors_then_a_real_turn(gateway: Any, fake: FakeUpstream) -> None:
    client = await gateway.connect()
    client.send_text("{not json")
    client.send_text('{"type":"session.update"}')
    client.send_json(create())
    first = await client.recv()
    second = await client.recv()
    assert first["error"]["code"] == "invalid_json"
    assert second["error"]["code"] == "unsupported_event_type"
    turn = await client.recv_turn()
    assert turn[-1]["type"] == "response.completed"
    assert client.close_info is None


@pytest_twisted.ensureDeferred
async def test_binary_frame_closes_1003_after_error_frame_and_cancels_upstream(gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(hold([CREATED]))
    client = await gateway.connect()
    client.send_json(create())
    assert (await client.recv())["type"] == "response.created"
    client.send_bytes(b"\x00\x01")
    error = await client.recv()
    assert error == {"type": "error", "error": {"code": "invalid_frame_type", "message": "Only text WebSocket frames are supported"}}
    info = await client.wait_closed()
    assert (info.code, info.reason) == (1003, "binary_not_supported")
    await fake.wait_for_cancelled(0)
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_client_vanishing_mid_turn_cancels_the_one_upstream_request(gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(hold([CREATED]))
    client = await gateway.connect()
    client.send_json(create())
    client.send_json(create())
    client.send_json(create())
    await client.recv()
    await client.abort()
    await fake.wait_for_cancelled(0)
    assert len(fake.requests) == 1
    assert gateway.service.edge_factory.live == set() or await _live_empty(gateway)


async def _live_empty(gateway: Any) -> bool:
    await gateway.service.edge_factory.wait_empty()
    return True


@pytest_twisted.ensureDeferred
async def test_pipelined_frames_never_overlap_upstream(gateway: Any, fake: FakeUpstream) -> None:
    clock = Clock()
    fake.clock = clock
    fake.enqueue(
        Script(steps=(Event(CREATED), Delay(5), Event(COMPLETED))),
        Script(steps=(Event(CREATED), Event(COMPLETED))),
    )
    client = await gateway.connect()
    client.send_json(create())
    client.send_json(create())
    assert (await client.recv())["type"] == "response.created"
    assert len(fake.requests) == 1
    clock.advance(5)
    assert (await client.recv())["type"] == "response.completed"
    await client.recv_turn()
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_sixty_six_frames_behind_a_turn_close_1008(gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(hold([CREATED]))
    client = await gateway.connect()
    client.send_json(create())
    assert (await client.recv())["type"] == "response.created"
    for _ in range(65):
        client.send_json(create())
    error = await client.recv()
    assert error["error"] == {"code": "too_many_requests", "message": "Pending frame limit exceeded"}
    info = await client.wait_closed()
    assert (info.code, info.reason) == (1008, "too_many_requests")
    await fake.wait_for_cancelled(0)
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_message_over_32_mib_closes_1009(gateway: Any) -> None:
    client = await gateway.connect()
    client.send_text("x" * (32 * 1024 * 1024 + 1))
    info = await client.wait_closed()
    assert info.code == 1009


@pytest_twisted.ensureDeferred
async def test_stream_without_terminal_closes_1011(http_gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(sse([CREATED]))
    client = await http_gateway.connect()
    client.send_json(create())
    assert (await client.recv())["type"] == "response.created"
    error = await client.recv()
    assert error["error"]["code"] == "stream_ended_without_terminal"
    info = await client.wait_closed()
    assert (info.code, info.reason) == (1011, "stream_ended_without_terminal")


@pytest_twisted.ensureDeferred
async def test_upstream_drop_mid_stream_ends_the_turn_with_an_error_event(gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(drop_after([CREATED, COMPLETED], 1))
    client = await gateway.connect()
    client.send_json(create())
    events = await client.recv_turn()
    assert types(events) == ["response.created", "error"]
    expected = "upstream_stream_error" if gateway.upstream == "http" else "upstream_ws_mid_stream_error"
    assert events[-1]["error"]["code"] == expected
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"


@pytest_twisted.ensureDeferred
async def test_upstream_json_error_is_a_per_turn_error_frame(http_gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(error_json(400, "bad_thing", "You did a bad thing", type="invalid_request_error"))
    client = await http_gateway.connect()
    client.send_json(create())
    frame = await client.recv()
    assert frame == {"type": "error", "status": 400, "error": {"message": "You did a bad thing", "type": "invalid_request_error", "code": "bad_thing"}}
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"


@pytest_twisted.ensureDeferred
async def test_sse_translation_rules_across_fragmented_crlf_stream(http_gateway: Any, fake: FakeUpstream) -> None:
    raw = (
        b": keep-alive\r\n\r\n"
        b"event: response.created\r\nid: 1\r\ndata: " + json.dumps(CREATED).encode() + b"\r\n\r\n"
        b"data: not json at all \n\n"
        b"data: {\"type\":\"response.output_text.delta\",\n"
        b"data: \"delta\":\"two lines\"}\n\r\n"
        b"retry: 10\n\n"
        b"data: [DONE]\n\n"
        b"data: " + json.dumps(COMPLETED).encode() + b"\n\n"
    )
    steps = tuple(Raw(raw[i : i + 7]) for i in range(0, len(raw), 7))
    fake.enqueue(Script(steps=steps, headers=(("content-type", "text/event-stream"),)))
    client = await http_gateway.connect()
    client.send_json(create())
    events = [await client.recv() for _ in range(5)]
    assert events[0] == CREATED
    assert events[1] == {"type": "response.output_text.delta", "delta": "not json at all"}
    assert events[2] == {"type": "response.output_text.delta", "delta": "two lines"}
    assert events[3] == {"type": "response.completed", "response": None}
    assert events[4] == COMPLETED
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"


@pytest_twisted.ensureDeferred
async def test_hold_then_client_close_frame_cancels_upstream(gateway: Any, fake: FakeUpstream) -> None:
    fake.enqueue(Script(steps=(Event(CREATED), Hold()), headers=(("content-type", "text/event-stream"),)))
    client = await gateway.connect()
    client.send_json(create())
    await client.recv()
    info = await client.close(1000)
    assert info.code == 1000
    await fake.wait_for_cancelled(0)


@pytest_twisted.ensureDeferred
async def test_gateway_stop_closes_clients_1001(fake: FakeUpstream, tunnel_mode: str) -> None:
    from conftest import gateway_config, start_gateway

    running = await start_gateway(gateway_config(fake, tunnel=tunnel_mode))
    client = await running.connect()
    await running.service.stopService()
    info = await client.wait_closed()
    assert (info.code, info.reason) == (1001, "going_away")
    _ = reactor


@pytest_twisted.ensureDeferred
async def test_upstream_socket_closing_mid_turn_is_a_terminal_error_and_the_client_stays(
    ws_gateway: Any, fake: FakeUpstream
) -> None:
    fake.enqueue(ws_close_after([CREATED, COMPLETED], 1, code=1011, reason="boom"))
    client = await ws_gateway.connect()
    client.send_json(create())
    events = await client.recv_turn()
    assert events[-1] == {
        "type": "error",
        "error": {"code": "upstream_ws_closed_mid_stream", "message": "upstream WebSocket closed (code=1011): boom"},
    }
    client.send_json(create())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    assert len(fake.ws_connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_crashing_connection_handler_closes_1011_internal_error(gateway: Any, monkeypatch: Any) -> None:
    from cch.edge.connection import EdgeConnection

    def explode(self: EdgeConnection, text: str, size: int) -> None:
        raise RuntimeError("handler bug")

    client = await gateway.connect()
    monkeypatch.setattr(EdgeConnection, "text_received", explode)
    client.send_json(create())
    info = await client.wait_closed()
    assert (info.code, info.reason) == (1011, "internal_error")
    assert client.received == []
