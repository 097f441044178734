"""What keeps working at the paper's scale: the keyed data order (O(1) per example) and `score` sharded over
processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_score import TEST_METRICS, make_pool

from dp2osr.engine.score_shards import deal_images
from dp2osr.engine.train_data import KEYED_ORDER_ABOVE, batch_indices, epoch_position
from dp2osr.math.permutation import permuted

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097])
def test_keyed_permutation_is_a_permutation(n):
    for key in ("0:0", "0:1", "5:0"):
        assert sorted(permuted(i, n, key) for i in range(n)) == list(range(n))


def test_keyed_permutation_is_deterministic_and_differs_per_key():
    n = 1000
    a = [permuted(i, n, "3:0") for i in range(n)]
    assert a == [permuted(i, n, "3:0") for i in range(n)]
    assert a != list(range(n))
    assert a != [permuted(i, n, "3:1") for i in range(n)]  # another epoch
    assert a != [permuted(i, n, "4:0") for i in range(n)]  # another seed
    with pytest.raises(ValueError, match="outside range"):
        permuted(n, n, "3:0")


def test_large_pools_use_the_keyed_order_small_ones_the_seeded_randperm():
    big = KEYED_ORDER_ABOVE + 3
    assert [epoch_position(big, 2, 1, i) for i in range(20)] == [permuted(i, big, "2:1") for i in range(20)]
    assert [epoch_position(big, 2, 1, i) for i in range(20)] != [
        epoch_position(big, 2, 2, i) for i in range(20)
    ]


def test_keyed_order_slices_are_disjoint_and_cover_each_epoch():
    """Above the threshold the (step, micro, rank) slices still cut one stream of whole epoch permutations:
    every example once per epoch, no index twice in a step, the same indices whatever order they are asked in."""
    n, seed, batch, accum, world = KEYED_ORDER_ABOVE + 11, 7, 64, 4, 4
    per_step = batch * accum * world
    steps = -(-2 * n // per_step)  # a little over two epochs

    def step_indices(step):
        return [
            i
            for micro in range(accum)
            for rank in range(world)
            for i in batch_indices(n, step, micro, rank, batch, accum, world, seed)
        ]

    stream = [i for step in range(steps) for i in step_indices(step)]
    for step in range(steps):
        assert len(set(stream[step * per_step : (step + 1) * per_step])) == per_step
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n : 2 * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]
    # a resumed run asks for step 5 alone and gets what the uninterrupted run got
    assert step_indices(5) == stream[5 * per_step : 6 * per_step]
    # another seed, another order
    assert batch_indices(n, 0, 0, 0, batch, accum, world, seed + 1) != stream[:batch]


def test_images_are_dealt_round_robin_by_sorted_id():
    pool = pd.DataFrame({"image_id": ["c", "a", "b", "a", "c", "d"], "seed": range(6)})
    shards = [deal_images(pool, rank, 2) for rank in range(2)]
    assert [sorted(set(s.image_id)) for s in shards] == [["a", "c"], ["b", "d"]]
    assert sorted(i for s in shards for i in s.index) == list(range(6))  # every row once, pool index kept
    assert deal_images(pool, 0, 1) is pool


def _score_cli(*args):
    return ["-m", "dp2osr", "score", *args, "--metrics", *TEST_METRICS, "--device", "cpu"]


@pytest.mark.slow
def test_two_processes_score_each_image_once_and_write_one_process_tables(tmp_path):
    """3 images (one without HR, one with an unreadable candidate) over 2 processes: the same tables as one
    process, each score computed by one process only, and the main process reports the other's problem."""
    pool = make_pool(tmp_path, n_images=3, seeds=(0, 1, 2), no_hr=("img00",))
    (pool / "img01" / "seed_0002.png").write_bytes(b"not a png")  # img01 is process 1's
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, *_score_cli("--candidates", str(pool), "--output", str(one))],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 1, single.stderr[-2000:]  # PartialFailure: the unreadable candidate
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    multi = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--standalone",
            *_score_cli("--candidates", str(pool), "--output", str(two)),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert multi.returncode != 0  # the same PartialFailure
    # process 1 reports its problem, and process 0 (which met none) reports it too: gathered
    assert multi.stderr.count("1 problem(s)") == 2, multi.stderr[-3000:]
    counts = [int(line.split()[1]) for line in multi.stderr.splitlines() if " score(s) in " in line]
    assert len(counts) == 2 and sum(counts) == int(
        next(line.split()[1] for line in single.stderr.splitlines() if " score(s) in " in line)
    )
    for name in ("scores.parquet", "rewards.parquet"):
        a, b = pd.read_parquet(one / name), pd.read_parquet(two / name)
        pd.testing.assert_frame_equal(a, b, rtol=1e-6)
        assert pq.read_metadata(one / name).metadata == pq.read_metadata(two / name).metadata
    scores = pd.read_parquet(two / "scores.parquet")
    assert not scores.duplicated(["image_id", "seed", "metric"]).any()
    assert len(pd.read_parquet(two / "rewards.parquet")) == 8
    assert not list((two / "scores_parts" / "shards").iterdir())  # the shards were folded in


class _FakeState:
    """A process of ``world`` whose barriers are no-ops: the ranks run one after another, the main one last."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self) -> None:
        pass


def test_more_processes_than_images_give_one_process_tables(tmp_path):
    """4 processes, 3 images: one process has nothing to score; the main process's tables equal one process's."""
    from dp2osr.engine.scoring import ScoreOptions, score_pool

    pool = make_pool(tmp_path, n_images=3, seeds=(0, 1))
    opts = ScoreOptions(device="cpu")
    one = score_pool(pool, tmp_path / "one", TEST_METRICS, opts)
    for rank in (3, 2, 1, 0):
        got = score_pool(pool, tmp_path / "four", TEST_METRICS, opts, state=_FakeState(rank, 4))
        if rank:
            assert got.scores.empty and not got.errors
    pd.testing.assert_frame_equal(got.scores, one.scores)
    pd.testing.assert_frame_equal(got.rewards, one.rewards)
    for name in ("scores.parquet", "rewards.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "one" / name), pd.read_parquet(tmp_path / "four" / name)
        )
