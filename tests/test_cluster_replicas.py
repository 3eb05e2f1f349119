"""Three real replicas share one key's limits through one Redis and one PostgreSQL ledger (issue
15's "Done when"): each replica is ``twistd -n cch --config FILE`` in a child process, clients
are real WebSocket clients to ``/v1/responses``, and the one upstream is the fake in this
process, which counts the turns in flight across all replicas and holds their streams until the
test releases them (tests/replicas_support.py).

What a client sees of a limit is the error frame of docs/usage.md#limits (the connection stays
open); a refused turn never reaches the upstream. Redis and PostgreSQL are the machine's own
(127.0.0.1:6379 and :5432, database ``test``); without them these tests skip, and under
``CI=true`` they fail.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import within
from replicas_support import (
    HOLD,
    LEASE_TTL,
    Cluster,
    Key,
    Progress,
    Replica,
    create,
    metric,
    poll,
)
from test_limits_e2e import rate_limited
from test_ownership_e2e import not_found_event
from test_plugin import Ended
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from usage_e2e_support import rows
from usage_fixtures import PostgresDatabase, postgres_admin

from cch.cluster.testing import (
    RedisProxy,
    close_test_redis,
    delete_prefix,
    open_test_redis,
)
from cch.testing import FakeUpstream
from cch.testing.client import ResponsesWSClient

BUSY = 5  # Retry-After of a concurrency refusal (cch.keylimits.BUSY_RETRY_AFTER)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PostgresDatabase]:
    """A schema of this test's own in the machine's PostgreSQL; skips (fails under CI=true)
    when it does not answer. Dropped once the replicas are gone."""
    database = PostgresDatabase(tmp_path, postgres_admin())
    try:
        yield database
    finally:
        database.cleanup()


@pytest_twisted.async_yield_fixture
async def cluster(
    fake: FakeUpstream, tmp_path: Path, redis_url: str, ledger: PostgresDatabase
) -> AsyncIterator[Cluster]:
    redis = open_test_redis(reactor, redis_url)  # its prefix is the replicas' key_prefix
    running = Cluster(fake, tmp_path, redis, redis_url, ledger.url)
    yield running
    try:
        await running.close()
    finally:
        await close_test_redis(redis)  # deletes every key under the prefix


async def turn(client: ResponsesWSClient, frame: dict[str, Any]) -> list[Any]:
    """Send one turn; its events up to the terminal one."""
    client.send_json(frame)
    events: list[Any] = await within(
        Deferred.fromCoroutine(client.recv_turn()), "the end of a turn"
    )
    return events


async def first_event(client: ResponsesWSClient, frame: dict[str, Any]) -> dict[str, Any]:
    """Send one turn; its first event: ``response.created`` when it was admitted, the error
    event (its only event) when it was refused."""
    client.send_json(frame)
    event: dict[str, Any] = await within(client.recv(), "the first event of a turn")
    return event


def completed_id(events: list[Any]) -> str:
    assert events[-1]["type"] == "response.completed", events[-1]
    response_id: str = events[-1]["response"]["id"]
    return response_id


def busy(frame: dict[str, Any], limit: int) -> None:
    """A refusal of ``max_concurrent_turns = limit``, exactly as Codex reads it."""
    rate_limited(frame, BUSY)
    assert f"at most {limit} turns at once" in frame["error"]["message"], frame


def per_minute(frame: dict[str, Any], limit: int) -> None:
    """A refusal of ``requests_per_minute = limit``, exactly as Codex reads it: its Retry-After
    is when the oldest request of the window leaves it."""
    retry_after = int(frame.get("headers", {}).get("retry-after", 0))
    assert 1 <= retry_after <= 60, frame
    rate_limited(frame, retry_after)
    assert f"{limit} requests per minute" in frame["error"]["message"], frame


# -- 1. max_concurrent_turns ---------------------------------------------------------------------


class Agent:
    """One client running its turns one after another as Codex does: a turn refused with a
    ``retry-after`` is sent again once that many seconds have passed on ``clock`` (the
    clients' time, which the test advances)."""

    def __init__(
        self, name: str, client: ResponsesWSClient, turns: int, clock: Clock, progress: Progress
    ) -> None:
        self.name = name
        self.client = client
        self.clock = clock
        self.progress = progress
        self.sent: str | None = None  # the input of the attempt waiting for its answer
        self.backing_off = False
        self.completed: list[str] = []  # inputs of the turns that completed
        self.refusals: list[dict[str, Any]] = []
        self.done = Deferred.fromCoroutine(self._run(turns))
        self.done.addBoth(self._ended)

    async def _run(self, turns: int) -> None:
        for number in range(turns):
            attempt = 0
            while True:
                self.sent = f"{HOLD}: {self.name}, turn {number}, try {attempt}"
                self.progress.changed()
                events = await turn(self.client, create(self.sent))
                text, self.sent = self.sent, None
                last = events[-1]
                if last["type"] == "response.completed":
                    self.completed.append(text)
                    break
                self.refusals.append(last)
                attempt += 1
                self.backing_off = True
                self.progress.changed()
                await deferLater(self.clock, int(last["headers"]["retry-after"]), lambda: None)
                self.backing_off = False

    def __repr__(self) -> str:
        return f"<{self.name}: sent={self.sent!r} backing_off={self.backing_off} completed={len(self.completed)} done={self.done.called}>"

    def _ended(self, result: Any) -> Any:
        self.progress.changed()
        return result


@pytest_twisted.ensureDeferred
async def test_twelve_clients_on_three_replicas_never_have_more_than_max_concurrent_turns_upstream(
    cluster: Cluster,
) -> None:
    """``max_concurrent_turns = 4`` and 12 clients round-robin over 3 replicas, two turns each,
    every stream held upstream until the test releases the lot: at no moment does the upstream
    have more than 4 turns in flight, the 5th gets the 429 frame with ``retry-after: 5``, and
    every client, retrying after it, finishes its turns."""
    limit, turns = 4, 2
    alice = Key("alice", {"max_concurrent_turns": limit})
    replicas = await cluster.start([alice])
    upstream = cluster.upstream
    progress = Progress()
    upstream.listeners.append(progress.changed)
    retry_clock = Clock()
    clients = [await cluster.connect(replicas[i % 3], alice) for i in range(12)]
    agents = [
        Agent(f"client {i}", client, turns, retry_clock, progress)
        for i, client in enumerate(clients)
    ]

    def held_upstream(agent: Agent) -> bool:
        return agent.sent is not None and any(
            not r.finished for r in upstream.with_input(agent.sent)
        )

    def settled() -> bool:
        return all(a.done.called or a.backing_off or held_upstream(a) for a in agents)

    rounds = 0
    try:
        while not all(a.done.called for a in agents):
            # Release only once every client has its turn held upstream, waits to retry, or is
            # done: no turn is on its way then, so each round holds every turn it admitted.
            await progress.until(settled, "every client held upstream, waiting to retry, or done")
            assert upstream.in_flight <= limit
            upstream.release()  # the held turns end...
            retry_clock.advance(BUSY)  # ...while the refused ones are sent again
            rounds += 1
            assert rounds <= 100, f"the clients make no progress: {agents}"
    finally:
        for agent in agents:  # a failed test leaves no client waiting for a frame
            if not agent.done.called:
                agent.done.addErrback(lambda _: None)
                agent.done.cancel()

    for agent in agents:
        await agent.done  # raises what went wrong in a client
    assert upstream.peak == limit  # reached (12 clients at once), never passed
    assert all(len(a.completed) == turns for a in agents)
    refusals = [frame for a in agents for frame in a.refusals]
    assert refusals, "12 clients at once, 4 slots: some must have been refused"
    for frame in refusals:
        busy(frame, limit)
    # A refused turn never reached the upstream; each completed one did, once.
    assert sorted(r.body["input"] for r in upstream.fake.requests) == sorted(
        t for a in agents for t in a.completed
    )
    assert all(client.close_info is None for client in clients)  # refusals leave connections open


# -- 2. requests_per_minute ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_per_minute_admits_exactly_n_turns_across_three_replicas(
    cluster: Cluster,
) -> None:
    """``requests_per_minute = 6``: 18 turns sent at once over 6 connections on 3 replicas;
    exactly 6 are served, the 12 others get the 429 frame with when the window frees."""
    limit = 6
    alice = Key("alice", {"requests_per_minute": limit})
    replicas = await cluster.start([alice])
    clients = [await cluster.connect(replicas[i % 3], alice) for i in range(6)]
    for i, client in enumerate(clients):
        for number in range(3):  # queued on the connection, answered in order
            client.send_json(create(f"client {i}, turn {number}"))
    terminals = []
    for client in clients:
        for _ in range(3):
            events = await within(Deferred.fromCoroutine(client.recv_turn()), "the end of a turn")
            terminals.append(events[-1])
    served = [t for t in terminals if t["type"] == "response.completed"]
    refused = [t for t in terminals if t["type"] == "error"]
    assert (len(served), len(refused)) == (limit, 18 - limit), terminals
    for frame in refused:
        per_minute(frame, limit)
    assert sorted(r.response_id for r in cluster.upstream.fake.requests) == sorted(
        t["response"]["id"] for t in served
    )
    assert all(client.close_info is None for client in clients)


