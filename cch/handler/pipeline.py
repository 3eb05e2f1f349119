"""The responses pipeline: auth, provider selection, the attempt loop with failover.

One code path serves plain HTTP ``POST /v1/responses`` and every WebSocket turn.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from cch.config import ClientKey, LimitsConfig
from cch.drain import Drain
from cch.handler import continuity, errors
from cch.handler.auth import KeyRing
from cch.handler.continuity import NEW_SOCKET, TranscriptRecorder
from cch.handler.eligibility import evaluate
from cch.handler.metering import TurnMeter
from cch.handler.outbound import (
    for_responses_provider,
    post_attempt,
    upstream_headers,
    upstream_url,
)
from cch.handler.routing import Provider, ProviderRouter
from cch.handler.translated import TranslatedAttempt
from cch.jsoncodec import dumps_bytes, loads
from cch.keylimits import KeyLimiter, Refused, TurnLease
from cch.tracing import TurnTracer
from cch.transcript import Origin, Transcript, TranscriptStore, as_items
from cch.turn import RequestContext, ResponseSink, connection_session
from cch.upstream.exchange import ConnectionLimit, Failed, NotResent, Outcome, PreviousLost
from cch.upstream.http import HttpUpstream, collect_body, read_body
from cch.upstream.pool import Target, UpstreamWSPool
from cch.upstream.unsupported import UnsupportedCache
from cch.upstream.ws import upgrade_headers, ws_url
from cch.usage.ledger import NullLedger
from cch.usage.prices import PriceSheet
from cch.waiters import Waiters
from cch.wire import (
    PREVIOUS_NOT_FOUND,
    error_event,
    is_previous_not_found,
    previous_not_found,
    upstream_ws_frame,
)

log = Logger()

JSON = "application/json"


def _retryable(status: int) -> bool:
    """Statuses that say "this provider, not this request": try the next provider."""
    return status == 429 or status >= 500


@dataclass(frozen=True, slots=True)
class Refusal:
    """A turn the gateway answers itself before any upstream: the error event for a WebSocket
    turn, the status and JSON body for HTTP."""

    status: int
    code: str
    event: str
    body: bytes
    headers: dict[str, str] | None = None  # for HTTP: retry-after

    @classmethod
    def of(cls, refused: Refused) -> Refusal:
        wait = None if refused.retry_after is None else {"retry-after": str(refused.retry_after)}
        return cls(refused.status, refused.code, refused.error_event(), refused.json_body(), wait)

    @classmethod
    def previous_not_found(cls, response_id: str) -> Refusal:
        """Exactly what an upstream says of an id it does not know."""
        event = previous_not_found(response_id)
        return cls(400, PREVIOUS_NOT_FOUND, event, dumps_bytes({"error": loads(event)["error"]}))


RETRY_REASONS = {ConnectionLimit: "connection_limit", PreviousLost: "previous_lost"}

# The transcript of a key's translated turns over HTTP (``store`` not false): a session id no
# WebSocket connection can have (those are UUIDs).
HTTP_TRANSCRIPT = "http-turns:"

WS_TARGETS_KEPT = 4096  # WebSocket targets remembered (about one per live client connection)


@dataclass
class WebSocketFigures:
    """What upstream WebSocket attempts came to (exported by :meth:`ResponsesHandler.collect`)."""

    attempts: int = 0
    connected: int = 0
    reused: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)  # by reason: the turn went to HTTP
    failures: Counter[str] = field(default_factory=Counter)  # by code: ended, not re-sent
    retries: Counter[str] = field(default_factory=Counter)  # by RETRY_REASONS: sent again


class ResponsesHandler:
    """Serves one Responses request into a sink."""

    def __init__(
        self,
        *,
        keys: KeyRing,
        router: ProviderRouter,
        upstream: HttpUpstream,
        clock: IReactorTime,
        limits: LimitsConfig,
        ws_pool: UpstreamWSPool | None = None,
        unsupported: UnsupportedCache | None = None,
        ws_enabled: bool = True,
        transcripts: TranscriptStore | None = None,
        ledger: NullLedger | None = None,
        prices: PriceSheet | None = None,
        limiter: KeyLimiter | None = None,
        drain: Drain | None = None,
        replica: str = "",
        tracer: TurnTracer | None = None,
    ) -> None:
        """``ledger`` gets one row per turn and owns response ids (default: memory only),
        ``limiter`` holds each key to its limits, ``drain`` tells a turn cut by the drain from
        one the client left, ``replica`` names this process in the rows, ``tracer`` (when
        tracing is on) gives each turn its span (docs/tracing.md)."""
        self.keys = keys
        self.router = router
        self.upstream = upstream
        self.clock = clock
        self.limits = limits
        self.ws_pool = ws_pool
        self.unsupported = unsupported if unsupported is not None else UnsupportedCache(clock)
        self.ws_enabled = ws_enabled
        self.transcripts = transcripts
        self.ledger = ledger if ledger is not None else NullLedger()
        self.prices = prices if prices is not None else PriceSheet(())
        self.limiter = limiter if limiter is not None else KeyLimiter(clock, self.prices)
        self.drain = drain
        self.replica = replica
        self.tracer = tracer
        self.active = 0  # requests in progress (leak checks, drain, metrics)
        self._idle: Waiters[None] = Waiters()
        self.http_attempts = 0
        self.ws_figures = WebSocketFigures()
        self.translated = TranslatedAttempt(
            upstream,
            clock,
            max_json_bytes=limits.max_json_response_bytes,
            max_event_bytes=limits.max_upstream_event_bytes,
        )
        # Only a gateway with a provider that renames models or translates adapts bodies.
        self._adapts = any(p.config.model_map or p.config.translated for p in router.providers)
        self._ws_targets = functools.lru_cache(maxsize=WS_TARGETS_KEPT)(self._ws_target)

    def handle(self, ctx: RequestContext, body: dict[str, Any], sink: ResponseSink) -> Deferred[None]:
        """Fires when the whole response went to ``sink``; cancel it to abort upstream."""
        self.active += 1
        d = Deferred.fromCoroutine(self._handle(ctx, body, sink))
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self.active -= 1
        if self.active == 0:
            self._idle.fire(None)
        return result

    def collect(self) -> Iterator[Metric]:
        """The pipeline's figures, read at scrape time (cch.metrics)."""
        ws = self.ws_figures
        yield GaugeMetricFamily("cch_requests_in_progress", "Responses requests being served.", value=self.active)
        attempts = CounterMetricFamily("cch_upstream_attempts", "Upstream attempts, by transport.", labels=["transport"])
        attempts.add_metric(["websocket"], ws.attempts)
        attempts.add_metric(["http"], self.http_attempts)
        yield attempts
        for name, text, label, counts in (
            ("cch_upstream_ws_fallbacks", "Turns that used HTTP instead of the upstream WebSocket, by reason.", "reason", ws.fallbacks),
            (
                "cch_upstream_ws_turn_failures",
                "Turns the upstream WebSocket took but ended without an event and were not re-sent, by code.",
                "code",
                ws.failures,
            ),
            ("cch_upstream_ws_retries", "Turns sent again on a fresh upstream socket, by what the first event said.", "reason", ws.retries),
        ):
            family = CounterMetricFamily(name, text, labels=[label])
            for value, count in sorted(counts.items()):
                family.add_metric([value], count)
            yield family

    def wait_idle(self) -> Deferred[None]:
        """Fires when no request is in progress (immediately if none is)."""
        if self.active == 0:
            return succeed(None)
        return self._idle.wait()

    async def _handle(self, ctx: RequestContext, body: dict[str, Any], sink: ResponseSink) -> None:
        """The straight path of one turn: who asks → may they (ownership, limits) → the
        attempts → one usage row and the limits' count, however it ended."""
        allowed, key = self.keys.authenticate(ctx.headers)
        if not allowed:
            sink.json_body(*errors.unauthorized(), JSON)
            return
        if "stream_id" in body:
            # A WebSocket lane's name (the edge takes it off its turns): no upstream knows it.
            body = {name: value for name, value in body.items() if name != "stream_id"}
        ctx.key_name = key.name if key else None
        model = body.get("model") if isinstance(body.get("model"), str) else None
        meter = TurnMeter(
            sink,
            self.clock,
            request_id=ctx.request_id or uuid.uuid4().hex,
            key=ctx.key_name,
            model=model,
            client_transport="websocket" if ctx.via_websocket else "http",
            on_response_id=None if key is None else functools.partial(self._owned, key.name),
        )
        if self.tracer is not None:  # the only question tracing asks of a turn when it is off
            meter.trace = self.tracer.turn(ctx.headers, body, meter.started_at)
        lease: TurnLease | None = None
        try:
            if key is not None:  # a keyless gateway has neither owners nor limits
                admitted = await self._admit(ctx, key, body, model)
                if isinstance(admitted, Refusal):
                    self._refuse(ctx, meter, admitted)
                    return
                lease = admitted
            await self._attempts(ctx, body, meter, model)
        except CancelledError:
            meter.ended("drained" if self.drain is not None and self.drain.draining else "cancelled")
            raise
        except Exception:
            meter.ended("error", "internal_error")
            raise
        finally:
            row = meter.row(self.prices, self.replica)
            if lease is not None:
                lease.finish(row.total_tokens, row.cost)
            self.ledger.record(row)

    def _owned(self, key: str, response_id: str) -> None:
        self.ledger.owns(response_id, key)

    async def _admit(self, ctx: RequestContext, key: ClientKey, body: dict[str, Any], model: str | None) -> TurnLease | Refusal:
        """A turn's ``previous_response_id`` must be the key's own (docs/usage.md#ownership):
        another key's id is answered as unknown and never forwarded; then the key's limits."""
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            try:
                owner = await self.ledger.owner_of(previous)
            except CancelledError:
                raise
            except Exception:
                # The database cannot say whose it is: refusing is safe (Codex resends the whole
                # context), continuing another key's conversation is not.
                log.warn("response_id_owner_unknown", key=key.name, request_id=ctx.request_id)
                return Refusal.previous_not_found(previous)
            if owner is not None and owner != key.name:
                log.warn("response_id_foreign", key=key.name, request_id=ctx.request_id)
                return Refusal.previous_not_found(previous)
        admitted = await self.limiter.begin_turn(key, model)
        if isinstance(admitted, Refused):
            return Refusal.of(admitted)
        return admitted

    def _refuse(self, ctx: RequestContext, meter: TurnMeter, refusal: Refusal) -> None:
        """A WebSocket turn gets an error event (the connection stays open); HTTP a JSON error."""
        meter.ended("refused", refusal.code)
        if ctx.via_websocket:
            _send_events(meter, [refusal.event])
        else:
            meter.json_body(refusal.status, refusal.body, JSON, refusal.headers)

    async def _attempts(self, ctx: RequestContext, body: dict[str, Any], meter: TurnMeter, model: str | None) -> None:
        """Provider by provider until one serves the turn (failover before the first byte)."""
        stream = body.get("stream") is True
        candidates = self.router.candidates(model)
        if not candidates:
            meter.json_body(*errors.no_provider(model), JSON)
            return
        transcript = (
            self.transcripts.get(connection_session(ctx.ws_session))
            if self.transcripts is not None and ctx.ws_session
            else None
        )
        last: tuple[int, bytes, str] | None = None
        for attempt, provider in enumerate(candidates, start=1):
            meter.attempts, meter.provider = attempt, provider.name
            if provider.config.translated:
                outcome = await self._translated_attempt(ctx, provider, body, stream, meter, attempt, transcript)
                if outcome is None:
                    return
                last = outcome
                continue
            if await self._websocket_attempt(ctx, provider, body, meter, attempt, transcript):
                return
            if transcript is not None and continuity.wants_local_warmup(transcript, body):
                self._local_warmup(body, meter, transcript, provider)
                return
            send, lost = continuity.prepare(transcript, body, provider.name, None)
            if send is None:
                _send_events(meter, [lost])
                return
            meter.replayed = meter.replayed or send is not body
            if transcript is not None:
                meter.recorder = TranscriptRecorder(transcript, body, Origin(provider.name, "http", None, _stored(body)))
            if self._adapts:
                send = for_responses_provider(send, provider.config)
            outcome = await self._attempt(ctx, provider, send, stream, meter, attempt, transcript)
            if outcome is None:
                return
            last = outcome
        assert last is not None
        meter.json_body(*last)

    def _local_warmup(
        self, body: dict[str, Any], sink: ResponseSink, transcript: Transcript | None, provider: Provider
    ) -> None:
        """Answer a ``generate:false`` warm-up here: HTTP upstreams cannot keep it anyway."""
        response_id, events = continuity.warmup_events(body)
        previous = body.get("previous_response_id")
        if transcript is not None:
            transcript.add(
                response_id,
                previous if isinstance(previous, str) else None,
                as_items(body.get("input")),
                [],
                Origin(provider.name, "local", None, False),
            )
        log.info("continuity_local_warmup", provider=provider.name)
        _send_events(sink, events)

    async def _translated_attempt(
        self,
        ctx: RequestContext,
        provider: Provider,
        body: dict[str, Any],
        stream: bool,
        meter: TurnMeter,
        attempt: int,
        transcript: Transcript | None,
    ) -> tuple[int, bytes, str] | None:
        """An attempt at a provider of another API (cch.handler.translated). It stores nothing:
        a warm-up is answered here, and a continuation the transcript holds is replayed whole."""
        if transcript is None and self.transcripts is not None and not ctx.via_websocket:
            # An HTTP client has no connection to keep a transcript on: its key's translated
            # turns are kept instead, in place of the responses the provider does not store.
            transcript = self.transcripts.get(HTTP_TRANSCRIPT + (ctx.key_name or ""))
        if body.get("generate") is False:
            self._local_warmup(body, meter, transcript, provider)
            return None
        send: dict[str, Any] | None = body
        previous = body.get("previous_response_id")
        if transcript is not None and isinstance(previous, str) and transcript.knows(previous):
            send, lost = continuity.replay(transcript, body)
            if send is None:
                _send_events(meter, [lost])
                return None
            meter.replayed = True
        assert send is not None
        if transcript is not None and (ctx.via_websocket or _stored(body)):
            meter.recorder = TranscriptRecorder(transcript, body, Origin(provider.name, "http", None, False))
        meter.upstream_transport = "http"
        self.http_attempts += 1
        return await self.translated.run(
            ctx.headers, provider, send, stream, meter, attempt=attempt, request_id=ctx.request_id, trace=meter.trace
        )

    async def _websocket_attempt(
        self,
        ctx: RequestContext,
        provider: Provider,
        body: dict[str, Any],
        meter: TurnMeter,
        attempt: int,
        transcript: Transcript | None,
    ) -> bool:
        """Try the provider's Responses WebSocket; False means "use HTTP for this attempt".

        Failures before the first upstream event fall back to HTTP on the same provider and
        never count against its breaker (docs/reference-behaviour.md#fallback-to-http) — unless
        the provider may already have the turn (:class:`NotResent`): then it ends here with an
        ``error`` event, still without a breaker failure, so it never reaches the provider twice.
        """
        pool = self.ws_pool
        if pool is None:
            return False
        verdict = evaluate(ctx, provider, enabled=self.ws_enabled, unsupported=self.unsupported)
        if not verdict.eligible:
            if verdict.downgrade_reason is not None:
                self.ws_figures.fallbacks[verdict.downgrade_reason] += 1
                log.debug("upstream_ws_downgraded", provider=provider.name, reason=verdict.downgrade_reason, request_id=ctx.request_id)
                if meter.trace is not None:
                    meter.trace.fallback(provider.name, verdict.downgrade_reason)
            return False
        target = self._ws_targets(provider, tuple(ctx.headers.items()), ctx.ws_session)
        socket = pool.peek(target)
        send, lost = continuity.prepare(transcript, body, provider.name, NEW_SOCKET if socket is None else socket)
        if send is None:
            _send_events(meter, [lost])
            return True
        self.ws_figures.attempts += 1
        provider.breaker.attempt_started()
        if self._adapts:
            send = for_responses_provider(send, provider.config)
        trace = meter.trace
        if trace is not None:
            trace.attempt(provider.name, "websocket", "responses", attempt)
        try:
            outcome = await pool.exchange(target, upstream_ws_frame(send))
            again = _second_try(outcome, transcript, body, send, provider.name)
            if again is not None:
                # The socket hit its age cap, or the upstream forgot what it held: take a fresh
                # socket and make the turn whole from the transcript, so the client never sees it.
                assert not isinstance(outcome, (Failed, NotResent))
                outcome.exchange.discard()
                reason = RETRY_REASONS[type(outcome)]
                self.ws_figures.retries[reason] += 1
                if trace is not None:
                    trace.retry(provider.name, reason)
                send, lost = again
                if send is None:
                    _send_events(meter, [lost])
                    return True
                if trace is not None:
                    trace.attempt(provider.name, "websocket", "responses", attempt)
                outcome = await pool.exchange(target, upstream_ws_frame(send))
        except CancelledError:
            provider.breaker.attempt_abandoned()
            raise
        except Exception:
            # Whatever went wrong, HTTP on the same provider still may work
            # (docs/reference-behaviour.md#fallback-to-http).
            log.failure("upstream_ws_attempt_threw", level=LogLevel.warn, provider=provider.name)
            self.ws_figures.fallbacks["exception"] += 1
            provider.breaker.attempt_abandoned()
            if trace is not None:
                trace.fallback(provider.name, "exception")
            return False
        if isinstance(outcome, Failed):
            if outcome.cacheable:
                self.unsupported.mark(provider.name, None, outcome.reason)
            self.ws_figures.fallbacks[outcome.reason] += 1
            log.info(
                "upstream_ws_fallback",
                provider=provider.name,
                reason=outcome.reason,
                cacheable=outcome.cacheable,
                message=outcome.message,
                request_id=ctx.request_id,
            )
            provider.breaker.attempt_abandoned()
            if trace is not None:
                trace.fallback(provider.name, outcome.reason)
            return False
        if isinstance(outcome, NotResent):
            self.ws_figures.failures[outcome.code] += 1
            log.warn(outcome.log_event, provider=provider.name, code=outcome.code, message=outcome.message, request_id=ctx.request_id)
            provider.breaker.attempt_abandoned()
            if trace is not None:
                trace.not_resent(outcome.code)
            _send_events(meter, [error_event(outcome.code, outcome.message)])
            return True
        # Ready — or an error first event not worth a second try: the client gets it as is.
        exchange = outcome.exchange
        provider.breaker.record_success()
        self.ws_figures.connected += 1
        if exchange.reused:
            self.ws_figures.reused += 1
        log.info(
            "upstream_attempt_started",
            provider=provider.name,
            attempt=attempt,
            transport="websocket",
            reused=exchange.reused,
            request_id=ctx.request_id,
        )
        meter.upstream_transport = "websocket"
        meter.replayed = meter.replayed or send is not body
        if transcript is not None:
            origin = Origin(provider.name, "websocket", exchange.socket_id, _stored(body))
            meter.recorder = TranscriptRecorder(transcript, body, origin)
        await exchange.deliver(meter, provider.config.idle_timeout)
        return True

    def _ws_target(self, provider: Provider, client_headers: tuple[tuple[str, str], ...], session: str | None) -> Target:
        """Where a WebSocket attempt goes (kept in ``_ws_targets``: every turn of a connection asks
        with the same provider, client headers and session, and making the upgrade headers and
        their fingerprint costs several times the lookup)."""
        return Target.of(
            provider.name,
            upstream_ws_url(provider.base_url),
            upgrade_headers(upstream_headers(dict(client_headers), provider, stream=True)),
            session,
            tls_ca=provider.config.tls_ca,
            max_event_bytes=self.limits.max_upstream_event_bytes,
        )

    async def _attempt(
        self,
        ctx: RequestContext,
        provider: Provider,
        body: dict[str, Any],
        stream: bool,
        meter: TurnMeter,
        attempt: int,
        transcript: Transcript | None = None,
    ) -> tuple[int, bytes, str] | None:
        """Try one provider. None when the response went to the client; otherwise the error to
        report if no later provider does better."""
        config = provider.config
        breaker = provider.breaker
        breaker.attempt_started()
        self.http_attempts += 1
        trace = meter.trace
        if trace is not None:
            trace.attempt(provider.name, "http", "responses", attempt)
        response = await post_attempt(
            self.upstream,
            provider,
            upstream_url(provider.base_url),
            upstream_headers(ctx.headers, provider, stream=stream),
            dumps_bytes(body),
            attempt=attempt,
            request_id=ctx.request_id,
            trace=trace,
        )
        if response is None:
            return *errors.bad_gateway(f"Upstream provider '{provider.name}' is unreachable."), JSON
        if _retryable(response.code):
            breaker.record_failure()
            log.warn(
                "upstream_attempt_failed",
                provider=provider.name,
                attempt=attempt,
                status=response.code,
                request_id=ctx.request_id,
            )
            if trace is not None:
                trace.failed(f"http_{response.code}", response.code)
            content_type = (response.headers.getRawHeaders("content-type") or [JSON])[0]
            body = await collect_body(response, self.clock, idle_timeout=config.idle_timeout)
            return response.code, body, content_type
        breaker.record_success()
        if trace is not None:
            trace.attempt_status(response.code)
        if (
            response.code == 400
            and transcript is not None
            and isinstance(body.get("previous_response_id"), str)
            and transcript.knows(body["previous_response_id"])
        ):
            content_type = (response.headers.getRawHeaders("content-type") or [JSON])[0]
            error = await collect_body(response, self.clock, idle_timeout=config.idle_timeout)
            if not is_previous_not_found(error):
                meter.json_body(400, error, content_type)
                return None
            # The upstream lost the chain it was expected to hold: replay it once.
            if trace is not None:
                trace.retry(provider.name, "previous_lost")
            send, lost = continuity.replay(transcript, body)
            if send is None:
                _send_events(meter, [lost])
                return None
            meter.replayed = True
            return await self._attempt(ctx, provider, send, stream, meter, attempt)
        meter.upstream_transport = "http"
        log.info(
            "upstream_attempt_started",
            provider=provider.name,
            attempt=attempt,
            status=response.code,
            transport="http",
            request_id=ctx.request_id,
        )
        await read_body(
            response,
            meter,
            self.clock,
            idle_timeout=config.idle_timeout,
            max_json_bytes=self.limits.max_json_response_bytes,
            max_event_bytes=self.limits.max_upstream_event_bytes,
        )
        return None


