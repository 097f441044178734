"""A share of successes with a bootstrap interval over groups, for outcomes that are not independent.

Preference pairs of one crop share its images (top-N × bottom-N pairs reuse each winner and loser N times),
so their outcomes are correlated; resampling whole groups (crops) with replacement keeps that correlation in
the interval. Used by `dp2osr.engine.pref_accuracy`.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def grouped_share_interval(
    success: np.ndarray,
    groups: np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(share of ``success``, lower, upper): the percentile bootstrap interval at ``level`` over groups.

    Each resample draws as many groups as there are, with replacement, and takes the share of successes over
    all the items of the drawn groups (groups of different sizes weigh by their size, as in the share itself).
    One group: the interval is the share itself (nothing to resample). Seeded: the same inputs give the same
    interval.
    """
    success = np.asarray(success, dtype=np.float64)
    groups = np.asarray(groups)
    if success.shape != groups.shape or success.ndim != 1:
        raise ValueError(
            f"success and groups must be 1-d of one length, got {success.shape} and {groups.shape}"
        )
    if success.size == 0:
        raise ValueError("no items: the share of an empty set is undefined")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    _, inverse = np.unique(groups, return_inverse=True)
    hits = np.bincount(inverse, weights=success)
    sizes = np.bincount(inverse).astype(np.float64)
    share = float(hits.sum() / sizes.sum())
    if len(sizes) == 1:
        return share, share, share
    draw = np.random.default_rng(seed).integers(0, len(sizes), size=(resamples, len(sizes)))
    shares = hits[draw].sum(axis=1) / sizes[draw].sum(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(shares, [tail, 1 - tail])
    return share, float(lo), float(hi)
