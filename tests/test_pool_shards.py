"""The shards pool layout: the same pool, scores, pairs and training as the files layout, in a few tar files."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dp2osr.cli import main
from dp2osr.engine import pool_store
from dp2osr.engine.pools import read_candidates

SAMPLE = ["--backbone", "sd2-tiny", "--samples", "4", "--batch-size", "2", "--steps", "2", "--device", "cpu"]
METRICS = ["--metrics", "psnr", "piqe", "--device", "cpu"]


def _png(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """A degrade-style folder (2 LR/HR pairs) sampled, scored and paired in both layouts."""
    root = tmp_path_factory.mktemp("shards")
    data = root / "data"
    for i, name in enumerate(["a", "b"]):
        _png(data / "lr" / f"{name}.png", 16, i)
        _png(data / "hr" / f"{name}.png", 64, 10 + i)
    pd.DataFrame(
        {"image_id": ["a", "b"], "hr_path": ["hr/a.png", "hr/b.png"], "lr_path": ["lr/a.png", "lr/b.png"]}
    ).to_parquet(data / "pairs.parquet")
    out = {}
    for layout in ("files", "shards"):
        pool = root / layout
        args = ["--input", str(data), "--output", str(pool), "--pool-layout", layout]
        assert main(["sample", *args, *SAMPLE]) == 0
        assert main(["score", "--candidates", str(pool), *METRICS]) == 0
        assert main(["pair", "--rewards", str(pool), "--n", "1", "--hpo", "none"]) == 0
        out[layout] = pool
    out["data"] = data
    return out


def _pixels(path) -> str:
    return hashlib.sha256(pool_store.read_image(path).numpy().tobytes()).hexdigest()


def test_same_candidates_scores_and_pairs_in_a_few_files(pools):
    files, shards = pools["files"], pools["shards"]
    a, b = read_candidates(files), read_candidates(shards)
    assert b.path.tolist()[0] == "shards/00000-r0.tar#a/seed_0000.png"
    assert [_pixels(p) for p in a.abs_path] == [_pixels(p) for p in b.abs_path]
    assert a.sha.tolist() == b.sha.tolist()  # the same PNG bytes
    assert a.sha.tolist() == [pool_store.ref_sha(p) for p in b.abs_path]
    pd.testing.assert_frame_equal(a.drop(columns=["path", "abs_path"]), b.drop(columns=["path", "abs_path"]))
    assert not list(shards.rglob("seed_*.png")) and len(list(shards.rglob("*.tar"))) == 1
    with tarfile.open(next(shards.rglob("*.tar"))) as tar:  # a plain tar file, end marker included
        prompts = [str(p.relative_to(files)) for p in files.rglob("prompt.txt")]
        assert sorted(tar.getnames()) == sorted([*a.path, *prompts])
    for name in ("scores", "rewards", "pref_pairs"):
        fa, fb = (pd.read_parquet(p / f"{name}.parquet") for p in (files, shards))
        keep = [c for c in fa.columns if "path" not in c or c == "lr_path"]
        pd.testing.assert_frame_equal(fa[keep], fb[keep])
    pairs = pd.read_parquet(shards / "pref_pairs.parquet")
    assert pairs.win_path.str.startswith("shards/00000-r0.tar#").all()


def test_train_eval_and_report_read_the_shards(pools, tmp_path):
    losses = {}
    for layout in ("files", "shards"):
        out = tmp_path / f"train_{layout}"
        args = ["train", "--mode", "dpo", "--data", str(pools[layout]), "--output", str(out)]
        assert main([*args, "--backbone", "sd2-tiny", "--steps", "2", "--batch-size", "2"]) == 0
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[layout] = [json.loads(line)["loss"] for line in lines]
    assert losses["files"] == losses["shards"]
    ev = tmp_path / "eval"
    assert main(["eval", "--pools", str(pools["shards"]), "--output", str(ev)]) == 0
    assert (ev / "bestm.csv").is_file()
    page = tmp_path / "page"
    assert main(["report", "--pools", str(pools["shards"]), "--output", str(page)]) == 0
    html = (page / "report.html").read_text()
    assert "not available" not in html.split("HR")[0] and html.count("data:image/") >= 5


def test_cut_short_shard_is_repaired_and_resumes_to_the_same_pool(pools, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(pools["shards"], pool)
    (pool / "candidates.parquet").unlink()  # the killed run wrote no manifest
    shard = next(pool.rglob("*.tar"))
    index, end = pool_store.scan(shard)
    offset, size = index["b/seed_0001.png"]
    with open(shard, "r+b") as f:  # killed in the middle of writing b/seed_0001.png
        f.truncate(offset + size // 2)
    assert "b/seed_0001.png" not in pool_store.scan(shard)[0]
    args = ["--input", str(pools["data"]), "--output", str(pool), "--pool-layout", "shards"]
    assert main(["sample", *args, *SAMPLE]) == 0
    with tarfile.open(shard) as tar:  # repaired: the cut member dropped, the archive closed
        assert "b/seed_0001.png" not in tar.getnames() and "b/seed_0000.png" in tar.getnames()
    resumed, full = read_candidates(pool), read_candidates(pools["shards"])
    assert resumed.sha.tolist() == full.sha.tolist()
    moved = resumed[resumed.path.str.startswith("shards/00001-r0.tar#")]
    # the cut member and those after it went; their seed chunks were sampled again into a new shard
    assert sorted(moved.path.str.split("#").str[1]) == [f"b/seed_{s:04d}.png" for s in range(4)]
    assert main(["sample", *args, *SAMPLE]) == 0  # a finished pool: nothing written
    assert len(list(pool.rglob("*.tar"))) == 2


def test_layout_change_on_resume_is_refused(pools, capsys):
    args = ["--input", str(pools["data"]), "--output", str(pools["files"]), "--pool-layout", "shards"]
    assert main(["sample", *args, *SAMPLE]) == 2
    assert "pool_layout" in capsys.readouterr().err


def test_member_names_are_plain(tmp_path):
    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        data = (tmp_path / "x.png").write_bytes(b"") or b"png"
        info = tarfile.TarInfo("../evil.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="'../evil.png' is not a plain"):
        pool_store.read_bytes(f"{shard}#../evil.png")
    with pytest.raises(ValueError, match="member '../evil.png' is not a plain"):
        pool_store.scan(shard)
    for bad in ("/abs/x.png", "a/../x.png", "x.png"):
        assert pool_store.member_problem(bad) is not None
    writer = pool_store.ShardWriter(tmp_path, 0, 0)
    with pytest.raises(ValueError, match="not a plain"):
        writer.put("../x.png", b"1")
    ref = writer.put("id/seed_0000.png", b"123")
    writer.close()
    assert pool_store.read_bytes(tmp_path / ref) == b"123"
    assert pool_store.ref_stat(tmp_path / "shards/00000-r0.tar#id/seed_0009.png") is None


def test_two_processes_write_their_own_shards_and_one_resumes_them(pools, tmp_path):
    """Each process of a launch appends to its own shards; a rerun with another process count finds them all."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    pool = tmp_path / "two"
    args = ["--input", str(pools["data"]), "--output", str(pool), "--pool-layout", "shards", *SAMPLE]
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--standalone", "-m", "dp2osr", "sample", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in pool.rglob("*.tar")) == ["00000-r0.tar", "00000-r1.tar"]
    two = read_candidates(pool)
    assert set(two.path.str.split("#").str[0]) == {"shards/00000-r0.tar", "shards/00000-r1.tar"}
    assert (two.sha == [pool_store.ref_sha(p) for p in two.abs_path]).all()
    one = read_candidates(pools["shards"])
    for x, y in zip(one.abs_path, two.abs_path):  # thread counts may move a pixel
        levels = ((pool_store.read_image(x) - pool_store.read_image(y)).abs() * 255).round()
        assert levels.max() <= 3 and (levels > 1).float().mean() < 1e-3  # 8-bit outputs of other batches
    assert main(["sample", *args]) == 0  # one process: every candidate current, nothing written
    assert len(list(pool.rglob("*.tar"))) == 2
    pd.testing.assert_frame_equal(read_candidates(pool), two)
