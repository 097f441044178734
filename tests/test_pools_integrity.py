"""Pools that know what they hold: content hashes in candidates.parquet, resume that re-makes stale or broken
candidates, scores keyed by candidate content."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dp2osr import tables
from dp2osr.cli import main
from dp2osr.paths import file_sha

SAMPLE = ["--backbone", "sd2-tiny", "--steps", "1", "--samples", "3", "--batch-size", "2"]


def _png(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def degraded(tmp_path):
    """A `dp2osr degrade` folder of two 64 px HR photos (16 px LR)."""
    for i in range(2):
        _png(tmp_path / "photos" / f"p{i}.png", 80, i)
    out = tmp_path / "deg"
    assert (
        main(
            [
                "degrade",
                "--input",
                str(tmp_path / "photos"),
                "--output",
                str(out),
                "--hr-size",
                "64",
                "--crop",
                "center",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    return out


def _sample(src: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--input", str(src), "--output", str(out), *SAMPLE, *extra])


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("seed_*.png"))}


def test_manifest_records_content_hashes(degraded, tmp_path):
    out = tmp_path / "pool"
    assert _sample(degraded, out) == 0
    df, _ = tables.read(tables.CANDIDATES, out)  # paths absolute
    assert {"sha", "lr_sha", "hr_sha", "options_sha"} <= set(df.columns)
    for r in df.itertuples():
        assert r.sha == file_sha(Path(r.path))
        assert r.lr_sha == file_sha(Path(r.lr_path))
        assert r.hr_sha == file_sha(Path(r.hr_path))
    assert df.options_sha.nunique() == 1 and len(df.options_sha[0]) == 64
    other = tmp_path / "pool2"
    assert _sample(degraded, other, "--guidance", "2") == 0
    assert pd.read_parquet(other / "candidates.parquet").options_sha[0] != df.options_sha[0]


def test_broken_candidates_are_remade(degraded, tmp_path):
    """A zero-byte, a truncated and a non-PNG candidate are re-made on resume, never kept."""
    out = tmp_path / "pool"
    assert _sample(degraded, out) == 0
    before = _pngs(out)
    (out / "p0" / "seed_0000.png").write_bytes(b"")
    data = before["p0/seed_0002.png"]
    (out / "p0" / "seed_0002.png").write_bytes(data[: len(data) // 2])
    (out / "p1" / "seed_0001.png").write_bytes(b"GIF89a not a png")
    assert _sample(degraded, out) == 0
    assert _pngs(out) == before
    df = pd.read_parquet(out / "candidates.parquet")
    assert all(r.sha == file_sha(out / r.path) for r in df.itertuples())


def test_candidate_without_record_is_remade(degraded, tmp_path):
    """A decodable PNG that does not record what it was made from (an older pool, a copied file) is re-made."""
    out = tmp_path / "pool"
    assert _sample(degraded, out) == 0
    before = _pngs(out)
    Image.open(out / "p1" / "seed_0002.png").save(out / "p1" / "seed_0002.png")  # same pixels, no record
    assert _sample(degraded, out) == 0
    assert _pngs(out) == before


def test_changed_lr_remakes_the_pool(degraded, tmp_path):
    """After `degrade --overwrite` with another seed, resuming `sample` re-makes every stale candidate: the pool
    equals a fresh one sampled from the new LR/HR."""
    out = tmp_path / "pool"
    assert _sample(degraded, out) == 0
    old = _pngs(out)
    old_lr = file_sha(degraded / "lr" / "p0.png")
    assert (
        main(
            [
                "degrade",
                "--input",
                str(tmp_path / "photos"),
                "--output",
                str(degraded),
                "--hr-size",
                "64",
                "--crop",
                "center",
                "--seed",
                "7",
                "--overwrite",
            ]
        )
        == 0
    )
    assert file_sha(degraded / "lr" / "p0.png") != old_lr
    assert _sample(degraded, out) == 0
    fresh = tmp_path / "fresh"
    assert _sample(degraded, fresh) == 0
    assert _pngs(out) == _pngs(fresh)
    assert all(_pngs(out)[k] != old[k] for k in old)
    a = pd.read_parquet(out / "candidates.parquet").drop(columns=["backbone", "base", "controlnet"])
    b = pd.read_parquet(fresh / "candidates.parquet").drop(columns=["backbone", "base", "controlnet"])
    pd.testing.assert_frame_equal(a, b)


def _score(pool: Path, out: Path | None = None) -> int:
    extra = ["--output", str(out)] if out is not None else []
    return main(
        ["score", "--candidates", str(pool), "--metrics", "psnr", "gmsd", "piqe", "--device", "cpu", *extra]
    )


def test_score_follows_resampled_candidates(degraded, tmp_path):
    """`score` after `sample --overwrite` with other options equals a fresh scoring of the new pool."""
    pool = tmp_path / "pool"
    assert _sample(degraded, pool) == 0 and _score(pool) == 0
    first = pd.read_parquet(pool / "rewards.parquet")
    assert _sample(degraded, pool, "--overwrite", "--guidance", "4") == 0  # same paths, other pixels
    assert _score(pool) == 0
    assert _score(pool, tmp_path / "fresh") == 0
    for name in ("scores.parquet", "rewards.parquet"):
        again = pd.read_parquet(pool / name)
        fresh = pd.read_parquet(tmp_path / "fresh" / name)
        if "path" in fresh:
            fresh["path"] = again["path"]  # relative to another folder
        pd.testing.assert_frame_equal(again, fresh)
    assert not np.allclose(first["reward"], pd.read_parquet(pool / "rewards.parquet")["reward"])


def test_score_follows_a_replaced_hr(degraded, tmp_path):
    """An HR replaced after scoring: FR scores are redone against the new HR, NR scores kept."""
    pool = tmp_path / "pool"
    assert _sample(degraded, pool) == 0 and _score(pool) == 0
    _png(degraded / "hr" / "p0.png", 64, 99)
    assert _score(pool) == 0 and _score(pool, tmp_path / "fresh") == 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(pool / "scores.parquet"), pd.read_parquet(tmp_path / "fresh" / "scores.parquet")
    )
