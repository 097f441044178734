"""The score stage on a tiny fake pool (offline metrics), and the metric catalogue's weight handling."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from dp2osr import metrics, tables
from dp2osr.cli import main as cli_main
from dp2osr.errors import PartialFailure
from dp2osr.score import ScoreConfig
from dp2osr.score import run as score

FR_METRICS = ["psnr", "gmsd"]  # higher-better and lower-better FR; fast at 64 px
NR_METRICS = ["piqe"]  # lower-better NR
TEST_METRICS = FR_METRICS + NR_METRICS


def make_pool(root: Path, n_images: int = 3, seeds=(0, 1, 2), size: int = 64, no_hr: tuple = ()) -> Path:
    """A `sample`-style folder: ID/seed_XXXX.png candidates (HR + seed-dependent noise) + candidates.parquet."""
    rng = np.random.default_rng(0)
    pool = root / "pool"
    data = root / "data"
    rows = []
    for i in range(n_images):
        image_id = f"img{i:02d}"
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([xx, yy, 0.5 + 0.3 * np.sin(6 * xx + i)], axis=-1)
        hr = np.clip(
            base + 0.15 * rng.standard_normal((size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1), 0, 1
        )
        hr_path = data / "hr" / f"{image_id}.png"
        lr_path = data / "lr" / f"{image_id}.png"
        hr_path.parent.mkdir(parents=True, exist_ok=True)
        lr_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((hr * 255).round().astype(np.uint8)).save(hr_path)
        Image.fromarray((hr[::4, ::4] * 255).round().astype(np.uint8)).save(lr_path)
        for seed in seeds:
            sigma = 0.02 + 0.05 * ((seed * 7 + i * 3) % 5)
            cand = np.clip(hr + sigma * rng.standard_normal(hr.shape), 0, 1)
            rel = f"{image_id}/seed_{seed:04d}.png"
            (pool / image_id).mkdir(parents=True, exist_ok=True)
            Image.fromarray((cand * 255).round().astype(np.uint8)).save(pool / rel)
            rows.append(
                {
                    "image_id": image_id,
                    "seed": seed,
                    "path": rel,
                    "lr_path": str(lr_path),
                    "hr_path": "" if image_id in no_hr else str(hr_path),
                    "model": "fake",
                }
            )
    table = pd.DataFrame(rows).astype({"seed": "int64"})
    table["path"] = [str(pool / p) for p in table["path"]]
    tables.write(
        tables.CANDIDATES, table, pool
    )  # as `sample` writes it: relative paths, their roots recorded
    return pool


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def test_scores_and_rewards_match_hand_computation(tmp_path):
    pool = make_pool(tmp_path, no_hr=("img02",))
    rc = cli_main(["score", "--candidates", str(pool), "--metrics", *TEST_METRICS, "--device", "cpu"])
    assert rc == 0
    cands = pd.read_parquet(pool / "candidates.parquet")
    scores = pd.read_parquet(pool / "scores.parquet")
    rewards = pd.read_parquet(pool / "rewards.parquet")
    saved = yaml.safe_load((pool / "score_config.yaml").read_text())
    assert saved["metrics"] == TEST_METRICS and saved["output"] == str(pool)

    # schema (docs/ARCHITECTURE.md)
    assert list(scores.columns) == ["image_id", "seed", "metric", "value"]

    def types(path, columns):
        schema = pq.read_schema(path)
        return [str(schema.field(c).type).replace("large_string", "string") for c in columns]

    assert types(pool / "scores.parquet", scores.columns) == ["string", "int64", "string", "double"]
    assert types(pool / "rewards.parquet", ["image_id", "seed", "path", "reward"]) == [
        "string",
        "int64",
        "string",
        "double",
    ]
    # the rewards table carries what `pair` and `report` need: LR/HR, prompt, model (none in this fake pool)
    assert list(rewards.columns) == [
        "image_id",
        "seed",
        "path",
        "lr_path",
        "hr_path",
        "reward",
        *[f"norm_{m}" for m in TEST_METRICS],
    ]
    assert rewards[["image_id", "seed", "path"]].equals(cands[["image_id", "seed", "path"]])
    read, meta = tables.read(tables.REWARDS, pool)
    cands = tables.read(tables.CANDIDATES, pool)[0]  # absolute paths from here on
    assert read.lr_path.tolist() == cands.lr_path.tolist() and read.hr_path.tolist() == cands.hr_path.tolist()
    assert meta == {
        "roots": ["../data/hr", "../data/lr"],
        "metrics": TEST_METRICS,
        "w_fr": 0.5,
        "w_nr": 0.5,
        "scope": "pool",
        "dither": 0,
        "schema": "rewards",
        "version": tables.REWARDS.version,
    }

    # FR only where there is an HR: img02 has NR scores only
    fr_rows = scores[scores.metric.isin(FR_METRICS)]
    assert set(fr_rows.image_id) == {"img00", "img01"}
    assert len(scores) == 6 * 3 + 3 * 1

    # PSNR computed by hand from the files: each candidate is paired with its own seed's file and its HR
    for row in cands[cands.hr_path != ""].itertuples():
        mse = np.mean((read_png(pool / row.path) - read_png(row.hr_path)) ** 2)
        got = scores[
            (scores.image_id == row.image_id) & (scores.seed == row.seed) & (scores.metric == "psnr")
        ]
        assert got.value.item() == pytest.approx(10 * np.log10(1 / (mse + 1e-8)), abs=1e-3)

    # reward by hand: pool-wide min-max after orientation, 0.5 FR mean + 0.5 NR mean, NR alone without HR
    wide = scores.pivot(index=["image_id", "seed"], columns="metric", values="value")
    wide = wide.reindex(pd.MultiIndex.from_frame(cands[["image_id", "seed"]]))
    psnr, gmsd, piqe = wide["psnr"], -wide["gmsd"], -wide["piqe"]  # higher is better

    def norm(s):
        return (s - s.min()) / (s.max() - s.min())

    fr = (norm(psnr) + norm(gmsd)) / 2
    nr = norm(piqe)
    expected = np.where(fr.isna(), nr, 0.5 * fr + 0.5 * nr)
    np.testing.assert_allclose(rewards["reward"], expected, rtol=1e-12)
    np.testing.assert_allclose(rewards["norm_piqe"], nr.to_numpy(), rtol=1e-12)
    assert rewards["norm_psnr"].max() == 1.0 and rewards["norm_psnr"].min() == 0.0

    # a second run finds everything scored and writes identical tables
    before = (scores, rewards)
    score(ScoreConfig(candidates=pool, metrics=TEST_METRICS, device="cpu"))
    pd.testing.assert_frame_equal(pd.read_parquet(pool / "scores.parquet"), before[0])
    pd.testing.assert_frame_equal(pd.read_parquet(pool / "rewards.parquet"), before[1])


def test_output_folder_and_image_scope(tmp_path):
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1))
    out = tmp_path / "elsewhere" / "scored"
    cfg = ScoreConfig(candidates=pool, output=out, metrics=["psnr", "piqe"], device="cpu", scope="image")
    score(cfg)
    rewards = pd.read_parquet(out / "rewards.parquet")
    # paths are relative to the table's folder
    assert all((out / p).is_file() for p in rewards["path"])
    # per-image scope: within each image the best candidate gets 1 and the worst 0 on every metric
    for _, g in rewards.groupby("image_id"):
        assert sorted(g["norm_psnr"]) == [0.0, 1.0]
        assert sorted(g["norm_piqe"]) == [0.0, 1.0]
    assert not (pool / "scores.parquet").exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import dp2osr.engine.score_store as E
    import dp2osr.score as S

    limit = int(sys.argv[2])
    written = [0]
    real_write = E.write_parquet
    E.PART_IMAGES = 1  # a part file per image

    def write(df, path):
        if E._PART_RE.fullmatch(Path(path).name) and Path(path).name != E.MERGED_PART:
            if written[0] == limit:  # a hard kill after `limit` finished images, mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            written[0] += 1
        real_write(df, path)

    E.write_parquet = write
    S.run(S.ScoreConfig(candidates=Path(sys.argv[1]), metrics=sys.argv[3:], device="cpu"))
    """
)


