"""JSON the way the wire (and JavaScript) sees it: strict in, compact out."""

from __future__ import annotations

import json
import math
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float | None:
    """``1e999`` parses to Infinity in JavaScript and serialises as ``null``: do the same."""
    value = float(text)
    return value if math.isfinite(value) else None


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode


_scan_once = _decoder.scan_once


def loads(text: str | bytes) -> Any:
    """Parse like ``JSON.parse``: no NaN/Infinity; absurd nesting is a ValueError, not a crash."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        # One call into the C scanner for the common case (a value with no whitespace
        # around it, like every upstream event); anything else takes the whole decoder,
        # which also words the errors.
        try:
            value, end = _scan_once(text, 0)
        except StopIteration:
            return _decoder.decode(text)
        if end == len(text):
            return value
        return _decoder.decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps(obj: Any) -> str:
    """Compact JSON with non-ASCII kept (what ``JSON.stringify`` writes)."""
    return _encode(obj)


def dumps_bytes(obj: Any) -> bytes:
    """UTF-8 bytes of :func:`dumps`; text that cannot be UTF-8 (lone surrogates) is escaped."""
    try:
        return _encode(obj).encode("utf-8")
    except UnicodeEncodeError:
        return _encode_ascii(obj).encode("ascii")
