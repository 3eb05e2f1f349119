"""One attempt at a provider that does not speak the Responses API (``providers[].api``).

The request is translated (:mod:`cch.translate`), posted over HTTP as a stream, and the
upstream's SSE events are translated back into the Responses events Codex renders; the turn's
sink (the usage meter, then the client) sees nothing but Responses events. A client that asked
for no stream gets the final ``response`` object as JSON, as a Responses upstream would answer.

What a translated provider cannot do is refused before it is asked: a ``previous_response_id``
the conversation's transcript cannot replay (these upstreams store nothing) is answered
``previous_response_not_found``, which makes Codex resend its context.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from cch.bodyreader import BodyEnd, BodyReader, Complete, collect, content_type, is_event_stream
from cch.handler import errors
from cch.handler.outbound import post_attempt
from cch.handler.routing import Provider
from cch.jsoncodec import dumps, dumps_bytes
from cch.sse import EventTooLarge, SSEDecoder
from cch.translate.api import Api, StreamTranslation, Untranslatable, UpstreamRequest
from cch.turn import ResponseSink
from cch.upstream.http import HttpUpstream, failure_of
from cch.wire import TERMINAL_EVENT_TYPES, error_body, error_event

if TYPE_CHECKING:
    from cch.tracing import TurnSpan

log = Logger()

JSON = "application/json"
SSE_HEADERS = {"content-type": "text/event-stream"}


def api_of(provider: Provider) -> Api:
    """The provider's :class:`~cch.translate.api.Api` (made once per provider)."""
    api = getattr(provider, "_api", None)
    if api is None:
        from cch.translate import api_named  # only a gateway with a translated provider loads them

        api = api_named(provider.config.api)
        provider._api = api  # type: ignore[attr-defined]
    return api


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class TranslatingSink:
    """The upstream's events in, Responses events out to ``sink``.

    With ``stream`` the events go out one by one as SSE; without, the terminal event's
    ``response`` object is the JSON answer (a failure: the Responses error body, 502)."""

    def __init__(self, sink: ResponseSink, translation: StreamTranslation, *, stream: bool, max_event_bytes: int) -> None:
        self.sink = sink
        self.translation = translation
        self.stream = stream
        self.decoder = SSEDecoder(max_event_bytes)
        self.ended = False  # the client has its terminal event (or JSON answer)

    # -- from the body reader --------------------------------------------------------------

    def started(self, reader: BodyReader) -> None:
        if self.stream:
            self.sink.sse_started(200, dict(SSE_HEADERS))
        self.sink.register_producer(reader)
        self._send(self.translation.start())

    def feed(self, chunk: bytes) -> None:
        try:
            datas = self.decoder.feed(chunk)
        except EventTooLarge as too_large:
            for data in too_large.events:
                self._send(self.translation.feed(data))
            raise
        for data in datas:
            self._send(self.translation.feed(data))

    def end(self, end: BodyEnd) -> None:
        self.sink.unregister_producer()
        if isinstance(end, Complete):
            for data in self.decoder.finish():
                self._send(self.translation.feed(data))
            self._send(self.translation.end())
        if not self.ended:
            # The body broke or stalled before the upstream finished: the turn ends with an
            # error event, as a broken Responses stream does.
            code, message = failure_of(end)
            self._error(code, message)

    # -- to the client ---------------------------------------------------------------------

    def _send(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if self.ended:
                return
            kind = event.get("type")
            terminal = kind in TERMINAL_EVENT_TYPES
            if self.stream:
                self.sink.sse_event(dumps(event), kind)
            elif terminal:
                self._answer(event)
            self.ended = terminal

    def _answer(self, terminal: dict[str, Any]) -> None:
        response = terminal.get("response")
        if terminal.get("type") in ("response.completed", "response.incomplete") and isinstance(response, dict):
            self.sink.json_body(200, dumps_bytes(response), JSON)
            return
        error = (response or {}).get("error") if isinstance(response, dict) else terminal.get("error")
        error = error if isinstance(error, dict) else {}
        self.sink.json_body(
            502,
            error_body(str(error.get("message") or "The upstream failed."), "server_error", error.get("code") or "upstream_error"),
            JSON,
        )

    def _error(self, code: str, message: str) -> None:
        self.ended = True
        if self.stream:
            self.sink.sse_event(error_event(code, message), "error")
        else:
            self.sink.json_body(502, error_body(message, "bad_gateway_error", code), JSON)


def translated_headers(provider: Provider, client_headers: Mapping[str, str], request: UpstreamRequest) -> dict[str, str]:
    """What a translated upstream is sent: its API's headers (credentials included) and the
    provider's static ones; of the client's, only its User-Agent (the rest are Responses
    API headers this upstream does not know)."""
    headers = {"content-type": JSON, "accept": "text/event-stream", "accept-encoding": "identity"}
    if "user-agent" in client_headers:
        headers["user-agent"] = client_headers["user-agent"]
    for name, value in provider.config.headers:
        headers[name.lower()] = value
    headers.update(request.headers)
    return headers


def upstream_endpoint(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


class TranslatedAttempt:
    """One attempt at a translated provider: what :meth:`run` returns follows the pipeline's
    rule — None once the client has its answer, else the error to report if no later
    provider does better (failover before the first byte)."""

    def __init__(self, upstream: HttpUpstream, clock: IReactorTime, *, max_json_bytes: int, max_event_bytes: int) -> None:
        self.upstream = upstream
        self.clock = clock
        self.max_json_bytes = max_json_bytes
        self.max_event_bytes = max_event_bytes

    async def run(
        self,
        client_headers: Mapping[str, str],
        provider: Provider,
        body: dict[str, Any],
        stream: bool,
        sink: ResponseSink,
        *,
        attempt: int,
        request_id: str,
        trace: TurnSpan | None = None,
    ) -> tuple[int, bytes, str] | None:
        """``trace``: the turn's span when tracing is on; the attempt is its child."""
        config = provider.config
        api = api_of(provider)
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        if isinstance(body.get("previous_response_id"), str):
            # Not replayable from a transcript (else the pipeline had replayed it): a stateless
            # upstream cannot know it either.
            sink.json_body(*_previous_not_found(body["previous_response_id"]))
            return None
        if config.max_output_tokens is not None and not isinstance(body.get("max_output_tokens"), int):
            body = {**body, "max_output_tokens": config.max_output_tokens}
        try:
            request = api.request(body, model=config.upstream_model(model), api_key=config.api_key)
        except Untranslatable as exc:
            sink.json_body(400, error_body(str(exc), "invalid_request_error", "unsupported_by_provider", param=exc.param), JSON)
            return None
        if request.dropped:
            log.warn("translation_dropped", provider=provider.name, dropped=list(request.dropped), request_id=request_id)
        breaker = provider.breaker
        breaker.attempt_started()
        if trace is not None:
            trace.attempt(provider.name, "http", api.name, attempt)
        response = await post_attempt(
            self.upstream,
            provider,
            upstream_endpoint(provider.base_url, request.path),
            translated_headers(provider, client_headers, request),
            dumps_bytes(request.body),
            attempt=attempt,
            request_id=request_id,
            trace=trace,
        )
        if response is None:
            return *errors.bad_gateway(f"Upstream provider '{provider.name}' is unreachable."), JSON
        kind = content_type(response)
        if response.code >= 400 or not is_event_stream(kind):
            refused = await self._refused(api, provider, response, sink, attempt=attempt, request_id=request_id)
            if trace is not None:
                if refused is None:
                    trace.attempt_status(response.code)  # the client has the provider's error
                else:
                    trace.failed(f"http_{response.code}" if response.code >= 400 else "upstream_not_a_stream", response.code)
            return refused
        if trace is not None:
            trace.attempt_status(response.code)
        breaker.record_success()
        log.info(
            "upstream_attempt_started",
            provider=provider.name,
            attempt=attempt,
            status=response.code,
            transport="http",
            api=api.name,
            request_id=request_id,
        )
        translation = api.stream(body, response_id=new_response_id(), model=model, created_at=int(time.time()))
        translating = TranslatingSink(sink, translation, stream=stream, max_event_bytes=self.max_event_bytes)
        reader = BodyReader(translating.feed, on_start=translating.started, clock=self.clock, idle_timeout=config.idle_timeout)
        end = await reader.read(response)
        translating.end(end)
        return None

    async def _refused(
        self, api: Api, provider: Provider, response: IResponse, sink: ResponseSink, *, attempt: int, request_id: str
    ) -> tuple[int, bytes, str] | None:
        """An answer that is not a stream: an error (translated to the Responses shape; a
        retryable one lets the next provider try) or a 2xx that is not what was asked."""
        collected = await collect(response, clock=self.clock, idle_timeout=provider.config.idle_timeout, max_bytes=self.max_json_bytes)
        status = response.code
        if status < 400:
            provider.breaker.record_failure()
            message = f"Upstream provider '{provider.name}' answered without an event stream."
            return 502, error_body(message, "bad_gateway_error", "upstream_not_a_stream"), JSON
        translated = dumps_bytes(api.error(status, collected.data))
        if status == 429 or status >= 500:
            provider.breaker.record_failure()
            log.warn("upstream_attempt_failed", provider=provider.name, attempt=attempt, status=status, request_id=request_id)
            return status, translated, JSON
        provider.breaker.record_success()  # the provider works: the request was the problem
        sink.json_body(status, translated, JSON)
        return None


def _previous_not_found(response_id: str) -> tuple[int, bytes, str]:
    message = f"Previous response with id '{response_id}' not found."
    return 400, error_body(message, "invalid_request_error", "previous_response_not_found", param="previous_response_id"), JSON
