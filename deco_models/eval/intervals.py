"""Percentile bootstrap intervals over evaluation units (scenes), for metrics that are ratios of per-unit sums.

Every number of the shapes-mini tables is such a ratio: a hit rate is hits / words summed over scenes, a teacher-forced
accuracy is correct / predicted words, Acc@0.5 is hits / questions, and POPE's F1 is ``2·TP / (2·TP + FP + FN)``.
Resampling the *scenes* (not the words) keeps the words of one scene together, so the interval reflects how much the
number moves on another draw of scenes, which is what a reader comparing two models needs.

Conventions (recorded in every ``metrics.json`` that carries intervals): :data:`RESAMPLES` resamples of the scenes
with replacement from ``numpy.random.default_rng(SEED)``, the 2.5th and 97.5th percentiles (linear interpolation) of
the resampled ratios; resamples whose denominator sums to zero are dropped.

Example:
    >>> hits, words = [1, 0, 2, 1], [1, 1, 2, 2]
    >>> r = bootstrap_ratio(hits, words)
    >>> r["value"], r["low"] <= r["value"] <= r["high"], r["resamples"]
    (0.6666666666666666, True, 2000)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95

__all__ = ["RESAMPLES", "SEED", "LEVEL", "bootstrap_ratio", "describe"]


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float] | None = None,
                    resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """``sum(numerators) / sum(denominators)`` over units and its percentile bootstrap interval.

    ``numerators[i]`` / ``denominators[i]`` belong to unit (scene) ``i``; without ``denominators`` every unit counts 1
    (the interval of a mean of per-unit values). Returns ``{"value", "low", "high", "level", "resamples", "seed",
    "units"}``; ``value`` is NaN when the denominators sum to zero.

    Example:
        >>> bootstrap_ratio([3, 3, 3], [4, 4, 4])["low"]  # every resample gives 0.75
        0.75
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if num.ndim != 1 or den.shape != num.shape:
        raise ValueError(f"expected two 1-D sequences of the same length (one entry per unit), got shapes "
                         f"{num.shape} and {den.shape}")
    if num.size == 0:
        raise ValueError("bootstrap_ratio needs at least one unit")
    if not (np.isfinite(num).all() and np.isfinite(den).all()) or (den < 0).any():
        raise ValueError("numerators must be finite and denominators finite and >= 0")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    total = den.sum()
    value = float(num.sum() / total) if total > 0 else float("nan")
    picks = np.random.default_rng(seed).integers(num.size, size=(resamples, num.size))
    sums = den[picks].sum(axis=1)
    ratios = num[picks].sum(axis=1)[sums > 0] / sums[sums > 0]
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(ratios, [tail, 100 - tail]) if ratios.size else (float("nan"), float("nan")))
    return {"value": value, "low": float(low), "high": float(high), "level": level, "resamples": resamples,
            "seed": seed, "units": int(num.size)}


def describe(interval: dict, digits: int = 2) -> str:
    """``"0.78 [0.73, 0.83]"``: a value with its interval, for tables.

    Example:
        >>> describe({"value": 0.7807, "low": 0.731, "high": 0.828})
        '0.78 [0.73, 0.83]'
    """
    if interval is None or not np.isfinite(interval.get("value", float("nan"))):
        return "—"
    return f"{interval['value']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"
