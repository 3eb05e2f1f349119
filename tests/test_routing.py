"""Provider choice and the per-provider circuit breaker, on a fake clock."""

from __future__ import annotations

import random
from collections import Counter

from twisted.internet.task import Clock

from cch.config import BreakerConfig, ProviderConfig
from cch.handler.routing import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, ProviderRouter


def provider(name: str, priority: int = 0, weight: int = 1, models: tuple[str, ...] = ()) -> ProviderConfig:
    return ProviderConfig(name=name, base_url=f"http://{name}.test/v1", priority=priority, weight=weight, models=models)


def test_lower_priority_is_tried_first() -> None:
    router = ProviderRouter([provider("b", 1), provider("a", 0), provider("c", 2)], BreakerConfig(), Clock())
    assert [p.name for p in router.candidates(None)] == ["a", "b", "c"]


def test_weights_shape_the_first_choice_within_a_priority() -> None:
    router = ProviderRouter(
        [provider("heavy", weight=9), provider("light", weight=1)], BreakerConfig(), Clock(), random.Random(7)
    )
    firsts = Counter(router.candidates(None)[0].name for _ in range(2000))
    assert 0.85 < firsts["heavy"] / 2000 < 0.95
    assert all(len(router.candidates(None)) == 2 for _ in range(10))


def test_model_lists_filter_providers() -> None:
    router = ProviderRouter([provider("a", models=("m1",)), provider("b")], BreakerConfig(), Clock())
    assert [p.name for p in router.candidates("m2")] == ["b"]
    assert {p.name for p in router.candidates("m1")} == {"a", "b"}
    assert router.models() == ["m1"]


def test_breaker_opens_after_threshold_and_half_opens_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("p", BreakerConfig(failure_threshold=3, cooldown=30), clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == CLOSED and breaker.allows()
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allows()
    clock.advance(29.9)
    assert not breaker.allows()
    clock.advance(0.1)
    assert breaker.state == HALF_OPEN and breaker.allows()
    breaker.attempt_started()
    assert not breaker.allows(), "only one trial at a time"
    breaker.record_failure()
    assert breaker.state == OPEN
    clock.advance(30)
    breaker.attempt_started()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.failures == 0


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker("p", BreakerConfig(failure_threshold=2, cooldown=1), Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == CLOSED


def test_abandoned_trial_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker("p", BreakerConfig(failure_threshold=1, cooldown=1), clock)
    breaker.record_failure()
    clock.advance(1)
    breaker.attempt_started()
    breaker.attempt_abandoned()
    assert breaker.allows()


def test_open_providers_are_skipped() -> None:
    clock = Clock()
    router = ProviderRouter([provider("a"), provider("b", 1)], BreakerConfig(failure_threshold=1), clock)
    router.get("a").breaker.record_failure()
    assert [p.name for p in router.candidates(None)] == ["b"]
