"""Work shared by the processes of a launch: the process group's timeout, candidate manifests written from the
processes' parts, and the held-out scoring and PSNR/SSIM dealt to every process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from test_score import TEST_METRICS, make_pool

from dp2osr import runtime
from dp2osr.engine import pools
from dp2osr.engine.jobs import chunk_jobs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODEL = {"backbone": "sd2-tiny", "base": "base", "controlnet": "net"}


def test_process_group_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(runtime.DIST_TIMEOUT_ENV, raising=False)
    assert runtime.dist_timeout() == timedelta(hours=4)
    monkeypatch.setenv(runtime.DIST_TIMEOUT_ENV, "90.5")
    assert runtime.dist_timeout() == timedelta(seconds=90.5)
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv(runtime.DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"DP2OSR_DIST_TIMEOUT='{bad}'"):
            runtime.dist_timeout()
    seen = {}

    class Recorder:  # accelerate's PartialState, recording what it was created with
        num_processes, device = 1, None

        def __init__(self, cpu=False, **kwargs):
            seen.update(cpu=cpu, **kwargs)

    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", Recorder)
    monkeypatch.setenv(runtime.DIST_TIMEOUT_ENV, "7200")
    runtime.process_state("cpu")
    assert seen == {"cpu": True, "timeout": timedelta(hours=2)}


class _FakeState:
    """Process ``rank`` of ``world`` whose barriers are no-ops (the ranks run one after another)."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self) -> None:
        pass


def _pool(tmp_path: Path) -> tuple[Path, pd.DataFrame, list[int]]:
    pool = make_pool(tmp_path, n_images=5, seeds=(3, 4, 5), no_hr=("img01",))
    (pool / "img02" / "prompt.txt").write_text("a red kite\n")
    data = tmp_path / "data"
    images = pd.DataFrame(
        {
            "image_id": [f"img{i:02d}" for i in range(5)],
            "lr_path": [str(data / "lr" / f"img{i:02d}.png") for i in range(5)],
            "hr_path": ["" if i == 1 else str(data / "hr" / f"img{i:02d}.png") for i in range(5)],
        }
    )
    return pool, images, [3, 4, 5]


def _manifest_bytes(pool: Path) -> tuple[bytes, bytes]:
    return (pool / "candidates.parquet").read_bytes(), (pool / pools.STAMPS_FILE).read_bytes()


def test_manifest_from_process_parts_is_one_process_manifest(tmp_path, monkeypatch):
    """Three processes record the files of their own (image, seed chunk) jobs and a third of the images' prompts
    and HR hashes; the main process, reading no candidate, writes the bytes one process writes."""
    pool, images, seeds = _pool(tmp_path)
    done = images[images.image_id != "img03"].reset_index(drop=True)  # an image that failed on some process
    pools.write_manifest(done, pool, seeds, MODEL, {"pair_ratio": 0.25})
    one = _manifest_bytes(pool)
    stamps = pools.read_stamps(pool)
    jobs = chunk_jobs(list(zip(images.image_id, images.lr_path)), seeds, 2)
    world = 3
    for rank in range(world):  # each process's part, written as the processes do
        records, missing = pools.manifest_records(images, pool, seeds, jobs[rank::world], stamps)
        assert not missing
        pools._write_part(
            _FakeState(rank, world), pool, records, pools.image_info(done.iloc[rank::world], pool)
        )
    opened = []
    monkeypatch.setattr(pools, "_file_record", lambda *a: opened.append(a))
    monkeypatch.setattr(pools, "_hr_sha", lambda *a: opened.append(a))
    pools.combine_manifest(done, pool, *pools._read_parts(pool, world), MODEL, {"pair_ratio": 0.25})
    assert _manifest_bytes(pool) == one and not opened
    assert not (pool / pools.PARTS_DIR).exists()


def test_manifest_reports_missing_candidates(tmp_path):
    pool, images, seeds = _pool(tmp_path)
    (pool / "img04" / "seed_0005.png").unlink()
    (pool / "img00" / "seed_0003.png").write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="2 candidates missing"):
        pools.write_manifest(images, pool, seeds, MODEL)


