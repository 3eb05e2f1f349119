"""cch.jsoncodec with and without orjson: the same JSON either way (what orjson refuses, the
standard library writes); with it, a float's exponent has no leading zero."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cch import jsoncodec

orjson = pytest.importorskip("orjson")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture
def without_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsoncodec, "_fast_dumps", None)


def stdlib(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


@given(json_values)
def test_the_same_bytes_as_the_standard_library_for_any_value_without_floats(value: Any) -> None:
    # Lone surrogates, integers past 64 bits and the like go to the standard library.
    assert jsoncodec.dumps_bytes(value) == stdlib(value)
    assert jsoncodec.dumps(value) == jsoncodec.dumps_bytes(value).decode("utf-8")


@pytest.mark.parametrize(
    "value",
    [
        {"lone": "\ud800"},  # not UTF-8: escaped
        {"big": 2**70, "small": -(2**64)},  # past 64 bits: exact
        {1: "int key"},  # JSON keys are strings
        {"text": "ünïcode ✓ \U0001f600", "nul": "\x00"},
    ],
)
def test_what_orjson_refuses_or_writes_differently_is_written_as_before(value: Any) -> None:
    assert jsoncodec.dumps_bytes(value) == stdlib(value)


def test_a_floats_exponent_has_no_leading_zero() -> None:
    assert jsoncodec.dumps_bytes({"a": 1e-7, "b": 0.1, "c": 1e16, "d": -0.0}) == b'{"a":1e-7,"b":0.1,"c":1e+16,"d":-0.0}'


def test_without_orjson_the_standard_library_writes_everything(without_orjson: None) -> None:
    assert jsoncodec.dumps_bytes({"a": 1e-7, "lone": "\ud800"}) == b'{"a":1e-07,"lone":"\\ud800"}'
    assert jsoncodec.dumps({"k": "ü"}) == '{"k":"ü"}'
