"""Every use cch makes of Autobahn's, txaio's and Twisted's internals, in one place.

Why they are used at all: speed on the hot path (measured in docs/benchmarks.md, "What made
the hot path fast") and every timer on the injected clock, Autobahn's included. Why here:
so that whoever upgrades one of those libraries finds the whole list in one module, and
tests/test_adapters.py fails, naming the attribute and the installed version, when an
upgrade removes or reshapes one. setup.cfg caps the versions to those the suite ran against.

No other module names a private (underscore) attribute of those libraries, and none
reassigns a method of their objects;
tests/test_adapters.py fails on a new one. Where a helper would add a function call per
frame, the attribute is read inline where it is used, and listed below all the same.

Inventory — what is relied on → where → what to use:

Private names (only here):

- ``txaio._common._BatchedTimer(bucket_ms, chunk_size, seconds_provider=, delayed_call_creator=)``:
  txaio's public ``make_batched_timer`` reads time from its global loop, not from a clock that
  is passed in → :func:`batched_timer`.
- ``factory._batched_timer`` of Autobahn's factories (every protocol timer: handshake deadlines,
  keepalive pings, close handshake) → :func:`run_timers_on`; cch/edge/factory.py,
  cch/upstream/ws.py.
- ``WebSocketProtocol._fail_connection(code, reason)``, overridden to finalize the edge when
  Autobahn fails a connection (1002, 1007, 1009, ...) → :meth:`ServerProtocol.failing_connection`;
  cch/edge/protocol.py.
- ``WebSocketProtocol._cancelAutoPingTimeoutCall()``, what Autobahn does on any data frame
  → :meth:`ServerProtocol.cancel_ping_timeout` (called only while a ping is unanswered, so a
  client frame pays nothing for it); cch/edge/protocol.py.
- ``twisted.web.server.Request._disconnected`` → :func:`request_gone`; cch/web.py.
- ``twisted.web.http.HTTPChannel._command`` and ``_path`` (the request line, set once its headers
  are in, deleted when the request is dispatched) → :func:`request_line`; cch/httpchannel.py
  (tests/test_doors.py checks them too).
- ``twisted.enterprise.adbapi.Connection``'s ``_pool`` and ``_connection``, and its ``rollback``
  (which logs a failed rollback of a connection the database dropped as a critical error with a
  traceback, though the pool reconnects and nothing is lost) → :class:`QuietRollbackConnection`;
  cch/usage/store.py.
- ``RequestTransmissionFailed``, once imported from ``twisted.web._newclient``: public as
  ``twisted.web.client.RequestTransmissionFailed`` (in that module's ``__all__``), which is where
  cch/tunnel.py imports it from.

Undocumented Autobahn state off the hot path (read here, by name):

- ``closeHandshakeTimeoutCall`` → :func:`cancel_close_timer`; cch/edge/protocol.py,
  cch/upstream/ws.py, cch/testing/fake_upstream.py.
- ``wasNotCleanReason`` → :func:`not_clean_reason`; cch/edge/protocol.py, cch/upstream/ws.py.
- ``http_status_line`` (a client's, once the server answered the upgrade) →
  :func:`handshake_status_line`; cch/upstream/ws.py.
- ``wasMaxFramePayloadSizeExceeded``, ``wasMaxMessagePayloadSizeExceeded`` →
  :func:`refused_oversized`; cch/upstream/ws.py.
- ``failedByMe``, ``message_data`` and the ``onMessageEnd`` override that skips Autobahn's
  per-message signal → :meth:`ClientProtocol.message_parsed`; cch/upstream/ws.py.

Undocumented Autobahn state on the per-frame path (read inline, where it is used):

- ``consumeData()``, overridden by ``EdgeProtocol`` (cch/edge/protocol.py) and the upstream
  ``_ClientProtocol`` (cch/upstream/ws.py); the override reads ``state``, ``STATE_OPEN``,
  ``current_frame`` and ``inside_message``.
- ``data`` (the read buffer, read and replaced), ``maxFramePayloadSize``,
  ``maxMessagePayloadSize``, ``state``, ``STATE_OPEN``: cch/wsframes.py ``take_text_frames``.
- ``autoPingTimeoutCall``, ``autoPingRestartOnAnyTraffic``: cch/edge/protocol.py
  ``EdgeProtocol._text_frame``.
- ``autobahn.websocket.xormasker.create_xor_masker(key, length).process(payload)``:
  cch/wsframes.py.
- ``websocket_extensions_in_use`` (the negotiated extensions, on server and client protocols)
  → ``cch.wsframes.negotiated_deflate``; and a negotiated ``PerMessageDeflate``'s
  ``start_compress_message()``, ``compress_message_data(data)``, ``end_compress_message()``
  (the connection's own compressor, so frames written by cch and by Autobahn share one deflate
  stream in write order) → ``cch.wsframes.MessageDeflater``, once per compressed event.

Other undocumented methods and behaviour cch relies on by name:

- ``onCloseFrame(code, reasonRaw)`` (overridden in cch/edge/protocol.py, cch/upstream/ws.py,
  cch/testing/fake_upstream.py), ``dropConnection(abort)`` and ``sendData(data, sync, chopsize)``
  (overridden in cch/edge/protocol.py), ``sendCloseFrame(code=, reasonUtf8=, isReply=)`` (called
  by cch/edge/protocol.py and cch/upstream/ws.py: ``sendClose`` refuses protocol codes such as
  1009 and 1011; overridden in cch/edge/protocol.py, which closes TCP once the 1009 for an
  oversized compressed message is out: Autobahn reads nothing after refusing one), ``http_request_uri`` (cch/edge/protocol.py, cch/testing/fake_upstream.py).
- Autobahn's ``WebSocketResource.render`` takes the connection over by setting
  ``request.channel.transport = None``: cch/httpchannel.py hands the connection's slot to the
  edge then.
- A Twisted transport's ``producer`` (what twisted.web registered): cch/edge/protocol.py
  unregisters it when the edge takes the connection's flow control.

Monkeypatches: none. The upstream socket's and the test client's factories are subclasses
whose ``buildProtocol`` builds the connection's protocol (cch/upstream/ws.py,
cch/testing/client.py); outbound HTTP reads a chunk inside a write batch (and caps response heads)
through a wrapping protocol (cch/httpclient.py).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from txaio._common import _BatchedTimer
from txaio.interfaces import IBatchedTimer

# -- timers on the injected clock ----------------------------------------------------------


def batched_timer(clock: IReactorTime) -> IBatchedTimer:
    """What Autobahn factories schedule their timers with (200 ms buckets, as Autobahn's own),
    driven by ``clock``."""
    return _BatchedTimer(200, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater)


def run_timers_on(factory: Any, clock: IReactorTime) -> None:
    """Put every timer of ``factory``'s protocols on ``clock``; call it from the factory's
    ``__init__``, before any protocol is built."""
    factory._batched_timer = batched_timer(clock)


def cancel_close_timer(protocol: Any) -> None:
    """Autobahn leaves its close-handshake timer behind when the TCP dies mid-close."""
    call = getattr(protocol, "closeHandshakeTimeoutCall", None)
    if call is not None:
        try:
            call.cancel()
        except Exception:
            pass
        protocol.closeHandshakeTimeoutCall = None


# -- what Autobahn recorded about a connection ----------------------------------------------


def not_clean_reason(protocol: Any) -> str | None:
    """Autobahn's text for why a connection did not close cleanly, if it gave one."""
    return getattr(protocol, "wasNotCleanReason", None)


def handshake_status_line(protocol: Any) -> str | None:
    """The status line a server answered a client's upgrade with (``"HTTP/1.1 426 ..."``), once
    it arrived."""
    return getattr(protocol, "http_status_line", None)


def refused_oversized(protocol: Any) -> bool:
    """Autobahn refused a frame or message over its size limits, from its header."""
    return bool(
        getattr(protocol, "wasMaxFramePayloadSizeExceeded", False)
        or getattr(protocol, "wasMaxMessagePayloadSizeExceeded", False)
    )


# -- protocols ------------------------------------------------------------------------------


class ServerProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol with the private hooks the edge uses, under public names."""

    def _fail_connection(
        self, code: int = WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY, reason: str = "going away"
    ) -> None:
        self.failing_connection()
        super()._fail_connection(code, reason)

    def failing_connection(self) -> None:
        """Autobahn is failing the connection (a protocol error: 1002, 1007, 1009, ...), before
        it sends its close frame or drops the TCP connection."""

    def cancel_ping_timeout(self) -> None:
        """What Autobahn does on any data frame while a keepalive ping is unanswered (with
        ``autoPingRestartOnAnyTraffic``): the ping's timeout is cancelled. Only called when
        ``self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic``, so the common frame
        pays nothing for it."""
        self._cancelAutoPingTimeoutCall()


class ClientProtocol(WebSocketClientProtocol):
    """Autobahn's client protocol handing over each message it parsed in one call."""

    def onMessageEnd(self) -> None:
        # Autobahn's own onMessageEnd, minus its per-message signal (a txaio future and
        # callbacks nobody listens to).
        if not self.failedByMe:
            self.message_parsed(b"".join(self.message_data))
        self.message_data = None

    def message_parsed(self, payload: bytes) -> None:
        """A whole message Autobahn parsed (the frames cch/wsframes.py leaves to it)."""


# -- twisted.web ----------------------------------------------------------------------------


def request_gone(request: Any) -> bool:
    """The connection of ``request`` (a ``twisted.web.server.Request``) went away."""
    return bool(request._disconnected)


def request_line(channel: Any) -> tuple[bytes, bytes] | None:
    """Method and URI of the request an ``HTTPChannel`` is reading, from the moment its
    headers are in until it is dispatched; None outside that window."""
    try:
        return channel._command, channel._path
    except AttributeError:
        return None


# -- the usage ledger's database connections ---------------------------------------------------

_log = Logger()


class QuietRollbackConnection(adbapi.Connection):
    """adbapi's connection, with a rollback that fails because the database dropped the
    connection logged as what it is: a warning. The dead connection is forgotten (the next
    interaction opens a new one) and the rollback returns, so the interaction fails with its
    own error and the ledger retries the write. adbapi's rollback raises instead, and adbapi
    logs that as a critical error with a traceback (twice), which would page whoever alerts on
    the ledger's only critical event, lost rows. Otherwise adbapi's own rollback."""

    def rollback(self) -> None:
        pool, connection = self._pool, self._connection
        if not pool.reconnect:
            connection.rollback()
            return
        try:
            connection.rollback()
            cursor = connection.cursor()
            cursor.execute(pool.good_sql)
            cursor.close()
            connection.commit()
            return
        except BaseException as exc:
            _log.warn("usage_database_connection_lost", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        pool.disconnect(connection)
