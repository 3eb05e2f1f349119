"""The tunnel from a WebSocket turn to a responses handler: two modes, one contract.

* :class:`InProcessTunnel` calls the handler directly with a trusted context (no socket hop).
* :class:`HttpTunnel` POSTs the turn to a ``/v1/responses`` URL (this gateway's own listener or a
  remote one) carrying the reserved ``x-cch-*`` markers and the internal secret, and reads the
  SSE or JSON response back into the same sink.

Either way the returned Deferred fires when the response is complete, fails with
:class:`~cch.turn.TurnTransportError` when the internal request or response broke, and
cancelling it aborts the turn all the way upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.client import RequestTransmissionFailed
from twisted.web.iweb import IResponse

from cch import secret as markers
from cch.bodyreader import (
    BodyEnd,
    BodyReader,
    Collected,
    Complete,
    Unframed,
    collect,
    content_type,
    is_event_stream,
)
from cch.handler.pipeline import ResponsesHandler
from cch.headers import without_reserved
from cch.httpclient import BytesBody, HttpClient, error_text
from cch.jsoncodec import dumps_bytes
from cch.sse import SSEDecoder
from cch.turn import RequestContext, ResponseSink, TurnRequest, TurnTransportError
from cch.wire import event_type, turn_body

# Carries the edge's turn id to the handler, so both ends log one id; trusted like the markers.


class InProcessTunnel:
    """Hands the turn to the handler in this process."""

    def __init__(self, handler: ResponsesHandler) -> None:
        self.handler = handler

    def run_turn(self, turn: TurnRequest, sink: ResponseSink) -> Deferred[None]:
        ctx = RequestContext(
            headers=turn.headers,
            via_websocket=True,
            ws_session=turn.session_id,
            request_id=turn.request_id,
        )
        return self.handler.handle(ctx, turn.body, sink)


BODY_DRAIN_TIMEOUT = 30.0  # docs/reference-behaviour.md#request-body-drain-timeout


class _DeadlineBody(BytesBody):
    """The turn's body, handed to the connection at once, done when the connection took it.

    The connection registers the body as its streaming producer: when the body leaves more in
    the socket's buffer than it wants, the connection pauses it and resumes it once drained.
    A body still paused after ``deadline`` seconds fails the request
    (docs/reference-behaviour.md#request-body-drain-timeout). No cooperator, so the body goes
    out with the request headers. The deadline is a timer of its own, not
    ``Deferred.addTimeout``: a body the connection stops must leave its Deferred unfired (the
    request reports the failure, and Twisted logs a late errback), yet its timer must go.
    """

    def __init__(self, payload: bytes, clock: IReactorTime, deadline: float) -> None:
        super().__init__(payload)
        self.clock = clock
        self.deadline = deadline
        self.timed_out = False
        self._paused = False
        self._done: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        # Cancelled when the request is (the client left): no deadline may outlive it.
        done = self._done = Deferred(self._cancelled)
        consumer.write(self.data)
        if self._paused:
            self._timer = self.clock.callLater(self.deadline, self._expire)
        else:
            self._finish()
        return done

    def _finish(self) -> None:
        self._cancel_timer()
        done, self._done = self._done, None
        if done is not None and not done.called:
            done.callback(None)

    def _expire(self) -> None:
        self._timer = None
        done, self._done = self._done, None
        if done is not None and not done.called:
            self.timed_out = True
            done.errback(TimeoutError("request body backpressured past its deadline"))

    def _cancelled(self, _: Deferred[None]) -> None:
        self._cancel_timer()
        self._done = None

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._timer is not None:
            self._finish()  # drained within the deadline

    def stopProducing(self) -> None:
        # The request is over (the connection went away); like FileBodyProducer, the
        # Deferred is left unfired: the request reports the failure.
        self._cancel_timer()
        self._done = None


class HttpTunnel(Service):
    """POSTs each turn to ``url`` with the internal markers
    (docs/reference-behaviour.md#the-internal-tunnel).

    ``url`` may be a callable, asked once at the first turn (or the first read of
    :attr:`url`): this gateway's own listener, whose port is known only once it listens. As a
    service, stopping it closes the persistent connections it keeps.
    """

    def __init__(
        self, reactor: Any, url: str | Callable[[], str], secret: str, clock: IReactorTime | None = None
    ) -> None:
        self._url = url
        self.secret = secret
        self.clock: IReactorTime = clock if clock is not None else reactor
        self._client = HttpClient(reactor)

    @property
    def url(self) -> str:
        """Where turns go (for logs too)."""
        url = self._url
        if not isinstance(url, str):
            url = self._url = url()
        return url

    def run_turn(self, turn: TurnRequest, sink: ResponseSink) -> Deferred[None]:
        payload = dumps_bytes(turn_body(turn.body))
        headers = without_reserved(turn.headers)
        headers["accept"] = "text/event-stream"
        headers["content-type"] = "application/json"
        headers.update(markers.marker_headers(turn.session_id, self.secret))
        if turn.request_id:
            headers[markers.REQUEST_ID] = turn.request_id
        return Deferred.fromCoroutine(self._run(headers, payload, sink))

    async def _run(self, headers: dict[str, str], payload: bytes, sink: ResponseSink) -> None:
        body = _DeadlineBody(payload, self.clock, BODY_DRAIN_TIMEOUT)
        try:
            response = await self._client.post(self.url, headers, body)
        except CancelledError:
            raise
        except Exception as exc:
            if body.timed_out:
                raise TurnTransportError(
                    "internal_request_drain_timeout",
                    "Internal request body remained backpressured past its deadline",
                ) from None
            if isinstance(exc, RequestTransmissionFailed):
                raise TurnTransportError(
                    "internal_request_body_closed", "Internal request body closed before it was fully written"
                ) from None
            raise TurnTransportError("internal_request_error", error_text(exc)) from None
        await _read_back(response, sink)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._client.close()


def _read_back(response: IResponse, sink: ResponseSink) -> Deferred[None]:
    """The internal response into the sink: SSE (docs/reference-behaviour.md#sse-parsing) or
    one whole non-SSE body (docs/reference-behaviour.md#error-frames). A body cut short fails
    the turn with ``internal_response_closed``."""
    kind = content_type(response)
    if not is_event_stream(kind):

        def body_read(collected: Collected) -> None:
            sink.unregister_producer()
            if not isinstance(collected.end, (Complete, Unframed)):
                raise TurnTransportError(
                    "internal_response_closed", "Internal response closed before a complete JSON body was received"
                )
            sink.json_body(response.code, collected.data, kind)

        return collect(response, on_start=sink.register_producer).addCallback(body_read)
    decoder = SSEDecoder()

    def started(reader: BodyReader) -> None:
        sink.sse_started(response.code, {"content-type": kind})
        sink.register_producer(reader)

    def chunk(data: bytes) -> None:
        for event in decoder.feed(data):
            sink.sse_event(event, event_type(event))  # typed once here: the edge forwards it as is

    def ended(end: BodyEnd) -> None:
        sink.unregister_producer()
        if not isinstance(end, (Complete, Unframed)):
            raise TurnTransportError(
                "internal_response_closed", "Internal response closed before emitting a terminal response event"
            )
        for event in decoder.finish():
            sink.sse_event(event, event_type(event))

    return BodyReader(chunk, on_start=started).read(response).addCallback(ended)
