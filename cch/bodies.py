"""The one place a turn's body is shaped: from a client frame, and towards an upstream.

``type`` names the WebSocket frame and ``background`` is refused by a streaming gateway; neither
belongs to the Responses request a turn makes, and every turn streams (docs/reference-behaviour.md,
"Inbound frames and the queue"). Key order is kept, so the bytes an upstream receives are the
client's, less those fields.
"""

from __future__ import annotations

from typing import Any

from cch.jsoncodec import dumps_bytes

# Fields of a client frame that describe the frame or the transport, not the request.
FRAME_ONLY = ("type", "background")


def turn_body(fields: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The Responses request of a turn: ``fields`` less :data:`FRAME_ONLY`, ``model`` filled in
    when the frame has none (the ``?model=`` fallback), and ``stream`` true."""
    body = {k: v for k, v in fields.items() if k not in FRAME_ONLY}
    if model and body.get("model") in (None, ""):
        body["model"] = model
    body["stream"] = True
    return body


def upstream_ws_frame(body: dict[str, Any]) -> bytes:
    """The frame for an upstream Responses WebSocket (UTF-8): ``type`` first, then the body less
    what only HTTP or the client's frame carries (docs/reference-behaviour.md, "The upstream
    WebSocket pool")."""
    frame: dict[str, Any] = {"type": "response.create"}
    frame.update((k, v) for k, v in body.items() if k not in ("stream", *FRAME_ONLY))
    return dumps_bytes(frame)
