"""The outbound HTTP/1.1 client (cch/http11.py, cch/httpclient.py) as its users see it.

Covered: the request head (framing and Host are the client's, no header injection, names must
be tokens); the response head (status, headers, version, keep-alive or close, interim 1xx
skipped, the head cap); bodies by Content-Length, chunked (hypothesis: any chunks, any split
into reads, one hand-on per read) and until the close; malformed framing failing with
BadResponse; how a request or body ends (never received, failed, data loss, cancelled,
stopped); pausing; a body producer; and, over real sockets, HttpClient's per-origin pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import InvalidHeaderName
from twisted.web.iweb import UNKNOWN_LENGTH

from cch.http11 import MAX_CHUNK_LINE_BYTES, BadResponse, HTTP11Connection, request_head
from cch.httpclient import BytesBody, HttpClient, _OriginPool, _target

CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


class Transport(StringTransport):
    """A StringTransport that tells an abort from a close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Body(Protocol):
    """A body's protocol: each dataReceived call, and each end."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.ends: list[Failure] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.ends.append(reason)
        if not self.done.called:
            self.done.callback(b"".join(self.calls))


class Wire:
    """One connection over a Transport with one POST sent; the body is read as soon as the
    response arrives (unless ``deliver`` is false)."""

    outcome: list[Any]

    def __init__(self, limit: int | None = None, deliver: bool = True, body: Any = b"") -> None:
        self.idled: list[HTTP11Connection] = []
        self.connection = HTTP11Connection(on_idle=self.idled.append)
        self.connection.head_limit = limit or self.connection.head_limit
        self.transport, self.deliver, self.outcome, self.body = Transport(), deliver, [], Body()
        self.connection.makeConnection(self.transport)
        self.request = self.post(body)

    def post(self, body: Any = b"") -> Deferred[Any]:
        length = len(body) if isinstance(body, bytes) else body.length
        d = self.connection.request(request_head(b"POST", b"/", b"up", {}, length), body)
        d.addBoth(self._answered)
        return d

    def _answered(self, result: Any) -> None:
        self.outcome.append(result)
        if self.deliver and not isinstance(result, Failure):
            result.deliverBody(self.body)

    def feed(self, *reads: bytes) -> None:
        for data in reads:
            self.connection.dataReceived(data)

    def drop(self) -> None:
        self.connection.connectionLost(Failure(ConnectionDone()))

    @property
    def response(self) -> Any:
        [response] = self.outcome
        assert not isinstance(response, Failure), response
        return response


def assert_bad(failure: Failure) -> None:
    assert failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived), failure
    assert isinstance(failure.value.reasons[0].value, BadResponse), failure.value.reasons


# --- the request head ----------------------------------------------------------------------


def test_a_simple_post_head_is_the_request_line_the_callers_headers_host_and_length() -> None:
    head = request_head(b"POST", b"/v1/x", b"api.test", {"Content-Type": "a/b", "X-A": "1"}, 2)
    assert head == b"POST /v1/x HTTP/1.1\r\nContent-Type: a/b\r\nX-A: 1\r\nHost: api.test\r\nContent-Length: 2\r\n\r\n"


def test_a_callers_host_wins_and_its_framing_and_connection_headers_are_dropped() -> None:
    headers = {"host": "other:81", "Content-Length": "9", "Transfer-Encoding": "chunked", "Connection": "close"}
    head = request_head(b"POST", b"/", b"api.test", headers, 3)
    assert head == b"POST / HTTP/1.1\r\nHost: other:81\r\nContent-Length: 3\r\n\r\n"


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nX-Evil: 1", "a\rX-Evil: 1"])
def test_line_breaks_in_a_value_become_spaces_and_inject_no_header(value: str) -> None:
    head = request_head(b"POST", b"/", b"h", {"X-A": value}, 0)
    assert head.split(b"\r\n") == [b"POST / HTTP/1.1", b"X-A: a X-Evil: 1", b"Host: h", b"Content-Length: 0", b"", b""]


@pytest.mark.parametrize("name", ["a b", "a:b", "", "\u00e9t\u00e9", "\u540d"])
def test_a_header_name_that_is_not_a_token_is_refused(name: str) -> None:
    with pytest.raises(InvalidHeaderName):
        request_head(b"POST", b"/", b"h", {name: "v"}, 0)


# --- the response head ---------------------------------------------------------------------


def test_the_response_head_gives_status_phrase_headers_and_version() -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 201 Created Here\r\nX-A: 1\r\nset-cookie: a\r\nSet-Cookie: b\r\ncontent-length: 0\r\n\r\n")
    response = wire.response
    assert (response.code, response.phrase, response.version) == (201, b"Created Here", (b"HTTP", 1, 1))
    assert response.headers.getRawHeaders(b"x-a") == [b"1"]
    assert response.headers.getRawHeaders(b"set-cookie") == [b"a", b"b"]
    assert response.length == 0 and wire.body.ends[0].check(ResponseDone)


def test_a_kept_alive_response_idles_the_connection_for_a_second_request() -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert wire.idled == [wire.connection] and wire.connection.reusable
    assert wire.body.calls == [b"ok"] and not wire.transport.disconnecting
    wire.transport.clear()
    wire.post(b"{}")
    assert wire.transport.value().startswith(b"POST / HTTP/1.1\r\n") and not wire.connection.reusable
    wire.feed(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
    assert [r.code for r in wire.outcome] == [200, 202] and wire.connection.reusable


@pytest.mark.parametrize(
    "head", [b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n"]
)
def test_an_http10_or_connection_close_response_closes_the_connection_after_its_body(head: bytes) -> None:
    wire = Wire()
    wire.feed(head + b"\r\nok")
    assert wire.body.calls == [b"ok"] and wire.body.ends[0].check(ResponseDone)
    assert wire.transport.disconnecting and wire.idled == [] and not wire.connection.reusable


INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
)


@pytest.mark.parametrize("split", range(len(INTERIM) + 1))
def test_interim_responses_are_skipped_however_they_are_split(split: int) -> None:
    wire = Wire()
    wire.feed(INTERIM[:split], INTERIM[split:])
    assert wire.response.code == 200 and not wire.response.headers.hasHeader(b"link")
    assert b"".join(wire.body.calls) == b"ok" and wire.body.ends[0].check(ResponseDone)
    assert wire.connection.reusable


def test_a_head_dripping_in_is_refused_once_over_the_limit() -> None:
    wire = Wire(limit=64)
    endless = b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 20
    for i, byte in enumerate(endless[:64]):
        wire.feed(bytes([byte]))
        assert wire.outcome == [], i
    wire.feed(endless[64:68])  # whatever the blank line's bytes count for, this is over
    assert_bad(wire.outcome[0])
    assert wire.transport.aborted


@pytest.mark.parametrize("extra", range(-4, 3))
def test_a_head_near_the_limit_is_judged_the_same_whole_or_dripping(extra: int) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx: " + b"y" * (40 + extra) + b"\r\n\r\n"
    limit = head.index(b"\r\n\r\n") - extra  # TCP decides the split: the verdict must not hang on it
    whole, drip = Wire(limit=limit), Wire(limit=limit)
    whole.feed(head)
    drip.feed(*(head[i : i + 1] for i in range(len(head))))
    assert [isinstance(o, Failure) for o in whole.outcome] == [isinstance(o, Failure) for o in drip.outcome]


# --- bodies --------------------------------------------------------------------------------

FIXED = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789"


@pytest.mark.parametrize("split", range(len(FIXED) + 1))
def test_a_content_length_body_split_anywhere_arrives_whole(split: int) -> None:
    wire = Wire()
    wire.feed(FIXED[:split], FIXED[split:])
    assert b"".join(wire.body.calls) == b"0123456789"
    assert len(wire.body.ends) == 1 and wire.body.ends[0].check(ResponseDone)
    assert wire.connection.reusable


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """Chunks and their encoding: hex sizes in either case, extensions, trailers."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=8))
    extension = st.sampled_from([b"", b";a=b", b"; name=\"v;x\"", b";x", b" ;q=1"])
    encoded = b""
    for chunk in chunks:
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % len(chunk)
        encoded += size.encode() + draw(extension) + b"\r\n" + chunk + b"\r\n"
    trailers = draw(st.lists(st.sampled_from([b"x-t: 1", b"Checksum: abc", b"x-empty:"]), max_size=3))
    encoded += b"0" + draw(extension) + b"\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    return chunks, encoded


