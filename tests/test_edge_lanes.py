"""Lanes (``stream_id``): frames in order within a lane, lanes side by side, each with its own
session (upstream socket, transcript), limits as OpenAI documents them (docs/protocol.md#lanes).

The first half drives :class:`EdgeConnection` without a socket; the second runs a real gateway
against the fake upstream, over both upstream transports and both tunnel modes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from conftest import eventually, gateway_config, response_create, start_gateway, within
from test_edge_connection import Channel, Producer, Tunnel, send
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cch.config import LimitsConfig
from cch.edge.connection import EdgeConnection
from cch.testing import FakeUpstream
from cch.testing.scripts import SSE_HEADERS, Delay, Event, Script, codex_events
from cch.turn import TurnTransportError
from cch.wire import MAX_ACTIVE_RESPONSES, MAX_STREAM_IDS

COMPLETED = {"type": "response.completed", "response": {"id": "r1"}}


def create(stream_id: Any = None, **fields: Any) -> str:
    frame: dict[str, Any] = {"type": "response.create", "model": "m", "input": "hi", **fields}
    if stream_id is not None:
        frame["stream_id"] = stream_id
    return json.dumps(frame)


@pytest.fixture
def parts() -> tuple[EdgeConnection, Channel, Tunnel, Clock, list[str]]:
    channel, tunnel, clock = Channel(), Tunnel(), Clock()
    released: list[str] = []
    conn = EdgeConnection(
        channel=channel,
        tunnel=tunnel,
        limits=LimitsConfig(),
        clock=clock,
        headers={},
        session_id="conn-1",
        on_close_decided=lambda holder: released.append(holder.session_id),
    )
    return conn, channel, tunnel, clock, released


# --- one connection, no socket ----------------------------------------------------------------------


def test_lanes_run_side_by_side_and_in_order_within_a_lane(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create("a", input="a1"))
    send(conn, create("b", input="b1"))
    send(conn, create("a", input="a2"))
    send(conn, create(input="d1"))
    # a1, b1 and the default lane's d1 run at once; a2 waits behind a1.
    assert [t.request.body["input"] for t in tunnel.turns] == ["a1", "b1", "d1"]
    tunnel.turns[1].events(COMPLETED)
    tunnel.turns[1].finish()
    assert len(tunnel.turns) == 3
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert [t.request.body["input"] for t in tunnel.turns] == ["a1", "b1", "d1", "a2"]
    assert conn.active == 2 and conn.pending_frames == 0


def test_each_lane_has_its_own_session_derived_from_the_connections(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, create("a"))
    send(conn, create("b"))
    send(conn, create())
    assert [t.request.session_id for t in tunnel.turns] == ["conn-1.1", "conn-1.2", "conn-1"]
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    send(conn, create("a"))
    assert tunnel.turns[-1].request.session_id == "conn-1.1"  # the lane keeps its session
    assert conn.session_ids == ["conn-1", "conn-1.1", "conn-1.2"]


def test_stream_id_never_reaches_the_turns_body(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, create("a", store=False))
    send(conn, json.dumps({"type": "response.create", "model": "m", "stream_id": None}))
    assert tunnel.turns[0].request.body == {"model": "m", "input": "hi", "store": False, "stream": True}
    assert tunnel.turns[1].request.body == {"model": "m", "stream": True}


def test_every_event_of_a_named_lane_carries_its_stream_id_byte_for_byte(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    raw: list[str] = []
    channel.send_text = lambda text: raw.append(text)  # type: ignore[method-assign]
    send(conn, create("lane.1"))
    sink = tunnel.turns[0].sink
    sink.sse_started(200, {})
    sink.sse_event('{"type":"response.created","response":{"id":"r1"}}', "response.created")
    sink.sse_event('{"type":"response.output_text.delta", "delta":"x" }  ', "response.output_text.delta")
    sink.sse_event("not json")
    sink.sse_event('{"type":"response.completed","response":{"id":"r1"}}', "response.completed")
    tunnel.turns[0].finish()
    assert raw == [
        '{"type":"response.created","response":{"id":"r1"},"stream_id":"lane.1"}',
        '{"type":"response.output_text.delta", "delta":"x" ,"stream_id":"lane.1"}',
        '{"type":"response.output_text.delta","delta":"not json","stream_id":"lane.1"}',
        '{"type":"response.completed","response":{"id":"r1"},"stream_id":"lane.1"}',
    ]


def test_the_default_lane_is_unchanged_byte_for_byte(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    raw: list[str] = []
    channel.send_text = lambda text: raw.append(text)  # type: ignore[method-assign]
    send(conn, create())
    sink = tunnel.turns[0].sink
    sink.sse_started(200, {})
    sink.sse_event('{"type":"response.created" ,"response":{}}', "response.created")
    sink.sse_event('{"type":"response.completed","response":{}}', "response.completed")
    tunnel.turns[0].finish()
    send(conn, "{nope")
    send(conn, json.dumps({"type": "session.update"}))
    assert raw[:2] == ['{"type":"response.created" ,"response":{}}', '{"type":"response.completed","response":{}}']
    assert [json.loads(t)["error"]["code"] for t in raw[2:]] == ["invalid_json", "unsupported_event_type"]
    assert all("stream_id" not in t for t in raw)


def test_a_json_body_and_an_internal_error_of_a_lane_carry_its_id(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create("a"))
    tunnel.turns[0].sink.json_body(401, b'{"error":{"code":"invalid_api_key","message":"no"}}', "application/json")
    tunnel.turns[0].finish()
    assert channel.frames[-1] == {
        "type": "error",
        "status": 401,
        "error": {"code": "invalid_api_key", "message": "no"},
        "stream_id": "a",
    }
    send(conn, create("a"))
    tunnel.turns[1].deferred.errback(RuntimeError("boom"))
    assert channel.frames[-1]["status"] == 500 and channel.frames[-1]["stream_id"] == "a"
    assert not conn.closed


@pytest.mark.parametrize("bad", ["", "x" * 257, "has space", "ünï", "a/b", 5, True, ["a"], {"a": 1}])
def test_an_invalid_stream_id_is_refused_in_the_default_lanes_order(parts: Any, bad: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create())  # the default lane is busy: the answer waits for its terminal
    send(conn, create(bad))
    assert len(tunnel.turns) == 1 and channel.frames == []
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    error = channel.frames[-1]
    assert error == {
        "type": "error",
        "status": 400,
        "error": {
            "type": "invalid_request_error",
            "code": "invalid_stream_id",
            "message": error["error"]["message"],
            "param": "stream_id",
        },
    }
    assert len(tunnel.turns) == 1 and not conn.closed


@pytest.mark.parametrize("good", ["a", "A-Z_0.9", "x" * 256, "-", "."])
def test_valid_stream_ids(parts: Any, good: str) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, create(good))
    assert tunnel.turns[0].request.session_id == "conn-1.1"


def test_the_thirty_third_stream_id_is_refused_and_the_connection_stays(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    for n in range(MAX_STREAM_IDS):
        send(conn, create(f"s{n}"))
        tunnel.turns[-1].events(COMPLETED)
        tunnel.turns[-1].finish()
    frames = len(channel.frames)
    send(conn, create("one-too-many"))
    assert channel.frames[frames:] == [
        {
            "type": "error",
            "status": 400,
            "error": {
                "type": "invalid_request_error",
                "code": "websocket_stream_limit_reached",
                "message": channel.frames[-1]["error"]["message"],
                "param": "stream_id",
            },
            "stream_id": "one-too-many",
        }
    ]
    assert len(tunnel.turns) == MAX_STREAM_IDS
    send(conn, create("s0"))  # a lane already open still runs, and so does the default
    send(conn, create())
    assert len(tunnel.turns) == MAX_STREAM_IDS + 2 and not conn.closed


def test_at_most_sixteen_responses_in_flight_the_rest_wait_in_order(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    for n in range(MAX_ACTIVE_RESPONSES + 2):
        send(conn, create(f"s{n}"))
    send(conn, create())
    assert len(tunnel.turns) == MAX_ACTIVE_RESPONSES and conn.active == MAX_ACTIVE_RESPONSES
    assert conn.pending_frames == 3
    tunnel.turns[3].events(COMPLETED)
    tunnel.turns[3].finish()
    assert [t.request.session_id for t in tunnel.turns[MAX_ACTIVE_RESPONSES:]] == ["conn-1.17"]
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    tunnel.turns[1].events(COMPLETED)
    tunnel.turns[1].finish()
    assert [t.request.session_id for t in tunnel.turns[MAX_ACTIVE_RESPONSES:]] == ["conn-1.17", "conn-1.18", "conn-1"]
    assert conn.active == MAX_ACTIVE_RESPONSES and conn.pending_frames == 0


def test_the_queue_limit_counts_every_lanes_waiting_frames(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    limit = conn.limits.max_pending_frames
    send(conn, create("a"))
    send(conn, create("b"))
    for n in range(limit):
        send(conn, create("a" if n % 2 else "b"))
    assert conn.pending_frames == limit and not conn.closed
    send(conn, create("c"))
    assert channel.closes == [(1008, "too_many_requests")]
    assert channel.frames[-1]["error"]["code"] == "too_many_requests"
    assert all(t.cancelled for t in tunnel.turns)


def test_close_means_stop_on_every_lane_and_releases_every_session(parts: Any) -> None:
    conn, channel, tunnel, _, released = parts
    send(conn, create("a"))
    send(conn, create("b"))
    send(conn, create())
    send(conn, create("a"))
    conn.binary_received()
    assert all(t.cancelled for t in tunnel.turns) and len(tunnel.turns) == 3
    assert conn.pending_frames == 0 and conn.active == 0
    assert released == ["conn-1", "conn-1.1", "conn-1.2"]
    assert channel.closes == [(1003, "binary_not_supported")]


def test_a_dropped_connection_releases_lanes_that_ran_no_turn_any_more(parts: Any) -> None:
    conn, _, tunnel, _, released = parts
    send(conn, create("a"))
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    conn.connection_lost()
    assert released == ["conn-1", "conn-1.1"]


def test_a_failing_release_hook_does_not_keep_the_other_sessions(parts: Any) -> None:
    conn, _, _, _, _ = parts
    seen: list[str] = []

    def hook(holder: Any) -> None:
        seen.append(holder.session_id)
        if holder.session_id == "conn-1.1":
            raise RuntimeError("pool is broken")

    conn._on_close_decided = hook
    send(conn, create("a"))
    send(conn, create("b"))
    conn.connection_lost()
    assert seen == ["conn-1", "conn-1.1", "conn-1.2"]


def test_a_transport_failure_of_a_lane_closes_1011_with_the_error_in_that_lane(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create("a"))
    send(conn, create("b"))
    tunnel.turns[1].deferred.errback(TurnTransportError("internal_request_error", "refused"))
    assert channel.frames[-1] == {
        "type": "error",
        "error": {"code": "internal_request_error", "message": "refused"},
        "stream_id": "b",
    }
    assert channel.closes == [(1011, "internal_request_error")]
    assert tunnel.turns[0].cancelled


def test_flow_control_pauses_and_resumes_every_lanes_producer(parts: Any) -> None:
    conn, _, tunnel, _, _ = parts
    send(conn, create("a"))
    send(conn, create("b"))
    producers = [Producer(), Producer()]
    for turn, producer in zip(tunnel.turns, producers, strict=True):
        turn.sink.register_producer(producer)
    conn.pauseProducing()
    send(conn, create("c"))
    late = Producer()
    tunnel.turns[2].sink.register_producer(late)
    conn.resumeProducing()
    assert [p.calls for p in producers] == [["pause", "resume"], ["pause", "resume"]]
    assert late.calls == ["pause", "resume"]


def test_draining_waits_for_every_lane(parts: Any) -> None:
    conn, channel, tunnel, _, _ = parts
    send(conn, create("a"))
    send(conn, create("b"))
    conn.leave()
    send(conn, create("c"))  # no new turn while leaving
    tunnel.turns[0].events(COMPLETED)
    tunnel.turns[0].finish()
    assert channel.closes == []
    tunnel.turns[1].events(COMPLETED)
    tunnel.turns[1].finish()
    assert channel.closes == [(1001, "going_away")] and len(tunnel.turns) == 2
    assert conn.idle


# --- through a real gateway ---------------------------------------------------------------------------


def by_input(delays: dict[str, float]) -> Any:
    """A script source answering each turn with ``codex_like`` events, held ``delays[text]``
    seconds (on the fake's clock) before its terminal."""

    def script(recorded: Any) -> Script:
        events = codex_events(recorded)
        text = recorded.body["input"][-1]["content"][0]["text"]
        steps: list[Any] = [Event(e) for e in events[:-1]]
        if delays.get(text):
            steps.append(Delay(delays[text]))
        steps.append(Event(events[-1]))
        return Script(tuple(steps), headers=SSE_HEADERS)

    return script


async def turn_of(client: Any, what: str = "a turn") -> list[Any]:
    return await within(Deferred.fromCoroutine(client.recv_turn()), what)


def user(text: str) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]


