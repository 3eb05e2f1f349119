"""The official ``openai`` Python SDK through cch, end to end (docs/protocol.md).

The SDK's ``client.responses.connect()`` and its lane session
(``openai.lib.responses_websocket.ResponsesWebSocketSession``: ``session.lane(stream_id)``
sends ``response.create`` with that ``stream_id`` and routes events back by theirs) run in a
thread of the reactor's pool (``deferToThread``), against a real gateway on 127.0.0.1 in front
of the fake upstream; the reactor never blocks. Every SDK wait has a timeout.

Also here: which of cch's close codes make the SDK reconnect, read from the SDK itself and
seen happen (docs/protocol.md#close-codes).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted

pytest.importorskip("websockets", reason="the SDK's WebSocket needs openai[realtime] (websockets)")

from conftest import eventually, gateway_config, start_gateway, within  # noqa: E402
from openai import OpenAI  # noqa: E402
from openai.lib.responses_websocket import (  # noqa: E402
    ResponsesWebSocketLimits,
    ResponsesWebSocketSession,
)
from openai.types.websocket_reconnection import is_recoverable_close  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from cch.testing import FakeUpstream  # noqa: E402
from cch.testing.scripts import SSE_HEADERS, Delay, Event, Script, codex_events, hold, sse  # noqa: E402

WAIT = 15.0  # seconds any one SDK call may take before the test fails
LIMITS = ResponsesWebSocketLimits(
    max_lanes=8, max_events_per_lane=256, max_events=1024, max_bytes_per_lane=1 << 24, max_bytes=1 << 25
)


def sdk(gateway: Any) -> OpenAI:
    return OpenAI(api_key="sk-test", base_url=gateway.http_url + "/v1", max_retries=0)


def by_input(recorded: Any) -> Script:
    """Each turn answered in Codex's full event sequence; "slow" waits 5 s (fake clock) before
    its terminal, "hold" never ends."""
    events = codex_events(recorded)
    text = recorded.body.get("input")
    if text == "hold":
        return hold(events[:1])
    steps: list[Any] = [Event(e) for e in events[:-1]]
    if text == "slow":
        steps.append(Delay(5.0))
    steps.append(Event(events[-1]))
    return Script(tuple(steps), headers=SSE_HEADERS)


@pytest.mark.parametrize("upstream", ["websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_two_lanes_in_parallel_and_a_cancel_through_the_sdk(fake: FakeUpstream, upstream: str) -> None:
    clock = Clock()
    fake.clock = clock
    fake.enqueue(by_input, by_input, by_input, by_input)
    gateway = await start_gateway(gateway_config(fake, upstream=upstream))
    release_slow = threading.Event()

    def run() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with sdk(gateway).responses.connect() as connection, ResponsesWebSocketSession(
            connection, limits=LIMITS
        ) as session:
            slow, fast, cancelled = session.lane("slow-lane"), session.lane("fast-lane"), session.lane("stop-me")
            slow.send({"type": "response.create", "model": "gpt-5.5", "input": "slow", "store": False})
            fast.send({"type": "response.create", "model": "gpt-5.5", "input": "fast", "store": False})
            # The fast lane finishes while the slow one is held upstream: they run side by side.
            seen["fast"] = fast.get_final_response(timeout=WAIT)
            reactor.callFromThread(release_slow.set)
            seen["slow"] = slow.get_final_response(timeout=WAIT)
            # A cancel stops the stop-me lane's response in flight.
            cancelled.send({"type": "response.create", "model": "gpt-5.5", "input": "hold", "store": False})
            created = cancelled.recv(timeout=WAIT)
            seen["created"] = created
            cancelled.send({"type": "response.cancel", "stream_id": "stop-me"})
            seen["cancelled"] = cancelled.get_final_response(timeout=WAIT)
            # The lane goes on afterwards.
            cancelled.send({"type": "response.create", "model": "gpt-5.5", "input": "again", "store": False})
            seen["again"] = cancelled.get_final_response(timeout=WAIT)
        return seen

    try:
        running = deferToThread(run)

        async def advance_when_told() -> None:
            await eventually(release_slow.is_set, "the fast lane to finish first", WAIT)
            clock.advance(5)

        await advance_when_told()
        seen = await running
        assert seen["fast"].status == "completed" and seen["fast"].output_text == "echo: fast"
        assert seen["slow"].status == "completed" and seen["slow"].output_text == "echo: slow"
        assert seen["created"].type == "response.created" and seen["created"].stream_id == "stop-me"
        assert seen["cancelled"].status == "cancelled"
        assert seen["cancelled"].id == seen["created"].response.id
        assert seen["again"].status == "completed" and seen["again"].output_text == "echo: again"
        # The held request was aborted upstream; stream_id never went there.
        held = next(i for i, r in enumerate(fake.requests) if r.body.get("input") == "hold")
        assert (await within(fake.wait_for_cancelled(held), "the held request to be aborted")).cancelled
        assert all(b"stream_id" not in r.raw for r in fake.requests)
        service = gateway.service
        await eventually(lambda: not service.edge_factory.live, "the SDK's connection to close")
        await eventually(lambda: not service.ws_pool.sockets, "every lane's upstream socket to close")
        assert service.ws_pool.entries == {}
        assert service.transcripts is not None and service.transcripts.sessions == {}
    finally:
        await gateway.stop()


# --- close codes: what the SDK reconnects on ------------------------------------------------------

# Every close code cch sends (docs/protocol.md#close-codes) and whether the SDK's
# connect(on_reconnecting=...) reconnects after it. 1012 and 1013 are listed because clients
# act on them; cch never sends them.
CCH_CLOSES = {
    1000: False,  # echo of the client's own close
    1001: True,  # going_away: drain
    1003: False,  # binary_not_supported
    1008: False,  # too_many_requests
    1009: False,  # message too big (the client's, or mirrored from the upstream)
    1011: True,  # internal errors, outbound_send_timeout
    1012: True,
    1013: True,
}


@pytest.mark.parametrize(("code", "reconnects"), sorted(CCH_CLOSES.items()))
def test_which_close_codes_make_the_sdk_reconnect(code: int, reconnects: bool) -> None:
    assert is_recoverable_close(code) is reconnects


def record_reconnects(gateway: Any, send: dict[str, Any] | None) -> list[int]:
    """Connect with an ``on_reconnecting`` handler, optionally send one frame, read until the
    connection ends; the close codes the SDK wanted to reconnect after (it is told to stop)."""
    codes: list[int] = []

    def on_reconnecting(event: Any) -> dict[str, Any]:
        codes.append(event.close_code)
        return {"abort": True}

    with sdk(gateway).responses.connect(on_reconnecting=on_reconnecting, max_retries=1, initial_delay=0.01) as connection:
        if send is not None:
            connection.send(send)
        try:
            for _ in connection:
                pass
        except Exception:
            pass  # the connection ended: what matters is whether the SDK wanted to reconnect
    return codes


@pytest_twisted.ensureDeferred
async def test_the_sdk_reconnects_after_a_drain_close(fake: FakeUpstream) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="http"))
    try:
        running = deferToThread(record_reconnects, gateway, None)
        factory = gateway.service.edge_factory
        await eventually(lambda: len(factory.live) == 1, "the SDK to connect")
        factory.go_away(only_idle=True)  # 1001 going_away
        assert await running == [1001]
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_the_sdk_reconnects_after_a_1011(fake: FakeUpstream) -> None:
    gateway = await start_gateway(gateway_config(fake, upstream="http"))
    try:
        fake.enqueue(lambda recorded: sse(codex_events(recorded)[:2]))  # ends without a terminal
        create = {"type": "response.create", "model": "gpt-5.5", "input": "hi"}
        assert await deferToThread(record_reconnects, gateway, create) == [1011]
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_the_sdk_does_not_reconnect_after_a_mirrored_1009(fake: FakeUpstream) -> None:
    from cch.testing.scripts import Close

    gateway = await start_gateway(gateway_config(fake, upstream="websocket"))
    try:
        fake.enqueue(Script((Close(1009, "too big"),), headers=SSE_HEADERS))
        create = {"type": "response.create", "model": "gpt-5.5", "input": "hi"}
        assert await deferToThread(record_reconnects, gateway, create) == []
        assert [r.transport for r in fake.requests] == ["websocket"]
    finally:
        await gateway.stop()
