"""`dp2osr upscale`: super-resolve images with a ControlNet SR model — the command users run daily.

Sample k of an image uses seed ``seed + k`` and is written to ``OUTPUT/NAME/seed_000k.png`` (``--layout flat``:
``OUTPUT/NAME.png``); finished files are skipped on a rerun (resume), and under ``accelerate launch`` each
process takes its share of the images. Each run's resolved config is recorded in the output folder.

Best-of-M (``--select nr``): every candidate of an image is scored with no-reference IQA metrics (no HR
needed), the scores are oriented (higher = better) and min-max normalised over the image's M candidates, and
the candidate with the highest mean normalised score is copied to ``OUTPUT/NAME.png``; the per-seed scores
and the choice go to ``OUTPUT/NAME/scores.csv``. Ties go to the lowest seed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from dp2osr import metrics as metric_lib
from dp2osr.backbones import DTYPES, default_model_note
from dp2osr.config import check_range, check_seed, field, save_config, to_dict
from dp2osr.engine.budget import DEFAULT_MAX_PIXELS, check_inputs
from dp2osr.engine.jobs import check_outputs, chunk_jobs, output_path, run_jobs
from dp2osr.engine.options import MAX_SAMPLES, SamplingOptions, load_model, sampling_settings
from dp2osr.errors import PartialFailure
from dp2osr.images import atomic_write, list_images, load_image
from dp2osr.math.reward import hybrid_reward
from dp2osr.paths import append_text, check_name, check_output_dir
from dp2osr.runtime import output_lock, process_state

CONFIG_NAME = "upscale_config.yaml"
RUNS_NAME = "upscale_runs.jsonl"
SELECT_MODES = ("none", "nr")
SCORES_CSV = "scores.csv"


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
    overwrite: bool = field(
        False, help="redo outputs that already exist (otherwise they are skipped: resume)"
    )
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
    select: str = field(
        "none",
        help="nr: also write OUTPUT/NAME.png, the sample with the best no-reference score (--select-metrics; "
        "no HR needed), and the per-seed scores in OUTPUT/NAME/scores.csv; none: only the samples",
        choices=list(SELECT_MODES),
    )
    select_metrics: list[str] | None = field(
        None,
        help="no-reference metrics (pyiqa names) that choose the sample for --select nr, min-max normalised "
        "over the image's samples and averaged (default: niqe when the output's short side is >= 96 px, "
        "else piqe; both work offline)",
    )
    weights_dir: Path | None = field(
        None, help="folder with IQA metric weights (only for weight-backed --select-metrics)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.upscale < 1:
            raise ValueError(f"--upscale must be >= 1, got {self.upscale}")
        check_range("samples", self.samples, 1, MAX_SAMPLES, integer=True)
        check_seed(self.seed)
        fr = [n for n, s in metric_lib.catalogue(self.select_metrics or []).items() if s.family != "nr"]
        if fr:
            raise ValueError(f"--select-metrics must be no-reference metrics (there is no HR); got {fr}")
        if self.select == "nr" and self.layout == "flat":
            raise ValueError("--select nr writes OUTPUT/NAME.png itself: use --layout seeds with it")
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")
        if self.layout == "flat" and self.samples != 1:
            raise ValueError(f"--layout flat writes one image per input: use --samples 1, not {self.samples}")


def resolved_config(cfg: UpscaleConfig, bb, device) -> UpscaleConfig:
    """``cfg`` with every value left to the backbone or the machine replaced by the one used."""
    settings = sampling_settings(bb, cfg)
    dtype = next((k for k, v in DTYPES.items() if v == bb.dtype), str(bb.dtype))
    keys = ("steps", "guidance", "negative_prompt", "process_size", "tile_threshold")
    return replace(cfg, dtype=dtype, device=str(device), **{k: settings[k] for k in keys})


def record_run(cfg: UpscaleConfig, out: Path, images_done: int) -> None:
    """OUTPUT/upscale_config.yaml: this run's resolved config (reusable with --config); OUTPUT/upscale_runs.jsonl:
    one line per run (its resolved config, when it ended, the images it finished), so runs into one folder
    are all on record."""
    save_config(cfg, out / CONFIG_NAME)
    record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images_done": images_done, **to_dict(cfg)}
    append_text(out / RUNS_NAME, json.dumps(record) + "\n")


def run(cfg: UpscaleConfig) -> None:
    """Run the model over every input; raises `PartialFailure` (after the others are written) when any failed."""
    check_output_dir(cfg.output)
    with output_lock(cfg.output, "upscale", process_state(cfg.device)[0]):
        _run(cfg)


def _run(cfg: UpscaleConfig) -> None:
    """`run` once the output folder is this run's."""
    state, device = process_state(cfg.device)
    images = list_images(cfg.input)
    stems = [p.stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"inputs with the same name would overwrite each other's outputs: {dup}")
    for p in images:
        check_name(p.stem, f"{p}: image ID")
    check_output_dir(cfg.output)
    check_outputs(cfg.output, stems, cfg.layout == "flat")
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
        bb,
        jobs,
        cfg.output,
        cfg,
        upscale=cfg.upscale,
        overwrite=cfg.overwrite,
        desc="upscale",
        show_progress=state.is_local_main_process,
        flat=cfg.layout == "flat",
    )
    done, failed = result.images_done, len(result.failed)
    if state.is_main_process:
        record_run(resolved_config(cfg, bb, device), Path(cfg.output), done)
    rate = f", {result.seconds / done:.2f} s per image" if done else ""
    print(
        f"[process {state.process_index}] upscale: {done} done, {failed} failed, {result.images_skipped} already "
        f"finished{rate} -> {cfg.output}",
        file=sys.stderr,
    )
    if cfg.select == "nr":
        failed += select_all(cfg, [s for s, _ in mine if s not in result.failed], seeds, device)
    if failed:
        raise PartialFailure(f"{failed} image(s) failed (reported above)")