_HELDOUT_SCRIPT = """
import sys
from pathlib import Path
from dp2osr.engine import heldout
from dp2osr.runtime import process_state
state, _ = process_state("cpu")
pool, out = Path(sys.argv[1]), Path(sys.argv[2])
heldout.score_pool(pool, out, sys.argv[3:], device="cpu", state=state, run_device="cpu")
heldout.quality(pool, state)
"""


@pytest.mark.slow
def test_two_processes_score_the_heldout_pool_as_one(tmp_path):
    """The held-out pool scored and measured (PSNR/SSIM) by two processes: the files one process writes."""
    from dp2osr.engine import heldout

    pool, images, seeds = _pool(tmp_path)
    pools.write_manifest(images, pool, seeds, MODEL)
    two = tmp_path / "two"
    shutil.copytree(pool, two)
    heldout.score_pool(pool, pool, TEST_METRICS, device="cpu")
    one_quality = heldout.quality(pool)
    script = tmp_path / "heldout_two.py"
    script.write_text(_HELDOUT_SCRIPT)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--standalone", str(script), str(two), str(two), *TEST_METRICS],
        env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = [int(line.split()[1]) for line in res.stderr.splitlines() if " score(s) in " in line]
    assert len(counts) == 2 and all(counts)  # both processes scored
    assert (pool / "quality.parquet").read_bytes() == (two / "quality.parquet").read_bytes()
    for name in ("scores.parquet", "rewards.parquet"):  # metric maths may move in the last bits with threads
        pd.testing.assert_frame_equal(pd.read_parquet(pool / name), pd.read_parquet(two / name), rtol=1e-6)
    assert len(one_quality) == 15 and one_quality.ssim.notna().sum() == 12


def test_score_rerun_trusts_the_stamps_and_rehashes_changed_files(tmp_path, monkeypatch):
    """A pool whose manifest stamped its files is scored without hashing a candidate (only the HRs); a rerun
    hashes nothing; a candidate rewritten since is hashed (and rescored), and the tables stay those of a fresh
    run."""
    from dp2osr.engine import score_store
    from dp2osr.engine.scoring import ScoreOptions, score_pool

    pool, images, seeds = _pool(tmp_path)
    pools.write_manifest(images, pool, seeds, MODEL)
    fresh = tmp_path / "fresh"
    shutil.copytree(pool, fresh)
    hashed = []
    real = score_store.ref_sha
    monkeypatch.setattr(score_store, "ref_sha", lambda p: hashed.append(Path(p).name) or real(p))
    opts = ScoreOptions(device="cpu")
    score_pool(pool, pool, TEST_METRICS, opts)
    assert sorted(hashed) == [f"img{i:02d}.png" for i in (0, 2, 3, 4)]  # the HRs, never hashed by `sample`
    hashed.clear()
    score_pool(pool, pool, TEST_METRICS, opts)
    assert hashed == []
    changed = pool / "img02" / "seed_0004.png"
    changed.write_bytes((pool / "img02" / "seed_0005.png").read_bytes())
    (fresh / "img02" / "seed_0004.png").write_bytes(changed.read_bytes())
    again = score_pool(pool, pool, TEST_METRICS, opts)
    assert hashed == ["seed_0004.png"]
    monkeypatch.setattr(score_store, "ref_sha", real)
    new = score_pool(fresh, tmp_path / "new", TEST_METRICS, opts)
    pd.testing.assert_frame_equal(again.scores, new.scores)
    pd.testing.assert_frame_equal(again.rewards.drop(columns="path"), new.rewards.drop(columns="path"))


def test_score_parts_hold_many_images(tmp_path, monkeypatch):
    from dp2osr.engine import score_store

    monkeypatch.setattr(score_store, "PART_IMAGES", 2)
    writer = score_store.PartWriter(tmp_path, rank=1)
    for i in range(5):
        writer.add(pd.DataFrame({"image_id": [f"x{i}"] * 2, "seed": [0, 1], "value": [i, i + 0.5]}))
    writer.close()
    parts = sorted(tmp_path.iterdir())
    assert len(parts) == 3 and all(score_store._PART_RE.fullmatch(p.name) and "-r1-" in p.name for p in parts)
    table = pd.concat([pd.read_parquet(p) for p in parts])
    assert sorted(table.image_id.unique()) == [f"x{i}" for i in range(5)] and len(table) == 10
