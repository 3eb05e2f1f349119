"""What a turn cost, from the operator's ``[[prices]]``
(docs/configuration.md#prices--what-a-turn-costs).

A price is looked up by the model name the turn was served (or asked) under:

1. the exact name, if it has a ``[[prices]]`` entry;
2. else, for a dated snapshot -- the name of a priced model followed by ``-YYYY-MM-DD``
   (OpenAI: ``gpt-5-2025-08-07``) or ``-YYYYMMDD`` (``claude-sonnet-4-20250514``) -- that
   model's price, since a snapshot is billed as its model;
3. else no price, and the cost is None.

Only a date suffix is stripped: ``gpt-5-mini`` or ``gpt-5-codex`` are other models with other
prices, never priced as ``gpt-5``. No price means "unknown", never 0: a missing price must not
look like a free turn in reports or let a budget go unspent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cch.config import PriceConfig

__all__ = ["PriceSheet"]

_SNAPSHOT = re.compile(r"(?P<model>.+)-(?:\d{4}-\d{2}-\d{2}|\d{8})")
_PER = 1_000_000  # prices are per million tokens


class PriceSheet:
    """The configured prices, and the cost of a turn's token counts in USD."""

    def __init__(self, prices: Iterable[PriceConfig]) -> None:
        self._prices = {price.model: price for price in prices}

    @property
    def has_prices(self) -> bool:
        return bool(self._prices)

    def price_of(self, model: str | None) -> PriceConfig | None:
        """The price for ``model`` by the rule in this module's docstring, or None."""
        if model is None:
            return None
        price = self._prices.get(model)
        if price is None and (snapshot := _SNAPSHOT.fullmatch(model)):
            price = self._prices.get(snapshot["model"])
        return price

    def cost(
        self,
        model: str | None,
        input_tokens: int | None,
        cached_input_tokens: int | None,
        output_tokens: int | None,
    ) -> float | None:
        """USD for one turn: uncached input, cached input and output, each at its price.

        None when the model has no price or the input or output count is unknown (the upstream
        never said). An unknown cached count is 0: upstreams that do not cache omit it, and
        input_tokens already holds every input token. Cached tokens are part of the input, so
        more cached than input (a confused upstream) is held to the input count."""
        price = self.price_of(model)
        if price is None or input_tokens is None or output_tokens is None:
            return None
        cached = min(cached_input_tokens or 0, input_tokens)
        cached_rate = price.input_per_mtok
        if price.cached_input_per_mtok is not None:
            cached_rate = price.cached_input_per_mtok
        return (
            (input_tokens - cached) * price.input_per_mtok
            + cached * cached_rate
            + output_tokens * price.output_per_mtok
        ) / _PER
