"""The resumable job runner behind upscale, sample, curve and the quickstart: (image, seed chunk) jobs sampled
with `engine.sampler.super_resolve` into ``OUT/ID/seed_XXXX.png``, skipping the samples a rerun finds current.

It sits in the engine above the sampler, the options (`engine.options`) and the provenance hashes
(`engine.provenance`); the stages and `engine.pools` call `run_jobs`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
from tqdm import tqdm

from dp2osr.backbones import Backbone
from dp2osr.engine.options import SamplingOptions, sampling_settings
from dp2osr.engine.provenance import (
    LR_SHA_KEY,
    OPTIONS_SHA_KEY,
    lr_file_sha,
    model_identity,
    options_sha,
    sample_is_current,
)
from dp2osr.engine.sampler import super_resolve
from dp2osr.images import ImageReadError, atomic_write, check_min_side, load_image, png_bytes, save_image
from dp2osr.paths import check_name, check_not_link
from dp2osr.progress import bar as progress_bar
from dp2osr.prompts import make_prompt_fn


@dataclass
class Job:
    """One unit of sampling work: an LR image and a chunk of seeds sampled together in one batched call."""

    image_id: str
    lr_path: Path
    seeds: list[int]


@dataclass
class JobsResult:
    """What `run_jobs` did: samples written, images finished / already finished, failures by image ID."""

    written: int = 0
    images_done: int = 0
    images_skipped: int = 0
    failed: dict[str, str] = dataclass_field(default_factory=dict)
    seconds: float = 0.0


def chunk_jobs(images: list[tuple[str, Path]], seeds: list[int], batch: int) -> list[Job]:
    """(image, seed chunk) jobs in a fixed order that every process computes identically."""
    return [Job(i, Path(p), seeds[k : k + batch]) for i, p in images for k in range(0, len(seeds), batch)]


def is_current(path: Path, lr_sha: str | None, opt_sha: str, stamps: dict | None = None) -> bool:
    """`sample_is_current`, trusting ``stamps`` (``{str(path): (size, mtime_ns, lr_sha, options_sha, sha)}``, what a
    manifest recorded of each file it hashed) for a file whose size and mtime are still those recorded: such a
    file is not decoded again."""
    known = stamps.get(str(path)) if stamps and lr_sha is not None else None
    if known is not None:
        try:
            st = path.stat()
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) == tuple(known[:2]):
            return known[2] == lr_sha and known[3] == opt_sha
    return sample_is_current(path, lr_sha, opt_sha)


def output_path(out_dir: Path, image_id: str, seed: int, flat: bool = False) -> Path:
    """Where sample ``seed`` of image ``image_id`` goes: ``OUT/ID/seed_XXXX.png`` (``flat``: ``OUT/ID.png``,
    one sample per image); an ID that is not a plain file name (``../x``, ``/abs``) is a ValueError."""
    check_name(image_id)
    return Path(out_dir) / (f"{image_id}.png" if flat else f"{image_id}/seed_{seed:04d}.png")


def member_name(image_id: str, seed: int) -> str:
    """A candidate's name in its pool, ``ID/seed_XXXX.png``: its path in the files layout, its tar member's
    name in the shards layout."""
    check_name(image_id)
    return f"{image_id}/seed_{seed:04d}.png"


def prompt_path(out_dir: Path, image_id: str, flat: bool = False) -> Path:
    """Where the prompt of image ``image_id`` is recorded: ``OUT/ID/prompt.txt`` (``flat``: ``OUT/ID.txt``)."""
    check_name(image_id)
    return Path(out_dir) / (f"{image_id}.txt" if flat else f"{image_id}/prompt.txt")


def check_outputs(out_dir: Path, image_ids, flat: bool = False) -> None:
    """Refuse (ValueError, before any work) an image ID that is not a plain file name, and an image's output
    folder ``OUT/ID`` that is a symbolic link (its samples would be written elsewhere). Files are written by
    replacing them (`images.atomic_write`), so a file ``OUT/ID.png`` that is a link is replaced, not written
    through."""
    for image_id in image_ids:
        check_name(image_id)
        if not flat:
            check_not_link(Path(out_dir) / image_id, "the output folder")


def _prepared(bb: Backbone, job: Job, upscale: int, prompt_fn, negative_prompt) -> dict:
    """The job's image read, checked, upsampled, with its prompt and text condition (raises ImageReadError)."""
    return prepare_lr(
        bb, job.image_id, load_image(job.lr_path), job.lr_path, upscale, prompt_fn, negative_prompt
    )


def prepare_lr(
    bb: Backbone, image_id: str, lr, source: Path, upscale: int, prompt_fn, negative_prompt
) -> dict:
    """An LR ``(1, 3, h, w)`` checked, with its scale factor, prompt and text condition: what the sample jobs of
    one image share (``source`` names it in errors and is what the prompt function reads)."""
    check_min_side(lr, source)
    prompt = prompt_fn(source, lr)
    return {
        "id": image_id,
        "lr": lr,
        "upscale": upscale,
        "prompt": prompt,
        "cond": bb.encode_prompts([prompt], negative_prompt),
    }


def sample_job(bb: Backbone, job: Job, cache: dict, settings: dict, opts: SamplingOptions, show: bool):
    """The samples of one job (``(len(job.seeds), 3, H, W)``), with a progress bar of its denoising steps."""
    steps = progress_bar(
        nested=True,
        total=settings["steps"],
        desc=f"  {job.image_id}",
        unit="step",
        leave=False,
        disable=not show,
        file=sys.stderr,
    )
    with steps:  # closed on an error too
        return super_resolve(
            bb,
            cache["lr"],
            cache["cond"],
            job.seeds,
            steps=settings["steps"],
            guidance=settings["guidance"],
            process_size=settings["process_size"],
            upscale=cache["upscale"],
            tile_threshold=settings["tile_threshold"],
            tile_overlap=opts.tile_overlap,
            color_fix_method=opts.color_fix,
            tile_batch=opts.tile_batch,
            noise_device=settings["noise_device"],
            progress=steps.update,
        )


