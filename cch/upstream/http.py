"""Upstream over HTTP: one POST per attempt, the body streamed to the turn's sink.

Built on :mod:`cch.httpclient`: connections kept alive per origin, one request at a time each.
Every timer runs on the injected clock, the connect timeout included.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from cch.bodyreader import (
    BodyEnd,
    BodyReader,
    Collected,
    Complete,
    Failed,
    Idle,
    Lost,
    TooLarge,
    Unframed,
    collect,
    content_type,
    is_event_stream,
)
from cch.httpclient import HttpClient, error_text
from cch.sse import EventTooLarge, SSEDecoder
from cch.turn import ResponseSink
from cch.upstream.tls import trust_root
from cch.wire import TERMINAL_EVENT_TYPES, error_body, error_event, event_too_large, event_type

log = Logger()


class UpstreamTimeout(Exception):
    """No response headers within the provider's first-byte timeout."""


class HttpUpstream(Service):
    """Sends attempts to upstream providers; one agent per connect timeout. As a service,
    stopping it closes the persistent connections it keeps."""

    def __init__(self, reactor: Any, clock: IReactorTime) -> None:
        self._reactor = reactor
        self.clock = clock
        self._clients: dict[tuple[float, str | None], HttpClient] = {}

    def _client(self, connect_timeout: float, tls_ca: str | None) -> HttpClient:
        client = self._clients.get((connect_timeout, tls_ca))
        if client is None:
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root(tls_ca))
            client = self._clients[(connect_timeout, tls_ca)] = HttpClient(
                self._reactor, tls=policy, connect_timeout=connect_timeout, clock=self.clock
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
        d = self._client(connect_timeout, tls_ca).post(url, headers, body)
        # A cancelled request fails as whatever it was doing (DNSLookupError,
        # ConnectingCancelledError, CancelledError, ...), none of them the provider's
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

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return gatherResults([client.close() for client in self._clients.values()]).addCallback(lambda _: None)


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
    client's connection can carry on; a JSON body over ``max_json_bytes`` (or broken, or
    stalled) becomes a 502 error body. Cancelling the Deferred aborts the upstream body.
    """
    kind = content_type(response)
    if not is_event_stream(kind):
        collecting = collect(
            response, on_start=sink.register_producer, clock=clock, idle_timeout=idle_timeout, max_bytes=max_json_bytes
        )
        return collecting.addCallback(_json_read, response.code, kind, sink)
    events = _Events(sink, max_event_bytes)

    def started(reader: BodyReader) -> None:
        sink.sse_started(response.code, {"content-type": kind})
        sink.register_producer(reader)

    reader = BodyReader(events.feed, on_start=started, clock=clock, idle_timeout=idle_timeout)
    return reader.read(response).addCallback(events.end)


class _Events:
    """An upstream's SSE body into the sink, each event parsed once; a body that did not end
    cleanly ends with an ``error`` event unless a terminal event was already sent."""

    def __init__(self, sink: ResponseSink, max_event_bytes: int) -> None:
        self.sink = sink
        self.decoder = SSEDecoder(max_event_bytes)
        self.terminal_seen = False

    def feed(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except EventTooLarge as too_large:
            # What came before the oversized event is delivered; then the reader stops.
            log.warn("upstream_event_too_large", transport="http", limit=too_large.limit)
            for event in too_large.events:
                self._event(event)
            raise
        for event in events:
            self._event(event)

    def _event(self, data: str) -> None:
        kind = event_type(data)
        if not self.terminal_seen and (data == "[DONE]" or kind in TERMINAL_EVENT_TYPES):
            self.terminal_seen = True
        self.sink.sse_event(data, kind)

    def end(self, end: BodyEnd) -> None:
        self.sink.unregister_producer()
        if isinstance(end, Complete):
            for event in self.decoder.finish():
                self._event(event)
        elif not self.terminal_seen:
            self.sink.sse_event(error_event(*failure_of(end)))


def _json_read(collected: Collected, status: int, kind: str, sink: ResponseSink) -> None:
    sink.unregister_producer()
    if isinstance(collected.end, (Complete, Unframed)):
        sink.json_body(status, collected.data, kind)
        return
    code, message = failure_of(collected.end)
    sink.json_body(502, error_body(message, "bad_gateway_error", code), "application/json")


def failure_of(end: BodyEnd) -> tuple[str, str]:
    """Code and message of a body that did not end cleanly."""
    match end:
        case Idle(timeout):
            return "upstream_idle_timeout", f"upstream sent nothing for {timeout:g}s"
        case TooLarge():
            return "upstream_response_too_large", "upstream response body too large"
        case Failed(failure) if isinstance(failure.value, EventTooLarge):
            return event_too_large(failure.value.limit)
        case Failed():
            return "upstream_stream_error", "upstream event could not be processed"
        case Lost(reason):
            return "upstream_stream_error", f"upstream stream failed: {error_text(reason.value)}"
        case _:  # Unframed: an event stream has no end without its framing
            return "upstream_stream_error", f"upstream stream failed: {PotentialDataLoss.__name__}"


def collect_body(
    response: IResponse, clock: IReactorTime, *, idle_timeout: float, max_bytes: int = 64 * 1024
) -> Deferred[bytes]:
    """The first ``max_bytes`` of a body (whatever arrived if it broke or stalled); cancellable."""
    collecting = collect(response, clock=clock, idle_timeout=idle_timeout, max_bytes=max_bytes)
    return collecting.addCallback(lambda collected: collected.data)