def test_resume_after_kill_gives_identical_tables(tmp_path, monkeypatch):
    pool = make_pool(tmp_path, n_images=4, seeds=(0, 1, 2))
    fresh = tmp_path / "fresh"
    shutil.copytree(pool, fresh)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(pool), "2", *TEST_METRICS],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(list((pool / "scores_parts").glob("img*-r0-*.parquet"))) == 2
    assert not (pool / "scores.parquet").exists()

    # the rerun scores only the two unfinished images
    scored = []
    real = metrics.score_batch

    def counting(model, images, ref=None):
        scored.append(images.shape[0])
        return real(model, images, ref)

    monkeypatch.setattr(metrics, "score_batch", counting)
    score(ScoreConfig(candidates=pool, metrics=TEST_METRICS, device="cpu"))
    assert sum(scored) == 2 * 3 * len(TEST_METRICS)
    monkeypatch.setattr(metrics, "score_batch", real)

    score(ScoreConfig(candidates=fresh, metrics=TEST_METRICS, device="cpu"))
    for name in ("scores.parquet", "rewards.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(pool / name), pd.read_parquet(fresh / name))
    # parts are folded into one merged file, the new hash stamps into one stamps file
    assert sorted(p.name for p in (pool / "scores_parts").iterdir()) == ["_merged.parquet", "_stamps.parquet"]


def test_adding_a_metric_scores_only_that_metric(tmp_path, monkeypatch):
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1))
    score(ScoreConfig(candidates=pool, metrics=["psnr"], device="cpu"))
    calls = []
    real = metrics.score_batch
    monkeypatch.setattr(
        metrics, "score_batch", lambda m, x, r=None: calls.append(m.metric_name) or real(m, x, r)
    )
    score(ScoreConfig(candidates=pool, metrics=["psnr", "piqe"], device="cpu"))
    assert set(calls) == {"piqe"}
    assert set(pd.read_parquet(pool / "scores.parquet").metric) == {"psnr", "piqe"}


