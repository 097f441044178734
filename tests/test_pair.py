"""Tests for dp2osr.pair: top-N × bottom-N curation and HPO weights (arXiv 2510.18851)."""

import math
import os

import numpy as np
import pandas as pd
import pytest
import yaml

from dp2osr import tables
from dp2osr.backbones import backbone_class
from dp2osr.cli import main
from dp2osr.math.hpo import inter_weights, intra_weights, n_from_ratio, select_pairs
from dp2osr.pair import PAIR_COLUMNS, PairConfig, build_pairs

SIGMA_A = math.sqrt(0.0875)  # 0.2958039891549808


def _rewards_df() -> pd.DataFrame:
    """Two groups of M = 4 candidates.

    a: seeds 0, 1, 2, 3 with rewards 0.9, 0.1, 0.5, 0.3 -> ranking s0 (0.9), s2 (0.5), s3 (0.3), s1 (0.1).
    b: seeds 10, 11, 12, 13 with rewards 0.6, 0.4, 0.6, 0.4 (two ties) -> ranking, ties to the lower seed:
       s10 (0.6), s12 (0.6), s11 (0.4), s13 (0.4).
    """
    return pd.DataFrame(
        {
            "image_id": ["a"] * 4 + ["b"] * 4,
            "seed": [0, 1, 2, 3, 10, 11, 12, 13],
            "path": [f"{i}/seed_{s:04d}.png" for i, s in zip("aaaabbbb", [0, 1, 2, 3, 10, 11, 12, 13])],
            "reward": [0.9, 0.1, 0.5, 0.3, 0.6, 0.4, 0.6, 0.4],
            "lr_path": ["/data/lr/a.png"] * 4 + ["/data/lr/b.png"] * 4,
            "norm_musiq": np.linspace(0, 1, 8),  # extra columns are ignored
        }
    )


def test_hand_computed_two_groups():
    """N = 2 (ratio 0.5 of M = 4), HPO both.

    Group a: winners s0, s2; losers s3, s1. Pairs in order (winner rank, then loser rank):
        (s0, s3) gap 0.6, (s0, s1) gap 0.8, (s2, s3) gap 0.2, (s2, s1) gap 0.4;  μ_gap(a) = 2.0/4 = 0.5
        w_intra = gap + (1 − 0.5) = 1.1, 1.3, 0.7, 0.9                           (mean 1)
        σ_a (ddof 0): mean 0.45, deviations .45, −.35, .05, −.15, squares sum 0.35, σ² = 0.0875,
        σ_a = √0.0875 = 0.2958039891549808
    Group b: winners s10, s12; losers s11, s13, every gap 0.2 = μ_gap(b) -> w_intra = 1 for all four.
        σ_b: mean 0.5, every deviation ±0.1 -> σ_b = 0.1
    μ_σ = (0.2958039891549808 + 0.1)/2 = 0.1979019945774904
    w_inter(a) = σ_a + 1 − μ_σ = 1.0979019945774904;  w_inter(b) = 0.1 + 1 − μ_σ = 0.9020980054225096
    weight = w_intra · w_inter, e.g. a's first pair 1.1 · 1.0979019945774904 = 1.2076921940352394.
    """
    out = build_pairs(_rewards_df(), n=None, ratio=0.5, hpo="both")
    assert list(out.columns) == PAIR_COLUMNS
    assert list(zip(out.win_seed, out.lose_seed)) == [
        (0, 3),
        (0, 1),
        (2, 3),
        (2, 1),
        (10, 11),
        (10, 13),
        (12, 11),
        (12, 13),
    ]
    assert out.w_intra.tolist() == pytest.approx([1.1, 1.3, 0.7, 0.9, 1, 1, 1, 1])
    mu_sigma = (SIGMA_A + 0.1) / 2
    assert out.w_inter.tolist() == pytest.approx([1.0979019945774904] * 4 + [0.9020980054225096] * 4)
    assert out.w_inter.iloc[0] == pytest.approx(SIGMA_A + 1 - mu_sigma)
    assert out.weight.iloc[0] == pytest.approx(1.2076921940352394)
    assert np.allclose(out.weight, out.w_intra * out.w_inter)
    assert out.win_reward.tolist() == pytest.approx([0.9, 0.9, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6])
    assert out.lose_reward.tolist() == pytest.approx([0.3, 0.1, 0.3, 0.1, 0.4, 0.4, 0.4, 0.4])
    assert out.win_path.iloc[0] == "a/seed_0000.png" and out.lose_path.iloc[1] == "a/seed_0001.png"
    assert out.lr_path.tolist() == ["/data/lr/a.png"] * 4 + ["/data/lr/b.png"] * 4
    # The normalising properties the paper relies on: mean w_intra per group 1, mean w_inter over groups 1.
    assert out.groupby("image_id").w_intra.mean().tolist() == pytest.approx([1.0, 1.0])
    assert out.groupby("image_id").w_inter.first().mean() == pytest.approx(1.0)
    assert out.win_seed.dtype == np.int64 and out.lose_seed.dtype == np.int64


