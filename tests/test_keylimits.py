"""Per-key limits (cch/keylimits.py): each limit refuses exactly at its threshold and admits
again when the Clock moves past its window; refusals render the exact bytes Codex reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cch.config import ClientKey, KeyLimitsConfig, PriceConfig
from cch.keylimits import (
    BUSY_RETRY_AFTER,
    ConnectionLease,
    KeyLimiter,
    MemoryLimitStore,
    Refused,
    TurnLease,
)
from cch.usage.prices import PriceSheet


def sheet(**per_token: float) -> PriceSheet:
    """A price sheet of USD per token (input and output alike), by model."""
    return PriceSheet(
        PriceConfig(model=model, input_per_mtok=usd * 1e6, output_per_mtok=usd * 1e6) for model, usd in per_token.items()
    )


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def clock_at(iso: str) -> Clock:
    clock = Clock()
    clock.advance(epoch(iso))
    return clock


def key(name: str = "alice", **limits: Any) -> ClientKey:
    return ClientKey(name=name, key=f"sk-cch-{name}-0123456789", limits=KeyLimitsConfig(**limits))


def result(d: Deferred[Any]) -> Any:
    """The result a memory store gives at once (no reactor turn needed)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def limiter(iso: str = "2026-12-06T12:00:00Z", prices: PriceSheet | None = None) -> tuple[KeyLimiter, Clock]:
    clock = clock_at(iso)
    return KeyLimiter(clock, prices or sheet(), MemoryLimitStore()), clock


def turn(lim: KeyLimiter, k: ClientKey | None, model: str | None = "gpt-5") -> Any:
    return result(lim.begin_turn(k, model))


def admitted(lim: KeyLimiter, k: ClientKey | None, model: str | None = "gpt-5") -> TurnLease:
    outcome = turn(lim, k, model)
    assert isinstance(outcome, TurnLease), outcome
    return outcome


def refused(lim: KeyLimiter, k: ClientKey | None, model: str | None = "gpt-5") -> Refused:
    outcome = turn(lim, k, model)
    assert isinstance(outcome, Refused), outcome
    return outcome


# -- connections ---------------------------------------------------------------------------------


def test_max_connections_refuses_the_one_over_and_admits_after_a_release() -> None:
    """The handshake is refused 429 with Retry-After once the key holds max_connections."""
    lim, _ = limiter()
    alice = key(max_connections=2)
    first, second = (result(lim.open_connection(alice)) for _ in range(2))
    assert isinstance(first, ConnectionLease) and isinstance(second, ConnectionLease)
    third = result(lim.open_connection(alice))
    assert third == Refused(
        429,
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        f"Rate limit reached for key 'alice': at most 2 WebSocket connections at once. Please try again in {BUSY_RETRY_AFTER}s.",
        BUSY_RETRY_AFTER,
        "max_connections",
    )
    assert third.headers() == ((b"retry-after", b"5"),)
    first.release()
    assert isinstance(result(lim.open_connection(alice)), ConnectionLease)
    assert isinstance(result(lim.open_connection(alice)), Refused)


def test_connection_release_is_idempotent() -> None:
    """Every path that closes a connection may release it; only the first frees a slot."""
    lim, _ = limiter()
    alice = key(max_connections=1)
    lease = result(lim.open_connection(alice))
    lease.release()
    lease.release()
    again = result(lim.open_connection(alice))
    assert isinstance(again, ConnectionLease)
    assert isinstance(result(lim.open_connection(alice)), Refused)


def test_connections_of_another_key_do_not_count() -> None:
    lim, _ = limiter()
    result(lim.open_connection(key("alice", max_connections=1)))
    assert isinstance(result(lim.open_connection(key("bob", max_connections=1))), ConnectionLease)


# -- concurrency ---------------------------------------------------------------------------------


def test_max_concurrent_turns_refuses_the_one_over_and_admits_after_finish() -> None:
    lim, _ = limiter()
    alice = key(max_concurrent_turns=2)
    first = admitted(lim, alice)
    admitted(lim, alice)
    over = refused(lim, alice)
    assert (over.status, over.code, over.reason, over.retry_after) == (429, "rate_limit_exceeded", "max_concurrent_turns", 5)
    assert over.message == "Rate limit reached for key 'alice': at most 2 turns at once. Please try again in 5s."
    first.finish(10, None)
    admitted(lim, alice)
    refused(lim, alice)


