"""Usage totals for people and programs: ``cch usage`` (cch/cli.py) and ``GET /admin/usage``
share :func:`report`, so both say the same thing (docs/usage.md#reports).

Times are UTC. ``since`` and ``until`` take ``YYYY-MM-DD`` or an ISO 8601 datetime (without an
offset it is UTC). A date in ``until`` includes that whole day; a datetime is the exact end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from cch.usage.store import GROUPS, TOTAL_FIELDS

DEFAULT_BY = ("key", "model", "day")


class ReportError(ValueError):
    """A report's arguments are wrong; the message says how (a 400 on /admin/usage)."""


class Totals(Protocol):
    def totals(self, since: datetime | None, until: datetime | None, by: tuple[str, ...]) -> Deferred[list[dict[str, Any]]]: ...


def parse_when(text: str, *, end: bool = False) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC; with ``end``, the next midnight, so the day is included) or
    an ISO 8601 datetime (UTC unless it carries an offset), as an aware UTC datetime."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(f"not a date (YYYY-MM-DD) or ISO 8601 datetime: {text!r}") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_by(text: str | None) -> tuple[str, ...]:
    """``key,model,day`` (any of them, in the order wanted); None = all three; "" = no groups."""
    if text is None:
        return DEFAULT_BY
    by = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in by if part not in GROUPS]
    if unknown or len(set(by)) != len(by):
        raise ReportError(f"--by takes {','.join(GROUPS)} (each at most once), got {text!r}")
    return by


def arguments(since: str | None, until: str | None, by: str | None) -> tuple[datetime | None, datetime | None, tuple[str, ...]]:
    """(since, until, by) for :meth:`LedgerStore.totals`; :class:`ReportError` when wrong."""
    start = parse_when(since) if since else None
    end = parse_when(until, end=True) if until else None
    if start is not None and end is not None and end <= start:
        raise ReportError(f"until ({until}) must be after since ({since})")
    return start, end, parse_by(by)


def report(source: Totals, since: str | None = None, until: str | None = None, by: str | None = None) -> Deferred[list[dict[str, Any]]]:
    """The totals as JSON-ready dicts, one per group: the group's fields, then ``turns``,
    ``input_tokens``, ``cached_input_tokens``, ``output_tokens``, ``reasoning_tokens``, ``cost``
    (null when nothing in the group had a price). Raises :class:`ReportError` at once for bad
    arguments; the Deferred fails only when the database does."""
    since_at, until_at, groups = arguments(since, until, by)
    return source.totals(since_at, until_at, groups)


def render_json(groups: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(groups), indent=2)


def render_table(groups: Sequence[dict[str, Any]], by: Sequence[str]) -> str:
    """A plain-text table, one line per group and a total line; '-' where nothing was known."""
    headers = [*by, "turns", "input", "cached", "output", "reasoning", "cost_usd"]
    lines = [[_cell(g.get(f), f) for f in (*by, *TOTAL_FIELDS)] for g in groups]
    if len(groups) != 1:
        total = {f: _sum(g[f] for g in groups) for f in TOTAL_FIELDS}
        total["turns"] = sum(g["turns"] for g in groups)
        label = ["total", *("" for _ in by[1:])] if by else []
        lines.append([*label, *(_cell(total[f], f) for f in TOTAL_FIELDS)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    text_columns = len(by)

    def fmt(cells: Sequence[str]) -> str:
        aligned = (c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(aligned).rstrip()

    out = [fmt(headers), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def _cell(value: Any, field: str) -> str:
    if value is None:
        return "-"
    if field == "cost":
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _sum(values: Any) -> Any:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
