"""The claims table (`dp2osr.math.claims`) on constructed pools whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from dp2osr.math import claims


def pool(rewards: np.ndarray, psnr: float = 25.0, ssim: float = 0.8, fr=None, nr=None) -> pd.DataFrame:
    """A pool table from an (images, seeds) reward matrix; fr/nr parts default to the reward."""
    n, m = rewards.shape
    rows = []
    for i in range(n):
        for s in range(m):
            r = float(rewards[i, s])
            rows.append(
                {
                    "image_id": f"img{i:02d}",
                    "seed": s,
                    "reward": r,
                    "fr": r if fr is None else fr[i, s],
                    "nr": r if nr is None else nr[i, s],
                    "psnr": psnr + 0.01 * i,
                    "ssim": ssim,
                }
            )
    return pd.DataFrame(rows)


RNG = np.random.default_rng(0)
BASE = RNG.uniform(0.2, 0.8, size=(12, 16))


def by_key(rows):
    return {r["key"]: r for r in rows}


def test_worst_rises_is_reproduced_and_flat_is_not():
    # DP²O squeezes every image's rewards towards its mean + 0.05: worst up, spread down, mean up.
    mean = BASE.mean(axis=1, keepdims=True)
    after = mean + 0.05 + 0.3 * (BASE - mean)
    rows = by_key(claims.claim_rows({"base": pool(BASE), "hybrid": pool(after, psnr=24.9)}))
    worst = rows["dpo_worst"]
    expected = (after.min(axis=1) - BASE.min(axis=1)).mean()
    assert worst["effect"] == pytest.approx(expected)
    assert worst["lo"] > 0 and worst["verdict"] == claims.REPRODUCED
    assert rows["dpo_mean"]["effect"] == pytest.approx(0.05)
    assert rows["dpo_spread"]["verdict"] == claims.REPRODUCED
    assert rows["psnr_slight"]["effect"] == pytest.approx(-0.1)
    assert rows["psnr_slight"]["verdict"] == claims.REPRODUCED
    assert rows["ssim_slight"]["verdict"] == claims.REPRODUCED  # 0 change: no drop beyond the tolerance
    # base pool: Best@16 above Best@1, Worst@16 below Worst@1
    assert rows["base_best_rises"]["verdict"] == claims.REPRODUCED
    assert rows["base_worst_falls"]["verdict"] == claims.REPRODUCED
    assert rows["base_best_rises"]["effect"] == pytest.approx((BASE.max(axis=1) - BASE[:, 0]).mean())
    # variants not run
    for key in ("topn_steadier", "hpo_vs_uniform", "hybrid_between"):
        assert rows[key]["verdict"] == claims.NOT_MEASURED and rows[key]["effect"] is None

    flat = by_key(claims.claim_rows({"base": pool(BASE), "hybrid": pool(BASE + 0.0)}))
    for key in ("dpo_worst", "dpo_mean", "dpo_spread"):
        assert flat[key]["effect"] == 0.0 and flat[key]["verdict"] == claims.NOT_REPRODUCED


def test_noisy_change_is_not_reproduced():
    after = BASE[:, RNG.permutation(16)]  # the same images, the seeds shuffled: no effect, only noise
    r = by_key(claims.claim_rows({"base": pool(BASE), "hybrid": pool(after)}))["dpo_mean"]
    assert r["lo"] < 0 < r["hi"] and r["verdict"] == claims.NOT_REPRODUCED


def test_psnr_drop_too_large_is_not_slight():
    rows = by_key(claims.claim_rows({"base": pool(BASE), "hybrid": pool(BASE, psnr=24.0)}))
    assert rows["psnr_slight"]["effect"] == pytest.approx(-1.0)
    assert rows["psnr_slight"]["verdict"] == claims.NOT_REPRODUCED


def test_variants():
    wide = BASE
    narrow = BASE.mean(axis=1, keepdims=True) + 0.2 * (BASE - BASE.mean(axis=1, keepdims=True))
    fr_pool = pool(narrow, fr=np.full_like(BASE, 0.9), nr=np.full_like(BASE, 0.1))
    nr_pool = pool(narrow, fr=np.full_like(BASE, 0.1), nr=np.full_like(BASE, 0.9))
    hybrid = pool(narrow, fr=np.full_like(BASE, 0.6), nr=np.full_like(BASE, 0.5))
    pools = {"base": pool(BASE), "hybrid": hybrid, "n1": pool(wide), "no_hpo": pool(narrow - 0.005)}
    rows = by_key(claims.claim_rows({**pools, "fr_only": fr_pool, "nr_only": nr_pool}))
    assert rows["topn_steadier"]["verdict"] == claims.REPRODUCED
    assert rows["hpo_vs_uniform"]["effect"] == pytest.approx(0.005)
    assert rows["hpo_vs_uniform"]["verdict"] == claims.REPRODUCED
    # FR part at t = 0.625, NR part at t = (0.5 - 0.9) / (0.1 - 0.9) = 0.5: min(t, 1 - t) = 0.375
    assert rows["hybrid_between"]["effect"] == pytest.approx(0.375)
    assert rows["hybrid_between"]["verdict"] == claims.REPRODUCED
    outside = pool(narrow, fr=np.full_like(BASE, 0.95), nr=np.full_like(BASE, 0.5))
    swapped = by_key(claims.claim_rows({**pools, "hybrid": outside, "fr_only": fr_pool, "nr_only": nr_pool}))
    assert swapped["hybrid_between"]["effect"] < 0
    assert swapped["hybrid_between"]["verdict"] == claims.NOT_REPRODUCED
    text = claims.claims_markdown(list(rows.values()))
    assert text.count("| reproduced |") == sum(r["verdict"] == claims.REPRODUCED for r in rows.values())


def test_interval_matches_student_t():
    d = np.array([0.1, 0.2, 0.3, 0.4])
    r = claims.interval(d)
    half = 3.182446305284263 * d.std(ddof=1) / 2
    assert (r["effect"], r["lo"], r["hi"]) == pytest.approx((0.25, 0.25 - half, 0.25 + half))
    assert np.isnan(claims.interval(np.array([1.0]))["lo"])


def test_seed_target_needs_accuracy_mean_and_no_worse_guard():
    mean = BASE.mean(axis=1, keepdims=True)
    up = mean + 0.05 + 0.5 * (BASE - mean)
    base, after = pool(BASE), pool(up)
    after["brisque"], base["brisque"] = (
        30.0 + RNG.normal(0, 0.1, len(after)),
        30.0 + RNG.normal(0, 0.1, len(base)),
    )
    guards = {"psnr": False, "ssim": False, "brisque": True}
    good = {"accuracy": 0.7, "lo": 0.6, "hi": 0.8}
    t = claims.seed_target(base, after, good, guards)
    assert t["mean"]["effect"] == pytest.approx(0.05) and t["mean_ok"] and t["accuracy_ok"]
    assert t["guards_ok"] and t["met"] and not t["brisque"]["worse"]
    assert not claims.seed_target(base, after, {"accuracy": 0.6, "lo": 0.45, "hi": 0.75}, guards)["met"]
    worse = after.assign(brisque=after["brisque"] + 5.0)  # BRISQUE: lower is better, so +5 is worse
    t = claims.seed_target(base, worse, good, guards)
    assert t["brisque"]["worse"] and t["worse_guards"] == ["brisque"] and not t["met"]
    t = claims.seed_target(base, after.assign(psnr=after["psnr"] - 1.0), good, guards)
    assert t["worse_guards"] == ["psnr"] and not t["psnr"]["slight"] and not t["met_slight"]
    t = claims.seed_target(
        base, after.assign(psnr=after["psnr"] - 0.1), good, guards
    )  # the paper's slight drop
    assert t["worse_guards"] == ["psnr"] and t["psnr"]["slight"] and t["met_slight"] and not t["met"]
    flat = claims.seed_target(base, base.copy(), good, guards)  # no change: Mean@M not up
    assert flat["mean"]["effect"] == pytest.approx(0.0) and not flat["mean_ok"]
