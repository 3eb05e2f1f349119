"""The responses pipeline (cch/handler/pipeline.py) in memory: a real pool on in-memory sockets,
an HTTP upstream double answering with ``IResponse`` doubles, and a ``task.Clock``
(tests/doubles.py). No sockets, no reactor I/O.

Every test leaves nothing behind: no request in progress, every upstream request answered and
its body read or stopped, every socket closed after the pool stops, no call on the clock.
"""

from __future__ import annotations

import gc
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from cch.config import (
    BreakerConfig,
    ClientKey,
    LimitsConfig,
    ProviderConfig,
    UpstreamWebSocketConfig,
)
from cch.handler.auth import KeyRing
from cch.handler.pipeline import ResponsesHandler
from cch.handler.routing import CLOSED as BREAKER_CLOSED
from cch.handler.routing import OPEN as BREAKER_OPEN
from cch.handler.routing import ProviderRouter
from cch.transcript import Origin, TranscriptStore
from cch.turn import RequestContext
from cch.upstream.pool import UpstreamWSPool
from cch.upstream.ws import CLOSING
from tests.doubles import FakeHttp, FakeSocket, MemorySink, SocketFactory, failure_of, result_of

CLIENT_KEY = "client-key-0123456789"
SESSION = "sess-1"


def provider(name: str, *, priority: int = 0, websocket: str = "off", **kw: Any) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        base_url=f"https://{name}.example/v1",
        api_key=f"key-{name}",
        priority=priority,
        websocket=websocket,
        **kw,
    )


def ws_ctx(session: str = SESSION) -> RequestContext:
    """A trusted WebSocket turn, as the edge hands it over."""
    return RequestContext(
        headers={"authorization": f"Bearer {CLIENT_KEY}", "user-agent": "codex-test"},
        via_websocket=True,
        ws_session=session,
        request_id="req-1",
    )


