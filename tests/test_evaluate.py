"""eval: the Real-ISR PSNR/SSIM protocol (reproduces OSEDiff on RealSR), pair checks, pools and curves."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dp2osr import cli, tables
from dp2osr.errors import PartialFailure
from dp2osr.eval_folders import match_pairs
from dp2osr.evaluate import EvalConfig
from dp2osr.evaluate import run as evaluate
from dp2osr.math.quality import psnr_y, ssim_y

ROOT = Path(__file__).resolve().parents[1]
# The RealSR test pairs with OSEDiff's published outputs: the folder DP2OSR_REALSR names (holding
# results_osediff/ and test_HR/; README: "Evaluation protocol"), else the data folder beside the repository.
REALSR = Path(os.environ.get("DP2OSR_REALSR") or ROOT.parent / "shared" / "data" / "realsr")
REALSR_SKIP = (
    f"RealSR data not found at {REALSR}: set DP2OSR_REALSR to a folder holding test_HR/ (the RealSR x4 test "
    "set) and results_osediff/ (OSEDiff's published RealSR outputs), see the README's evaluation protocol"
)


def _smooth_image(rng, h, w):
    """A natural-ish test image: upsampled noise, uint8 HxWx3."""
    small = rng.random((max(2, h // 8), max(2, w // 8), 3))
    im = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(im)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.mark.skipif(
    not (REALSR / "results_osediff").is_dir() or not (REALSR / "test_HR").is_dir(), reason=REALSR_SKIP
)
def test_reproduces_osediff_published_realsr_psnr_ssim(tmp_path):
    """OSEDiff (Wu et al. 2024, Table 1, RealSR): PSNR 25.15 dB, SSIM 0.7341 — Y of YCbCr, no crop."""
    cfg = EvalConfig(
        output=tmp_path,
        sr=[REALSR / "results_osediff"],
        names=["OSEDiff"],
        hr=REALSR / "test_HR",
        metrics=["none"],
    )
    evaluate(cfg)
    summary = json.loads((tmp_path / "eval_summary.json").read_text())
    stats = summary["models"]["OSEDiff"]["metrics"]
    assert summary["models"]["OSEDiff"]["n_images"] == 100 and summary["problems"] == []
    assert round(stats["psnr"]["mean"], 2) == 25.15  # published to 2 decimals
    assert round(stats["ssim"]["mean"], 4) == 0.7341  # published to 4 decimals
    assert stats["psnr"]["mean"] == pytest.approx(25.1511, abs=5e-5)  # this protocol, 4 decimals
    assert stats["ssim"]["mean"] == pytest.approx(0.7341, abs=5e-5)
    proto = summary["protocol"]
    assert proto["crop_border"] == 0 and "65.481" in proto["y_channel"] and proto["pyiqa"] and proto["torch"]
    table = pd.read_csv(tmp_path / "eval_per_image.csv")
    assert len(table) == 100 and {"psnr", "ssim"} <= set(table.columns)
    assert "25.1511 ± " in (tmp_path / "eval_summary.md").read_text()


def test_numpy_psnr_ssim_equal_pyiqa_ycbcr():
    """The fast NumPy PSNR/SSIM are pyiqa's psnr/ssim with test_y_channel=True, color_space='ycbcr'."""
    pyiqa = pytest.importorskip("pyiqa")
    rng = np.random.default_rng(0)
    hr = _smooth_image(rng, 72, 96)
    sr = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)

    def t(a):
        return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255

    ref_psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    ref_ssim = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    a, b = sr / 255.0, hr / 255.0
    assert psnr_y(a, b) == pytest.approx(float(ref_psnr(t(sr), t(hr))), abs=1e-4)
    assert ssim_y(a, b) == pytest.approx(float(ref_ssim(t(sr), t(hr))), abs=1e-6)
    assert ssim_y(b, b) == pytest.approx(1.0)


