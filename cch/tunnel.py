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

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, RequestTransmissionFailed, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from cch import secret as markers
from cch.handler.pipeline import ResponsesHandler
from cch.httpclient import BytesBody, HttpClient
from cch.jsoncodec import dumps_bytes
from cch.sse import SSEDecoder
from cch.turn import RequestContext, ResponseSink, TurnRequest, TurnTransportError
from cch.wire import turn_body

# Carries the edge's turn id to the handler, so both ends log one id; trusted like the markers.
REQUEST_ID = "x-cch-request-id"


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
    out with the request headers.
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


class HttpTunnel:
    """POSTs each turn to ``url`` with the internal markers
    (docs/reference-behaviour.md#the-internal-tunnel)."""

    def __init__(self, reactor: Any, url: str, secret: str, clock: IReactorTime | None = None) -> None:
        self.url = url
        self.secret = secret
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self._client = HttpClient(reactor, self.pool)

    def run_turn(self, turn: TurnRequest, sink: ResponseSink) -> Deferred[None]:
        payload = dumps_bytes(turn_body(turn.body))
        headers = {k: v for k, v in turn.headers.items() if not markers.is_reserved(k)}
        headers["accept"] = "text/event-stream"
        headers["content-type"] = "application/json"
        headers.update(markers.marker_headers(turn.session_id, self.secret))
        if turn.request_id:
            headers[REQUEST_ID] = turn.request_id
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
            raise TurnTransportError("internal_request_error", _message(exc)) from None
        reader = _InternalResponseReader(response, sink)
        response.deliverBody(reader)
        await reader.finished

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


class _InternalResponseReader(Protocol):
    """Reads the internal response into the sink: SSE (docs/reference-behaviour.md#sse-parsing)
    or one whole non-SSE body (docs/reference-behaviour.md#error-frames)."""

    def __init__(self, response: IResponse, sink: ResponseSink) -> None:
        self.response = response
        self.sink = sink
        raw = response.headers.getRawHeaders(b"content-type") or [b""]
        self.content_type = raw[0].decode("latin-1")
        self.decoder = SSEDecoder() if "text/event-stream" in self.content_type.lower() else None
        self.chunks: list[bytes] = []
        self.finished: Deferred[None] = Deferred(self._cancel)
        self._cancelled = False

    def connectionMade(self) -> None:
        if self.decoder is not None:
            self.sink.sse_started(self.response.code, {"content-type": self.content_type})
        self.sink.register_producer(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._cancelled:
            return
        if self.decoder is None:
            self.chunks.append(data)
            return
        for event in self.decoder.feed(data):
            self.sink.sse_event(event)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._cancelled:
            return
        self.sink.unregister_producer()
        if reason.check(ResponseDone, PotentialDataLoss):
            if self.decoder is None:
                self.sink.json_body(self.response.code, b"".join(self.chunks), self.content_type)
            else:
                for event in self.decoder.finish():
                    self.sink.sse_event(event)
            self.finished.callback(None)
            return
        what = (
            "Internal response closed before a complete JSON body was received"
            if self.decoder is None
            else "Internal response closed before emitting a terminal response event"
        )
        self.finished.errback(TurnTransportError("internal_response_closed", what))

    def _cancel(self, _: Deferred[None]) -> None:
        self._cancelled = True
        if self.transport is not None:
            self.transport.stopProducing()


def _message(exc: BaseException) -> str:
    inner = getattr(exc, "reasons", None)
    if inner:
        exc = inner[0].value
    return str(exc) or type(exc).__name__
