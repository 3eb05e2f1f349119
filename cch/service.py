"""``makeService(config)``: the gateway as a Twisted ``MultiService`` others can embed."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from cch.config import Config
from cch.edge.factory import EdgeFactory
from cch.handler.auth import KeyRing
from cch.handler.pipeline import ResponsesHandler
from cch.handler.routing import ProviderRouter
from cch.tunnel import HttpTunnel, InProcessTunnel
from cch.upstream.http import HttpUpstream
from cch.upstream.pool import UpstreamWSPool
from cch.upstream.unsupported import UnsupportedCache
from cch.web import Gateway, build_root

log = Logger()


class _Listener(Service):
    """Listens on the configured endpoint and remembers the port (port 0 works in tests)."""

    def __init__(self, reactor: Any, description: str, site: Site) -> None:
        self.reactor = reactor
        self.description = description
        self.site = site
        self.port: IListeningPort | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.reactor, self.description).listen(self.site)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _failed(self, failure: Any) -> None:
        log.failure("server_listen_failed", failure, endpoint=self.description)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def when_listening(self) -> Deferred[IListeningPort]:
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()  # type: ignore[no-any-return]
        return None


class GatewayService(MultiService):
    """The whole gateway: web site + edge + pipeline on one listening port."""

    def __init__(self, config: Config, reactor: Any, clock: Any = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        clock = reactor if clock is None else clock
        self.clock = clock
        self.keys = KeyRing(config.keys)
        self.router = ProviderRouter(config.providers, config.breaker, clock)
        self.upstream = HttpUpstream(reactor, clock)
        ws_config = config.upstream_websocket
        self.ws_pool = UpstreamWSPool(reactor, clock, ws_config)
        self.unsupported = UnsupportedCache(clock, ws_config.unsupported_ttl)
        self.handler = ResponsesHandler(
            keys=self.keys,
            router=self.router,
            upstream=self.upstream,
            clock=clock,
            limits=config.limits,
            ws_pool=self.ws_pool,
            unsupported=self.unsupported,
            ws_enabled=ws_config.enabled,
        )
        if config.tunnel.mode == "http":
            self.tunnel: InProcessTunnel | HttpTunnel = HttpTunnel(
                reactor, config.tunnel.url or "", config.tunnel.secret
            )
        else:
            self.tunnel = InProcessTunnel(self.handler)
        self.edge_factory = EdgeFactory(
            tunnel=self.tunnel, limits=config.limits, clock=clock, reactor=reactor
        )
        self.edge_factory.session_closed_hooks.append(self.ws_pool.cleanup)
        self.gateway = Gateway(
            keys=self.keys,
            router=self.router,
            handler=self.handler,
            edge_factory=self.edge_factory,
            limits=config.limits,
            secret=config.tunnel.secret,
            websocket_enabled=config.server.websocket,
        )
        self.site = Site(build_root(self.gateway))
        self.site.displayTracebacks = False
        self.listener = _Listener(reactor, config.server.listen, self.site)
        self.listener.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.gateway.draining = False
        self.listener.when_listening().addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> None:
        address = port.getHost()
        host = getattr(address, "host", None)
        if isinstance(self.tunnel, HttpTunnel) and not self.tunnel.url:
            self.tunnel.url = f"http://{_connect_host(host)}:{address.port}/v1/responses"
        log.info(
            "server_listening",
            hostname=host,
            port=getattr(address, "port", None),
            tunnel=self.config.tunnel.mode,
            wsEnabled=self.config.server.websocket,
        )

    def when_listening(self) -> Deferred[IListeningPort]:
        return self.listener.when_listening()

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the listener (after start)."""
        assert self.listener.port is not None, "not listening yet"
        address = self.listener.port.getHost()
        return f"http://{_connect_host(address.host)}:{address.port}"

    def stopService(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.gateway.draining = True
        self.edge_factory.go_away(only_idle=False)
        await self.edge_factory.wait_empty()
        await super().stopService()
        closing = [self.upstream.close(), self.ws_pool.close_all()]
        if isinstance(self.tunnel, HttpTunnel):
            closing.append(self.tunnel.close())
        await DeferredList(closing, consumeErrors=True)


def _connect_host(host: str | None) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    if host in (None, "", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "::0"):
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def makeService(config: Config, reactor: Any = None, clock: Any = None) -> GatewayService:
    """Build the gateway service from a loaded config (see :func:`cch.config.load_config`).

    ``clock`` (an ``IReactorTime``, default the reactor) drives every gateway timer: breakers,
    timeouts, send deadlines; tests pass a ``task.Clock``.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return GatewayService(config, reactor, clock)
