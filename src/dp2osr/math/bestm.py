"""Best@M / Mean@M / Worst@M of a seeded candidate pool (arXiv 2510.18851) — pure functions, no I/O.

For each test image the pool holds one reward per sampling seed. Drawing M outputs means taking the first M
seeds (in seed order), so the statistics for growing M are nested, as in the paper's plots:

- Best@M  = mean over images of the per-image maximum of the first M rewards,
- Worst@M = mean over images of the per-image minimum,
- Mean@M  = mean over images of the per-image average.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STATS = ("best", "mean", "worst")


def default_ms(pool_size: int) -> list[int]:
    """1, 2, 4, … up to ``pool_size``, with ``pool_size`` itself appended when it is not a power of 2."""
    if pool_size < 1:
        raise ValueError(f"pool size must be >= 1, got {pool_size}")
    ms, m = [], 1
    while m <= pool_size:
        ms.append(m)
        m *= 2
    if ms[-1] != pool_size:
        ms.append(pool_size)
    return ms


def best_mean_worst(rewards: np.ndarray, ms: list[int]) -> dict[str, np.ndarray]:
    """Best@M, Mean@M and Worst@M for each M in ``ms``.

    ``rewards`` has shape ``(images, seeds)`` with the seeds (columns) in seed order; M uses columns ``:M``.
    Returns ``{"m": array of M, "best": …, "mean": …, "worst": …}``, each of length ``len(ms)``.
    NaN rewards are an error (a missing candidate would silently change M for that image).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be a non-empty (images, seeds) matrix, got shape {rewards.shape}")
    if np.isnan(rewards).any():
        raise ValueError("rewards contain NaN; every image needs a reward for every seed")
    pool = rewards.shape[1]
    bad = [m for m in ms if not 1 <= int(m) <= pool]
    if bad or not ms:
        raise ValueError(f"every M must be in 1..{pool} (the pool size); got {list(ms)}")
    out: dict[str, np.ndarray] = {"m": np.asarray([int(m) for m in ms], dtype=np.int64)}
    first = [rewards[:, : int(m)] for m in ms]
    out["best"] = np.array([r.max(axis=1).mean() for r in first])
    out["mean"] = np.array([r.mean(axis=1).mean() for r in first])
    out["worst"] = np.array([r.min(axis=1).mean() for r in first])
    return out


def rewards_matrix(df: pd.DataFrame, column: str = "reward") -> tuple[list[str], list[int], np.ndarray]:
    """``(image_ids, seeds, matrix)`` from a rewards table (one row per ``image_id``, ``seed``).

    Rows of the matrix follow the sorted image ids, columns the sorted seeds. Raises ValueError when a column
    is missing, an (image, seed) appears twice, or images do not all have the same set of seeds.
    """
    for name in ("image_id", "seed", column):
        if name not in df.columns:
            raise ValueError(f"rewards table has no column {name!r}; columns: {list(df.columns)}")
    if df.empty:
        raise ValueError("rewards table is empty")
    dup = df.duplicated(["image_id", "seed"])
    if dup.any():
        first = df.loc[dup, ["image_id", "seed"]].iloc[0]
        raise ValueError(
            f"duplicate (image_id, seed) in rewards table, e.g. ({first.image_id}, {first.seed})"
        )
    seed_sets = df.groupby("image_id")["seed"].apply(lambda s: tuple(sorted(int(v) for v in s)))
    distinct = seed_sets.value_counts()
    if len(distinct) > 1:
        common = distinct.index[0]
        odd = [str(i) for i, s in seed_sets.items() if s != common]
        raise ValueError(
            f"images have different seed sets: {len(odd)} image(s) differ from the most common set "
            f"({len(common)} seeds), e.g. {odd[:5]}"
        )
    wide = df.pivot(index="image_id", columns="seed", values=column).sort_index().sort_index(axis=1)
    return [str(i) for i in wide.index], [int(s) for s in wide.columns], wide.to_numpy(dtype=np.float64)


def per_image_spread(df: pd.DataFrame, column: str = "reward") -> pd.DataFrame:
    """Per image: number of seeds, mean, std (over seeds, ddof=0), min, max and the best/worst seed."""
    ids, seeds, mat = rewards_matrix(df, column)
    return pd.DataFrame(
        {
            "image_id": ids,
            "n_seeds": mat.shape[1],
            "mean": mat.mean(axis=1),
            "std": mat.std(axis=1),
            "min": mat.min(axis=1),
            "max": mat.max(axis=1),
            "best_seed": [seeds[j] for j in mat.argmax(axis=1)],
            "worst_seed": [seeds[j] for j in mat.argmin(axis=1)],
        }
    )


def mean_se(rewards: np.ndarray) -> float:
    """Seed-to-seed standard error of Mean@M (M = all columns) for these images.

    Mean@M = (1/N) sum_i (1/M) sum_s r_is. If the M seeds are a random draw, the variance of Mean@M over
    draws is (1/N^2) sum_i var_i / M, with var_i the variance of image i's rewards over seeds (ddof=1), so
    ``se = sqrt(sum_i var_i / M) / N``. NaN with a single seed.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    n, m = rewards.shape
    if m < 2:
        return float("nan")
    return float(np.sqrt(rewards.var(axis=1, ddof=1).sum() / m) / n)


def paired_change(before: np.ndarray, after: np.ndarray) -> tuple[float, float, int]:
    """``(change of Mean@M, its standard error, degrees of freedom)`` of two pools of the same images (rows)
    and seeds (columns).

    The change is the mean over images of d_i = mean_s(after_is) - mean_s(before_is). Its standard error is
    taken over images: ``std(d_i, ddof=1) / sqrt(N)`` with N - 1 degrees of freedom; each d_i is an average
    over M seeds, so the seed-to-seed noise is in it, plus how much the change varies from image to image.
    With one image it falls back to the seed-to-seed error of the per-seed differences (:func:`mean_se` of
    ``after - before``, M - 1 degrees of freedom).
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"pools differ in shape: {before.shape} vs {after.shape}")
    d = after.mean(axis=1) - before.mean(axis=1)
    if len(d) < 2:
        return float(d.mean()), mean_se(after - before), after.shape[1] - 1
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))), len(d) - 1


def t95(df: int) -> float:
    """The two-sided 95 % threshold of Student's t with ``df`` degrees of freedom (NaN for df < 1): a change
    beyond ``t95(df)`` standard errors is beyond noise (1.96 for many images; 12.7 for two)."""
    if df < 1:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, df))
