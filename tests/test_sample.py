"""`dp2osr sample`: seeded candidate pools that resume exactly and shard without overlap."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dp2osr.cli import main
from dp2osr.engine.jobs import chunk_jobs
from dp2osr.engine.pools import read_inputs
from dp2osr.paths import file_sha

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ARGS = ["--backbone", "sd2-tiny", "--samples", "6", "--batch-size", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def lr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr")
    rng = np.random.default_rng(0)
    for name in ("img_a", "img_b"):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def _cli(*args):
    return [sys.executable, "-m", "dp2osr", "sample", *args]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("seed_*.png"))}


def test_killed_run_resumes_to_identical_pool(lr_folder, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    subprocess.run(
        _cli("--input", str(lr_folder), "--output", str(full), *ARGS),
        env=ENV,
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        _cli("--input", str(lr_folder), "--output", str(resumed), *ARGS),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(resumed.rglob("seed_*.png"))) < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = len(list(resumed.rglob("seed_*.png")))
    assert 0 < partial < 12, "the run should have been killed part-way"
    subprocess.run(
        _cli("--input", str(lr_folder), "--output", str(resumed), *ARGS),
        env=ENV,
        check=True,
        capture_output=True,
    )
    assert _files(full) == _files(resumed)
    assert not list(resumed.rglob(".tmp_*"))  # a half-written file of the killed run was cleaned up
    a = pd.read_parquet(full / "candidates.parquet")
    b = pd.read_parquet(resumed / "candidates.parquet")
    pd.testing.assert_frame_equal(
        a.drop(columns=["backbone", "base", "controlnet"]), b.drop(columns=["backbone", "base", "controlnet"])
    )
    assert len(a) == 12 and set(a.seed) == set(range(6)) and (a.hr_path == "").all()


def test_jobs_partition_exactly():
    """(image, seed chunk) jobs dealt round-robin to 2 processes cover every (image, seed) once."""
    jobs = chunk_jobs([(i, f"{i}.png") for i in "abc"], list(range(10, 17)), 3)
    assert [len(j.seeds) for j in jobs] == [3, 3, 1] * 3
    shards = [jobs[r::2] for r in range(2)]
    flat = [(j.image_id, s) for shard in shards for j in shard for s in j.seeds]
    assert len(flat) == len(set(flat)) == 3 * 7


@pytest.mark.slow
def test_two_processes_cover_every_candidate_once(lr_folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        _cli("--input", str(lr_folder), "--output", str(one), *ARGS), env=ENV, check=True, capture_output=True
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    res = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "dp2osr",
            "sample",
            "--input",
            str(lr_folder),
            "--output",
            str(two),
            *ARGS,
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    # Each process reports how many it wrote: 6 + 6 = all 12, none twice.
    written = [
        int(line.split("(")[1].split()[0]) for line in res.stderr.splitlines() if "new on process" in line
    ]
    assert written == [6] or sum(written) == 12
    a, b = _files(one), _files(two)
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:  # same pixels; single vs multi-process thread counts may move a pixel by one level
        x = np.asarray(Image.open(one / name)).astype(int)
        y = np.asarray(Image.open(two / name)).astype(int)
        assert np.abs(x - y).max() <= 1
    # The manifest the processes wrote from their parts: one process's, but for the hashes of pixels that moved
    ca, cb = (pd.read_parquet(f / "candidates.parquet") for f in (one, two))
    hashes = ["sha", "options_sha"]
    pd.testing.assert_frame_equal(ca.drop(columns=hashes), cb.drop(columns=hashes))
    same = [(one / n).read_bytes() == (two / n).read_bytes() for n in ca.path]
    assert (ca.sha[same] == cb.sha[same]).all() and (cb.sha == [file_sha(two / n) for n in cb.path]).all()
    stamps = pd.read_parquet(two / ".candidates_stamps.parquet")
    assert stamps.path.tolist() == cb.path.tolist() and not (two / ".manifest_parts").exists()


def test_pairs_manifest_input_and_option_change_refused(tmp_path, capsys):
    (tmp_path / "deg" / "lr").mkdir(parents=True)
    (tmp_path / "deg" / "hr").mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "deg/lr/x.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "deg/hr/x.png")
    pd.DataFrame(
        {"image_id": ["x"], "hr_path": ["hr/x.png"], "lr_path": ["lr/x.png"], "source": [""], "seed": [0]}
    ).to_parquet(tmp_path / "deg/pairs.parquet")
    inputs = read_inputs(tmp_path / "deg")
    assert inputs.hr_path[0] == str((tmp_path / "deg/hr/x.png").resolve())
    out = tmp_path / "pool"
    base = [
        "sample",
        "--input",
        str(tmp_path / "deg"),
        "--output",
        str(out),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "1",
        "--samples",
        "2",
    ]
    assert main(base) == 0
    df = pd.read_parquet(out / "candidates.parquet")
    assert list(df.path) == ["x/seed_0000.png", "x/seed_0001.png"]
    assert main([*base[:-2], "--samples", "2", "--guidance", "7"]) == 2
    assert "guidance" in capsys.readouterr().err


def test_unreadable_lr_is_reported_and_skipped(tmp_path, capsys):
    folder = tmp_path / "lr"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "pool"
    rc = main(
        [
            "sample",
            "--input",
            str(folder),
            "--output",
            str(out),
            "--backbone",
            "sd2-tiny",
            "--steps",
            "1",
            "--samples",
            "2",
        ]
    )
    assert rc == 1
    assert "bad.png" in capsys.readouterr().err
    assert list(pd.read_parquet(out / "candidates.parquet").image_id.unique()) == ["good"]
