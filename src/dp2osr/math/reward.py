"""The hybrid perceptual reward (arXiv 2510.18851): orient, min-max normalise, average FR and NR.

Pure math on tables, no models. For every metric ``m`` of the candidate pool:

1. orient (§2.3): ``s = -v`` when pyiqa says lower is better, else ``s = v`` — afterwards higher is better;
2. normalise (§2.4): ``n = (s - min s) / (max s - min s)`` to [0, 1], where min/max run over the scope:
   ``pool`` (default [choice]: every candidate of every image, so rewards compare across images and models) or
   ``image`` (the M candidates of one image). A constant metric (max = min, e.g. a single candidate) gets
   ``n = 0.5`` — the midpoint, so it neither helps nor hurts any candidate;
3. combine (§2.4): ``R = w_FR · mean(n over FR metrics) + w_NR · mean(n over NR metrics)``, the paper's
   weights being 0.5 / 0.5. A candidate with no FR score (no HR image) or no NR score uses the family it has
   alone, unweighted (``R = mean(n over that family)``), so its reward stays on the same [0, 1] scale when
   ``w_FR + w_NR = 1``. Missing values are skipped in the means; a candidate with no score at all gets NaN.

Worked example (used by the tests). LPIPS is FR and lower-better, MUSIQ is NR and higher-better:

    image seed  lpips musiq | pool: n_lpips n_musiq  R(0.5/0.5)  R(0.8/0.2) | image: n_lpips n_musiq  R
    a     0     0.2   40    |       1.0     0.0      0.5         0.8        |        1.0     0.0      0.5
    a     1     0.4   60    |       0.5     2/3      7/12        8/15       |        0.0     1.0      0.5
    b     0     0.3   50    |       0.75    1/3      13/24       2/3        |        1.0     0.0      0.5
    b     1     0.6   70    |       0.0     1.0      0.5         0.2        |        0.0     1.0      0.5

(pool: oriented LPIPS is -0.2, -0.4, -0.3, -0.6, so n = (s + 0.6) / 0.4; MUSIQ n = (v - 40) / 30.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

SCOPES = ("pool", "image")
FAMILIES = ("fr", "nr")


class MetricMeta(Protocol):
    """What the reward needs to know about a metric (``dp2osr.metrics.MetricSpec`` provides it)."""

    family: str  # "fr" | "nr"
    lower_better: bool


def orient(values: npt.ArrayLike, lower_better: bool) -> np.ndarray:
    """Scores with higher = better (arXiv 2510.18851): negated when ``lower_better``; float64 copy."""
    arr = np.array(values, dtype=np.float64)
    return -arr if lower_better else arr


def minmax(values: npt.ArrayLike, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Min-max normalise to [0, 1] (arXiv 2510.18851): ``(v - lo) / (hi - lo)``.

    ``lo``/``hi`` default to the NaN-ignoring min/max of ``values``. When ``hi == lo`` (a constant column) every
    non-NaN value maps to 0.5. NaN stays NaN.
    """
    arr = np.array(values, dtype=np.float64)
    finite = arr[~np.isnan(arr)]
    if finite.size == 0:
        return arr
    lo = float(finite.min()) if lo is None else float(lo)
    hi = float(finite.max()) if hi is None else float(hi)
    if hi == lo:
        return np.where(np.isnan(arr), np.nan, 0.5)
    return (arr - lo) / (hi - lo)


def _family_mean(norm: pd.DataFrame, columns: list[str]) -> pd.Series:
    if not columns:
        return pd.Series(np.nan, index=norm.index)
    return norm[columns].mean(axis=1, skipna=True)  # all-NaN rows -> NaN


