"""Outbound HTTP for the gateway: a plain Twisted ``Agent``, nothing layered on top.

A gateway must pass traffic through as it is: no redirects followed (a provider's 3xx reaches
the client as it is), no cookies kept between unrelated clients, no ``accept-encoding: gzip``
added to what the client asked for. A convenience client (treq) adds all three, plus URL
parsing with IDNA and a cooperator round trip before a request body is written, on every turn.
This module keeps the Agent and its persistent pool, and adds three things: each read on a
connection is handled inside a write batch (:mod:`cch.writes`), so the events of one read
leave for each client in one write; endpoints are built once per origin; and the connect
timeout runs on the injected clock.
"""

from __future__ import annotations

import functools
from typing import Any

from hyperlink import URL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import TCPTimedOutError
from twisted.internet.interfaces import (
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import directlyProvides, implementer, providedBy

from cch.writes import write_batch

log = Logger()


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


class _BatchedReads(Factory):
    """Builds the wrapped factory's protocol behind a :class:`_BatchedReader`."""

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self.wrapped = wrapped

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        proto = self.wrapped.buildProtocol(addr)
        return None if proto is None else _BatchedReader(proto)


MAX_RESPONSE_HEAD_BYTES = 256 * 1024  # real response heads are a few KiB


class _BatchedReader(Protocol):
    """Hands each chunk read to ``wrapped`` inside a write batch, and caps response heads.

    Twisted's HTTP client bounds each header line but not how many there are, so an upstream
    answering with endless headers would grow memory until the first-byte timeout
    (docs/security.md): from each request written until its response's first blank line, at
    most :data:`MAX_RESPONSE_HEAD_BYTES` are read, then the connection is cut. ``wrapped``
    writes through this reader (a call per write: one or two per request); everything else of
    the transport is the real one's, and :class:`_BatchedEndpoint` connects to ``wrapped``
    itself (the pool keeps the connection it would have kept without this).
    """

    limit = MAX_RESPONSE_HEAD_BYTES

    def __init__(self, wrapped: IProtocol) -> None:
        self.wrapped = wrapped
        self._read = wrapped.dataReceived  # looked up once, not per read
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._cut = False

    def logPrefix(self) -> str:
        wrapped = self.wrapped
        if ILoggingContext.providedBy(wrapped):
            return wrapped.logPrefix()  # type: ignore[no-any-return]
        return wrapped.__class__.__name__

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        directlyProvides(self, providedBy(transport))  # IPushProducer, ITCPTransport, ...
        self.wrapped.makeConnection(self)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class lacks: the rest of the transport's interface.
        transport = self.__dict__.get("transport")
        if transport is None:
            raise AttributeError(name)
        return getattr(transport, name)

    # -- writes (the transport's, for ``wrapped``) -----------------------------------------

    def write(self, data: bytes) -> None:
        if not self._in_head:
            self._in_head, self._head_bytes, self._tail = True, 0, b""
        self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    # -- reads ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._cut:
            return
        if self._in_head:
            window = self._tail + data
            if b"\r\n\r\n" in window or b"\n\n" in window:
                self._in_head = False  # the head is complete; a body is not counted
            else:
                self._head_bytes += len(data)
                if self._head_bytes > self.limit:
                    self._cut = True
                    log.warn("upstream_response_head_too_large", limit=self.limit)
                    self.transport.abortConnection()
                    return
                self._tail = window[-3:]
        with write_batch:
            self._read(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.wrapped.connectionLost(reason)


class ConnectTimeout(TCPTimedOutError):
    """No connection within the provider's connect timeout (counted on the injected clock)."""


@implementer(IStreamClientEndpoint)
class _DeadlineEndpoint:
    """Gives up connecting after ``timeout`` seconds of ``clock`` (tests drive it with a Clock)."""

    def __init__(self, endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        def expired(_: Any, timeout: float) -> Failure:
            return Failure(ConnectTimeout(string=f"no connection within {timeout:g}s"))

        return self.endpoint.connect(factory).addTimeout(self.timeout, self.clock, onTimeoutCancel=expired)


@implementer(IStreamClientEndpoint)
class _BatchedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        # Like Twisted's own wrapping endpoints (wrapClientTLS): fires with the protocol
        # ``factory`` built, not the wrapper around it.
        return self.endpoint.connect(_BatchedReads(factory)).addCallback(_unwrap)


def _unwrap(reader: _BatchedReader) -> IProtocol:
    return reader.wrapped


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """What Twisted's Agent builds for a URI (TCP, or TLS by policy), with batched reads."""

    def __init__(
        self, reactor: Any, tls: IPolicyForHTTPS, connect_timeout: float | None, clock: IReactorTime | None = None
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.tls = tls
        self.connect_timeout = connect_timeout
        # The Agent asks for an endpoint on every request, pooled connection or not; building
        # one (IDNA host handling, TLS options) costs more than the rest of the request.
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
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, **options)
        if self.connect_timeout is not None:
            endpoint = _DeadlineEndpoint(endpoint, self.clock, self.connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return _BatchedEndpoint(endpoint)


class HttpClient:
    """POSTs over one persistent connection pool."""

    def __init__(
        self,
        reactor: Any,
        pool: HTTPConnectionPool,
        *,
        tls: IPolicyForHTTPS | None = None,
        connect_timeout: float | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        policy = tls if tls is not None else BrowserLikePolicyForHTTPS()
        endpoints = _Endpoints(reactor, policy, connect_timeout, clock)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    def post(self, url: str, headers: dict[str, str], body: IBodyProducer) -> Deferred[IResponse]:
        """Fires with the response once its headers arrived; its body is read by the caller."""
        return self.agent.request(
            b"POST", request_uri(url), Headers({name: [value] for name, value in headers.items()}), body
        )


def error_text(exc: BaseException) -> str:
    """What went wrong, for an error message: Twisted's client wraps the cause of a failed
    request or response (``ResponseFailed``, ``RequestTransmissionFailed``, ...) in a list of
    ``reasons``; the first of them says it."""
    inner = getattr(exc, "reasons", None)
    if inner:
        exc = inner[0].value
    return str(exc) or type(exc).__name__


@functools.lru_cache(maxsize=256)
def request_uri(url: str) -> bytes:
    """``url`` as the ASCII bytes the Agent takes (IDNA host, percent-encoded path)."""
    return URL.from_text(url).to_uri().to_text().encode("ascii")