@settings(max_examples=300, deadline=None, database=None)
@given(body=chunked_bodies(), data=st.data())
def test_a_chunked_body_split_into_any_reads_arrives_whole_one_call_per_read(
    body: tuple[list[bytes], bytes], data: st.DataObject
) -> None:
    chunks, encoded = body
    stream = CHUNKED + encoded
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    wire = Wire()
    for read in reads:
        before = len(wire.body.calls)
        wire.feed(read)
        assert len(wire.body.calls) - before <= 1
    assert b"".join(wire.body.calls) == b"".join(chunks)
    assert len(wire.body.ends) == 1 and wire.body.ends[0].check(ResponseDone)
    assert wire.idled == [wire.connection] and wire.connection.reusable


def test_all_the_chunks_of_one_read_are_handed_on_in_one_call() -> None:
    wire = Wire()
    wire.feed(CHUNKED)
    wire.feed(b"3\r\nabc\r\nA;x=y\r\n0123456789\r\n1\r\nz\r\n0\r\nx-t: 1\r\n\r\n")
    assert wire.body.calls == [b"abc0123456789z"] and wire.body.ends[0].check(ResponseDone)


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body_whatever_their_content_length(code: int) -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 %d X\r\ncontent-length: 5\r\n\r\n" % code)
    assert wire.response.length == 0 and wire.body.calls == [] and wire.body.ends[0].check(ResponseDone)
    assert wire.connection.reusable