@functools.lru_cache(maxsize=256)
def upstream_ws_url(base_url: str) -> str:
    """A provider's Responses WebSocket URL (the same for every turn: parsed once)."""
    return ws_url(upstream_url(base_url))


def _stored(body: dict[str, Any]) -> bool:
    """Responses are stored upstream unless the request said ``store: false``."""
    return body.get("store") is not False


def _second_try(
    outcome: Outcome, transcript: Transcript | None, body: dict[str, Any], sent: dict[str, Any], provider: str
) -> tuple[dict[str, Any] | None, str | None] | None:
    """What to send on a fresh socket after the first event said the socket hit its age cap, or
    that the upstream lost a ``previous_response_id`` the transcript can replay; None when the
    outcome stands."""
    if isinstance(outcome, ConnectionLimit):
        return continuity.prepare(transcript, body, provider, NEW_SOCKET)
    if (
        isinstance(outcome, PreviousLost)
        and sent is body
        and transcript is not None
        and transcript.knows(body["previous_response_id"])
    ):
        return continuity.replay(transcript, body)
    return None


def _send_events(sink: ResponseSink, events: list[str | None]) -> None:
    """A response the gateway makes itself: a short event stream."""
    sink.sse_started(200, {"content-type": "text/event-stream"})
    for event in events:
        if event is not None:
            sink.sse_event(event)
