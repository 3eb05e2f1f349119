"""One usage row per turn, and the token counts read from a terminal event's ``usage``.

The field names are the database columns (cch/usage/store.py) and the keys of a spill-file line
(cch/usage/ledger.py), so one list here is the only description of a row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STATUSES = ("completed", "failed", "incomplete", "error", "cancelled", "drained", "refused")


@dataclass(frozen=True)
class UsageRow:
    """What one turn cost and how it went; written once, whatever way the turn ended."""

    request_id: str  # unique: a row recorded twice is counted once
    started_at: float  # epoch seconds
    ended_at: float
    response_id: str | None
    key: str | None  # the key's name, never the secret
    provider: str | None
    model_requested: str | None
    model_served: str | None
    client_transport: str  # "websocket" | "http"
    upstream_transport: str | None  # "websocket" | "http" | None when no upstream was reached
    status: str  # one of STATUSES
    error_code: str | None
    attempts: int
    replayed: bool  # the input was replayed from the transcript
    input_tokens: int | None  # None: the upstream never said
    cached_input_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    cost: float | None  # USD; None when the model has no price or a count is missing
    first_event_ms: float | None
    duration_ms: float
    replica: str

    @property
    def total_tokens(self) -> int | None:
        """Input + output tokens (what the token limits count); None when the upstream said neither."""
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRow:
        """A row from :meth:`to_dict`'s output (a spill-file line); unknown keys are an error."""
        return cls(**data)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(UsageRow))
_REQUIRED = {
    "request_id": str,
    "started_at": (int, float),
    "ended_at": (int, float),
    "client_transport": str,
    "status": str,
    "attempts": int,
    "replayed": bool,
    "duration_ms": (int, float),
    "replica": str,
}


def row_problem(row: object) -> str | None:
    """Why ``row`` cannot be written (a field the database requires is missing or of the wrong
    type), or None. One such row in a batch would fail the batch every time it is retried."""
    if not isinstance(row, UsageRow):
        return f"not a UsageRow: {type(row).__name__}"
    for name, kind in _REQUIRED.items():
        if not isinstance(getattr(row, name), kind):
            return f"{name} is {getattr(row, name)!r}"
    return None


def usage_counts(response: dict[str, Any] | None) -> tuple[int | None, int | None, int | None, int | None]:
    """(input, cached input, output, reasoning) tokens from a Responses ``response`` object's
    ``usage``; each None when the upstream did not say (absent, null, or not a number)."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None, None, None, None
    input_details = usage.get("input_tokens_details")
    output_details = usage.get("output_tokens_details")
    return (
        _count(usage.get("input_tokens")),
        _count(input_details.get("cached_tokens")) if isinstance(input_details, dict) else None,
        _count(usage.get("output_tokens")),
        _count(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else None,
    )


def _count(value: Any) -> int | None:
    # bool is an int in Python; a true/false count is not a count.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
