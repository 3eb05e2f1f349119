"""The per-process internal secret and the reserved ``x-cch-*`` headers.

The WebSocket edge tunnels each turn to the internal ``/v1/responses`` handler as
an HTTP request carrying marker headers.  Only a request that also carries the
process secret (and the forward flag) is trusted as a tunneled turn, so a client
cannot spoof the markers (docs/reference-behaviour.md#the-internal-tunnel).
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CLIENT_TRANSPORT",
    "INTERNAL_SECRET",
    "REQUEST_ID",
    "RESERVED_HEADERS",
    "RESERVED_PREFIX",
    "SECRET_ENV",
    "WS_FORWARD",
    "WS_SESSION",
    "header_value",
    "is_reserved",
    "is_websocket_client",
    "marker_headers",
    "new_secret",
    "session_id_from",
    "verify_internal_request",
]

RESERVED_PREFIX = "x-cch-"
CLIENT_TRANSPORT = "x-cch-client-transport"
WS_FORWARD = "x-cch-responses-ws-forward"
WS_SESSION = "x-cch-responses-ws-session"
INTERNAL_SECRET = "x-cch-internal-secret"
# The edge's id of a turn, carried by the HTTP tunnel so both ends log (and bill) the same id;
# trusted only with the internal secret. Reserved by its prefix like every x-cch-* name.
REQUEST_ID = "x-cch-request-id"
RESERVED_HEADERS = frozenset({CLIENT_TRANSPORT, WS_FORWARD, WS_SESSION, INTERNAL_SECRET})
SECRET_ENV = "CCH_RESPONSES_WS_INTERNAL_SECRET"

_MAX_SESSION_ID = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]+")


def new_secret() -> str:
    """Return a fresh random secret (a UUIDv4, like the reference)."""
    return str(uuid.uuid4())


def _text(value: str | bytes) -> str:
    # surrogateescape: raw header bytes never fail to decode, and distinct bytes
    # stay distinct strings (so a comparison cannot be fooled by replacement chars).
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def _values(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in value]


def header_value(headers: Any, name: str) -> str | None:
    """Look up header ``name`` case-insensitively; join repeated values with ``", "``.

    Accepts a ``twisted.web.http_headers.Headers``, a ``dict[str, str]`` (Autobahn's
    handshake headers) or a ``dict[bytes, list[bytes]]`` (``Request.requestHeaders``
    raw form), so callers need not convert.  Returns None when absent.
    """
    if headers is None:
        return None
    get_raw = getattr(headers, "getRawHeaders", None)
    if get_raw is not None:
        raw = get_raw(name.encode("latin-1"))
        return None if not raw else ", ".join(_values(raw))
    if not isinstance(headers, Mapping):
        return None
    lname = name.lower()
    found: list[str] = []
    for key, value in headers.items():
        key_text = key.decode("latin-1") if isinstance(key, bytes) else key
        if isinstance(key_text, str) and key_text.lower() == lname and value is not None:
            found.extend(_values(value))
    return ", ".join(found) if found else None


def _secret_bytes(value: str) -> bytes:
    # surrogatepass keeps the encoding total and injective, so equal bytes <=> equal str.
    return value.encode("utf-8", "surrogatepass")


def verify_internal_request(headers: Any, secret: str) -> bool:
    """True only for a request that carries the process secret and the forward flag ``1``."""
    if not secret:
        return False
    provided = header_value(headers, INTERNAL_SECRET)
    if not provided:
        return False
    given, expected = _secret_bytes(provided), _secret_bytes(secret)
    if len(given) != len(expected) or not hmac.compare_digest(given, expected):
        return False
    return header_value(headers, WS_FORWARD) == "1"


def is_websocket_client(headers: Any, secret: str) -> bool:
    """True if the request is a genuine tunneled WebSocket turn (not a spoofed marker)."""
    transport = header_value(headers, CLIENT_TRANSPORT)
    if transport is None or transport.strip().lower() != "websocket":
        return False
    return verify_internal_request(headers, secret)


def session_id_from(headers: Any) -> str | None:
    """Return the trimmed client-connection session id, or None if absent or malformed."""
    value = header_value(headers, WS_SESSION)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_SESSION_ID or not _SESSION_ID.fullmatch(value):
        return None
    return value


def is_reserved(name: str | bytes) -> bool:
    """True for any ``x-cch-*`` header name (clients may not send these through the edge)."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return name.lower().startswith(RESERVED_PREFIX)


def marker_headers(session_id: str, secret: str) -> dict[str, str]:
    """The reserved headers that mark an internal request as a tunneled WebSocket turn."""
    headers = {CLIENT_TRANSPORT: "websocket", WS_FORWARD: "1"}
    if session_id:
        headers[WS_SESSION] = session_id
    if secret:
        headers[INTERNAL_SECRET] = secret
    return headers
