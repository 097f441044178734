"""`dp2osr upscale`: super-resolve images with a ControlNet SR model — the command users run daily.

Sample k of an image uses seed ``seed + k`` and is written to ``OUTPUT/NAME/seed_000k.png`` (``--layout flat``:
``OUTPUT/NAME.png``); finished files are skipped on a rerun (resume), and under ``accelerate launch`` each
process takes its share of the images. Each run's resolved config is recorded in the output folder.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dp2osr.backbones import DTYPES, default_model_note
from dp2osr.config import field, save_config, to_dict
from dp2osr.engine.budget import DEFAULT_MAX_PIXELS, check_inputs
from dp2osr.engine.sampler import SamplingOptions, chunk_jobs, load_model, run_jobs, sampling_settings
from dp2osr.errors import PartialFailure
from dp2osr.images import list_images
from dp2osr.paths import check_output_dir
from dp2osr.runtime import process_state

CONFIG_NAME = "upscale_config.yaml"
RUNS_NAME = "upscale_runs.jsonl"


@dataclass(kw_only=True)
class UpscaleConfig(SamplingOptions):
    """Super-resolve an image or a folder of images.

    Quick use (the embedded default model): dp2osr upscale photo.png   -> upscaled/photo/seed_0000.png
    Example (the published DP²O-SD2 model):
      dp2osr upscale --input photos/ --output sr/ --backbone sd2 --base models/stable-diffusion-2-base \\
          --controlnet models/dp2o-sd2/model.safetensors --samples 4
    Each input NAME gives OUTPUT/NAME/seed_XXXX.png, one file per seed (--layout flat: OUTPUT/NAME.png);
    rerunning skips finished files. OUTPUT/upscale_config.yaml holds the run's resolved options (reusable with
    --config) and OUTPUT/upscale_runs.jsonl one line per run.
    """

    input: Path = field(help="an image file or a folder of images (png, jpg, bmp, tif, webp)")
    output: Path = field(Path("upscaled"), help="output folder")
    upscale: int = field(
        4, help="scale factor: 4 for a raw x4 LR, 1 for an LR already upsampled to the output size"
    )
    samples: int = field(1, help="outputs per image (M); sample k uses seed SEED+k")
    seed: int = field(0, help="seed of the first sample")
    overwrite: bool = field(False, help="redo outputs that already exist (otherwise they are skipped: resume)")
    layout: str = field(
        "seeds",
        help="seeds: OUTPUT/NAME/seed_XXXX.png (any --samples); flat: OUTPUT/NAME.png (one sample per image, "
        "as the released test scripts write)",
        choices=["seeds", "flat"],
    )
    max_pixels: int = field(
        DEFAULT_MAX_PIXELS,
        help="refuse an image whose output has more pixels than this (default 4096x4096), before any work, with "
        "its estimated memory and time; 0 = no limit",
        run_only=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.upscale < 1:
            raise ValueError(f"--upscale must be >= 1, got {self.upscale}")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")
        if self.layout == "flat" and self.samples != 1:
            raise ValueError(f"--layout flat writes one image per input: use --samples 1, not {self.samples}")


def resolved_config(cfg: UpscaleConfig, bb, device) -> UpscaleConfig:
    """``cfg`` with every value left to the backbone or the machine replaced by the one used."""
    settings = sampling_settings(bb, cfg)
    dtype = next((k for k, v in DTYPES.items() if v == bb.dtype), str(bb.dtype))
    keys = ("steps", "guidance", "negative_prompt", "process_size")
    return replace(cfg, dtype=dtype, device=str(device), **{k: settings[k] for k in keys})


def record_run(cfg: UpscaleConfig, out: Path, images_done: int) -> None:
    """OUTPUT/upscale_config.yaml: this run's resolved config (reusable with --config); OUTPUT/upscale_runs.jsonl:
    one line per run (its resolved config, when it ended, the images it finished), so runs into one folder
    are all on record."""
    save_config(cfg, out / CONFIG_NAME)
    record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images_done": images_done, **to_dict(cfg)}
    with open(out / RUNS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def run(cfg: UpscaleConfig) -> None:
    """Run the model over every input; raises `PartialFailure` (after the others are written) when any failed."""
    state, device = process_state(cfg.device)
    images = list_images(cfg.input)
    stems = [p.stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"inputs with the same name would overwrite each other's outputs: {dup}")
    check_output_dir(cfg.output)
    check_inputs(images, cfg, device.type == "cpu", "upscale")
    bb = load_model(cfg, device)
    note = default_model_note(cfg.backbone, cfg.base, cfg.controlnet)
    if note:
        print(f"note: {note}", file=sys.stderr)
    seeds = [cfg.seed + k for k in range(cfg.samples)]
    mine = [(p.stem, p) for p in images[state.process_index :: state.num_processes]]
    jobs = chunk_jobs(mine, seeds, cfg.batch_size)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    result = run_jobs(
        bb, jobs, cfg.output, cfg, upscale=cfg.upscale, overwrite=cfg.overwrite, desc="upscale",
        show_progress=state.is_local_main_process, flat=cfg.layout == "flat",
    )  # fmt: skip
    done, failed = result.images_done, len(result.failed)
    if state.is_main_process:
        record_run(resolved_config(cfg, bb, device), Path(cfg.output), done)
    rate = f", {result.seconds / done:.2f} s per image" if done else ""
    print(
        f"[process {state.process_index}] upscale: {done} done, {failed} failed, {result.images_skipped} already "
        f"finished{rate} -> {cfg.output}",
        file=sys.stderr,
    )
    if failed:
        raise PartialFailure(f"{failed} image(s) failed (reported above)")