def test_finish_is_idempotent() -> None:
    """A turn ended twice (terminal, then the connection closing) frees one slot and counts its
    tokens once."""
    lim, _ = limiter()
    alice = key(max_concurrent_turns=1, tokens_per_day=100)
    lease = admitted(lim, alice)
    lease.finish(60, None)
    lease.finish(60, None)
    assert lease.done
    second = admitted(lim, alice)  # 60 < 100: the tokens counted once
    refused(lim, alice)  # and the slot was freed once
    second.finish(40, None)
    assert refused(lim, alice).reason == "tokens_per_day"


# -- requests per minute -------------------------------------------------------------------------


def test_requests_per_minute_is_a_sliding_window() -> None:
    """The (limit+1)-th request in 60 s is refused until the oldest one leaves, then each
    further request waits for the next one to leave; a refused request is not counted."""
    lim, clock = limiter("2026-12-06T23:59:30Z")
    alice = key(requests_per_minute=3)
    for _ in range(3):
        admitted(lim, alice).finish(None, None)
        clock.advance(10)
    assert refused(lim, alice).retry_after == 30  # the first leaves at +60, now +30
    clock.advance(29.5)
    over = refused(lim, alice)
    assert over.retry_after == 1  # half a second rounds up
    assert over.message == "Rate limit reached for key 'alice': 3 requests per minute. Please try again in 1s."
    clock.advance(0.5)  # exactly 60 s after the first: it has left
    admitted(lim, alice)
    assert refused(lim, alice).retry_after == 10  # the second (at +10) leaves at +70
    clock.advance(10)
    admitted(lim, alice)


# -- tokens --------------------------------------------------------------------------------------


def test_tokens_per_minute_refuses_at_the_limit_and_the_turn_in_flight_finishes() -> None:
    """Checked before a turn against recorded usage: a turn started under the limit finishes
    and its tokens count, even past the limit."""
    lim, clock = limiter("2026-12-06T23:59:30Z")
    alice = key(tokens_per_minute=1000)
    first = admitted(lim, alice)
    second = admitted(lim, alice)  # both start with nothing recorded
    first.finish(600, None)
    clock.advance(10)
    admitted(lim, alice).finish(399, None)  # 600 used: under the limit
    clock.advance(10)
    second.finish(1, None)  # the window now holds exactly the limit
    over = refused(lim, alice)
    assert (over.reason, over.retry_after) == ("tokens_per_minute", 40)  # 600 at +0 leaves at +60
    assert over.message == (
        "Rate limit reached for key 'alice': 1000 of 1000 tokens used in the last minute. Please try again in 40s."
    )
    clock.advance(39)
    refused(lim, alice)
    clock.advance(1)
    admitted(lim, alice)


def test_tokens_per_minute_retry_after_waits_for_enough_tokens_to_leave() -> None:
    lim, clock = limiter()
    alice = key(tokens_per_minute=1000)
    for tokens in (300, 300, 900):
        admitted(lim, alice).finish(tokens, None)
        clock.advance(10)
    # 1500 used; the first two leaving leaves 900 < 1000: at +70, now +30.
    assert refused(lim, alice).retry_after == 40
    clock.advance(30)
    refused(lim, alice)  # the first left at +60: 1200 still used
    clock.advance(10)
    admitted(lim, alice)


def test_tokens_per_day_refuses_until_the_next_utc_midnight() -> None:
    lim, clock = limiter("2026-12-06T23:59:30Z")
    alice = key(tokens_per_day=1000)
    admitted(lim, alice).finish(999, None)
    lease = admitted(lim, alice)  # 999 < 1000
    lease.finish(1, None)
    over = refused(lim, alice)
    assert (over.status, over.code, over.reason, over.retry_after) == (429, "rate_limit_exceeded", "tokens_per_day", 30)
    assert over.message == (
        "Rate limit reached for key 'alice': 1000 of 1000 tokens used this UTC day. Please try again in 30s."
    )
    clock.advance(29.9)
    assert refused(lim, alice).retry_after == 1
    clock.advance(0.1)  # 2026-12-07T00:00:00Z
    admitted(lim, alice)