def test_body_bytes_that_arrive_before_deliver_body_are_delivered_then_the_end() -> None:
    wire = Wire(deliver=False)
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd")
    body = Body()
    wire.response.deliverBody(body)
    assert body.calls == [b"ab", b"cd"] and len(body.ends) == 1 and body.ends[0].check(ResponseDone)


@pytest.mark.parametrize("reads", [[b"okHTTP/1.1 200 OK\r\n"], [b"ok", b"surprise"]])
def test_data_after_a_complete_response_closes_the_connection(reads: list[bytes]) -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", *reads)
    assert wire.body.calls == [b"ok"] and wire.body.ends[0].check(ResponseDone)
    assert wire.transport.disconnecting and not wire.connection.reusable


# --- malformed responses -------------------------------------------------------------------

BAD_SIZES = [b"0x10", b"+5", b"-1", b" 5", b"1_0", b"", b"0000000000000010", b"g"]
BAD_CHUNKS = [size + b"\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n" for size in BAD_SIZES] + [
    b"3\r\nabcX\r\n0\r\n\r\n",  # chunk data not followed by CRLF
    b"1;" + b"e" * MAX_CHUNK_LINE_BYTES + b"\r\nx\r\n0\r\n\r\n",  # a chunk line too long
    b"0\r\nx-t: " + b"t" * MAX_CHUNK_LINE_BYTES + b"\r\n\r\n",  # a trailer line too long
]


@pytest.mark.parametrize("stream", BAD_CHUNKS, ids=range(len(BAD_CHUNKS)))
def test_bad_chunk_framing_fails_the_body_and_aborts(stream: bytes) -> None:
    wire = Wire()
    wire.feed(CHUNKED, stream)
    [end] = wire.body.ends
    assert_bad(end)
    delivered = [b"abc"] if stream.startswith(b"3\r\nabc") else []  # the data before the bad CRLF
    assert wire.transport.aborted and wire.body.calls == delivered
    wire.feed(b"5\r\nhello\r\n0\r\n\r\n")
    wire.drop()
    assert wire.body.calls == delivered and len(wire.body.ends) == 1 and not wire.connection.reusable


def test_chunks_before_a_bad_one_in_the_same_read_are_still_handed_on() -> None:
    # Split into two reads "hello" reaches the body before the failure: so it must at once.
    wire = Wire()
    wire.feed(CHUNKED, b"5\r\nhello\r\nzz\r\n")
    assert wire.body.calls == [b"hello"]
    assert_bad(wire.body.ends[0])