def test_batched_equals_one_at_a_time(tmp_path):
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1, 2, 3))
    one = tmp_path / "one"
    score(ScoreConfig(candidates=pool, metrics=TEST_METRICS, device="cpu", batch_size=4))
    assert score(ScoreConfig(candidates=pool, output=one, metrics=TEST_METRICS, device="cpu", batch_size=1))
    a = pd.read_parquet(pool / "scores.parquet")
    b = pd.read_parquet(one / "scores.parquet")
    pd.testing.assert_frame_equal(a[["image_id", "seed", "metric"]], b[["image_id", "seed", "metric"]])
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5)


def test_corrupt_candidate_is_reported_and_others_scored(tmp_path, capsys):
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1, 2))
    bad = pool / "img01" / "seed_0001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(PartialFailure, match="problem"):
        score(ScoreConfig(candidates=pool, metrics=TEST_METRICS, device="cpu"))
    assert str(bad) in capsys.readouterr().err
    scores = pd.read_parquet(pool / "scores.parquet")
    rewards = pd.read_parquet(pool / "rewards.parquet")
    assert len(rewards) == 5 and not ((rewards.image_id == "img01") & (rewards.seed == 1)).any()
    assert len(scores) == 5 * len(TEST_METRICS)

    # once the file is fixed, a rerun scores just that image again and succeeds
    shutil.copy(pool / "img01" / "seed_0000.png", bad)
    score(ScoreConfig(candidates=pool, metrics=TEST_METRICS, device="cpu"))
    assert len(pd.read_parquet(pool / "rewards.parquet")) == 6


def test_missing_weights_fail_fast_naming_metric_and_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # no cached weights, wherever the test runs
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        metrics.create("lpips", "cpu")
    assert time.perf_counter() - start < 2
    assert "'lpips'" in str(err.value) and "LPIPS_v0.1_alex-df73285e.pth" in str(err.value)
    assert "alexnet-owt-7be5be79.pth" in str(err.value)

    with pytest.raises(ValueError, match=r"'topiq_nr'.*cfanet_nr_koniq_res50-9a73138b\.pth"):
        metrics.create("topiq_nr", "cpu", weights_dir=tmp_path)

    pool = make_pool(tmp_path, n_images=1, seeds=(0,))
    start = time.perf_counter()
    rc = cli_main(["score", "--candidates", str(pool), "--metrics", "psnr", "musiq", "--device", "cpu"])
    assert time.perf_counter() - start < 10
    assert rc == 2
    err_text = capsys.readouterr().err
    assert "'musiq'" in err_text and "musiq_koniq_ckpt-e95806b9.pth" in err_text


