"""JSON the way the wire (and JavaScript) sees it: strict in, compact out.

With ``orjson`` installed (``pip install 'cch[fast]'``) it writes what it can, about 25 times
faster (a turn's upstream frame, the transcript's sizes: docs/benchmarks.md); what it refuses
(a lone surrogate, an integer past 64 bits, a non-string key) the standard library writes as
without it. The one difference: a float's exponent has no leading zero (``1e-7``, not
``1e-07``): the same number. Parsing stays with the standard library: orjson makes an integer past 64 bits a
double, and a gateway must not change the numbers it forwards.
"""

from __future__ import annotations

import json
import math
from typing import Any

try:
    import orjson
except ImportError:  # the standard library does it all, slower
    orjson = None  # type: ignore[assignment]


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
    if _fast_dumps is not None:
        try:
            return _fast_dumps(obj).decode("utf-8")
        except _FastEncodeError:
            pass
    return _encode(obj)


def dumps_bytes(obj: Any) -> bytes:
    """UTF-8 bytes of :func:`dumps`; text that cannot be UTF-8 (lone surrogates) is escaped."""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(obj)
        except _FastEncodeError:
            pass  # a lone surrogate, a non-string key, NaN: as without orjson
    try:
        return _encode(obj).encode("utf-8")
    except UnicodeEncodeError:
        return _encode_ascii(obj).encode("ascii")


# orjson writes a NaN or an infinite float as null, as JSON.stringify does (the standard library
# refuses them); none comes from the wire, where loads makes 1e999 null.
_fast_dumps = orjson.dumps if orjson is not None else None
_FastEncodeError: type[Exception] = orjson.JSONEncodeError if orjson is not None else TypeError


FAST_PARSE = orjson is not None
"""Whether :func:`object_type` has a faster parser than :func:`loads` (orjson)."""

_MAX_OPENINGS = 256
"""Brackets in a text past which :func:`object_type` leaves it to the standard library's parser:
orjson nests to 1,024 levels, the standard library to about Python's recursion limit, less the
stack below it."""

_fast_loads: Any = orjson.loads if orjson is not None else loads


def object_type(text: str | bytes) -> str | None:
    """The string ``type`` of a JSON object, by the fastest parser at hand (orjson, else
    :func:`loads`); None when the text is not UTF-8, not JSON, not an object or has no string
    type — or is bracketed deeply enough that only the standard library's verdict counts. For
    anything orjson accepts its verdict is the standard library's (tests/test_wire.py); what it
    refuses, a caller's full parse decides. Only the type: orjson makes integers past 64 bits
    doubles, so nothing else of its parse may be used."""
    if len(text) > _MAX_OPENINGS:
        if isinstance(text, str):
            openings = text.count("{") + text.count("[")
        else:
            openings = text.count(b"{") + text.count(b"[")
        if openings > _MAX_OPENINGS:
            return None
    try:
        value = _fast_loads(text)
    except ValueError:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if type(value) is dict:
        kind = value.get("type")
        if type(kind) is str:
            return kind
    return None
