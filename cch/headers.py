"""Header names that describe a hop rather than a client: never carried further."""

from __future__ import annotations

from cch.secret import RESERVED_HEADERS

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

# Upgrade-request headers a WebSocket turn does not carry inward (reference §2.6).
EDGE_NOT_FORWARDED = WEBSOCKET_HANDSHAKE | FRAMING

# Never sent in an upstream upgrade request (reference §6.3).
UPGRADE_NOT_FORWARDED = WEBSOCKET_HANDSHAKE | FRAMING | {"accept", "content-type"} | RESERVED_HEADERS
