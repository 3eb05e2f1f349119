"""Which client headers may travel further, and why the others may not.

Each block-list below is named by the reason it exists; :func:`cch.handler.outbound.upstream_headers`
combines them for the requests a provider receives, and ``cch.config`` refuses the same names
where an operator could otherwise ask for them (``providers[].headers``,
``providers[].forward_headers``). One list per reason, so a new header is added in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from cch.secret import RESERVED_HEADERS, RESERVED_PREFIX

# A WebSocket upgrade's own headers; every WebSocket library writes them itself.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "connection",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)

# How one hop frames its message.
FRAMING = frozenset({"host", "content-length", "transfer-encoding"})

# Hop-by-hop: they describe one connection, not the request (RFC 9110 §7.6.1). Whatever the
# Connection header itself names is hop-by-hop too (see connection_listed).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# The client's credentials for this gateway: the provider gets the operator's api_key instead.
CLIENT_CREDENTIALS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})

# What the gateway decides for each upstream request itself (body type, SSE or JSON, no gzip).
NEGOTIATED = frozenset({"content-type", "accept", "accept-encoding"})

# Where the client is and which proxies it came through: none of the provider's business.
CLIENT_NETWORK = frozenset(
    {
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "true-client-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
    }
)
CLIENT_NETWORK_PREFIX = "x-forwarded-"

# The client's tracing context (ids of its own systems).
CLIENT_TRACING = frozenset({"x-request-id", "traceparent", "tracestate"})

# Who the provider bills: on the operator's key that is the operator's choice, not the client's.
BILLING_CHOICE = frozenset({"openai-organization", "openai-project"})

# Never sent to a provider, whatever the configuration says.
NEVER_FORWARDED = WEBSOCKET_HANDSHAKE | FRAMING | HOP_BY_HOP | CLIENT_CREDENTIALS | NEGOTIATED

# Dropped unless the provider's forward_headers lists them (the operator's call).
DROPPED_BY_DEFAULT = CLIENT_NETWORK | CLIENT_TRACING | BILLING_CHOICE

# Upgrade-request headers a WebSocket turn does not carry inward
# (docs/reference-behaviour.md#the-internal-tunnel).
EDGE_NOT_FORWARDED = WEBSOCKET_HANDSHAKE | FRAMING

# Never sent in an upstream upgrade request
# (docs/reference-behaviour.md#the-upstream-websocket-pool).
UPGRADE_NOT_FORWARDED = WEBSOCKET_HANDSHAKE | FRAMING | {"accept", "content-type"} | RESERVED_HEADERS


def connection_listed(headers: Mapping[str, str]) -> frozenset[str]:
    """The lower-cased names a ``Connection`` header lists (``keep-alive, x-secret-hop``)."""
    listed: set[str] = set()
    for name, value in headers.items():
        if name.lower() == "connection":
            listed.update(token.strip().lower() for token in value.split(","))
    listed.discard("")
    return frozenset(listed)


def without_hop_by_hop(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` minus the hop-by-hop ones and those its ``Connection`` header names."""
    listed = connection_listed(headers)
    dropped = HOP_BY_HOP | listed if listed else HOP_BY_HOP
    return {name: value for name, value in headers.items() if name.lower() not in dropped}


def never_forwarded_reason(name: str) -> str | None:
    """Why the header ``name`` can never reach a provider, or None if it may."""
    lowered = name.lower()
    if lowered.startswith(RESERVED_PREFIX):
        return f"{RESERVED_PREFIX}* headers are the gateway's own"
    for names, reason in _NEVER_REASONS:
        if lowered in names:
            return reason
    return None


_NEVER_REASONS: tuple[tuple[frozenset[str], str], ...] = (
    (CLIENT_CREDENTIALS, "it carries the client's credentials (the provider gets api_key instead)"),
    (FRAMING, "the gateway sets it for each hop (the Host and the message's framing)"),
    (HOP_BY_HOP, "it is hop-by-hop (RFC 9110 §7.6.1)"),
    (WEBSOCKET_HANDSHAKE, "it belongs to the WebSocket handshake"),
    (NEGOTIATED, "the gateway sets it for each upstream request"),
)


def forwardable(name: str, allowed: Iterable[str] = ()) -> bool:
    """May the client header ``name`` (already without hop-by-hop ones) reach a provider whose
    ``forward_headers`` are ``allowed`` (lower-case)?"""
    lowered = name.lower()
    if lowered in NEVER_FORWARDED or lowered.startswith(RESERVED_PREFIX):
        return False
    if lowered in DROPPED_BY_DEFAULT or lowered.startswith(CLIENT_NETWORK_PREFIX):
        return lowered in allowed
    return True


# RFC 9110 token: what a header name may be made of.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def without_reserved(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` less every ``x-cch-*`` one: a client can never set the gateway's markers."""
    return {name: value for name, value in headers.items() if not name.lower().startswith(RESERVED_PREFIX)}


def lower_headers(headers: Any) -> dict[str, str]:
    """A ``twisted.web`` ``Headers`` as ``{lower-case name: values joined by ", "}``."""
    return {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in headers.getAllRawHeaders()
    }
