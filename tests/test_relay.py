"""The relayed hot path: upstream WebSocket frames nobody reads reach the client undecoded.

cch.wsframes.relay_text_frames hands runs of upstream frames whose events nobody in the gateway
reads (not ``response.created``, a terminal or an output item) to a relay (cch.upstream.exchange ->
cch.handler.metering -> cch.edge.connection -> cch.edge.protocol.send_frames) without decoding
them; every other frame is delivered as before. What a client receives must not change:

* unit, on an upstream protocol over a StringTransport (tests/test_wsframes.py's ``Upstream``):
  for any mix of frames in any split, what a relaying consumer receives (relayed payloads
  interleaved with delivered ones) is exactly what a consumer without a relay receives; every
  relayed frame is byte-identical to the upstream's and is one the edge would forward byte for
  byte anyway; the relay ending (a terminal) or the socket closing mid-read takes effect at once;
* through the pool's exchange, over real sockets: the read events still go to the sink, the rest
  to its relay, in order; the relay ends with the turn;
* end to end through a real gateway (in-process tunnel, pooled upstream WebSocket): a plain
  client, a permessage-deflate client and a named lane get every event byte for byte, the
  usage row is still made and the next turn works; invalid UTF-8 arrives replaced; a client
  that stops reading still pauses the upstream socket.

Timers run on ``task.Clock``s; nothing sleeps.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import upstream_ws_support as support
from autobahn.twisted.websocket import WebSocketClientFactory
from conftest import RunningGateway, eventually, response_create, within
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_wsframes import Upstream
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from upstream_ws_support import Launch, RecordingSink, ask, ws_config
from wire import RawRecordingClient, frame, read_frames, split

from cch.edge.connection import _Turn
from cch.edge.frames import translate_sse_data
from cch.testing import FakeUpstream
from cch.testing.client import TERMINAL, sdk_deflate_offers
from cch.testing.scripts import SSE_HEADERS, Delay, Event, Raw, Script
from cch.upstream.exchange import KEPT_EVENT_TYPES, READ_EVENT_TYPES
from cch.upstream.ws import OPEN, SocketClosed
from cch.wire import event_type
from cch.wsframes import DeflateResponseAccept, frame_payloads, text_frame_header

launch = support.launch
clock = support.clock
make_pool = support.make_pool


# --- what may be relayed ------------------------------------------------------------------------


def assert_nobody_reads(payload: bytes) -> None:
    """A relayed frame is one the edge would forward byte for byte anyway: valid UTF-8, a JSON
    object (as the gateway itself parses it) whose type is a string nobody in the gateway reads."""
    text = payload.decode("utf-8")  # valid UTF-8, or this raises
    kind = event_type(text)  # the gateway's own reading of an event
    assert kind is not None, payload
    assert kind not in READ_EVENT_TYPES, payload
    out = translate_sse_data(text)  # what the edge makes of it without the relay
    assert (out.text, out.terminal) == (text, None), payload


def reframed(payloads: list[bytes]) -> bytes:
    """The payloads as a server frames them: final, unmasked, minimal lengths."""
    return b"".join(text_frame_header(len(p)) + p for p in payloads)


# --- unit: an upstream socket on a StringTransport -------------------------------------------------


class RelayingConsumer:
    """A socket consumer with a relay, recording everything it gets in one log, in order:
    ``("relay", frames, count, size)`` and ``("deliver", text, size)``.

    Like an exchange delivering to the edge, it can switch its relay on when ``response.created``
    is delivered and off when a terminal is; ``relay_on`` is where it starts. A delivered event
    carrying ``"act":"close"`` closes the socket."""

    read_types = READ_EVENT_TYPES
    kept_types = KEPT_EVENT_TYPES

    def __init__(self, upstream: Upstream, *, relay_on: bool = True, toggles: bool = False) -> None:
        self.upstream = upstream
        self.relay: RelayingConsumer | None = self if relay_on else None
        self.toggles = toggles
        self.log: list[tuple[Any, ...]] = []
        self.kept: list[bytes] = []  # copies of relayed output items, in order
        self.closed: list[tuple[Any, ...]] = []
        self.on_relay: Callable[[], None] | None = None

    def relay_frames(self, data: bytes, start: int, end: int, count: int, size: int) -> None:
        assert self.relay is self  # relay_of() said so
        self.log.append(("relay", bytes(data[start:end]), count, size))
        if self.on_relay is not None:
            self.on_relay()

    def keep(self, payload: bytes) -> None:
        assert self.relay is self  # only a relayed frame is kept
        self.kept.append(bytes(payload))

    def ws_opened(self) -> None:
        pass

    def ws_message(self, text: str, size: int) -> None:
        self.log.append(("deliver", text, size))
        if self.toggles:
            kind = event_type(text)
            if kind == "response.created":
                self.relay = self
            elif kind in TERMINAL:
                self.relay = None
        if '"act":"close"' in text:
            self.upstream.conn.safe_close(1000)

    def ws_closed(self, closed: SocketClosed) -> None:
        self.closed.append((closed.code, closed.reason, closed.failure, closed.status))

    # what the client would receive

    def received(self) -> list[tuple[str, int]]:
        """Every message, relayed or delivered, as (text, size), in order."""
        out: list[tuple[str, int]] = []
        for entry in self.log:
            if entry[0] == "relay":
                chunk = entry[1]
                out.extend(
                    (p.decode("utf-8"), len(p)) for p in frame_payloads(chunk, 0, len(chunk))
                )
            else:
                out.append((entry[1], entry[2]))
        return out

    def relayed(self) -> list[bytes]:
        return [p for e in self.log if e[0] == "relay" for p in frame_payloads(e[1], 0, len(e[1]))]

    def delivered(self) -> list[str]:
        return [e[1] for e in self.log if e[0] == "deliver"]


def _json_or_bytes(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload


def relaying(max_message_bytes: int = 0, **options: Any) -> tuple[Upstream, RelayingConsumer]:
    h = Upstream(max_message_bytes=max_message_bytes)
    consumer = RelayingConsumer(h, **options)
    h.conn.consumer = consumer  # type: ignore[assignment]
    return h, consumer


DELTA = b'{"type":"response.output_text.delta","delta":"hi"}'
CREATED = b'{"type":"response.created","response":{"id":"resp_1"}}'
COMPLETED = b'{"type":"response.completed","response":{"id":"resp_1","status":"completed"}}'


def delta(n: int, text: str = "x") -> bytes:
    return (
        f'{{"type":"response.output_text.delta","sequence_number":{n},"delta":"{text}"}}'.encode()
    )


def test_plain_events_are_relayed_byte_for_byte_in_one_run_and_read_ones_delivered() -> None:
    h, consumer = relaying()
    events = [CREATED, *(delta(i, "é" * i) for i in range(40)), delta(40, "y" * 300), COMPLETED]
    wire = b"".join(frame(e) for e in events)
    h.feed(wire)
    [first, relay, last] = consumer.log
    assert first == ("deliver", CREATED.decode(), len(CREATED))
    kind, chunk, count, size = relay
    assert kind == "relay"
    assert chunk == wire[len(frame(CREATED)) : -len(frame(COMPLETED))]  # the upstream's very bytes
    assert count == 41 and size == sum(len(e) for e in events[1:-1])
    assert last == ("deliver", COMPLETED.decode(), len(COMPLETED))
    assert h.conn.state == OPEN and h.transport.value() == b""


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(CREATED, id="response.created"),
        pytest.param(COMPLETED, id="response.completed"),
        pytest.param(b'{"type":"response.failed","response":{}}', id="response.failed"),
        pytest.param(b'{"type":"response.incomplete","response":{}}', id="response.incomplete"),
        pytest.param(b'{"type":"error","error":{"code":"x"}}', id="error"),
        pytest.param(
            b'{"type":"response.output_text.delta","type":"response.completed"}',
            id="duplicated-type-read-last",
        ),
        pytest.param(
            b'{"type":"response.complete\\u0064","response":{}}', id="u-escaped-read-type"
        ),
        pytest.param(b' {"type":"response.output_text.delta"}', id="space-before-object"),
        pytest.param(b'{"type":"response.output_text.delta","delta":"\xff"}', id="invalid-utf8"),
        pytest.param(
            b'{"type":"response.output_text.delta","delta":"\xed\xa0\x80"}', id="surrogate"
        ),
        pytest.param(
            b'{"type":"response.output_text.delta","delta":"\xe2\x82"}', id="truncated-utf8"
        ),
        pytest.param(
            b'{"type":"response.output_text.delta","delta":"cut short', id="plausible-garbage"
        ),
        pytest.param(b'{"type":"response.output_text.delta"} x', id="trailing-garbage"),
        pytest.param(b'{"type":"response.output_text.delta","d":NaN}', id="nan"),
        pytest.param(b'{"type":["response.output_text.delta"]}', id="type-not-a-string"),
        pytest.param(b'{"type":null}', id="type-null"),
        pytest.param(b'{"delta":"x"}', id="no-type"),
        pytest.param(b'[{"type":"response.output_text.delta"}]', id="array"),
        pytest.param(b"not json at all", id="not-json"),
        pytest.param(b'{"type":"response.output_text.delta', id="no-closing-quote"),
        pytest.param(b"", id="empty"),
    ],
)
def test_events_someone_may_read_are_delivered_decoded_never_relayed(payload: bytes) -> None:
    h, consumer = relaying()
    h.feed(frame(DELTA) + frame(payload) + frame(DELTA))
    assert consumer.log == [
        ("relay", frame(DELTA), 1, len(DELTA)),
        ("deliver", payload.decode("utf-8", errors="replace"), len(payload)),
        ("relay", frame(DELTA), 1, len(DELTA)),
    ]


ITEM_ADDED = b'{"type":"response.output_item.added","item":{"id":"msg_1","type":"message"}}'
ITEM_DONE = b'{"type":"response.output_item.done","item":{"id":"msg_1","type":"message"}}'


def test_output_items_are_relayed_and_a_copy_of_each_kept_in_order() -> None:
    # The edge answers some interrupts itself, from the items (cch/edge/connection.py).
    h, consumer = relaying()
    h.feed(frame(ITEM_ADDED) + frame(DELTA) + frame(ITEM_DONE) + frame(DELTA))
    [(kind, chunk, count, size)] = consumer.log
    assert kind == "relay" and count == 4 and chunk == reframed([ITEM_ADDED, DELTA, ITEM_DONE, DELTA])
    assert consumer.kept == [ITEM_ADDED, ITEM_DONE]


def test_an_item_that_is_not_an_event_is_delivered_not_kept() -> None:
    broken = ITEM_ADDED[:-1]  # no closing brace: not JSON
    h, consumer = relaying()
    h.feed(frame(broken) + frame(DELTA))
    assert consumer.log[0] == ("deliver", broken.decode(), len(broken)) and consumer.kept == []


DEEP = (
    b'{"type":"response.output_text.delta","delta":"x","logprobs":'
    + b"[" * 1010
    + b"]" * 1010
    + b"}"
)
"""A JSON object nested past the gateway's own parser's limit (cch.jsoncodec: "absurd nesting is a
ValueError"), though not past orjson's (1024)."""


def test_an_event_the_gateway_cannot_parse_is_never_relayed_however_deep() -> None:
    text = DEEP.decode()
    assert event_type(text) is None  # the gateway's own reading: not an event
    assert translate_sse_data(text).text != text  # the edge wraps it as text (not byte for byte)
    h, consumer = relaying()
    h.feed(frame(DELTA) + frame(DEEP) + frame(DELTA))
    assert consumer.log == [
        ("relay", frame(DELTA), 1, len(DELTA)),
        ("deliver", text, len(DEEP)),
        ("relay", frame(DELTA), 1, len(DELTA)),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"response.output_text.delta","delta":"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}',
        b'{"type":"errors"}',  # a read type's prefix or extension is another type
        b'{"type":"response.create"}',
        b'{"type":"response.completed.extra"}',
        b'{"type":"response.output_text.delta","delta":"a\\"b\\\\c\\/d\\n"}',
        b'{"type":"response.output_text.delta","delta":"caf\\u00e9"}',
        b'{"type":"response.content_part.added","part":{"type":"output_text"}}',
        b'{"type":"response.completed","type":"response.output_text.delta"}',
        b'{"delta":"x","type":"response.output_text.delta"}',
        b'{ "type" : "response.output_text.delta" } ',
    ],
    ids=[
        "non-ascii",
        "errors",
        "response.create",
        "completed-extra",
        "other-escapes",
        "u-escape",
        "nested-type",
        "duplicated-type-read-first",
        "type-not-first",
        "whitespace",
    ],
)
def test_other_events_are_relayed_whole(payload: bytes) -> None:
    h, consumer = relaying()
    # A ping leaves the rest of its read to Autobahn (delivered); the next read is relayed again.
    h.feed(frame(payload) + frame(payload, opcode=9) + frame(payload), frame(payload))
    relayed = ("relay", frame(payload), 1, len(payload))
    assert consumer.log == [relayed, ("deliver", payload.decode(), len(payload)), relayed]
    assert [op for op, _ in read_frames(h.transport.value())] == [10]  # the ping was answered