@pytest.mark.parametrize(
    ("hpo", "intra_is_one", "inter_is_one"),
    [("none", True, True), ("intra", False, True), ("inter", True, False), ("both", False, False)],
)
def test_hpo_switch(hpo, intra_is_one, inter_is_one):
    """A disabled level's column is 1, so weight = w_intra · w_inter in every mode; none = uniform 1."""
    out = build_pairs(_rewards_df(), n=2, ratio=None, hpo=hpo)
    assert np.allclose(out.w_intra, 1.0) == intra_is_one
    assert np.allclose(out.w_inter, 1.0) == inter_is_one
    assert np.allclose(out.weight, out.w_intra * out.w_inter)


def test_n1_is_best_vs_worst():
    """N = 1: one pair per group, the best against the worst. a: s0 (0.9) vs s1 (0.1). b: ties go to the
    lower seed, so the best is s10 and the worst s13 (of s11, s13 at 0.4, s13 ranks last). With one pair per
    group w_intra = gap + 1 − gap = 1."""
    out = build_pairs(_rewards_df(), n=1, ratio=None, hpo="both")
    assert list(zip(out.image_id, out.win_seed, out.lose_seed)) == [("a", 0, 1), ("b", 10, 13)]
    assert out.w_intra.tolist() == pytest.approx([1.0, 1.0])


def test_same_output_when_rows_are_shuffled():
    df = _rewards_df()
    expected = build_pairs(df, n=2, ratio=None, hpo="both")
    for seed in range(3):
        shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        pd.testing.assert_frame_equal(build_pairs(shuffled, n=2, ratio=None, hpo="both"), expected)


def test_select_pairs_indices_and_errors():
    """rewards (0.2, 0.8, 0.5, 0.8, 0.1, 0.3), seeds (5, 4, 3, 2, 1, 0): ranking by reward desc, seed asc:
    idx 3 (0.8, seed 2), idx 1 (0.8, seed 4), idx 2 (0.5), idx 5 (0.3), idx 0 (0.2), idx 4 (0.1).
    N = 2: winners 3, 1; losers 0, 4 -> (3,0), (3,4), (1,0), (1,4)."""
    rewards = np.array([0.2, 0.8, 0.5, 0.8, 0.1, 0.3])
    seeds = np.array([5, 4, 3, 2, 1, 0])
    assert select_pairs(rewards, seeds, 2) == [(3, 0), (3, 4), (1, 0), (1, 4)]
    assert select_pairs(rewards, seeds, 3) == [(w, lo) for w in (3, 1, 2) for lo in (5, 0, 4)]
    with pytest.raises(ValueError, match="2N <= M"):
        select_pairs(rewards, seeds, 4)
    with pytest.raises(ValueError, match="unique"):
        select_pairs(rewards, np.zeros(6, dtype=int), 1)
    with pytest.raises(ValueError, match="finite"):
        select_pairs(np.array([0.1, np.nan]), np.array([0, 1]), 1)


