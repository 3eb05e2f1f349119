"""Conversation continuity on every upstream (docs/architecture.md#continuity).

For each attempt the pipeline asks :func:`prepare` what to send: the body as the client sent
it when the upstream can resolve ``previous_response_id`` (same socket, or stored at the same
provider), the whole conversation replayed from the transcript when it cannot, or the
canonical ``previous_response_not_found`` error when the chain is gone. ``generate:false``
warm-ups bound for HTTP are answered locally. Response ids are never rewritten: every id the
client sees came from exactly one place, and the transcript remembers where, so no mapping is
needed to keep ids consistent from the client's side.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cch.jsoncodec import dumps
from cch.transcript import Origin, Transcript, as_items
from cch.wire import previous_not_found

NEW_SOCKET = -1  # an attempt on a socket that does not exist yet


def prepare(
    transcript: Transcript | None, body: dict[str, Any], provider: str, socket: int | None
) -> tuple[dict[str, Any] | None, str | None]:
    """What to send on an attempt: ``(body, None)`` or ``(None, canonical error event)``.

    ``socket`` is the upstream socket id the attempt will use (``NEW_SOCKET`` for a fresh
    one), or None for HTTP.
    """
    previous = body.get("previous_response_id")
    if transcript is None or not isinstance(previous, str) or not transcript.knows(previous):
        return body, None  # not ours to judge: the upstream may well know it (stored)
    origin = transcript.origin(previous)
    assert origin is not None
    if origin.resolvable_by(provider, socket):
        return body, None
    return replay(transcript, body)


def replay(transcript: Transcript, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The body with the whole conversation as ``input`` and no ``previous_response_id``."""
    previous = body["previous_response_id"]
    history = transcript.replay_input(previous)
    if history is None:
        return None, previous_not_found(previous)
    replayed = {k: v for k, v in body.items() if k != "previous_response_id"}
    replayed["input"] = history + as_items(body.get("input"))
    return replayed, None


def wants_local_warmup(transcript: Transcript | None, body: dict[str, Any]) -> bool:
    return transcript is not None and body.get("generate") is False


def warmup_events(body: dict[str, Any]) -> tuple[str, list[str]]:
    """A well-formed ``response.created`` / ``response.completed`` pair with no output."""
    response_id = f"resp_cch_{uuid.uuid4().hex}"
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "model": body.get("model"),
        "output": [],
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True),
        "usage": None,
    }
    created = dumps({"type": "response.created", "sequence_number": 0, "response": response})
    response = dict(response, status="completed")
    response["usage"] = {
        "input_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 0,
    }
    completed = dumps({"type": "response.completed", "sequence_number": 1, "response": response})
    return response_id, [created, completed]


class TranscriptRecorder:
    """Writes an attempt's completed (or incomplete) response into the transcript: what the
    client sent, what the upstream answered, and where it came from. The turn's meter hands it
    the terminal event's response (cch/handler/metering.py: one pass over the events)."""

    def __init__(self, transcript: Transcript, body: dict[str, Any], origin: Origin) -> None:
        self.transcript = transcript
        previous = body.get("previous_response_id")
        self.previous = previous if isinstance(previous, str) else None
        self.input = as_items(body.get("input"))
        self.origin = origin

    def successor(self, response_id: str, steer_input: list[Any]) -> TranscriptRecorder:
        """The recorder of the response that continues ``response_id`` with ``steer_input``
        (steering's successor), from the same place."""
        return TranscriptRecorder(self.transcript, {"previous_response_id": response_id, "input": steer_input}, self.origin)

    def record(self, response: dict[str, Any]) -> None:
        if not isinstance(response.get("id"), str):
            return
        output = response.get("output")
        self.transcript.add(
            response["id"], self.previous, self.input, output if isinstance(output, list) else [], self.origin
        )