def test_the_fast_path_leaves_16_bit_frames_to_the_relay_and_64_bit_ones_to_autobahn() -> None:
    h, consumer = relaying()
    medium = delta(1, "m" * 60_000)
    large = delta(2, "l" * 70_000)
    h.feed(frame(medium) + frame(large) + frame(DELTA))
    assert consumer.received() == [(e.decode(), len(e)) for e in (medium, large, DELTA)]
    assert consumer.log[0] == ("relay", frame(medium), 1, len(medium))
    assert consumer.log[1] == ("deliver", large.decode(), len(large))


def test_fragmented_messages_are_assembled_and_delivered_between_relayed_runs() -> None:
    h, consumer = relaying()
    h.feed(frame(DELTA) + frame(DELTA[:10], fin=False) + frame(DELTA[10:], opcode=0) + frame(DELTA))
    assert consumer.received() == [(DELTA.decode(), len(DELTA))] * 3
    assert [e[0] for e in consumer.log] == ["relay", "deliver", "deliver"]


@pytest.mark.parametrize("size", [101, 300, 70000])
def test_a_frame_over_the_size_limit_is_never_relayed_and_drops_the_socket(size: int) -> None:
    h, consumer = relaying(max_message_bytes=100)
    small = b'{"type":"x","d":"' + b"s" * 80 + b'"}'
    big = b'{"type":"x","d":"' + b"b" * size + b'"}'
    h.feed(frame(small) + frame(big) + frame(small))
    assert consumer.log == [("relay", frame(small), 1, len(small))]
    assert h.transport.disconnecting
    h.lose()
    [(code, _, failure, _)] = consumer.closed
    assert code == 1006 and "exceeds payload limit of 100 octets" in failure