def hybrid_reward(
    scores_long: pd.DataFrame,
    catalogue: Mapping[str, MetricMeta],
    w_fr: float = 0.5,
    w_nr: float = 0.5,
    scope: str = "pool",
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """The hybrid reward of every candidate (the paper; see the module docstring for the rules).

    ``bounds`` (from :func:`fit_bounds`) fixes each metric's oriented (lo, hi) instead of fitting them on this
    table, so rewards of different pools (base vs DP²O, or checkpoints along a run) share one scale; values
    outside the bounds then fall outside [0, 1].

    ``scores_long`` has columns ``image_id, seed, metric, value`` (raw pyiqa values, one row per candidate and
    metric; a missing row means "not scored", e.g. FR without HR). ``catalogue`` maps each metric to its
    family and orientation. Returns one row per (image_id, seed), in order of first appearance, with columns
    ``image_id, seed, reward`` and ``norm_<metric>`` per metric (catalogue order).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    for name, w in (("w_fr", w_fr), ("w_nr", w_nr)):
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    need = {"image_id", "seed", "metric", "value"}
    if not need <= set(scores_long.columns):
        raise ValueError(f"scores table needs columns {sorted(need)}, got {list(scores_long.columns)}")
    present = list(dict.fromkeys(scores_long["metric"]))
    unknown = [m for m in present if m not in catalogue]
    if unknown:
        raise ValueError(f"metric(s) {unknown} are not in the catalogue {list(catalogue)}")
    for m in present:
        if catalogue[m].family not in FAMILIES:
            raise ValueError(
                f"metric {m!r}: family must be one of {list(FAMILIES)}, got {catalogue[m].family!r}"
            )
    if scores_long.duplicated(["image_id", "seed", "metric"]).any():
        dup = scores_long[scores_long.duplicated(["image_id", "seed", "metric"], keep=False)].head(3)
        raise ValueError(f"scores table has duplicate (image_id, seed, metric) rows, e.g.\n{dup}")

    metrics = [m for m in catalogue if m in present]
    keys = scores_long[["image_id", "seed"]].drop_duplicates().reset_index(drop=True)
    wide = scores_long.pivot(index=["image_id", "seed"], columns="metric", values="value")
    wide = wide.reindex(pd.MultiIndex.from_frame(keys))
    image_ids = wide.index.get_level_values("image_id")

    norm = pd.DataFrame(index=wide.index)
    for m in metrics:
        s = pd.Series(orient(wide[m].to_numpy(), catalogue[m].lower_better), index=wide.index)
        if bounds is not None:
            if m not in bounds:
                raise ValueError(f"no normalisation bounds for metric {m!r}; have {sorted(bounds)}")
            norm[m] = minmax(s.to_numpy(), *bounds[m])
        elif scope == "pool":
            norm[m] = minmax(s.to_numpy())
        else:
            norm[m] = s.groupby(image_ids, sort=False).transform(
                lambda g: pd.Series(minmax(g), index=g.index)
            )

    fr = _family_mean(norm, [m for m in metrics if catalogue[m].family == "fr"])
    nr = _family_mean(norm, [m for m in metrics if catalogue[m].family == "nr"])
    both = w_fr * fr + w_nr * nr
    reward = both.where(fr.notna() & nr.notna(), fr.fillna(nr))

    out = keys.copy()
    out["seed"] = out["seed"].astype("int64")
    out["reward"] = reward.to_numpy(dtype=np.float64)
    for m in metrics:
        out[f"norm_{m}"] = norm[m].to_numpy(dtype=np.float64)
    return out


def fit_bounds(
    scores_long: pd.DataFrame, catalogue: Mapping[str, MetricMeta]
) -> dict[str, tuple[float, float]]:
    """Each metric's oriented (min, max) over ``scores_long``: fit on the union of pools to compare them."""
    out = {}
    for m, group in scores_long.groupby("metric", sort=False):
        v = orient(group["value"].to_numpy(dtype=np.float64), catalogue[m].lower_better)
        out[str(m)] = (float(np.nanmin(v)), float(np.nanmax(v)))
    return out


def joint_rewards(
    pools: Mapping[str, pd.DataFrame],
    catalogue: Mapping[str, MetricMeta],
    w_fr: float = 0.5,
    w_nr: float = 0.5,
) -> dict[str, pd.DataFrame]:
    """The hybrid reward of several pools on one scale: each metric's bounds are fitted on the union of the
    pools' raw scores (:func:`fit_bounds`) and every pool is normalised with them, so a reward of one pool can
    be compared with a reward of another. ``pools`` maps a name to a long scores table; returns the
    :func:`hybrid_reward` table of each, under the same names."""
    if not pools:
        raise ValueError("no pools to normalise")
    bounds = fit_bounds(pd.concat(list(pools.values()), ignore_index=True), catalogue)
    return {k: hybrid_reward(s, catalogue, w_fr, w_nr, bounds=bounds) for k, s in pools.items()}