def http_ctx(key: str | None = CLIENT_KEY) -> RequestContext:
    headers = {"user-agent": "codex-test"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return RequestContext(headers=headers, request_id="req-2")


def ev(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def created(rid: str) -> str:
    return ev("response.created", response={"id": rid})


def completed(rid: str, text: str = "answer") -> str:
    output = [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
    ]
    return ev("response.completed", response={"id": rid, "output": output})


def output_of(rid: str, text: str = "answer") -> list[dict[str, Any]]:
    return json.loads(completed(rid, text))["response"]["output"]


LIMIT = ev("error", error={"code": "websocket_connection_limit_reached", "message": "60 minutes"})


def not_found(rid: str) -> str:
    return ev(
        "error",
        error={
            "code": "previous_response_not_found",
            "message": f"Previous response with id '{rid}' not found.",
        },
    )


# -- the rig --------------------------------------------------------------------------------------


@dataclass
class Rig:
    clock: Clock
    sockets: SocketFactory
    pool: UpstreamWSPool
    http: FakeHttp
    transcripts: TranscriptStore
    router: ProviderRouter
    handler: ResponsesHandler
    turns: list[Deferred[None]] = field(default_factory=list)

    def handle(
        self, ctx: RequestContext, body: dict[str, Any]
    ) -> tuple[Deferred[None], MemorySink]:
        sink = MemorySink()
        d = self.handler.handle(ctx, body, sink)
        self.turns.append(d)
        return d, sink

    def breaker(self, name: str) -> Any:
        return self.router.get(name).breaker

    def ws_turn(
        self, body: dict[str, Any], rid: str, *, sock: FakeSocket | None = None
    ) -> tuple[FakeSocket, MemorySink]:
        """A whole WebSocket turn answered ``rid`` (on ``sock`` when it is reused, else on a new
        socket the test opens)."""
        made = len(self.sockets.made)
        d, sink = self.handle(ws_ctx(), body)
        if sock is None:
            assert len(self.sockets.made) == made + 1, "expected a new socket"
            sock = self.sockets.last
            sock.open()
        else:
            assert len(self.sockets.made) == made, "expected the socket to be reused"
        sock.message(created(rid))
        sock.message(completed(rid))
        result_of(d)
        return sock, sink

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in self.handler.collect()
            for sample in family.samples
        }


@pytest.fixture
def unhandled() -> Iterator[None]:
    """Fails the test when a Deferred was left with an unhandled failure."""
    seen: list[dict[str, Any]] = []

    def observe(entry: dict[str, Any]) -> None:
        if str(entry.get("log_format", "")).startswith("Unhandled error in Deferred"):
            seen.append(entry)

    globalLogPublisher.addObserver(observe)
    yield
    gc.collect()
    globalLogPublisher.removeObserver(observe)
    assert seen == [], "a Deferred was left with an unhandled failure"


@pytest.fixture
def make_rig(unhandled: None) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(
        *providers: ProviderConfig,
        keys: tuple[ClientKey, ...] = (ClientKey(name="team", key=CLIENT_KEY),),
        breaker: BreakerConfig | None = None,
        ws: UpstreamWebSocketConfig | None = None,
        transcripts: TranscriptStore | None = None,
    ) -> Rig:
        clock = Clock()
        sockets = SocketFactory()
        pool = UpstreamWSPool(None, clock, ws or UpstreamWebSocketConfig(), open_socket=sockets)
        pool.startService()
        http = FakeHttp()
        store = transcripts or TranscriptStore(1 << 20, 64, 16)
        router = ProviderRouter(
            providers or (provider("a", websocket="on"),),
            breaker or BreakerConfig(),
            clock,
            random.Random(7),
        )
        handler = ResponsesHandler(
            keys=KeyRing(keys),
            router=router,
            upstream=http,  # type: ignore[arg-type]
            clock=clock,
            limits=LimitsConfig(),
            ws_pool=pool,
            transcripts=store,
        )
        rig = Rig(clock, sockets, pool, http, store, router, handler)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        assert all(d.called for d in rig.turns), "a turn never ended"
        assert rig.handler.active == 0
        assert rig.http.unfinished() == []
        stopped = rig.pool.stopService()
        rig.sockets.settle()
        result_of(stopped)
        assert rig.pool.entries == {} and rig.pool.sockets == set()
        assert rig.sockets.not_closed() == []
        assert rig.clock.getDelayedCalls() == []


# -- refusals ----------------------------------------------------------------------------------


def test_bad_key_gets_401_invalid_api_key_and_nothing_goes_upstream(make_rig: Any) -> None:
    rig = make_rig()
    for ctx in (
        http_ctx(None),
        http_ctx("wrong-key"),
        RequestContext(headers={}, via_websocket=True, ws_session=SESSION),
    ):
        d, sink = rig.handle(ctx, {"model": "m", "input": "hi"})
        result_of(d)
        status, body = sink.json_error()
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert sink.json[0][2] == "application/json"
    assert rig.http.calls == [] and rig.sockets.made == []


def test_model_no_provider_serves_gets_503_no_provider(make_rig: Any) -> None:
    rig = make_rig(provider("a", models=("gpt-a",)))
    d, sink = rig.handle(http_ctx(), {"model": "gpt-b", "input": "hi"})
    result_of(d)
    status, body = sink.json_error()
    assert status == 503 and body["error"]["code"] == "no_provider"
    assert "gpt-b" in body["error"]["message"]
    assert rig.http.calls == []


# -- the WebSocket path -------------------------------------------------------------------------


def test_websocket_turn_streams_the_upstream_events_as_they_come(make_rig: Any) -> None:
    rig = make_rig(provider("a", websocket="on", idle_timeout=30.0))
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hello", "stream": True, "store": False})
    sock = rig.sockets.last
    assert sock.target.url == "wss://a.example/v1/responses"
    headers = dict(sock.target.headers)
    assert headers["authorization"] == "Bearer key-a"  # the provider's key, never the client's
    assert "accept" not in headers and "content-type" not in headers
    assert sock.target.session_id == SESSION
    sock.open()
    assert sock.frames() == [
        {"type": "response.create", "model": "m", "input": "hello", "store": False}
    ]
    assert sink.started == [] and not d.called
    sock.message(created("resp_1"))
    assert sink.started[0][1]["x-cch-upstream-transport"] == "websocket"
    assert sink.events == [(created("resp_1"), "response.created")]
    sock.message(ev("response.output_text.delta", delta="ans"))
    sock.message(completed("resp_1"))
    result_of(d)
    assert sink.types == ["response.created", "response.output_text.delta", "response.completed"]
    assert sink.data[-1] == completed("resp_1")  # byte for byte
    assert rig.handler.active == 0
    assert rig.http.calls == []
    assert sock.state != CLOSING and rig.pool.peek(rig.sockets.last.target) == sock.id  # kept
    transcript = rig.transcripts.get(SESSION)
    assert transcript.origin("resp_1") == Origin("a", "websocket", sock.id, False)
    assert transcript.replay_input("resp_1") == [
        {"role": "user", "content": "hello"},
        *output_of("resp_1"),
    ]


def test_websocket_upstream_silent_mid_stream_for_the_providers_idle_timeout_ends_the_turn(
    make_rig: Any,
) -> None:
    rig = make_rig(provider("a", websocket="on", idle_timeout=45.0))
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi"})
    sock = rig.sockets.last
    sock.open()
    sock.message(created("resp_1"))
    rig.clock.advance(44)
    assert not d.called
    rig.clock.advance(1)
    result_of(d)
    assert sink.parsed()[-1]["error"] == {
        "code": "upstream_idle_timeout",
        "message": "upstream sent nothing for 45s",
    }
    assert sock.close_code == 1011 and rig.pool.entries == {}
    assert rig.http.calls == []


def test_next_turn_rides_the_same_socket_with_previous_response_id_as_sent(make_rig: Any) -> None:
    rig = make_rig()
    sock, _ = rig.ws_turn({"model": "m", "input": "hello", "store": False}, "resp_1")
    rig.ws_turn(
        {"model": "m", "input": "again", "previous_response_id": "resp_1", "store": False},
        "resp_2",
        sock=sock,
    )
    assert sock.frames()[1] == {
        "type": "response.create",
        "model": "m",
        "input": "again",
        "previous_response_id": "resp_1",
        "store": False,
    }
    figures = rig.metrics()
    assert figures[("cch_upstream_attempts_total", (("transport", "websocket"),))] == 2
    assert rig.handler.ws_figures.reused == 1 and rig.handler.ws_figures.connected == 2


def test_websocket_failing_before_the_first_event_falls_back_to_http_on_the_same_provider(
    make_rig: Any,
) -> None:
    rig = make_rig(
        provider("a", websocket="on"),
        provider("b", priority=1, websocket="on"),
        breaker=BreakerConfig(failure_threshold=1),
    )
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi", "stream": True})
    rig.sockets.last.fail("connection refused")
    call = rig.http.last
    assert call.url == "https://a.example/v1/responses"
    assert call.json == {"model": "m", "input": "hi", "stream": True}
    assert call.headers["authorization"] == "Bearer key-a"
    # A fallback is no verdict on the provider: with a threshold of 1 one failure would open it.
    assert rig.breaker("a").failures == 0 and rig.breaker("a").state == BREAKER_CLOSED
    response = call.respond(200)
    response.event(created("resp_1"))
    response.event(completed("resp_1"))
    response.finish()
    result_of(d)
    assert sink.types == ["response.created", "response.completed"]
    assert len(rig.sockets.made) == 1 and len(rig.http.calls) == 1  # never provider b
    assert rig.handler.ws_figures.fallbacks == {"ws_error_pre_first_event": 1}
    assert rig.transcripts.get(SESSION).origin("resp_1") == Origin("a", "http", None, True)


def test_cacheable_upgrade_refusal_sends_later_turns_straight_to_http(make_rig: Any) -> None:
    rig = make_rig(provider("a", websocket="auto"))
    for turn in range(2):
        d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi"})
        if turn == 0:
            rig.sockets.last.refuse_upgrade(426, "Upgrade Required")
        response = rig.http.last.respond(200)
        response.event(completed(f"resp_{turn}"))
        response.finish()
        result_of(d)
        assert sink.types == ["response.completed"]
    assert len(rig.sockets.made) == 1
    assert rig.handler.ws_figures.fallbacks == {
        "ws_upgrade_rejected": 1,
        "endpoint_ws_unsupported_cached": 1,
    }


def test_silence_after_the_frame_was_sent_ends_the_turn_with_one_error_event_and_no_http(
    make_rig: Any,
) -> None:
    rig = make_rig(ws=UpstreamWebSocketConfig(first_event_timeout=20.0))
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi"})
    sock = rig.sockets.last
    sock.open()
    rig.clock.advance(20)
    result_of(d)
    assert len(sink.events) == 1
    assert sink.parsed()[0]["error"]["code"] == "upstream_first_event_timeout"
    assert rig.http.calls == []
    assert sock.close_code == 1011
    assert rig.breaker("a").failures == 0
    assert rig.handler.ws_figures.failures == {"upstream_first_event_timeout": 1}


def test_connection_limit_first_event_is_resent_on_a_fresh_socket_and_never_reaches_the_client(
    make_rig: Any,
) -> None:
    rig = make_rig()
    old, _ = rig.ws_turn({"model": "m", "input": "hello", "store": False}, "resp_1")
    d, sink = rig.handle(
        ws_ctx(), {"model": "m", "input": "again", "previous_response_id": "resp_1", "store": False}
    )
    old.message(LIMIT)
    assert old.close_code == 1000
    new = rig.sockets.last
    assert new is not old
    new.open()
    # The fresh socket cannot resolve resp_1 (store=false, another socket): the chain is replayed.
    assert new.frames() == [
        {
            "type": "response.create",
            "model": "m",
            "input": [
                {"role": "user", "content": "hello"},
                *output_of("resp_1"),
                {"role": "user", "content": "again"},
            ],
            "store": False,
        }
    ]
    new.message(created("resp_2"))
    new.message(completed("resp_2"))
    result_of(d)
    assert sink.data == [created("resp_2"), completed("resp_2")]
    assert rig.pool.peek(new.target) == new.id
    assert rig.handler.ws_figures.retries == {"connection_limit": 1}
    assert rig.http.calls == []


def test_previous_lost_that_the_transcript_holds_is_replayed_on_a_fresh_socket(
    make_rig: Any,
) -> None:
    rig = make_rig()
    old, _ = rig.ws_turn({"model": "m", "input": "hello", "store": False}, "resp_1")
    d, sink = rig.handle(
        ws_ctx(), {"model": "m", "input": "again", "previous_response_id": "resp_1", "store": False}
    )
    assert old.frames()[-1]["previous_response_id"] == "resp_1"
    old.message(not_found("resp_1"))
    new = rig.sockets.last
    assert new is not old
    new.open()
    (frame,) = new.frames()
    assert "previous_response_id" not in frame
    assert frame["input"] == [
        {"role": "user", "content": "hello"},
        *output_of("resp_1"),
        {"role": "user", "content": "again"},
    ]
    new.message(created("resp_2"))
    new.message(completed("resp_2"))
    result_of(d)
    assert sink.types == ["response.created", "response.completed"]
    assert rig.handler.ws_figures.retries == {"previous_lost": 1}
    # The chain stays whole for the next turn: resp_2 follows resp_1.
    assert rig.transcripts.get(SESSION).replay_input("resp_2") == [
        {"role": "user", "content": "hello"},
        *output_of("resp_1"),
        {"role": "user", "content": "again"},
        *output_of("resp_2"),
    ]


def test_previous_lost_the_transcript_never_saw_reaches_the_client_as_the_upstream_sent_it(
    make_rig: Any,
) -> None:
    rig = make_rig()
    d, sink = rig.handle(
        ws_ctx(), {"model": "m", "input": "hi", "previous_response_id": "resp_elsewhere"}
    )
    sock = rig.sockets.last
    sock.open()
    sock.message(not_found("resp_elsewhere"))
    result_of(d)
    assert sink.data == [not_found("resp_elsewhere")]
    assert len(rig.sockets.made) == 1 and rig.http.calls == []
    assert sock.close_code == 1000  # an error terminal retires the socket
    assert rig.handler.ws_figures.retries == {}


def test_previous_lost_whose_chain_was_evicted_gets_the_canonical_error(make_rig: Any) -> None:
    rig = make_rig(transcripts=TranscriptStore(1 << 20, 1, 16))  # one response per connection
    sock, _ = rig.ws_turn({"model": "m", "input": "one", "store": False}, "resp_1")
    rig.ws_turn(
        {"model": "m", "input": "two", "previous_response_id": "resp_1", "store": False},
        "resp_2",
        sock=sock,
    )
    d, sink = rig.handle(
        ws_ctx(), {"model": "m", "input": "three", "previous_response_id": "resp_2", "store": False}
    )
    sock.message(not_found("resp_2"))
    result_of(d)
    assert sink.parsed() == [
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "previous_response_not_found",
                "message": "Previous response with id 'resp_2' not found.",
                "param": "previous_response_id",
            },
        }
    ]
    assert len(rig.sockets.made) == 1 and rig.http.calls == []  # nothing half-replayed anywhere


