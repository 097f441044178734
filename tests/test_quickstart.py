"""`dp2osr quickstart` in miniature: the whole loop end to end, and the honesty rules it promises."""

import dataclasses
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dp2osr import score as score_stage
from dp2osr.before_after import accuracy_sentence, guard_note, guards
from dp2osr.cli import build_parser, main
from dp2osr.config import build_config
from dp2osr.images import checkerboard_tiles as tiles
from dp2osr.math.change import NOISE_METHOD, change_sentence
from dp2osr.quickstart import PHOTOS, Layout, QuickstartConfig, curve_config, resolved
from dp2osr.runtime import RunClock
from dp2osr.score import ScoreConfig

TINY = [
    "--hr-size",
    "64",
    "--images",
    "2",
    "--heldout",
    "2",
    "--sample.samples",
    "4",
    "--train.steps",
    "2",
    "--train.checkpoint-every",
    "1",
    "--train.batch-size",
    "2",
    "--sample.batch-size",
    "4",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One miniature quickstart on the tiny SD2 backbone (random weights): 2+2 crops, M=4, 2 DPO steps.

    Run as `python -m dp2osr` in a fresh process: torch is already loaded here (conftest), so this process's
    OpenMP keeps its active wait policy, which on shared cores made the same run 10x slower.
    """
    out = tmp_path_factory.mktemp("qs") / "run"
    cmd = [
        sys.executable,
        "-m",
        "dp2osr",
        "quickstart",
        "--backbone",
        "sd2-tiny",
        "--output",
        str(out),
        *TINY,
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.returncode, res.stdout


def test_report_has_bestm_table_and_reward_curve(run):
    out, rc, stdout = run
    assert rc == 0
    report = out / "report.html"
    assert report.is_file()
    assert stdout.strip().splitlines()[-1] == str(report.resolve())  # ends by printing the report's path
    page = report.read_text()
    for text in (
        "Best / Mean / Worst@M",
        "<th>Best@M</th>",
        "<th>Mean@M</th>",
        "<th>Worst@M</th>",
        "Reward curve",
        "What DP²O did on held-out crops",
        "PSNR-Y",
        "SSIM-Y",
    ):
        assert text in page, text
    assert "base ControlNet" in page and "DP²O ControlNet" in page


def test_guard_metrics_and_verdict_beside_the_reward(run):
    """The before/after table labels each row as the reward or a guard; the guard (BRISQUE at 64 px: not in
    the reward) scored the first and last pools into guard/ without touching the reward's scores; one sentence
    says whether the change is beyond the noise, with its standard error."""
    out, _, stdout = run
    summary = json.loads((out / "6_eval" / "summary.json").read_text())
    for key in ("base", "dp2o"):
        assert {"psnr", "ssim", "guard_brisque", "raw_piqe"} <= set(summary[key])
    for step in (0, 2):
        guard = pd.read_parquet(out / "6_eval" / f"step_{step:06d}" / "guard" / "scores.parquet")
        assert set(guard.metric) == {"brisque"}
        reward = pd.read_parquet(out / "6_eval" / f"step_{step:06d}" / "scores.parquet")
        assert set(reward.metric) == {"fsim", "gmsd", "piqe"}
    assert not (out / "6_eval" / "step_000001" / "guard").exists()
    guard_mean = pd.read_parquet(out / "6_eval" / "step_000002" / "guard" / "scores.parquet").value.mean()
    assert summary["dp2o"]["guard_brisque"] == pytest.approx(guard_mean)
    change = summary["change"]
    assert change["m"] == 4 and change["df"] == 1  # 2 held-out crops
    assert change["sentence"] == change_sentence(change, "base ControlNet", "DP²O ControlNet")
    assert change["delta"] == pytest.approx(summary["delta"]["mean"])
    page = (out / "report.html").read_text()
    for text in (stdout, (out / "6_eval" / "summary.md").read_text()):
        assert "| brisque (raw value) ↓ | guard (not in the reward) |" in text
        assert (
            "| piqe (raw value) ↓ | in the reward |" in text
            and "| PSNR-Y (dB) ↑ | guard (not in the reward) |" in text
        )
        assert change["sentence"] in text
    assert "<td>brisque (raw value) ↓</td><td>guard (not in the reward)</td>" in page
    assert (
        f'<p class="verdict" title="{html.escape(NOISE_METHOD)}">{html.escape(change["sentence"])}</p>'
        in page
    )
    assert "normalised jointly over pools base ControlNet, DP²O ControlNet" in page


def test_heldout_preference_accuracy_in_the_verdict(run):
    """Pairs from the base model's held-out pool, curated as the training pairs (N = 1 of M = 4 per crop); every
    checkpoint's accuracy against the base on them and on the training pairs; step 0 (policy = reference) is
    all ties; the final step's accuracy with its interval is in the summary and the report."""
    out, _, stdout = run
    pairs = pd.read_parquet(out / "6_eval" / "heldout_pref_pairs.parquet")
    assert len(pairs) == 2 and set(pairs.image_id) == set(
        pd.read_parquet(out / "6_eval" / "joint" / "base" / "rewards.parquet").image_id
    )
    assert (pairs.win_reward > pairs.lose_reward).all()
    table = pd.read_csv(out / "6_eval" / "pref_accuracy.csv")
    assert sorted(set(table.step)) == [0, 1, 2] and set(table.set) == {"heldout", "train"}
    first = table[table.step == 0]
    assert (first.accuracy == 0).all() and (first.ties == 1).all()
    summary = json.loads((out / "6_eval" / "summary.json").read_text())
    acc = summary["pref_accuracy"]
    last = table[(table.step == 2) & (table.set == "heldout")].iloc[0]
    assert acc["heldout"]["accuracy"] == pytest.approx(last.accuracy) and acc["heldout"]["crops"] == 2
    assert acc["heldout"]["lo"] <= acc["heldout"]["accuracy"] <= acc["heldout"]["hi"]
    line = accuracy_sentence(summary)
    assert "held-out preference accuracy" in line
    for text in (stdout, (out / "6_eval" / "summary.md").read_text()):
        assert line in text
    page = (out / "report.html").read_text()
    assert html.escape(line) in page and "<h2>Preference accuracy</h2>" in page


def test_guard_defaults_follow_the_crop_size_and_the_reward():
    offline = ["fsim", "gmsd", "piqe"]
    assert guards(None, offline, 64) == ["brisque"]  # 64 px crops: NIQE needs 96 px
    assert guards(None, offline, 128) == ["niqe"]
    assert guards(None, ["fsim", "brisque"], 64) == ["piqe"]
    assert guards(["niqe", "brisque"], offline, 128) == ["niqe", "brisque"]
    with pytest.raises(ValueError, match="guard-metrics.*in the reward"):
        QuickstartConfig(guard_metrics=["piqe"])
    with pytest.raises(ValueError, match="give --guard-metrics"):
        QuickstartConfig(score=ScoreConfig(candidates=".", metrics=["fsim", "brisque", "piqe"]))


def test_reward_curve_csv_has_every_evaluated_step(run):
    out = run[0]
    curve = pd.read_csv(out / "6_eval" / "reward_curve.csv")
    assert list(curve.columns[:2]) == ["step", "reward"]
    assert curve["step"].tolist() == [0, 1, 2]
    assert curve.notna().all().all()
    for step in (0, 1, 2):  # each evaluated step has its own scored held-out pool
        assert (out / "6_eval" / f"step_{step:06d}" / "scores.parquet").is_file()
    assert (out / "6_eval" / "reward_curve.png").is_file() and (out / "6_eval" / "bestm.csv").is_file()


def test_heldout_crops_never_in_pairs_and_pools_paired_by_seed(run):
    out = run[0]
    pairs = pd.read_parquet(out / "4_pair" / "pref_pairs.parquet")
    held = set(pd.read_parquet(out / "1_degrade" / "heldout" / "pairs.parquet").image_id)
    train = set(pd.read_parquet(out / "1_degrade" / "train" / "pairs.parquet").image_id)
    assert len(held) == 2 and len(train) == 2 and not held & train
    assert set(pairs.image_id) <= train
    base = pd.read_parquet(out / "6_eval" / "joint" / "base" / "rewards.parquet")
    dpo = pd.read_parquet(out / "6_eval" / "joint" / "dp2o" / "rewards.parquet")
    key = ["image_id", "seed"]
    assert set(base.image_id) == held
    assert base[key].sort_values(key).values.tolist() == dpo[key].sort_values(key).values.tolist()
    # joint normalisation: both pools together span [0, 1] for every metric
    both = pd.concat([base, dpo])
    for col in [c for c in both.columns if c.startswith("norm_")]:
        assert both[col].min() == pytest.approx(0.0) and both[col].max() == pytest.approx(1.0)
    summary = json.loads((out / "6_eval" / "summary.json").read_text())
    assert summary["final_step"] == 2 and summary["images"] == 2
    assert summary["base"]["mean"] == pytest.approx(base.groupby("image_id").reward.mean().mean())


def test_rerun_resumes_and_changed_options_are_refused(run, capsys):
    out = run[0]
    before = (out / "6_eval" / "step_000002" / "candidates.parquet").stat().st_mtime_ns
    first = json.loads((out / "6_eval" / "summary.json").read_text())["timings"]
    assert main(["quickstart", "--backbone", "sd2-tiny", "--output", str(out), *TINY]) == 0
    assert (out / "6_eval" / "step_000002" / "candidates.parquet").stat().st_mtime_ns >= before
    assert "report" in capsys.readouterr().out
    # The run time adds up over the runs (the resumed one does not replace the first one's).
    second = json.loads((out / "6_eval" / "summary.json").read_text())["timings"]
    assert (first["runs"], second["runs"]) == (1, 2)
    assert second["total"] > first["total"] and second["train"] >= first["train"]
    page = (out / "report.html").read_text()
    assert f"Run time {second['total']:.0f} s over 2 runs (resumed)" in page
    assert "All 2 images shown." in page
    assert (
        main(["quickstart", "--backbone", "sd2-tiny", "--output", str(out), *TINY, "--train.beta", "7"]) == 2
    )
    assert "other options (train.beta)" in capsys.readouterr().err


def test_tiles_split_in_a_checkerboard_without_shared_pixels(tmp_path):
    train, held = tiles(sorted(PHOTOS.glob("*.png")), 128)
    assert len(train) == 11 and len(held) == 11  # 4 photos with a short side of 256 px
    ids = [i for i, _ in train + held]
    assert len(set(ids)) == len(ids)
    assert all(t.shape == (1, 3, 128, 128) for _, t in train + held)
    assert {i.split("_r")[0] for i, _ in held} == {p.stem for p in PHOTOS.glob("*.png")}


def test_bundled_photos_are_small_and_licensed():
    files = sorted(PHOTOS.glob("*.png"))
    assert [f.stem for f in files] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert sum(f.stat().st_size for f in files) < 1_000_000
    readme = (PHOTOS / "README.md").read_text()
    assert all(f.name in readme for f in files) and "public domain" in readme and "CC0" in readme


def test_bad_options_are_value_errors(tmp_path, capsys):
    assert main(["quickstart", "--output", str(tmp_path / "a"), "--sample.samples", "1"]) == 2
    assert "--sample.samples must be an integer >= 2, got 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="hr-size"):
        QuickstartConfig(hr_size=100)
    # each stage's options are checked by the stage's own config
    assert main(["quickstart", "--output", str(tmp_path / "b"), "--train.beta", "-1"]) == 2
    assert "--beta must be a finite number > 0" in capsys.readouterr().err
    assert (
        main(
            [
                "quickstart",
                "--output",
                str(tmp_path / "c"),
                "--score.w-fr",
                "1",
                "--score.w-nr",
                "0",
                "--score.metrics",
                "piqe",
            ]
        )
        == 2
    )
    assert "at least one FR metric" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # checked before any work


def test_stage_options_nest_in_flags_and_yaml(tmp_path, capsys):
    """--STAGE.OPTION and a YAML mapping under the stage's name set the stage's own config; the options the
    quickstart sets itself (paths, model, seeds) are neither flags nor YAML keys."""
    yaml_file = tmp_path / "q.yaml"
    yaml_file.write_text("images: 3\ntrain:\n  beta: 250\n  steps: 5\nsample:\n  samples: 6\n")
    args = build_parser("quickstart")[0].parse_args(
        ["quickstart", "--config", str(yaml_file), "--train.steps", "7"]
    )
    cfg = build_config(QuickstartConfig, args)
    assert (cfg.images, cfg.train.beta, cfg.train.steps, cfg.sample.samples) == (3, 250.0, 7, 6)
    assert cfg.train.lr == 3e-5 and cfg.pair.ratio == 0.25  # the quickstart's defaults, not the stages'
    r = resolved(cfg, Layout(tmp_path / "out"))
    assert r.train.data == tmp_path / "out" / "4_pair" / "pref_pairs.parquet" and r.sample.seed == 0
    assert r.sample.input == tmp_path / "out" / "1_degrade" / "train" and r.train.hpo == r.pair.hpo
    assert curve_config(r, Layout(tmp_path / "out")).samples == 6
    yaml_file.write_text("train:\n  output: /elsewhere\n")
    with pytest.raises(ValueError, match="unknown train option"):
        build_config(
            QuickstartConfig,
            build_parser("quickstart")[0].parse_args(["quickstart", "--config", str(yaml_file)]),
        )
    with pytest.raises(SystemExit):
        main(["quickstart", "--train.output", "x"])
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    assert "train options (--train.OPTION)" in capsys.readouterr().out


def test_too_many_crops_asked_is_a_clear_error(tmp_path, capsys):
    rc = main(["quickstart", "--backbone", "sd2-tiny", "--output", str(tmp_path / "o"), "--images", "500"])
    assert rc == 2
    assert "--images 500" in capsys.readouterr().err


def test_default_backbone_is_the_embedded_model(tmp_path):
    """The default model (the one shipped in the package) runs the loop too: 1+1 crops, 2 seeds, 1 step."""
    assert QuickstartConfig().backbone == "embedded"
    from dp2osr.backbones.embedded import SHIPPED

    if not (SHIPPED / "dp2osr.json").is_file():
        pytest.skip("the embedded model's weights are not in this checkout")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dp2osr",
        "quickstart",
        "--output",
        str(out),
        "--images",
        "1",
        "--heldout",
        "1",
        "--sample.samples",
        "2",
        "--train.steps",
        "1",
        "--train.batch-size",
        "1",
        "--sample.steps",
        "2",
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str((out / "report.html").resolve())
    assert pd.read_csv(out / "6_eval" / "reward_curve.csv")["step"].tolist() == [0, 1]


def test_run_clock_keeps_the_time_of_a_killed_run(tmp_path):
    """Totals are saved after every stage: a run killed after one stage still counts in the next run's."""
    import time

    killed = RunClock(tmp_path / "timings.json")
    killed.lap("sample", time.perf_counter() - 5.0)
    resumed = RunClock(tmp_path / "timings.json")
    resumed.lap("train", time.perf_counter() - 2.0)
    totals = resumed.totals()
    assert totals["runs"] == 2 and totals["sample"] >= 5.0 and totals["train"] >= 2.0
    assert totals["total"] >= killed.now["total"] and set(totals) == {"sample", "train", "total", "runs"}


def test_score_dither_is_checked_and_named_beside_the_reward(tmp_path):
    dithered = QuickstartConfig(output=tmp_path, score=ScoreConfig(candidates=".", dither=16))
    assert "dithered" not in guard_note(QuickstartConfig(output=tmp_path))
    assert "mean over 16 dithered copies" in guard_note(dithered)
    assert curve_config(dithered, Layout(tmp_path)).dither == 16  # the held-out pools too
    with pytest.raises(ValueError, match="dither"):
        ScoreConfig(candidates=".", dither=-1)


def test_score_dither_reaches_the_stored_scores(run, tmp_path):
    """--score.dither K travels from the quickstart's options to every reward score it stores."""
    out, _, _ = run
    cfg = QuickstartConfig(output=out, backbone="sd2-tiny", score=ScoreConfig(candidates=".", dither=2))
    stage = resolved(cfg, Layout(out)).score
    assert stage.candidates == out / "2_sample" and stage.dither == 2
    result = score_stage.run(dataclasses.replace(stage, output=tmp_path / "scores"))
    stored = pd.read_parquet(tmp_path / "scores" / "scores_parts" / "_merged.parquet")
    assert set(stored.dither) == {2} and len(stored) == len(result.scores)
    plain = pd.read_parquet(out / "3_score" / "scores.parquet")  # the run itself: plain scores
    both = plain.merge(result.scores, on=["image_id", "seed", "metric"], suffixes=("_plain", "_dither"))
    assert len(both) == len(plain) and not np.allclose(both.value_plain, both.value_dither)


def test_resume_accepts_another_device_or_spelling_of_the_output(tmp_path, monkeypatch):
    """The stage options the quickstart derives (paths, device) follow the top-level ones, which may change on a
    resume; a changed stage option is still refused by name."""
    from dp2osr.quickstart import prepare_output

    out = tmp_path / "q"
    prepare_output(QuickstartConfig(output=out, device="auto"))
    monkeypatch.chdir(tmp_path)
    prepare_output(QuickstartConfig(output=Path("q"), device="cpu"))
    changed = dataclasses.replace(QuickstartConfig().train, beta=7.0)
    with pytest.raises(ValueError, match=r"other options \(train.beta\)"):
        prepare_output(QuickstartConfig(output=out, train=changed))