def test_build_pairs_errors():
    df = _rewards_df()
    with pytest.raises(ValueError, match="M=4"):
        build_pairs(df, n=3, ratio=None, hpo="both")
    with pytest.raises(ValueError, match="hpo"):
        build_pairs(df, n=1, ratio=None, hpo="sometimes")
    with pytest.raises(ValueError, match="lr_path"):
        build_pairs(df.drop(columns="lr_path"), n=1, ratio=None, hpo="both")
    with pytest.raises(ValueError, match="duplicate"):
        build_pairs(pd.concat([df, df.iloc[:1]]), n=1, ratio=None, hpo="both")
    with pytest.raises(ValueError, match="negative HPO weight"):
        # Rewards outside [0, 1]: gaps 10 and 0 -> μ_gap = 5 -> w_intra = 0 + 1 − 5 < 0.
        bad = pd.DataFrame(
            {
                "image_id": ["x"] * 4,
                "seed": [0, 1, 2, 3],
                "path": list("pqrs"),
                "reward": [10.0, 10.0, 0.0, 10.0],
            }
        ).assign(lr_path="lr.png")
        build_pairs(bad, n=2, ratio=None, hpo="intra")


def test_n_from_ratio():
    """N = max(1, floor(ratio·M + 0.5)): paper settings 32·1/4 = 8 and 64·1/16 = 4; 2·1/4 = 0.5 -> 1;
    10·1/4 = 2.5 -> 3 (half up, where Python's round would give 2); 3·1/16 = 0.1875 -> 0 -> 1."""
    assert n_from_ratio(32, backbone_class("sd2").pair_ratio) == 8
    assert n_from_ratio(64, backbone_class("flux").pair_ratio) == 4
    assert n_from_ratio(2, 0.25) == 1
    assert n_from_ratio(10, 0.25) == 3
    assert n_from_ratio(3, 1 / 16) == 1
    for bad in (0.0, 0.6, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            n_from_ratio(8, bad)


def test_intra_and_inter_weights_direct():
    """intra: group 'a' gaps (0.6, 0.2) μ = 0.4 -> (1.2, 0.8); group 'b' gap (−0.3) taken as 0.3 -> 1.
    inter: σ = (0.1, 0.2, 0.6), μ_σ = 0.3 -> (0.8, 0.9, 1.3), mean 1."""
    w = intra_weights(np.array([0.6, -0.3, 0.2]), np.array(["a", "b", "a"]))
    assert w.tolist() == pytest.approx([1.2, 1.0, 0.8])
    assert inter_weights(np.array([0.1, 0.2, 0.6])).tolist() == pytest.approx([0.8, 0.9, 1.3])


def test_pair_config_validation():
    with pytest.raises(ValueError, match="ratio"):
        PairConfig(rewards="r.parquet", ratio=0.75)
    with pytest.raises(ValueError, match="n must be"):
        PairConfig(rewards="r.parquet", n=0)
    with pytest.raises(ValueError, match="hpo"):
        PairConfig(rewards="r.parquet", hpo="all")
    assert PairConfig(rewards="r.parquet").ratio is None  # default: by the model family of the pool


def test_default_ratio_follows_the_pool_model(tmp_path):
    """No --n/--ratio: the pair ratio the rewards table records for the model that sampled the pool (1/4 for
    SD2, 1/16 for FLUX: the paper's), 1/4 when it records none. 16 candidates per image: N = 4 vs N = 1."""
    big = pd.DataFrame(
        {
            "image_id": ["a"] * 16,
            "seed": range(16),
            "path": [f"/p/a/seed_{s:04d}.png" for s in range(16)],
            "reward": np.linspace(0, 1, 16),
            "lr_path": "/data/lr/a.png",
        }
    )
    for meta, n in (
        (None, 4),
        ({"pair_ratio": backbone_class("flux").pair_ratio}, 1),
        ({"pair_ratio": 0.25}, 4),
    ):
        rewards = tables.write(tables.REWARDS, big, tmp_path / "rewards.parquet", meta)
        assert main(["pair", "--rewards", str(rewards)]) == 0
        assert len(pd.read_parquet(tmp_path / "pref_pairs.parquet")) == n * n


def test_pair_reads_everything_from_the_rewards_table(tmp_path, capsys):
    """The rewards table alone is enough: LR paths and prompts come from it; no file beside it is read. Default
    ratio 0.25 of M = 4 -> N = 1, so 2 pairs; output pref_pairs.parquet beside the rewards, config beside it.
    Without an lr_path column (an older score) the error names the table."""
    df = _rewards_df().assign(path=lambda d: [str(tmp_path / p) for p in d.path])  # as `tables.read` gives
    tables.write(tables.REWARDS, df.assign(prompt=["cat"] * 4 + [""] * 4), tmp_path / "rewards.parquet")
    assert main(["pair", "--rewards", str(tmp_path)]) == 0  # the folder holding rewards.parquet works too
    out = pd.read_parquet(tmp_path / "pref_pairs.parquet")
    assert list(out.columns) == [*PAIR_COLUMNS, "prompt"]
    assert out.prompt.tolist() == ["cat", ""]
    assert len(out) == 2
    assert out.lr_path.tolist() == [os.path.relpath(f"/data/lr/{x}.png", tmp_path) for x in "ab"]
    assert out.win_path.tolist() == ["a/seed_0000.png", "b/seed_0010.png"]
    assert str(out.win_seed.dtype) == "int64" and str(out.weight.dtype) == "float64"
    saved = yaml.safe_load((tmp_path / "pref_pairs.config.yaml").read_text())
    assert saved["ratio"] is None and saved["hpo"] == "both"
    assert "2 pairs" in capsys.readouterr().out

    tables.write(tables.REWARDS, df, tmp_path / "r2.parquet")  # no prompt: no prompt column
    assert (
        main(["pair", "--rewards", str(tmp_path / "r2.parquet"), "--output", str(tmp_path / "p2.parquet")])
        == 0
    )
    assert list(pd.read_parquet(tmp_path / "p2.parquet").columns) == PAIR_COLUMNS
    _rewards_df().drop(columns="lr_path").to_parquet(tmp_path / "old.parquet", index=False)
    assert (
        main(["pair", "--rewards", str(tmp_path / "old.parquet"), "--output", str(tmp_path / "p3.parquet")])
        == 2
    )
    assert "old.parquet has no lr_path" in capsys.readouterr().err


def test_cli_output_elsewhere_rebases_paths(tmp_path):
    """Table paths are relative to the table's folder: writing to another folder rebases them."""
    (tmp_path / "cands").mkdir()
    df = _rewards_df().assign(lr_path=lambda d: "lr/" + d.image_id + ".png")
    df.to_parquet(tmp_path / "cands" / "rewards.parquet", index=False)
    output = tmp_path / "train" / "pp.parquet"
    args = ["pair", "--rewards", str(tmp_path / "cands" / "rewards.parquet"), "--output", str(output)]
    assert main([*args, "--n", "2", "--hpo", "none"]) == 0
    out = pd.read_parquet(output)
    assert out.win_path.iloc[0] == "../cands/a/seed_0000.png"
    assert out.lr_path.iloc[0] == "../cands/lr/a.png"
    assert np.allclose(out.weight, 1.0)
    assert (tmp_path / "train" / "pp.config.yaml").is_file()


def test_cli_user_errors(tmp_path, capsys):
    assert main(["pair", "--rewards", str(tmp_path / "missing.parquet")]) == 2
    assert "not found" in capsys.readouterr().err
    _rewards_df().to_parquet(tmp_path / "rewards.parquet", index=False)
    assert main(["pair", "--rewards", str(tmp_path / "rewards.parquet"), "--ratio", "0.9"]) == 2
    assert "ratio" in capsys.readouterr().err