def test_tokens_of_a_turn_count_on_the_day_it_finishes() -> None:
    lim, clock = limiter("2026-12-06T23:59:30Z")
    alice = key(tokens_per_day=1000)
    lease = admitted(lim, alice)
    clock.advance(60)  # past midnight
    lease.finish(1000, None)
    over = refused(lim, alice)
    # A day's wait is a usage limit that says when it resets (Codex would sleep a Retry-After).
    assert (over.kind, over.code, over.retry_after, over.headers()) == ("usage_limit_reached", "rate_limit_exceeded", None, ())
    assert over.resets_at == epoch("2026-12-08T00:00:00Z")
    assert over.resets_in_seconds == epoch("2026-12-08T00:00:00Z") - epoch("2026-12-07T00:00:30Z")


def test_unknown_tokens_count_nothing() -> None:
    """A turn the upstream never reported usage for (cancelled) adds no tokens."""
    lim, _ = limiter()
    alice = key(tokens_per_minute=10, tokens_per_day=10)
    admitted(lim, alice).finish(None, None)
    admitted(lim, alice).finish(0, None)
    admitted(lim, alice)


# -- budget --------------------------------------------------------------------------------------


def test_budget_per_month_refuses_when_spent_and_resets_at_the_utc_month() -> None:
    """An exhausted budget is insufficient_quota, a usage limit that says when it resets and
    has no Retry-After (Codex shows the reset and does not retry), and the month after admits
    again."""
    lim, clock = limiter("2026-12-31T23:59:30Z", sheet(**{"gpt-5": 0.001}))
    alice = key(budget_per_month=1.0)
    admitted(lim, alice).finish(600, 0.6)
    admitted(lim, alice).finish(400, 0.4)  # 0.6 < 1.0 when it started
    over = refused(lim, alice)
    assert over == Refused(
        429,
        "usage_limit_reached",
        "insufficient_quota",
        "Key 'alice' has spent its monthly budget ($1.00 of $1.00 this UTC month); it resets at 2027-01-01T00:00:00Z.",
        None,
        "budget_per_month",
        resets_at=int(epoch("2027-01-01T00:00:00Z")),
        resets_in_seconds=30,
    )
    assert over.headers() == ()
    clock.advance(29)
    refused(lim, alice)
    clock.advance(1)  # 2027-01-01T00:00:00Z
    admitted(lim, alice)


def test_budget_admits_just_under_and_refuses_at_the_budget() -> None:
    lim, _ = limiter(prices=sheet(**{"gpt-5": 0.001}))
    alice = key(budget_per_month=1.0)
    admitted(lim, alice).finish(999, 0.999)
    admitted(lim, alice).finish(1, 0.001)
    assert refused(lim, alice).code == "insufficient_quota"


def test_budget_needs_a_priced_model() -> None:
    """A key with a budget may only start turns for priced models, so no turn escapes the
    budget; naming no model has no price either."""
    lim, _ = limiter(prices=sheet(**{"gpt-5": 0.001}))
    alice = key(budget_per_month=1.0)
    for model, asked in (("llama-3", "Model 'llama-3' has no price"), (None, "A request that names no model has no price")):
        over = refused(lim, alice, model)
        assert over == Refused(
            403,
            "invalid_request_error",
            "model_not_allowed",
            f"{asked}, and key 'alice' has a monthly budget: only priced models may be used.",
            None,
            "model_not_priced",
        )
    admitted(lim, alice, "gpt-5")
    admitted(lim, alice, "gpt-5-2025-08-07")  # a dated snapshot is priced as its model


def test_unknown_cost_adds_nothing_to_the_budget() -> None:
    """cost None (no usage reported, or an unpriced model served) is not charged."""
    lim, _ = limiter(prices=sheet(**{"gpt-5": 0.001}))
    alice = key(budget_per_month=1.0)
    admitted(lim, alice).finish(None, None)
    admitted(lim, alice).finish(5000, None)
    admitted(lim, alice)


