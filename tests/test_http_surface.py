"""The HTTP surface of the gateway on one port, over real sockets on 127.0.0.1 with treq:
POST /v1/responses (SSE and JSON pass-through, body checks, auth), the WebSocket upgrade's
HTTP refusals (401 before the upgrade, 426 when WebSocket is off, 503 while draining),
/v1/models, /healthz, /readyz and the JSON 404/405 answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import SECRET, RunningGateway, gateway_config, start_gateway
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IResponse

from cch.config import ClientKey, Config, LimitsConfig, ProviderConfig, ServerConfig
from cch.testing import FakeUpstream, codex_events, error_json, hold, sse
from cch.testing.client import ResponsesWSClient

ALICE = ClientKey(name="alice", key="sk-cch-alice-0123456789")
BOB = ClientKey(name="bob", key="sk-cch-bob-0123456789abc")

CREATED = {"type": "response.created", "response": {"id": "resp_x", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "hello"}
COMPLETED = {"type": "response.completed", "response": {"id": "resp_x", "status": "completed"}}

# What a WebSocket client sends to open the handshake (RFC 6455 §4.1 sample key).
UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def request_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-5.5", "input": "hi"}
    body.update(fields)
    return body


def create_frame() -> dict[str, Any]:
    return {"type": "response.create", "model": "gpt-5.5", "store": False, "input": "hi"}


class Reply:
    """A fully read HTTP response."""

    def __init__(self, response: IResponse, body: bytes) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def sse_events(self) -> list[Any]:
        """The JSON of every ``data:`` event of an SSE body."""
        events = []
        for block in self.body.decode("utf-8").split("\n\n"):
            data = [line[len("data:") :].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
            if data:
                events.append(json.loads("\n".join(data)))
        return events

    def assert_openai_error(self, status: int, type_: str, code: str) -> dict[str, Any]:
        assert self.code == status, self.body
        assert self.header("content-type") == "application/json"
        error = self.json()["error"]
        assert (error["type"], error["code"]) == (type_, code)
        assert isinstance(error["message"], str) and error["message"]
        return error  # type: ignore[no-any-return]


Fetch = Callable[..., Awaitable[Reply]]


@pytest_twisted.async_yield_fixture
async def fetch() -> AsyncIterator[Fetch]:
    """``await fetch(method, url, headers=..., json=... | data=...)`` -> a fully read Reply,
    on a non-persistent pool of this test's own (closed at the end)."""
    pool = HTTPConnectionPool(reactor, persistent=False)

    async def go(method: str, url: str, **kwargs: Any) -> Reply:
        response = await treq.request(method, url, pool=pool, reactor=reactor, **kwargs)
        body = await treq.content(response)
        return Reply(response, body)

    yield go
    await pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def launch() -> AsyncIterator[Callable[[Config], Awaitable[RunningGateway]]]:
    """Start gateways with a given config; every one is stopped at the end of the test."""
    started: list[RunningGateway] = []

    async def go(config: Config) -> RunningGateway:
        running = await start_gateway(config)
        started.append(running)
        return running

    yield go
    for running in started:
        await running.stop()


def keyed(fake: FakeUpstream, *keys: ClientKey, **overrides: Any) -> Config:
    return gateway_config(fake, keys=keys or (ALICE,), **overrides)


# --- POST /v1/responses: pass-through ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_post_stream_true_passes_upstream_sse_events_through(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True))
    assert reply.code == 200
    assert reply.header("content-type") == "text/event-stream"
    assert reply.header("cache-control") == "no-cache, no-transform"
    events = reply.sse_events()
    assert events == codex_events(fake.requests[0])
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert fake.requests[0].body == request_body(stream=True)
    assert fake.requests[0].headers["accept"] == "text/event-stream"


@pytest_twisted.ensureDeferred
async def test_post_stream_fragmented_crlf_upstream_is_re_encoded_event_by_event(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    fake.enqueue(sse([CREATED, DELTA, COMPLETED], chunk_size=3, crlf=True))
    running = await launch(gateway_config(fake))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True))
    assert reply.code == 200
    assert reply.sse_events() == [CREATED, DELTA, COMPLETED]
    assert b"\r" not in reply.body


