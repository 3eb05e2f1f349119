"""Write coalescing: frames made during one upstream read leave in one write per client socket,
in order, before anything Autobahn writes itself (close frames, pongs); over HTTP, the events of
one read leave as one chunk, before the end of the body."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.logger import globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest
from wire import open_edge, read_frames

from cch.sse import encode_event
from cch.web import HttpResponseSink, ResponsesResource
from cch.writes import WriteBatch, write_batch


def test_without_a_batch_every_frame_is_written_at_once() -> None:
    proto, transport = open_edge()
    proto.send_text("one")
    assert read_frames(transport.value()) == [(1, b"one")]
    proto.send_text("two")
    assert transport.writes == 2


def test_frames_of_a_batch_leave_in_one_write_when_it_ends() -> None:
    proto, transport = open_edge()
    texts = ["é" * n for n in (1, 60, 200, 0)]
    with write_batch:
        for text in texts:
            assert proto.send_text(text) == len(text.encode())
        assert transport.value() == b""
    assert transport.writes == 1
    assert read_frames(transport.value()) == [(1, t.encode()) for t in texts]


def test_nested_batches_write_when_the_outermost_ends() -> None:
    proto, transport = open_edge()
    with write_batch:
        with write_batch:
            proto.send_text("a")
        proto.send_text("b")
        assert transport.value() == b""
    assert read_frames(transport.value()) == [(1, b"a"), (1, b"b")]
    assert transport.writes == 1


def test_a_batch_ended_by_an_exception_still_writes() -> None:
    proto, transport = open_edge()
    with pytest.raises(RuntimeError), write_batch:
        proto.send_text("kept")
        raise RuntimeError("handler blew up")
    assert read_frames(transport.value()) == [(1, b"kept")]
    assert not write_batch.open


def test_a_close_inside_a_batch_goes_after_the_collected_frames() -> None:
    proto, transport = open_edge()
    with write_batch:
        proto.send_text("last event")
        proto.send_close(1011, "internal_error")
    sent = read_frames(transport.value())
    assert sent[0] == (1, b"last event")
    assert sent[1][0] == 8 and struct.unpack("!H", sent[1][1][:2])[0] == 1011
    assert proto.send_text("after close") == 0


def test_a_dropped_connection_still_gets_the_collected_frames_first() -> None:
    proto, transport = open_edge()
    with write_batch:
        proto.send_text("before drop")
        proto.dropConnection(abort=False)
        assert read_frames(transport.value()) == [(1, b"before drop")]
    assert transport.disconnecting


def test_two_sockets_in_one_batch_each_get_their_own_frames() -> None:
    (a, ta), (b, tb) = open_edge(), open_edge()
    with write_batch:
        a.send_text("for a 1")
        b.send_text("for b")
        a.send_text("for a 2")
    assert read_frames(ta.value()) == [(1, b"for a 1"), (1, b"for a 2")]
    assert read_frames(tb.value()) == [(1, b"for b")]
    assert ta.writes == tb.writes == 1


def test_one_writer_failing_to_flush_does_not_keep_the_others_from_writing() -> None:
    batch = WriteBatch()
    flushed: list[str] = []

    class Writer:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def flush_writes(self) -> None:
            flushed.append(self.name)
            if self.fail:
                raise OSError("gone")

    errors: list[Any] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        with batch:
            batch.add(Writer("first", fail=True))
            batch.add(Writer("second"))
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert flushed == ["first", "second"]
    assert any(e.get("log_format") == "write_batch_flush_failed" for e in errors)


def _http_request() -> DummyRequest:
    request = DummyRequest([b"v1", b"responses"])
    request._disconnected = False  # what twisted.web's Request has and the sink checks
    return request


def test_sse_events_of_a_batch_go_out_as_one_chunk_before_the_body_ends() -> None:
    request = _http_request()
    sink = HttpResponseSink(request)
    sink.sse_started(200, {})
    events = ['{"type":"response.created"}', '{"type":"response.completed"}']
    with write_batch:
        for event in events:
            sink.sse_event(event)
        assert request.written == []
        ResponsesResource._finished(request, sink)  # the turn ended inside the same read
    assert request.written == [b"".join(encode_event(e) for e in events)]
    assert request.finished


def test_sse_events_outside_a_batch_are_written_one_by_one() -> None:
    request = _http_request()
    sink = HttpResponseSink(request)
    sink.sse_event('{"type":"a"}')
    sink.sse_event('{"type":"b"}')
    assert request.written == [encode_event('{"type":"a"}'), encode_event('{"type":"b"}')]