# -- 3. a replica killed while it holds slots ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_killed_replicas_slots_are_admitted_again_within_lease_ttl(
    cluster: Cluster,
) -> None:
    """``max_concurrent_turns = 3``, all three held upstream by r1; SIGKILL r1. Its leases
    outlive it (the next turn is still refused), then expire: within ``lease_ttl`` plus one
    renewal interval the other replicas admit three turns again, and still not a fourth."""
    limit = 3
    alice = Key("alice", {"max_concurrent_turns": limit})
    r1, r2, r3 = await cluster.start([alice])
    fake = cluster.upstream.fake
    on_r1 = [await cluster.connect(r1, alice) for _ in range(limit)]
    for i, client in enumerate(on_r1):
        assert (await first_event(client, create(f"{HOLD}: r1 #{i}")))["type"] == "response.created"
    probe = await cluster.connect(r2, alice)
    busy(await first_event(probe, create("before the kill")), limit)

    r1.signal("KILL")
    killed_at = reactor.seconds()
    assert await r1.ended() == Ended(exit_code=None, signal=signal.SIGKILL)
    for i, client in enumerate(on_r1):
        closed = await within(client.wait_closed(), "r1's clients to lose their connection")
        assert not closed.was_clean
        await within(fake.wait_for_cancelled(i), "r1's upstream requests to be cut")
    # The replica is gone, its leases are not: they hold the slots until they expire.
    busy(await first_event(probe, create("just after the kill")), limit)

    attempts = 0

    async def admitted() -> bool:
        nonlocal attempts
        attempts += 1
        event = await first_event(probe, create(f"{HOLD}: r2 after the kill, try {attempts}"))
        if event["type"] == "error":
            busy(event, limit)
            return False
        assert event["type"] == "response.created", event
        return True

    admitted_at = await poll(
        admitted, "a turn admitted on r2 once r1's leases expired", 10 * LEASE_TTL
    )
    waited = admitted_at - killed_at
    assert waited <= LEASE_TTL + LEASE_TTL / 3, f"r1's slots came back {waited:.2f}s after the kill"
    # All three of r1's slots are back, and the limit still holds across r2 and r3.
    on_r3 = [await cluster.connect(r3, alice) for _ in range(limit - 1)]
    for i, client in enumerate(on_r3):
        assert (await first_event(client, create(f"{HOLD}: r3 #{i}")))["type"] == "response.created"
    extra = await cluster.connect(r2, alice)
    busy(await first_event(extra, create("one too many")), limit)
    assert cluster.upstream.in_flight == limit

    cluster.upstream.release()
    for client in (probe, *on_r3):
        events = await within(Deferred.fromCoroutine(client.recv_turn()), "a held turn to end")
        assert events[-1]["type"] == "response.completed"