def test_frames_split_at_any_point_arrive_once_and_only_whole_frames_are_relayed() -> None:
    events = [delta(1, "é" * 100), COMPLETED, delta(2), delta(3, "y" * 200)]
    data = b"".join(frame(e) for e in events)
    for cut in range(len(data) + 1):
        h, consumer = relaying()
        h.feed(data[:cut], data[cut:])
        assert consumer.received() == [(e.decode(), len(e)) for e in events], cut
        for entry in consumer.log:
            if entry[0] == "relay":
                assert entry[1] == reframed(list(frame_payloads(entry[1], 0, len(entry[1])))), cut
    # The last cut leaves the whole data to one read: every delta relayed.
    assert consumer.relayed() == [delta(1, "é" * 100), delta(2), delta(3, "y" * 200)]


def test_a_read_that_ends_inside_a_frame_leaves_the_next_reads_on_the_fast_path() -> None:
    """Reads rarely end on a frame boundary under load. The start of a frame the fast path
    takes stays in the buffer until the next read completes it, instead of going to Autobahn,
    which would then parse it and every frame after it the slow way, read after read."""
    events = [delta(n, "z" * 150) for n in range(30)]
    data = b"".join(frame(e) for e in events)
    for chunk in (7, 64, 100, 333, 1000):
        h, consumer = relaying()
        h.feed(*(data[i : i + chunk] for i in range(0, len(data), chunk)))
        assert consumer.received() == [(e.decode(), len(e)) for e in events], chunk
        assert consumer.delivered() == [], chunk  # every one relayed, whatever the cuts
        assert h.proto.current_frame is None and h.proto.data == b""


def test_a_frame_cut_short_by_the_read_is_still_refused_by_autobahn_when_oversized() -> None:
    """Only a frame the fast path would take waits for its rest: one over the limit goes to
    Autobahn at once, which refuses it from its header (1009) before its payload arrives."""
    h, consumer = relaying(max_message_bytes=200)
    oversized = frame(delta(1, "w" * 300))
    h.feed(frame(DELTA) + oversized[:10])
    assert consumer.relayed() == [DELTA]
    assert h.transport.disconnecting  # refused from the header alone