@pytest.mark.parametrize("length", [MAX_CHUNK_LINE_BYTES - 1, MAX_CHUNK_LINE_BYTES, MAX_CHUNK_LINE_BYTES + 1])
def test_a_chunk_line_near_the_cap_is_judged_the_same_however_it_is_split(length: int) -> None:
    line = b"1;" + b"e" * (length - 2)
    stream = line + b"\r\nx\r\n0\r\n\r\n"
    outcomes = set()
    for split in (None, *range(length - 2, length + 3)):
        wire = Wire()
        wire.feed(CHUNKED, *((stream,) if split is None else (stream[:split], stream[split:])))
        outcomes.add((b"".join(wire.body.calls), wire.body.ends[0].check(ResponseDone, ResponseFailed)))
    assert len(outcomes) == 1, outcomes


BAD_STATUS = [b"HTTP/2 200 OK", b"ICY 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc OK"]
BAD_FIELDS = [b"x-a: 1\r\n folded", b"x a: 1", b"content-length: 5\r\ncontent-length: 6", b"content-length: 5, 6"]
BAD_FIELDS += [b"content-length: abc", b"content-length: +5", b"content-length: -1"]
BAD_HEADS = [status + b"\r\ncontent-length: 0\r\n" for status in BAD_STATUS]
BAD_HEADS += [b"HTTP/1.1 200 OK\r\n" + field + b"\r\n" for field in BAD_FIELDS]
BAD_HEADS += [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"]


@pytest.mark.parametrize("head", BAD_HEADS, ids=range(len(BAD_HEADS)))
def test_a_bad_response_head_fails_the_request_and_aborts(head: bytes) -> None:
    wire = Wire()
    wire.feed(head + b"\r\n")
    [failure] = wire.outcome
    assert_bad(failure)
    assert wire.transport.aborted
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    wire.drop()
    assert len(wire.outcome) == 1 and not wire.connection.reusable


# --- how a request or a body ends ----------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "kind"),
    [(b"", ResponseNeverReceived), (b"HTTP/1.1 200 OK\r\n", ResponseFailed), (b"HTTP/1.1 100 Continue\r\n\r\n", ResponseFailed)],
)
def test_a_connection_lost_before_the_head_is_never_received_only_if_no_byte_came(received: bytes, kind: type) -> None:
    # As Twisted's parser: bytes of an interim response were received, so it is not "never".
    wire = Wire()
    wire.feed(received)
    wire.drop()
    [failure] = wire.outcome
    assert type(failure.value) is kind, failure


@pytest.mark.parametrize("head", [b"content-length: 10\r\n", b"transfer-encoding: chunked\r\n"])
def test_a_connection_lost_mid_body_fails_the_body(head: bytes) -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n", b"4\r\n0123" if b"chunked" in head else b"0123")
    wire.drop()
    assert wire.body.calls == [b"0123"] and len(wire.body.ends) == 1
    assert type(wire.body.ends[0].value) is ResponseFailed


def test_a_body_without_length_ended_by_the_close_is_potential_data_loss() -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 200 OK\r\n\r\nall ", b"there is")
    wire.drop()
    assert b"".join(wire.body.calls) == b"all there is" and wire.body.ends[0].check(PotentialDataLoss)


def test_cancelling_before_the_head_aborts_and_fails_with_cancelled_error() -> None:
    wire = Wire()
    wire.request.cancel()
    assert wire.outcome[0].check(CancelledError) and wire.transport.aborted
    wire.drop()
    assert len(wire.outcome) == 1


def test_stopping_the_body_aborts_and_its_protocol_hears_once_the_connection_is_gone() -> None:
    wire = Wire()
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123")
    wire.body.transport.stopProducing()
    assert wire.transport.aborted and wire.body.ends == []
    wire.drop()
    assert len(wire.body.ends) == 1 and wire.body.ends[0].check(ResponseFailed)


# --- pausing -------------------------------------------------------------------------------


