"""`score` over several processes: the pool's images dealt to the processes, and what they found gathered.

Under `accelerate launch` / torchrun each process scores (and hashes) only the candidates of its images: the
pool's image IDs sorted, dealt round-robin (process ``r`` of ``w`` takes IDs ``r, r + w, ...``). Its scores go
to the per-image part files as in one process; its candidates' content hashes and the problems it met go to
``scores_parts/shards/RANK.parquet`` and ``RANK.errors.json``. After a barrier the main process reads the
shards back into the whole pool's table (the table one process would have hashed) and merges the parts into
the output tables (`dp2osr.engine.scoring.score_pool`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dp2osr.images import atomic_write, write_parquet

SHARDS_DIR = "shards"


def deal_images(pool: pd.DataFrame, rank: int, world: int) -> pd.DataFrame:
    """The rows of ``pool`` whose image is process ``rank``'s (of ``world``), index kept."""
    if world == 1:
        return pool
    ids = sorted(pool["image_id"].unique())
    return pool[pool["image_id"].isin(set(ids[rank::world]))]


def write_shard(folder: Path, rank: int, cands: pd.DataFrame, errors: dict[str, str]) -> None:
    """Keep this process's content hashes (by pool row) and problems for the main process."""
    folder.mkdir(parents=True, exist_ok=True)
    hashes = pd.DataFrame(
        {"row": cands.index.to_numpy(), "sha": cands["sha"].to_numpy(), "hr_sha": cands["hr_sha"].to_numpy()}
    )
    write_parquet(hashes, folder / f"{rank}.parquet")
    atomic_write(folder / f"{rank}.errors.json", lambda tmp: tmp.write_text(json.dumps(errors)))


def read_shards(folder: Path, world: int, pool: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """(``pool`` with every process's ``sha`` / ``hr_sha``, every process's problems), then the shards removed."""
    files = [folder / f"{rank}.parquet" for rank in range(world)]
    hashes = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).set_index("row")
    if len(hashes) != len(pool) or set(hashes.index) != set(pool.index):
        raise RuntimeError(
            f"the {world} processes' shards in {folder} hold {len(hashes)} candidate rows, not the pool's {len(pool)}"
        )
    cands = pool.assign(sha=hashes["sha"], hr_sha=hashes["hr_sha"])
    errors: dict[str, str] = {}
    for rank in range(world):
        errors.update(json.loads((folder / f"{rank}.errors.json").read_text()))
        (folder / f"{rank}.errors.json").unlink()
        files[rank].unlink()
    return cands, errors
