"""``makeService(config)``: the gateway as a Twisted ``MultiService`` others can embed."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from cch.admin import AdminUsageResource
from cch.cluster.service import ClusterService
from cch.config import Config, ContinuityConfig, TunnelConfig, is_loopback_endpoint
from cch.doors import AuthFailureBudget, Doors
from cch.drain import Drain
from cch.edge.factory import EdgeFactory
from cch.handler.auth import KeyRing
from cch.handler.pipeline import ResponsesHandler
from cch.handler.routing import ProviderRouter
from cch.httpchannel import ConnectionSlots, GuardedSite
from cch.keylimits import KeyLimiter, utc_month
from cch.logs import access_log_formatter, mask_url
from cch.metrics import Metrics
from cch.tracing import TracingService
from cch.transcript import TranscriptStore
from cch.tunnel import HttpTunnel, InProcessTunnel
from cch.upstream.http import HttpUpstream
from cch.upstream.pool import UpstreamWSPool
from cch.upstream.unsupported import UnsupportedCache
from cch.usage.ledger import UsageLedger, open_ledger
from cch.usage.prices import PriceSheet
from cch.waiters import Waiters
from cch.web import (
    HttpTurns,
    MetricsResource,
    ModelsResource,
    ReadyResource,
    ResponsesResource,
    build_metrics_root,
    build_root,
)

log = Logger()

SEED_RETRY = 30.0  # seconds between tries to read the limits' day and month from the ledger


class Listening:
    """An endpoint that keeps the port it listened on (port 0 works in tests) and says so."""

    def __init__(self, endpoint: Any, description: str) -> None:
        self.endpoint = endpoint
        self.description = description
        self.port: IListeningPort | None = None
        self.failure: Failure | None = None
        self._waiting: Waiters[IListeningPort] = Waiters()

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        self.failure = None
        d = self.endpoint.listen(factory)
        d.addCallbacks(self._listening, self._failed)
        return d

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self._waiting.fire(port)
        return port

    def _failed(self, failure: Failure) -> Failure:
        log.error("server_listen_failed", endpoint=self.description, error=str(failure.value))
        self.failure = failure
        self._waiting.fail(failure)
        return failure

    def when_listening(self) -> Deferred[IListeningPort]:
        if self.port is not None:
            return succeed(self.port)
        if self.failure is not None:
            return fail(self.failure)
        return self._waiting.wait()


def listener(reactor: Any, description: str, factory: Any) -> tuple[StreamServerEndpointService, Listening]:
    """Twisted's own service for any server endpoint string (``tcp:``, ``ssl:``, ``unix:``,
    ``systemd:``, ...), and what it listens on. It listens in ``privilegedStartService``, so
    ``twistd --uid`` binds a privileged port before dropping root, and a port in use stops
    start-up there (twistd reports it instead of running a gateway that listens nowhere)."""
    service = strports.service(description, factory, reactor=reactor)
    listening = Listening(service.endpoint, description)
    service.endpoint = listening
    return service, listening


class GatewayService(MultiService):
    """The whole gateway: web site + edge + pipeline on one listening port.

    Its children, started in this order and stopped together once the drain is over: the
    tracer provider (when tracing is on), the usage ledger, the cluster (when configured), the
    upstream WebSocket pool, the HTTP upstream, the HTTP tunnel (in that mode), the listener
    and the metrics listener (when configured). Each closes what it holds when stopped.
    """

    def __init__(
        self, config: Config, reactor: Any, clock: Any = None, run_dir: str | None = None, span_processor: Any = None
    ) -> None:
        super().__init__()
        clock = reactor if clock is None else clock
        self.config, self.reactor, self.clock = config, reactor, clock
        # One span per turn when [tracing] is on (docs/tracing.md); off, OpenTelemetry is not loaded.
        self.tracing = (
            TracingService(reactor, clock, replica=config.server.replica, processor=span_processor)
            if config.tracing.enabled
            else None
        )
        self.drain = Drain()
        self.metrics = Metrics()
        self.keys = KeyRing(config.keys)
        self.prices = PriceSheet(config.prices)
        self.ledger = open_ledger(config.usage, run_dir or os.getcwd(), reactor, clock)
        # Several replicas share their keys' limits through Redis ([cluster]); else in memory.
        self.cluster = ClusterService(config.cluster, reactor, clock) if config.cluster.enabled else None
        self.limiter = KeyLimiter(clock, self.prices, self.cluster.store if self.cluster else None)
        self.seeded: Deferred[None] = succeed(None)
        self.router = ProviderRouter(config.providers, config.breaker, clock)
        self.ws_pool = UpstreamWSPool(reactor, clock, config.upstream_websocket)
        self.upstream = HttpUpstream(reactor, clock)
        self.unsupported = UnsupportedCache(clock, config.upstream_websocket.unsupported_ttl)
        if self.cluster is not None:
            # Owners, unsupported endpoints and breakers are known to every replica.
            self.ledger.share_owners(self.cluster.owners)
            self.cluster.share_marks(self.unsupported, [p.breaker for p in self.router.providers])
        self.transcripts = transcript_store(config.continuity)
        self.handler = ResponsesHandler(
            keys=self.keys,
            router=self.router,
            upstream=self.upstream,
            clock=clock,
            limits=config.limits,
            ws_pool=self.ws_pool,
            unsupported=self.unsupported,
            ws_enabled=config.upstream_websocket.enabled,
            transcripts=self.transcripts,
            ledger=self.ledger,
            prices=self.prices,
            limiter=self.limiter,
            drain=self.drain,
            replica=config.server.replica,
            tracer=None if self.tracing is None else self.tracing.tracer,
        )
        self.tunnel = build_tunnel(config.tunnel, reactor, clock, self.handler, self._internal_url)
        # Every client connection counts against server.max_connections, WebSockets included.
        self.connections = ConnectionSlots(config.server.max_connections)
        self.edge_factory = EdgeFactory(
            tunnel=self.tunnel,
            limits=config.limits,
            clock=clock,
            reactor=reactor,
            stats=self.metrics,
            slots=self.connections,
            session_closed=self._session_closed(),
        )
        self.http_turns = HttpTurns(
            self.handler, drain=self.drain, limits=config.limits, secret=config.tunnel.secret, clock=clock, metrics=self.metrics
        )
        for component in (
            self.edge_factory,
            self.handler,
            self.ws_pool,
            self.router,
            self.transcripts,
            self.ledger,
            self.limiter,
            self.cluster,
        ):
            if component is not None:
                self.metrics.export(component)  # each reports its own figures
        doors = doors_maker(config, self.keys, clock)
        self.site = self._site(self._root(), doors(config.server.admin_token), self.connections)
        # Children, in start order; they stop once the drain is over (_stop): the ledger writes
        # the last turns' rows as it stops. Tracing is asked to stop last (children stop in
        # reverse order), after the others have cut what was still open.
        if self.tracing is not None:
            self._adopt("tracing", self.tracing)
        self._adopt("usage-ledger", self.ledger)
        if self.cluster is not None:
            # Leases are renewed while the drain lets turns finish; they are given back at stop.
            self._adopt("cluster", self.cluster)
        self._adopt("upstream-ws-pool", self.ws_pool)
        self._adopt("upstream-http", self.upstream)
        if isinstance(self.tunnel, HttpTunnel):
            self._adopt("tunnel", self.tunnel)
        self.listener = self._listen("listener", config.server.listen, self.site)
        self.metrics_listener = self._metrics_listener(doors)

    def _readiness(self) -> dict[str, str]:
        """What /readyz reports beside its status: the shared state's stores."""
        return {
            "redis": "off" if self.cluster is None else ("up" if self.cluster.ready else "down"),
            "database": self.ledger.database_state,
        }

    def _session_closed(self) -> list[Callable[[str], None]]:
        """What a closing client connection releases: its upstream socket, its transcript."""
        release = [self.ws_pool.cleanup]
        if self.transcripts is not None:
            release.append(self.transcripts.drop)
        return release

    def _root(self) -> Resource:
        config, keys, drain = self.config, self.keys, self.drain
        responses = ResponsesResource(
            self.edge_factory,
            self.http_turns,
            keys=keys,
            drain=drain,
            websocket_enabled=config.server.websocket,
            limiter=self.limiter,
        )
        return build_root(
            responses,
            models=ModelsResource(keys, self.router),
            ready=ReadyResource(drain, self._readiness),
            metrics=MetricsResource(
                self.metrics, admin_token=config.server.admin_token, open_without_token=not keys.required
            ),
            usage=AdminUsageResource(self.ledger, config.server.admin_token) if config.usage.admin_report else None,
        )

    def _metrics_listener(self, doors: Callable[[str | None], Doors]) -> Listening | None:
        """The separate ``server.metrics_listen`` listener, if configured: beyond loopback it
        needs the admin token (config refuses it without one); on loopback it is open."""
        endpoint = self.config.server.metrics_listen
        if not endpoint:
            return None
        loopback = is_loopback_endpoint(endpoint)
        token = None if loopback else self.config.server.admin_token
        resource = MetricsResource(self.metrics, admin_token=token, open_without_token=loopback)
        site = self._site(build_metrics_root(resource), doors(token))
        return self._listen("metrics-listener", endpoint, site)

    def _site(self, root: Resource, doors: Doors, slots: ConnectionSlots | None = None) -> GuardedSite:
        site = GuardedSite(
            root,
            doors=doors,
            clock=self.clock,
            head_timeout=self.config.limits.handshake_timeout,
            slots=slots,
            logFormatter=access_log_formatter,  # query values masked (?api_key=***)
        )
        site.displayTracebacks = False
        site.on_refused = self.metrics.refused
        return site

    def _listen(self, name: str, description: str, site: GuardedSite) -> Listening:
        service, listening = listener(self.reactor, description, site)
        self._adopt(name, service)
        return listening

    def _adopt(self, name: str, child: IService) -> None:
        child.setName(name)
        child.setServiceParent(self)

    def _internal_url(self) -> str:
        """The HTTP tunnel's URL when ``tunnel.url`` is not set: this gateway's own listener."""
        return self.base_url + "/v1/responses"

    def startService(self) -> None:
        self.drain.reset()
        super().startService()
        _check_fd_budget(self.config.server.max_connections)
        self.listener.when_listening().addCallback(self._listening)
        self.seeded = Deferred.fromCoroutine(self._seed_limits())
        if self.cluster is not None:
            self.cluster.redis.on_connect(self._reseed)
            if not self.config.usage.database.startswith("postgresql"):
                # Each replica would keep its own ledger: past Redis's day, only the replica
                # that made a response id knows its owner, and usage reports see one replica.
                log.warn(
                    "cluster_ledger_not_shared",
                    database=self.config.usage.database.split("://")[0],
                    hint="with several replicas set usage.database to a PostgreSQL URL (docs/scaling.md)",
                )

    def _reseed(self) -> None:
        """Redis (re)connected, and may have restarted empty: seed each key's day and month
        from the ledger again (a seeding under way reads the ledger afresh anyway)."""
        if self.seeded.called:
            self.seeded = Deferred.fromCoroutine(self._seed_limits())

    async def _seed_limits(self) -> None:
        """Start each key's day and month from the ledger, so a restart does not hand out a
        second daily token allowance or monthly budget (docs/usage.md#limits). While the
        database cannot say, try again every ``SEED_RETRY`` seconds until it can (or the
        service stops: the wait is cancelled)."""
        if not isinstance(self.ledger, UsageLedger):
            return
        waiting = [key for key in self.config.keys if key.limits.tokens_per_day or key.limits.budget_per_month]
        while waiting:
            now = self.clock.seconds()
            day = now - now % 86400
            month = utc_month(now)[0]
            for key in list(waiting):
                try:
                    tokens_today, _ = await self.ledger.spent(key.name, day)
                    _, spent = await self.ledger.spent(key.name, month)
                except CancelledError:
                    raise
                except Exception as exc:
                    log.warn("limits_seed_failed", key=key.name, error=str(exc), retryIn=SEED_RETRY)
                    continue
                await self.limiter.seed(key.name, tokens_today, spent)
                waiting.remove(key)
            if waiting:
                await deferLater(self.clock, SEED_RETRY, lambda: None)

    def _listening(self, port: IListeningPort) -> None:
        address = port.getHost()
        log.info(
            "server_listening",
            hostname=getattr(address, "host", None),
            port=getattr(address, "port", None),
            tunnel=self.config.tunnel.mode,
            internalTunnelUrl=mask_url(self.tunnel.url) if isinstance(self.tunnel, HttpTunnel) else None,
            wsEnabled=self.config.server.websocket,
        )

    def when_listening(self) -> Deferred[IListeningPort]:
        return self.listener.when_listening()

    async def _quiet(self) -> None:
        """Until no client connection and no HTTP request is left."""
        await self.edge_factory.wait_empty()
        await self.handler.wait_idle()

    async def _within(self, work: Any, seconds: float) -> bool:
        """Wait for ``work`` (a coroutine or Deferred) at most ``seconds`` on the clock."""
        d = Deferred.fromCoroutine(work) if not isinstance(work, Deferred) else work
        try:
            await d.addTimeout(seconds, self.clock)
        except DeferredTimeout:
            return False
        return True

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the listener (after start)."""
        assert self.listener.port is not None, "not listening yet"
        address = self.listener.port.getHost()
        return f"http://{_connect_host(address.host)}:{address.port}"

    def stopService(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Graceful drain (docs/operations.md#draining-and-rolling-deploys): readiness 503 and
        no new work; idle clients closed 1001 now; turns in flight may finish until
        ``server.drain_timeout``; then everyone is closed 1001; the children (listeners,
        upstream pool and connections) stop last."""
        if self.cluster is not None:
            self.cluster.redis.forget(self._reseed)
        self.seeded.cancel()
        self.seeded.addErrback(lambda failure: failure.trap(CancelledError))
        self.drain.start()
        deadline = self.config.server.drain_timeout
        log.info("shutdown_received", drainSeconds=deadline, live=len(self.edge_factory.live))
        self.edge_factory.go_away(only_idle=True)
        if not await self._within(self._quiet(), deadline):
            log.warn("shutdown_drain_timeout", live=len(self.edge_factory.live), active=self.handler.active)
            self.edge_factory.go_away(only_idle=False)
            # Plain HTTP turns end too, with a terminal SSE error event (docs/operations.md).
            self.http_turns.cut_short()
            # Close frames get the Autobahn close handshake's time; then connections are cut.
            if not await self._within(self.edge_factory.wait_empty(), 10.0):
                self.edge_factory.abort_all()
                await self.edge_factory.wait_empty()
            # Cancelled turns release their requests as their sockets close.
            await self._within(self.handler.wait_idle(), 10.0)
        await super().stopService()