def test_the_first_limit_in_order_is_the_one_reported() -> None:
    """Order: model, budget, tokens per day, tokens per minute, requests per minute, turns."""
    lim, _ = limiter(prices=sheet(**{"gpt-5": 0.001}))
    alice = key(
        models=("gpt-5",), budget_per_month=1.0, tokens_per_day=10, tokens_per_minute=10, requests_per_minute=1, max_concurrent_turns=1
    )
    admitted(lim, alice).finish(10, 1.0)
    assert refused(lim, alice, "o3").reason == "model_not_allowed"
    assert refused(lim, alice).reason == "budget_per_month"


# -- models --------------------------------------------------------------------------------------


def test_a_model_not_listed_is_refused_403() -> None:
    lim, _ = limiter()
    alice = key(models=("gpt-5", "gpt-5-codex"))
    admitted(lim, alice, "gpt-5-codex")
    over = refused(lim, alice, "gpt-5-2025-08-07")  # exact names: a snapshot is another model
    assert over == Refused(
        403,
        "invalid_request_error",
        "model_not_allowed",
        "Model 'gpt-5-2025-08-07' is not allowed for key 'alice'; it may use: gpt-5, gpt-5-codex.",
        None,
        "model_not_allowed",
    )


def test_no_model_is_refused_when_models_are_set() -> None:
    """The upstream would choose a model the list may not hold."""
    lim, _ = limiter()
    over = refused(lim, key(models=("gpt-5",)), None)
    assert over.message == "A request that names no model is not allowed for key 'alice'; it may use: gpt-5."
    admitted(lim, key(), None)  # without a list any model, or none, is fine


def test_a_long_model_name_is_shortened_in_the_message() -> None:
    lim, _ = limiter()
    over = refused(lim, key(models=("gpt-5",)), "x" * 5000)
    assert f"'{'x' * 100}…'" in over.message and len(over.message) < 300


# -- keys ----------------------------------------------------------------------------------------


def test_no_key_is_never_limited_and_keeps_no_state() -> None:
    """A keyless gateway passes None: every connection and turn is admitted."""
    store = MemoryLimitStore()
    lim = KeyLimiter(clock_at("2026-12-06T12:00:00Z"), sheet(), store)
    for _ in range(1000):
        assert isinstance(result(lim.open_connection(None)), ConnectionLease)
        lease = turn(lim, None, None)
        assert isinstance(lease, TurnLease) and lease.key is None
        lease.finish(10**9, 10**6)
    assert store.held() == {}
    assert [m.samples for m in lim.collect()] == [[], [], []]


def test_only_keys_that_set_a_limit_reach_the_store() -> None:
    """Memory is per limited key: a key whose limits are all unset keeps no counters."""
    store = MemoryLimitStore()
    lim = KeyLimiter(clock_at("2026-12-06T12:00:00Z"), sheet(), store)
    free = key("free")
    result(lim.open_connection(free))
    admitted(lim, free).finish(100, 1.0)
    admitted(lim, key("alice", models=("gpt-5",))).finish(100, None)  # models need no counters
    admitted(lim, key("bob", requests_per_minute=5)).finish(100, None)
    assert store.held() == {"bob": 1}


def test_each_key_is_held_to_its_own_limits() -> None:
    """Per-key values and [key_defaults] arrive merged in ClientKey.limits: two keys, two limits."""
    lim, _ = limiter()
    defaults = KeyLimitsConfig(requests_per_minute=2, max_concurrent_turns=10)
    alice = ClientKey("alice", "sk-cch-alice-0123456789", limits=defaults)
    bob = ClientKey("bob", "sk-cch-bob-0123456789", limits=KeyLimitsConfig(requests_per_minute=3, max_concurrent_turns=10))
    for _ in range(2):
        admitted(lim, alice)
        admitted(lim, bob)
    refused(lim, alice)
    admitted(lim, bob)
    refused(lim, bob)


def test_windows_are_pruned_as_time_passes() -> None:
    """A key's windows hold only the last minute: requests at most the limit, tokens in ~61
    one-second buckets however many turns end."""
    store = MemoryLimitStore()
    clock = clock_at("2026-12-06T12:00:00Z")
    lim = KeyLimiter(clock, sheet(), store)
    alice = key(requests_per_minute=1000, tokens_per_minute=10**9)
    for _ in range(240):
        admitted(lim, alice).finish(1, None)
        clock.advance(0.25)
    assert store.held() == {"alice": 240 + 60}
    clock.advance(60)
    admitted(lim, alice).finish(1, None)
    assert store.held() == {"alice": 2}


