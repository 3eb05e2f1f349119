"""The seam between the gateway and a provider that does not speak the Responses API.

A provider with ``api = "chat"`` or ``api = "anthropic"`` is reached over HTTP with a request of
its own API and answers in its own stream format. An :class:`Api` says how: the request the
gateway posts for a Responses request body, and a :class:`StreamTranslation` per turn that turns
the upstream's SSE events into the exact Responses event sequence Codex renders (built with
:class:`cch.translate.responses.ResponseBuilder`, so every API emits the same shapes).

What a translator receives is already whole: ``previous_response_id`` was resolved by the
gateway from the conversation's transcript (these upstreams store nothing), so ``input`` holds
every item of the conversation and ``previous_response_id`` is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class UpstreamRequest:
    """What to POST: ``path`` is appended to the provider's ``base_url`` (``/chat/completions``),
    ``headers`` are the API's own (authentication included, built from ``api_key``), ``body``
    is the JSON object to send (always a streaming request)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    # What the translation left out, for one warning log line per turn (hosted tools, ...).
    dropped: tuple[str, ...] = field(default=())


class StreamTranslation(Protocol):
    """One turn's upstream stream into Responses events (JSON objects, in order)."""

    def start(self) -> list[dict[str, Any]]:
        """The events to send before the upstream's first byte: ``response.created`` and
        ``response.in_progress`` (the client sees the turn begin at once)."""

    def feed(self, data: str) -> list[dict[str, Any]]:
        """One upstream SSE event's ``data`` text (``[DONE]`` included); the Responses events it
        makes (often none). A malformed event ends the turn with ``response.failed``."""

    def end(self) -> list[dict[str, Any]]:
        """The upstream body ended cleanly. If it ended before the upstream said it was done,
        the turn ends with ``response.failed`` (code ``upstream_stream_error``); after a
        terminal event this returns ``[]``."""

    @property
    def finished(self) -> bool:
        """A terminal event (completed / incomplete / failed) was made."""


class Api(Protocol):
    """A non-Responses provider API."""

    name: str  # "chat" | "anthropic": the value of providers[].api

    def request(self, body: dict[str, Any], *, model: str, api_key: str | None) -> UpstreamRequest:
        """The upstream request for a Responses request ``body`` (``model`` is the upstream's
        model name, after ``providers[].model_map``). Raises :class:`Untranslatable` for a
        request that cannot be expressed (the client gets a 400 naming what)."""

    def stream(self, body: dict[str, Any], *, response_id: str, model: str, created_at: int) -> StreamTranslation:
        """A translation for one turn of ``body``; ``response_id`` is minted by the gateway
        (stable for the transcript), ``model`` is the model name the client asked for."""

    def error(self, status: int, body: bytes) -> dict[str, Any]:
        """An upstream's non-stream error answer (4xx/5xx JSON, any shape) as the Responses
        error body ``{"error": {"type", "code", "message", "param"}}`` (a 429 keeps
        ``rate_limit_exceeded``, a 401/403 becomes ``upstream_auth_error``, ...)."""


class Untranslatable(ValueError):
    """A request this API cannot carry; the message names the field (``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