# --- the relay changes mid-read ---------------------------------------------------------------------


def test_after_a_terminal_ends_the_relay_the_rest_of_the_read_is_delivered_not_relayed() -> None:
    h, consumer = relaying(toggles=True)
    h.feed(frame(delta(1)) + frame(delta(2)) + frame(COMPLETED) + frame(delta(3)) + frame(delta(4)))
    assert consumer.log == [
        ("relay", frame(delta(1)) + frame(delta(2)), 2, 2 * len(delta(1))),
        ("deliver", COMPLETED.decode(), len(COMPLETED)),
        ("deliver", delta(3).decode(), len(delta(3))),
        ("deliver", delta(4).decode(), len(delta(4))),
    ]


def test_a_relay_offered_after_the_first_event_takes_the_rest_of_the_same_read() -> None:
    h, consumer = relaying(relay_on=False, toggles=True)
    h.feed(
        frame(delta(0))
        + frame(CREATED)
        + frame(delta(1))
        + frame(delta(2))
        + frame(COMPLETED)
        + frame(delta(3))
    )
    assert consumer.log == [
        ("deliver", delta(0).decode(), len(delta(0))),
        ("deliver", CREATED.decode(), len(CREATED)),
        ("relay", frame(delta(1)) + frame(delta(2)), 2, 2 * len(delta(1))),
        ("deliver", COMPLETED.decode(), len(COMPLETED)),
        ("deliver", delta(3).decode(), len(delta(3))),
    ]


def test_a_consumer_closing_the_socket_mid_read_gets_nothing_more_relayed_or_delivered() -> None:
    h, consumer = relaying()
    closer = b'{"type":"error","act":"close"}'
    h.feed(frame(delta(1)) + frame(closer) + frame(delta(2)) + frame(CREATED) + frame(delta(3)))
    assert consumer.log == [
        ("relay", frame(delta(1)), 1, len(delta(1))),
        ("deliver", closer.decode(), len(closer)),
    ]
    assert h.sent_close_code() == 1000


def test_a_relay_closing_the_socket_stops_the_read_before_the_next_frame() -> None:
    h, consumer = relaying()
    consumer.on_relay = lambda: h.conn.safe_close(1000)  # e.g. the client went away
    h.feed(frame(delta(1)) + frame(delta(2)) + frame(CREATED) + frame(delta(3)))
    assert consumer.log == [("relay", frame(delta(1)) + frame(delta(2)), 2, 2 * len(delta(1)))]
    assert h.sent_close_code() == 1000


def test_a_socket_nobody_listens_to_relays_and_delivers_nothing() -> None:
    h, consumer = relaying()
    h.conn.consumer = None
    h.feed(frame(delta(1)) + frame(CREATED))
    assert consumer.log == [] and h.conn.state == OPEN


# --- unit, differential: any frames, any split, with and without a relay ----------------------------

_PAYLOADS = [
    DELTA,
    b'{"type":"response.output_text.delta","sequence_number":7,"delta":" there","logprobs":[]}',
    b'{"type":"response.in_progress","response":{"id":"r"}}',
    b'{"type":"response.output_text.delta","delta":"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}',
    b'{"type":"errors"}',
    b'{"type":"response.create"}',
    b'{"type":"x"}',
    CREATED,
    COMPLETED,
    b'{"type":"response.failed","response":{}}',
    b'{"type":"response.incomplete","response":{}}',
    b'{"type":"error","error":{"code":"boom"}}',
    b'{"type":"error","act":"close"}',
    b'{"type":"response.output_item.added","item":{"type":"message"}}',
    b'{"type":"response.output_item.done","item":{"type":"message"}}',
    b'{"type":"response.content_part.added","part":{"type":"output_text"}}',
    b'{"type":"response.output_text.delta","type":"response.completed"}',
    b'{"type":"response.completed","type":"response.output_text.delta"}',
    b'{"type":"response.complete\\u0064","response":{}}',
    b'{"type":"response.output_text.delta","delta":"\\"type\\""}',
    b'{"type":"response.output_text.delta","delta":"caf\\u00e9"}',
    b'{"type":"response.output_text.delta","typ\\u0065":"error"}',
    b'{"type":"response.output_text.delta","delta":"\xff"}',
    b'{"type":"response.output_text.delta","delta":"\xed\xa0\x80"}',
    b'{"type":"response.output_text.delta","delta":"\xe2\x82',
    b'{"type":"response.output_text.delta","delta":"half',
    b'{"type":"response.output_text.delta"} x',
    b'{"type":"response.output_text.delta","d":NaN}',
    b'{"type":"response.output_text.delta","d":1e999}',
    b'{"type":"response.output_text.delta","d":"\\ud800"}',
    b'{"type":["x"]}',
    b'{"type":null}',
    b'{"type":"x"}  ',
    b"not json",
    b"",
    b'{ "type":"response.output_text.delta"}',
    b'{"delta":"x","type":"response.output_text.delta"}',
    b'[{"type":"x"}]',
    b'{"type":',
    b'{"type":"response.output_text.delta',
]


def _padded(payload: bytes, pad: int) -> bytes:
    if not pad or b'"act"' in payload:
        return payload
    if payload.endswith(b"}"):
        return payload[:-1] + b',"pad":"' + b"p" * pad + b'"}'
    return payload + b"p" * pad


