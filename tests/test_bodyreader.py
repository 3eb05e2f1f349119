"""The one body reader (cch/bodyreader.py), driven through the gateway's HTTP client connection
(cch/http11.py) over a StringTransport with time on a Clock: every body the gateway reads (upstream SSE and
JSON, a failover candidate's error, the HTTP tunnel's answer) relies on these behaviours."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from cch.bodyreader import (
    BodyEnd,
    BodyReader,
    Collected,
    Complete,
    Failed,
    Idle,
    Lost,
    TooLarge,
    Unframed,
    collect,
    content_type,
    is_event_stream,
)
from cch.http11 import HTTP11Connection, request_head


class Upstream:
    """One HTTP/1.1 response arriving on a StringTransport, its head already read."""

    def __init__(self, head: bytes) -> None:
        self.transport = StringTransport()
        self.client = HTTP11Connection()
        self.client.makeConnection(self.transport)
        responses: list[Any] = []
        request = request_head(b"POST", b"/v1/responses", b"up", {}, 0)
        self.client.request(request, b"").addCallback(responses.append)
        self.client.dataReceived(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")
        [self.response] = responses

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def drop(self) -> None:
        self.client.connectionLost(Failure(ConnectionDone()))

    @property
    def state(self) -> str:
        """'producing', 'paused' or 'stopped' (the connection cut): what the reader asked."""
        return "stopped" if self.transport.disconnecting else str(self.transport.producerState)


def read(upstream: Upstream, **options: Any) -> tuple[list[bytes], list[BodyEnd], BodyReader]:
    chunks: list[bytes] = []
    ends: list[BodyEnd] = []
    reader = BodyReader(chunks.append, **options)
    reader.read(upstream.response).addCallback(ends.append)
    return chunks, ends, reader


def test_chunks_are_handed_on_as_they_arrive_and_a_framed_end_is_complete() -> None:
    upstream = Upstream(b"content-length: 10\r\n")
    chunks, ends, _ = read(upstream)
    upstream.send(b"01234")
    assert chunks == [b"01234"] and ends == []
    upstream.send(b"56789")
    assert chunks == [b"01234", b"56789"] and ends == [Complete()]


def test_a_body_without_length_ended_by_the_close_is_unframed_not_lost() -> None:
    upstream = Upstream(b"")
    chunks, ends, _ = read(upstream)
    upstream.send(b"all there is")
    upstream.drop()
    assert chunks == [b"all there is"] and ends == [Unframed()]


def test_a_connection_lost_mid_body_is_lost_with_its_reason() -> None:
    upstream = Upstream(b"content-length: 10\r\n")
    chunks, ends, _ = read(upstream)
    upstream.send(b"0123")
    upstream.drop()
    [end] = ends
    assert isinstance(end, Lost) and end.reason.check(ResponseFailed)
    assert chunks == [b"0123"]


def test_pausing_the_reader_pauses_the_connection_and_the_idle_clock() -> None:
    # A slow client pauses the upstream; that silence is the gateway's, not the upstream's.
    clock = Clock()
    upstream = Upstream(b"content-length: 10\r\n")
    _, ends, reader = read(upstream, clock=clock, idle_timeout=5)
    reader.pauseProducing()
    assert upstream.state == "paused"
    clock.advance(60)
    assert ends == []
    reader.resumeProducing()
    assert upstream.state == "producing"
    clock.advance(5)
    assert upstream.state == "stopped"
    upstream.drop()  # the end is reported once the connection is gone, whatever it reports
    assert ends == [Idle(5)]


def test_a_sink_paused_from_the_start_keeps_the_connection_paused() -> None:
    # Twisted resumes the connection once it has handed a body's first bytes to the reader.
    upstream = Upstream(b"content-length: 10\r\n")
    _, _, reader = read(upstream, on_start=lambda reader: reader.pauseProducing())
    assert upstream.state == "paused"
    reader.resumeProducing()
    assert upstream.state == "producing"


def test_each_chunk_restarts_the_idle_clock() -> None:
    clock = Clock()
    upstream = Upstream(b"content-length: 10\r\n")
    chunks, ends, _ = read(upstream, clock=clock, idle_timeout=5)
    for part in (b"01", b"23", b"45"):
        clock.advance(4)
        upstream.send(part)
    clock.advance(4.9)
    assert ends == []
    clock.advance(0.1)
    assert upstream.state == "stopped"
    upstream.send(b"6789")  # in flight when the reader gave up: not read
    upstream.drop()  # the cut connection goes
    assert chunks == [b"01", b"23", b"45"] and ends == [Idle(5)]


def test_a_body_over_the_cap_hands_on_the_first_bytes_then_stops() -> None:
    upstream = Upstream(b"content-length: 10\r\n")
    chunks, ends, _ = read(upstream, max_bytes=6)
    upstream.send(b"0123")
    upstream.send(b"4567")
    assert chunks == [b"0123", b"45"] and upstream.state == "stopped"
    upstream.send(b"89")  # in flight when the reader stopped: not read
    upstream.drop()  # the cut connection goes: the cap is still why it ended
    assert chunks == [b"0123", b"45"] and ends == [TooLarge(6)]


def test_a_body_of_exactly_the_cap_is_complete() -> None:
    upstream = Upstream(b"content-length: 6\r\n")
    chunks, ends, _ = read(upstream, max_bytes=6)
    upstream.send(b"012345")
    assert chunks == [b"012345"] and ends == [Complete()]


def test_a_chunk_handler_that_raises_stops_the_body() -> None:
    def refuse(data: bytes) -> None:
        raise ValueError("not an event")

    upstream = Upstream(b"content-length: 10\r\n")
    ends: list[BodyEnd] = []
    BodyReader(refuse).read(upstream.response).addCallback(ends.append)
    upstream.send(b"0123")
    assert upstream.state == "stopped" and ends == []
    upstream.drop()
    [end] = ends
    assert isinstance(end, Failed) and end.failure.check(ValueError)


def test_cancelling_stops_the_body_and_reports_nothing_more() -> None:
    clock = Clock()
    upstream = Upstream(b"content-length: 10\r\n")
    chunks: list[bytes] = []
    reader = BodyReader(chunks.append, clock=clock, idle_timeout=5)
    finished = reader.read(upstream.response)
    failures: list[Failure] = []
    finished.addErrback(failures.append)
    upstream.send(b"01")
    finished.cancel()
    assert failures and failures[0].check(CancelledError)
    assert upstream.state == "stopped" and clock.getDelayedCalls() == []
    upstream.send(b"23")
    upstream.drop()
    assert chunks == [b"01"] and len(failures) == 1


def test_collect_gathers_the_body_and_how_it_ended() -> None:
    upstream = Upstream(b"content-length: 10\r\n")
    collected: list[Collected] = []
    collect(upstream.response).addCallback(collected.append)
    upstream.send(b"01234")
    upstream.send(b"56789")
    assert collected == [Collected(b"0123456789", Complete())]


def test_collect_keeps_what_arrived_before_a_stall() -> None:
    clock = Clock()
    upstream = Upstream(b"content-length: 10\r\n")
    collected: list[Collected] = []
    collect(upstream.response, clock=clock, idle_timeout=3, max_bytes=64).addCallback(collected.append)
    upstream.send(b"0123")
    clock.advance(3)
    upstream.drop()
    assert collected == [Collected(b"0123", Idle(3))]


@pytest.mark.parametrize(
    ("header", "kind", "stream"),
    [
        (b"content-type: text/event-stream; charset=utf-8\r\n", "text/event-stream; charset=utf-8", True),
        (b"content-type: Text/Event-Stream\r\n", "Text/Event-Stream", True),
        (b"content-type: application/json\r\n", "application/json", False),
        (b"", "", False),
    ],
)
def test_the_content_type_decides_whether_a_body_is_read_as_events(header: bytes, kind: str, stream: bool) -> None:
    upstream = Upstream(header + b"content-length: 0\r\n")
    assert content_type(upstream.response) == kind
    assert is_event_stream(kind) is stream
