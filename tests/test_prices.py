"""Tests for cch.usage.prices: a turn's cost from [[prices]], and which model a price covers."""

from __future__ import annotations

import pytest

from cch.config import PriceConfig
from cch.usage.prices import PriceSheet

GPT5 = PriceConfig("gpt-5", input_per_mtok=1.25, output_per_mtok=10.0, cached_input_per_mtok=0.125)
MINI = PriceConfig("gpt-5-mini", input_per_mtok=0.25, output_per_mtok=2.0)
SHEET = PriceSheet([GPT5, MINI])


def test_cost_prices_uncached_input_cached_input_and_output_per_million() -> None:
    # 1,000,000 input of which 400,000 cached, 100,000 output:
    # 600,000 * 1.25 + 400,000 * 0.125 + 100,000 * 10.0, per million = 0.75 + 0.05 + 1.0
    assert SHEET.cost("gpt-5", 1_000_000, 400_000, 100_000) == pytest.approx(1.8)


def test_cost_of_a_small_turn() -> None:
    assert SHEET.cost("gpt-5", 1200, 1000, 300) == pytest.approx(
        (200 * 1.25 + 1000 * 0.125 + 300 * 10.0) / 1e6
    )


def test_cached_input_costs_the_input_price_when_no_cached_price_is_set() -> None:
    assert SHEET.cost("gpt-5-mini", 1_000_000, 500_000, 0) == pytest.approx(0.25)


def test_a_cached_price_of_zero_makes_cached_input_free() -> None:
    sheet = PriceSheet([PriceConfig("m", 2.0, 4.0, cached_input_per_mtok=0.0)])
    assert sheet.cost("m", 1_000_000, 1_000_000, 0) == 0.0


def test_unknown_cached_count_counts_every_input_token_at_the_input_price() -> None:
    assert SHEET.cost("gpt-5", 1_000_000, None, 0) == pytest.approx(1.25)


def test_more_cached_than_input_tokens_is_held_to_the_input_count() -> None:
    assert SHEET.cost("gpt-5", 1000, 5000, 0) == pytest.approx(1000 * 0.125 / 1e6)


def test_a_free_model_costs_zero_not_none() -> None:
    sheet = PriceSheet([PriceConfig("local", 0.0, 0.0)])
    assert sheet.cost("local", 10, 0, 10) == 0.0


def test_no_tokens_cost_zero_for_a_priced_model() -> None:
    assert SHEET.cost("gpt-5", 0, 0, 0) == 0.0


@pytest.mark.parametrize("model", ["gpt-4o", "o3", "", "GPT-5", None])
def test_a_model_without_a_price_costs_none_never_zero(model: str | None) -> None:
    assert SHEET.cost(model, 1000, 0, 1000) is None


@pytest.mark.parametrize(("input_tokens", "output_tokens"), [(None, 10), (10, None), (None, None)])
def test_an_unknown_input_or_output_count_costs_none(
    input_tokens: int | None, output_tokens: int | None
) -> None:
    assert SHEET.cost("gpt-5", input_tokens, 0, output_tokens) is None


def test_no_prices_at_all_cost_none() -> None:
    sheet = PriceSheet([])
    assert not sheet.has_prices
    assert sheet.cost("gpt-5", 10, 0, 10) is None


def test_has_prices_with_any_price() -> None:
    assert SHEET.has_prices
    assert PriceSheet(iter([MINI])).has_prices  # any iterable, read once


@pytest.mark.parametrize("model", ["gpt-5-2025-08-07", "gpt-5-20250807"])
def test_a_dated_snapshot_is_priced_as_its_model(model: str) -> None:
    assert SHEET.price_of(model) == GPT5
    assert SHEET.cost(model, 1_000_000, 0, 0) == pytest.approx(1.25)


def test_a_snapshot_of_a_longer_model_name_is_priced_as_that_model() -> None:
    assert SHEET.price_of("gpt-5-mini-2025-08-07") == MINI


def test_an_exact_price_for_a_snapshot_wins_over_its_model() -> None:
    pinned = PriceConfig("gpt-5-2025-08-07", 9.0, 9.0)
    sheet = PriceSheet([GPT5, pinned])
    assert sheet.price_of("gpt-5-2025-08-07") == pinned
    assert sheet.price_of("gpt-5-2026-01-01") == GPT5


@pytest.mark.parametrize(
    "model",
    [
        "gpt-5-codex",  # another model, not a snapshot
        "gpt-5-nano",
        "gpt-5-2025-08",  # not a whole date
        "gpt-5-2025080",
        "gpt-5-2025-08-07-preview",  # a date inside the name, not at its end
        "gpt-5_2025-08-07",
        "-2025-08-07",
        "gpt-4o-2024-08-06",  # a snapshot of an unpriced model
    ],
)
def test_only_a_date_suffix_on_a_priced_model_borrows_its_price(model: str) -> None:
    assert SHEET.price_of(model) is None
    assert SHEET.cost(model, 10, 0, 10) is None


def test_the_exact_name_is_looked_up_before_any_snapshot_rule() -> None:
    assert SHEET.price_of("gpt-5-mini") == MINI
    assert SHEET.price_of("gpt-5") == GPT5