def test_socket_that_cannot_start_connecting_falls_back_to_http(make_rig: Any) -> None:
    rig = make_rig()
    rig.sockets.connect_error = ValueError(
        "Codepoint U+005F at position 3 of 'my_host' not allowed"
    )
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi"})
    response = rig.http.last.respond(200)
    response.event(completed("resp_1"))
    response.finish()
    result_of(d)
    assert sink.types == ["response.completed"]
    assert rig.handler.ws_figures.fallbacks == {"ws_error_pre_first_event": 1}
    assert rig.pool.sockets == set() and rig.clock.getDelayedCalls() == []


# -- failover over HTTP -------------------------------------------------------------------------


def two_http_providers(make_rig: Any, **kw: Any) -> Rig:
    rig: Rig = make_rig(provider("a"), provider("b", priority=1), **kw)
    return rig


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_retryable_status_fails_over_to_the_next_provider_and_counts_against_the_first(
    make_rig: Any, status: int
) -> None:
    rig = two_http_providers(make_rig)
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi", "stream": True})
    assert [c.url for c in rig.http.calls] == ["https://a.example/v1/responses"]
    rig.http.last.respond_json(status, {"error": {"code": "busy", "message": "later"}})
    assert [c.url for c in rig.http.calls][1:] == ["https://b.example/v1/responses"]
    response = rig.http.last.respond(200)
    response.event(completed("resp_1"))
    response.finish()
    result_of(d)
    assert sink.types == ["response.completed"]
    assert rig.breaker("a").failures == 1 and rig.breaker("b").failures == 0