def test_weights_dir_checkpoints_are_loaded(tmp_path, monkeypatch):
    """Random 'published' checkpoints in a weights_dir reach the models exactly (two loading routes)."""
    import pyiqa

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    torch.manual_seed(0)
    # musiq: pyiqa's own pretrained_model_path
    ref = pyiqa.create_metric("musiq", device="cpu", pretrained=False)
    torch.save(ref.net.state_dict(), tmp_path / "musiq_koniq_ckpt-e95806b9.pth")
    # topiq_nr: built without weights, then loaded strictly as pyiqa's download branch does
    ref_t = metrics.create("topiq_nr", "cpu", allow_random_weights=True)
    (tmp_path / "pyiqa").mkdir()  # the torch-hub layout is accepted too
    torch.save({"params": ref_t.net.state_dict()}, tmp_path / "pyiqa" / "cfanet_nr_koniq_res50-9a73138b.pth")

    for name, reference in (("musiq", ref), ("topiq_nr", ref_t)):
        model = metrics.create(name, "cpu", weights_dir=tmp_path)
        got, want = model.net.state_dict(), reference.net.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_catalogue_follows_pyiqa():
    import importlib

    paper = metrics.PRESETS["paper"]
    assert set(paper) <= set(metrics.pyiqa_configs())
    fr = [n for n in paper if metrics.get_spec(n).family == "fr"]
    assert fr == ["lpips", "topiq_fr", "afine_fr"]
    lower = {n for n in paper if metrics.get_spec(n).lower_better}
    assert lower == {"lpips", "afine_fr", "afine_nr"}  # pyiqa's own lower_better flags
    assert {n: metrics.get_spec(n).lower_better for n in [*metrics.PRESETS["offline"], "ms_ssim"]} == {
        "ms_ssim": False,
        "fsim": False,
        "gmsd": True,
        "piqe": True,
    }
    assert all(metrics.get_spec(n).weights == () for n in metrics.PRESETS["offline"])
    # the file names we look for are the ones pyiqa would download
    expected = {
        "lpips": ("pyiqa.archs.lpips_arch", "0.1_alex"),
        "topiq_fr": ("pyiqa.archs.topiq_arch", "cfanet_fr_kadid_res50"),
        "topiq_nr": ("pyiqa.archs.topiq_arch", "cfanet_nr_koniq_res50"),
        "musiq": ("pyiqa.archs.musiq_arch", "koniq10k"),
        "maniqa": ("pyiqa.archs.maniqa_arch", "koniq"),
        "clipiqa+": ("pyiqa.archs.clipiqa_arch", "clipiqa+"),
        "afine_nr": ("pyiqa.archs.afine_arch", "afine"),
    }
    for name, (module, key) in expected.items():
        url = importlib.import_module(module).default_model_urls[key]
        spec = metrics.get_spec(name)
        assert spec.weights[0].url == url, name
        assert spec.weights[0].filename == unquote(Path(url).name), name
    from pyiqa.archs.clip_model import _MODELS

    assert metrics.get_spec("clipiqa+").weights[1].url == _MODELS["RN50"]
    assert metrics.get_spec("afine_fr").weights[1].url == _MODELS["ViT-B/32"]


def test_catalogue_is_the_one_home_of_names_families_and_sizes():
    from dp2osr.evaluate import DEFAULT_METRICS
    from dp2osr.math.reward import FAMILIES

    assert DEFAULT_METRICS == list(metrics.PRESETS["offline"])  # evaluate's default is the offline preset
    assert metrics.FAMILIES is FAMILIES
    assert metrics.min_size("niqe") == metrics.get_spec("niqe").min_size == 96
    assert metrics.min_size("ms_ssim") == 176 and metrics.min_size("psnr") == metrics.min_size(None) == 1
    # reading the catalogue imports neither torch nor pyiqa
    code = "import sys, dp2osr.metrics as m; m.get_spec('niqe'); print(sorted({'torch', 'pyiqa'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_names_and_random_weights_guard():
    assert metrics.resolve_names("offline") == ["fsim", "gmsd", "piqe"]
    assert metrics.resolve_names("paper", ["psnr", "psnr", "piqe"]) == ["psnr", "piqe"]
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        metrics.resolve_names("offline", ["nope"])
    with pytest.raises(ValueError, match="preset"):
        metrics.resolve_names("fast")
    with pytest.raises(ValueError, match="random weights"):
        metrics.create("lpips", "cpu", allow_random_weights=True)
    model = metrics.create("musiq", "cpu", allow_random_weights=True)
    assert model.metric_mode == "NR"


