"""The paper's claims checked on one run's held-out pools: effect, interval and verdict per claim — pure
functions on reward tables, no I/O. Used by ``scripts/medium.py`` (claims.md, claims.json and a section of the
medium run's report).

Every pool is a table with one row per held-out ``image_id`` and sampling ``seed`` and the columns
``reward`` (the hybrid reward), ``fr`` and ``nr`` (its FR and NR parts), ``psnr`` and ``ssim``, all pools
under one normalisation (the base pool's bounds), so they can be compared. Pools: ``base`` (the starting
model), and the final pools of the DP²O variants that were run: ``hybrid`` (top-N x bottom-N, HPO, hybrid
reward), ``fr_only``, ``nr_only``, ``n1`` and ``no_hpo``. A claim whose pools are missing is "not measured".

Every effect is a mean over held-out images of a per-image difference d_i (the same images and seeds in both
pools); its interval is the two-sided 95 % Student-t interval, mean ± t95(N - 1) · std(d_i, ddof 1) / sqrt(N),
the statistics of `change.pool_change`. With fewer than two images there is no interval (NaN).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from dp2osr.math import bestm

REPRODUCED, NOT_REPRODUCED, NOT_MEASURED = "reproduced", "not reproduced", "not measured"
# "PSNR/SSIM drop slightly": a drop, and the interval's lower end no further than this below zero.
SLIGHT = {"psnr": 0.5, "ssim": 0.02}
# "HPO at least as good as uniform weights": the interval's lower end no further than this below zero
# (reward units; min-max normalised, so 0.01 is 1 % of the base pool's range).
NON_INFERIOR = 0.01


def per_image(pool: pd.DataFrame, column: str, stat: str) -> pd.Series:
    """Per image: ``stat`` (mean, min, max, std with ddof 0) of ``column`` over its seeds."""
    ids, _, mat = bestm.rewards_matrix(pool, column)
    fn = {"mean": np.mean, "min": np.min, "max": np.max, "std": np.std}[stat]
    return pd.Series(fn(mat, axis=1), index=ids)


def interval(d: np.ndarray) -> dict:
    """``{effect, lo, hi, n}``: the mean of ``d`` and its two-sided 95 % Student-t interval."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need a non-empty 1-d array of per-image differences, got shape {d.shape}")
    effect, n = float(d.mean()), int(d.size)
    if n < 2:
        return {"effect": effect, "lo": float("nan"), "hi": float("nan"), "n": n}
    half = bestm.t95(n - 1) * float(d.std(ddof=1)) / np.sqrt(n)
    return {"effect": effect, "lo": effect - half, "hi": effect + half, "n": n}


def paired(after: pd.DataFrame, before: pd.DataFrame, column: str, stat: str) -> dict:
    """The interval of per-image ``stat(after) - stat(before)`` over the (image, seed) both pools hold."""
    keys = before[["image_id", "seed"]].merge(after[["image_id", "seed"]])
    if keys.empty:
        raise ValueError("the pools share no (image, seed)")
    a, b = (per_image(p.merge(keys), column, stat) for p in (after, before))
    return interval((a - b).to_numpy())


def growth_with_m(pool: pd.DataFrame, stat: str) -> dict:
    """Base pool: per image, the best (``max``) or worst (``min``) reward of all its seeds minus that of its
    first seed (Best@M - Best@1 or Worst@M - Worst@1 at M = the pool's seeds)."""
    _, _, mat = bestm.rewards_matrix(pool, "reward")
    whole = mat.max(axis=1) if stat == "max" else mat.min(axis=1)
    return interval(whole - mat[:, 0])


def above(r: dict) -> bool:
    return bool(r["lo"] > 0)


def below(r: dict) -> bool:
    return bool(r["hi"] < 0)


def _slight(metric: str) -> Callable[[dict], bool]:
    return lambda r: bool(r["effect"] <= 0 and r["lo"] >= -SLIGHT[metric])


def _non_inferior(r: dict) -> bool:
    return bool(r["lo"] >= -NON_INFERIOR)


