"""The sampler every stage shares: seeded, batched over seeds, tiled in latent space for large images.

Sample k of a batch always starts from ``randn(seed_k)`` drawn on its own CPU generator, and every stochastic
scheduler step draws from that generator too, so an (image, seed) gives the same output whatever the batch
size, device count or order. Images larger than the process size are denoised in overlapping latent tiles
blended with smooth weights (memory bound by the tile, not the image), and decoded with a tiled VAE.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dp2osr.backbones import DTYPES, NAMES, Backbone, Cond, auto_dtype, load_backbone, trait_defaults
from dp2osr.config import field
from dp2osr.images import ImageReadError, check_min_side, load_image, read_png_text, save_image
from dp2osr.math.colorfix import COLOR_FIXES, color_fix
from dp2osr.math.geometry import ramp, resize, tile_starts
from dp2osr.paths import file_sha, text_sha
from dp2osr.prompts import PROMPT_SOURCES, make_prompt_fn
from dp2osr.runtime import resolve_device


def _rows(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` with batch ``b`` (a batch of 1 is expanded)."""
    return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b > 1 else x




def expand_cond(cond: Cond, batch: int) -> Cond:
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def initial_latents(backbone: Backbone, seeds: list[int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per-seed Gaussian latents drawn on the CPU (identical on every device)."""
    shape = (1, backbone.latent_channels, *latent_hw)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    sigma = getattr(backbone.scheduler, "init_noise_sigma", 1.0)  # flow matching starts from pure noise
    return torch.cat(noise).to(backbone.device, backbone.dtype) * sigma


@torch.no_grad()
def generate(
    backbone: Backbone,
    control_image: torch.Tensor,
    cond: Cond,
    seeds: list[int],
    *,
    steps: int,
    guidance: float | None,
    tile: int | None = None,
    overlap: int | None = None,
    controlnet: torch.nn.Module | None = None,
    progress: Callable[[float], None] | None = None,
    tile_batch: int = 1,
) -> torch.Tensor:
    """Sample one SR output per seed for one control image.

    Args:
        control_image: ``(1, 3, H, W)`` upsampled LR in [0, 1]; H, W multiples of ``backbone.pixel_multiple``.
        cond: text condition for batch 1 (or ``len(seeds)``), from ``backbone.encode_prompts``.
        seeds: one seed per output.
        tile: latent tile side (default: the whole image, no tiling); ``overlap`` in latents (default tile/4).
        tile_batch: tiles denoised together in one call (each with every seed: batch tile_batch x seeds).
        progress: called with the fraction of a denoising step done, after every tile group of a tiled image
            (1 after each step otherwise), e.g. a progress bar's ``update``.
    Returns:
        ``(len(seeds), 3, H, W)`` in [0, 1], float32 on the CPU.
    """
    f = backbone.latent_factor
    h, w = control_image.shape[-2] // f, control_image.shape[-1] // f
    b = len(seeds)
    control = backbone.prepare_control(control_image.to(backbone.device))
    cond = expand_cond({k: v.to(backbone.device) for k, v in cond.items()}, b)
    latents = initial_latents(backbone, seeds, (h, w))
    generators = [torch.Generator("cpu").manual_seed(int(s) + 1) for s in seeds]  # scheduler noise stream
    tiled = tile is not None and (h > tile or w > tile)
    th, tw = (min(tile, h), min(tile, w)) if tiled else (h, w)
    ov = (tile // 4 if overlap is None else overlap) if tiled else 0
    align = backbone.pixel_multiple // f
    ys = tile_starts(h, th, th - ov, align)
    xs = tile_starts(w, tw, tw - ov, align)
    dev, dt = latents.device, latents.dtype
    weight = ramp(th, ov, dev, dt)[:, None] * ramp(tw, ov, dev, dt)[None, :]
    coords = [(y, x) for y in ys for x in xs]
    groups = [coords[i : i + tile_batch] for i in range(0, len(coords), tile_batch)]
    timesteps = backbone.set_timesteps(steps, (th, tw))
    for t in timesteps:
        t_batch = t.expand(b).to(dev)
        if not tiled:
            out = backbone.predict(latents, t_batch, cond, control, guidance=guidance, controlnet=controlnet)
        else:
            out = torch.zeros_like(latents)
            total = torch.zeros((h, w), device=dev, dtype=dt)
            for group in groups:  # several tiles (x every seed) in one batched call
                n = len(group)
                tiles = torch.cat([latents[..., y : y + th, x : x + tw] for y, x in group])
                c_tiles = torch.cat(
                    [_rows(backbone.control_tile(control, y, y + th, x, x + tw), b) for y, x in group]
                )
                cond_n = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in cond.items()}
                o = backbone.predict(
                    tiles, t.expand(n * b).to(dev), cond_n, c_tiles, guidance=guidance, controlnet=controlnet
                )
                for (y, x), o_tile in zip(group, o.split(b)):
                    out[..., y : y + th, x : x + tw] += o_tile * weight
                    total[y : y + th, x : x + tw] += weight
                if progress is not None:  # a large image shows progress from its first tiles on
                    progress(1 / len(groups))
            out = out / total
        latents = backbone.step(out, t, latents, generators)
        if progress is not None and not tiled:
            progress(1)
    images = []
    with backbone.vae_tiling(tiled):
        for k in range(b):  # one at a time: decoder activations dominate memory at real size
            images.append(backbone.decode_latents(latents[k : k + 1], control_image).float().cpu())
    return torch.cat(images)




def super_resolve(
    backbone: Backbone,
    lr_up: torch.Tensor,
    cond: Cond,
    seeds: list[int],
    *,
    steps: int,
    guidance: float | None,
    process_size: int,
    tile_overlap: float = 0.25,
    color_fix_method: str = "adain",
    controlnet: torch.nn.Module | None = None,
    progress: Callable[[float], None] | None = None,
    tile_batch: int = 1,
) -> torch.Tensor:
    """SR outputs ``(len(seeds), 3, H, W)`` for the upsampled LR ``lr_up`` ``(1, 3, H, W)`` at any size/aspect.

    The short side is brought up to ``process_size`` when smaller (and the result resized back), the image is
    padded (reflect) to the model's multiple and cropped back — never squashed — and sides larger than the
    process size are tiled. Colour is then fixed against ``lr_up``.
    """
    height, width = lr_up.shape[-2:]
    scale = process_size / min(height, width)
    work = resize(lr_up, (round(height * scale), round(width * scale))) if scale > 1 else lr_up
    hw, ww = work.shape[-2:]
    m = backbone.pixel_multiple
    ph, pw = (-hw) % m, (-ww) % m
    mode = "reflect" if ph < hw and pw < ww else "replicate"
    work = F.pad(work, (0, pw, 0, ph), mode=mode)
    align = m // backbone.latent_factor
    tile = max(align, process_size // backbone.latent_factor // align * align)
    overlap = int(round(tile * tile_overlap / align)) * align
    out = generate(
        backbone,
        work,
        cond,
        seeds,
        steps=steps,
        guidance=guidance,
        tile=tile,
        overlap=overlap,
        controlnet=controlnet,
        progress=progress,
        tile_batch=tile_batch,
    )
    out = out[..., :hw, :ww]
    if scale > 1:
        out = resize(out, (height, width))
    return color_fix(out, lr_up.float().cpu(), color_fix_method)


@dataclass(kw_only=True)
class ModelOptions:
    """Which model to run: shared by upscale, sample, train and eval."""

    backbone: str = field(
        "embedded",
        help="model family: embedded (the small SR model shipped in the package; needs nothing else), "
        "sd2 | flux (the published models; need --base and --controlnet), or sd2-tiny | flux-tiny "
        "(small random test models, built in code)",
        choices=list(NAMES),
    )
    base: Path | None = field(
        None,
        help="base model (SD2-base or FLUX.1-dev): a folder in diffusers layout, or a Hugging Face model id "
        "ORG/NAME[@REVISION] found in the local Hugging Face cache (HF_HOME; nothing is downloaded)",
    )
    controlnet: Path | None = field(
        None,
        help="ControlNet: the release model.safetensors, a diffusers ControlNet folder, or from the Hugging "
        "Face cache ORG/NAME[@REVISION] or ORG/NAME:PATH/IN/REPO/model.safetensors "
        "(default: BASE/controlnet if present)",
    )
    dtype: str = field(
        "auto",
        help="weights/activations dtype; auto = fp16 (SD2) / bf16 (FLUX) on CUDA, fp32 on CPU",
        choices=["auto", "fp32", "fp16", "bf16"],
    )
    device: str = field(
        "auto", help="auto | cpu | cuda | cuda:N (under accelerate launch: each process's own GPU)",
        run_only=True,
    )


@dataclass(kw_only=True)
class SamplingOptions(ModelOptions):
    """How to sample: shared by upscale, sample and curve. Unset values take the backbone's defaults."""

    steps: int | None = field(
        None, help=f"denoising steps (default: the backbone's: {trait_defaults('default_steps')})"
    )
    guidance: float | None = field(
        None,
        help="CFG scale (sd2) or the FLUX guidance-embedding value; 1 = no CFG (default: the backbone's: "
        f"{trait_defaults('default_guidance')})",
    )
    negative_prompt: str | None = field(
        None,
        help=f"negative prompt of CFG (default: {trait_defaults('default_negative_prompt')}; the other "
        "backbones use none)",
    )
    process_size: int | None = field(
        None,
        help="short side the model works at; larger images are tiled, smaller ones upsized then resized back "
        f"(default: the backbone's: {trait_defaults('default_process_size')})",
    )
    tile_overlap: float = field(0.25, help="overlap of latent tiles, as a fraction of the tile side")
    tile_batch: int = field(
        4,
        help="latent tiles denoised together in one call when an image is tiled (with every seed of the "
        "batch: tile_batch x batch_size samples per call; memory grows with it; 1 = one tile at a time)",
        run_only=True,
    )
    color_fix: str = field(
        "adain", help="colour correction against the upsampled LR", choices=list(COLOR_FIXES)
    )
    prompt_source: str = field(
        "none",
        help="none | text (--prompt) | sidecar (NAME.txt beside each image) | "
        "ram (RAM tagger with DAPE weights; needs the ram package)",
        choices=list(PROMPT_SOURCES),
    )
    prompt: str = field("", help="the prompt for --prompt-source text")
    ram_path: Path | None = field(None, help="RAM swin-L checkpoint (.pth) for --prompt-source ram")
    dape_path: Path | None = field(None, help="DAPE checkpoint (.pth) for --prompt-source ram")
    batch_size: int = field(8, help="seeds of one image sampled together in one batched call", run_only=True)
    # Fast paths (Backbone.optimize): outputs equal the plain path's up to float rounding, not bit for bit, so
    # they are part of a pool's options (a resumed pool does not mix them).
    channels_last: bool = field(
        False, help="denoiser and ControlNet in torch.channels_last memory format (helps UNet convolutions on GPUs)"
    )
    fuse_qkv: bool = field(
        False,
        help="fuse the attention Q/K/V projections into one matmul (diffusers' fuse_qkv_projections) in the "
        "denoiser and ControlNet; more weight memory",
    )
    compile: bool = field(
        False,
        help="torch.compile the denoiser and ControlNet (inductor; compiles once per tile/batch shape, "
        "minutes at real size; pays off on large pools)",
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tile_batch < 1:
            raise ValueError(f"--tile-batch must be >= 1, got {self.tile_batch}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"--tile-overlap must be in [0, 1), got {self.tile_overlap}")
        if self.process_size is not None and self.process_size < 16:
            raise ValueError(f"--process-size must be >= 16, got {self.process_size}")


def load_model(opts: ModelOptions, device: torch.device | None = None) -> Backbone:
    """Load the backbone + ControlNet that ``opts`` names, moved to its device and dtype."""
    device = device or resolve_device(opts.device)
    dtype = auto_dtype(opts.backbone, device) if opts.dtype == "auto" else opts.dtype
    bb = load_backbone(opts.backbone, opts.base, opts.controlnet, dtype=dtype).to(device, DTYPES[dtype])
    if isinstance(opts, SamplingOptions):  # sampling only: training needs the plain modules
        bb.optimize(**fast_paths(opts))
    return bb


FAST_PATHS = ("channels_last", "fuse_qkv", "compile")


def fast_paths(opts: SamplingOptions) -> dict[str, bool]:
    """The sampling fast paths ``opts`` asks for (`Backbone.optimize`'s keyword arguments)."""
    return {k: bool(getattr(opts, k)) for k in FAST_PATHS}


def sampling_settings(bb: Backbone, opts: SamplingOptions) -> dict:
    """The resolved settings (backbone defaults filled in) recorded beside every output."""
    return {
        "steps": opts.steps or bb.default_steps,
        "guidance": bb.default_guidance if opts.guidance is None else opts.guidance,
        "negative_prompt": (
            bb.default_negative_prompt if opts.negative_prompt is None else opts.negative_prompt
        )
        if bb.uses_negative_prompt
        else None,
        "process_size": opts.process_size or bb.default_process_size,
        "tile_overlap": opts.tile_overlap,
        "tile_batch": opts.tile_batch,
        "color_fix": opts.color_fix,
    }


def model_identity(opts: ModelOptions) -> str:
    """A readable identity of the model: backbone, base folder and ControlNet checkpoint."""
    parts = [opts.backbone]
    if opts.base:
        parts.append(str(Path(opts.base).resolve()))
    parts.append(str(Path(opts.controlnet).resolve()) if opts.controlnet else "controlnet:default")
    return "|".join(parts)


# Keys of the record every sample carries in its PNG (tEXt chunks): what it was made from.
LR_SHA_KEY, OPTIONS_SHA_KEY = "dp2osr:lr_sha", "dp2osr:options_sha"


def options_sha(bb: Backbone, opts: SamplingOptions, upscale: int, model: str) -> str:
    """A hash of everything besides the LR that decides a sample: the model identity, the resolved sampling
    settings, the scale, the prompt source, the weights' dtype and the fast paths that are on (not the run-only
    batch sizes)."""
    settings = {k: v for k, v in sampling_settings(bb, opts).items() if k != "tile_batch"}
    settings.update({k: True for k, on in fast_paths(opts).items() if on})  # absent when off: old hashes hold
    record = {
        "model": model, **settings, "upscale": upscale, "dtype": str(bb.dtype), "prompt_source": opts.prompt_source,
        "prompt": opts.prompt, "ram_path": str(opts.ram_path or ""), "dape_path": str(opts.dape_path or ""),
    }  # fmt: skip
    return text_sha(json.dumps(record, sort_keys=True, default=str))


def _lr_sha(path: Path) -> str | None:
    try:
        return file_sha(path)
    except OSError:
        return None


def sample_is_current(path: Path, lr_sha: str | None, opt_sha: str) -> bool:
    """Whether the sample at ``path`` decodes and records that it was made from ``lr_sha`` with ``opt_sha``."""
    record = read_png_text(path) if lr_sha is not None else None
    return record is not None and record.get(LR_SHA_KEY) == lr_sha and record.get(OPTIONS_SHA_KEY) == opt_sha


# ------------------------------------------------------------------------------------- the sampling loop
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


def output_path(out_dir: Path, image_id: str, seed: int, flat: bool = False) -> Path:
    """Where sample ``seed`` of image ``image_id`` goes: ``OUT/ID/seed_XXXX.png`` (``flat``: ``OUT/ID.png``,
    one sample per image)."""
    return Path(out_dir) / (f"{image_id}.png" if flat else f"{image_id}/seed_{seed:04d}.png")


def prompt_path(out_dir: Path, image_id: str, flat: bool = False) -> Path:
    """Where the prompt of image ``image_id`` is recorded: ``OUT/ID/prompt.txt`` (``flat``: ``OUT/ID.txt``)."""
    return Path(out_dir) / (f"{image_id}.txt" if flat else f"{image_id}/prompt.txt")


def _prepared(bb: Backbone, job: Job, upscale: int, prompt_fn, negative_prompt) -> dict:
    """The job's image read, checked, upsampled, with its prompt and text condition (raises ImageReadError)."""
    lr = load_image(job.lr_path)
    check_min_side(lr, job.lr_path)
    h, w = lr.shape[-2:]
    prompt = prompt_fn(job.lr_path, lr)
    return {
        "id": job.image_id,
        "lr_up": resize(lr, (h * upscale, w * upscale)),
        "prompt": prompt,
        "cond": bb.encode_prompts([prompt], negative_prompt),
    }


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
    model: str | None = None,
    flat: bool = False,
) -> JobsResult:
    """Sample every job into ``out_dir/ID/seed_XXXX.png`` (``flat``: ``out_dir/ID.png``): the one loop behind
    upscale, sample, curve and the quickstart.

    Every sample records in its PNG the hash of the LR it was made from and of the options (`options_sha`, with
    ``model`` as the model's identity; default `model_identity`). A job is redone whole when any of its files is
    missing, does not decode, or records another LR or other options (or ``overwrite``): the same batch
    composition as an uninterrupted run gives bit-identical files (batched float maths can differ in the last
    bits). Consecutive
    jobs of one image share its loaded LR and prompt. An unreadable image (or, on an accelerator, one that runs
    out of memory) is reported on stderr by name and skipped; the others go on.
    """
    settings = sampling_settings(bb, opts)
    prompt_fn = make_prompt_fn(opts.prompt_source, opts.prompt, opts.ram_path, opts.dape_path, bb.device)
    opt_sha = options_sha(bb, opts, upscale, model or model_identity(opts))
    lr_paths = {j.image_id: j.lr_path for j in jobs}  # an image's seed chunks share one LR: hash it once
    lr_shas = {i: _lr_sha(path) for i, path in lr_paths.items()}
    todo = [
        j for j in jobs
        if overwrite or not all(sample_is_current(output_path(out_dir, j.image_id, s, flat), lr_shas[j.image_id], opt_sha)
                                for s in j.seeds)
    ]  # fmt: skip
    result = JobsResult(images_skipped=len({j.image_id for j in jobs} - {j.image_id for j in todo}))
    bar = tqdm(total=sum(len(j.seeds) for j in todo), desc=desc, unit="sample", disable=not show_progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    cache: dict = {}
    for job in todo:
        if job.image_id in result.failed:
            continue
        start = time.perf_counter()
        try:
            if cache.get("id") != job.image_id:
                cache = _prepared(bb, job, upscale, prompt_fn, settings["negative_prompt"])
            steps = tqdm(total=settings["steps"], desc=f"  {job.image_id}", unit="step", leave=False,
                         disable=not show_progress, file=sys.stderr)  # fmt: skip
            with steps:  # closed on an error too
                sr = super_resolve(
                    bb, cache["lr_up"], cache["cond"], job.seeds,
                    steps=settings["steps"], guidance=settings["guidance"], process_size=settings["process_size"],
                    tile_overlap=opts.tile_overlap, color_fix_method=opts.color_fix, tile_batch=opts.tile_batch,
                    progress=steps.update,
                )  # fmt: skip
        except (ImageReadError, torch.OutOfMemoryError) as exc:
            result.failed[job.image_id] = str(exc)
            tqdm.write(f"dp2osr {desc}: {exc}; skipped", file=sys.stderr)
            continue
        record = {LR_SHA_KEY: lr_shas[job.image_id] or "", OPTIONS_SHA_KEY: opt_sha}
        for seed, image in zip(job.seeds, sr):
            save_image(image, output_path(out_dir, job.image_id, seed, flat), record)
        if cache["prompt"]:
            prompt_path(out_dir, job.image_id, flat).write_text(cache["prompt"] + "\n")
        result.written += len(job.seeds)
        result.seconds += time.perf_counter() - start
        bar.update(len(job.seeds))
        bar.set_postfix(s_per_sample=f"{result.seconds / result.written:.2f}")
    bar.close()
    finished = {j.image_id for j in todo} - set(result.failed)
    result.images_done = len(finished)
    return result