def test_connect_error_fails_over_and_counts_against_the_provider(make_rig: Any) -> None:
    rig = two_http_providers(make_rig)
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    rig.http.last.refuse(ConnectionRefusedError())
    response = rig.http.last.respond(200, "application/json")
    response.write(b'{"id":"resp_1"}')
    response.finish()
    result_of(d)
    assert sink.json == [(200, b'{"id":"resp_1"}', "application/json")]
    assert rig.breaker("a").failures == 1
    assert [c.url.split("/")[2] for c in rig.http.calls] == ["a.example", "b.example"]


def test_every_provider_failing_reports_the_last_providers_error_as_it_came(make_rig: Any) -> None:
    rig = two_http_providers(make_rig)
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    rig.http.last.refuse(ConnectionRefusedError())
    response = rig.http.last.respond(429, "text/plain")
    response.write(b"slow down")
    response.finish()
    result_of(d)
    assert sink.json == [(429, b"slow down", "text/plain")]


def test_unreachable_last_provider_is_a_502_upstream_unavailable(make_rig: Any) -> None:
    rig = two_http_providers(make_rig)
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    rig.http.last.respond_json(503, {"error": {"code": "overloaded", "message": "x"}})
    rig.http.last.refuse(ConnectionRefusedError())
    result_of(d)
    status, body = sink.json_error()
    assert status == 502 and body["error"]["code"] == "upstream_unavailable"
    assert "'b'" in body["error"]["message"]
    assert rig.breaker("a").failures == 1 and rig.breaker("b").failures == 1