def test_reading_pauses_from_the_head_until_deliver_body_and_follows_the_body_transport() -> None:
    wire = Wire(deliver=False)
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert wire.transport.producerState == "paused"
    body = Body()
    wire.response.deliverBody(body)
    assert wire.transport.producerState == "producing"
    body.transport.pauseProducing()
    assert wire.transport.producerState == "paused"
    body.transport.resumeProducing()
    assert wire.transport.producerState == "producing"
    wire.feed(b"done")
    assert wire.connection.reusable
    body.transport.pauseProducing()  # over: the connection is the next request's now
    body.transport.stopProducing()
    assert wire.transport.producerState == "producing" and not wire.transport.disconnecting


# --- a body producer -----------------------------------------------------------------------


class Producer(BytesBody):
    """A request body written at once, whose end the test decides."""

    def __init__(self) -> None:
        super().__init__(b"abc")
        self.done: Deferred[None] = Deferred()

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return self.done


def test_a_body_producer_is_registered_streaming_and_unregistered_when_done() -> None:
    producer = Producer()
    wire = Wire(body=producer)
    assert wire.transport.value().endswith(b"Content-Length: 3\r\n\r\nabc")
    assert wire.transport.producer is producer and wire.transport.streaming is True
    producer.done.callback(None)
    assert wire.transport.producer is None and not wire.transport.disconnecting


def test_a_failing_body_producer_fails_the_request_and_aborts() -> None:
    producer = Producer()
    wire = Wire(body=producer)
    producer.done.errback(ValueError("body broke"))
    [failure] = wire.outcome
    assert failure.check(RequestTransmissionFailed)
    assert failure.value.reasons[0].check(ValueError) and wire.transport.aborted


class Overlong(Producer):
    """Writes more than the length it declares: the rest would smuggle a second request."""

    stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data + b"POST /admin HTTP/1.1\r\n\r\n")
        return self.done

    def stopProducing(self) -> None:
        self.stopped = True


def test_a_body_longer_than_its_length_is_never_sent_and_fails_the_request() -> None:
    producer = Overlong()
    wire = Wire(body=producer)
    assert b"/admin" not in wire.transport.value() and wire.transport.aborted and producer.stopped
    [failure] = wire.outcome
    assert failure.check(RequestTransmissionFailed)


def test_a_body_shorter_than_its_length_fails_the_request() -> None:
    producer = Producer()
    producer.length = 10  # declares more than the 3 bytes it writes
    wire = Wire(body=producer)
    producer.done.callback(None)
    [failure] = wire.outcome
    assert failure.check(RequestTransmissionFailed) and wire.transport.aborted


def test_a_body_of_unknown_length_is_refused_before_anything_is_sent() -> None:
    producer = Producer()
    producer.length = UNKNOWN_LENGTH  # type: ignore[assignment]
    failures: list[Failure] = []
    HttpClient(reactor).post("http://127.0.0.1:1/x", {}, producer).addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(ValueError)


def test_a_reader_that_fails_to_start_leaves_no_paused_connection_behind() -> None:
    class Broken(Body):
        def connectionMade(self) -> None:
            raise RuntimeError("the sink went away")

    wire = Wire(deliver=False)
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
    [response] = wire.outcome
    with pytest.raises(RuntimeError):
        response.deliverBody(Broken())
    assert wire.transport.aborted


def test_a_connection_still_writing_its_request_body_is_not_offered_for_the_next() -> None:
    # The server may answer before it has read the whole request (an early 413, say).
    producer = Producer()
    wire = Wire(body=producer)
    wire.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert wire.idled == [] and not wire.connection.reusable


# --- HttpClient over real sockets ----------------------------------------------------------


class Origin(Protocol):
    """Answers each request (a head, no body) with a kept-alive ``ok``; may hang up after."""

    factory: OriginFactory

    def connectionMade(self) -> None:
        self.factory.open.append(self)
        self.factory.connections += 1
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            if self.factory.hang_up:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.factory.open.remove(self)


class OriginFactory(Factory):
    protocol = Origin

    def __init__(self) -> None:
        self.open: list[Origin] = []
        self.connections = 0
        self.hang_up = False
        self.url = ""