@st.composite
def _upstream_frames(draw: Any) -> bytes:
    out = b""
    for _ in range(draw(st.integers(min_value=1, max_value=10))):
        payload = _padded(
            draw(st.sampled_from(_PAYLOADS)),
            draw(st.sampled_from([0] * 6 + [60, 130, 300, 70_000])),
        )
        kind = draw(
            st.sampled_from(
                ["text"] * 14
                + ["fragmented", "ping", "pong", "binary", "close", "non-minimal", "rsv", "masked"]
            )
        )
        if kind == "text":
            out += frame(payload)
        elif kind == "fragmented":
            cut = draw(st.integers(min_value=0, max_value=len(payload)))
            out += frame(payload[:cut], fin=False) + frame(payload[cut:], opcode=0)
        elif kind in ("ping", "pong"):
            out += frame(payload[:100], opcode=9 if kind == "ping" else 10)
        elif kind == "binary":
            out += frame(payload, opcode=2)
        elif kind == "close":
            out += frame(b"\x03\xe8bye", opcode=8)
        elif kind == "non-minimal":
            out += frame(payload, length_bytes=2 if len(payload) < 126 else 8)
        elif kind == "rsv":
            out += frame(payload, rsv=1)
        else:
            out += frame(payload, mask=b"\x01\x02\x03\x04")
    return out


def _outcome(consumer: RelayingConsumer, h: Upstream) -> tuple[Any, ...]:
    """Everything observable: what reached the consumer, the frames written back (pongs, close;
    masked with random keys, so compared unmasked), the states, whether the socket was dropped."""
    return (
        consumer.received(),
        consumer.closed,
        read_frames(h.transport.value()),
        h.proto.state,
        h.conn.state,
        h.transport.disconnecting,
    )


@settings(max_examples=400, deadline=None)
@given(
    data=_upstream_frames(),
    limit=st.sampled_from([0, 100, 130, 300, 70_000]),
    cuts=st.lists(st.integers(min_value=0), max_size=5),
    relay_on=st.booleans(),
)
@example(
    data=frame(DELTA) * 3 + frame(COMPLETED) + frame(DELTA) * 2, limit=0, cuts=[], relay_on=True
)
@example(data=frame(DELTA) + frame(CREATED) + frame(DELTA) * 2, limit=0, cuts=[], relay_on=False)
@example(
    data=frame(DELTA) + frame(b'{"type":"error","act":"close"}') + frame(DELTA),
    limit=0,
    cuts=[],
    relay_on=True,
)
def test_with_a_relay_the_client_gets_exactly_what_it_gets_without_one(
    data: bytes, limit: int, cuts: list[int], relay_on: bool
) -> None:
    chunks = split(data, cuts)
    # Without a relay: tests/test_wsframes.py's consumer, extended to act the same way.
    plain = Upstream(max_message_bytes=limit)
    plain_consumer = RelayingConsumer(plain, relay_on=False)
    plain.conn.consumer = plain_consumer  # type: ignore[assignment]
    plain.feed(*chunks)
    assert [e[0] for e in plain_consumer.log] == ["deliver"] * len(plain_consumer.log)

    h, consumer = relaying(limit, relay_on=relay_on, toggles=True)
    h.feed(*chunks)
    assert _outcome(consumer, h) == _outcome(plain_consumer, plain)

    relay = relay_on
    for entry in consumer.log:
        if entry[0] == "deliver":
            kind = event_type(entry[1])
            relay = True if kind == "response.created" else False if kind in TERMINAL else relay
            continue
        _, chunk, count, size = entry
        assert relay, "relayed while the relay was off"
        payloads = list(frame_payloads(chunk, 0, len(chunk)))
        # The upstream's very bytes, headers included.
        assert chunk == reframed(payloads) and chunk in data
        assert count == len(payloads) >= 1 and size == sum(len(p) for p in payloads)
        for payload in payloads:
            assert_nobody_reads(payload)


# --- through the pool's exchange, over real sockets ----------------------------------------------------


