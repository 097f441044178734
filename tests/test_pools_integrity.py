"""Pools that know what they hold: content hashes in candidates.parquet, resume that re-makes stale or broken
candidates, scores keyed by candidate content."""

import io
import os
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


def test_resume_of_a_finished_pool_trusts_the_manifest(degraded, tmp_path, monkeypatch):
    """Rerunning `sample` on a finished pool decodes no candidate (the manifest's size and mtime still hold), and
    writes the same manifest; a file changed since (another size or mtime) is checked and re-made."""
    import dp2osr.engine.jobs as jobs_mod
    import dp2osr.engine.pools as pools_mod

    out = tmp_path / "pool"
    assert _sample(degraded, out) == 0
    before, table = _pngs(out), (out / "candidates.parquet").read_bytes()
    assert len(pools_mod.read_stamps(out)) == 6
    decoded = []
    real_current, real_text = jobs_mod.sample_is_current, pools_mod.read_png_text
    monkeypatch.setattr(jobs_mod, "sample_is_current", lambda p, *a: decoded.append(p) or real_current(p, *a))
    monkeypatch.setattr(pools_mod, "read_png_text", lambda p: decoded.append(p) or real_text(p))
    assert _sample(degraded, out) == 0
    assert decoded == [] and _pngs(out) == before
    assert (out / "candidates.parquet").read_bytes() == table
    # same bytes, but touched: decoded and found current (kept); truncated: decoded and re-made
    target, cut = out / "p0" / "seed_0001.png", out / "p1" / "seed_0000.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    cut.write_bytes(before["p1/seed_0000.png"][:100])
    assert _sample(degraded, out) == 0
    assert target in decoded and cut in decoded and _pngs(out) == before
    assert pd.read_parquet(out / "candidates.parquet").equals(pd.read_parquet(io.BytesIO(table)))