# -- seeding -------------------------------------------------------------------------------------


def test_seed_starts_the_day_and_month_from_the_ledger() -> None:
    lim, clock = limiter("2026-12-06T23:59:30Z", sheet(**{"gpt-5": 0.001}))
    alice = key(tokens_per_day=1000)
    bob = key("bob", budget_per_month=5.0)
    result(lim.seed("alice", 1000, 0.0))
    result(lim.seed("bob", 0, 5.0))
    assert refused(lim, alice).reason == "tokens_per_day"
    assert refused(lim, bob).reason == "budget_per_month"
    clock.advance(30)  # the next UTC day: alice's day is new, bob's month is not
    admitted(lim, alice)
    refused(lim, bob)


def test_seed_twice_or_after_turns_never_counts_twice() -> None:
    lim, _ = limiter()
    alice = key(tokens_per_day=1000)
    admitted(lim, alice).finish(300, None)
    result(lim.seed("alice", 600, 0.0))
    result(lim.seed("alice", 600, 0.0))
    admitted(lim, alice).finish(399, None)  # 600 seeded, not 600 + 600 or + 300
    admitted(lim, alice).finish(1, None)
    refused(lim, alice)


# -- the wire ------------------------------------------------------------------------------------


def test_rate_limit_error_event_bytes() -> None:
    lim, clock = limiter()
    alice = key(requests_per_minute=1)
    admitted(lim, alice)
    clock.advance(48)
    assert refused(lim, alice).error_event() == (
        '{"type":"error","status":429,"error":{"type":"rate_limit_exceeded","code":"rate_limit_exceeded",'
        '"message":"Rate limit reached for key \'alice\': 1 requests per minute. Please try again in 12s."},'
        '"headers":{"retry-after":"12"}}'
    )


RATE_LIMIT_EVENTS = {
    "max_concurrent_turns": (
        {"max_concurrent_turns": 1},
        None,
        '{"type":"error","status":429,"error":{"type":"rate_limit_exceeded","code":"rate_limit_exceeded",'
        '"message":"Rate limit reached for key \'alice\': at most 1 turns at once. Please try again in 5s."},'
        '"headers":{"retry-after":"5"}}',
    ),
    "tokens_per_minute": (
        {"tokens_per_minute": 100},
        150,
        '{"type":"error","status":429,"error":{"type":"rate_limit_exceeded","code":"rate_limit_exceeded",'
        '"message":"Rate limit reached for key \'alice\': 150 of 100 tokens used in the last minute.'
        ' Please try again in 53s."},"headers":{"retry-after":"53"}}',
    ),
    "tokens_per_day": (
        {"tokens_per_day": 100},
        100,
        '{"type":"error","status":429,"error":{"type":"rate_limit_exceeded","code":"rate_limit_exceeded",'
        '"message":"Rate limit reached for key \'alice\': 100 of 100 tokens used this UTC day.'
        ' Please try again in 37s."},"headers":{"retry-after":"37"}}',
    ),
}


@pytest.mark.parametrize("reason", sorted(RATE_LIMIT_EVENTS))
def test_rate_limit_error_event_json_body_and_headers_per_kind(reason: str) -> None:
    """Every rate limit says rate_limit_exceeded with its wait, in the event and over HTTP."""
    limits, tokens, event = RATE_LIMIT_EVENTS[reason]
    lim, clock = limiter("2026-12-06T23:59:16Z")
    alice = key(**limits)
    lease = admitted(lim, alice)
    if tokens is not None:
        lease.finish(tokens, None)
    clock.advance(7)
    over = refused(lim, alice)
    assert over.reason == reason
    assert over.error_event() == event
    assert over.json_body() == (
        f'{{"error":{{"message":"{over.message}","type":"rate_limit_exceeded","code":"rate_limit_exceeded"}}}}'
    ).encode()
    assert over.headers() == ((b"retry-after", str(over.retry_after).encode()),)