@pytest.mark.parametrize("stream", [False, None], ids=["stream-false", "stream-absent"])
@pytest_twisted.ensureDeferred
async def test_post_without_stream_passes_the_json_body_through(fake: FakeUpstream, launch: Any, fetch: Fetch, stream: bool | None) -> None:
    running = await launch(gateway_config(fake))
    body = request_body() if stream is None else request_body(stream=stream)
    reply = await fetch("POST", running.http_url + "/v1/responses", json=body)
    assert reply.code == 200
    assert reply.header("content-type") == "application/json"
    response = reply.json()
    assert response == codex_events(fake.requests[0])[-1]["response"]
    assert response["object"] == "response" and response["status"] == "completed"
    assert fake.requests[0].headers["accept"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_upstream_400_json_error_passes_through_with_its_status(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    fake.enqueue(error_json(400, "bad_thing", "You did a bad thing", type="invalid_request_error"))
    second = ProviderConfig(name="secondary", base_url=fake.base_url, priority=1)
    providers = (ProviderConfig(name="primary", base_url=fake.base_url), second)
    running = await launch(gateway_config(fake, providers=providers))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True))
    assert reply.code == 400
    assert reply.header("content-type") == "application/json"
    assert reply.json() == {"error": {"message": "You did a bad thing", "type": "invalid_request_error", "code": "bad_thing"}}
    # A 400 is about the request, not the provider: no failover to the second provider.
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_a_502_openai_error(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    # A port that was just free: nothing listens there, so the connect is refused at once.
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    dead_url = f"http://127.0.0.1:{port.getHost().port}/v1"
    await port.stopListening()
    providers = (ProviderConfig(name="gone", base_url=dead_url),)
    running = await launch(gateway_config(fake, providers=providers))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True))
    error = reply.assert_openai_error(502, "bad_gateway_error", "upstream_unavailable")
    assert "gone" in error["message"]


class _FirstEventThenHangUp(Protocol):
    """Reads an SSE body until its first complete event, then drops the connection."""

    def __init__(self) -> None:
        self.buffer = b""
        self.first: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.first.called and b"\n\n" in self.buffer:
            self.first.callback(self.buffer.partition(b"\n\n")[0])
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.first.called:
            self.first.errback(reason)


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_mid_sse_cancels_the_upstream_request(fake: FakeUpstream, launch: Any) -> None:
    fake.enqueue(hold([CREATED]))
    running = await launch(gateway_config(fake))
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.request("POST", running.http_url + "/v1/responses", json=request_body(stream=True), pool=pool, reactor=reactor)
    assert response.code == 200
    reader = _FirstEventThenHangUp()
    response.deliverBody(reader)
    first = await reader.first
    assert json.loads(first.decode().removeprefix("data: ")) == CREATED
    cancelled = await fake.wait_for_cancelled(0)
    assert cancelled.finished
    assert len(fake.requests) == 1
    await pool.closeCachedConnections()


# --- POST /v1/responses: refused bodies -----------------------------------------------------


@pytest.mark.parametrize("data", [b"{not json", b"", b'{"model": "gpt-5.5",}', b"\xff\xfe{}"], ids=["broken", "empty", "trailing-comma", "not-utf8"])
@pytest_twisted.ensureDeferred
async def test_post_invalid_json_is_a_400_openai_error(fake: FakeUpstream, launch: Any, fetch: Fetch, data: bytes) -> None:
    running = await launch(gateway_config(fake))
    reply = await fetch("POST", running.http_url + "/v1/responses", data=data, headers={"content-type": "application/json"})
    reply.assert_openai_error(400, "invalid_request_error", "invalid_json")
    assert fake.requests == []


