"""The hybrid reward against the hand-computed example in dp2osr/reward.py's docstring (arXiv 2510.18851)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from dp2osr.math.reward import hybrid_reward, minmax, orient


@dataclass(frozen=True)
class Meta:
    family: str
    lower_better: bool


CATALOGUE = {"lpips": Meta("fr", True), "musiq": Meta("nr", False)}


def example_scores() -> pd.DataFrame:
    """The docstring's table: LPIPS (FR, lower better) and MUSIQ (NR, higher better), 2 images x 2 seeds."""
    rows = [
        ("a", 0, 0.2, 40.0),
        ("a", 1, 0.4, 60.0),
        ("b", 0, 0.3, 50.0),
        ("b", 1, 0.6, 70.0),
    ]
    long = []
    for image_id, seed, lp, mu in rows:
        long.append((image_id, seed, "lpips", lp))
        long.append((image_id, seed, "musiq", mu))
    return pd.DataFrame(long, columns=["image_id", "seed", "metric", "value"])


def test_orient_negates_lower_better_only():
    values = [0.2, 0.4]
    assert orient(values, lower_better=True).tolist() == [-0.2, -0.4]
    assert orient(values, lower_better=False).tolist() == [0.2, 0.4]
    assert orient(values, True).dtype == np.float64


def test_minmax_range_constant_and_nan():
    np.testing.assert_allclose(minmax([1.0, 2.0, 3.0]), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(minmax([2.0, 3.0], lo=1.0, hi=5.0), [0.25, 0.5])
    # constant column: every value is the midpoint
    assert minmax([7.0, 7.0, 7.0]).tolist() == [0.5, 0.5, 0.5]
    out = minmax([1.0, np.nan, 3.0])
    assert out[0] == 0.0 and np.isnan(out[1]) and out[2] == 1.0
    assert np.isnan(minmax([np.nan])).all()


def test_pool_scope_matches_hand_computation():
    r = hybrid_reward(example_scores(), CATALOGUE)
    assert list(r.columns) == ["image_id", "seed", "reward", "norm_lpips", "norm_musiq"]
    assert r["image_id"].tolist() == ["a", "a", "b", "b"] and r["seed"].tolist() == [0, 1, 0, 1]
    assert r["seed"].dtype == np.int64
    # oriented LPIPS -0.2, -0.4, -0.3, -0.6 -> (s + 0.6) / 0.4: the lowest LPIPS gets 1
    np.testing.assert_allclose(r["norm_lpips"], [1.0, 0.5, 0.75, 0.0])
    np.testing.assert_allclose(r["norm_musiq"], [0.0, 2 / 3, 1 / 3, 1.0])
    np.testing.assert_allclose(r["reward"], [0.5, 7 / 12, 13 / 24, 0.5])


def test_weights():
    r = hybrid_reward(example_scores(), CATALOGUE, w_fr=0.8, w_nr=0.2)
    np.testing.assert_allclose(r["reward"], [0.8, 8 / 15, 2 / 3, 0.2])


def test_image_scope_normalises_within_each_image():
    r = hybrid_reward(example_scores(), CATALOGUE, scope="image")
    np.testing.assert_allclose(r["norm_lpips"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(r["norm_musiq"], [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(r["reward"], [0.5, 0.5, 0.5, 0.5])


def test_metric_means_within_family_and_higher_better_orientation():
    scores = example_scores()
    extra = scores[scores.metric == "lpips"].assign(metric="psnr", value=[30.0, 20.0, 25.0, 10.0])
    cat = {**CATALOGUE, "psnr": Meta("fr", False)}
    r = hybrid_reward(pd.concat([scores, extra]), cat)
    assert list(r.columns)[3:] == ["norm_lpips", "norm_musiq", "norm_psnr"]  # catalogue order
    norm_psnr = np.array([1.0, 0.5, 0.75, 0.0])  # (v - 10) / 20
    fr = (np.array([1.0, 0.5, 0.75, 0.0]) + norm_psnr) / 2
    nr = np.array([0.0, 2 / 3, 1 / 3, 1.0])
    np.testing.assert_allclose(r["reward"], 0.5 * fr + 0.5 * nr)


def test_one_family_alone_when_the_other_is_missing():
    scores = example_scores()
    # candidate (b, 1) has no HR: no FR score
    scores = scores[~((scores.image_id == "b") & (scores.seed == 1) & (scores.metric == "lpips"))]
    r = hybrid_reward(scores, CATALOGUE, w_fr=0.8, w_nr=0.2)
    # LPIPS pool is now -0.2, -0.4, -0.3 -> (s + 0.4) / 0.2
    np.testing.assert_allclose(r["norm_lpips"][:3], [1.0, 0.0, 0.5])
    assert np.isnan(r["norm_lpips"][3])
    assert r["reward"][3] == pytest.approx(1.0)  # its normalised MUSIQ alone, unweighted
    assert r["reward"][0] == pytest.approx(0.8 * 1.0 + 0.2 * 0.0)
    # only NR metrics in the table at all
    r_nr = hybrid_reward(scores[scores.metric == "musiq"], CATALOGUE)
    np.testing.assert_allclose(r_nr["reward"], [0.0, 2 / 3, 1 / 3, 1.0])
    assert "norm_lpips" not in r_nr


def test_single_candidate_gets_midpoint():
    scores = example_scores().iloc[:2]
    r = hybrid_reward(scores, CATALOGUE)
    assert r["reward"].tolist() == [0.5]


def test_input_errors():
    scores = example_scores()
    with pytest.raises(ValueError, match="scope"):
        hybrid_reward(scores, CATALOGUE, scope="batch")
    with pytest.raises(ValueError, match="not in the catalogue"):
        hybrid_reward(scores, {"lpips": CATALOGUE["lpips"]})
    with pytest.raises(ValueError, match="duplicate"):
        hybrid_reward(pd.concat([scores, scores.iloc[:1]]), CATALOGUE)
    with pytest.raises(ValueError, match="w_fr"):
        hybrid_reward(scores, CATALOGUE, w_fr=-1)
    with pytest.raises(ValueError, match="columns"):
        hybrid_reward(scores.drop(columns="value"), CATALOGUE)