def transcript_store(kept: ContinuityConfig) -> TranscriptStore | None:
    """Per-connection transcripts, unless continuity is off."""
    if not kept.enabled:
        return None
    return TranscriptStore(kept.max_bytes_per_connection, kept.max_responses_per_connection, kept.max_sessions)


def build_tunnel(
    config: TunnelConfig, reactor: Any, clock: Any, handler: ResponsesHandler, own_url: Callable[[], str]
) -> InProcessTunnel | HttpTunnel:
    """The hop from a WebSocket turn to the handler; the HTTP tunnel posts to ``tunnel.url``
    or, without one, to ``own_url()`` (known once the listener listens)."""
    if config.mode == "http":
        return HttpTunnel(reactor, config.url or own_url, config.secret, clock)
    return InProcessTunnel(handler)


def doors_maker(config: Config, keys: KeyRing, clock: Any) -> Callable[[str | None], Doors]:
    """Doors for each listener, given the token its metrics need; one failed-auth budget for all."""
    limits = config.limits
    budget = AuthFailureBudget(clock, limits.auth_failure_limit, limits.auth_failure_window)

    def doors(metrics_token: str | None) -> Doors:
        return Doors(
            config.server,
            limits,
            keys,
            clock,
            metrics_token=metrics_token,
            budget=budget,
            internal_secret=config.tunnel.secret,
        )

    return doors