@pytest.mark.parametrize("data", [b"[]", b'"hello"', b"42", b"null", b"true"])
@pytest_twisted.ensureDeferred
async def test_post_non_object_json_is_a_400_openai_error(fake: FakeUpstream, launch: Any, fetch: Fetch, data: bytes) -> None:
    running = await launch(gateway_config(fake))
    reply = await fetch("POST", running.http_url + "/v1/responses", data=data, headers={"content-type": "application/json"})
    reply.assert_openai_error(400, "invalid_request_error", "invalid_json")
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_post_body_over_the_limit_is_413_and_at_the_limit_is_served(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    limit = 256
    running = await launch(gateway_config(fake, limits=LimitsConfig(max_request_body_bytes=limit)))
    url = running.http_url + "/v1/responses"

    def padded(size: int) -> bytes:
        base = json.dumps(request_body(pad=""), separators=(",", ":")).encode()
        data = json.dumps(request_body(pad="x" * (size - len(base))), separators=(",", ":")).encode()
        assert len(data) == size
        return data

    over = await fetch("POST", url, data=padded(limit + 1), headers={"content-type": "application/json"})
    over.assert_openai_error(413, "invalid_request_error", "request_too_large")
    assert fake.requests == []

    at = await fetch("POST", url, data=padded(limit), headers={"content-type": "application/json"})
    assert at.code == 200, at.body
    assert len(fake.requests) == 1


# --- routing: providers -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_post_with_no_providers_configured_is_503_no_provider(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake, providers=()))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True))
    error = reply.assert_openai_error(503, "service_unavailable_error", "no_provider")
    assert "gpt-5.5" in error["message"]


@pytest_twisted.ensureDeferred
async def test_post_for_a_model_no_provider_serves_is_503_no_provider(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    providers = (ProviderConfig(name="primary", base_url=fake.base_url, models=("gpt-5.5",)),)
    running = await launch(gateway_config(fake, providers=providers))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(model="other-model"))
    reply.assert_openai_error(503, "service_unavailable_error", "no_provider")
    assert fake.requests == []


# --- reserved x-cch-* headers -----------------------------------------------------------------


@pytest.mark.parametrize("secret", ["wrong", SECRET], ids=["forged-secret", "the-real-secret"])
@pytest_twisted.ensureDeferred
async def test_client_x_cch_headers_on_post_never_reach_upstream(fake: FakeUpstream, launch: Any, fetch: Fetch, secret: str) -> None:
    running = await launch(gateway_config(fake))
    forged = {
        "x-cch-client-transport": "websocket",
        "x-cch-responses-ws-forward": "1",
        "x-cch-internal-secret": secret,
        "x-cch-responses-ws-session": "forged-session",
        "x-cch-tenant": "someone-else",
        "originator": "codex_exec",
    }
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True), headers=forged)
    assert reply.code == 200
    assert reply.sse_events()[-1]["type"] == "response.completed"
    seen = fake.requests[0].headers
    assert not any(name.startswith("x-cch-") for name in seen), seen
    assert seen["originator"] == "codex_exec"


# --- other paths and methods ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_responses_without_upgrade_is_405_json_allowing_post(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake))
    reply = await fetch("GET", running.http_url + "/v1/responses")
    reply.assert_openai_error(405, "invalid_request_error", "method_not_allowed")
    assert reply.header("allow") == "POST"


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/v1/responses/", "/v1/responses/resp_1", "/v1/unknown", "/nope", "/v1", "/"])
@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404_json(fake: FakeUpstream, launch: Any, fetch: Fetch, path: str, method: str) -> None:
    running = await launch(gateway_config(fake))
    kwargs: dict[str, Any] = {"json": request_body()} if method == "POST" else {}
    reply = await fetch(method, running.http_url + path, **kwargs)
    reply.assert_openai_error(404, "invalid_request_error", "not_found")
    assert fake.requests == []


@pytest.mark.parametrize("method, path", [("DELETE", "/v1/responses"), ("PUT", "/v1/responses"), ("POST", "/healthz"), ("POST", "/v1/models")])
@pytest_twisted.ensureDeferred
async def test_unsupported_methods_are_405_json(fake: FakeUpstream, launch: Any, fetch: Fetch, method: str, path: str) -> None:
    running = await launch(gateway_config(fake))
    reply = await fetch(method, running.http_url + path)
    reply.assert_openai_error(405, "invalid_request_error", "method_not_allowed")


