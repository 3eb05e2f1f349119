"""The responses pipeline: auth, provider selection, the attempt loop with failover.

One code path serves plain HTTP ``POST /v1/responses`` and every WebSocket turn.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from cch.config import LimitsConfig
from cch.handler import errors
from cch.handler.auth import KeyRing
from cch.handler.outbound import upstream_headers, upstream_url
from cch.handler.routing import Provider, ProviderRouter
from cch.jsoncodec import dumps_bytes
from cch.turn import RequestContext, ResponseSink
from cch.upstream.eligibility import evaluate
from cch.upstream.http import HttpUpstream, collect_body, read_body
from cch.upstream.pool import UpstreamWSPool, WSFailure
from cch.upstream.unsupported import UnsupportedCache
from cch.upstream.ws import upgrade_headers, ws_url

log = Logger()

JSON = "application/json"


def _retryable(status: int) -> bool:
    """Statuses that say "this provider, not this request": try the next provider."""
    return status == 429 or status >= 500


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
    ) -> None:
        self.keys = keys
        self.router = router
        self.upstream = upstream
        self.clock = clock
        self.limits = limits
        self.ws_pool = ws_pool
        self.unsupported = unsupported or UnsupportedCache(clock)
        self.ws_enabled = ws_enabled
        self.active = 0  # requests in progress (leak checks, drain, metrics)
        self._idle_waiters: list[Deferred[None]] = []
        self.ws_stats: Counter[str] = Counter()  # attempts, connected, reused, fallback:<reason>

    def handle(self, ctx: RequestContext, body: dict[str, Any], sink: ResponseSink) -> Deferred[None]:
        """Fires when the whole response went to ``sink``; cancel it to abort upstream."""
        self.active += 1
        d = Deferred.fromCoroutine(self._handle(ctx, body, sink))
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
        self.active -= 1
        if self.active == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
        return result

    def wait_idle(self) -> Deferred[None]:
        """Fires when no request is in progress (immediately if none is)."""
        d: Deferred[None] = Deferred()
        if self.active == 0:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    async def _handle(self, ctx: RequestContext, body: dict[str, Any], sink: ResponseSink) -> None:
        allowed, key = self.keys.authenticate(ctx.headers)
        if not allowed:
            sink.json_body(*errors.unauthorized(), JSON)
            return
        ctx.key_name = key.name if key else None
        model = body.get("model") if isinstance(body.get("model"), str) else None
        stream = body.get("stream") is True
        candidates = self.router.candidates(model)
        if not candidates:
            sink.json_body(*errors.no_provider(model), JSON)
            return
        payload = dumps_bytes(body)
        last: tuple[int, bytes, str] | None = None
        for attempt, provider in enumerate(candidates, start=1):
            if await self._websocket_attempt(ctx, provider, body, sink, attempt):
                return
            outcome = await self._attempt(ctx, provider, payload, stream, sink, attempt)
            if outcome is None:
                return
            last = outcome
        assert last is not None
        sink.json_body(*last)

    async def _websocket_attempt(
        self, ctx: RequestContext, provider: Provider, body: dict[str, Any], sink: ResponseSink, attempt: int
    ) -> bool:
        """Try the provider's Responses WebSocket; False means "use HTTP for this attempt".

        Failures before the first upstream event fall back to HTTP on the same provider and
        never count against its breaker (reference §5).
        """
        pool = self.ws_pool
        if pool is None:
            return False
        verdict = evaluate(ctx, provider, enabled=self.ws_enabled, unsupported=self.unsupported)
        if not verdict.eligible:
            if verdict.downgrade_reason is not None:
                self.ws_stats["fallback:" + verdict.downgrade_reason] += 1
                log.debug("upstream_ws_downgraded", provider=provider.name, reason=verdict.downgrade_reason, request_id=ctx.request_id)
            return False
        frame = {"type": "response.create"}
        frame.update((k, v) for k, v in body.items() if k not in ("stream", "background", "type"))
        self.ws_stats["attempts"] += 1
        provider.breaker.attempt_started()
        try:
            stream = await pool.request(
                provider=provider.name,
                endpoint=None,
                url=ws_url(upstream_url(provider.base_url)),
                headers=upgrade_headers(upstream_headers(ctx.headers, provider, stream=True)),
                frame=dumps_bytes(frame).decode("utf-8"),
                session_id=ctx.ws_session,
            )
        except WSFailure as failure:
            if failure.cacheable:
                self.unsupported.mark(provider.name, None, failure.reason)
            self.ws_stats["fallback:" + failure.reason] += 1
            log.info(
                "upstream_ws_fallback",
                provider=provider.name,
                reason=failure.reason,
                cacheable=failure.cacheable,
                message=failure.message,
                request_id=ctx.request_id,
            )
            provider.breaker.attempt_abandoned()
            return False
        except CancelledError:
            provider.breaker.attempt_abandoned()
            raise
        except Exception:
            # Reference §5 step 7: whatever went wrong, HTTP on the same provider still may work.
            log.failure("upstream_ws_attempt_threw", level=LogLevel.warn, provider=provider.name)
            self.ws_stats["fallback:exception"] += 1
            provider.breaker.attempt_abandoned()
            return False
        provider.breaker.record_success()
        self.ws_stats["connected"] += 1
        if stream.reused:
            self.ws_stats["reused"] += 1
        log.info(
            "upstream_attempt_started",
            provider=provider.name,
            attempt=attempt,
            transport="websocket",
            reused=stream.reused,
            request_id=ctx.request_id,
        )
        await stream.deliver(sink, provider.config.idle_timeout)
        return True

    async def _attempt(
        self,
        ctx: RequestContext,
        provider: Provider,
        payload: bytes,
        stream: bool,
        sink: ResponseSink,
        attempt: int,
    ) -> tuple[int, bytes, str] | None:
        """Try one provider. None when the response went to the sink; otherwise the error to
        report if no later provider does better."""
        config = provider.config
        breaker = provider.breaker
        breaker.attempt_started()
        try:
            response = await self.upstream.post(
                upstream_url(provider.base_url),
                upstream_headers(ctx.headers, provider, stream=stream),
                payload,
                connect_timeout=config.connect_timeout,
                first_byte_timeout=config.first_byte_timeout,
            )
        except CancelledError:
            breaker.attempt_abandoned()
            raise
        except Exception as exc:
            breaker.record_failure()
            log.warn(
                "upstream_attempt_failed",
                provider=provider.name,
                attempt=attempt,
                error=str(exc) or type(exc).__name__,
                request_id=ctx.request_id,
            )
            status, body = errors.bad_gateway(f"Upstream provider '{provider.name}' is unreachable.")
            return status, body, JSON
        if _retryable(response.code):
            breaker.record_failure()
            log.warn(
                "upstream_attempt_failed",
                provider=provider.name,
                attempt=attempt,
                status=response.code,
                request_id=ctx.request_id,
            )
            content_type = (response.headers.getRawHeaders("content-type") or [JSON])[0]
            body = await collect_body(response, self.clock, idle_timeout=config.idle_timeout)
            return response.code, body, content_type
        breaker.record_success()
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
            sink,
            self.clock,
            idle_timeout=config.idle_timeout,
            max_json_bytes=self.limits.max_json_response_bytes,
        )
        return None