def between(pools: dict[str, pd.DataFrame]) -> dict:
    """Where the hybrid lies between FR-only and NR-only: per part p (fr, nr), the position
    (hybrid - NR-only) / (FR-only - NR-only) of the pools' mean part, 0 at NR-only and 1 at FR-only; the
    effect is the smaller of the two distances inside [0, 1] (min(t, 1 - t) over both parts: > 0 when the
    hybrid lies strictly between on both), its interval a bootstrap over images (2000 resamples, seeded)."""
    names = ("hybrid", "fr_only", "nr_only")
    keys = pools["hybrid"][["image_id", "seed"]]
    for name in names[1:]:
        keys = keys.merge(pools[name][["image_id", "seed"]])
    parts = {
        p: np.stack([per_image(pools[k].merge(keys), p, "mean").to_numpy() for k in names])
        for p in ("fr", "nr")
    }

    def margin(idx: np.ndarray) -> float:
        out = []
        for mat in parts.values():
            h, f, n = mat[:, idx].mean(axis=1)
            t = (h - n) / (f - n) if f != n else float("nan")
            out.append(min(t, 1 - t))
        return float(min(out))

    n_img = parts["fr"].shape[1]
    effect = margin(np.arange(n_img))
    draws = np.random.default_rng(0).integers(0, n_img, size=(2000, n_img))
    boot = np.array([margin(i) for i in draws])
    lo, hi = (np.nanquantile(boot, q) for q in (0.025, 0.975)) if np.isfinite(boot).any() else (np.nan,) * 2
    return {"effect": effect, "lo": float(lo), "hi": float(hi), "n": n_img}


# (key, claim, measured as, pools needed, effect, reproduced when)
CLAIMS: list[tuple[str, str, str, tuple[str, ...], Callable, Callable]] = [
    (
        "base_best_rises",
        "Base model: Best@M rises with M",
        "Best@M − Best@1 of the base pool (M = its seeds), per image; ≥ 0 for every image by construction (the "
        "best of M includes seed 0), so the verdict only says the seeds differ: its size is the finding",
        ("base",),
        lambda p: growth_with_m(p["base"], "max"),
        above,
    ),
    (
        "base_worst_falls",
        "Base model: Worst@M falls with M",
        "Worst@M − Worst@1 of the base pool, per image; ≤ 0 by construction, so its size is the finding",
        ("base",),
        lambda p: growth_with_m(p["base"], "min"),
        below,
    ),
    (
        "dpo_worst",
        "DP²O raises Worst@M",
        "per-image worst reward over the seeds, DP²O − base",
        ("base", "hybrid"),
        lambda p: paired(p["hybrid"], p["base"], "reward", "min"),
        above,
    ),
    (
        "dpo_mean",
        "DP²O raises Mean@M",
        "per-image mean reward over the seeds, DP²O − base",
        ("base", "hybrid"),
        lambda p: paired(p["hybrid"], p["base"], "reward", "mean"),
        above,
    ),
    (
        "dpo_spread",
        "DP²O shrinks the seed-to-seed spread",
        "per-image std of the reward over the seeds, DP²O − base",
        ("base", "hybrid"),
        lambda p: paired(p["hybrid"], p["base"], "reward", "std"),
        below,
    ),
    (
        "psnr_slight",
        "PSNR drops slightly",
        f"per-image mean PSNR-Y (dB), DP²O − base; reproduced: ≤ 0 and interval above −{SLIGHT['psnr']}",
        ("base", "hybrid"),
        lambda p: paired(p["hybrid"], p["base"], "psnr", "mean"),
        _slight("psnr"),
    ),
    (
        "ssim_slight",
        "SSIM drops slightly",
        f"per-image mean SSIM-Y, DP²O − base; reproduced: ≤ 0 and interval above −{SLIGHT['ssim']}",
        ("base", "hybrid"),
        lambda p: paired(p["hybrid"], p["base"], "ssim", "mean"),
        _slight("ssim"),
    ),
    (
        "topn_steadier",
        "Top-N × bottom-N is steadier than N = 1",
        "per-image std of the reward over the seeds, top-N × bottom-N − N = 1 (final pools)",
        ("hybrid", "n1"),
        lambda p: paired(p["hybrid"], p["n1"], "reward", "std"),
        below,
    ),
    (
        "hpo_vs_uniform",
        "HPO is at least as good as uniform weights",
        f"per-image mean reward, HPO − uniform (final pools); reproduced: interval above −{NON_INFERIOR}",
        ("hybrid", "no_hpo"),
        lambda p: paired(p["hybrid"], p["no_hpo"], "reward", "mean"),
        _non_inferior,
    ),
    (
        "hybrid_between",
        "The hybrid reward lies between FR-only and NR-only",
        "min over the FR and NR parts of min(t, 1 − t), t = (hybrid − NR-only)/(FR-only − NR-only) of the mean "
        "part; reproduced: interval above 0",
        ("hybrid", "fr_only", "nr_only"),
        between,
        above,
    ),
]