@pytest_twisted.ensureDeferred
async def test_healthz_is_200(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake))
    reply = await fetch("GET", running.http_url + "/healthz")
    assert reply.code == 200
    assert reply.header("content-type") == "application/json"
    assert reply.json() == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_readyz_is_200_then_503_once_draining_while_healthz_stays_200(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake))
    ready = await fetch("GET", running.http_url + "/readyz")
    # No [cluster] and the conftest's ledger off: neither shared store is in use.
    assert (ready.code, ready.json()) == (200, {"status": "ready", "redis": "off", "database": "off"})
    running.service.drain.start()
    draining = await fetch("GET", running.http_url + "/readyz")
    assert draining.code == 503
    assert draining.header("content-type") == "application/json"
    assert draining.json() == {"status": "draining", "redis": "off", "database": "off"}
    health = await fetch("GET", running.http_url + "/healthz")
    assert health.code == 200


@pytest_twisted.ensureDeferred
async def test_post_while_draining_is_503(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake))
    running.service.drain.start()
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True))
    reply.assert_openai_error(503, "service_unavailable_error", "draining")
    assert fake.requests == []


# --- /v1/models -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_models_lists_configured_provider_models_once_each_in_order(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    providers = (
        ProviderConfig(name="primary", base_url=fake.base_url, models=("gpt-5.5", "gpt-5-codex")),
        ProviderConfig(name="secondary", base_url=fake.base_url, models=("gpt-5.5", "o3")),
    )
    running = await launch(gateway_config(fake, providers=providers))
    reply = await fetch("GET", running.http_url + "/v1/models")
    assert reply.code == 200
    assert reply.header("content-type") == "application/json"
    listing = reply.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["gpt-5.5", "gpt-5-codex", "o3"]
    assert all(m["object"] == "model" for m in listing["data"])


@pytest_twisted.ensureDeferred
async def test_models_needs_a_key_when_keys_are_configured(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    providers = (ProviderConfig(name="primary", base_url=fake.base_url, models=("gpt-5.5",)),)
    running = await launch(keyed(fake, providers=providers))
    url = running.http_url + "/v1/models"
    missing = await fetch("GET", url)
    missing.assert_openai_error(401, "authentication_error", "invalid_api_key")
    wrong = await fetch("GET", url, headers={"Authorization": "Bearer sk-cch-wrong-0123456789"})
    wrong.assert_openai_error(401, "authentication_error", "invalid_api_key")
    good = await fetch("GET", url, headers={"Authorization": f"Bearer {ALICE.key}"})
    assert good.code == 200
    assert [m["id"] for m in good.json()["data"]] == ["gpt-5.5"]


# --- client keys on POST --------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-cch-wrong-0123456789"}, {"x-api-key": "sk-cch-wrong-0123456789"}, {"Authorization": f"Basic {ALICE.key}"}, {"Authorization": "Bearer "}],
    ids=["no-key", "wrong-bearer", "wrong-x-api-key", "basic-scheme", "empty-bearer"],
)
@pytest_twisted.ensureDeferred
async def test_post_without_a_valid_key_is_401_and_never_reaches_upstream(fake: FakeUpstream, launch: Any, fetch: Fetch, headers: dict[str, str]) -> None:
    running = await launch(keyed(fake))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True), headers=headers)
    reply.assert_openai_error(401, "authentication_error", "invalid_api_key")
    assert fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {ALICE.key}"}, {"authorization": f"bearer {ALICE.key}"}, {"x-api-key": ALICE.key}],
    ids=["bearer", "lower-case-bearer", "x-api-key"],
)
@pytest_twisted.ensureDeferred
async def test_post_with_a_valid_key_is_served_and_the_key_stays_at_the_gateway(fake: FakeUpstream, launch: Any, fetch: Fetch, headers: dict[str, str]) -> None:
    running = await launch(keyed(fake))
    reply = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True), headers=headers)
    assert reply.code == 200
    assert reply.sse_events()[-1]["type"] == "response.completed"
    seen = fake.requests[0].headers
    assert "authorization" not in seen and "x-api-key" not in seen
    assert ALICE.key not in json.dumps(seen)


