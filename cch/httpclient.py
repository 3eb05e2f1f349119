"""Outbound HTTP for the gateway: :mod:`cch.http11` connections kept per origin.

A gateway must pass traffic through as it is: no redirects followed (a provider's 3xx reaches
the client as it is), no cookies kept between unrelated clients, no ``accept-encoding: gzip``
added to what the client asked for. A convenience client (treq) adds all three, plus URL
parsing with IDNA and a cooperator round trip before a request body is written, on every turn;
Twisted's Agent, under it, reads each response line by line and its body a chunk at a time.
Here a request is one write and a response one pass per read (:mod:`cch.http11`); connections
are kept alive per origin (at most :attr:`HttpClient.max_idle` idle, each closed after
:attr:`HttpClient.idle_timeout` seconds unused); endpoints (TCP, or TLS by policy) are built
once per origin; and the connect timeout runs on the injected clock.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from hyperlink import URL
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import TCPTimedOutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from cch.http11 import HTTP11Connection, request_head


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, handed to the connection at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ConnectTimeout(TCPTimedOutError):
    """No connection within the provider's connect timeout (counted on the injected clock)."""


@implementer(IStreamClientEndpoint)
class _DeadlineEndpoint:
    """Gives up connecting after ``timeout`` seconds of ``clock`` (tests drive it with a Clock)."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        def expired(_: Any, timeout: float) -> Failure:
            return Failure(ConnectTimeout(string=f"no connection within {timeout:g}s"))

        return self.endpoint.connect(factory).addTimeout(
            self.timeout, self.clock, onTimeoutCancel=expired
        )


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """What Twisted's Agent builds for a URI: TCP, or TLS by policy."""

    def __init__(
        self,
        reactor: Any,
        tls: IPolicyForHTTPS,
        connect_timeout: float | None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.tls = tls
        self.connect_timeout = connect_timeout
        # Built once per origin (IDNA host handling, TLS options cost more than a request).
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= 256:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._build(uri)
        return endpoint

    def _build(self, uri: URI) -> IStreamClientEndpoint:
        options: dict[str, Any] = {}
        if self.connect_timeout is not None:
            # The deadline that counts runs on the injected clock (below); the reactor's own
            # connect timeout is only a backstop behind it.
            options["timeout"] = max(30.0, self.connect_timeout + 1)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, uri.host.decode("ascii"), uri.port, **options
        )
        if self.connect_timeout is not None:
            endpoint = _DeadlineEndpoint(endpoint, self.clock, self.connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return endpoint


class _OriginPool(Factory):
    """The connections kept alive to one origin: the most recently used is taken first."""

    noisy = False

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        max_idle: int,
        idle_timeout: float,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: list[HTTP11Connection] = []
        self._timers: dict[HTTP11Connection, IDelayedCall] = {}
        self._closing: dict[HTTP11Connection, Deferred[None]] = {}
        self.closed = False  # after close(): no connection is kept again

    def buildProtocol(self, addr: Any) -> HTTP11Connection:
        return HTTP11Connection(self._idled, self._lost)

    def connection(self) -> HTTP11Connection | Deferred[HTTP11Connection]:
        """An idle connection at once, else a Deferred new one."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            self._timers.pop(connection).cancel()
            if connection.reusable:
                return connection
        return self.endpoint.connect(self)

    def _idled(self, connection: HTTP11Connection) -> None:
        if self.closed or len(self._idle) >= self.max_idle:
            connection.close()
            return
        self._idle.append(connection)
        self._timers[connection] = self.clock.callLater(self.idle_timeout, self._expire, connection)

    def _expire(self, connection: HTTP11Connection) -> None:
        del self._timers[connection]
        self._idle.remove(connection)
        connection.close()

    def _lost(self, connection: HTTP11Connection) -> None:
        timer = self._timers.pop(connection, None)
        if timer is not None:
            timer.cancel()
            self._idle.remove(connection)
        closing = self._closing.pop(connection, None)
        if closing is not None:
            closing.callback(None)

    def close(self) -> Deferred[None]:
        """Close the idle connections; fires once they are gone. A busy one is closed when its
        response is over (a stopped service's turns are cancelled, which cuts theirs)."""
        self.closed = True
        waits = []
        while self._idle:
            connection = self._idle.pop()
            self._timers.pop(connection).cancel()
            wait = self._closing[connection] = Deferred()
            waits.append(wait)
            connection.close()
        return _all(waits)


@dataclass(frozen=True)
class _Target:
    origin: tuple[bytes, bytes, int]
    uri: URI
    path: bytes  # the request target (origin form)
    host: bytes  # the Host header


class HttpClient:
    """POSTs over connections kept alive per origin. :meth:`close` closes the idle ones."""

    max_idle = 16  # idle connections kept per origin
    idle_timeout = 240.0  # seconds an unused connection is kept

    def __init__(
        self,
        reactor: Any,
        *,
        tls: IPolicyForHTTPS | None = None,
        connect_timeout: float | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        policy = tls if tls is not None else BrowserLikePolicyForHTTPS()
        self._reactor = reactor  # kept connections expire on it, as Twisted's pool's do
        self._endpoints = _Endpoints(reactor, policy, connect_timeout, clock)
        self._pools: dict[tuple[bytes, bytes, int], _OriginPool] = {}
        self._closed = False

    def post(
        self, url: str, headers: dict[str, str], body: bytes | IBodyProducer
    ) -> Deferred[IResponse]:
        """Fires with the response once its head arrived; its body is read by the caller.
        ``body`` is bytes, or an ``IBodyProducer`` of known length (a :class:`BytesBody`)."""
        if self._closed:
            return fail(ConnectionRefusedError("the HTTP client was closed"))
        try:
            target = _target(url)
            length = len(body) if isinstance(body, bytes) else body.length
            if not isinstance(length, int):
                raise ValueError("a request body's length must be known")
            head = request_head(b"POST", target.path, target.host, headers, length)
            pool = self._pools.get(target.origin)
            if pool is None:
                endpoint = self._endpoints.endpointForURI(target.uri)
                pool = self._pools[target.origin] = _OriginPool(
                    endpoint, self._reactor, self.max_idle, self.idle_timeout
                )
            connection = pool.connection()
            if isinstance(connection, HTTP11Connection):
                return connection.request(head, body)
        except Exception:
            return fail()
        return connection.addCallback(HTTP11Connection.request, head, body)

    def close(self) -> Deferred[None]:
        """Close every idle connection (fires once they are gone); nothing is sent after."""
        self._closed = True
        return _all([pool.close() for pool in self._pools.values()])


def _all(waits: list[Deferred[None]]) -> Deferred[None]:
    return gatherResults(waits).addCallback(lambda _: None)


def error_text(exc: BaseException) -> str:
    """What went wrong, for an error message: Twisted's client wraps the cause of a failed
    request or response (``ResponseFailed``, ``RequestTransmissionFailed``, ...) in a list of
    ``reasons``; the first of them says it."""
    inner = getattr(exc, "reasons", None)
    if inner:
        exc = inner[0].value
    return str(exc) or type(exc).__name__


@functools.lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    """Where ``url`` goes (IDNA host, percent-encoded path), as the request needs it."""
    raw = URL.from_text(url).to_uri().to_text().encode("ascii")
    if any(byte <= 0x20 or byte == 0x7F for byte in raw):
        raise ValueError(f"not a valid URL (control characters or spaces): {url!r}")
    uri = URI.fromBytes(raw)
    if uri.scheme not in (b"http", b"https"):
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
    host = uri.host  # an IPv6 literal keeps its brackets
    if (uri.scheme, uri.port) not in ((b"http", 80), (b"https", 443)):
        host = b"%b:%d" % (host, uri.port)
    return _Target((uri.scheme, uri.host, uri.port), uri, uri.originForm, host)