def test_client_error_is_not_failed_over_and_reaches_the_client_with_its_status(
    make_rig: Any,
) -> None:
    rig = two_http_providers(make_rig)
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    rig.http.last.respond_json(400, {"error": {"code": "invalid_value", "message": "no"}})
    result_of(d)
    assert len(rig.http.calls) == 1
    status, body = sink.json_error()
    assert status == 400 and body["error"]["code"] == "invalid_value"
    assert rig.breaker("a").failures == 0


def test_breaker_opened_by_failures_takes_the_provider_out_until_its_cooldown(
    make_rig: Any,
) -> None:
    rig = two_http_providers(make_rig, breaker=BreakerConfig(failure_threshold=2, cooldown=30.0))
    for _ in range(2):
        d, _sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
        rig.http.last.refuse(ConnectionRefusedError())
        rig.http.last.respond_json(200, b"{}")
        result_of(d)
    assert rig.breaker("a").state == BREAKER_OPEN
    d, _sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    assert rig.http.last.url == "https://b.example/v1/responses"  # a is skipped
    rig.http.last.respond_json(200, b"{}")
    result_of(d)
    rig.clock.advance(30)
    d, _sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    assert rig.http.last.url == "https://a.example/v1/responses"  # the half-open trial
    rig.http.last.respond_json(200, b"{}")
    result_of(d)
    assert rig.breaker("a").state == BREAKER_CLOSED


