"""The doors: what a request must show in its head before any of its body is read.

Browsers, DNS rebinding and proxies in front of a keyless gateway, unauthenticated bodies and
key guessing are all refused here, on the request line and headers alone (docs/security.md).
This module holds the rules only; :mod:`cch.httpchannel` applies them on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from cch import secret as markers
from cch.addresses import is_loopback_host
from cch.config import LimitsConfig, ServerConfig
from cch.handler import errors
from cch.handler.auth import KeyRing, presented_key
from cch.headers import HEADER_NAME, lower_headers

log = Logger()

# Requests are told apart by their path's segments, percent-decoded as twisted.web routes them
# (so "/%761/models" is "/v1/models" here too). Under "v1" every request needs a client key
# (when keys are configured); "metrics" and "admin" need the admin token where one is required.
_KEYED = "v1"
_ADMIN = frozenset({"metrics", "admin"})
# The one request that carries a body, and every resource served (a body sent elsewhere is
# refused unread: 404 where nothing is served, 413 where no body is taken).
_BODY_PATH = ("v1", "responses")
_SERVED = frozenset({_BODY_PATH, ("v1", "models"), ("healthz",), ("readyz",), ("metrics",), ("admin", "usage")})
# Headers a proxy adds: a keyless gateway refuses requests that carry one (docs/security.md).
_PROXY_HEADERS = (b"forwarded", b"x-real-ip")
_PROXY_PREFIX = b"x-forwarded-"
# What a browser may send cross-origin to an allowed origin's preflight, unless it asks for more.
_CORS_METHODS = b"GET, POST, OPTIONS"
_CORS_MAX_AGE = b"600"
_MAX_TRACKED_ADDRESSES = 100_000  # failed-auth budgets kept at once


@dataclass(frozen=True)
class DoorAnswer:
    """A response given from the request head alone; the connection closes after it."""

    status: int
    reason: str  # a stable word for logs and metrics
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


def refusal(
    status: int, code: str, message: str, kind: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> DoorAnswer:
    return DoorAnswer(status, code, errors.error_body(message, kind, code), tuple(headers))


def host_name(value: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8080`` → ``::1``, ``a.b:80`` → ``a.b``."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


def mask_key(key: str) -> str:
    """What a log may say of a refused key: its first characters and a short fingerprint."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{key[:4]}…({len(key)} chars, sha256 {digest})"


class AuthFailureBudget:
    """Failed key checks per client address: ``limit`` per ``window`` seconds, then refused
    until the window ends, valid key or not (so the answer gives a guesser nothing)."""

    def __init__(self, clock: IReactorTime, limit: int, window: float) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        # address -> [failures, window end]; oldest window first, so expired ones lead.
        self._windows: OrderedDict[str, list[float]] = OrderedDict()

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        entry = self._windows.get(address)
        if entry is None:
            return 0.0
        left = entry[1] - self.clock.seconds()
        if left <= 0:
            del self._windows[address]
            return 0.0
        return left if entry[0] >= self.limit else 0.0

    def failed(self, address: str) -> None:
        now = self.clock.seconds()
        self._expire(now)
        entry = self._windows.get(address)
        if entry is None or entry[1] <= now:
            self._windows.pop(address, None)
            self._windows[address] = [1, now + self.window]
        else:
            entry[0] += 1

    def _expire(self, now: float) -> None:
        windows = self._windows
        while windows:
            first = next(iter(windows.values()))
            if first[1] > now and len(windows) < _MAX_TRACKED_ADDRESSES:
                break
            windows.popitem(last=False)

    @property
    def tracked(self) -> int:
        return len(self._windows)