# -- 4. response-id ownership --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_response_id_made_on_one_replica_is_refused_to_another_key_on_another(
    cluster: Cluster,
) -> None:
    """Alice's response, made on r1, named by Bob on r2: the canonical
    ``previous_response_not_found`` event, and the id never reaches the upstream. Alice
    continues from it on r2 (forwarded)."""
    alice, bob = Key("alice"), Key("bob")
    r1, r2, _ = await cluster.start([alice, bob])
    upstream = cluster.upstream
    on_r1 = await cluster.connect(r1, alice)
    rid = completed_id(await turn(on_r1, create("alice's secret", store=True)))

    bob_on_r2 = await cluster.connect(r2, bob)
    refused = await turn(bob_on_r2, create("show me", store=True, previous_response_id=rid))
    assert refused == [not_found_event(rid)]
    assert upstream.forwarded(rid) == [] and upstream.with_input("show me") == []
    assert bob_on_r2.close_info is None

    alice_on_r2 = await cluster.connect(r2, alice)
    follow_up = await turn(alice_on_r2, create("go on", store=True, previous_response_id=rid))
    completed_id(follow_up)
    assert [r.body["input"] for r in upstream.forwarded(rid)] == ["go on"]


# -- 5. the ledger -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_ledger_has_one_row_per_turn_of_every_replica_one_drained_mid_turn(
    cluster: Cluster, ledger: PostgresDatabase
) -> None:
    """Turns on all three replicas (``max_concurrent_turns = 2``): six served, then two held
    on r3 and one refused on r1; r3 gets SIGTERM mid-turn, its streams are released, its
    clients get their terminal events and a 1001 close, and it stops cleanly. Once every
    replica has stopped, the shared ledger holds exactly one row per terminal event a client
    saw, each written by the replica that served it."""
    limit = 2
    alice = Key("alice", {"max_concurrent_turns": limit})
    r1, r2, r3 = await cluster.start([alice])
    upstream = cluster.upstream
    clients = {
        r: [await cluster.connect(r, alice), await cluster.connect(r, alice)] for r in (r1, r2, r3)
    }
    seen: list[tuple[str, dict[str, Any]]] = []  # (replica, terminal event) of every turn
    for replica, pair in clients.items():
        for i, client in enumerate(pair):
            events = await turn(client, create(f"{replica.name} #{i}"))
            completed_id(events)
            seen.append((replica.name, events[-1]))

    held = clients[r3]
    for i, client in enumerate(held):
        assert (await first_event(client, create(f"{HOLD}: r3 #{i}")))["type"] == "response.created"
    refused = await turn(clients[r1][0], create("one too many"))
    busy(refused[-1], limit)
    seen.append((r1.name, refused[-1]))

    r3.signal("TERM")
    await within(Deferred.fromCoroutine(r3.logged("shutdown_received")), "r3's drain to start")
    upstream.release()
    for client in held:
        events = await within(
            Deferred.fromCoroutine(client.recv_turn()), "a held turn to end in the drain"
        )
        completed_id(events)
        seen.append((r3.name, events[-1]))
    for client in held:
        closed = await within(client.wait_closed(), "r3 to close its clients")
        assert (closed.code, closed.reason) == (1001, "going_away")
    await stopped_cleanly(r3)

    # r1 and r2 write what they hold when they stop, too (and stop as cleanly).
    for replica in (r1, r2):
        replica.signal("TERM")
    for replica in (r1, r2):
        await stopped_cleanly(replica)
    found = rows(ledger)
    assert len(found) == len(seen) == 9
    assert len({row["request_id"] for row in found}) == 9
    assert sorted((row["replica"], row["status"], row["response_id"]) for row in found) == sorted(
        (name, "completed", event["response"]["id"])
        if event["type"] == "response.completed"
        else (name, "refused", None)
        for name, event in seen
    )
    assert [(row["error_code"], row["key"]) for row in found if row["status"] == "refused"] == [
        ("rate_limit_exceeded", "alice")
    ]
    assert Counter(row["replica"] for row in found) == {"r1": 3, "r2": 2, "r3": 4}


