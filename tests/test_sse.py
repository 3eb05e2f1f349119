"""Tests for cch.sse: the incremental SSE decoder and the event encoder."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cch.sse import SSEDecoder, encode_event

# ECMAScript String.prototype.trim() whitespace, computed independently of cch.sse.
JS_WHITESPACE = "".join(
    sorted(
        {"\t", "\n", "\v", "\f", "\r", "\u2028", "\u2029", "\ufeff"}
        | {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Zs"}
    )
)


def decode_all(chunks: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    events: list[str] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events + decoder.finish()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def reference_decode(data: bytes) -> list[str]:
    """A whole-body transcription of the reference parser, used as an oracle
    (docs/reference-behaviour.md#sse-parsing)."""
    text = data.decode("utf-8", "replace")
    *complete, rest = re.split(r"\r?\n\r?\n", text)
    if rest.strip(JS_WHITESPACE):
        complete.append(rest)
    events = []
    for event in complete:
        values = [
            line[5:].strip(JS_WHITESPACE)
            for line in re.split(r"\r?\n", event)
            if line.startswith("data:")
        ]
        if values:
            events.append("\n".join(values))
    return events


# --- decoder: framing ---------------------------------------------------------------


def test_single_event_yields_its_data() -> None:
    assert SSEDecoder().feed(b"data: hello\n\n") == ["hello"]


def test_incomplete_event_stays_buffered_until_delimiter() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: hel") == []
    assert decoder.feed(b"lo\n") == []
    assert decoder.feed(b"\n") == ["hello"]


def test_several_events_in_one_chunk_come_back_in_order() -> None:
    body = b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert SSEDecoder().feed(body) == ["1", "2", "3"]


def test_crlf_delimiters_are_accepted() -> None:
    body = b"event: x\r\ndata: a\r\n\r\ndata: b\r\n\r\n"
    assert SSEDecoder().feed(body) == ["a", "b"]


@pytest.mark.parametrize("delimiter", [b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"])
def test_every_blank_line_form_ends_an_event(delimiter: bytes) -> None:
    assert SSEDecoder().feed(b"data: a" + delimiter + b"data: b" + delimiter) == ["a", "b"]


def test_crlf_split_between_chunks_still_delimits() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\n") == ["a"]


def test_delimiter_split_one_byte_at_a_time() -> None:
    body = b"data: a\r\n\r\ndata: b\n\n"
    assert decode_all([body[i : i + 1] for i in range(len(body))]) == ["a", "b"]


def test_lone_cr_is_not_a_line_break() -> None:
    assert SSEDecoder().feed(b"data: a\rdata: b\n\n") == ["a\rdata: b"]


def test_cr_before_crlf_does_not_make_a_blank_line() -> None:
    # "\n\r\r\n" is LF, a line holding "\r", CRLF: not a blank line.
    assert SSEDecoder().feed(b"data: a\n\r\r\ndata: b\n\n") == ["a\nb"]


def test_extra_blank_lines_between_events_are_ignored() -> None:
    assert SSEDecoder().feed(b"\n\n\n\ndata: a\n\n\n\n\ndata: b\n\n") == ["a", "b"]


def test_empty_chunk_is_harmless() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: a\n\n") == ["a"]
    assert decoder.feed(b"") == []


# --- decoder: lines within an event ---------------------------------------------------


def test_event_id_retry_and_comment_lines_are_ignored() -> None:
    body = b": keep-alive\nevent: response.created\nid: 7\nretry: 100\ndata: {}\n\n"
    assert SSEDecoder().feed(body) == ["{}"]


def test_event_without_data_lines_is_skipped() -> None:
    body = b": ping\n\nevent: x\nid: 1\n\ndata: real\n\n"
    assert SSEDecoder().feed(body) == ["real"]


def test_multiple_data_lines_are_joined_with_newline() -> None:
    assert SSEDecoder().feed(b"data: a\ndata: b\r\ndata: c\n\n") == ["a\nb\nc"]


def test_data_value_is_trimmed_on_both_sides() -> None:
    assert SSEDecoder().feed(b"data:   spaced out \t\n\n") == ["spaced out"]


def test_data_without_space_after_colon() -> None:
    assert SSEDecoder().feed(b"data:{}\n\n") == ["{}"]


def test_empty_data_line_yields_empty_event() -> None:
    assert SSEDecoder().feed(b"data:\n\n") == [""]


def test_trim_uses_javascript_whitespace() -> None:
    # NBSP and BOM are trimmed (JS trim); U+001F and NEL are not (Python strip would).
    body = "data: \u00a0\ufeffx\u3000\n\ndata: \x1fy\x85\n\n".encode()
    assert SSEDecoder().feed(body) == ["x", "\x1fy\x85"]


def test_only_lines_starting_with_data_are_kept() -> None:
    body = b" data: indented\nDATA: upper\nmydata: x\ndata: kept\n\n"
    assert SSEDecoder().feed(body) == ["kept"]


def test_done_sentinel_passes_through_as_text() -> None:
    assert SSEDecoder().feed(b"data: [DONE]\n\n") == ["[DONE]"]


# --- decoder: UTF-8 -------------------------------------------------------------------


def test_multibyte_character_split_across_chunks() -> None:
    body = "data: h\u00e9llo \u2603 \U0001f600\n\n".encode()
    for cut in range(len(body) + 1):
        assert decode_all([body[:cut], body[cut:]]) == ["h\u00e9llo \u2603 \U0001f600"]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    assert SSEDecoder().feed(b"data: a\xffb\xe2\x82\n\n") == ["a\ufffdb\ufffd"]


# --- decoder: end of body -------------------------------------------------------------


def test_finish_flushes_trailing_partial_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: tail") == ["a"]
    assert decoder.finish() == ["tail"]


def test_finish_flushes_trailing_event_ending_in_single_newline() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\ndata: tail\r\n") == []
    assert decoder.finish() == ["tail"]


def test_finish_does_not_flush_whitespace_only_remainder() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\n \r\n\t\r") == ["a"]
    assert decoder.finish() == []


def test_finish_skips_remainder_without_data_lines() -> None:
    decoder = SSEDecoder()
    decoder.feed(b": comment only")
    assert decoder.finish() == []


def test_finish_on_empty_decoder_returns_nothing() -> None:
    assert SSEDecoder().finish() == []


def test_decoder_is_reusable_after_finish() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: old")
    assert decoder.finish() == ["old"]
    assert decoder.feed(b"data: new\n\n") == ["new"]


def test_many_events_in_one_large_chunk_scale_linearly() -> None:
    body = b"".join(encode_event(f'{{"n":{i}}}') for i in range(20_000))
    events = SSEDecoder().feed(body)
    assert len(events) == 20_000
    assert events[-1] == '{"n":19999}'


def test_long_event_fed_in_small_chunks_is_decoded_once() -> None:
    payload = "x" * 200_000
    body = encode_event(payload)
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    assert decode_all(chunks) == [payload]


# --- decoder: properties --------------------------------------------------------------

sse_bytes = st.lists(
    st.sampled_from(
        [b"\n", b"\r", b"\r\n", b"data:", b"data: ", b"event: x", b":", b" ", b"a", b"\xc3\xa9"]
        + [b"\xe2\x98\x83", b"\xff", b"\xe2", b"\xc2\xa0", b"id: 1", b"retry: 5"]
    ),
    max_size=60,
).map(b"".join)


@given(body=sse_bytes, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_fragmentation_matches_the_reference_parser(body: bytes, cuts: list[int]) -> None:
    assert decode_all(split_at(body, cuts)) == reference_decode(body)


@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_arbitrary_bytes_decode_the_same_however_split(body: bytes, cuts: list[int]) -> None:
    assert decode_all(split_at(body, cuts)) == decode_all([body])


line_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=20,
).filter(lambda s: s == s.strip(JS_WHITESPACE))
event_data = st.lists(line_text, min_size=1, max_size=4).map("\n".join)


@given(
    events=st.lists(event_data, max_size=8),
    crlf=st.booleans(),
    noise=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_encoded_stream_round_trips_under_any_split(
    events: list[str], crlf: bool, noise: bool, cuts: list[int]
) -> None:
    body = b""
    for data in events:
        if noise:
            body += b": keep-alive\n\nevent: response.output_text.delta\nid: 3\n"
        body += encode_event(data)
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    assert decode_all(split_at(body, cuts)) == events


# --- encoder --------------------------------------------------------------------------


def test_encode_single_line_event() -> None:
    assert encode_event('{"type":"x"}') == b'data: {"type":"x"}\n\n'


def test_encode_multi_line_event_uses_one_data_line_each() -> None:
    assert encode_event("a\nb") == b"data: a\ndata: b\n\n"


def test_encode_accepts_bytes() -> None:
    assert encode_event(b"[DONE]") == b"data: [DONE]\n\n"


def test_encode_utf8() -> None:
    assert encode_event("\u00e9") == b"data: \xc3\xa9\n\n"
