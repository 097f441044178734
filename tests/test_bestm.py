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
