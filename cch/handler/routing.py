"""Which provider serves a request: priority, weighted random, and a breaker per provider."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cch.config import BreakerConfig, ProviderConfig

log = Logger()

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``cooldown`` seconds one
    trial request is let through (half-open); its outcome closes or re-opens the breaker."""

    def __init__(self, name: str, config: BreakerConfig, clock: IReactorTime) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        if self.clock.seconds() - self.opened_at >= self.config.cooldown:
            return HALF_OPEN
        return OPEN

    def allows(self) -> bool:
        state = self.state
        if state == CLOSED:
            return True
        return state == HALF_OPEN and not self.trial_in_flight

    def attempt_started(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_in_flight = True

    def record_success(self) -> None:
        if self.opened_at is not None:
            log.info("provider_breaker_closed", provider=self.name)
        self.failures = 0
        self.opened_at = None
        self.trial_in_flight = False

    def record_failure(self) -> None:
        self.trial_in_flight = False
        if self.opened_at is not None:
            # A failed half-open trial (or a late failure while open) restarts the cool-down.
            self.opened_at = self.clock.seconds()
            return
        self.failures += 1
        if self.failures >= self.config.failure_threshold:
            self.opened_at = self.clock.seconds()
            log.warn("provider_breaker_opened", provider=self.name, failures=self.failures)

    def attempt_abandoned(self) -> None:
        """The attempt ended without a verdict (client went away): free the trial slot."""
        self.trial_in_flight = False


class Provider:
    """A configured upstream plus its runtime state."""

    def __init__(self, config: ProviderConfig, breaker: CircuitBreaker) -> None:
        self.config = config
        self.name = config.name
        self.base_url = config.base_url
        self.breaker = breaker

    def serves(self, model: str | None) -> bool:
        return not self.config.models or model in self.config.models


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}  # as the breaker gauge reports them


class ProviderRouter:
    """Orders the providers to try for one request."""

    def __init__(
        self,
        providers: Iterable[ProviderConfig],
        breaker: BreakerConfig,
        clock: IReactorTime,
        rng: random.Random | None = None,
    ) -> None:
        self.providers = [Provider(p, CircuitBreaker(p.name, breaker, clock)) for p in providers]
        self._rng = rng or random.Random()

    def collect(self) -> Iterator[Metric]:
        """Each provider's breaker state, read at scrape time (cch.metrics)."""
        breakers = GaugeMetricFamily(
            "cch_provider_breaker_state", "Provider circuit breaker: 0 closed, 1 half-open, 2 open.", labels=["provider"]
        )
        for provider in self.providers:
            breakers.add_metric([provider.name], BREAKER_STATES[provider.breaker.state])
        yield breakers

    def get(self, name: str) -> Provider:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)

    def candidates(self, model: str | None) -> list[Provider]:
        """Healthy providers for ``model``: by priority, weighted-random within a priority."""
        usable = [p for p in self.providers if p.serves(model) and p.breaker.allows()]
        ordered: list[Provider] = []
        for priority in sorted({p.config.priority for p in usable}):
            group = [p for p in usable if p.config.priority == priority]
            while len(group) > 1:
                pick = self._rng.choices(group, weights=[p.config.weight for p in group])[0]
                group.remove(pick)
                ordered.append(pick)
            ordered.extend(group)  # the last one left needs no draw
        return ordered

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for provider in self.providers:
            for model in provider.config.models:
                seen.setdefault(model, None)
        return list(seen)