# ------------------------------------------------------------------------------------ best-of-M selection
def select_metric_names(cfg: UpscaleConfig, short_side: int) -> list[str]:
    """``--select-metrics``, or the default for an output of this short side: niqe (>= 96 px) else piqe."""
    if cfg.select_metrics:
        return list(dict.fromkeys(cfg.select_metrics))
    return ["niqe"] if short_side >= metric_lib.min_size("niqe") else ["piqe"]


def score_candidates(
    files: dict[int, Path], names: list[str], models: dict[str, torch.nn.Module]
) -> pd.DataFrame:
    """Raw scores ``image_id, seed, metric, value`` (long format) of each seed's file, image id ``"x"``."""
    return score_images({s: load_image(path) for s, path in files.items()}, names, models)


def score_images(
    images: dict[int, torch.Tensor], names: list[str], models: dict[str, torch.nn.Module]
) -> pd.DataFrame:
    """`score_candidates` of images in memory (``(1, 3, H, W)`` each, by seed)."""
    batch = torch.cat(list(images.values()))
    rows = []
    for name in names:
        values = metric_lib.score_batch(models[name], batch)
        rows += [("x", seed, name, float(v)) for seed, v in zip(images, values)]
    return pd.DataFrame(rows, columns=["image_id", "seed", "metric", "value"])


def choose(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per seed: raw value per metric, ``reward`` (oriented, min-max over the seeds, averaged) and
    ``chosen`` (the highest reward; the lowest seed on a tie)."""
    names = list(dict.fromkeys(scores["metric"]))
    rewards = hybrid_reward(scores, metric_lib.catalogue(names), scope="image")
    table = scores.pivot(index="seed", columns="metric", values="value")[names].reset_index()
    table = table.merge(rewards[["seed", "reward"]], on="seed").sort_values("seed", ignore_index=True)
    table["chosen"] = False
    table.loc[table["reward"].idxmax(), "chosen"] = True  # idxmax: the first (lowest seed) of equals
    return table


def select_image(
    out: Path, stem: str, seeds: list[int], names: list[str], models: dict[str, torch.nn.Module]
) -> int:
    """Score the samples of ``stem``, write NAME/scores.csv and copy the best to NAME.png; returns its seed."""
    files = {s: output_path(out, stem, s) for s in seeds}
    table = choose(score_candidates(files, names, models))
    table.insert(1, "file", [files[int(s)].name for s in table["seed"]])
    best = int(table.loc[table["chosen"], "seed"].iloc[0])
    atomic_write(out / stem / SCORES_CSV, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    atomic_write(out / f"{stem}.png", lambda tmp: shutil.copyfile(files[best], tmp))
    return best


def select_all(cfg: UpscaleConfig, stems: list[str], seeds: list[int], device: torch.device) -> int:
    """``--select nr`` for every finished image of this process (metrics built once, on ``device``); an image
    a metric cannot score (e.g. too small) is reported by name and skipped. Returns the number skipped."""
    out, models, failed = Path(cfg.output), {}, 0
    for stem in stems:
        side = min(load_image(output_path(out, stem, seeds[0])).shape[-2:])
        names = select_metric_names(cfg, side)
        for name in names:
            if name not in models:
                models[name] = metric_lib.create(name, device, cfg.weights_dir)
        try:
            best = select_image(out, stem, seeds, names, models)
        except (ValueError, RuntimeError) as exc:
            print(f"upscale: {stem}: no selection: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"upscale: {stem}: seed {best} chosen by {', '.join(names)} -> {out / stem}.png", file=sys.stderr
        )
    return failed
