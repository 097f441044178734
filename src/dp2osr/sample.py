"""`dp2osr sample`: M seeded SR candidates per LR image — the preference pool's raw material (METHOD.md §2.2).

Candidate k of an image uses seed ``seed + k`` and is written atomically to ``OUTPUT/ID/seed_XXXX.png``; a
rerun skips finished files, so a killed job resumes to exactly the pool an uninterrupted one makes. Under
``accelerate launch`` the (image, seed-chunk) work items are dealt round-robin to the processes, and the main
process writes ``candidates.parquet`` once all are done.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from dp2osr.backbones import Backbone
from dp2osr.config import check_resume, field, save_config
from dp2osr.images import ImageReadError, check_min_side, list_images, load_image, save_image, write_parquet
from dp2osr.prompts import make_prompt_fn
from dp2osr.sampling import (
    SamplingOptions,
    load_model,
    resize,
    resolve_device,
    sampling_settings,
    super_resolve,
)

CONFIG_NAME = "sample_config.yaml"
CANDIDATE_COLUMNS = ["image_id", "seed", "path", "lr_path", "hr_path", "model", "prompt"]
_RUN_ONLY = {"input", "output", "device", "batch_size", "tile_batch", "overwrite", "limit"}


@dataclass(kw_only=True)
class SampleConfig(SamplingOptions):
    """Sample M seeded SR candidates for every LR image (resumable, shardable with accelerate launch).

    INPUT is a `dp2osr degrade` folder (pairs.parquet: LR with its HR) or a folder of LR images (no HR:
    only no-reference metrics can score those). Writes OUTPUT/ID/seed_XXXX.png, OUTPUT/candidates.parquet and
    OUTPUT/sample_config.yaml. Rerun the same command to resume.
    """

    input: Path = field(help="a `dp2osr degrade` output folder (with pairs.parquet) or a folder of LR images")
    output: Path = field(help="output folder of the candidate pool")
    samples: int = field(64, help="candidates per image (M; paper: 64); candidate k uses seed SEED+k")
    seed: int = field(0, help="seed of the first candidate")
    upscale: int = field(4, help="LR -> output scale factor (1 if the LR is already upsampled)")
    limit: int | None = field(None, help="use only the first N images (sorted by ID)")
    overwrite: bool = field(False, help="resample existing candidates (default: keep them, i.e. resume)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")


def read_inputs(folder: Path, limit: int | None = None) -> pd.DataFrame:
    """(image_id, lr_path, hr_path) with absolute paths, from pairs.parquet or a plain folder of LR images."""
    folder = Path(folder)
    manifest = folder / "pairs.parquet"
    if manifest.is_file():
        df = pd.read_parquet(manifest)
        missing = {"image_id", "lr_path", "hr_path"} - set(df.columns)
        if missing:
            raise ValueError(f"{manifest} lacks column(s) {sorted(missing)}")
        df = df.assign(
            lr_path=[str((folder / p).resolve()) for p in df.lr_path],
            hr_path=[str((folder / p).resolve()) if p else "" for p in df.hr_path],
        )[["image_id", "lr_path", "hr_path"]]
    else:
        files = list_images(folder)
        df = pd.DataFrame(
            {"image_id": [p.stem for p in files], "lr_path": [str(p.resolve()) for p in files], "hr_path": ""}
        )
    if df.image_id.duplicated().any():
        raise ValueError(f"{folder}: duplicate image IDs {sorted(df.image_id[df.image_id.duplicated()])}")
    df = df.sort_values("image_id").reset_index(drop=True)
    return df.head(limit) if limit else df


def candidate_path(image_id: str, seed: int) -> str:
    return f"{image_id}/seed_{seed:04d}.png"


def work_items(images: pd.DataFrame, seeds: list[int], batch: int) -> list[tuple[int, list[int]]]:
    """(row index, seed chunk) units of work, in a fixed order that every process computes identically."""
    return [(i, seeds[k : k + batch]) for i in range(len(images)) for k in range(0, len(seeds), batch)]


def sample_candidates(
    bb: Backbone,
    images: pd.DataFrame,
    out: Path,
    seeds: list[int],
    opts: SamplingOptions,
    *,
    upscale: int = 4,
    overwrite: bool = False,
    rank: int = 0,
    world: int = 1,
    show_progress: bool = True,
) -> tuple[int, set[str]]:
    """Sample this process's share of the pool into ``out``.

    Returns (candidates written, IDs of images that could not be read — reported on stderr and skipped).
    """
    settings = sampling_settings(bb, opts)
    prompt_fn = make_prompt_fn(opts.prompt_source, opts.prompt, opts.ram_path, opts.dape_path, bb.device)
    items = work_items(images, seeds, opts.batch_size)[rank::world]
    # A chunk is redone whole when any of its files is missing: the same batch composition as an
    # uninterrupted run gives bit-identical files (batched float maths can differ in the last bits).
    todo = [
        (i, chunk)
        for i, chunk in items
        if overwrite or not all((out / candidate_path(images.image_id[i], s)).is_file() for s in chunk)
    ]
    total = sum(len(c) for _, c in todo)
    bar = tqdm(total=total, desc="sample", unit="cand", disable=not show_progress, file=sys.stderr)
    written, start, cache, failed = 0, time.perf_counter(), {}, set()
    for i, chunk in todo:
        row = images.iloc[i]
        if row.image_id in failed:
            continue
        if cache.get("id") != row.image_id:  # consecutive chunks of one image share its LR and prompt
            try:
                lr = load_image(Path(row.lr_path))
                check_min_side(lr, Path(row.lr_path))
            except ImageReadError as exc:
                failed.add(row.image_id)
                tqdm.write(f"dp2osr sample: {exc}; skipped", file=sys.stderr)
                continue
            lr_up = resize(lr, (lr.shape[-2] * upscale, lr.shape[-1] * upscale))
            prompt = prompt_fn(Path(row.lr_path), lr)
            cache = {"id": row.image_id, "lr_up": lr_up, "prompt": prompt,
                     "cond": bb.encode_prompts([prompt], settings["negative_prompt"])}
        sr = super_resolve(
            bb, cache["lr_up"], cache["cond"], chunk,
            steps=settings["steps"], guidance=settings["guidance"], process_size=settings["process_size"],
            tile_overlap=opts.tile_overlap, color_fix_method=opts.color_fix, tile_batch=opts.tile_batch,
        )
        for seed, image in zip(chunk, sr):
            save_image(image, out / candidate_path(row.image_id, seed))
        if cache["prompt"]:
            (out / row.image_id / "prompt.txt").write_text(cache["prompt"] + "\n")
        written += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(cand_per_s=f"{written / (time.perf_counter() - start):.2f}")
    bar.close()
    return written, failed


def write_manifest(images: pd.DataFrame, out: Path, seeds: list[int], model: str) -> pd.DataFrame:
    """candidates.parquet listing every (image, seed) whose file exists; errors if any is missing."""
    rows, missing = [], []
    for row in images.itertuples():
        prompt_file = out / row.image_id / "prompt.txt"
        prompt = prompt_file.read_text().strip() if prompt_file.is_file() else ""
        for s in seeds:
            rel = candidate_path(row.image_id, s)
            if not (out / rel).is_file():
                missing.append(rel)
            rows.append((row.image_id, s, rel, row.lr_path, row.hr_path, model, prompt))
    if missing:
        raise RuntimeError(f"{len(missing)} candidates missing after sampling (e.g. {missing[:3]}); rerun to finish")
    df = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS).astype({"seed": "int64"})
    write_parquet(df, out / "candidates.parquet")
    return df


def model_identity(opts: SamplingOptions) -> str:
    """A readable identity of the model: backbone, base folder and ControlNet checkpoint."""
    parts = [opts.backbone]
    if opts.base:
        parts.append(str(Path(opts.base).resolve()))
    parts.append(str(Path(opts.controlnet).resolve()) if opts.controlnet else "controlnet:default")
    return "|".join(parts)


def sample(cfg: SampleConfig) -> int:
    """Run ``dp2osr sample``; returns 0 when the pool is complete."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    out = Path(cfg.output)
    images = read_inputs(cfg.input, cfg.limit)
    check_resume(cfg, out / CONFIG_NAME, _RUN_ONLY, "candidates")
    device = state.device if cfg.device == "auto" and state.num_processes > 1 else resolve_device(cfg.device)
    bb = load_model(cfg, device)
    if state.is_main_process:
        save_config(cfg, out / CONFIG_NAME)
        for stale in out.rglob(".tmp_*"):  # half-written files of a killed run
            stale.unlink()
    state.wait_for_everyone()
    seeds = [cfg.seed + k for k in range(cfg.samples)]
    n, failed = sample_candidates(
        bb, images, out, seeds, cfg, upscale=cfg.upscale, overwrite=cfg.overwrite,
        rank=state.process_index, world=state.num_processes, show_progress=state.is_local_main_process,
    )
    failed = set().union(*state_gather(state, failed))
    if state.is_main_process:
        kept = images[~images.image_id.isin(failed)].reset_index(drop=True)
        write_manifest(kept, out, seeds, model_identity(cfg))
        print(f"sample: {len(kept)} images x {len(seeds)} seeds in {out} ({n} new on process 0); "
              f"{len(failed)} unreadable images skipped", file=sys.stderr)
    return 1 if failed else 0


def state_gather(state, items: set[str]) -> list[set[str]]:
    """Every process's set (after a barrier); one process: just ``[items]``."""
    state.wait_for_everyone()
    if state.num_processes == 1:
        return [items]
    import torch.distributed as dist

    gathered: list = [None] * state.num_processes
    dist.all_gather_object(gathered, items)
    return gathered
