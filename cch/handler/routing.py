"""Which provider serves a request: priority, weighted random, and a breaker per provider."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cch.config import BreakerConfig, ProviderConfig

log = Logger()

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


# (provider, OPEN or CLOSED, when on the clock) of a change this process made.
BreakerListener = Callable[[str, str, float], object]


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``cooldown`` seconds one
    trial request is let through (half-open); its outcome closes or re-opens the breaker.

    With several replicas an opening or closing made here is told to ``listeners``
    (cch.cluster.marks), and one made elsewhere comes back through :meth:`learn`: the replicas
    share their discoveries and the last change wins."""

    def __init__(self, name: str, config: BreakerConfig, clock: IReactorTime) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False
        self.changed_at: float | None = None  # of the last opening or closing, here or learned
        self.listeners: list[BreakerListener] = []

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
        self.failures = 0
        self.trial_in_flight = False
        if self.opened_at is not None:
            log.info("provider_breaker_closed", provider=self.name)
            self.opened_at = None
            self._changed(CLOSED)

    def record_failure(self) -> None:
        self.trial_in_flight = False
        if self.opened_at is not None:
            # A failed half-open trial (or a late failure while open) restarts the cool-down.
            self.opened_at = self.clock.seconds()
            self._changed(OPEN)
            return
        self.failures += 1
        if self.failures >= self.config.failure_threshold:
            self.opened_at = self.clock.seconds()
            log.warn("provider_breaker_opened", provider=self.name, failures=self.failures)
            self._changed(OPEN)

    def attempt_abandoned(self) -> None:
        """The attempt ended without a verdict (client went away): free the trial slot."""
        self.trial_in_flight = False

    def _changed(self, state: str) -> None:
        self.changed_at = self.clock.seconds()
        for listener in self.listeners:
            listener(self.name, state, self.changed_at)

    def learn(self, state: str, at: float) -> bool:
        """Another replica opened (``OPEN``) or closed (``CLOSED``) this provider's breaker at
        ``at``: follow it unless this breaker changed since. Tells nobody; True when news."""
        if self.changed_at is not None and self.changed_at >= at:
            return False
        self.changed_at = at
        if state == OPEN:
            if self.opened_at is None:
                log.warn("provider_breaker_opened", provider=self.name, by="another replica")
            self.opened_at = at
        elif self.opened_at is not None:
            log.info("provider_breaker_closed", provider=self.name, by="another replica")
            self.opened_at = None
            self.failures = 0
            self.trial_in_flight = False
        return True


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
