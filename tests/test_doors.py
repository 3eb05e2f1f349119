"""The doors, on real sockets: browsers, rebound DNS names and proxies in front of a keyless
gateway, bodies before auth, slow request heads, connection floods and key guessing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import (
    LogWatch,
    RunningGateway,
    eventually,
    gateway_config,
    response_create,
    start_gateway,
    within,
)
from test_upstream_tls import self_signed
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    SSL4ClientEndpoint,
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.web.http import HTTPChannel
from wire import client_frame, read_frames

from cch.addresses import is_loopback_host
from cch.config import ClientKey, LimitsConfig, ServerConfig
from cch.doors import AuthFailureBudget, host_name, mask_key
from cch.httpchannel import LINGER_SECONDS, GuardedChannel
from cch.testing import FakeUpstream
from cch.testing.scripts import hold

TIMEOUT = 10.0
KEY = "sk-cch-alice-0123456789"
UPGRADE = (
    b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


class Raw(Protocol):
    """A client that writes bytes as told and keeps all it reads."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, d))
                d.callback(self.data)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.data)

    def until(self, marker: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if marker in self.data:
            d.callback(self.data)
        else:
            self._waiting.append((marker, d))
        return d.addTimeout(TIMEOUT, reactor)

    def ended(self) -> Deferred[bytes]:
        return self.closed.addTimeout(TIMEOUT, reactor)


async def raw(gateway: RunningGateway, data: bytes = b"", endpoint: Any = None) -> Raw:
    port = gateway.service.listener.port
    assert port is not None
    proto = Raw()
    endpoint = endpoint or TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    await connectProtocol(endpoint, proto)
    if data:
        proto.transport.write(data)
    return proto


def status_of(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def body_of(data: bytes) -> dict[str, Any]:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def post(body: bytes, *headers: str, path: str = "/v1/responses") -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


TURN = json.dumps(response_create(stream=False)).encode()


@pytest_twisted.async_yield_fixture
async def open_gateway(fake: FakeUpstream) -> Any:
    """Keyless, so loopback only."""
    running = await start_gateway(gateway_config(fake))
    yield running
    await running.stop()


async def keyed(fake: FakeUpstream, clock: Any = None, **server: Any) -> RunningGateway:
    config = gateway_config(
        fake,
        keys=(ClientKey(name="alice", key=KEY),),
        server=ServerConfig(listen="tcp:0:interface=127.0.0.1", **server),
    )
    return await start_gateway(config, clock)


# -- browsers ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_cross_origin_websocket_upgrade_is_refused_403(open_gateway: RunningGateway) -> None:
    client = await raw(open_gateway, UPGRADE + b"Origin: https://evil.example\r\n\r\n")
    data = await client.ended()
    assert status_of(data) == 403
    assert body_of(data)["error"]["code"] == "origin_not_allowed"
    assert b"101 Switching" not in data


@pytest_twisted.ensureDeferred
async def test_a_cross_origin_post_is_refused_before_the_turn(open_gateway: RunningGateway, fake: FakeUpstream) -> None:
    client = await raw(open_gateway, post(TURN, "Content-Type: application/json", "Origin: https://evil.example"))
    data = await client.ended()
    assert status_of(data) == 403
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_a_text_plain_post_gets_415_and_runs_no_turn(open_gateway: RunningGateway, fake: FakeUpstream) -> None:
    # The "simple request" a web page can send without a CORS preflight.
    client = await raw(open_gateway, post(TURN, "Content-Type: text/plain"))
    data = await client.ended()
    assert status_of(data) == 415
    assert body_of(data)["error"]["code"] == "unsupported_media_type"
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_a_json_post_with_a_charset_runs(open_gateway: RunningGateway) -> None:
    client = await raw(open_gateway, post(TURN, "Content-Type: application/json; charset=utf-8", "Connection: close"))
    data = await client.ended()
    assert status_of(data) == 200
    assert b"response.completed" in data or b'"status":"completed"' in data


@pytest_twisted.ensureDeferred
async def test_a_listed_origin_is_served_with_cors_headers(fake: FakeUpstream) -> None:
    gateway = await start_gateway(
        gateway_config(fake, server=ServerConfig(listen="tcp:0:interface=127.0.0.1", allowed_origins=("https://app.example",)))
    )
    try:
        preflight = await raw(
            gateway,
            b"OPTIONS /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\n"
            b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, authorization\r\n\r\n",
        )
        answer = (await preflight.ended()).lower()
        assert status_of(answer) == 204
        assert b"access-control-allow-origin: https://app.example" in answer
        assert b"access-control-allow-headers: content-type, authorization" in answer
        turn = await raw(
            gateway, post(TURN, "Content-Type: application/json", "Origin: https://app.example", "Connection: close")
        )
        served = (await turn.ended()).lower()
        assert status_of(served) == 200
        assert b"access-control-allow-origin: https://app.example" in served
        upgrade = await raw(gateway, UPGRADE + b"Origin: https://app.example\r\n\r\n")
        assert b"101 Switching Protocols" in await upgrade.until(b"\r\n\r\n")
        upgrade.transport.abortConnection()
        await upgrade.ended()
    finally:
        await gateway.stop()


# -- DNS rebinding and proxies in front of a keyless gateway ----------------------------------


@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:8080", b"10.0.0.5"])
@pytest_twisted.ensureDeferred
async def test_a_keyless_gateway_refuses_a_foreign_host(open_gateway: RunningGateway, host: bytes) -> None:
    client = await raw(open_gateway, UPGRADE.replace(b"Host: 127.0.0.1", b"Host: " + host) + b"\r\n")
    data = await client.ended()
    assert status_of(data) == 403
    assert body_of(data)["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", [b"localhost:8080", b"127.0.0.1", b"[::1]:80", b"codex.localhost"])
@pytest_twisted.ensureDeferred
async def test_a_keyless_gateway_serves_loopback_hosts(open_gateway: RunningGateway, host: bytes) -> None:
    client = await raw(open_gateway, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    assert status_of(await client.ended()) == 200


@pytest_twisted.ensureDeferred
async def test_allowed_hosts_extends_the_keyless_host_rule(fake: FakeUpstream) -> None:
    gateway = await start_gateway(
        gateway_config(fake, server=ServerConfig(listen="tcp:0:interface=127.0.0.1", allowed_hosts=("gw.internal",)))
    )
    try:
        client = await raw(gateway, b"GET /v1/models HTTP/1.1\r\nHost: gw.internal:8080\r\nConnection: close\r\n\r\n")
        assert status_of(await client.ended()) == 200
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_gateway_with_keys_serves_any_host(fake: FakeUpstream) -> None:
    gateway = await keyed(fake)
    try:
        request = f"GET /v1/models HTTP/1.1\r\nHost: gw.example.com\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        client = await raw(gateway, request.encode())
        assert status_of(await client.ended()) == 200
    finally:
        await gateway.stop()


@pytest.mark.parametrize("header", [b"X-Forwarded-For: 203.0.113.9", b"X-Real-IP: 203.0.113.9", b"Forwarded: for=203.0.113.9"])
@pytest.mark.parametrize("path", [b"/v1/responses", b"/metrics"])
@pytest_twisted.ensureDeferred
async def test_a_keyless_gateway_refuses_proxied_requests(open_gateway: RunningGateway, header: bytes, path: bytes) -> None:
    client = await raw(open_gateway, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\n\r\n")
    data = await client.ended()
    assert status_of(data) == 403
    error = body_of(data)["error"]
    assert error["code"] == "proxied_without_keys"
    assert "[[keys]]" in error["message"]


# -- bodies ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_unauthenticated_huge_post_is_refused_401_before_its_body(fake: FakeUpstream) -> None:
    gateway = await keyed(fake)
    try:
        head = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 314572800\r\n\r\n"
        client = await raw(gateway, head)
        data = await client.ended()  # no body byte was sent: the answer came from the head
        assert status_of(data) == 401
        assert body_of(data)["error"]["code"] == "invalid_api_key"
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_the_key_is_checked_before_the_json_is_parsed(fake: FakeUpstream) -> None:
    gateway = await keyed(fake)
    try:
        client = await raw(gateway, post(b"{not json", "Content-Type: application/json"))
        assert status_of(await client.ended()) == 401
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_content_length_over_the_limit_is_refused_unread(fake: FakeUpstream) -> None:
    config = gateway_config(fake, limits=LimitsConfig(max_request_body_bytes=1000))
    gateway = await start_gateway(config)
    try:
        head = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1001\r\n\r\n"
        client = await raw(gateway, head)
        data = await client.ended()
        assert status_of(data) == 413
        assert body_of(data)["error"]["code"] == "request_too_large"
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_cut_at_the_limit(fake: FakeUpstream) -> None:
    config = gateway_config(fake, limits=LimitsConfig(max_request_body_bytes=1000))
    gateway = await start_gateway(config)
    try:
        head = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        client = await raw(gateway, head + b"200\r\n" + b"x" * 512 + b"\r\n")
        client.transport.write(b"200\r\n" + b"x" * 512 + b"\r\n")  # 1024 > 1000
        data = await client.ended()
        assert status_of(data) == 413
        assert fake.requests == []
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_chunked_text_plain_post_gets_415_too(open_gateway: RunningGateway, fake: FakeUpstream) -> None:
    head = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    client = await raw(open_gateway, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(TURN), TURN))
    assert status_of(await client.ended()) == 415
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_requests_pipelined_after_a_refusal_get_no_answer(open_gateway: RunningGateway) -> None:
    refused = b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    client = await raw(open_gateway, refused + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + b"NOT HTTP\r\n\r\n")
    data = await client.ended()
    assert data.count(b"HTTP/1.1") == 1 and status_of(data) == 403


@pytest_twisted.ensureDeferred
async def test_a_pipelined_request_does_not_get_a_head_deadline_while_it_streams(fake: FakeUpstream) -> None:
    clock = Clock()
    gateway = await start_gateway(gateway_config(fake, limits=LimitsConfig(handshake_timeout=10.0)), clock)
    fake.enqueue(hold([{"type": "response.created", "response": {"id": "resp_p", "status": "in_progress"}}]))
    try:
        body = json.dumps(response_create(stream=True)).encode()
        head = (
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        # Both heads in one write (the first is answered at once); the POST's body comes later.
        client = await raw(gateway, HEALTH.replace(b"Connection: close\r\n", b"") + head)
        await client.until(b'{"status":"ok"}')
        client.transport.write(body)
        await client.until(b"response.created")  # streaming, and held open by the upstream
        with LogWatch("http_request_refused") as refusals:
            clock.advance(30)  # well past the head deadline, had one been armed
        assert not refusals.fired  # no 408 pushed into the stream
        client.transport.abortConnection()
        data = await client.ended()
        assert b"request_head_timeout" not in data
    finally:
        await gateway.stop()


@pytest.mark.parametrize("path", [b"/healthz", b"/v1/models", b"/metrics"])
@pytest_twisted.ensureDeferred
async def test_paths_that_take_no_body_refuse_one_at_once(open_gateway: RunningGateway, path: bytes) -> None:
    head = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10737418240\r\n\r\n"
    client = await raw(open_gateway, head)
    data = await client.ended()
    assert status_of(data) == 413
    assert body_of(data)["error"]["code"] == "body_not_allowed"


# -- slow heads and connection floods --------------------------------------------------------


class CountingChannel(GuardedChannel):
    """Tells the test each time bytes reached the gateway."""

    arrived: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        waiting, CountingChannel.arrived[:] = list(CountingChannel.arrived), []
        for d in waiting:
            d.callback(None)


def next_arrival() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    CountingChannel.arrived.append(d)
    return d.addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_trickled_request_head_is_cut_at_the_handshake_timeout(fake: FakeUpstream) -> None:
    clock = Clock()
    config = gateway_config(fake, limits=LimitsConfig(handshake_timeout=10.0))
    gateway = await start_gateway(config, clock)
    gateway.service.site.protocol = CountingChannel
    try:
        client = await raw(gateway)
        for byte in b"GET ":  # a byte every 3 s: at 0, 3, 6 and 9 s
            arrived = next_arrival()
            client.transport.write(bytes([byte]))
            await arrived
            clock.advance(3 if byte != b" "[0] else 1)  # 10 s in all, had any byte reset it
        data = await client.ended()
        assert status_of(data) == 408
        assert body_of(data)["error"]["code"] == "request_head_timeout"
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_half_open_connections_are_closed_at_the_handshake_timeout(fake: FakeUpstream) -> None:
    clock = Clock()
    gateway = await start_gateway(gateway_config(fake, limits=LimitsConfig(handshake_timeout=10.0)), clock)
    try:
        silent = [await raw(gateway) for _ in range(20)]
        clock.advance(10)
        for client in silent:
            assert status_of(await client.ended()) == 408
        health = await raw(gateway, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status_of(await health.ended()) == 200
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_waits_for_its_next_request(fake: FakeUpstream) -> None:
    clock = Clock()
    gateway = await start_gateway(gateway_config(fake, limits=LimitsConfig(handshake_timeout=10.0)), clock)
    try:
        client = await raw(gateway, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await client.until(b'{"status":"ok"}')
        clock.advance(60)  # idle between requests: not a slow head
        assert not client.closed.called
        client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await client.ended()
        assert data.count(b"200 OK") == 2
    finally:
        await gateway.stop()


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_requests_beyond_max_connections_get_503(fake: FakeUpstream) -> None:
    config = gateway_config(fake, server=ServerConfig(listen="tcp:0:interface=127.0.0.1", max_connections=3))
    gateway = await start_gateway(config)
    try:
        held = [await raw(gateway, UPGRADE + b"\r\n") for _ in range(2)]
        for client in held:
            await client.until(b"\r\n\r\n")  # two WebSockets count
        idle = await raw(gateway)
        extra = await raw(gateway, HEALTH)
        data = await extra.ended()
        assert status_of(data) == 503
        assert body_of(data)["error"]["code"] == "too_many_connections"
        idle.transport.loseConnection()
        await idle.ended()
        await eventually(lambda: gateway.service.connections.held == 2, "the idle connection's slot freed")
        again = await raw(gateway, HEALTH)
        assert status_of(await again.ended()) == 200
        for client in held:
            client.transport.abortConnection()
            await client.ended()
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_headroom_get_503_at_once(fake: FakeUpstream) -> None:
    config = gateway_config(fake, server=ServerConfig(listen="tcp:0:interface=127.0.0.1", max_connections=3))
    gateway = await start_gateway(config)
    slots = gateway.service.connections
    try:
        silent = [await raw(gateway) for _ in range(slots.limit + slots.headroom)]
        await eventually(lambda: slots.held == slots.limit + slots.headroom, "every silent connection accepted")
        extra = await raw(gateway)  # sends nothing: answered on accept
        assert status_of(await extra.ended()) == 503
        for client in silent:
            client.transport.abortConnection()
            await client.ended()
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_tunneled_turns_run_while_clients_fill_max_connections(fake: FakeUpstream) -> None:
    # tunnel.mode = "http" POSTs each turn back to this listener: those requests are the
    # gateway's own and must not be refused for the connections its clients hold.
    config = gateway_config(fake, tunnel="http", server=ServerConfig(listen="tcp:0:interface=127.0.0.1", max_connections=2))
    gateway = await start_gateway(config)
    try:
        first = await gateway.connect()
        second = await gateway.connect()
        for client in (first, second):
            client.send_json(response_create())
        for client in (first, second):
            events = await within(Deferred.fromCoroutine(client.recv_turn()), "a tunneled turn")
            assert events[-1]["type"] == "response.completed"
        crowd = await raw(gateway, HEALTH)  # a third client is still refused
        assert status_of(await crowd.ended()) == 503
    finally:
        await gateway.stop()


# -- key guessing ------------------------------------------------------------------------------


def models_request(key: str, *extra: str) -> bytes:
    lines = ["GET /v1/models HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {key}", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest_twisted.ensureDeferred
async def test_failed_key_checks_are_throttled_per_address(fake: FakeUpstream) -> None:
    clock = Clock()
    config = gateway_config(
        fake,
        keys=(ClientKey(name="alice", key=KEY),),
        limits=LimitsConfig(auth_failure_limit=3, auth_failure_window=60.0),
    )
    gateway = await start_gateway(config, clock)
    try:
        with LogWatch("http_request_refused") as watch:
            for guess in range(3):
                client = await raw(gateway, models_request(f"sk-guess-{guess:012d}"))
                assert status_of(await client.ended()) == 401
            logged = await watch.seen
        assert logged["reason"] == "invalid_api_key"
        blocked = await raw(gateway, models_request(KEY))  # even the right key: no oracle
        data = await blocked.ended()
        assert status_of(data) == 429
        assert b"retry-after: 60" in data.lower()
        clock.advance(60)
        again = await raw(gateway, models_request(KEY))
        assert status_of(await again.ended()) == 200
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_each_client_has_its_own_budget(fake: FakeUpstream) -> None:
    config = gateway_config(
        fake,
        keys=(ClientKey(name="alice", key=KEY),),
        server=ServerConfig(listen="tcp:0:interface=127.0.0.1", trusted_proxies=("127.0.0.0/8",)),
        limits=LimitsConfig(auth_failure_limit=1),
    )
    gateway = await start_gateway(config)
    try:
        guesser = await raw(gateway, models_request("sk-guess-000000000000", "X-Forwarded-For: 198.51.100.7"))
        assert status_of(await guesser.ended()) == 401
        again = await raw(gateway, models_request(KEY, "X-Forwarded-For: 198.51.100.7"))
        assert status_of(await again.ended()) == 429
        other = await raw(gateway, models_request(KEY, "X-Forwarded-For: 1.2.3.4, 198.51.100.8"))
        assert status_of(await other.ended()) == 200
    finally:
        await gateway.stop()


@pytest.mark.parametrize("path", ["/%761/models", "/v1/%6dodels", "/v1/models/"])
@pytest_twisted.ensureDeferred
async def test_a_percent_encoded_path_meets_the_same_door(fake: FakeUpstream, path: str) -> None:
    config = gateway_config(fake, keys=(ClientKey(name="alice", key=KEY),), limits=LimitsConfig(auth_failure_limit=1))
    gateway = await start_gateway(config)
    try:
        guess = await raw(gateway, models_request("sk-guess-000000000000").replace(b"/v1/models", path.encode()))
        assert status_of(await guess.ended()) == 401
        blocked = await raw(gateway, models_request(KEY).replace(b"/v1/models", path.encode()))
        assert status_of(await blocked.ended()) == 429
    finally:
        await gateway.stop()


@pytest.mark.parametrize("path", [b"/%6detrics", b"/metrics/"])
@pytest_twisted.ensureDeferred
async def test_a_percent_encoded_metrics_path_needs_the_token_too(fake: FakeUpstream, path: bytes) -> None:
    server = ServerConfig(listen="tcp:0:interface=127.0.0.1", admin_token=TOKEN)
    config = gateway_config(fake, keys=(ClientKey(name="alice", key=KEY),), server=server, limits=LimitsConfig(auth_failure_limit=1))
    gateway = await start_gateway(config)
    try:
        guess = await raw(gateway, metrics_request("admin-guess-0000000000").replace(b"/metrics", path))
        assert status_of(await guess.ended()) == 403
        blocked = await raw(gateway, metrics_request(TOKEN).replace(b"/metrics", path))
        assert status_of(await blocked.ended()) == 429
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_keyed_gateway_behind_an_untrusted_proxy_says_so(fake: FakeUpstream) -> None:
    gateway = await keyed(fake)
    try:
        with LogWatch("auth_budget_shared_by_proxy") as watch:
            client = await raw(gateway, models_request(KEY, "X-Forwarded-For: 198.51.100.7"))
            assert status_of(await client.ended()) == 200
            event = await within(watch.seen, "the warning")
        assert "server.trusted_proxies" in event["hint"]
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_key_is_logged_masked(fake: FakeUpstream) -> None:
    gateway = await keyed(fake)
    try:
        with LogWatch("auth_refused") as watch:
            client = await raw(gateway, models_request("sk-wrong-key-abcdefghijkl"))
            await client.ended()
            event = await watch.seen
        text = json.dumps({k: v for k, v in event.items() if isinstance(v, str | int | float)})
        assert "sk-wrong-key-abcdefghijkl" not in text
        assert event["presented"].startswith("sk-w…")
    finally:
        await gateway.stop()


TOKEN = "admin-token-0123456789abcdef"


def metrics_request(token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_a_metrics_listener_beyond_loopback_needs_the_admin_token(fake: FakeUpstream) -> None:
    server = ServerConfig(listen="tcp:0:interface=127.0.0.1", metrics_listen="tcp:0:interface=0.0.0.0", admin_token=TOKEN)
    gateway = await start_gateway(gateway_config(fake, keys=(ClientKey(name="alice", key=KEY),), server=server))
    listener = gateway.service.metrics_listener
    assert listener is not None and listener.port is not None
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port.getHost().port)
    try:
        anonymous = await raw(gateway, metrics_request(None), endpoint)
        assert status_of(await anonymous.ended()) == 403
        admin = await raw(gateway, metrics_request(TOKEN), endpoint)
        assert b"cch_requests_refused_total" in await admin.ended()
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_admin_token_guesses_are_throttled_too(fake: FakeUpstream) -> None:
    server = ServerConfig(listen="tcp:0:interface=127.0.0.1", admin_token=TOKEN)
    config = gateway_config(
        fake, keys=(ClientKey(name="alice", key=KEY),), server=server, limits=LimitsConfig(auth_failure_limit=2)
    )
    gateway = await start_gateway(config)
    try:
        for guess in ("admin-guess-0000000000", "admin-guess-1111111111"):
            client = await raw(gateway, metrics_request(guess))
            assert status_of(await client.ended()) == 403
        blocked = await raw(gateway, metrics_request(TOKEN))
        assert status_of(await blocked.ended()) == 429
    finally:
        await gateway.stop()


# -- other listeners ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_over_tls_refusals_arrive_and_a_websocket_turn_runs(fake: FakeUpstream, tmp_path: Path) -> None:
    ca, pem = self_signed(tmp_path)
    key_file = tmp_path / "server.pem"
    key_file.write_bytes(pem)
    listen = f"ssl:0:privateKey={key_file}:interface=127.0.0.1"
    gateway = await start_gateway(gateway_config(fake, server=ServerConfig(listen=listen)))
    port = gateway.service.listener.port
    assert port is not None
    trust = Certificate.loadPEM(ca.read_bytes())

    def tls() -> Any:
        return SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, optionsForClientTLS("localhost", trust))

    try:
        refused = await raw(gateway, UPGRADE + b"Origin: https://evil.example\r\n\r\n", tls())
        assert status_of(await refused.ended()) == 403
        client = await raw(gateway, UPGRADE + b"\r\n", tls())
        assert b"101 Switching Protocols" in await client.until(b"\r\n\r\n")
        client.transport.write(client_frame(json.dumps(response_create()).encode()))
        data = await client.until(b"response.completed")
        frames = read_frames(data.split(b"\r\n\r\n", 1)[1])
        assert json.loads(frames[-1][1])["type"] == "response.completed"
        client.transport.abortConnection()
        await client.ended()
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_over_tls_silent_and_refused_connections_are_cut(fake: FakeUpstream, tmp_path: Path) -> None:
    # A TLS connection that never finishes its handshake cannot be closed politely.
    _, pem = self_signed(tmp_path)
    key_file = tmp_path / "server.pem"
    key_file.write_bytes(pem)
    clock = Clock()
    config = gateway_config(
        fake,
        server=ServerConfig(listen=f"ssl:0:privateKey={key_file}:interface=127.0.0.1", max_connections=4),
        limits=LimitsConfig(handshake_timeout=10.0),
    )
    gateway = await start_gateway(config, clock)
    slots = gateway.service.connections
    try:
        silent = [await raw(gateway) for _ in range(slots.limit + slots.headroom)]  # plain TCP, no hello
        await eventually(lambda: slots.held == slots.limit + slots.headroom, "every connection accepted")
        beyond = await raw(gateway)
        clock.advance(10)  # the head deadline: a 408 nobody can read
        clock.advance(LINGER_SECONDS)  # then cut
        for client in [*silent, beyond]:
            await client.ended()
        await eventually(lambda: slots.held == 0, "every slot freed")
    finally:
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_a_keyless_unix_listener_serves_any_host_but_no_proxy(fake: FakeUpstream, tmp_path: Path) -> None:
    path = tmp_path / "cch.sock"
    gateway = await start_gateway(gateway_config(fake, server=ServerConfig(listen=f"unix:{path}")))

    def unix() -> Any:
        return UNIXClientEndpoint(reactor, str(path))

    try:
        models = await raw(gateway, b"GET /v1/models HTTP/1.1\r\nHost: anything\r\nConnection: close\r\n\r\n", unix())
        assert status_of(await models.ended()) == 200
        proxied = await raw(gateway, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", unix())
        assert status_of(await proxied.ended()) == 403
    finally:
        await gateway.stop()


# -- the rules alone -------------------------------------------------------------------------


def test_host_names_and_loopback() -> None:
    assert host_name("[::1]:8080") == "::1"
    assert host_name("example.com:80") == "example.com"
    assert host_name("::1") == "::1"
    assert is_loopback_host("LOCALHOST.")
    assert is_loopback_host("127.9.9.9")
    assert is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("localhost.evil.example")
    assert not is_loopback_host("0.0.0.0")


def test_a_masked_key_keeps_four_characters_and_a_fingerprint() -> None:
    masked = mask_key("sk-secret-0123456789")
    assert masked.startswith("sk-s…(20 chars, sha256 ")
    assert "0123456789" not in masked


def test_the_failure_budget_forgets_expired_windows() -> None:
    clock = Clock()
    budget = AuthFailureBudget(clock, limit=2, window=10.0)
    budget.failed("a")
    budget.failed("a")
    assert budget.blocked_for("a") == 10.0
    clock.advance(4)
    budget.failed("b")
    assert budget.blocked_for("a") == 6.0
    clock.advance(7)
    budget.failed("c")  # a's window ended: forgotten
    assert budget.blocked_for("a") == 0.0
    assert budget.tracked == 2


def test_the_channel_still_has_the_twisted_state_it_reads() -> None:
    # cch.httpchannel reads HTTPChannel's request line state when the headers are in.
    channel = HTTPChannel()
    assert {"allHeadersReceived", "allContentReceived", "rawDataReceived", "requestDone"} <= set(dir(channel))
    seen: dict[str, Any] = {}

    class Probe(HTTPChannel):
        def allHeadersReceived(self) -> None:
            seen["line"] = (self._command, self._path, self.length)
            super().allHeadersReceived()

    from twisted.internet.testing import StringTransport

    probe = Probe()
    probe.makeConnection(StringTransport())
    probe.dataReceived(b"POST /v1/responses?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    assert seen["line"] == (b"POST", b"/v1/responses?x=1", 5)
    probe.connectionLost(None)
    assert issubclass(GuardedChannel, HTTPChannel)
