"""The turn contract shared by the edge, the tunnel and the responses handler.

A *turn* is one ``response.create``. Whoever serves it (the in-process handler, or a remote
``/v1/responses`` reached by the HTTP tunnel) reports the response to a :class:`ResponseSink`:
either a stream of SSE event data texts, or one complete non-SSE body. The Deferred returned
for the turn fires when the response is complete, fails with a :class:`TurnTransportError`
when the response could not be delivered whole, and can be cancelled to abort everything
upstream of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from twisted.internet.interfaces import IPushProducer


class ResponseSink(Protocol):
    """Receives one turn's response. Implemented by the edge (WebSocket frames) and by the
    HTTP ``/v1/responses`` resource (SSE or JSON bytes)."""

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        """The response is an event stream; events follow."""

    def sse_event(self, data: str, kind: str | None = None) -> None:
        """One SSE event's data text (``data:`` lines joined, trimmed).

        ``kind``, when given, is the event's ``type`` as found by :func:`cch.wire.event_type`
        (the data is a JSON object with that string type): whoever parsed the event passes it
        on so nobody parses it again. None means not known.
        """

    def json_body(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        """The response is one complete non-SSE body. ``headers`` (``retry-after`` of a
        refused turn) matter only to an HTTP client; a WebSocket sink ignores them."""

    def register_producer(self, producer: IPushProducer) -> None:
        """Let the sink pause whoever produces the events (flow control)."""

    def unregister_producer(self) -> None:
        """The producer registered above is done."""


@runtime_checkable
class UpstreamControl(Protocol):
    """What a producer registered with a sink may also offer: a way to send a client's control
    frame (``response.steer``, ``response.inject``) on the upstream socket carrying the turn.
    Only an upstream Responses WebSocket offers it (cch/upstream/exchange.py); a turn served
    over HTTP, a translated provider or the HTTP tunnel does not (docs/protocol.md)."""

    def send_control(self, frame: bytes) -> bool:
        """Send ``frame`` upstream now; False when the socket can no longer take it."""


@dataclass
class RequestContext:
    """What the handler knows about who is asking.

    ``headers`` are the client's headers with lower-case names; for a WebSocket turn they are
    the upgrade request's headers minus hop-by-hop, ``sec-websocket-*`` and every ``x-cch-*``.
    ``via_websocket`` and ``ws_session`` are set only for trusted turns: in-process from the
    edge, or over HTTP with the internal secret verified.
    """

    headers: dict[str, str]
    via_websocket: bool = False
    ws_session: str | None = None
    request_id: str = ""
    key_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def connection_session(session_id: str) -> str:
    """The client connection's session id of a turn's session: a named lane's
    ``<connection session id>.<n>`` loses its ``.<n>`` (a connection's own id, a uuid, has no
    dot). The lanes of a connection share its transcript, so a ``store:false`` response can be
    continued from another lane (replayed: its socket is the other lane's)."""
    return session_id.partition(".")[0]


@dataclass(frozen=True)
class TurnRequest:
    """One turn as the edge hands it to the tunnel.

    ``session_id`` names what keeps the turn's upstream socket and transcript: the client
    connection's session id, or for a turn of a named lane (``stream_id``) that lane's own,
    ``<connection session id>.<n>`` (docs/protocol.md#lanes)."""

    session_id: str
    headers: dict[str, str]
    body: dict[str, Any]
    request_id: str = ""


class TurnTransportError(Exception):
    """The internal request or response failed; ``code`` is the edge's error code and close
    reason (``internal_request_error``, ``internal_response_error``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Tunnel(Protocol):
    """Carries a turn from the edge to a responses handler."""

    def run_turn(self, turn: TurnRequest, sink: ResponseSink) -> Any:
        """Return a cancellable Deferred[None] that fires when the response is complete."""