def test_small_images_rejected_for_ms_ssim(tmp_path):
    pool = make_pool(tmp_path, n_images=1, seeds=(0,))
    with pytest.raises(ValueError, match="ms_ssim.*176"):
        score(ScoreConfig(candidates=pool, metrics=["ms_ssim"], device="cpu"))


def test_offline_preset_scores_the_quickstart_crop_size(tmp_path):
    """The default preset needs no weights and scores 64 px candidates (the quickstart's crops): FR and NR."""
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1), size=64)
    score(ScoreConfig(candidates=pool, device="cpu"))  # preset offline is the default
    scores = pd.read_parquet(pool / "scores.parquet")
    assert sorted(set(scores.metric)) == sorted(metrics.PRESETS["offline"])
    assert {metrics.get_spec(m).family for m in metrics.PRESETS["offline"]} == {"fr", "nr"}
    assert scores.value.notna().all() and len(scores) == 2 * 2 * len(metrics.PRESETS["offline"])


def test_dithered_copies_are_invisible_and_fixed_by_content():
    from dp2osr.engine.scoring import ScoreOptions
    from dp2osr.math.dither import dithered

    x = torch.rand(2, 3, 16, 16).mul(255).round().div(255)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # the clip at both ends
    a = dithered(x, ["aa", "bb"], 0)
    assert torch.equal(a, dithered(x, ["aa", "bb"], 0))  # reruns give the same copy
    assert not torch.equal(a, dithered(x, ["aa", "bb"], 1))  # copy k differs from copy k+1
    assert torch.equal(a[1], dithered(x[1:], ["bb"], 0)[0])  # one image's pattern ignores the batch around it
    steps = ((a - x) * 255).round()
    assert set(steps.unique().tolist()) <= {-1.0, 0.0, 1.0} and (steps != 0).float().mean() > 0.5
    assert a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="dither"):
        ScoreOptions(dither=-1)


def test_dither_scores_are_the_mean_of_the_copies_and_kept_apart(tmp_path):
    from dp2osr.images import load_image
    from dp2osr.math.dither import dithered
    from dp2osr.paths import file_sha

    pool = make_pool(tmp_path, n_images=1, seeds=(0, 1))
    score(ScoreConfig(candidates=pool, metrics=["psnr", "piqe"], device="cpu"))
    plain = pd.read_parquet(pool / "scores.parquet")
    score(ScoreConfig(candidates=pool, metrics=["psnr", "piqe"], device="cpu", dither=3))
    dith = pd.read_parquet(pool / "scores.parquet")
    assert not np.allclose(plain.value, dith.value)  # not the cached plain scores
    # by hand: the mean over the 3 copies of the candidate, each scored against the HR
    cands = tables.read(tables.CANDIDATES, pool)[0]
    row = cands.iloc[0]
    x = load_image(pool / row.path)
    hr = load_image(Path(row.hr_path))
    model = metrics.create("psnr", "cpu")
    want = np.mean(
        [metrics.score_batch(model, dithered(x, [file_sha(pool / row.path)], k), hr)[0] for k in range(3)]
    )
    got = dith[
        (dith.metric == "psnr") & (dith.seed == row.seed) & (dith.image_id == row.image_id)
    ].value.item()
    assert got == pytest.approx(want, rel=1e-6)  # float32 metric, batched vs one at a time
    # the plain scores are still there and unchanged (a rerun without --dither reads them back)
    score(ScoreConfig(candidates=pool, metrics=["psnr", "piqe"], device="cpu"))
    pd.testing.assert_frame_equal(pd.read_parquet(pool / "scores.parquet"), plain)
    with pytest.raises(ValueError, match="dither"):
        ScoreConfig(candidates=pool, dither=-2)


@pytest.mark.parametrize(
    "metric, size",
    [("piqe", (1, 1)), ("piqe", (5, 3)), ("ssim", (3, 5)), ("gmsd", (1, 1)), ("brisque", (5, 3))],
)
def test_candidates_smaller_than_a_metric_takes_are_one_line(tmp_path, capsys, metric, size):
    pool = make_pool(tmp_path, n_images=1, seeds=(0,))
    cand = pool / "img00" / "seed_0000.png"
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(cand)
    hr = tmp_path / "data" / "hr" / "img00.png"
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(hr)
    assert cli_main(["score", "--candidates", str(pool), "--metrics", metric, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"metric {metric!r} needs images of at least" in err
    assert f"is {size[1]}x{size[0]}" in err
