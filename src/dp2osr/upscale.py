"""`dp2osr upscale`: super-resolve images with a ControlNet SR model — the command users run daily.

Sample k of an image uses seed ``seed + k`` and is written to ``OUTPUT/NAME/seed_000k.png``; finished files
are skipped on a rerun (resume), and under ``accelerate launch`` each process takes its share of the images.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dp2osr.config import field, save_config
from dp2osr.images import ImageReadError, check_min_side, list_images, load_image, save_image
from dp2osr.prompts import make_prompt_fn
from dp2osr.sampling import (
    SamplingOptions,
    load_model,
    resize,
    resolve_device,
    sampling_settings,
    super_resolve,
)


@dataclass(kw_only=True)
class UpscaleConfig(SamplingOptions):
    """Super-resolve an image or a folder of images.

    Quick use (the embedded default model): dp2osr upscale photo.png   -> upscaled/photo/seed_0000.png
    Example (the published DP²O-SD2 model):
      dp2osr upscale --input photos/ --output sr/ --backbone sd2 --base models/stable-diffusion-2-base \\
          --controlnet models/dp2o-sd2/model.safetensors --samples 4
    Each input NAME gives OUTPUT/NAME/seed_XXXX.png, one file per seed; rerunning skips finished files.
    """

    input: Path = field(help="an image file or a folder of images (png, jpg, bmp, tif, webp)")
    output: Path = field(Path("upscaled"), help="output folder")
    upscale: int = field(
        4, help="scale factor: 4 for a raw x4 LR, 1 for an LR already upsampled to the output size"
    )
    samples: int = field(1, help="outputs per image (M); sample k uses seed SEED+k")
    seed: int = field(0, help="seed of the first sample")
    overwrite: bool = field(False, help="redo outputs that already exist (default: skip them, i.e. resume)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.upscale < 1:
            raise ValueError(f"--upscale must be >= 1, got {self.upscale}")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")


def output_path(out_dir: Path, stem: str, seed: int) -> Path:
    return Path(out_dir) / stem / f"seed_{seed:04d}.png"


def upscale(cfg: UpscaleConfig) -> int:
    """Run the model over every input; returns 0 when all succeeded, 1 when any image failed."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    images = list_images(cfg.input)
    stems = [p.stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"inputs with the same name would overwrite each other's outputs: {dup}")
    device = state.device if cfg.device == "auto" and state.num_processes > 1 else resolve_device(cfg.device)
    bb = load_model(cfg, device)
    settings = sampling_settings(bb, cfg)
    if cfg.backbone == "embedded" and cfg.base is None:
        print(
            "note: using the embedded default model (a small CPU model shipped with dp2osr; see docs/EMBEDDED.md). "
            "For the published models pass --backbone sd2|flux --base ... --controlnet ...",
            file=sys.stderr,
        )
    if cfg.base is None and bb.name.endswith("tiny"):
        print(
            f"note: using the built-in {bb.name} test model (random weights): outputs are not real SR",
            file=sys.stderr,
        )
    prompt_fn = make_prompt_fn(cfg.prompt_source, cfg.prompt, cfg.ram_path, cfg.dape_path, device)
    if state.is_main_process:
        save_config(cfg, Path(cfg.output) / "upscale_config.yaml")
    mine = images[state.process_index :: state.num_processes]
    done = failed = skipped = 0
    seconds = 0.0
    seeds = [cfg.seed + k for k in range(cfg.samples)]
    bar = tqdm(mine, desc="upscale", unit="img", disable=not state.is_local_main_process)
    for path in bar:
        # Whole batches are redone when any of their files is missing, so a resumed run writes the same
        # bytes as an uninterrupted one (batched float maths can differ in the last bits across batch shapes).
        chunks = [seeds[i : i + cfg.batch_size] for i in range(0, len(seeds), cfg.batch_size)]
        todo = [
            c for c in chunks if cfg.overwrite or not all(output_path(cfg.output, path.stem, s).exists() for s in c)
        ]
        if not todo:
            skipped += 1
            continue
        start = time.perf_counter()
        try:
            lr = load_image(path)
            check_min_side(lr, path)
            h, w = lr.shape[-2:]
            lr_up = resize(lr, (h * cfg.upscale, w * cfg.upscale))
            prompt = prompt_fn(path, lr)
            cond = bb.encode_prompts([prompt], settings["negative_prompt"])
            steps = tqdm(total=settings["steps"] * len(todo), desc=f"  {path.name}", unit="step", leave=False,
                         disable=not state.is_local_main_process, file=sys.stderr)  # fmt: skip
            with steps:  # closed on an error too
                for chunk in todo:
                    sr = super_resolve(
                        bb,
                        lr_up,
                        cond,
                        chunk,
                        steps=settings["steps"],
                        guidance=settings["guidance"],
                        process_size=settings["process_size"],
                        tile_overlap=cfg.tile_overlap,
                        tile_batch=cfg.tile_batch,
                        color_fix_method=cfg.color_fix,
                        progress=steps.update,
                    )
                    for seed, image in zip(chunk, sr):
                        save_image(image, output_path(cfg.output, path.stem, seed))
            if prompt:
                (Path(cfg.output) / path.stem / "prompt.txt").write_text(prompt + "\n")
        except (ImageReadError, torch.OutOfMemoryError) as exc:
            failed += 1
            tqdm.write(f"error: {exc}", file=sys.stderr)
            continue
        done += 1
        seconds += time.perf_counter() - start
        bar.set_postfix(s_per_img=f"{seconds / done:.2f}")
    rate = f", {seconds / done:.2f} s per image" if done else ""
    print(
        f"[process {state.process_index}] upscale: {done} done, {failed} failed, {skipped} already finished"
        f"{rate} -> {cfg.output}",
        file=sys.stderr,
    )
    return 1 if failed else 0
