"""deco_models.eval.intervals: the scene bootstrap against a loop reference, hand-checkable cases, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from deco_models.eval.intervals import RESAMPLES, SEED, bootstrap_ratio, describe


def _loop_reference(num, den, resamples, seed, level):
    """The bootstrap written out one resample at a time, drawing the same indices."""
    picks = np.random.default_rng(seed).integers(len(num), size=(resamples, len(num)))
    ratios = []
    for row in picks:
        total = sum(den[i] for i in row)
        if total > 0:
            ratios.append(sum(num[i] for i in row) / total)
    tail = (1 - level) / 2 * 100
    return np.percentile(ratios, tail), np.percentile(ratios, 100 - tail)


def test_matches_a_loop_over_resamples():
    rng = np.random.default_rng(3)
    den = rng.integers(0, 4, size=37).tolist()
    num = [int(rng.integers(0, d + 1)) for d in den]
    found = bootstrap_ratio(num, den, resamples=300, seed=5, level=0.9)
    low, high = _loop_reference(num, den, 300, 5, 0.9)
    assert found["low"] == pytest.approx(low, abs=1e-12) and found["high"] == pytest.approx(high, abs=1e-12)
    assert found["value"] == sum(num) / sum(den)
    assert (found["resamples"], found["seed"], found["units"]) == (300, 5, 37)


def test_hand_checkable_cases():
    same = bootstrap_ratio([2, 2, 2, 2], [4, 4, 4, 4])  # every resample is 8/16
    assert same["value"] == same["low"] == same["high"] == 0.5
    # A unit without words only ever adds to the denominator's zero: resamples of it alone are dropped.
    assert bootstrap_ratio([1, 0], [1, 0])["low"] == 1.0
    # Without denominators: the mean of per-unit values; two values 0 and 1 → resample means in [0, 1].
    both = bootstrap_ratio([0.0, 1.0])
    assert both["value"] == 0.5 and both["low"] == 0.0 and both["high"] == 1.0
    nothing = bootstrap_ratio([0, 0], [0, 0])
    assert np.isnan(nothing["value"]) and np.isnan(nothing["low"])


def test_defaults_are_the_documented_conventions_and_reproducible():
    hits = [1, 0, 1, 1, 0, 1, 1, 1]
    first, again = bootstrap_ratio(hits), bootstrap_ratio(hits)
    assert first == again and (first["resamples"], first["seed"], first["level"]) == (RESAMPLES, SEED, 0.95)


def test_width_matches_the_binomial_normal_approximation():
    # 400 scenes with one word each, half of them hits: the 95% interval is about ±1.96·sqrt(0.25 / 400) = ±0.049.
    found = bootstrap_ratio([1, 0] * 200)
    assert found["high"] - found["low"] == pytest.approx(2 * 1.96 * 0.025, rel=0.12)


def test_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered = 0
    trials = 200
    for t in range(trials):
        words = rng.integers(1, 4, size=80)
        hits = rng.binomial(words, 0.7)
        found = bootstrap_ratio(hits, words, resamples=500, seed=t)
        covered += found["low"] <= 0.7 <= found["high"]
    # Binomial(200, 0.95) lies in [181, 197] with probability > 0.99; the percentile bootstrap runs slightly narrow.
    assert 178 <= covered <= 198, covered


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ratio([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ratio([])
    with pytest.raises(ValueError, match=">= 0"):
        bootstrap_ratio([1], [-1])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ratio([1], level=1.5)


def test_describe():
    assert describe({"value": 0.5, "low": 0.25, "high": 0.75}) == "0.50 [0.25, 0.75]"
    assert describe({"value": float("nan"), "low": 0, "high": 0}) == "—"
