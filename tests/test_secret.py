"""Tests for cch.secret: the internal secret, reserved headers and eligibility checks."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from cch.secret import (
    CLIENT_TRANSPORT,
    INTERNAL_SECRET,
    RESERVED_HEADERS,
    RESERVED_PREFIX,
    SECRET_ENV,
    WS_FORWARD,
    WS_SESSION,
    header_value,
    is_reserved,
    is_websocket_client,
    marker_headers,
    new_secret,
    session_id_from,
    verify_internal_request,
)

SECRET = "0b7c0c39-5f5e-4c43-9d3f-2a1b9b8c6d01"


def as_dict(headers: dict[str, str]) -> dict[str, str]:
    return dict(headers)


def as_raw(headers: dict[str, str]) -> dict[bytes, list[bytes]]:
    return {k.encode(): [v.encode()] for k, v in headers.items()}


def as_twisted(headers: dict[str, str]) -> Headers:
    return Headers({k: [v] for k, v in headers.items()})


HEADER_KINDS = [as_dict, as_raw, as_twisted]


def tunneled(**overrides: str) -> dict[str, str]:
    headers = {
        CLIENT_TRANSPORT: "websocket",
        WS_FORWARD: "1",
        WS_SESSION: "ws-session_1",
        INTERNAL_SECRET: SECRET,
    }
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v is not None}


# --- constants and new_secret ---------------------------------------------------------


def test_reserved_names_are_the_four_lower_case_markers() -> None:
    assert RESERVED_HEADERS == {
        "x-cch-client-transport",
        "x-cch-responses-ws-forward",
        "x-cch-responses-ws-session",
        "x-cch-internal-secret",
    }
    assert all(name.startswith(RESERVED_PREFIX) for name in RESERVED_HEADERS)
    assert SECRET_ENV == "CCH_RESPONSES_WS_INTERNAL_SECRET"


def test_new_secret_is_a_uuid4_and_unique() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert re.fullmatch(r"[0-9a-f-]{36}", secret)
        assert secret[14] == "4"


# --- header_value ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_header_value_is_case_insensitive_for_every_header_kind(kind: Any) -> None:
    headers = kind({"X-CCH-Internal-Secret": "abc"})
    assert header_value(headers, "x-cch-internal-secret") == "abc"
    assert header_value(headers, "X-Cch-Internal-Secret") == "abc"


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_header_value_missing_is_none(kind: Any) -> None:
    assert header_value(kind({"other": "1"}), WS_FORWARD) is None


def test_header_value_joins_repeated_values() -> None:
    assert header_value({b"x-a": [b"1", b"2"]}, "X-A") == "1, 2"
    assert header_value(Headers({"x-a": ["1", "2"]}), "x-a") == "1, 2"
    assert header_value({"X-A": "1", "x-a": "2"}, "x-a") == "1, 2"


def test_header_value_returns_str_for_bytes_input() -> None:
    assert header_value({b"x-a": [b"v"]}, "x-a") == "v"


def test_header_value_tolerates_invalid_utf8() -> None:
    value = header_value(Headers({b"x-a": [b"\xff"]}), "x-a")
    assert isinstance(value, str)
    assert value != "\ufffd"


def test_header_value_of_none_is_none() -> None:
    assert header_value(None, "x-a") is None


# --- verify_internal_request ------------------------------------------------------------


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_verify_accepts_secret_and_forward_flag(kind: Any) -> None:
    assert verify_internal_request(kind(tunneled()), SECRET)


def test_verify_rejects_when_no_secret_configured() -> None:
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: ""}), "")
    assert not verify_internal_request(tunneled(), "")


def test_verify_rejects_missing_secret_header() -> None:
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: None}), SECRET)


def test_verify_rejects_empty_secret_header() -> None:
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: ""}), SECRET)


def test_verify_rejects_wrong_secret_of_same_length() -> None:
    wrong = SECRET[:-1] + ("0" if SECRET[-1] != "0" else "1")
    assert len(wrong) == len(SECRET)
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: wrong}), SECRET)


def test_verify_rejects_secret_prefix_and_extension() -> None:
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: SECRET[:-1]}), SECRET)
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: SECRET + "0"}), SECRET)


@pytest.mark.parametrize("flag", [None, "", "0", "true", " 1", "1, 1", "01"])
def test_verify_rejects_forward_flag_other_than_exactly_1(flag: str | None) -> None:
    assert not verify_internal_request(tunneled(**{WS_FORWARD: flag}), SECRET)


def test_verify_compares_non_ascii_without_error() -> None:
    assert not verify_internal_request(tunneled(**{INTERNAL_SECRET: "\u00e9" * 36}), SECRET)
    assert verify_internal_request(tunneled(**{INTERNAL_SECRET: "s\u00e9cret"}), "s\u00e9cret")


@given(provided=st.text(max_size=40))
def test_verify_is_true_only_for_the_exact_secret(provided: str) -> None:
    assert verify_internal_request(tunneled(**{INTERNAL_SECRET: provided}), SECRET) == (
        provided == SECRET
    )


# --- is_websocket_client ----------------------------------------------------------------


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_tunneled_request_is_websocket_client(kind: Any) -> None:
    assert is_websocket_client(kind(tunneled()), SECRET)


@pytest.mark.parametrize("value", ["WEBSOCKET", "WebSocket", " websocket ", "websocket\t"])
def test_transport_marker_is_trimmed_and_case_insensitive(value: str) -> None:
    assert is_websocket_client(tunneled(**{CLIENT_TRANSPORT: value}), SECRET)


@pytest.mark.parametrize("value", [None, "", "http", "web socket", "websockets"])
def test_other_transport_is_not_websocket_client(value: str | None) -> None:
    assert not is_websocket_client(tunneled(**{CLIENT_TRANSPORT: value}), SECRET)


def test_spoofed_marker_without_secret_is_not_websocket_client() -> None:
    spoof = {CLIENT_TRANSPORT: "websocket", WS_FORWARD: "1"}
    assert not is_websocket_client(spoof, SECRET)


def test_spoofed_marker_with_wrong_secret_is_not_websocket_client() -> None:
    assert not is_websocket_client(tunneled(**{INTERNAL_SECRET: new_secret()}), SECRET)


def test_marker_without_forward_flag_is_not_websocket_client() -> None:
    assert not is_websocket_client(tunneled(**{WS_FORWARD: "0"}), SECRET)


# --- session_id_from ---------------------------------------------------------------------


def test_session_id_is_trimmed() -> None:
    assert session_id_from({WS_SESSION: " ws-session_1.2-3 "}) == "ws-session_1.2-3"


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_session_id_lookup_is_case_insensitive(kind: Any) -> None:
    assert session_id_from(kind({"X-CCH-Responses-WS-Session": "abc"})) == "abc"


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "abc/def", "abc def", "a,b", "caf\u00e9", "abc\ndef", "a" * 129],
)
def test_malformed_session_id_is_none(value: str | None) -> None:
    headers = {} if value is None else {WS_SESSION: value}
    assert session_id_from(headers) is None


def test_session_id_of_exactly_128_chars_is_accepted() -> None:
    assert session_id_from({WS_SESSION: "x" * 128}) == "x" * 128


def test_session_id_length_is_checked_after_trim() -> None:
    assert session_id_from({WS_SESSION: "  " + "x" * 128 + "  "}) == "x" * 128


@given(st.from_regex(r"[A-Za-z0-9_.-]{1,128}", fullmatch=True))
def test_any_well_formed_session_id_round_trips(session_id: str) -> None:
    assert session_id_from({WS_SESSION: session_id}) == session_id


# --- is_reserved and marker_headers --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["x-cch-internal-secret", "X-CCH-Tenant", "x-cch-", b"X-Cch-Client-Transport"]
)
def test_x_cch_names_are_reserved(name: str | bytes) -> None:
    assert is_reserved(name)


@pytest.mark.parametrize("name", ["authorization", "x-cchx", "cch-x", "x-api-key", b"host"])
def test_other_names_are_not_reserved(name: str | bytes) -> None:
    assert not is_reserved(name)


def test_marker_headers_carry_all_four_reserved_headers() -> None:
    assert marker_headers("sess-1", SECRET) == {
        CLIENT_TRANSPORT: "websocket",
        WS_FORWARD: "1",
        WS_SESSION: "sess-1",
        INTERNAL_SECRET: SECRET,
    }


def test_marker_headers_omit_empty_session_and_secret() -> None:
    assert marker_headers("", "") == {CLIENT_TRANSPORT: "websocket", WS_FORWARD: "1"}


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_marker_headers_pass_verification(kind: Any) -> None:
    headers = kind(marker_headers("sess-1", SECRET))
    assert is_websocket_client(headers, SECRET)
    assert session_id_from(headers) == "sess-1"
    assert not is_websocket_client(headers, new_secret())
