"""Upstream over HTTP: one POST per attempt, the body streamed to the turn's sink.

Built on a plain Twisted Agent (:mod:`cch.httpclient`) with a persistent connection pool.
Every timer runs on the injected clock, the connect timeout included.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from cch.httpclient import BytesBody, HttpClient
from cch.sse import EventTooLarge, SSEDecoder
from cch.turn import ResponseSink
from cch.upstream.idle import IdleWatchdog, WatchedProducer
from cch.upstream.tls import trust_root
from cch.wire import TERMINAL_EVENT_TYPES, error_body, error_event, event_too_large, event_type

log = Logger()


class UpstreamTimeout(Exception):
    """No response headers within the provider's first-byte timeout."""


class HttpUpstream:
    """Sends attempts to upstream providers; one agent per connect timeout."""

    def __init__(self, reactor: Any, clock: IReactorTime) -> None:
        self._reactor = reactor
        self.clock = clock
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self._clients: dict[tuple[float, str | None], HttpClient] = {}

    def _client(self, connect_timeout: float, tls_ca: str | None) -> HttpClient:
        client = self._clients.get((connect_timeout, tls_ca))
        if client is None:
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root(tls_ca))
            client = self._clients[(connect_timeout, tls_ca)] = HttpClient(
                self._reactor, self.pool, tls=policy, connect_timeout=connect_timeout, clock=self.clock
            )
        return client

    def post(
        self,
        url: str,
        headers: dict[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        tls_ca: str | None = None,
    ) -> Deferred[IResponse]:
        """POST and fire with the response once its headers arrived (body not read yet)."""
        d = self._client(connect_timeout, tls_ca).post(url, headers, BytesBody(body))
        # The Agent reports a cancelled request as whatever it was doing (DNSLookupError,
        # ConnectingCancelledError, ResponseNeverReceived, ...), none of them the provider's
        # fault: a cancel by the caller is reported as CancelledError, the deadline as
        # UpstreamTimeout.
        cancelled: list[bool] = []

        def _cancel(_: Deferred[IResponse]) -> None:
            cancelled.append(True)
            d.cancel()

        def _timed_out(_: Any, timeout: float) -> Failure:
            return Failure(UpstreamTimeout(f"no response within {timeout:g}s"))

        d.addTimeout(first_byte_timeout, self.clock, onTimeoutCancel=_timed_out)
        result: Deferred[IResponse] = Deferred(_cancel)

        def _done(outcome: Any) -> None:
            if result.called:
                return  # cancelled by the caller, already answered
            if isinstance(outcome, Failure):
                result.errback(Failure(CancelledError()) if cancelled else outcome)
            else:
                result.callback(outcome)

        d.addBoth(_done)
        return result

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class _BodyReader(Protocol):
    """Reads one upstream body into the sink; pauses when the sink asks (flow control)."""

    def __init__(
        self,
        response: IResponse,
        sink: ResponseSink,
        clock: IReactorTime,
        idle_timeout: float,
        max_json_bytes: int,
        max_event_bytes: int,
    ) -> None:
        self.response = response
        self.sink = sink
        self.max_json_bytes = max_json_bytes
        content_type = _content_type(response)
        self.content_type = content_type
        self.decoder = SSEDecoder(max_event_bytes) if "text/event-stream" in content_type.lower() else None
        self.chunks: list[bytes] = []
        self.size = 0
        self.terminal_seen = False
        self.finished: Deferred[None] = Deferred(self._cancel)
        self.watchdog = IdleWatchdog(clock, idle_timeout, self._idle_fired)
        self._done = False
        self._stopped_reason: tuple[str, str] | None = None

    # Protocol
    def connectionMade(self) -> None:
        if self.decoder is not None:
            self.sink.sse_started(self.response.code, {"content-type": self.content_type})
        self.sink.register_producer(WatchedProducer(self.transport, self.watchdog))
        self.watchdog.start()

    def dataReceived(self, data: bytes) -> None:
        if self._done or self._stopped_reason is not None:
            return  # stopped: what is still in flight is not read
        self.watchdog.poke()
        try:
            if self.decoder is not None:
                for event in self.decoder.feed(data):
                    self._event(event)
                return
            self.size += len(data)
            if self.size > self.max_json_bytes:
                self._stop(("upstream_response_too_large", "upstream response body too large"))
                return
            self.chunks.append(data)
        except EventTooLarge as too_large:
            self._too_large(too_large)
        except Exception:
            self._stop(("upstream_stream_error", "upstream event could not be processed"))

    def _too_large(self, too_large: EventTooLarge) -> None:
        """Deliver what came before the oversized event, then end the turn and drop the body."""
        log.warn("upstream_event_too_large", transport="http", limit=too_large.limit)
        reason = event_too_large(too_large.limit)
        try:
            for event in too_large.events:
                self._event(event)
        except Exception:
            reason = ("upstream_stream_error", "upstream event could not be processed")
        self._stop(reason)

    def _event(self, data: str) -> None:
        kind = event_type(data)
        if not self.terminal_seen and (data == "[DONE]" or kind in TERMINAL_EVENT_TYPES):
            self.terminal_seen = True
        self.sink.sse_event(data, kind)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.watchdog.stop()
        if self._done:
            return
        self._done = True
        try:
            self.sink.unregister_producer()
            self._report_end(reason)
        except Exception:
            # Never leave a turn waiting on a body that already ended.
            self.finished.errback()
            return
        self.finished.callback(None)

    def _report_end(self, reason: Failure) -> None:
        clean = reason.check(ResponseDone) is not None
        if self.decoder is not None:
            if clean and self._stopped_reason is None:
                for event in self.decoder.finish():
                    self._event(event)
            if (not clean or self._stopped_reason is not None) and not self.terminal_seen:
                code, message = self._stopped_reason or ("upstream_stream_error", _describe(reason))
                self.sink.sse_event(error_event(code, message))
            return
        if self._stopped_reason is None and (clean or reason.check(PotentialDataLoss)):
            self.sink.json_body(self.response.code, b"".join(self.chunks), self.content_type)
            return
        code, message = self._stopped_reason or ("upstream_stream_error", _describe(reason))
        self.sink.json_body(502, error_body(message, "bad_gateway_error", code), "application/json")

    def _idle_fired(self) -> None:
        self._stop(("upstream_idle_timeout", f"upstream sent nothing for {self.watchdog.timeout:g}s"))

    def _stop(self, reason: tuple[str, str]) -> None:
        if self._stopped_reason is None:
            self._stopped_reason = reason
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, _: Deferred[None]) -> None:
        """The turn was cancelled: abort the upstream body, report nothing more."""
        self._done = True
        self.watchdog.stop()
        if self.transport is not None:
            self.transport.stopProducing()