@pytest.mark.parametrize("tunnel", ["in-process", "http"])
@pytest.mark.parametrize("upstream", ["websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_two_lanes_run_in_parallel_through_the_gateway_and_release_everything(
    fake: FakeUpstream, tunnel: str, upstream: str
) -> None:
    clock = Clock()
    fake.clock = clock
    script = by_input({"slow": 5.0})
    fake.enqueue(script, script, script)
    gateway = await start_gateway(gateway_config(fake, tunnel=tunnel, upstream=upstream))
    try:
        client = await gateway.connect()
        client.send_json(response_create(stream_id="slow-lane", input=user("slow")))
        client.send_json(response_create(stream_id="fast-lane", input=user("fast")))
        # The fast lane completes while the slow one is still held upstream.
        fast: list[Any] = []
        while not (fast and fast[-1]["type"] == "response.completed"):
            event = await within(client.recv(), "fast lane events")
            if event.get("stream_id") == "fast-lane":
                fast.append(event)
        assert all(e["stream_id"] == "fast-lane" for e in fast)
        assert "echo: fast" in json.dumps(fast)
        clock.advance(5)
        slow = [e for e in client.received if e.get("stream_id") == "slow-lane"]
        while not (slow and slow[-1]["type"] == "response.completed"):
            slow.append(await within(client.recv(), "slow lane events"))
        assert {e["stream_id"] for e in slow} == {"slow-lane"}
        # The default lane still works, without any stream_id.
        client.send_json(response_create(input=user("plain")))
        plain = await turn_of(client, "default lane turn")
        assert plain[-1]["type"] == "response.completed" and all("stream_id" not in e for e in plain)
        # stream_id never reaches the upstream, on either transport.
        assert len(fake.requests) == 3
        for recorded in fake.requests:
            assert b"stream_id" not in recorded.raw and "stream_id" not in recorded.body
        service = gateway.service
        if upstream == "websocket":
            # One upstream socket per lane (and one for the default lane).
            assert len(fake.ws_connections) == 3
            assert len(service.ws_pool.entries) == 3
        assert service.transcripts is not None and len(service.transcripts.sessions) == 1  # the lanes share it
        await client.close()
        # Every lane's socket and transcript is released with the connection.
        if upstream == "websocket":
            await within(fake.wait_for_idle(), "upstream sockets to close")
        await eventually(lambda: service.ws_pool.sockets == set(), "the pool to hear its sockets close")
        assert service.ws_pool.entries == {}
        await eventually(lambda: not service.transcripts.sessions, "every lane's transcript to go")
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_lanes_continuity_is_its_own(fake: FakeUpstream) -> None:
    """store=false continuations ride each lane's own upstream socket."""
    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        client = await gateway.connect()
        ids = {}
        for lane in ("a", "b"):
            client.send_json(response_create(stream_id=lane, generate=False))
            events = await turn_of(client, "warm-up")
            ids[lane] = events[-1]["response"]["id"]
        for lane in ("a", "b"):
            client.send_json(response_create(stream_id=lane, previous_response_id=ids[lane], input=user(lane)))
            events = await turn_of(client)
            assert events[-1]["type"] == "response.completed", events[-1]
            assert events[-1]["stream_id"] == lane
        # Two sockets, each carrying its lane's warm-up and turn.
        assert [len(c.turns) for c in fake.ws_connections] == [2, 2]
        assert [c.turns[1].body["previous_response_id"] for c in fake.ws_connections] == [ids["a"], ids["b"]]
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_store_false_response_forks_onto_another_lane_by_replay(fake: FakeUpstream) -> None:
    """The lanes of a connection share its transcript: a continuation of lane a's store=false
    response in lane b is replayed whole on lane b's socket (which never saw it)."""
    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        client = await gateway.connect()
        client.send_json(response_create(stream_id="a", store=False, input=user("first")))
        first = await turn_of(client)
        rid = first[-1]["response"]["id"]
        client.send_json(response_create(stream_id="b", store=False, previous_response_id=rid, input=user("fork")))
        fork = await turn_of(client)
        assert fork[-1]["type"] == "response.completed" and fork[-1]["stream_id"] == "b", fork[-1]
        # Lane b's socket got the whole conversation, not an id it could not resolve.
        sent = fake.ws_connections[1].turns[0].body
        assert "previous_response_id" not in sent
        texts = json.dumps(sent["input"])
        assert "first" in texts and "fork" in texts and "echo: first" in texts
        # Lane a goes on with its own socket, as before.
        client.send_json(response_create(stream_id="a", store=False, previous_response_id=rid, input=user("more")))
        assert (await turn_of(client))[-1]["type"] == "response.completed"
        assert fake.ws_connections[0].turns[1].body["previous_response_id"] == rid
    finally:
        await gateway.stop()


def held(recorded: Any) -> Script:
    """``response.created``, then nothing until the peer goes away."""
    return Script((Event(codex_events(recorded)[0]), Delay(3600)), headers=SSE_HEADERS)


@pytest.mark.parametrize("how", ["client-close", "tcp-drop", "binary-frame", "drain", "overflow"])
@pytest.mark.parametrize("upstream", ["websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_every_close_path_releases_every_lanes_turn_socket_and_transcript(
    fake: FakeUpstream, upstream: str, how: str
) -> None:
    fake.clock = Clock()  # the held turns wait on it: only a close ends them
    gateway = await start_gateway(
        gateway_config(fake, upstream=upstream, limits=LimitsConfig(max_pending_frames=2))
    )
    try:
        fake.enqueue(held, held, held)
        client = await gateway.connect()
        for lane in ("a", "b", None):
            client.send_json(response_create(stream_id=lane) if lane else response_create())
        await within(fake.wait_for_requests(3), "three turns upstream")
        service = gateway.service
        assert service.handler.active == 3 and len(service.transcripts.sessions) == 1
        if how == "client-close":
            await client.close()
        elif how == "tcp-drop":
            await client.abort()
        elif how == "binary-frame":
            client.send_bytes(b"\x00")
            assert (await within(client.wait_closed(), "the close")).code == 1003
        elif how == "drain":
            service.edge_factory.go_away(only_idle=False)
            assert (await within(client.wait_closed(), "the close")).code == 1001
        else:
            for lane in ("a", "a", "a"):
                client.send_json(response_create(stream_id=lane))
            assert (await within(client.wait_closed(), "the close")).code == 1008
        for index in range(3):
            assert (await within(fake.wait_for_cancelled(index), "every upstream turn aborted")).cancelled
        await eventually(lambda: service.handler.active == 0, "every turn to end")
        await eventually(lambda: not service.ws_pool.sockets, "every lane's socket to close")
        assert service.ws_pool.entries == {} and service.transcripts.sessions == {}
        assert not service.edge_factory.live or all(p.edge.closed for p in service.edge_factory.live)
    finally:
        await gateway.stop()