def test_http_turn_sends_the_body_with_the_providers_settings_and_streams_events_as_sent(
    make_rig: Any,
) -> None:
    rig = make_rig(provider("a", connect_timeout=3.0, first_byte_timeout=7.0))
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi", "stream": True})
    call = rig.http.last
    assert call.options == {"connect_timeout": 3.0, "first_byte_timeout": 7.0, "tls_ca": None}
    assert call.headers["authorization"] == "Bearer key-a"
    assert call.headers["accept"] == "text/event-stream"
    response = call.respond(200)
    raw = '{"type":"response.output_text.delta",  "delta":"x"}'
    response.event(raw)
    assert sink.started == [(200, {"content-type": "text/event-stream"})]
    response.event(completed("resp_1"))
    response.finish()
    result_of(d)
    assert sink.events == [
        (raw, "response.output_text.delta"),
        (completed("resp_1"), "response.completed"),
    ]


def test_http_body_is_paused_while_the_sink_is(make_rig: Any) -> None:
    rig = make_rig(provider("a"))
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi", "stream": True})
    response = rig.http.last.respond(200)
    assert sink.producer is not None
    sink.producer.pauseProducing()
    assert response.transport.paused
    sink.producer.resumeProducing()
    assert not response.transport.paused
    response.event(completed("resp_1"))
    response.finish()
    result_of(d)


def test_http_previous_response_not_found_for_a_chain_the_transcript_holds_is_replayed_once(
    make_rig: Any,
) -> None:
    rig = make_rig(provider("a", websocket="on"))
    rig.ws_turn({"model": "m", "input": "hello", "store": True}, "resp_1")
    rig.pool.cleanup(SESSION)  # the session's socket is gone: the next turn goes over HTTP
    rig.sockets.settle()
    d, sink = rig.handle(
        ws_ctx(), {"model": "m", "input": "again", "previous_response_id": "resp_1"}
    )
    rig.sockets.last.refuse_upgrade(503, "Service Unavailable")  # not cacheable: fall back
    first = rig.http.last
    assert first.json["previous_response_id"] == "resp_1"  # stored at a: worth asking
    first.respond_json(400, {"error": json.loads(not_found("resp_1"))["error"]})
    second = rig.http.last
    assert second is not first
    assert "previous_response_id" not in second.json
    assert second.json["input"] == [
        {"role": "user", "content": "hello"},
        *output_of("resp_1"),
        {"role": "user", "content": "again"},
    ]
    response = second.respond(200)
    response.event(completed("resp_2"))
    response.finish()
    result_of(d)
    assert sink.types == ["response.completed"]


# -- continuity without an upstream -------------------------------------------------------------


def test_generate_false_warmup_for_an_http_only_provider_is_answered_here_and_replayed_later(
    make_rig: Any,
) -> None:
    rig = make_rig(provider("h", websocket="off"))
    system = [{"role": "developer", "content": "be brief"}]
    d, sink = rig.handle(
        ws_ctx(), {"model": "m", "generate": False, "input": system, "stream": True}
    )
    result_of(d)
    assert rig.http.calls == [] and rig.sockets.made == []
    assert sink.types == ["response.created", "response.completed"]
    warmup = sink.parsed()[1]["response"]
    assert warmup["id"].startswith("resp_cch_") and warmup["output"] == []
    assert rig.transcripts.get(SESSION).origin(warmup["id"]) == Origin("h", "local", None, False)
    d, sink = rig.handle(
        ws_ctx(),
        {"model": "m", "previous_response_id": warmup["id"], "input": "hi", "stream": True},
    )
    call = rig.http.last
    assert "previous_response_id" not in call.json  # nobody upstream knows the local id
    assert call.json["input"] == [*system, {"role": "user", "content": "hi"}]
    response = call.respond(200)
    response.event(completed("resp_1"))
    response.finish()
    result_of(d)
    assert rig.handler.ws_figures.fallbacks == {"provider_websocket_off": 2}