def read_body(
    response: IResponse,
    sink: ResponseSink,
    clock: IReactorTime,
    *,
    idle_timeout: float,
    max_json_bytes: int,
    max_event_bytes: int,
) -> Deferred[None]:
    """Stream ``response`` into ``sink``; the Deferred fires when the sink has it all.

    A body that breaks or stalls after events were sent, or brings one SSE event over
    ``max_event_bytes`` (0: no cap), ends with a terminal ``error`` event
    (``upstream_stream_error`` / ``upstream_idle_timeout`` / ``upstream_event_too_large``) so the
    client's connection can carry on; cancelling the Deferred aborts the upstream body.
    """
    reader = _BodyReader(response, sink, clock, idle_timeout, max_json_bytes, max_event_bytes)
    response.deliverBody(reader)
    return reader.finished


class _Collector(Protocol):
    """Collects a small body we will not stream (a failover candidate's error)."""

    def __init__(self, max_bytes: int, clock: IReactorTime, idle_timeout: float) -> None:
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)
        self.watchdog = IdleWatchdog(clock, idle_timeout, self._enough)

    def connectionMade(self) -> None:
        self.watchdog.start()

    def dataReceived(self, data: bytes) -> None:
        self.watchdog.poke()
        self.chunks.append(data[: self.max_bytes - self.size])
        self.size += len(data)
        if self.size >= self.max_bytes:
            self._enough()

    def _enough(self) -> None:
        """Stalled or long enough: what we have is the error to report."""
        self.watchdog.stop()
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.watchdog.stop()
        if not self.finished.called:
            self.finished.callback(b"".join(self.chunks))

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._enough()


def collect_body(
    response: IResponse, clock: IReactorTime, *, idle_timeout: float, max_bytes: int = 64 * 1024
) -> Deferred[bytes]:
    """The first ``max_bytes`` of a body (whatever arrived if it broke or stalled); cancellable."""
    collector = _Collector(max_bytes, clock, idle_timeout)
    response.deliverBody(collector)
    return collector.finished


def _content_type(response: IResponse) -> str:
    values = response.headers.getRawHeaders(b"content-type") or [b""]
    value = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _describe(reason: Failure) -> str:
    value = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        value = inner[0].value
    text = str(value) or type(value).__name__
    return f"upstream stream failed: {text}"