def claim_rows(pools: dict[str, pd.DataFrame]) -> list[dict]:
    """One dict per claim: ``key, claim, measured_as, effect, lo, hi, n, verdict``."""
    rows = []
    for key, claim, how, need, effect, ok in CLAIMS:
        row = {"key": key, "claim": claim, "measured_as": how}
        if not all(k in pools for k in need):
            missing = ", ".join(k for k in need if k not in pools)
            rows.append(
                {
                    **row,
                    "effect": None,
                    "lo": None,
                    "hi": None,
                    "n": 0,
                    "verdict": NOT_MEASURED,
                    "note": f"not run: {missing}",
                }
            )
            continue
        r = effect(pools)
        verdict = REPRODUCED if ok(r) else NOT_REPRODUCED
        rows.append({**row, **r, "verdict": verdict, "note": ""})
    return rows


def seed_target(base: pd.DataFrame, after: pd.DataFrame, accuracy: dict, guards: dict[str, bool]) -> dict:
    """One run's check against the medium recipe's target: the held-out preference accuracy's interval above
    0.5 (``accuracy``: ``accuracy, lo, hi``), Mean@M up beyond the noise (the per-image interval of the mean
    reward above 0) and no guard worse beyond the noise (its per-image mean's interval wholly on the worse
    side; ``guards``: column -> lower is better). A guard in `SLIGHT` (PSNR, SSIM) is also checked against the
    paper's "drops slightly": ``slight`` when its interval's worse end stays within that allowance. Returns the
    intervals and the verdicts ``accuracy_ok``, ``mean_ok``, ``guards_ok`` and ``met`` (all three, strict),
    and ``met_slight`` (the same with PSNR/SSIM allowed the slight drop)."""
    out: dict = {"accuracy": dict(accuracy), "mean": paired(after, base, "reward", "mean")}
    out["worst"] = paired(after, base, "reward", "min")
    worse, beyond_slight = [], []
    for column, lower_better in guards.items():
        r = paired(after, base, column, "mean")
        r["worse"] = bool(r["lo"] > 0) if lower_better else bool(r["hi"] < 0)
        if column in SLIGHT:
            r["slight"] = bool(r["lo"] >= -SLIGHT[column])
        out[column] = r
        worse += [column] if r["worse"] else []
        beyond_slight += [column] if r["worse"] and not r.get("slight", False) else []
    out["accuracy_ok"] = bool(accuracy["lo"] > 0.5)
    out["mean_ok"] = above(out["mean"])
    out["guards_ok"] = not worse
    out["worse_guards"] = worse
    out["met"] = out["accuracy_ok"] and out["mean_ok"] and out["guards_ok"]
    out["met_slight"] = out["accuracy_ok"] and out["mean_ok"] and not beyond_slight
    return out


def _num(x) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:+.4f}".replace("-", "−")


def claims_markdown(rows: list[dict]) -> str:
    """A Markdown table of `claim_rows`."""
    lines = [
        "| claim | measured as | effect | 95 % interval | images | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        span = f"[{_num(r['lo'])}, {_num(r['hi'])}]" if r["effect"] is not None else r["note"]
        lines.append(
            f"| {r['claim']} | {r['measured_as']} | {_num(r['effect'])} | {span} | {r['n']} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"
