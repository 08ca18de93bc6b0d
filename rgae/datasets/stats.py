"""Confidence intervals and paired tests for dataset metrics, clustered by record.

The words scored in one record share an image and a forward pass, so they are not independent: both the bootstrap
and the paired test resample **records** (clusters), each with all of its scored items.

- :func:`bootstrap_means`: the item mean recomputed on records drawn with replacement (percentile intervals from it
  with :func:`percentile_ci`);
- :func:`paired_permutation_test`: two-sided sign-flip test of a paired difference — under the null hypothesis that
  the two methods/models are exchangeable on every record, each record's summed difference flips sign with
  probability 1/2. Exact (all ``2^G`` flips) for up to 16 records, Monte Carlo otherwise.

Example:
    >>> import numpy as np
    >>> mean, lo, hi = mean_ci([1, 0, 1, 1], groups=[0, 0, 1, 2], n_resamples=500)
    >>> mean, lo <= mean <= hi
    (0.75, True)
    >>> paired_permutation_test([1.0, 2.0, 3.0])   # exact: 2 of the 8 sign patterns are as extreme
    0.25
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["EXACT_MAX_GROUPS", "bootstrap_means", "mean_ci", "paired_permutation_test", "percentile_ci"]

EXACT_MAX_GROUPS = 16
_CHUNK = 256  # resamples drawn at once: bounds memory at _CHUNK x records indices


def _grouped(values, groups) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums ``[G, ...]`` and item counts ``[G]``."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or v.shape[0] == 0:
        raise ValueError("need at least one value")
    if groups is None:
        return v, np.ones(v.shape[0])
    g = np.asarray(groups)
    if g.shape != (v.shape[0],):
        raise ValueError(f"groups must give one group per value ({v.shape[0]}), got shape {g.shape}")
    _, codes = np.unique(g, return_inverse=True)
    n_groups = int(codes.max()) + 1
    sums = np.zeros((n_groups, *v.shape[1:]))
    np.add.at(sums, codes, v)
    return sums, np.bincount(codes, minlength=n_groups).astype(np.float64)


def bootstrap_means(values, groups=None, n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``[n_resamples, ...]``: the mean of ``values`` (``[n]`` or ``[n, k]``) over groups drawn with replacement
    (each group with all of its items; ``groups=None``: every value is its own group)."""
    sums, counts = _grouped(values, groups)
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, int(n_resamples), _CHUNK):
        idx = rng.integers(0, counts.size, size=(min(_CHUNK, n_resamples - start), counts.size))
        num = sums[idx].sum(axis=1)
        den = counts[idx].sum(axis=1)
        out.append(num / den.reshape(-1, *([1] * (num.ndim - 1))))
    return np.concatenate(out)


def percentile_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles over the first axis."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    return np.quantile(samples, alpha, axis=0), np.quantile(samples, 1 - alpha, axis=0)


def mean_ci(values, groups=None, n_resamples: int = 2000, confidence: float = 0.95,
            seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the item mean and its clustered percentile-bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = percentile_ci(bootstrap_means(v, groups, n_resamples, seed), confidence)
    return float(v.mean()), float(lo), float(hi)


def paired_permutation_test(differences, groups=None, n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value that the mean paired difference is 0, flipping the sign of each group's summed
    difference (exact enumeration for up to :data:`EXACT_MAX_GROUPS` groups; otherwise
    ``(1 + #extreme) / (1 + n_resamples)`` from random flips). Differences that are all zero give 1.0."""
    sums, _ = _grouped(differences, groups)
    if sums.ndim != 1:
        raise ValueError("differences must be one number per pair")
    observed = abs(sums.sum())
    # Sums of the same numbers in another order differ in the last bits: count those as ties, not as less extreme.
    tol = 1e-9 * max(1.0, float(np.abs(sums).sum()))
    if observed <= tol:
        return 1.0
    if sums.size <= EXACT_MAX_GROUPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=sums.size)))
        return float(np.mean(np.abs(signs @ sums) >= observed - tol))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, int(n_resamples), _CHUNK):
        signs = rng.choice((1.0, -1.0), size=(min(_CHUNK, n_resamples - start), sums.size))
        extreme += int(np.sum(np.abs(signs @ sums) >= observed - tol))
    return (1 + extreme) / (1 + n_resamples)