def test_connection_refusal_json_body_and_headers() -> None:
    """The handshake answer: 429, this body, this Retry-After."""
    lim, _ = limiter()
    alice = key(max_connections=1)
    result(lim.open_connection(alice))
    over = result(lim.open_connection(alice))
    assert over.status == 429
    assert over.json_body() == (
        b'{"error":{"message":"Rate limit reached for key \'alice\': at most 1 WebSocket connections at once.'
        b' Please try again in 5s.","type":"rate_limit_exceeded","code":"rate_limit_exceeded"}}'
    )
    assert over.headers() == ((b"retry-after", b"5"),)


def test_quota_error_event_bytes_have_no_retry_after() -> None:
    lim, _ = limiter("2026-12-06T12:00:00Z", sheet(**{"gpt-5": 0.001}))
    alice = key(budget_per_month=50.0)
    result(lim.seed("alice", 0, 50.0))
    over = refused(lim, alice)
    assert over.error_event() == (
        '{"type":"error","status":429,"error":{"type":"usage_limit_reached","code":"insufficient_quota",'
        '"message":"Key \'alice\' has spent its monthly budget ($50.00 of $50.00 this UTC month);'
        ' it resets at 2027-01-01T00:00:00Z.","resets_at":1798761600,"resets_in_seconds":2203200}}'
    )
    assert over.json_body() == (
        b'{"error":{"message":"Key \'alice\' has spent its monthly budget ($50.00 of $50.00 this UTC month);'
        b' it resets at 2027-01-01T00:00:00Z.","type":"usage_limit_reached","code":"insufficient_quota",'
        b'"resets_at":1798761600,"resets_in_seconds":2203200}}'
    )


def test_model_not_allowed_error_event_bytes() -> None:
    lim, _ = limiter()
    over = refused(lim, key(models=("gpt-5",)), "o3")
    assert over.error_event() == (
        '{"type":"error","status":403,"error":{"type":"invalid_request_error","code":"model_not_allowed",'
        '"message":"Model \'o3\' is not allowed for key \'alice\'; it may use: gpt-5."}}'
    )
    assert over.json_body() == (
        b'{"error":{"message":"Model \'o3\' is not allowed for key \'alice\'; it may use: gpt-5.",'
        b'"type":"invalid_request_error","code":"model_not_allowed"}}'
    )
    assert over.headers() == ()


# -- metrics -------------------------------------------------------------------------------------


def test_collect_reports_refusals_turns_in_flight_and_connections() -> None:
    lim, _ = limiter()
    alice = key(max_concurrent_turns=1, max_connections=1, models=("gpt-5",))
    result(lim.open_connection(alice))
    result(lim.open_connection(alice))
    lease = admitted(lim, alice)
    refused(lim, alice)
    refused(lim, alice, "o3")
    registry = CollectorRegistry()
    registry.register(lim)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'cch_key_refusals_total{key="alice",reason="max_concurrent_turns"} 1.0' in text
    assert 'cch_key_refusals_total{key="alice",reason="max_connections"} 1.0' in text
    assert 'cch_key_refusals_total{key="alice",reason="model_not_allowed"} 1.0' in text
    assert 'cch_key_turns_in_flight{key="alice"} 1.0' in text
    assert 'cch_key_connections{key="alice"} 1.0' in text
    lease.finish(1, None)
    assert 'cch_key_turns_in_flight{key="alice"} 0.0' in generate_latest(registry).decode()


# -- the store -----------------------------------------------------------------------------------


class FailingStore(MemoryLimitStore):
    def finish(self, *args: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(self._fail())

    async def _fail(self) -> None:
        raise RuntimeError("store down")


def test_a_store_failure_on_finish_is_logged_not_raised() -> None:
    """Giving back is fire-and-forget: the turn's end path never sees a store error."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        lim = KeyLimiter(clock_at("2026-12-06T12:00:00Z"), sheet(), FailingStore())
        admitted(lim, key(max_concurrent_turns=1)).finish(1, None)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [e["op"] for e in seen if e.get("log_format") == "key_limit_store_failed"] == ["finish"]


@pytest.mark.parametrize("limit", [1, 7])
def test_begin_turn_refusal_is_not_counted_as_a_request(limit: int) -> None:
    lim, clock = limiter()
    alice = key(requests_per_minute=limit)
    for _ in range(limit):
        admitted(lim, alice)
    for _ in range(50):
        refused(lim, alice)
    clock.advance(60)
    for _ in range(limit):
        admitted(lim, alice)