async def until(condition: Callable[[], bool]) -> None:
    """Reactor turns (not time) until ``condition`` holds."""
    for _ in range(10_000):
        if condition():
            return
        await deferLater(reactor, 0, lambda: None)
    pytest.fail("condition never held")


def expiry_timers() -> list[Any]:
    return [c for c in reactor.getDelayedCalls() if getattr(c.func, "__func__", None) is _OriginPool._expire]


@pytest_twisted.async_yield_fixture
async def origin() -> Any:
    factory = OriginFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}/v1/x"
    client = HttpClient(reactor)
    yield factory, client
    await client.close()
    await until(lambda: not factory.open)
    await port.stopListening()


async def read(response: Any) -> bytes:
    body = Body()
    response.deliverBody(body)
    data = await body.done
    assert body.ends[0].check(ResponseDone)
    return data


async def post(client: HttpClient, url: str) -> bytes:
    return await read(await client.post(url, {}, b""))


@pytest_twisted.ensureDeferred
async def test_sequential_posts_to_one_origin_share_one_connection(origin: Any) -> None:
    factory, client = origin
    assert [await post(client, factory.url) for _ in range(3)] == [b"ok"] * 3
    assert factory.connections == 1


@pytest_twisted.ensureDeferred
async def test_a_connection_the_server_closed_while_idle_is_dropped_from_the_pool(origin: Any) -> None:
    factory, client = origin
    factory.hang_up = True
    assert await post(client, factory.url) == b"ok"
    await until(lambda: not expiry_timers())  # the client saw the close: nothing kept
    assert await post(client, factory.url) == b"ok"
    assert factory.connections == 2


@pytest_twisted.ensureDeferred
async def test_closing_the_client_closes_idle_connections_and_their_timers(origin: Any) -> None:
    factory, client = origin
    assert await post(client, factory.url) == b"ok"
    assert len(expiry_timers()) == 1 and len(factory.open) == 1
    await client.close()
    assert expiry_timers() == []
    await until(lambda: not factory.open)


@pytest_twisted.ensureDeferred
async def test_no_more_than_max_idle_connections_are_kept(origin: Any) -> None:
    factory, client = origin
    client.max_idle = 2
    responses = await gatherResults([client.post(factory.url, {}, b"") for _ in range(3)])
    assert await gatherResults([Deferred.fromCoroutine(read(r)) for r in responses]) == [b"ok"] * 3
    assert factory.connections == 3
    await until(lambda: len(factory.open) == 2)
    assert len(expiry_timers()) == 2
    assert [await post(client, factory.url) for _ in range(2)] == [b"ok"] * 2
    assert factory.connections == 3


@pytest_twisted.ensureDeferred
async def test_a_closed_client_keeps_no_connection_and_sends_nothing_more(origin: Any) -> None:
    factory, client = origin
    busy = await client.post(factory.url, {}, b"")  # its body not read yet
    await client.close()
    assert await read(busy) == b"ok"
    await until(lambda: not factory.open)  # closed when its response was over, not kept
    assert expiry_timers() == []
    failures: list[Failure] = []
    client.post(factory.url, {}, b"").addErrback(failures.append)
    assert len(failures) == 1 and factory.connections == 1


@pytest.mark.parametrize("url", ["http://ho st:1/x", "http://host\r\nX-Evil: 1/x", "http://host\x00/x"])
def test_a_url_whose_host_has_spaces_or_control_characters_is_a_failed_deferred(url: str) -> None:
    failures: list[Failure] = []
    HttpClient(reactor).post(url, {}, b"").addErrback(failures.append)
    assert len(failures) == 1


def test_spaces_and_line_breaks_in_a_path_or_query_are_sent_percent_encoded() -> None:
    target = _target("http://127.0.0.1:8080/a b\r\nX-Evil: 1?q=c d")
    assert target.path == b"/a%20b%0D%0AX-Evil:%201?q=c%20d" and target.host == b"127.0.0.1:8080"


def test_a_url_with_another_scheme_is_a_failed_deferred() -> None:
    failures: list[Failure] = []
    HttpClient(reactor).post("ftp://127.0.0.1/x", {}, b"").addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(SchemeNotSupported)
