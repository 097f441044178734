"""Candidate pools on disk: the inputs of `sample`, its ``candidates.parquet`` manifest, and reading it back.

A pool is a folder of ``ID/seed_XXXX.png`` candidates (or of tar shards holding them: `engine.pool_store`) plus ``candidates.parquet`` (schema in
docs/ARCHITECTURE.md) and its stamps (each file's size and mtime when it was hashed, which a rerun trusts);
``sample``, ``score``, ``curve`` and the quickstart read and write pools through these functions only.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd
import torch

from dp2osr import tables
from dp2osr.backbones import Backbone
from dp2osr.engine.jobs import Job, JobsResult, chunk_jobs, run_jobs
from dp2osr.engine.options import SamplingOptions
from dp2osr.engine.provenance import LR_SHA_KEY, OPTIONS_SHA_KEY
from dp2osr.engine.shard_pool import ShardedPool
from dp2osr.images import list_images, read_png_text, write_parquet
from dp2osr.paths import check_name, file_sha

CANDIDATES_FILE = tables.CANDIDATES.filename


def read_candidates(folder: Path) -> pd.DataFrame:
    """``candidates.parquet`` of the pool in ``folder``: ``abs_path`` the candidate's absolute path, ``path`` as
    stored (relative to the pool), ``lr_path`` / ``hr_path`` absolute (``hr_path`` empty without an HR)."""
    return read_pool(folder)[0]


def read_pool(folder: Path) -> tuple[pd.DataFrame, dict]:
    """`read_candidates` and the pool's table metadata (e.g. the ``pair_ratio`` of the model that sampled it),
    from one read of the table."""
    table, meta = tables.read(tables.CANDIDATES, Path(folder))
    table["abs_path"] = table["path"]
    base = os.path.abspath(folder)
    table["path"] = [os.path.relpath(p, base) for p in table["abs_path"]]
    return table, meta


def candidates_dir(path: Path) -> Path:
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return path.parent
    if not (path / CANDIDATES_FILE).is_file():
        raise FileNotFoundError(f"no {CANDIDATES_FILE} in {path} (give the output folder of `sample`)")
    return path


CANDIDATE_COLUMNS = [*tables.CANDIDATES.columns, *tables.CANDIDATES.optional]


def read_inputs(folder: Path, limit: int | None = None) -> pd.DataFrame:
    """(image_id, lr_path, hr_path) with absolute paths, from pairs.parquet or a plain folder of LR images (ID:
    the file's stem); an ID that is not a plain file name is refused naming its row or file."""
    folder = Path(folder)
    if (folder / tables.PAIRS.filename).is_file():
        df, _ = tables.read(tables.PAIRS, folder)
        df = df[["image_id", "lr_path", "hr_path"]]
    else:
        files = list_images(folder)
        for p in files:
            check_name(p.stem, f"{p}: image ID")
        df = pd.DataFrame(
            {
                "image_id": [p.stem for p in files],
                "lr_path": [os.path.abspath(p) for p in files],
                "hr_path": "",
            }
        )
        if df.image_id.duplicated().any():
            raise ValueError(f"{folder}: duplicate image IDs {sorted(df.image_id[df.image_id.duplicated()])}")
    df = df.sort_values("image_id").reset_index(drop=True)
    return df.head(limit) if limit else df


def candidate_path(image_id: str, seed: int) -> str:
    return f"{image_id}/seed_{seed:04d}.png"


def _hr_sha(hr_path: str) -> str:
    return file_sha(Path(hr_path)) if hr_path and Path(hr_path).is_file() else ""


STAMPS_FILE = ".candidates_stamps.parquet"  # beside candidates.parquet: what each file was when hashed
_STAMP_COLUMNS = ["path", "size", "mtime_ns", "lr_sha", "options_sha", "sha"]


def read_stamps(out: Path) -> dict[str, tuple]:
    """``{str(out / path): (size, mtime_ns, lr_sha, options_sha, sha)}`` as the last manifest of the pool ``out``
    recorded them (empty when there is none or it cannot be read)."""
    try:
        df = pd.read_parquet(Path(out) / STAMPS_FILE, columns=_STAMP_COLUMNS)
    except (OSError, ValueError, KeyError):
        return {}
    base, rels = str(Path(out)), df["path"].tolist()
    # str(Path(out) / p) is out + "/" + p for the plain relative paths a manifest writes (built as text:
    # Path objects cost seconds per 10^6 stamps); any other path is joined by pathlib.
    odd = df["path"].str.contains(r"(?:^|/)\.?(?:/|$)", regex=True).to_numpy() | (base == "/")
    keys = [str(Path(out) / p) if o else f"{base}/{p}" for p, o in zip(rels, odd)]
    values = zip(*[df[c].tolist() for c in _STAMP_COLUMNS[1:]])
    return {k: list(v) for k, v in zip(keys, values)}


def _file_record(path: Path, stamps: dict[str, tuple]) -> tuple | None:
    """(size, mtime_ns, lr_sha, options_sha, sha) of a candidate file: taken from ``stamps`` while its size and
    mtime are those recorded, else read from the file (its PNG record, its hash); None when it is missing or
    does not decode."""
    try:
        st = path.stat()
    except OSError:
        return None
    known = stamps.get(str(path))
    if known is not None and tuple(known[:2]) == (st.st_size, st.st_mtime_ns):
        return tuple(known)
    record = read_png_text(path)
    if record is None:
        return None
    lr_sha, opt_sha = record.get(LR_SHA_KEY, ""), record.get(OPTIONS_SHA_KEY, "")
    return st.st_size, st.st_mtime_ns, lr_sha, opt_sha, file_sha(path)


_RECORD_COLUMNS = ["order", "image_id", "seed", "rel", "size", "mtime_ns", "lr_sha", "options_sha", "sha"]
_INFO_COLUMNS = ["image_id", "prompt", "hr_sha"]
PARTS_DIR = ".manifest_parts"  # each process's part of the manifest while a multi-process run writes it


def manifest_records(
    images: pd.DataFrame,
    out: Path,
    seeds: list[int],
    jobs: list[Job],
    stamps: dict[str, tuple],
    store: ShardedPool | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """(the file records of the candidates of ``jobs``, the candidates missing or undecodable): what one process
    knows of the files it wrote or checked, each record trusted from ``stamps`` while its size and mtime are
    those recorded (`_file_record`); with ``store`` (the shards layout) the records of its members, ``rel``
    their references. ``order`` is the row's place in the manifest: image, then seed."""
    place = {image_id: k * len(seeds) for k, image_id in enumerate(images.image_id)}
    seed_pos = {s: k for k, s in enumerate(seeds)}
    rows, missing = [], []
    for job in jobs:
        for s in job.seeds:
            rel = candidate_path(job.image_id, s)
            if store is not None:
                ref, found = store.record(rel) or (rel, None)
            else:
                ref, found = rel, _file_record(out / rel, stamps)
            if found is None:
                missing.append(rel)
            else:
                rows.append((place[job.image_id] + seed_pos[s], job.image_id, s, ref, *found))
    return pd.DataFrame(rows, columns=_RECORD_COLUMNS), missing


def image_info(images: pd.DataFrame, out: Path, store: ShardedPool | None = None) -> pd.DataFrame:
    """(image_id, prompt, hr_sha) of ``images``: the prompt the pool recorded (``ID/prompt.txt``, a file or,
    with ``store``, a shard member) and the HR's content hash."""
    rows = []
    prompts = store.prompts() if store is not None else None
    for row in images.itertuples():
        prompt_file = out / row.image_id / "prompt.txt"
        if prompts is not None:
            prompt = prompts.get(row.image_id, "")
        else:
            prompt = prompt_file.read_text().strip() if prompt_file.is_file() else ""
        rows.append((row.image_id, prompt, _hr_sha(row.hr_path)))
    return pd.DataFrame(rows, columns=_INFO_COLUMNS)


def combine_manifest(
    images: pd.DataFrame,
    out: Path,
    records: pd.DataFrame,
    info: pd.DataFrame,
    model: dict[str, str],
    meta: dict | None = None,
) -> pd.DataFrame:
    """Write candidates.parquet and ``STAMPS_FILE`` from the processes' `manifest_records` and `image_info`
    (concatenated, any order) for the images of ``images``; no file of the pool is read."""
    records = records[records.image_id.isin(set(images.image_id))].sort_values("order", kind="stable")
    by_id = images.set_index("image_id")
    extra = info.drop_duplicates("image_id").set_index("image_id")
    ids = records["image_id"].tolist()
    base = str(out)
    rows = list(
        zip(
            ids,
            records["seed"].tolist(),
            [f"{base}/{rel}" for rel in records["rel"].tolist()],
            by_id["lr_path"].reindex(ids).tolist(),
            by_id["hr_path"].reindex(ids).tolist(),
            *[[model[k]] * len(ids) for k in ("backbone", "base", "controlnet")],
            extra["prompt"].reindex(ids).tolist(),
            records["sha"].tolist(),
            records["lr_sha"].tolist(),
            extra["hr_sha"].reindex(ids).tolist(),
            records["options_sha"].tolist(),
        )
    )
    df = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS).astype({"seed": "int64"})
    tables.write(tables.CANDIDATES, df, out, meta)
    stamps = list(zip(*[records[c].tolist() for c in ["rel", *_STAMP_COLUMNS[1:]]]))
    write_parquet(pd.DataFrame(stamps, columns=_STAMP_COLUMNS), out / STAMPS_FILE)
    return df


def _missing_error(missing: list[str]) -> RuntimeError:
    return RuntimeError(
        f"{len(missing)} candidates missing after sampling (e.g. {missing[:3]}); rerun to finish"
    )


def write_manifest(
    images: pd.DataFrame, out: Path, seeds: list[int], model: dict[str, str], meta: dict | None = None
) -> pd.DataFrame:
    """candidates.parquet listing every (image, seed) with the model, the content hashes of the candidate, of
    the LR and options it records it was made from, and of the HR (``meta``: the table's metadata); errors if
    any candidate is missing or undecodable. Each file's size and mtime go to ``STAMPS_FILE`` with its hashes,
    and a file whose size and mtime are still those recorded there is not decoded and hashed again. One
    process; `sample_pool` splits the same work over the processes of a launch."""
    jobs = chunk_jobs(list(zip(images.image_id, images.lr_path)), seeds, max(len(seeds), 1))
    records, missing = manifest_records(images, out, seeds, jobs, read_stamps(out))
    if missing:
        raise _missing_error(missing)
    return combine_manifest(images, out, records, image_info(images, out), model, meta)


def state_gather(state, items):
    """Every process's ``items`` (any picklable value), in process order, after a barrier; one process: just
    ``[items]``."""
    state.wait_for_everyone()
    if state.num_processes == 1:
        return [items]
    import torch.distributed as dist

    gathered: list = [None] * state.num_processes
    dist.all_gather_object(gathered, items)
    return gathered


def sample_pool(
    bb: Backbone,
    images: pd.DataFrame,
    out: Path,
    seeds: list[int],
    opts: SamplingOptions,
    *,
    model: dict[str, str],
    upscale: int = 4,
    overwrite: bool = False,
    controlnet: torch.nn.Module | None = None,
    state=None,
    desc: str = "sample",
    layout: str = "files",
) -> tuple[JobsResult, set[str]]:
    """Sample ``seeds`` for every image of ``images`` (`read_inputs`) into the pool ``out`` and write its manifest.

    ``controlnet`` replaces the backbone's own for this pool (a checkpoint being evaluated). With ``state``
    (accelerate's ``PartialState`` or ``Accelerator``) the (image, seed chunk) jobs are dealt round-robin to the
    processes; each process records the files of its own jobs (size, mtime, hashes: `manifest_records`) and the
    prompt and HR hash of every ``world``-th image into ``PARTS_DIR``, and the main process only concatenates
    the parts into ``candidates.parquet`` (the bytes one process writes); images that could not be read are
    left out of it. A candidate that the last manifest recorded, with its size and mtime unchanged since, is
    trusted without being decoded (``STAMPS_FILE``). ``layout`` ``shards`` keeps the candidates in tar shards
    (`engine.shard_pool`, `engine.pool_store`) instead of ``ID/seed_XXXX.png`` files. Returns (this process's `JobsResult`, the failed image
    IDs of every process).
    """
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    jobs = chunk_jobs(list(zip(images.image_id, images.lr_path)), seeds, opts.batch_size)[rank::world]
    stamps = read_stamps(out)
    store = ShardedPool(out, rank, stamps) if layout == "shards" else None
    old = bb.controlnet
    bb.controlnet = controlnet if controlnet is not None else old
    try:
        with torch.no_grad():
            result = run_jobs(
                bb,
                jobs,
                out,
                opts,
                upscale=upscale,
                overwrite=overwrite,
                desc=desc,
                show_progress=rank == 0,
                model=model,
                stamps=stamps,
                store=store,
            )
    finally:
        bb.controlnet = old
        if store is not None:
            store.close()
    failed = set(result.failed)
    records, missing = manifest_records(
        images, out, seeds, [j for j in jobs if j.image_id not in failed], stamps, store
    )
    if state is not None:
        gathered = state_gather(state, (failed, missing))
        failed = set().union(*(f for f, _ in gathered))
        missing = [m for _, ms in gathered for m in ms if m.split("/")[0] not in failed]
    if missing:
        raise _missing_error(missing)
    done = images[~images.image_id.isin(failed)].reset_index(drop=True)
    info = image_info(done.iloc[rank::world], out, store)  # after the barrier: every prompt file is written
    meta = {"pair_ratio": bb.pair_ratio}
    if world == 1:
        combine_manifest(done, out, records, info, model, meta)
    else:
        _write_part(state, out, records, info)
        if rank == 0:
            combine_manifest(done, out, *_read_parts(out, world), model, meta)
        state.wait_for_everyone()
    return result, failed


def _write_part(state, out: Path, records: pd.DataFrame, info: pd.DataFrame) -> None:
    """This process's manifest part, for the main process to combine (after a barrier)."""
    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    write_parquet(records, parts / f"{state.process_index}.records.parquet")
    write_parquet(info, parts / f"{state.process_index}.images.parquet")
    state.wait_for_everyone()


def _read_parts(out: Path, world: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every process's records, every process's image info), the parts then removed."""
    parts = out / PARTS_DIR
    frames = {
        kind: pd.concat(
            [pd.read_parquet(parts / f"{r}.{kind}.parquet") for r in range(world)], ignore_index=True
        )
        for kind in ("records", "images")
    }
    for r in range(world):
        for kind in ("records", "images"):
            (parts / f"{r}.{kind}.parquet").unlink()
    with contextlib.suppress(OSError):
        parts.rmdir()
    return frames["records"], frames["images"]
