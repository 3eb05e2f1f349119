"""Per-client-connection transcripts: what each response was asked and answered.

Codex over WebSocket sends only a turn's new items and points at the previous response with
``previous_response_id`` (usually with ``store=false``). That works only on the upstream socket
that produced the previous response. The transcript lets the gateway rebuild the whole input
when a turn must go elsewhere (HTTP-only upstream, a new socket, another provider), bounded in
bytes and entries per connection, oldest first out (docs/architecture.md#continuity).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from cch.jsoncodec import dumps_bytes


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a response was produced, to tell whether another attempt can resolve its id."""

    provider: str
    transport: str  # "websocket" | "http" | "local"
    socket: int | None  # upstream socket id for "websocket"
    stored: bool  # produced with store != false: the provider keeps it

    def resolvable_by(self, provider: str, socket: int | None) -> bool:
        """Can an attempt on ``provider`` (over ``socket``, None for HTTP) use this id?"""
        if self.transport == "local":
            return False
        if socket is not None and self.socket == socket:
            return True
        return self.stored and self.provider == provider


@dataclass(slots=True)
class TurnRecord:
    response_id: str
    previous_id: str | None
    input: list[Any]  # the client's own new items for that turn
    output: list[Any]  # the response's output items
    origin: Origin
    size: int


def as_items(value: Any) -> list[Any]:
    """Responses ``input`` as a list of items (a bare string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return value
    return [value]


class Transcript:
    """One client connection's responses, bounded by bytes and by entries."""

    def __init__(self, max_bytes: int, max_responses: int) -> None:
        self.max_bytes = max_bytes
        self.max_responses = max_responses
        self.records: OrderedDict[str, TurnRecord] = OrderedDict()
        self.bytes = 0
        # Ids we let go of, with their origin: still resolvable upstream, never replayable.
        self.evicted: OrderedDict[str, Origin] = OrderedDict()

    def add(
        self, response_id: str, previous_id: str | None, input_items: list[Any], output: list[Any], origin: Origin
    ) -> None:
        size = len(dumps_bytes(input_items)) + len(dumps_bytes(output)) + len(response_id) + 64
        old = self.records.pop(response_id, None)
        if old is not None:
            self.bytes -= old.size
        self.records[response_id] = TurnRecord(response_id, previous_id, input_items, output, origin, size)
        self.bytes += size
        while self.records and (self.bytes > self.max_bytes or len(self.records) > self.max_responses):
            _, gone = self.records.popitem(last=False)
            self.bytes -= gone.size
            self.evicted[gone.response_id] = gone.origin
            while len(self.evicted) > self.max_responses * 4:
                self.evicted.popitem(last=False)

    def origin(self, response_id: str) -> Origin | None:
        record = self.records.get(response_id)
        if record is not None:
            return record.origin
        return self.evicted.get(response_id)

    def knows(self, response_id: str) -> bool:
        return response_id in self.records or response_id in self.evicted

    def replay_input(self, response_id: str) -> list[Any] | None:
        """Every item of the chain ending at ``response_id``, oldest first; None when a link
        of the chain is gone (evicted or never seen)."""
        chain: list[TurnRecord] = []
        current: str | None = response_id
        seen: set[str] = set()
        while current is not None:
            record = self.records.get(current)
            if record is None or current in seen:
                return None
            seen.add(current)
            chain.append(record)
            current = record.previous_id
        items: list[Any] = []
        for record in reversed(chain):
            items.extend(record.input)
            items.extend(record.output)
        return items


class TranscriptStore:
    """Transcripts by client session id; the edge drops one when its connection closes, and
    the least recently used go first beyond ``max_sessions`` (sessions of remote edges)."""

    def __init__(self, max_bytes: int, max_responses: int, max_sessions: int) -> None:
        self.max_bytes = max_bytes
        self.max_responses = max_responses
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, Transcript] = OrderedDict()

    def get(self, session_id: str) -> Transcript:
        transcript = self.sessions.get(session_id)
        if transcript is None:
            transcript = self.sessions[session_id] = Transcript(self.max_bytes, self.max_responses)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        else:
            self.sessions.move_to_end(session_id)
        return transcript

    def collect(self) -> Iterator[Metric]:
        """Bytes held, read at scrape time (cch.metrics)."""
        yield GaugeMetricFamily("cch_transcript_bytes", "Bytes held in conversation transcripts.", value=self.bytes)

    def drop(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.sessions.values())
