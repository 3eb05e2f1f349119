"""What goes to an upstream: the URL and the headers (reference §5)."""

from __future__ import annotations

from collections.abc import Mapping

from cch.handler.routing import Provider

# What the reference sends when the client sent no User-Agent (Codex backends expect one).
DEFAULT_USER_AGENT = "codex_cli_rs/0.93.0 (Windows 10.0.26200; x86_64) vscode/1.108.1"

# Never forwarded: hop-by-hop, the client's own credentials, framing, WebSocket handshake,
# and headers that would leak the client's network identity or tracing to a provider.
_BLOCKED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "accept",
        "accept-encoding",
        "authorization",
        "x-api-key",
        "cookie",
        "forwarded",
        "x-real-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "true-client-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "x-request-id",
        "traceparent",
        "tracestate",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)
_BLOCKED_PREFIXES = ("x-cch-", "x-forwarded-")


def upstream_url(base_url: str) -> str:
    """``base_url`` joined with ``/v1/responses`` without doubling path parts."""
    base = base_url.rstrip("/")
    if base.endswith("/responses"):
        return base
    if base.endswith("/v1"):
        return base + "/responses"
    return base + "/v1/responses"


def upstream_headers(
    client_headers: Mapping[str, str], provider: Provider, *, stream: bool
) -> dict[str, str]:
    """Client headers minus the blocked ones, then the provider's headers and credentials."""
    headers = {
        name: value
        for name, value in client_headers.items()
        if name not in _BLOCKED and not name.startswith(_BLOCKED_PREFIXES)
    }
    headers["content-type"] = "application/json"
    headers["accept"] = "text/event-stream" if stream else "application/json"
    headers["accept-encoding"] = "identity"
    for name, value in provider.config.headers:
        headers[name.lower()] = value
    if provider.config.api_key:
        headers["authorization"] = f"Bearer {provider.config.api_key}"
    headers.setdefault("user-agent", DEFAULT_USER_AGENT)
    return headers