def _plan(
    bb, jobs, out_dir, opts, upscale, model, flat, stamps, overwrite, store=None
) -> tuple[list[Job], dict, Callable]:
    """(the jobs to do: not ``overwrite``-forced ones whose files are all current are left out, each image's LR
    hash, the options hash of a seed) for `run_jobs`."""
    identity = model_identity(model if model is not None else opts)
    opt_sha = options_sha(bb, opts, upscale, identity)
    # The flat layout's file name does not carry the seed: its record does.
    seed_shas = (
        {s: options_sha(bb, opts, upscale, identity, s) for j in jobs for s in j.seeds} if flat else {}
    )
    lr_paths = {j.image_id: j.lr_path for j in jobs}  # an image's seed chunks share one LR: hash it once
    lr_shas = {i: lr_file_sha(path) for i, path in lr_paths.items()}

    def current(j: Job) -> bool:
        if store is not None:  # the shards layout (engine.shard_pool)
            return all(
                store.is_current(member_name(j.image_id, s), lr_shas[j.image_id], opt_sha) for s in j.seeds
            )
        return all(
            is_current(
                output_path(out_dir, j.image_id, s, flat),
                lr_shas[j.image_id],
                seed_shas.get(s, opt_sha),
                stamps,
            )
            for s in j.seeds
        )

    todo = [j for j in jobs if overwrite or not current(j)]
    return todo, lr_shas, lambda seed: seed_shas.get(seed, opt_sha)


def run_jobs(
    bb: Backbone,
    jobs: list[Job],
    out_dir: Path,
    opts: SamplingOptions,
    *,
    upscale: int = 4,
    overwrite: bool = False,
    desc: str = "sample",
    show_progress: bool = True,
    model: dict[str, str] | None = None,
    flat: bool = False,
    stamps: dict | None = None,
    store=None,
) -> JobsResult:
    """Sample every job into ``out_dir/ID/seed_XXXX.png`` (``flat``: ``out_dir/ID.png``): the one loop behind
    upscale, sample, curve and the quickstart.

    Every sample records in its PNG the hash of the LR it was made from and of the options (`options_sha`, with
    `model_identity` of ``model``, the model's `model_fields`; default: those of ``opts``). A job is redone
    whole when any of its files is missing, does not decode, or records another LR or other options (or
    ``overwrite``): the same batch composition as an uninterrupted run gives bit-identical files (batched float
    maths can differ in the last bits). ``stamps`` (see `is_current`) spares decoding the files a manifest
    recorded and nobody changed since. ``store`` (an `engine.shard_pool.ShardedPool`) keeps the samples and
    prompts in tar shards instead of files. Consecutive jobs of one image share its loaded LR and prompt. An
    unreadable image (or, on an accelerator, one that runs out of memory) is reported on stderr by name and
    skipped; the others go on. A sample with non-finite values is not written: its image and seed are reported
    and the image counts as failed.
    """
    check_outputs(out_dir, [j.image_id for j in jobs], flat)
    settings = sampling_settings(bb, opts)
    prompt_fn = make_prompt_fn(opts.prompt_source, opts.prompt, opts.ram_path, opts.dape_path, bb.device)
    todo, lr_shas, seed_sha = _plan(bb, jobs, out_dir, opts, upscale, model, flat, stamps, overwrite, store)
    result = JobsResult(images_skipped=len({j.image_id for j in jobs} - {j.image_id for j in todo}))
    bar = progress_bar(
        total=sum(len(j.seeds) for j in todo),
        desc=desc,
        unit="sample",
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    cache: dict = {}
    for job in todo:
        if job.image_id in result.failed:
            continue
        start = time.perf_counter()
        try:
            if cache.get("id") != job.image_id:
                cache = _prepared(bb, job, upscale, prompt_fn, settings["negative_prompt"])
            sr = sample_job(bb, job, cache, settings, opts, show_progress)
        except (ImageReadError, torch.OutOfMemoryError) as exc:
            result.failed[job.image_id] = str(exc)
            tqdm.write(f"dp2osr {desc}: {exc}; skipped", file=sys.stderr)
            continue
        for seed, image in zip(job.seeds, sr):
            if not torch.isfinite(image).all():  # saved, NaN would read as black: a garbage "finished" sample
                result.failed[job.image_id] = f"{job.image_id}: seed {seed}: the sample has non-finite values"
                tqdm.write(f"dp2osr {desc}: {result.failed[job.image_id]}; not written", file=sys.stderr)
                continue
            record = {LR_SHA_KEY: lr_shas[job.image_id] or "", OPTIONS_SHA_KEY: seed_sha(seed)}
            if store is not None:
                store.save(member_name(job.image_id, seed), png_bytes(image, record), *record.values())
            else:
                save_image(image, output_path(out_dir, job.image_id, seed, flat), record)
            result.written += 1
        if cache["prompt"]:
            text = cache["prompt"] + "\n"
            if store is not None:
                store.save_prompt(job.image_id, text)
            else:
                atomic_write(prompt_path(out_dir, job.image_id, flat), lambda tmp, t=text: tmp.write_text(t))
        result.seconds += time.perf_counter() - start
        bar.update(len(job.seeds))
        bar.set_postfix(s_per_sample=f"{result.seconds / max(result.written, 1):.2f}")
    bar.close()
    finished = {j.image_id for j in todo} - set(result.failed)
    result.images_done = len(finished)
    return result