# --- the WebSocket upgrade: HTTP answers before it ------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-cch-wrong-0123456789"}, {"x-api-key": "sk-cch-wrong-0123456789"}],
    ids=["no-key", "wrong-bearer", "wrong-x-api-key"],
)
@pytest_twisted.ensureDeferred
async def test_upgrade_without_a_valid_key_is_http_401_json_before_the_upgrade(fake: FakeUpstream, launch: Any, fetch: Fetch, headers: dict[str, str]) -> None:
    running = await launch(keyed(fake))
    reply = await fetch("GET", running.http_url + "/v1/responses", headers={**UPGRADE_HEADERS, **headers})
    reply.assert_openai_error(401, "authentication_error", "invalid_api_key")
    assert reply.header("www-authenticate") == 'Bearer realm="cch"'
    assert reply.header("sec-websocket-accept") is None
    assert running.service.edge_factory.live == set()


@pytest_twisted.ensureDeferred
async def test_websocket_client_with_a_wrong_key_fails_the_handshake_with_401(fake: FakeUpstream, launch: Any) -> None:
    running = await launch(keyed(fake))
    with pytest.raises(ConnectionError, match="401"):
        await ResponsesWSClient.connect(reactor, running.ws_url, {"Authorization": "Bearer sk-cch-wrong-0123456789"})
    assert running.service.edge_factory.live == set()
    assert fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {ALICE.key}"}, {"x-api-key": ALICE.key}],
    ids=["bearer", "x-api-key"],
)
@pytest_twisted.ensureDeferred
async def test_upgrade_with_a_valid_key_connects_and_completes_a_turn(fake: FakeUpstream, launch: Any, tunnel_mode: str, headers: dict[str, str]) -> None:
    running = await launch(keyed(fake, tunnel=tunnel_mode))
    client = await running.connect(headers=headers)
    client.send_json(create_frame())
    events = await client.recv_turn()
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert client.close_info is None
    seen = fake.requests[0].headers
    assert "authorization" not in seen and "x-api-key" not in seen
    assert not any(name.startswith("x-cch-") for name in seen)


@pytest_twisted.ensureDeferred
async def test_upgrade_with_websocket_disabled_for_the_server_is_426_json_and_post_still_works(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    server = ServerConfig(websocket=False, listen="tcp:0:interface=127.0.0.1")
    running = await launch(gateway_config(fake, server=server))
    url = running.http_url + "/v1/responses"
    reply = await fetch("GET", url, headers=UPGRADE_HEADERS)
    reply.assert_openai_error(426, "invalid_request_error", "websocket_disabled")
    assert running.service.edge_factory.live == set()
    post = await fetch("POST", url, json=request_body(stream=True))
    assert post.code == 200
    assert post.sse_events()[-1]["type"] == "response.completed"


@pytest_twisted.ensureDeferred
async def test_key_with_websocket_disabled_gets_426_while_another_key_connects(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    http_only = replace(BOB, websocket=False)
    running = await launch(keyed(fake, ALICE, http_only))
    refused = await fetch("GET", running.http_url + "/v1/responses", headers={**UPGRADE_HEADERS, "Authorization": f"Bearer {http_only.key}"})
    refused.assert_openai_error(426, "invalid_request_error", "websocket_disabled")
    client = await running.connect(headers={"Authorization": f"Bearer {ALICE.key}"})
    client.send_json(create_frame())
    assert (await client.recv_turn())[-1]["type"] == "response.completed"
    # The WebSocket-less key still has HTTP.
    post = await fetch("POST", running.http_url + "/v1/responses", json=request_body(stream=True), headers={"x-api-key": http_only.key})
    assert post.code == 200


@pytest_twisted.ensureDeferred
async def test_upgrade_while_draining_is_503_json(fake: FakeUpstream, launch: Any, fetch: Fetch) -> None:
    running = await launch(gateway_config(fake))
    running.service.drain.start()
    reply = await fetch("GET", running.http_url + "/v1/responses", headers=UPGRADE_HEADERS)
    reply.assert_openai_error(503, "service_unavailable_error", "draining")
    assert running.service.edge_factory.live == set()
