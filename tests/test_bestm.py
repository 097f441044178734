"""Best@M / Mean@M / Worst@M on a hand-made pool.

Pool (rows = images, columns = seeds 0..3 in seed order)::

    image a: 0.2  0.8  0.5  0.1
    image b: 0.6  0.4  0.9  0.3

M = 1 (seed 0 only):  a -> 0.2, b -> 0.6          Best = Mean = Worst = (0.2 + 0.6) / 2 = 0.4
M = 2 (seeds 0, 1):   a: max .8 min .2 mean .5;  b: max .6 min .4 mean .5
                      Best = (.8 + .6)/2 = .7, Worst = (.2 + .4)/2 = .3, Mean = (.5 + .5)/2 = .5
M = 4 (all seeds):    a: max .8 min .1 mean 1.6/4 = .4;  b: max .9 min .3 mean 2.2/4 = .55
                      Best = (.8 + .9)/2 = .85, Worst = (.1 + .3)/2 = .2, Mean = (.4 + .55)/2 = .475
"""

import numpy as np
import pandas as pd
import pytest

from dp2osr.math.bestm import best_mean_worst, default_ms, per_image_spread, rewards_matrix
from dp2osr.math.change import change_sentence, pool_change

POOL = np.array([[0.2, 0.8, 0.5, 0.1], [0.6, 0.4, 0.9, 0.3]])


def test_best_mean_worst_hand_derived():
    out = best_mean_worst(POOL, [1, 2, 4])
    np.testing.assert_array_equal(out["m"], [1, 2, 4])
    np.testing.assert_allclose(out["best"], [0.4, 0.7, 0.85])
    np.testing.assert_allclose(out["mean"], [0.4, 0.5, 0.475])
    np.testing.assert_allclose(out["worst"], [0.4, 0.3, 0.2])
    # Best never falls and Worst never rises as M grows (nested first-M subsets).
    full = best_mean_worst(POOL, default_ms(4))
    assert np.all(np.diff(full["best"]) >= 0) and np.all(np.diff(full["worst"]) <= 0)


def test_default_ms():
    assert default_ms(1) == [1]
    assert default_ms(4) == [1, 2, 4]
    assert default_ms(6) == [1, 2, 4, 6]
    assert default_ms(64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError):
        default_ms(0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="1..4"):
        best_mean_worst(POOL, [8])
    with pytest.raises(ValueError, match="NaN"):
        best_mean_worst(np.array([[0.1, np.nan]]), [1])
    with pytest.raises(ValueError, match="non-empty"):
        best_mean_worst(np.zeros((0, 3)), [1])


