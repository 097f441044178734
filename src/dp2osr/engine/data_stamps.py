"""Which image files a training run read, and whether any of them changed since: one stat per file.

The training-data table names its images by path, and its content hash (``data_sha``) does not change when an
image is replaced in place at the same path. `record` writes, beside the run's stored inputs, the size and the
modification time (ns) of every distinct image the run reads; `first_changed` compares them with the files on
disk, so a stored input (`engine.frozen_store`) is re-encoded and a ``--resume`` refused when an image changed.
The check costs one ``stat`` per file, no read: about 5 s per million files on a local disk with a warm cache
(more on a network file system). A file rewritten with its old size and modification time both restored passes
unnoticed (as it does for make and rsync). It sits in the engine, below the frozen store and the trainer that call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from dp2osr.engine.pool_store import ref_stat
from dp2osr.images import write_parquet

FILE = "data_files.parquet"


def stamps(paths: Iterable[str]) -> pd.DataFrame:
    """``path``, ``size``, ``mtime_ns`` of each distinct path in ``paths`` (sorted); -1 for a missing file."""
    names = sorted(set(paths))
    return pd.DataFrame([(p, *_stat(p)) for p in names], columns=["path", "size", "mtime_ns"]).astype(
        {"path": "str", "size": "int64", "mtime_ns": "int64"}
    )


def _stat(path: str) -> tuple[int, int]:
    found = ref_stat(path)  # a shard member: its size and its shard's mtime
    return (-1, -1) if found is None else found


def record(table: pd.DataFrame, folder: Path) -> None:
    """Write ``table`` (from `stamps`) as ``folder/data_files.parquet``, atomically."""
    write_parquet(table, Path(folder) / FILE)


def first_changed(folder: Path) -> str | None:
    """The first file recorded in ``folder/data_files.parquet`` whose size or modification time differs now
    (or that is gone); None when none did or nothing was recorded."""
    try:
        table = pd.read_parquet(Path(folder) / FILE)
    except (OSError, ValueError):
        return None
    for path, size, mtime in zip(table.path, table["size"], table.mtime_ns):
        if _stat(path) != (size, mtime):
            return str(path)
    return None


def example_paths(ex) -> list[str]:
    """Every image path of the training examples ``ex`` (`train_data.Examples`): targets and LR."""
    return [p for paths in ex.images for p in paths] + list(ex.lr)
