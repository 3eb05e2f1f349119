"""Transcript bounds and replay decisions, without sockets."""

from __future__ import annotations

from cch.handler.continuity import NEW_SOCKET, prepare, warmup_events
from cch.jsoncodec import loads
from cch.transcript import Origin, Transcript, TranscriptStore, as_items
from cch.wire import previous_not_found

WS = Origin("p", "websocket", 7, stored=False)


def test_as_items_normalizes_a_string_input() -> None:
    assert as_items("hi") == [{"role": "user", "content": "hi"}]
    assert as_items(None) == []
    assert as_items([1]) == [1]


def test_replay_input_walks_the_chain_oldest_first() -> None:
    t = Transcript(1 << 20, 10)
    t.add("a", None, ["in-a"], ["out-a"], WS)
    t.add("b", "a", ["in-b"], ["out-b"], WS)
    assert t.replay_input("b") == ["in-a", "out-a", "in-b", "out-b"]
    assert t.replay_input("zzz") is None


def test_entries_bound_evicts_oldest_and_breaks_the_chain() -> None:
    t = Transcript(1 << 20, 2)
    t.add("a", None, [], [], WS)
    t.add("b", "a", [], [], WS)
    t.add("c", "b", [], [], WS)
    assert list(t.records) == ["b", "c"] and "a" in t.evicted
    assert t.replay_input("c") is None
    assert t.knows("a") and t.origin("a") == WS


def test_bytes_bound_holds() -> None:
    t = Transcript(4096, 100)
    for n in range(50):
        t.add(f"r{n}", None, ["x" * 500], [], WS)
        assert t.bytes <= 4096
    assert len(t.records) < 10


def test_a_cycle_in_ids_is_not_replayed_forever() -> None:
    t = Transcript(1 << 20, 10)
    t.add("a", "b", [], [], WS)
    t.add("b", "a", [], [], WS)
    assert t.replay_input("a") is None


def test_origin_resolvability() -> None:
    assert WS.resolvable_by("p", 7)
    assert not WS.resolvable_by("p", 8) and not WS.resolvable_by("p", None)
    stored = Origin("p", "http", None, stored=True)
    assert stored.resolvable_by("p", None) and stored.resolvable_by("p", NEW_SOCKET)
    assert not stored.resolvable_by("q", None)
    assert not Origin("p", "local", None, stored=True).resolvable_by("p", None)


def test_prepare_passes_through_replays_or_refuses() -> None:
    t = Transcript(1 << 20, 10)
    t.add("a", None, ["in-a"], ["out-a"], WS)
    body = {"previous_response_id": "a", "input": ["in-b"], "store": False}
    assert prepare(t, body, "p", 7) == (body, None)
    replayed, error = prepare(t, body, "p", NEW_SOCKET)
    assert error is None and replayed == {"input": ["in-a", "out-a", "in-b"], "store": False}
    unknown = {"previous_response_id": "elsewhere", "input": []}
    assert prepare(t, unknown, "p", None) == (unknown, None)
    t.add("c", "gone", [], [], WS)
    sent, error = prepare(t, {"previous_response_id": "c"}, "p", None)
    assert sent is None and error == previous_not_found("c")
    assert prepare(None, body, "p", None) == (body, None)


def test_store_drops_and_caps_sessions() -> None:
    store = TranscriptStore(1 << 20, 10, max_sessions=2)
    store.get("s1").add("a", None, [], [], WS)
    store.get("s2")
    store.get("s1")
    store.get("s3")
    assert list(store.sessions) == ["s1", "s3"]
    store.drop("s1")
    assert list(store.sessions) == ["s3"]


def test_local_warmup_is_a_well_formed_pair() -> None:
    response_id, events = warmup_events({"model": "m", "store": False})
    created, completed = (loads(e) for e in events)
    assert created["type"] == "response.created" and created["response"]["id"] == response_id
    assert completed["type"] == "response.completed" and completed["response"]["output"] == []
    assert completed["response"]["usage"]["total_tokens"] == 0