async def stopped_cleanly(replica: Replica) -> None:
    """``replica`` stopped on SIGTERM without an error: twistd shuts down cleanly, then
    re-raises the signal for a supervisor to see (tests/test_plugin.py), so the process ends
    by SIGTERM rather than with exit code 0."""
    ended = await within(Deferred.fromCoroutine(replica.ended()), f"{replica.name} to exit", 30)
    assert ended == Ended(exit_code=None, signal=signal.SIGTERM), replica.child.output
    assert "Server Shut Down." in replica.child.output
    assert "Traceback" not in replica.child.output


# -- 6. Redis stopped and started again -----------------------------------------------------------


def unavailable(frame: dict[str, Any]) -> None:
    """The 503 frame of a turn refused because the limits cannot be checked (docs/scaling.md)."""
    message = frame.get("error", {}).get("message")
    assert isinstance(message, str) and "unreachable" in message, frame
    assert frame == {
        "type": "error",
        "status": 503,
        "error": {"type": "server_error", "code": "cluster_unavailable", "message": message},
        "headers": {"retry-after": str(BUSY)},
    }


@pytest_twisted.ensureDeferred
async def test_while_redis_is_down_refuse_replicas_answer_503_local_ones_serve_their_share_and_all_recover(
    cluster: Cluster,
) -> None:
    """``requests_per_minute = 6``, Redis reached through a proxy the test stops: r1
    (``on_redis_down = "refuse"``) answers new turns with the 503 ``cluster_unavailable``
    frame; r2 and r3 (``"local"``, 3 expected replicas) serve 2 turns each, their share, and
    refuse the 3rd. Redis comes back empty: every replica reconnects by itself, admits turns
    through Redis again, and its metrics show the outage and the answers given without Redis."""
    alice = Key("alice", {"requests_per_minute": 6})
    proxy = RedisProxy(reactor, cluster.redis_url)
    proxy.start()
    try:
        replicas = await cluster.start(
            [alice],
            redis_url=proxy.url,
            each=[
                {"on_redis_down": "refuse"},
                {"on_redis_down": "local"},
                {"on_redis_down": "local"},
            ],
        )
        r1, r2, r3 = replicas
        clients = {r: await cluster.connect(r, alice) for r in replicas}
        requests = cluster.redis_key(alice, "requests")

        async def admitted_through_redis() -> int:
            return int(await cluster.redis.execute("ZCARD", requests))

        for replica in replicas:
            completed_id(await turn(clients[replica], create(f"before, on {replica.name}")))
        assert await admitted_through_redis() == 3

        await proxy.stop()  # Redis is down for the replicas
        [refused] = await turn(clients[r1], create("during, on r1"))
        unavailable(refused)
        for replica in (r2, r3):
            for i in range(2):
                completed_id(
                    await turn(clients[replica], create(f"during, on {replica.name} #{i}"))
                )
            per_minute(
                (await turn(clients[replica], create(f"during, on {replica.name} #2")))[-1], 2
            )
        expected = {r1: ("refuse", 1), r2: ("local", 3), r3: ("local", 3)}
        for replica, (mode, answered) in expected.items():
            samples = await cluster.scrape(replica)
            assert metric(samples, "cch_redis_up") == 0
            assert metric(samples, "cch_cluster_redis_down") == 1
            assert metric(samples, "cch_cluster_redis_outages_total") == 1, (
                f"{replica.name}: one outage, counted once"
            )
            assert metric(samples, "cch_cluster_fallbacks_total", mode=mode) == answered, replica
        refusals = await cluster.scrape(r1)
        assert (
            metric(refusals, "cch_key_refusals_total", key="alice", reason="cluster_unavailable")
            == 1
        )

        # Redis comes back, empty (a restart without persistence).
        await delete_prefix(cluster.redis, cluster.prefix)
        proxy.start()

        async def reconnected() -> bool:
            up = [metric(await cluster.scrape(r), "cch_redis_up") for r in replicas]
            return up == [1, 1, 1]

        await poll(reconnected, "every replica reconnected to Redis by itself", 30)
        for replica in replicas:
            completed_id(await turn(clients[replica], create(f"after, on {replica.name}")))
        assert await admitted_through_redis() == 3  # counted in Redis again, not locally
        for replica, (mode, answered) in expected.items():
            samples = await cluster.scrape(replica)
            assert metric(samples, "cch_cluster_redis_down") == 0
            assert metric(samples, "cch_cluster_redis_outages_total") == 1, (
                f"{replica.name}: one outage, counted once"
            )
            assert metric(samples, "cch_cluster_fallbacks_total", mode=mode) == answered, replica
            assert (metric(samples, "cch_redis_connects_total") or 0) >= 2
        assert all(client.close_info is None for client in clients.values())
    finally:
        await proxy.stop()