def _long(matrix, ids=("a", "b"), seeds=(3, 7, 11, 20)):
    rows = [
        {"image_id": i, "seed": s, "path": f"{i}/seed_{s:04d}.png", "reward": matrix[r][c]}
        for r, i in enumerate(ids)
        for c, s in enumerate(seeds)
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # shuffled: order must come from seed


def test_rewards_matrix_orders_by_seed():
    ids, seeds, mat = rewards_matrix(_long(POOL))
    assert ids == ["a", "b"] and seeds == [3, 7, 11, 20]
    np.testing.assert_array_equal(mat, POOL)


def test_rewards_matrix_rejects_uneven_seed_sets():
    df = _long(POOL)
    df = df[~((df.image_id == "b") & (df.seed == 20))]
    with pytest.raises(ValueError, match="different seed sets"):
        rewards_matrix(df)
    df2 = _long(POOL)
    df2.loc[(df2.image_id == "b") & (df2.seed == 20), "seed"] = 21  # same count, different seed
    with pytest.raises(ValueError, match="different seed sets"):
        rewards_matrix(df2)
    with pytest.raises(ValueError, match="duplicate"):
        rewards_matrix(pd.concat([_long(POOL), _long(POOL).head(1)]))
    with pytest.raises(ValueError, match="no column 'score'"):
        rewards_matrix(_long(POOL), column="score")


def test_per_image_spread():
    spread = per_image_spread(_long(POOL))
    a = spread.set_index("image_id").loc["a"]
    assert a["n_seeds"] == 4 and a["best_seed"] == 7 and a["worst_seed"] == 20
    assert a["std"] == pytest.approx(np.std([0.2, 0.8, 0.5, 0.1]))


def test_mean_se_and_paired_change_by_hand():
    from dp2osr.math.bestm import mean_se, paired_change, t95

    r = np.array([[0.0, 1.0], [2.0, 2.0]])  # variances over seeds (ddof 1): 0.5, 0 -> sqrt(0.5 / 2) / 2
    assert mean_se(r) == pytest.approx(0.25)
    assert np.isnan(mean_se(r[:, :1]))
    delta, se, df = paired_change(r, r + np.array([[0.1, 0.1], [0.3, 0.3]]))  # per-image changes .1, .3
    assert (
        delta == pytest.approx(0.2)
        and se == pytest.approx(np.std([0.1, 0.3], ddof=1) / np.sqrt(2))
        and df == 1
    )
    one = paired_change(r[:1], r[:1] + np.array([[0.0, 0.2]]))  # one image: per-seed changes 0, .2
    assert one == (pytest.approx(0.1), pytest.approx(np.sqrt(0.02 / 2)), 1)
    assert t95(1) == pytest.approx(12.706, abs=1e-3) and t95(7) == pytest.approx(2.365, abs=1e-3)
    assert np.isnan(t95(0))


def test_curve_plot_shades_noise_without_a_panel_for_it():
    import io

    from PIL import Image

    from dp2osr.plots import plot_curve

    base = pd.DataFrame(
        {"step": [0, 10, 20], "reward": [0.5, 0.52, 0.51], "best": [0.7] * 3, "worst": [0.3] * 3}
    )
    heights = [
        Image.open(io.BytesIO(plot_curve(df))).height
        for df in (base, base.assign(reward_se=[0.01, 0.02, 0.01]))
    ]
    assert heights[0] == heights[1]  # reward_se is drawn as a band on the reward panel, not as a panel


def _pool_table(rewards):
    """A rewards table from an (images, seeds) matrix."""
    return pd.DataFrame(
        [
            {"image_id": f"im{i}", "seed": s, "reward": float(v)}
            for i, row in enumerate(rewards)
            for s, v in enumerate(row)
        ]
    )


def test_change_sentence_improved_worse_and_within_noise():
    base = _pool_table([[0.40, 0.50], [0.50, 0.60], [0.60, 0.70]])
    # per-image changes .10, .12, .08: mean .10, std (ddof 1) .02, s.e. .02 / sqrt(3) = .011547, 2 df (t 4.30)
    up = _pool_table([[0.50, 0.60], [0.62, 0.72], [0.68, 0.78]])
    change = pool_change(base, up)
    assert change == {"delta": pytest.approx(0.10), "se": pytest.approx(0.02 / np.sqrt(3)), "df": 2, "m": 2}
    assert change_sentence(change, "base", "DP²O") == (
        "DP²O improved the held-out reward beyond the noise: Mean@2 changed by +0.1000 (DP²O minus base); the "
        "standard error of this change is 0.0115, so the change is 8.7 standard errors (beyond noise: more "
        "than 4.30)."
    )
    assert change_sentence(pool_change(up, base), "a", "b").startswith(
        "b lowered the held-out reward beyond the noise: Mean@2 changed by −0.1000"
    )
    # changes +.05, -.05, +.01: mean .00333, s.e. .0291 -> within noise
    noisy = _pool_table([[0.45, 0.55], [0.45, 0.55], [0.61, 0.71]])
    change = pool_change(base, noisy)
    assert change["delta"] == pytest.approx(0.01 / 3)
    assert change["se"] == pytest.approx(np.std([0.05, -0.05, 0.01], ddof=1) / np.sqrt(3))
    assert change_sentence(change) == (
        "Mean@2 changed by +0.0033 (DP²O minus the base model); the standard error of this change is 0.0291, so "
        "this is within noise: no measurable change of the held-out reward."
    )
    # 8.7 s.e. is beyond noise with 3 images; 6 s.e. is not with 2 images (1 df: t threshold 12.7)
    two = pool_change(base.iloc[:4], _pool_table([[0.50, 0.60], [0.64, 0.74]]))  # changes .10, .14: 6 s.e.
    assert two["df"] == 1 and "within noise" in change_sentence(two)
    tiny = {"delta": -4e-5, "se": 1e-5, "df": 7, "m": 8}
    assert change_sentence(tiny).startswith(
        "DP²O lowered the held-out reward beyond the noise: Mean@8 changed by −4.0e−05"
    )
