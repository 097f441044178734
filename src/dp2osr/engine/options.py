"""The model and sampling options every model-running stage shares, and loading the model they name.

`ModelOptions` (which model, dtype, device) is the config base of upscale, sample, curve, train and eval;
`SamplingOptions` adds how to sample (steps, guidance, tiles, prompts, fast paths). It sits in the engine, below
the stages that inherit these dataclasses and beside the sampler (`engine.sampler`) and the job runner
(`engine.jobs`) that read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dp2osr.backbones import DTYPES, NAMES, Backbone, auto_dtype, load_backbone, trait_defaults
from dp2osr.config import check_choices, check_range, field
from dp2osr.engine.sampler import NOISE_DEVICES, tile_threshold_for
from dp2osr.math.colorfix import COLOR_FIXES
from dp2osr.prompts import PROMPT_SOURCES
from dp2osr.runtime import resolve_device

MAX_SAMPLES = 100_000  # samples per image: beyond it, a typo (seeds and outputs would not fit anywhere)
MAX_STEPS = 10_000  # denoising steps: beyond it, a typo
MAX_GUIDANCE = 100.0  # CFG / guidance values far above any model's range only overflow (black images)


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
        "auto",
        help="auto | cpu | cuda | cuda:N (under accelerate launch: each process's own GPU)",
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
        help="short side the model works at: a smaller image is brought up to it and the result resized back; "
        "an image above --tile-threshold is denoised in tiles of this size "
        f"(default: the backbone's: {trait_defaults('default_process_size')})",
    )
    tile_threshold: int | None = field(
        None,
        help="images whose processing size has a side longer than this (pixels) are denoised in latent tiles "
        "of --process-size; smaller ones in one call over the image, as the released scripts do every image "
        "(default: twice the process size; 0: every image in one call, memory grows with the image)",
    )
    tile_overlap: float = field(0.25, help="overlap of latent tiles, as a fraction of the tile side")
    noise_device: str = field(
        "cpu",
        help="where each sample's generator draws its noise: cpu (the same noise on every device) or model "
        "(a generator on the model's device, as the released scripts seed theirs: their pixels on a GPU)",
        choices=list(NOISE_DEVICES),
    )
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
        False,
        help="denoiser and ControlNet in torch.channels_last memory format (helps UNet convolutions on GPUs)",
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
        check_choices(self)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tile_batch < 1:
            raise ValueError(f"--tile-batch must be >= 1, got {self.tile_batch}")
        if self.tile_threshold is not None and self.tile_threshold < 0:
            raise ValueError(f"--tile-threshold must be >= 0 (0: never tile), got {self.tile_threshold}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"--tile-overlap must be in [0, 1), got {self.tile_overlap}")
        if self.process_size is not None and self.process_size < 16:
            raise ValueError(f"--process-size must be >= 16, got {self.process_size}")
        if self.steps is not None:
            check_range("steps", self.steps, 1, MAX_STEPS, integer=True)
        if self.guidance is not None:
            check_range("guidance", self.guidance, 0, MAX_GUIDANCE)


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
        "tile_threshold": tile_threshold_for(
            opts.process_size or bb.default_process_size, opts.tile_threshold
        ),
        "tile_overlap": opts.tile_overlap,
        "noise_device": opts.noise_device,
        "tile_batch": opts.tile_batch,
        "color_fix": opts.color_fix,
    }
