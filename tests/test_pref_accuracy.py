"""Held-out preference accuracy (`engine.pref_accuracy`): exact ties at policy = reference, a nudged policy
prefers the winners, the grouped bootstrap interval covers a known rate, and `train --heldout-pairs`."""

import contextlib
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dp2osr.backbones import load_backbone
from dp2osr.cli import main
from dp2osr.engine import pref_accuracy as pa
from dp2osr.engine.objectives import denoise_errors
from dp2osr.math.bootstrap import grouped_share_interval


def _png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """Three crops (16 -> 64 px LR), four candidates each, 2 x 2 hand-built pairs per crop: winners near the
    enlarged LR, losers noise."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i, name in enumerate(["a", "b", "c"]):
        _png(root / "lr" / f"{name}.png", 16, 16, i)
        lr = np.asarray(Image.open(root / "lr" / f"{name}.png"), dtype=np.float64)
        for s in range(4):  # winners (seeds 0, 1): the LR enlarged with a little noise; losers: noise
            path = root / "pool" / name / f"seed_{s:04d}.png"
            _png(path, 64, 64, 100 + 10 * i + s)
            if s < 2:
                noise = np.asarray(Image.open(path), dtype=np.float64) - 127.5
                img = np.clip(lr.repeat(4, 0).repeat(4, 1) + 0.1 * noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(path)
        for w, lo in ((0, 2), (0, 3), (1, 2), (1, 3)):
            lr = str(root / "lr" / f"{name}.png")
            rows.append((name, w, lo, f"{name}/seed_{w:04d}.png", f"{name}/seed_{lo:04d}.png", lr, 0.9, 0.1))
    cols = [
        "image_id",
        "win_seed",
        "lose_seed",
        "win_path",
        "lose_path",
        "lr_path",
        "win_reward",
        "lose_reward",
    ]
    df = pd.DataFrame(rows, columns=cols).assign(w_intra=1.0, w_inter=1.0, weight=1.0)
    df.to_parquet(root / "pool" / "pref_pairs.parquet")
    return root


@pytest.fixture(scope="module")
def bb():
    return load_backbone("sd2-tiny")


def _ref(net):
    return lambda: contextlib.nullcontext(net)


def test_policy_equal_to_reference_gives_exact_ties(bb, pairs_dir):
    pairs = pa.read_pairs(pairs_dir / "pool")
    ev = pa.PrefAccuracy(bb, pairs, upscale=4, draws=2, seed=1)
    same = ev.evaluate(bb.controlnet, _ref(bb.controlnet))
    assert same == {"accuracy": 0.0, "lo": 0.0, "hi": 0.0, "ties": 1.0, "pairs": 12, "crops": 3, "draws": 2}
    copied = ev.evaluate(copy.deepcopy(bb.controlnet), _ref(bb.controlnet))  # equal weights, another module
    assert copied["accuracy"] == 0.0 and copied["ties"] == 1.0
    errs = ev.errors(bb.controlnet)
    assert errs.shape == (12, 2, 2) and (errs > 0).all()
    assert torch.equal(errs, ev.errors(bb.controlnet))  # fixed draws: the same numbers every time
    assert not torch.equal(errs[:, :, 0], errs[:, :, 1])  # K different draws


def _nudged(bb, ev, sign: float) -> torch.nn.Module:
    """The reference after one optimizer step along ``sign`` x the gradient of the winners' error minus the
    losers' on the evaluation's draws (sign 1: towards the winners)."""
    policy = copy.deepcopy(bb.controlnet).train()
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-4)
    opt.zero_grad()
    for nb in ev._passes():
        err = denoise_errors(bb, policy, nb).reshape(-1, 2, ev.draws)
        (sign * (err[:, 0] - err[:, 1]).mean()).backward()
    opt.step()
    return policy.eval()


def test_policy_nudged_towards_the_winners_scores_above_half(bb, pairs_dir):
    ev = pa.PrefAccuracy(bb, pa.read_pairs(pairs_dir / "pool"), upscale=4, draws=2, seed=0)
    up = ev.evaluate(_nudged(bb, ev, 1.0), _ref(bb.controlnet))
    assert up["accuracy"] > 0.5 and up["ties"] == 0.0
    assert up["lo"] <= up["accuracy"] <= up["hi"]
    down = ev.evaluate(_nudged(bb, ev, -1.0), _ref(bb.controlnet))  # towards the losers
    assert down["accuracy"] < 0.5


def test_grouped_bootstrap_interval_covers_a_known_rate():
    """Outcomes fully correlated within a group (one Bernoulli(0.7) draw per group, 4 items each): the
    interval over groups covers 0.7 about 95% of the time, where one treating items as independent would not."""
    rng, truth, covered = np.random.default_rng(0), 0.7, 0
    trials, groups = 200, np.repeat(np.arange(40), 4)
    for t in range(trials):
        success = np.repeat(rng.random(40) < truth, 4)
        share, lo, hi = grouped_share_interval(success, groups, seed=t, resamples=1000)
        assert lo <= share <= hi
        covered += lo <= truth <= hi
    assert 0.88 <= covered / trials <= 0.99
    # Seeded: the same inputs give the same interval; one group: nothing to resample
    x = np.array([1, 0, 1, 1, 0, 1.0])
    g = np.array([0, 0, 1, 1, 2, 2])
    assert grouped_share_interval(x, g, seed=3) == grouped_share_interval(x, g, seed=3)
    assert grouped_share_interval(x, np.zeros(6), seed=3) == (4 / 6, 4 / 6, 4 / 6)
    with pytest.raises(ValueError, match="no items"):
        grouped_share_interval(np.array([]), np.array([]))


def test_read_pairs_keeps_whole_crops(pairs_dir):
    sub = pa.read_pairs(pairs_dir / "pool", max_pairs=5, seed=0)
    assert len(sub) == 8 and len(np.unique(sub.groups)) == 2  # two whole crops of 4 pairs reach 5
    assert len(sub.examples) == 8 and sub.examples.weights.shape == (8,)
    assert len(pa.read_pairs(pairs_dir / "pool", max_pairs=100)) == 12


def _train(pairs_dir, out, *extra):
    args = ["train", "--mode", "dpo", "--data", str(pairs_dir / "pool"), "--output", str(out)]
    args += ["--backbone", "sd2-tiny", "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--beta", "500"]
    return main([*args, "--checkpoint-every", "2", "--report-to", "none", *extra])


def test_train_heldout_pairs_logs_accuracy_and_leaves_training_unchanged(pairs_dir, tmp_path):
    plain, held = tmp_path / "plain", tmp_path / "held"
    assert _train(pairs_dir, plain) == 0
    assert _train(pairs_dir, held, "--heldout-pairs", str(pairs_dir / "pool"), "--pref-draws", "2") == 0
    for name in ("checkpoint-000002", "final"):  # the evaluation draws nothing training uses
        a = (plain / name / "model.safetensors").read_bytes()
        assert a == (held / name / "model.safetensors").read_bytes()
    rows = [json.loads(line) for line in (held / "metrics.jsonl").read_text().splitlines()]
    acc = [r for r in rows if "pref_heldout" in r]
    assert [r["step"] for r in acc] == [0, 2, 4]
    assert acc[0]["pref_heldout"] == 0.0 and acc[0]["pref_heldout_ties"] == 1.0
    assert acc[-1]["pref_heldout_ties"] == 0.0
    assert acc[-1]["pref_heldout_lo"] <= acc[-1]["pref_heldout"] <= acc[-1]["pref_heldout_hi"]
    table = pd.read_csv(held / pa.ACCURACY_CSV)
    assert sorted(table.set.unique()) == ["heldout", "train"] and list(table.step.unique()) == [0, 2, 4]
    assert (held / pa.ACCURACY_PNG).stat().st_size > 1000
    page = tmp_path / "r.html"
    assert main(["report", "--output", str(page), "--pref-accuracy", str(held / pa.ACCURACY_CSV)]) == 0
    assert "Preference accuracy" in page.read_text()


def test_heldout_pairs_need_dpo(pairs_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = [
        "train",
        "--mode",
        "sft",
        "--data",
        str(pairs_dir),
        "--output",
        str(out),
        "--backbone",
        "sd2-tiny",
    ]
    assert main([*args, "--heldout-pairs", str(pairs_dir / "pool")]) == 2
    assert "--heldout-pairs" in capsys.readouterr().err