class Doors:
    """Decides, from a request's head, whether it may go on (None) or gets a :class:`DoorAnswer`."""

    def __init__(
        self,
        server: ServerConfig,
        limits: LimitsConfig,
        keys: KeyRing,
        clock: IReactorTime,
        *,
        metrics_token: str | None = None,
        budget: AuthFailureBudget | None = None,
        internal_secret: str = "",
    ) -> None:
        self.keys = keys
        self.metrics_token = metrics_token  # GET /metrics needs it as a Bearer token
        self.internal_secret = internal_secret  # the HTTP tunnel's (tunnel.secret)
        self.keyless = not keys.required
        self.allowed_origins = frozenset(origin.lower() for origin in server.allowed_origins)
        self.allowed_hosts = frozenset(host.lower().strip("[]") for host in server.allowed_hosts)
        self.max_body = limits.max_request_body_bytes
        self.trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = tuple(
            ip_network(proxy, strict=False) for proxy in server.trusted_proxies
        )
        self._warned_proxy = False
        self.budget = budget or AuthFailureBudget(clock, limits.auth_failure_limit, limits.auth_failure_window)

    # -- the head -------------------------------------------------------------------------

    def check(
        self, method: bytes, uri: bytes, headers: Headers, peer: Any, length: int | None, over_unix: bool = False
    ) -> DoorAnswer | None:
        """``length``: the body's Content-Length, None when chunked, 0 when there is none."""
        path = segments(uri)
        if self.keyless:
            answer = self._keyless_check(headers, over_unix)
            if answer is not None:
                return answer
        origin = _one(headers, b"origin")
        if origin is not None and origin.lower() not in self.allowed_origins:
            return refusal(
                403,
                "origin_not_allowed",
                f"Requests from the browser origin {origin[:200]!r} are not allowed; list it in "
                "server.allowed_origins to serve it.",
                "permission_error",
            )
        if origin is not None and method == b"OPTIONS":
            return self._preflight(origin, headers)
        if self.keys.required and path[:1] == (_KEYED,):
            answer = self._auth_check(headers, peer, self._key_matches, self._wrong_key)
            if answer is not None:
                return answer
        elif self.metrics_token is not None and path[:1] and path[0] in _ADMIN:
            answer = self._auth_check(headers, peer, self._token_matches, self._wrong_token)
            if answer is not None:
                return answer
        return self._body_check(method, path, headers, length)

    def is_internal(self, headers: Headers) -> bool:
        """A turn the HTTP tunnel forwards (it carries tunnel.secret): its client connection
        already holds a place under server.max_connections."""
        return markers.verify_internal_request(headers, self.internal_secret)

    def cors_headers(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        """Headers every response to an allowed browser origin carries (empty for others)."""
        origin = _one(headers, b"origin")
        if origin is None:
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    def body_limit(self, method: bytes, uri: bytes) -> int:
        """The most body bytes this request may carry (chunked bodies are counted against it)."""
        return self.max_body if (method == b"POST" and segments(uri) == _BODY_PATH) else 0

    def too_large(self, limit: int) -> DoorAnswer:
        if limit == 0:
            return refusal(413, "body_not_allowed", "This request takes no body.", "invalid_request_error")
        return refusal(
            413,
            "request_too_large",
            f"Request body too large (limit {limit} bytes, limits.max_request_body_bytes).",
            "invalid_request_error",
        )

    # -- the rules ------------------------------------------------------------------------

    def _keyless_check(self, headers: Headers, over_unix: bool) -> DoorAnswer | None:
        for name, _ in headers.getAllRawHeaders():
            lowered = name.lower()
            if lowered in _PROXY_HEADERS or lowered.startswith(_PROXY_PREFIX):
                return refusal(
                    403,
                    "proxied_without_keys",
                    "This gateway has no [[keys]] and refuses requests that came through a proxy "
                    f"({lowered.decode('latin-1')}): anyone who reaches the proxy could use it. "
                    "Configure [[keys]] to serve behind a proxy (docs/security.md).",
                    "permission_error",
                )
        if over_unix:
            return None  # a unix socket cannot be reached by a rebound DNS name
        values = headers.getRawHeaders(b"host")
        if values is None:
            return None  # no browser sends a request without Host
        if len(values) != 1:
            return refusal(400, "invalid_host", "More than one Host header.", "invalid_request_error")
        name = host_name(values[0].decode("latin-1"))
        if is_loopback_host(name) or name.lower().rstrip(".") in self.allowed_hosts:
            return None
        return refusal(
            403,
            "host_not_allowed",
            f"Host {name[:200]!r} is not served by this keyless gateway (loopback names only); list "
            "it in server.allowed_hosts, or configure [[keys]].",
            "permission_error",
        )

    def _preflight(self, origin: str, headers: Headers) -> DoorAnswer:
        answer = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", _CORS_METHODS),
            (b"access-control-max-age", _CORS_MAX_AGE),
            (b"vary", b"Origin"),
        ]
        asked = _one(headers, b"access-control-request-headers")
        if asked:
            wanted = [name.strip() for name in asked.split(",") if name.strip()]
            if all(HEADER_NAME.fullmatch(name) for name in wanted):
                answer.append((b"access-control-allow-headers", ", ".join(wanted).encode("latin-1")))
        return DoorAnswer(204, "cors_preflight", b"", tuple(answer))

    def _auth_check(
        self, headers: Headers, peer: Any, matches: Callable[[str | None], bool], wrong: Callable[[], DoorAnswer]
    ) -> DoorAnswer | None:
        address = self.client_address(headers, peer)
        wait = self.budget.blocked_for(address)
        if wait > 0:
            return refusal(
                429,
                "too_many_auth_failures",
                "Too many failed key checks from this address; try again later.",
                "rate_limit_error",
                [(b"retry-after", str(max(1, round(wait))).encode("ascii"))],
            )
        presented = presented_key(lower_headers(headers))
        if matches(presented):
            return None
        self.budget.failed(address)
        log.info("auth_refused", address=address, presented=mask_key(presented) if presented else None)
        return wrong()

    def _key_matches(self, presented: str | None) -> bool:
        return self.keys.match(presented) is not None

    def _token_matches(self, presented: str | None) -> bool:
        token = self.metrics_token
        assert token is not None
        return presented is not None and hmac.compare_digest(presented.encode(), token.encode())

    @staticmethod
    def _wrong_key() -> DoorAnswer:
        status, body = errors.unauthorized()
        return DoorAnswer(status, "invalid_api_key", body, ((b"www-authenticate", b'Bearer realm="cch"'),))

    @staticmethod
    def _wrong_token() -> DoorAnswer:
        return refusal(
            403,
            "metrics_forbidden",
            "Metrics and /admin need 'Authorization: Bearer <server.admin_token>' here.",
            "permission_error",
        )

    def _body_check(
        self, method: bytes, path: tuple[str, ...], headers: Headers, length: int | None
    ) -> DoorAnswer | None:
        limit = self.max_body if (method == b"POST" and path == _BODY_PATH) else 0
        if length is None or length > limit:  # chunked, or longer than allowed
            if _served(path) is None:
                return refusal(404, "not_found", "Not found.", "invalid_request_error")
            if length is not None or not limit:
                return self.too_large(limit)
            # chunked where a body is taken: counted as it arrives
        if limit:
            media = (_one(headers, b"content-type") or "").partition(";")[0].strip().lower()
            if media != "application/json":
                return refusal(
                    415,
                    "unsupported_media_type",
                    "POST /v1/responses needs 'Content-Type: application/json'.",
                    "invalid_request_error",
                )
        return None

    def client_address(self, headers: Headers, peer: Any) -> str:
        """The peer's address, or behind a trusted proxy the last address it was told of."""
        host = str(getattr(peer, "host", "") or "unix")
        if not self.trusted_proxies or not self._trusted(host):
            if not self._warned_proxy and headers.hasHeader(b"x-forwarded-for"):
                self._warned_proxy = True  # once: every client behind it shares one budget
                log.warn(
                    "auth_budget_shared_by_proxy",
                    peer=host,
                    hint="set server.trusted_proxies to the proxy's address (docs/security.md)",
                )
            return host
        hops = ",".join(v.decode("latin-1") for v in headers.getRawHeaders(b"x-forwarded-for", []))
        for hop in reversed([h.strip() for h in hops.split(",") if h.strip()]):
            if not self._trusted(hop):
                return hop
        return host

    def _trusted(self, host: str) -> bool:
        try:
            address = ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


def segments(uri: bytes) -> tuple[str, ...]:
    """The path's segments as twisted.web routes them: split on "/", each percent-decoded."""
    path = uri.split(b"?", 1)[0]
    return tuple(unquote_to_bytes(part).decode("latin-1") for part in path[1:].split(b"/"))


def _served(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The resource ``path`` reaches, or None (404): leaf resources take any deeper path,
    ``/v1/responses`` only itself."""
    if path == _BODY_PATH:
        return path
    for served in _SERVED:
        if served != _BODY_PATH and path[: len(served)] == served:
            return served
    return None


def _one(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    return None if not values else values[0].decode("latin-1")