def test_mismatched_folders_are_reported_by_name(tmp_path, capsys):
    rng = np.random.default_rng(1)
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    for name in ("ok", "small"):
        _save(hr / f"{name}.png", _smooth_image(rng, 32, 32))
    _save(hr / "only_hr.png", _smooth_image(rng, 32, 32))
    _save(sr / "ok.png", _smooth_image(rng, 32, 32))
    _save(sr / "small.png", _smooth_image(rng, 24, 32))  # wrong size
    _save(sr / "only_sr.png", _smooth_image(rng, 32, 32))  # no HR
    out = tmp_path / "out"
    with pytest.raises(PartialFailure):
        evaluate(EvalConfig(output=out, sr=[sr], hr=hr, metrics=["none"]))
    problems = json.loads((out / "eval_summary.json").read_text())["problems"]
    text = "\n".join(problems)
    assert "only_sr.png" in text and "missing HR" in text
    assert "only_hr.png" in text and "missing SR" in text
    assert "size mismatch" in text and "small.png" in text and "32x24" in text
    assert len(problems) == 3
    assert "only_sr.png" in capsys.readouterr().err
    table = pd.read_csv(out / "eval_per_image.csv")
    assert table["image"].tolist() == ["ok.png"]  # the good pair is still evaluated
    assert "3 problem(s)" in (out / "eval_summary.md").read_text()


def test_name_pattern_maps_sr_to_hr(tmp_path):
    rng = np.random.default_rng(2)
    img = _smooth_image(rng, 16, 16)
    _save(tmp_path / "hr" / "Canon_001.png", img)
    _save(tmp_path / "sr" / "Canon_001_x4_out.png", img)
    pairs, problems = match_pairs(tmp_path / "sr", tmp_path / "hr")
    assert not pairs and len(problems) == 2
    pairs, problems = match_pairs(tmp_path / "sr", tmp_path / "hr", r"_x4_out$", "")
    assert problems == [] and pairs[0][0] == "Canon_001_x4_out.png"
    with pytest.raises(ValueError, match="not a valid regex"):
        match_pairs(tmp_path / "sr", tmp_path / "hr", "(", "")


def test_pyiqa_metrics_and_nr_only(tmp_path):
    """NR-only (no HR): NR metrics run, FR ones are skipped *with a reason*; unknown names are errors."""
    pytest.importorskip("pyiqa")
    rng = np.random.default_rng(3)
    for i in range(2):
        _save(tmp_path / "sr" / f"im{i}.png", _smooth_image(rng, 32, 32))
    out = tmp_path / "out"
    evaluate(EvalConfig(output=out, sr=[tmp_path / "sr"], metrics=["entropy", "gmsd"], device="cpu"))
    summary = json.loads((out / "eval_summary.json").read_text())
    assert set(summary["metrics"]) == {"entropy"}
    assert "gmsd" in summary["skipped_metrics"] and "psnr" in summary["skipped_metrics"]
    assert summary["models"]["sr"]["metrics"]["entropy"]["n"] == 2
    with pytest.raises(ValueError, match="no_such_metric"):
        evaluate(EvalConfig(output=out, sr=[tmp_path / "sr"], metrics=["no_such_metric"]))


def _pool(folder, rewards, seeds=(0, 1, 2, 3)):
    rows = [
        {"image_id": f"im{i}", "seed": s, "path": f"im{i}/seed_{s:04d}.png", "reward": float(r[j])}
        for i, r in enumerate(rewards)
        for j, s in enumerate(seeds)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "rewards.parquet", index=False)
    return folder / "rewards.parquet"