def fd_budget(max_connections: int) -> int:
    """Descriptors the gateway may need at ``max_connections`` (docs/security.md): one per
    client connection and one per upstream socket, the connections accepted beyond the limit
    to be answered 503 (cch.httpchannel.ConnectionSlots), and room for pools, logs, listeners."""
    return 2 * max_connections + ConnectionSlots(max_connections).headroom + 256


def _check_fd_budget(max_connections: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = fd_budget(max_connections)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warn(
            "server_fd_budget_low",
            limit=soft,
            wanted=wanted,
            maxConnections=max_connections,
            hint="raise LimitNOFILE / ulimit -n, or lower server.max_connections",
        )


def _connect_host(host: str | None) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    if host in (None, "", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "::0"):
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def makeService(
    config: Config, reactor: Any = None, clock: Any = None, run_dir: str | None = None, span_processor: Any = None
) -> GatewayService:
    """Build the gateway service from a loaded config (see :func:`cch.config.load_config`).

    ``clock`` (an ``IReactorTime``, default the reactor) drives every gateway timer: breakers,
    timeouts, send deadlines; tests pass a ``task.Clock``. ``run_dir`` (default: the current
    directory) is where a relative SQLite ledger and its spill file live. ``span_processor``
    (an OpenTelemetry SDK ``SpanProcessor``) is where the turns' spans go when ``[tracing]`` is
    on, instead of batched OTLP/HTTP exports (docs/tracing.md). Raises
    :class:`cch.usage.store.StoreError` when the ledger's database cannot be used (its driver
    is missing, or its URL is wrong).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return GatewayService(config, reactor, clock, run_dir, span_processor)
