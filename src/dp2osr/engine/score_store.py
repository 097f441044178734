"""What `score` keeps between runs in ``OUT/scores_parts/``: the part files of finished scores, the merged file,
and the stamps of the files it hashed.

Each process writes its finished scores in part files of many images (`PartWriter`: one every
``PART_IMAGES`` images or ``PART_SECONDS`` seconds, so a killed run loses at most that much); the scorer
(`dp2osr.engine.scoring`) folds them into ``_merged.parquet`` at the end of a run. Scores are keyed by the
content hashes of the candidate and its HR (`content_hashes`); a file is hashed once and its (size, mtime,
SHA-256) kept in ``_stamps.parquet`` (each process's new stamps in ``_stamps.RANK.parquet`` until the main
process folds them in), so a rerun hashes only the files whose size or mtime changed. The pool's own stamps
(`dp2osr.engine.pools.STAMPS_FILE`, the hashes `sample` took when it wrote the files) are trusted the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pandas as pd

from dp2osr.engine.pool_store import ref_sha, ref_stat
from dp2osr.engine.pools import STAMPS_FILE as POOL_STAMPS
from dp2osr.images import write_parquet

PARTS_DIR = "scores_parts"
MERGED_PART = "_merged.parquet"
STAMPS = "_stamps.parquet"
PART_COLUMNS = ["image_id", "seed", "metric", "value", "path", "sha", "ref_sha", "dither"]
PART_IMAGES = 256  # a part file per this many images ...
PART_SECONDS = 60.0  # ... or per this many seconds of scoring, whichever comes first

# The part files the scorer writes; it reads and deletes no other file in PARTS_DIR.
_PART_RE = re.compile(r"[A-Za-z0-9._-]{0,60}-[0-9a-f]{12}\.parquet")
_STAMP_RE = re.compile(r"_stamps\.[0-9]+\.parquet")
_STAMP_COLUMNS = ["path", "size", "mtime_ns", "sha"]


def part_dtypes() -> list[str]:
    return ["object", "int64", "object", "float64", "object", "object", "object", "int64"]


def read_parts(parts_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """Every stored score (merged file, then the parts, oldest first; later rows win) and the parts."""
    frames = []
    merged = parts_dir / MERGED_PART
    if merged.is_file():
        frames.append(pd.read_parquet(merged))
    parts = sorted(
        (
            p
            for p in parts_dir.glob("*.parquet")
            if _PART_RE.fullmatch(p.name) and not p.name.startswith(".tmp_")
        ),
        key=lambda p: (p.stat().st_mtime_ns, p.name),
    )
    frames += [pd.read_parquet(p) for p in parts]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(PART_COLUMNS, part_dtypes())}), parts
    table = pd.concat(frames, ignore_index=True)
    for col in ("sha", "ref_sha"):  # parts written before scores were keyed by content: never matched
        table[col] = table[col].fillna("") if col in table else ""
    table["dither"] = (
        table["dither"].fillna(0).astype("int64") if "dither" in table else 0
    )  # older parts: plain
    keys = [c for c in PART_COLUMNS if c != "value"]
    table = table[PART_COLUMNS].drop_duplicates(keys, keep="last").reset_index(drop=True)
    return table, parts


class PartWriter:
    """Collects one process's finished scores and writes them as a part file every ``PART_IMAGES`` images or
    ``PART_SECONDS`` seconds (and at `close`); each part has a name no other part ever had."""

    def __init__(self, parts_dir: Path, rank: int = 0) -> None:
        self.parts_dir, self.rank = parts_dir, rank
        self.frames: list[pd.DataFrame] = []
        self.images = 0
        self.since = time.monotonic()

    def add(self, part: pd.DataFrame) -> None:
        """The scores of one finished image (or (image, metrics) stack)."""
        if len(part):
            self.frames.append(part)
        self.images += 1
        if self.images >= PART_IMAGES or time.monotonic() - self.since >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.frames:
            first = str(self.frames[0]["image_id"].iloc[0])
            unique = f"{self.rank}\0{os.getpid()}\0{time.time_ns()}\0{first}".encode()
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", first)[:40]
            name = f"{safe}-r{self.rank}-{hashlib.sha1(unique).hexdigest()[:12]}.parquet"
            write_parquet(pd.concat(self.frames, ignore_index=True), self.parts_dir / name)
        self.frames, self.images, self.since = [], 0, time.monotonic()

    close = flush


# ------------------------------------------------------------------------------------------ hashes
def _stat(path: str) -> tuple[int, int] | None:
    return ref_stat(path)  # a file's, or a shard member's (engine.pool_store)


def _read_stamp_files(files: list[Path]) -> dict[str, tuple]:
    stamps: dict[str, tuple] = {}
    for f in files:
        try:
            df = pd.read_parquet(f, columns=_STAMP_COLUMNS)
        except (OSError, ValueError, KeyError):
            continue
        stamps.update((p, rest) for p, *rest in df.itertuples(index=False, name=None))
    return stamps


def known_hashes(parts_dir: Path, cand_dir: Path) -> dict[str, tuple]:
    """``{absolute path: (size, mtime_ns, sha)}`` of every file hashed before: by `sample` (the pool's stamps)
    and by earlier `score` runs into ``parts_dir``."""
    base = os.path.abspath(cand_dir)
    pool = _read_stamp_files([Path(cand_dir) / POOL_STAMPS])
    known = {
        os.path.normpath(os.path.join(base, p)): (size, mtime, sha) for p, (size, mtime, sha) in pool.items()
    }
    own = sorted(p for p in parts_dir.glob("_stamps.*.parquet") if _STAMP_RE.fullmatch(p.name))
    known.update(_read_stamp_files([parts_dir / STAMPS, *own]))
    return known


def _sha(path: str, known: dict[str, tuple], new: list[tuple]) -> str:
    """The file's SHA-256 (trusted from ``known`` while its size and mtime are those recorded; otherwise
    hashed, the stamp added to ``new``), or a marker that matches no stored score when it cannot be read."""
    if not path:
        return ""
    stat = _stat(path)
    if stat is None:
        return "unreadable"
    stamp = known.get(path)
    if stamp is not None and tuple(stamp[:2]) == stat:
        return stamp[2]
    try:
        sha = ref_sha(path)
    except (OSError, ValueError):
        return "unreadable"
    new.append((path, *stat, sha))
    return sha


def content_hashes(cands: pd.DataFrame, parts_dir: Path, cand_dir: Path, rank: int = 0) -> pd.DataFrame:
    """``cands`` with ``sha`` and ``hr_sha``, the content of the files now on disk: a file whose size and mtime
    are those recorded when it was last hashed (`known_hashes`) is not read again; the others are hashed and
    their stamps kept in ``_stamps.RANK.parquet`` for the main process to fold in (`fold_stamps`)."""
    known = known_hashes(parts_dir, cand_dir) if len(cands) else {}
    new: list[tuple] = []
    hr = {p: _sha(p, known, new) for p in cands["hr_path"].unique()}
    shas = pd.Series([_sha(p, known, new) for p in cands["abs_path"]], index=cands.index, dtype=object)
    if new:
        write_parquet(pd.DataFrame(new, columns=_STAMP_COLUMNS), parts_dir / f"_stamps.{rank}.parquet")
    return cands.assign(sha=shas, hr_sha=cands["hr_path"].map(hr).astype(object))  # object when empty too


def fold_stamps(parts_dir: Path) -> None:
    """Fold every process's new stamps into ``_stamps.parquet`` (the main process, after a barrier)."""
    own = sorted(p for p in parts_dir.glob("_stamps.*.parquet") if _STAMP_RE.fullmatch(p.name))
    if not own:
        return
    stamps = _read_stamp_files([parts_dir / STAMPS, *own])
    rows = [(p, *rest) for p, rest in stamps.items()]
    write_parquet(pd.DataFrame(rows, columns=_STAMP_COLUMNS), parts_dir / STAMPS)
    for p in own:
        p.unlink(missing_ok=True)