# -- cancelling ---------------------------------------------------------------------------------


def test_cancelling_a_websocket_turn_mid_stream_closes_the_socket_and_ends_the_request(
    make_rig: Any,
) -> None:
    rig = make_rig(provider("a", websocket="on", idle_timeout=30.0))
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi"})
    sock = rig.sockets.last
    sock.open()
    sock.message(created("resp_1"))
    assert rig.handler.active == 1
    d.cancel()
    failure_of(d, CancelledError)
    assert sock.close_code == 1000
    assert rig.handler.active == 0
    assert rig.pool.entries == {}
    assert rig.clock.getDelayedCalls() == []
    assert rig.breaker("a").failures == 0


def test_cancelling_before_the_first_websocket_event_aborts_the_socket_and_sends_nothing_over_http(
    make_rig: Any,
) -> None:
    rig = make_rig()
    d, sink = rig.handle(ws_ctx(), {"model": "m", "input": "hi"})
    sock = rig.sockets.last
    d.cancel()
    failure_of(d, CancelledError)
    assert sock.aborted
    assert rig.http.calls == [] and sink.started == [] and sink.json == []
    assert rig.handler.active == 0


def test_cancelling_an_http_turn_mid_stream_stops_the_upstream_body(make_rig: Any) -> None:
    rig = make_rig(provider("a", idle_timeout=30.0))
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi", "stream": True})
    response = rig.http.last.respond(200)
    response.event(created("resp_1"))
    d.cancel()
    failure_of(d, CancelledError)
    assert response.transport.stopped
    assert rig.handler.active == 0
    assert rig.clock.getDelayedCalls() == []  # the stall watchdog went too
    response.lose(
        ConnectionRefusedError("gone")
    )  # the connection's end, as Twisted reports it later
    assert sink.data == [created("resp_1")]


def test_cancelling_while_waiting_for_http_headers_cancels_the_request_and_tries_no_other_provider(
    make_rig: Any,
) -> None:
    rig = two_http_providers(make_rig)
    d, sink = rig.handle(http_ctx(), {"model": "m", "input": "hi"})
    d.cancel()
    failure_of(d, CancelledError)
    assert rig.http.last.cancelled and len(rig.http.calls) == 1
    assert rig.breaker("a").failures == 0
    assert rig.handler.active == 0


# -- figures --------------------------------------------------------------------------------------


def test_collect_reports_requests_in_progress_attempts_and_websocket_outcomes(
    make_rig: Any,
) -> None:
    rig = make_rig(ws=UpstreamWebSocketConfig(first_event_timeout=20.0))
    sock, _ = rig.ws_turn({"model": "m", "input": "hello", "store": False}, "resp_1")
    # Connection limit, retried on a fresh socket that then stays silent: not re-sent.
    d, _sink = rig.handle(
        ws_ctx(), {"model": "m", "input": "x", "previous_response_id": "resp_1", "store": False}
    )
    sock.message(LIMIT)
    rig.sockets.last.open()
    in_progress = rig.metrics()[("cch_requests_in_progress", ())]
    rig.clock.advance(20)
    result_of(d)
    # A fallback to HTTP.
    d, _sink = rig.handle(ws_ctx(), {"model": "m", "input": "y"})
    rig.sockets.last.fail("reset")
    rig.http.last.respond_json(200, b"{}")
    result_of(d)
    figures = rig.metrics()
    assert in_progress == 1
    assert figures[("cch_requests_in_progress", ())] == 0
    assert figures[("cch_upstream_attempts_total", (("transport", "websocket"),))] == 3
    assert figures[("cch_upstream_attempts_total", (("transport", "http"),))] == 1
    assert (
        figures[("cch_upstream_ws_fallbacks_total", (("reason", "ws_error_pre_first_event"),))] == 1
    )
    assert (
        figures[
            ("cch_upstream_ws_turn_failures_total", (("code", "upstream_first_event_timeout"),))
        ]
        == 1
    )
    assert figures[("cch_upstream_ws_retries_total", (("reason", "connection_limit"),))] == 1