class RelaySink(RecordingSink):
    """A sink that offers a relay (as the usage meter in front of the edge does), logging the
    events it is given and the frames relayed to it in one list, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, bytes]] = []
        self.kept: list[bytes] = []
        self.offers = 0

    def sse_event(self, data: str, kind: str | None = None) -> None:
        super().sse_event(data, kind)
        self.log.append(("event", data.encode()))

    def frame_relay(self) -> RelaySink:
        self.offers += 1
        return self

    def relay_frames(self, data: bytes, start: int, end: int, count: int, size: int) -> None:
        chunk = data[start:end]
        payloads = list(frame_payloads(chunk, 0, len(chunk)))
        assert (
            chunk == reframed(payloads)
            and count == len(payloads)
            and size == sum(map(len, payloads))
        )
        self.log.extend(("relayed", p) for p in payloads)

    def keep(self, payload: bytes) -> None:
        self.kept.append(bytes(payload))

    def received(self) -> list[bytes]:
        return [payload for _, payload in self.log]


def texts(events: list[str | bytes]) -> list[bytes]:
    return [e if isinstance(e, bytes) else e.encode() for e in events]


TURN = [
    CREATED.decode(),
    '{"type":"response.in_progress","response":{"id":"resp_1"}}',
    *(delta(i, "é€" * i).decode() for i in range(20)),
    '{"type":"response.output_item.added","item":{"type":"message"}}',
    '{"type":"response.output_text.delta","delta":"caf\\u00e9"}',
    delta(99, "z" * 5000).decode(),
    '{"type":"response.output_text.delta","delta":"cut short',  # not JSON: read (the edge wraps it)
    '{"type":"response.output_item.done","item":{"type":"message"}}',
    COMPLETED.decode(),
]


@pytest_twisted.ensureDeferred
async def test_the_exchange_relays_what_nobody_reads_and_the_sink_still_reads_the_rest(
    fake: FakeUpstream, make_pool: Any, clock: Clock
) -> None:
    fake.clock = upstream_clock = Clock()
    fake.enqueue(
        Script((Event(TURN[0]), Delay(1), *(Event(e) for e in TURN[1:]))),
        Script((Event(CREATED.decode()), Event(COMPLETED.decode()))),
    )
    pool = make_pool()
    exchange = await ask(pool, fake.ws_url)
    sink = RelaySink()
    done = exchange.deliver(sink)
    assert exchange.relay is exchange and sink.offers == 1
    upstream_clock.advance(1)
    await within(done, "the turn")
    assert sink.received() == texts(TURN)
    # The meter, the transcript, the edge: they still see these, parsed.
    assert [event_type(t) for t in sink.texts] == ["response.created", None, "response.completed"]
    assert sum(1 for kind, _ in sink.log if kind == "relayed") == len(TURN) - 3
    # The output items went by whole, and the sink kept a copy of each (for an interrupt).
    assert sink.kept == [t.encode() for t in TURN if "output_item" in t]
    assert exchange.relay is None and exchange.finished  # the relay ended with the turn
    # The socket went back to the pool; its next turn is served as usual.
    again = await ask(pool, fake.ws_url)
    assert again.conn is exchange.conn
    second = RelaySink()
    await within(again.deliver(second), "the second turn")
    assert second.received() == [CREATED, COMPLETED]


@pytest_twisted.ensureDeferred
async def test_a_sink_without_a_relay_gets_every_event_parsed(
    fake: FakeUpstream, make_pool: Any
) -> None:
    fake.enqueue(Script(tuple(Event(e) for e in TURN)))
    pool = make_pool()
    exchange = await ask(pool, fake.ws_url)
    sink = RecordingSink()
    await within(exchange.deliver(sink), "the turn")
    assert exchange.relay is None
    assert texts(sink.texts) == texts(TURN)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_delivery_ends_the_relay(fake: FakeUpstream, make_pool: Any) -> None:
    fake.clock = Clock()
    fake.enqueue(Script((Event(CREATED.decode()), Delay(1), Event(DELTA.decode()))))
    pool = make_pool()
    exchange = await ask(pool, fake.ws_url)
    sink = RelaySink()
    done = exchange.deliver(sink)
    assert exchange.relay is exchange
    done.cancel()  # the client went away
    done.addErrback(lambda _: None)
    assert exchange.relay is None and exchange.conn.relay() is None
    closed = await within(fake.wait_for_ws_close(0), "the upstream socket to close")
    assert closed.close_code == 1000


# --- end to end: a real gateway, a pooled upstream WebSocket, the in-process tunnel -------------------


class RawClient(RawRecordingClient):
    """Every byte the gateway sent after the upgrade, and every message payload as bytes,
    without validating UTF-8 (so invalid bytes would show)."""

    def send_json(self, obj: Any) -> None:
        self.sendMessage(json.dumps(obj).encode(), isBinary=False)

    async def next(self) -> bytes:
        return await within(self.messages.get(), "the next message")

    async def until_terminal(self) -> list[bytes]:
        got: list[bytes] = []
        while not got or event_type(got[-1].decode("utf-8", errors="replace")) not in TERMINAL:
            got.append(await self.next())
        return got

    def frames(self) -> list[tuple[int, bytes]]:
        """(first byte, payload) of every frame the gateway sent (unmasked)."""
        data, pos, out = bytes(self.raw), 0, []
        while pos < len(data):
            length = data[pos + 1] & 0x7F
            head = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if length >= 126:
                length = int.from_bytes(data[pos + 2 : pos + head], "big")
            out.append((data[pos], data[pos + head : pos + head + length]))
            pos += head + length
        return out

    async def close(self) -> None:
        if not self.closed.called:
            self.sendClose(1000)
        await within(self.closed, "the close")


async def connect_raw(running: RunningGateway, *, deflate: bool = False) -> RawClient:
    factory = WebSocketClientFactory(running.ws_url, reactor=reactor)
    factory.protocol = RawClient
    factory.setProtocolOptions(
        autoFragmentSize=0,
        openHandshakeTimeout=0,
        closeHandshakeTimeout=5,
        utf8validateIncoming=False,
    )
    if deflate:
        factory.setProtocolOptions(
            perMessageCompressionOffers=sdk_deflate_offers(),
            perMessageCompressionAccept=DeflateResponseAccept(15),
        )
    parts = urlsplit(running.ws_url)
    proto: RawClient = await within(
        TCP4ClientEndpoint(reactor, parts.hostname, parts.port).connect(factory), "the connection"
    )
    return await within(proto.opened, "the upgrade")


USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 7,
         "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 18}  # fmt: skip
E2E_CREATED = '{"type":"response.created","sequence_number":0,"response":{"id":"resp_e2e","status":"in_progress"}}'
E2E_COMPLETED = json.dumps(
    {
        "type": "response.completed",
        "response": {"id": "resp_e2e", "status": "completed", "model": "gpt-5.5", "usage": USAGE},
    },
    separators=(",", ":"),
)
# A turn in three upstream writes (batches), so that a read of the gateway's starts at each.
E2E_BATCHES: list[list[str | bytes]] = [
    [
        '{"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_e2e"}}',
        '{"type":"response.output_item.added","sequence_number":2,"item":{"id":"msg_1","type":"message","content":[]}}',
        *(
            f'{{"type":"response.output_text.delta","sequence_number":{n},"delta":"{"é€😀" * n}"}}'
            for n in range(3, 40)
        ),
        '{"type":"response.output_text.delta","sequence_number":40,"delta":"caf\\u00e9"}',
        '{"type":"response.output_text.delta","sequence_number":41,"delta":"'
        + "w" * 5000
        + '"}',  # 16-bit length
    ],
    [
        '{"type":"response.output_text.delta","sequence_number":42,"delta":"' + "W" * 70000 + '"}'
    ],  # 64-bit length
    [
        '{"type":"response.output_text.done" , "sequence_number":43}',
        '{"type":"response.content_part.done","sequence_number":44,"part":{"type":"output_text"}}',
        *(
            f'{{"type":"response.output_text.delta","sequence_number":{n},"delta":"late"}}'
            for n in range(45, 48)
        ),
        E2E_COMPLETED,
    ],
]
E2E_NOT_READ = [
    e
    for e in texts([e for batch in E2E_BATCHES for e in batch])
    if event_type(e.decode()) not in READ_EVENT_TYPES
]
E2E_TURN = texts([E2E_CREATED, *(e for batch in E2E_BATCHES for e in batch)])


def batched(first: str, *batches: list[str | bytes]) -> Script:
    """The first event, then each batch in one go once the test advances the fake's clock (the
    exchange offers the relay once it delivered the first event)."""
    steps: list[Any] = [Event(first)]
    for batch in batches:
        steps += [Delay(1), *(Raw(e) if isinstance(e, bytes) else Event(e) for e in batch)]
    return Script(tuple(steps), headers=SSE_HEADERS)


class Rig:
    """A gateway (in-process tunnel, upstream WebSocket) on a Clock in front of the fake, whose
    Delay steps run on ``upstream_clock``; the usage rows it records; the payloads the edge's
    turns took through the relay (to be sure a test exercises it)."""

    def __init__(self, fake: FakeUpstream, running: RunningGateway, upstream_clock: Clock) -> None:
        self.fake = fake
        self.running = running
        self.upstream_clock = upstream_clock
        self.rows: list[Any] = []
        self.relayed: list[bytes] = []
        self.clients: list[RawClient] = []

    async def connect(self, *, deflate: bool = False) -> RawClient:
        client = await connect_raw(self.running, deflate=deflate)
        self.clients.append(client)
        return client

    async def streamed(
        self, client: RawClient, frame_: dict[str, Any], batches: list[list[Any]]
    ) -> list[bytes]:
        """Send ``frame_``; the messages of the scripted turn, each batch read before the next
        is written."""
        client.send_json(frame_)
        got = [await client.next()]
        for batch in batches:
            self.upstream_clock.advance(1)
            for _ in batch:
                got.append(await client.next())
        return got

    async def next_turn_completes(self, client: RawClient, **fields: Any) -> None:
        client.send_json(response_create(**fields))
        events = await client.until_terminal()
        assert json.loads(events[-1])["type"] == "response.completed"
        if "stream_id" in fields:
            assert all(json.loads(e)["stream_id"] == fields["stream_id"] for e in events)

    async def idle(self) -> None:
        await within(self.running.service.handler.wait_idle(), "the handler to go idle")


@pytest_twisted.async_yield_fixture
async def rig(fake: FakeUpstream, launch: Launch, monkeypatch: pytest.MonkeyPatch) -> Any:
    fake.clock = upstream_clock = Clock()
    running = await launch(ws_config(fake, "in-process"), Clock())
    made = Rig(fake, running, upstream_clock)
    ledger = running.service.ledger
    record = ledger.record
    ledger.record = lambda row: (made.rows.append(row), record(row))[1]  # type: ignore[method-assign]
    relay_frames = _Turn.relay_frames

    def spy(turn: _Turn, data: bytes, start: int, end: int, count: int, size: int) -> None:
        made.relayed.extend(frame_payloads(data, start, end))
        relay_frames(turn, data, start, end, count, size)

    monkeypatch.setattr(_Turn, "relay_frames", spy)
    yield made
    # A failed test may leave a turn stuck (and a client not reading): the clients go first, so
    # the gateway's stop does not wait on them.
    for client in made.clients:
        if not client.closed.called:
            client.transport.abortConnection()
            await within(client.closed, "the client to go")


@pytest_twisted.ensureDeferred
async def test_a_plain_client_gets_every_upstream_event_byte_for_byte(rig: Rig) -> None:
    rig.fake.enqueue(batched(E2E_CREATED, *E2E_BATCHES))
    client = await rig.connect()
    got = await rig.streamed(client, response_create(), E2E_BATCHES)
    assert got == E2E_TURN
    # On the wire: one final text frame per event, exactly as the upstream framed it.
    assert bytes(client.raw) == reframed(E2E_TURN)
    assert rig.relayed and set(rig.relayed) <= set(E2E_NOT_READ)
    # The turn still completed for the gateway: its usage row, then the next turn on the socket.
    await rig.idle()
    [row] = rig.rows
    assert (row.status, row.response_id) == ("completed", "resp_e2e")
    assert (row.input_tokens, row.output_tokens) == (11, 7)
    await rig.next_turn_completes(client)
    assert len(rig.fake.ws_connections) == 1
    assert [r.connection_index for r in rig.fake.requests] == [0, 0]
    assert [r.status for r in rig.rows] == ["completed", "completed"]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_deflate_client_gets_every_upstream_event_inflated_and_identical(rig: Rig) -> None:
    rig.fake.enqueue(batched(E2E_CREATED, *E2E_BATCHES))
    client = await rig.connect(deflate=True)
    assert client.websocket_extensions_in_use
    got = await rig.streamed(client, response_create(), E2E_BATCHES)
    assert got == E2E_TURN
    frames = client.frames()
    # Every frame compressed (RSV1), the relayed ones too.
    assert [first for first, _ in frames] == [0xC1] * len(E2E_TURN)
    assert sum(len(p) for _, p in frames) < sum(map(len, E2E_TURN)) / 3
    assert rig.relayed and set(rig.relayed) <= set(E2E_NOT_READ)
    await rig.idle()
    assert [r.status for r in rig.rows] == ["completed"]
    await rig.next_turn_completes(client)  # the same zlib stream goes on
    await client.close()


@pytest_twisted.ensureDeferred
async def test_a_named_lane_gets_every_upstream_event_with_its_stream_id_last(rig: Rig) -> None:
    rig.fake.enqueue(batched(E2E_CREATED, *E2E_BATCHES))
    client = await rig.connect()
    got = await rig.streamed(client, response_create(stream_id="lane-1"), E2E_BATCHES)
    assert got == [e[:-1] + b',"stream_id":"lane-1"}' for e in E2E_TURN]
    assert all(list(json.loads(e))[-1] == "stream_id" for e in got)
    assert rig.relayed and set(rig.relayed) <= set(E2E_NOT_READ)
    await rig.idle()
    assert [r.status for r in rig.rows] == ["completed"]
    await rig.next_turn_completes(client, stream_id="lane-1")
    await rig.next_turn_completes(client)  # the default lane, without stream_id
    await client.close()


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_from_the_upstream_reaches_the_client_replaced(rig: Rig) -> None:
    bad = b'{"type":"response.output_text.delta","delta":"a\xffb\xed\xa0\x80c\xe2\x82"}'
    fine = b'{"type":"response.output_text.delta","delta":"ok"}'
    batch: list[Any] = [fine, bad, fine, E2E_COMPLETED]
    rig.fake.enqueue(batched(E2E_CREATED, batch))
    client = await rig.connect()
    got = await rig.streamed(client, response_create(), [batch])
    replaced = bad.decode("utf-8", errors="replace").encode("utf-8")
    assert b"\xef\xbf\xbd" in replaced
    assert got == [E2E_CREATED.encode(), fine, replaced, fine, E2E_COMPLETED.encode()]
    assert bad not in bytes(client.raw)
    assert rig.relayed == [fine, fine]
    await rig.idle()
    assert [r.status for r in rig.rows] == ["completed"]
    await rig.next_turn_completes(client)
    await client.close()


@pytest.mark.parametrize("stream_id", [None, "lane-1"], ids=["default-lane", "named-lane"])
@pytest_twisted.ensureDeferred
async def test_an_upstream_event_that_is_not_json_reaches_the_client_as_it_would_without_the_relay(
    rig: Rig, stream_id: str | None
) -> None:
    """Non-JSON upstream data becomes an ``output_text.delta`` carrying it
    (docs/reference-behaviour.md#sse-parsing; tests/test_faults.py's garbage test): whether it
    looks like an event (``{"type":"...``) must not matter, and in a named lane it carries the
    lane's stream_id like every other frame (docs/protocol.md#lanes). (JSON nested too deeply
    for the gateway's parser, :data:`DEEP`, is not sent here: the fake upstream's own parse of
    what it sends raises RecursionError and drops the socket.)"""
    garbage = '{"type":"response.output_text.delta","delta":"cut short'
    batch: list[Any] = [garbage, E2E_COMPLETED]
    rig.fake.enqueue(batched(E2E_CREATED, batch))
    client = await rig.connect()
    fields = {} if stream_id is None else {"stream_id": stream_id}
    got = await rig.streamed(client, response_create(**fields), [batch])
    expected = {"type": "response.output_text.delta", "delta": garbage, **fields}
    assert _json_or_bytes(got[1]) == expected
    await client.close()


# --- backpressure: a client that does not read still pauses the upstream socket ---------------------


def upstream_reading(running: RunningGateway) -> bool:
    [conn] = running.service.ws_pool.sockets
    assert conn._proto is not None
    return conn._proto.transport in reactor.getReaders()


BATCH = 16  # deltas of 4 KB per upstream write: 64 KB, one read of the gateway's


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_upstream_socket_while_events_are_relayed(
    rig: Rig,
) -> None:
    batches = 40  # 2.5 MB in all: far more than the (fixed) socket buffers below hold
    deltas = [delta(n, f"{n:05d}" + "z" * 4000).decode() for n in range(batches * BATCH)]
    # Each batch is written when the test advances the fake's clock: a read of the gateway's then
    # starts on a frame boundary, where the relay takes whole frames.
    script = batched(
        E2E_CREATED, *(deltas[b * BATCH : (b + 1) * BATCH] for b in range(batches)), [E2E_COMPLETED]
    )
    rig.fake.enqueue(script)
    running = rig.running
    client = await rig.connect()
    [proto] = running.service.edge_factory.live
    # Fixed socket buffers on the client side of the edge (no autotuning up to tens of MB), so a
    # few batches fill them.
    client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client.send_json(response_create())
    assert await client.next() == E2E_CREATED.encode()
    client.transport.pauseProducing()  # the client stops reading its socket
    try:
        edge = proto.edge
        assert edge is not None and edge.in_flight is not None
        turn = edge.in_flight
        written = 0
        while not edge.paused:
            assert written < batches, "the client's socket never pushed back"
            rig.upstream_clock.advance(1)
            written += 1
            target = 1 + written * BATCH
            await eventually(
                lambda t=target: edge.paused or turn.frames >= t, "the batch to be relayed"
            )
        # What filled the client's buffers came mostly through the relay.
        assert len(rig.relayed) > (turn.frames - 1) // 2 > 0
        # TCP backpressure reaches the upstream: its socket is not read while the client is
        # stuck, however much the upstream still sends.
        assert not upstream_reading(running)
        while written <= batches:
            rig.upstream_clock.advance(1)
            written += 1
        assert not upstream_reading(running) and edge.paused
        assert turn.frames < len(deltas)
    finally:
        client.transport.resumeProducing()
    got = await client.until_terminal()
    assert [E2E_CREATED.encode(), *got] == texts([E2E_CREATED, *deltas, E2E_COMPLETED])
    await eventually(
        lambda: not edge.paused and upstream_reading(running),
        "the upstream socket to be read again",
    )
    await rig.idle()
    assert [r.status for r in rig.rows] == ["completed"]
    await rig.next_turn_completes(client)
    await client.close()
