"""What cch relies on inside Autobahn, txaio and Twisted is still there (cch/adapters.py).

cch uses some private and undocumented internals of those libraries, for speed on the hot path
(docs/benchmarks.md) and to run every timer on the injected clock. The tests here check each one
on the library itself — plain Autobahn protocols and factories, a plain Twisted channel and
request — and fail naming the attribute and the installed version, so an upgrade that removes or
reshapes one shows up here rather than as a gateway that misbehaves.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import inspect
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

ROOT = Path(__file__).resolve().parent.parent
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_DISTRIBUTIONS = {"autobahn": "autobahn", "txaio": "txaio", "twisted": "Twisted"}
UPGRADE = (
    b"GET /v1/responses?model=m HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def version(lib: str) -> str:
    name = _DISTRIBUTIONS[lib]
    return f"{name} {importlib.metadata.version(name)}"


def require(lib: str, subject: str, obj: Any, name: str) -> Any:
    """``obj.name``, or a failure saying what is gone, in which version, and where to look."""
    if not hasattr(obj, name):
        pytest.fail(
            f"{version(lib)}: {subject} has no `{name}` any more; cch relies on it (see the "
            f"inventory in cch/adapters.py): adapt cch/adapters.py before upgrading",
            pytrace=False,
        )
    return getattr(obj, name)


def shape(lib: str, what: str, ok: bool, seen: Any) -> None:
    """Fail, naming ``what`` and the version, unless ``ok``."""
    if not ok:
        pytest.fail(
            f"{version(lib)}: {what} changed shape (got {seen!r}); cch relies on it (see cch/adapters.py)",
            pytrace=False,
        )


# -- plain library objects on a StringTransport ----------------------------------------------


def frame(payload: bytes, *, opcode: int = 1, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if mask is not None else 0
    header = bytes((first, bit | size)) if size < 126 else bytes((first, bit | 126)) + struct.pack("!H", size)
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header += mask
    return header + payload


def client_frame(payload: bytes, **options: Any) -> bytes:
    return frame(payload, mask=os.urandom(4), **options)


class Transport(StringTransport):
    """Like TCP, lets a producer be unregistered when none is registered."""

    def unregisterProducer(self) -> None:
        self.producer = None


def _timers(factory: Any, clock: Clock | None, options: dict[str, Any]) -> None:
    # Without a clock, no timer at all: Autobahn's would run on the global reactor.
    if clock is not None:
        from cch.adapters import run_timers_on

        run_timers_on(factory, clock)
    else:
        options = {"openHandshakeTimeout": 0, "closeHandshakeTimeout": 0, **options}
    factory.setProtocolOptions(**options)


def open_server(
    protocol: type[WebSocketServerProtocol] = WebSocketServerProtocol, clock: Clock | None = None, **options: Any
) -> tuple[Any, Transport]:
    """A plain Autobahn server protocol (or ``protocol``) on a StringTransport, upgraded."""
    factory = WebSocketServerFactory()
    factory.protocol = protocol
    _timers(factory, clock, options)
    proto = factory.buildProtocol(None)
    transport = Transport()
    proto.makeConnection(transport)
    proto.dataReceived(UPGRADE)
    assert proto.state == proto.STATE_OPEN
    transport.clear()
    return proto, transport


def connect_client(
    protocol: type[WebSocketClientProtocol] = WebSocketClientProtocol, **options: Any
) -> tuple[Any, Transport, bytes]:
    """A plain Autobahn client protocol (or ``protocol``) that sent its upgrade, and the
    ``Sec-WebSocket-Accept`` a server answers it with."""
    factory = WebSocketClientFactory("ws://upstream.test/v1/responses")
    factory.protocol = protocol
    _timers(factory, None, options)
    proto = factory.buildProtocol(None)
    transport = Transport()
    proto.makeConnection(transport)
    key = next(
        line.split(b":", 1)[1].strip()
        for line in transport.value().split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    transport.clear()
    return proto, transport, base64.b64encode(hashlib.sha1(key + GUID).digest())


def open_client(protocol: type[WebSocketClientProtocol] = WebSocketClientProtocol, **options: Any) -> Any:
    """A plain Autobahn client protocol (or ``protocol``), upgraded."""
    proto, _, accept = connect_client(protocol, **options)
    proto.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    assert proto.state == proto.STATE_OPEN
    return proto


def _client_mid_message() -> Any:
    proto = open_client()
    proto.dataReceived(frame(b"par", fin=False))
    return proto


def _channel_with_headers_in() -> Any:
    """What an ``HTTPChannel`` holds when ``allHeadersReceived`` runs."""
    seen: dict[str, Any] = {}

    class Probe(HTTPChannel):
        def allHeadersReceived(self) -> None:
            seen.update({name: getattr(self, name) for name in ("_command", "_path") if hasattr(self, name)})
            super().allHeadersReceived()

    probe = Probe()
    probe.makeConnection(StringTransport())
    probe.dataReceived(b"POST /v1/responses?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    probe.connectionLost(Failure(ConnectionDone()))
    return SimpleNamespace(**seen)


def _channel(site: Site) -> HTTPChannel:
    """An HTTP/1.1 channel of ``site`` with no idle timer (it would run on the global reactor)."""
    channel = HTTPChannel()
    channel.site = site
    channel.requestFactory = site.requestFactory
    channel.timeOut = None
    return channel


def _request() -> Request:
    channel = _channel(Site(Resource()))
    channel.makeConnection(StringTransport())
    return Request(channel)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"{version(name.split('.')[0])}: module {name} is gone ({exc}); see cch/adapters.py", pytrace=False)


def _tcp_connection() -> Any:
    from twisted.internet import tcp

    return tcp.Connection


# -- the inventory, name by name -------------------------------------------------------------

SERVER = "an open autobahn WebSocketServerProtocol"
CLIENT = "an open autobahn WebSocketClientProtocol"

# What each name below is looked up on: a description (for the failure) and how to make it.
SUBJECTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "server": (SERVER, lambda: open_server()[0]),
    "client": (CLIENT, open_client),
    "client-mid-message": (CLIENT + " inside a fragmented message", _client_mid_message),
    "server-factory": ("autobahn's WebSocketServerFactory", WebSocketServerFactory),
    "client-factory": ("autobahn's WebSocketClientFactory", lambda: WebSocketClientFactory("ws://upstream.test/")),
    "xormasker": ("autobahn.websocket.xormasker", lambda: _module("autobahn.websocket.xormasker")),
    "txaio": ("txaio._common", lambda: _module("txaio._common")),
    "request": ("a fresh twisted.web.server.Request", _request),
    "channel": ("twisted.web.http.HTTPChannel once a request's headers are in", _channel_with_headers_in),
    "web-client": ("twisted.web.client", lambda: _module("twisted.web.client")),
    "tcp": ("a Twisted TCP transport (twisted.internet.tcp.Connection)", _tcp_connection),
    "permessage-deflate": (
        "autobahn.websocket.compress_deflate.PerMessageDeflate",
        lambda: _module("autobahn.websocket.compress_deflate").PerMessageDeflate,
    ),
}

_SERVER_NAMES = (
    "_fail_connection",
    "_cancelAutoPingTimeoutCall",
    "consumeData",
    "current_frame",
    "inside_message",
    "data",
    "maxFramePayloadSize",
    "maxMessagePayloadSize",
    "state",
    "STATE_OPEN",
    "autoPingTimeoutCall",
    "autoPingRestartOnAnyTraffic",
    "closeHandshakeTimeoutCall",
    "wasNotCleanReason",
    "failedByMe",
    "http_request_uri",
    "onCloseFrame",
    "dropConnection",
    "sendData",
    "sendCloseFrame",
)
_CLIENT_NAMES = (
    "consumeData",
    "current_frame",
    "inside_message",
    "data",
    "maxFramePayloadSize",
    "maxMessagePayloadSize",
    "state",
    "STATE_OPEN",
    "failedByMe",
    "onMessageEnd",
    "http_status_line",
    "wasNotCleanReason",
    "wasMaxFramePayloadSizeExceeded",
    "wasMaxMessagePayloadSizeExceeded",
    "closeHandshakeTimeoutCall",
    "onCloseFrame",
    "sendCloseFrame",
)

# (library, subject, name): everything cch/adapters.py lists, looked up on the library's objects.
NAMES = [
    *(("autobahn", "server", name) for name in _SERVER_NAMES),
    *(("autobahn", "client", name) for name in _CLIENT_NAMES),
    ("autobahn", "client-mid-message", "message_data"),
    ("autobahn", "server-factory", "_batched_timer"),
    ("autobahn", "client-factory", "_batched_timer"),
    ("autobahn", "xormasker", "create_xor_masker"),
    ("txaio", "txaio", "_BatchedTimer"),
    ("twisted", "request", "_disconnected"),
    ("twisted", "channel", "_command"),
    ("twisted", "channel", "_path"),
    ("twisted", "web-client", "RequestTransmissionFailed"),
    ("twisted", "tcp", "producer"),
    ("autobahn", "server", "websocket_extensions_in_use"),
    ("autobahn", "client", "websocket_extensions_in_use"),
    ("autobahn", "permessage-deflate", "start_compress_message"),
    ("autobahn", "permessage-deflate", "compress_message_data"),
    ("autobahn", "permessage-deflate", "end_compress_message"),
]


@pytest.mark.parametrize(("lib", "subject", "name"), NAMES, ids=[f"{subject}.{name}" for _, subject, name in NAMES])
def test_every_internal_cch_relies_on_is_still_there(lib: str, subject: str, name: str) -> None:
    description, make = SUBJECTS[subject]
    require(lib, description, make(), name)


def test_every_name_checked_here_is_in_the_inventory_of_the_adapters_module() -> None:
    import cch.adapters

    doc = cch.adapters.__doc__ or ""
    missing = sorted({name for _, _, name in NAMES if not re.search(rf"[`.]{re.escape(name)}\b", doc)})
    assert not missing, f"cch/adapters.py's inventory does not list {missing}"


# Private names no module of cch but cch/adapters.py may use, each with the files allowed to
# read it inline (none: every module goes through cch/adapters.py).
PRIVATE = {
    r"\b_fail_connection\b": set(),
    r"\b_cancelAutoPingTimeoutCall\b": set(),
    r"\b_batched_timer\b": set(),
    r"\b_BatchedTimer\b|txaio\._common": set(),
    r"_newclient": set(),
    r"\b(wasNotCleanReason|failedByMe|message_data|http_status_line)\b": set(),
    r"\bwasMax(Frame|Message)PayloadSizeExceeded\b": set(),
    r"\bcloseHandshakeTimeoutCall\b": set(),
    r"\._disconnected\b": set(),
    r"\b_(command|path)\b": set(),
    # Monkeypatches: a protocol's or factory's method reassigned on an instance.
    r"^\s*[\w.]+\.(buildProtocol|makeConnection|connectionMade|dataReceived|consumeData|connectionLost"
    r"|onConnect|onOpen|onMessage|onMessageEnd|onCloseFrame|onClose|sendData|dropConnection)\s*=(?!=)": set(),
}


def test_no_module_but_the_adapters_uses_a_private_internal_or_monkeypatches() -> None:
    found = []
    for path in sorted((ROOT / "cch").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "cch/adapters.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern, allowed in PRIVATE.items():
            if rel in allowed:
                continue
            for match in re.finditer(pattern, text, re.MULTILINE):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{rel}:{line}: {match.group(0).strip()}")
    assert not found, "private Autobahn/txaio/Twisted internals belong in cch/adapters.py:\n" + "\n".join(found)


# -- timers on the injected clock ------------------------------------------------------------


def test_txaios_batched_timer_takes_our_arguments_and_runs_on_the_clock() -> None:
    timer_class = require("txaio", "txaio._common", _module("txaio._common"), "_BatchedTimer")
    params = list(inspect.signature(timer_class).parameters)
    shape(
        "txaio",
        "_BatchedTimer(bucket_milliseconds, chunk_size, seconds_provider=, delayed_call_creator=)",
        params[:2] == ["bucket_milliseconds", "chunk_size"]
        and {"seconds_provider", "delayed_call_creator"} <= set(params),
        params,
    )
    from cch.adapters import batched_timer

    clock = Clock()
    fired: list[str] = []
    timer = batched_timer(clock)
    timer.call_later(1.0, fired.append, "one")
    timer.call_later(2.0, fired.append, "two").cancel()
    assert clock.getDelayedCalls()
    clock.advance(1.2)
    assert fired == ["one"]
    clock.advance(2)
    assert fired == ["one"] and not clock.getDelayedCalls()


def test_autobahns_protocol_timers_run_on_the_factorys_batched_timer() -> None:
    clock = Clock()
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    require("autobahn", "autobahn's WebSocketServerFactory", factory, "_batched_timer")
    from cch.adapters import run_timers_on

    run_timers_on(factory, clock)
    factory.setProtocolOptions(openHandshakeTimeout=5)
    proto = factory.buildProtocol(None)
    transport = Transport()
    proto.makeConnection(transport)
    calls = clock.getDelayedCalls()
    shape("autobahn", "the opening-handshake deadline, scheduled through factory._batched_timer", bool(calls), calls)
    clock.advance(6)
    assert transport.disconnecting  # the deadline fired, on our clock
    assert not clock.getDelayedCalls()


def test_the_close_handshake_timer_is_on_the_clock_and_can_be_cancelled() -> None:
    from cch.adapters import cancel_close_timer

    clock = Clock()
    proto, _ = open_server(clock=clock, closeHandshakeTimeout=5)
    proto.sendCloseFrame(code=1000, isReply=False)
    call = require("autobahn", SERVER, proto, "closeHandshakeTimeoutCall")
    shape("autobahn", "closeHandshakeTimeoutCall once a close frame was sent", call is not None, call)
    cancel_close_timer(proto)
    assert proto.closeHandshakeTimeoutCall is None
    clock.advance(10)
    assert not clock.getDelayedCalls()


# -- the per-frame path (cch/wsframes.py and the consumeData overrides) ----------------------


@pytest.mark.parametrize("side", ["server", "client"])
def test_an_open_protocol_has_the_state_the_fast_path_reads(side: str) -> None:
    proto = open_server(maxMessagePayloadSize=100)[0] if side == "server" else open_client(maxMessagePayloadSize=100)
    subject = SERVER if side == "server" else CLIENT
    expected: list[tuple[str, Callable[[Any], bool]]] = [
        ("data", lambda v: v == b""),
        ("current_frame", lambda v: v is None),
        ("inside_message", lambda v: v is False),
        ("state", lambda v: v == proto.STATE_OPEN),
        ("maxMessagePayloadSize", lambda v: v == 100),
        ("maxFramePayloadSize", lambda v: v == 0),
    ]
    for name, ok in expected:
        value = require("autobahn", subject, proto, name)
        shape("autobahn", f"{name} of {subject}", ok(value), value)


def test_consume_data_parses_what_is_left_in_the_read_buffer() -> None:
    received: list[bytes] = []

    class Server(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received.append(payload)

    proto, _ = open_server(Server)
    first, second = client_frame(b"first"), client_frame(b"second")
    proto.dataReceived(first[:4])
    shape("autobahn", "data (the read buffer) holding a partial frame", proto.data == first[:4], proto.data)
    shape("autobahn", "current_frame before a frame header is whole", proto.current_frame is None, proto.current_frame)
    # What cch/wsframes.py does: cut frames off the head of the buffer, leave the rest to Autobahn.
    proto.data = second
    proto.consumeData()
    assert received == [b"second"] and proto.data == b""


def test_autobahns_xor_masker_unmasks_a_payload() -> None:
    create_xor_masker = require(
        "autobahn", "autobahn.websocket.xormasker", _module("autobahn.websocket.xormasker"), "create_xor_masker"
    )
    key, payload = b"\x01\x02\x03\x04", b"hello, world"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    unmasked = create_xor_masker(key, len(masked)).process(masked)
    shape("autobahn", "create_xor_masker(key, length).process(payload)", unmasked == payload, unmasked)


def test_cancelling_the_ping_timeout_is_what_autobahn_does_on_traffic() -> None:
    from cch.adapters import ServerProtocol

    clock = Clock()
    proto, _ = open_server(ServerProtocol, clock=clock)
    call = proto.autoPingTimeoutCall = clock.callLater(5, lambda: None)
    proto.cancel_ping_timeout()
    assert not call.active()
    shape("autobahn", "autoPingTimeoutCall after _cancelAutoPingTimeoutCall()", proto.autoPingTimeoutCall is None, call)


# -- hooks and records off the hot path ------------------------------------------------------


def test_fail_connection_takes_a_code_and_a_reason_and_reaches_the_hook() -> None:
    method = require("autobahn", "autobahn's WebSocketServerProtocol", WebSocketServerProtocol, "_fail_connection")
    params = list(inspect.signature(method).parameters)
    shape("autobahn", "_fail_connection(self, code, reason)", params == ["self", "code", "reason"], params)
    from cch.adapters import ServerProtocol

    failing: list[int] = []

    class Server(ServerProtocol):
        def failing_connection(self) -> None:
            failing.append(self.state)

    proto, transport = open_server(Server)
    proto.dataReceived(client_frame(b"x", rsv=1))  # a protocol error: Autobahn fails the connection
    shape("autobahn", "_fail_connection on a protocol error", failing == [proto.STATE_OPEN], failing)
    assert proto.failedByMe and transport.disconnecting


def test_a_parsed_message_reaches_message_parsed_in_one_piece() -> None:
    from cch.adapters import ClientProtocol

    got: list[bytes] = []

    class Client(ClientProtocol):
        def message_parsed(self, payload: bytes) -> None:
            got.append(payload)

    proto = open_client(Client)
    proto.dataReceived(frame(b"par", fin=False) + frame(b"ti", opcode=0, fin=False) + frame(b"al", opcode=0))
    shape("autobahn", "message_data (the frames of the message onMessageEnd ends)", got == [b"partial"], got)
    assert proto.message_data is None and proto.failedByMe is False


def test_a_refused_upgrade_leaves_its_status_line() -> None:
    from cch.adapters import handshake_status_line

    proto, _, _ = connect_client()
    assert handshake_status_line(proto) is None
    proto.dataReceived(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    line = handshake_status_line(proto)
    shape("autobahn", "http_status_line after a refused upgrade", line == "HTTP/1.1 426 Upgrade Required", line)


def test_an_oversized_frame_is_recorded_with_a_reason() -> None:
    from cch.adapters import not_clean_reason, refused_oversized

    proto = open_client(maxFramePayloadSize=10, maxMessagePayloadSize=10)
    assert not refused_oversized(proto)
    proto.dataReceived(frame(b"y" * 20))
    proto.connectionLost(Failure(ConnectionDone()))
    shape("autobahn", "wasMaxFramePayloadSizeExceeded after an oversized frame", refused_oversized(proto), False)
    reason = not_clean_reason(proto)
    shape("autobahn", "wasNotCleanReason after an oversized frame", isinstance(reason, str) and reason, reason)


def test_a_dropped_connection_has_a_not_clean_reason() -> None:
    from cch.adapters import not_clean_reason

    proto, _ = open_server()
    proto.connectionLost(Failure(ConnectionDone()))
    reason = not_clean_reason(proto)
    shape("autobahn", "wasNotCleanReason after a dropped connection", isinstance(reason, str) and reason, reason)


def test_send_close_frame_takes_protocol_close_codes() -> None:
    proto, transport = open_server()
    proto.sendCloseFrame(code=1011, reasonUtf8=b"internal_error", isReply=False)
    data = transport.value()
    ok = data[:1] == b"\x88" and data[2:4] == struct.pack("!H", 1011)
    shape("autobahn", "sendCloseFrame(code=1011, reasonUtf8=..., isReply=False)", ok, data)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("onCloseFrame", ["self", "code", "reasonRaw"]),
        ("dropConnection", ["self", "abort"]),
        ("sendData", ["self", "data", "sync", "chopsize"]),
        ("sendCloseFrame", ["self", "code", "reasonUtf8", "isReply"]),
        ("consumeData", ["self"]),
        ("onMessageEnd", ["self"]),
    ],
)
def test_the_methods_cch_overrides_or_calls_keep_their_parameters(name: str, params: list[str]) -> None:
    method = require("autobahn", "autobahn's WebSocketServerProtocol", WebSocketServerProtocol, name)
    seen = list(inspect.signature(method).parameters)
    shape("autobahn", f"WebSocketServerProtocol.{name}({', '.join(params[1:])})", seen == params, seen)


def test_the_upgrade_uri_is_recorded() -> None:
    proto, _ = open_server()
    uri = require("autobahn", SERVER, proto, "http_request_uri")
    shape("autobahn", "http_request_uri", uri == "/v1/responses?model=m", uri)


def test_websocket_resource_takes_the_channels_transport_over() -> None:
    # cch/httpchannel.py's GuardedChannel hands its connection slot to the edge at this moment.
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    root = Resource()
    root.putChild(b"v1", WebSocketResource(factory))
    channel = _channel(Site(root))
    transport = Transport()
    transport.protocol = channel  # type: ignore[attr-defined]
    channel.makeConnection(transport)
    assert channel.transport is transport
    channel.dataReceived(UPGRADE.replace(b"/v1/responses?model=m", b"/v1"))
    shape(
        "autobahn",
        "WebSocketResource.render taking the connection (request.channel.transport = None)",
        channel.transport is None,
        channel.transport,
    )
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]


def test_a_transport_shows_the_producer_registered_on_it() -> None:
    # cch/edge/protocol.py unregisters what twisted.web registered when the edge takes over.
    connection = _tcp_connection()
    shape("twisted", "tcp.Connection.producer (None until one is registered)", connection.producer is None, connection)


# -- twisted.web -------------------------------------------------------------------------------


def test_a_request_knows_its_connection_went_away() -> None:
    from cch.adapters import request_gone

    request = _request()
    require("twisted", "a fresh twisted.web.server.Request", request, "_disconnected")
    assert request_gone(request) is False
    request.connectionLost(Failure(ConnectionDone()))
    shape("twisted", "Request._disconnected after connectionLost", request_gone(request) is True, vars(request))


def test_the_request_line_is_on_the_channel_while_the_headers_are_in() -> None:
    from cch.adapters import request_line

    seen: list[Any] = []

    class Probe(HTTPChannel):
        def allHeadersReceived(self) -> None:
            seen.append(request_line(self))
            super().allHeadersReceived()

    probe = Probe()
    probe.makeConnection(StringTransport())
    assert request_line(probe) is None
    probe.dataReceived(b"POST /v1/responses?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    ok = seen == [(b"POST", b"/v1/responses?x=1")]
    shape("twisted", "HTTPChannel._command and _path in allHeadersReceived", ok, seen)
    probe.connectionLost(Failure(ConnectionDone()))


def test_request_transmission_failed_is_public_in_twisted_web_client() -> None:
    web_client = _module("twisted.web.client")
    shape(
        "twisted",
        "twisted.web.client.__all__ (cch/tunnel.py imports RequestTransmissionFailed from it)",
        "RequestTransmissionFailed" in web_client.__all__,
        web_client.__all__,
    )


# -- the usage ledger's database connections ----------------------------------------------------


def test_a_dropped_database_connection_is_a_warning_and_the_pool_reconnects() -> None:
    import sqlite3

    from twisted.enterprise import adbapi
    from twisted.logger import LogLevel, globalLogPublisher

    from cch.adapters import QuietRollbackConnection

    class Pool(adbapi.ConnectionPool):
        connectionFactory = QuietRollbackConnection

    pool = Pool("sqlite3", ":memory:", check_same_thread=False, cp_reconnect=True, cp_noisy=False)
    connection = QuietRollbackConnection(pool)
    for name in ("_pool", "_connection"):
        require("twisted", "twisted.enterprise.adbapi.Connection", connection, name)
    require("twisted", "twisted.enterprise.adbapi.ConnectionPool", pool, "good_sql")
    raw = connection._connection
    raw.close()  # as when the database ends the session
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        connection.rollback()  # returns: the interaction then fails with its own error
    finally:
        globalLogPublisher.removeObserver(seen.append)
    levels = {event.get("log_level") for event in seen}
    assert [e.get("log_format") for e in seen if e.get("log_format") == "usage_database_connection_lost"]
    assert LogLevel.critical not in levels and LogLevel.error not in levels
    # The pool forgot the dead connection: the next use opens a new one.
    assert pool.connections == {} or raw not in pool.connections.values()
    fresh = QuietRollbackConnection(pool)
    assert isinstance(fresh._connection, sqlite3.Connection) and fresh._connection is not raw
    pool.close()