def test_pools_and_reward_curve(tmp_path):
    base = _pool(tmp_path / "base", [[0.2, 0.8, 0.5, 0.1], [0.6, 0.4, 0.9, 0.3]])
    _pool(tmp_path / "dpo", [[0.7, 0.8, 0.6, 0.75], [0.7, 0.65, 0.9, 0.8]])
    curve = tmp_path / "curve.csv"
    pd.DataFrame(
        {"step": [0, 10, 20, 30], "reward": [0.5, 0.55, 0.6, 0.62], "lpips": [0.3, 0.28, 0.27, 0.27]}
    ).to_csv(curve, index=False)
    out = tmp_path / "out"
    cfg = EvalConfig(
        output=out, pools=[base, tmp_path / "dpo"], pool_names=["SD2", "DP²O"], reward_curve=curve
    )
    with pytest.raises(ValueError, match="cannot put the pools on one scale.*scores.parquet"):
        evaluate(cfg)  # no raw scores beside the rewards: refused
    cfg.allow_separate_scales = True
    evaluate(cfg)
    assert "normalised separately: NOT comparable" in (out / "bestm.md").read_text()
    table = pd.read_csv(out / "bestm.csv")
    sd2 = table[table.model == "SD2"].set_index("m")
    np.testing.assert_allclose(sd2.loc[[1, 2, 4], "best"], [0.4, 0.7, 0.85])
    np.testing.assert_allclose(sd2.loc[[1, 2, 4], "worst"], [0.4, 0.3, 0.2])
    assert table[table.model == "DP²O"].set_index("m").loc[4, "worst"] == pytest.approx((0.6 + 0.65) / 2)
    spread = pd.read_csv(out / "pool_spread.csv")
    assert len(spread) == 4 and {"std", "best_seed", "worst_seed"} <= set(spread.columns)
    for png in ("bestm.png", "reward_curve.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 200
    assert "| DP²O | 4 |" in (out / "bestm.md").read_text()
    uneven = _pool(tmp_path / "bad", [[0.1, 0.2, 0.3, 0.4]])
    df = pd.read_parquet(uneven)
    pd.concat([df.iloc[:3], df.assign(image_id="im9")]).to_parquet(uneven)  # 3 seeds vs 4 seeds
    with pytest.raises(ValueError, match="pool 'bad'.*different seed sets"):
        evaluate(EvalConfig(output=out, pools=[uneven]))


def test_cli_eval(tmp_path):
    rng = np.random.default_rng(4)
    img = _smooth_image(rng, 24, 24)
    _save(tmp_path / "hr" / "a.png", img)
    _save(tmp_path / "sr" / "a.png", img)
    out = tmp_path / "out"
    argv = ["eval", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr"), "--output", str(out)]
    assert cli.main([*argv, "--metrics", "none", "--crop-border", "2"]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["protocol"]["crop_border"] == 2
    assert summary["models"]["sr"]["metrics"]["ssim"]["mean"] == pytest.approx(1.0)
    assert json.loads((out / "eval_config.json").read_text())["sr"] == [str(tmp_path / "sr")]
    assert cli.main(["eval", "--output", str(out)]) == 2  # nothing to evaluate: a one-line error


def _seed_layout(root: Path, names, seeds, rng) -> None:
    """A `dp2osr upscale` / `sample` style folder: NAME/seed_XXXX.png (plus files eval must ignore)."""
    for name in names:
        for s in seeds:
            _save(root / name / f"seed_{s:04d}.png", _smooth_image(rng, 32, 32))
        (root / name / "prompt.txt").write_text("a photo\n")
    (root / "upscale_config.yaml").write_text("seed: 0\n")


def test_eval_reads_upscale_seed_folders_per_seed_or_one_seed(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        _save(tmp_path / "hr" / f"{name}.png", _smooth_image(rng, 32, 32))
    _seed_layout(tmp_path / "up", ["a", "b"], [0, 1], rng)
    _seed_layout(tmp_path / "one", ["a", "b"], [7], rng)
    out = tmp_path / "eval"
    rc = cli.main(
        [
            "eval",
            "--sr",
            str(tmp_path / "up"),
            str(tmp_path / "one"),
            "--names",
            "base",
            "dpo",
            "--hr",
            str(tmp_path / "hr"),
            "--metrics",
            "none",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert list(summary["models"]) == ["base seed 0", "base seed 1", "dpo"]
    assert all(m["n_images"] == 2 for m in summary["models"].values()) and summary["problems"] == []
    table = pd.read_csv(out / "eval_per_image.csv")
    row = table[(table.model == "base seed 1") & (table.image == "b/seed_0001.png")].iloc[0]
    sr = np.asarray(Image.open(tmp_path / "up" / "b" / "seed_0001.png")).astype(np.float64) / 255
    hr = np.asarray(Image.open(tmp_path / "hr" / "b.png")).astype(np.float64) / 255
    assert row.psnr == pytest.approx(psnr_y(sr, hr), abs=1e-5)  # matched to HR b.png by its folder name
    rc = cli.main(
        [
            "eval",
            "--sr",
            str(tmp_path / "up"),
            "--sr-seed",
            "1",
            "--hr",
            str(tmp_path / "hr"),
            "--metrics",
            "none",
            "--output",
            str(tmp_path / "eval1"),
        ]
    )
    assert rc == 0
    one = json.loads((tmp_path / "eval1" / "eval_summary.json").read_text())["models"]
    assert list(one) == ["up"] and one["up"]["metrics"]["psnr"]["mean"] == pytest.approx(
        summary["models"]["base seed 1"]["metrics"]["psnr"]["mean"]
    )


def test_eval_seed_folder_errors_name_the_folder(tmp_path, capsys):
    rng = np.random.default_rng(4)
    _seed_layout(tmp_path / "up", ["a"], [0], rng)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    rc = cli.main(["eval", "--sr", str(tmp_path / "up"), "--sr-seed", "5", "--output", str(tmp_path / "e")])
    assert rc == 2 and "--sr-seed 5" in capsys.readouterr().err
    rc = cli.main(["eval", "--sr", str(tmp_path / "empty"), "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "empty" in err and "seed_XXXX.png" in err


def _scored_pool(folder, raw, w=None):
    """A pool of image 'a' with raw psnr (FR, higher better) and piqe (NR, lower better) per seed, its stale
    rewards.parquet (as if normalised on its own) and, with ``w``, the reward weights it was scored with (in
    the table's metadata, as `dp2osr score` records them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [("a", s, m, float(v)) for s, vals in enumerate(raw) for m, v in zip(("psnr", "piqe"), vals)]
    pd.DataFrame(rows, columns=["image_id", "seed", "metric", "value"]).to_parquet(folder / "scores.parquet")
    stale = [
        {"image_id": "a", "seed": s, "path": f"a/seed_{s:04d}.png", "reward": 0.5} for s in range(len(raw))
    ]
    meta = None if w is None else {"w_fr": w[0], "w_nr": w[1], "scope": "pool"}
    tables.write(
        tables.REWARDS,
        pd.DataFrame(stale).assign(path=lambda d: [str(folder / p) for p in d.path]),
        folder / "rewards.parquet",
        meta,
    )
    return folder


def test_pools_are_normalised_jointly_from_raw_scores(tmp_path):
    """Two pools with different raw ranges: each pool alone normalises to rewards 0.5, 0.5; jointly (bounds of
    the union) the rewards are, by hand: psnr n = (v - 20) / 20, piqe n = (60 - v) / 40, R = (n_psnr + n_piqe) / 2.
    A: psnr 20, 30 / piqe 40, 60 -> (0 + .5) / 2, (.5 + 0) / 2 = .25, .25; B: psnr 25, 40 / piqe 20, 30 ->
    (.25 + 1) / 2, (1 + .75) / 2 = .625, .875."""
    a = _scored_pool(tmp_path / "A", [(20, 40), (30, 60)])
    b = _scored_pool(tmp_path / "B", [(25, 20), (40, 30)])
    out = tmp_path / "out"
    evaluate(EvalConfig(output=out, pools=[a, b], ms=[2]))
    table = pd.read_csv(out / "bestm.csv").set_index("model")
    assert table.loc["A", "mean"] == pytest.approx(0.25) and table.loc["B", "mean"] == pytest.approx(0.75)
    assert table.loc["B", "best"] == pytest.approx(0.875) and table.loc["B", "worst"] == pytest.approx(0.625)
    assert table.loc["A", "scale"] == "hybrid reward, min-max normalised jointly over pools A, B"
    assert (
        "Scale: hybrid reward, min-max normalised jointly over pools A, B." in (out / "bestm.md").read_text()
    )
    # the weights the pools were scored with are kept: 0.8 FR + 0.2 NR -> A: .1, .4; B: .4, .95
    for folder in (a, b):
        _scored_pool(folder, [(20, 40), (30, 60)] if folder == a else [(25, 20), (40, 30)], (0.8, 0.2))
    evaluate(EvalConfig(output=out, pools=[a, b], ms=[2]))
    table = pd.read_csv(out / "bestm.csv").set_index("model")
    assert table.loc["A", "mean"] == pytest.approx(0.25) and table.loc["B", "mean"] == pytest.approx(0.675)
    _scored_pool(b, [(25, 20), (40, 30)], (0.5, 0.5))
    with pytest.raises(ValueError, match="different reward weights"):
        evaluate(EvalConfig(output=out, pools=[a, b]))


@pytest.mark.parametrize("missing", ["pools", "reward-curve", "sr", "hr", "sr-seed"])
def test_a_missing_input_is_refused_before_anything_is_written(tmp_path, capsys, missing):
    rng = np.random.default_rng(4)
    _seed_layout(tmp_path / "up", ["a"], [0], rng)
    args = {
        "pools": ["--pools", str(tmp_path / "nowhere")],
        "reward-curve": ["--reward-curve", str(tmp_path / "nowhere.csv")],
        "sr": ["--sr", str(tmp_path / "nowhere")],
        "hr": ["--sr", str(tmp_path / "up"), "--hr", str(tmp_path / "nowhere")],
        "sr-seed": ["--sr", str(tmp_path / "up"), "--sr-seed", "5"],
    }[missing]
    rc = cli.main(["eval", *args, "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and ("nowhere" in err or "--sr-seed 5" in err) and "Traceback" not in err
    assert not (tmp_path / "e").exists()  # no eval_config.json, no folder
