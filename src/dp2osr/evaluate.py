"""The ``eval`` stage: IQA tables for SR folders, Best/Mean/Worst@M of candidate pools, reward curves.

Each mode's work has its own module: SR folders against HR (PSNR/SSIM on Y, pyiqa metrics) in
`dp2osr.eval_folders`, pools on one reward scale and their Best/Mean/Worst@M in `dp2osr.eval_pools`; the
reward curve is a plot (`dp2osr.plots`). This module is the stage: the config, the checks, and the tables,
Markdown and plots written to ``--output`` (read back by ``report``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dp2osr import plots, tables
from dp2osr.config import data_root_field, field, to_dict
from dp2osr.errors import PartialFailure
from dp2osr.eval_folders import evaluate_folders, sr_sets, summary_markdown
from dp2osr.eval_pools import bestm_markdown, evaluate_pools, find_rewards
from dp2osr.images import atomic_write
from dp2osr.metrics import PRESETS
from dp2osr.paths import check_output_dir
from dp2osr.runtime import output_lock

PER_IMAGE_CSV = "eval_per_image.csv"
SUMMARY_JSON = "eval_summary.json"
SUMMARY_MD = "eval_summary.md"
BESTM_CSV = "bestm.csv"
BESTM_MD = "bestm.md"
BESTM_PNG = "bestm.png"
SPREAD_CSV = "pool_spread.csv"
CURVE_PNG = "reward_curve.png"
CONFIG_JSON = "eval_config.json"

# The offline preset of `dp2osr score`: no weights, cheap on a CPU (512 px: gmsd 9, fsim 80, piqe 23 ms).
DEFAULT_METRICS = list(PRESETS["offline"])


@dataclass
class EvalConfig:
    """Evaluate super-resolution results.

    A) --sr FOLDER [FOLDER ...] [--hr FOLDER]: per-image and mean ± std tables of PSNR/SSIM (Y channel of
       YCbCr, Real-ISR convention) and pyiqa --metrics; SR and HR are matched by file stem (see
       --name-pattern). A missing or size-mismatched pair is reported by name and the exit status is 1.
    B) --pools rewards.parquet [...]: Best/Mean/Worst@M table and plot, per-image spread over seeds.
    C) --reward-curve TABLE: (step, reward[, metric ...]) CSV/Parquet -> PNG line plot.
    Any combination may be given in one call; everything is written to --output.
    """

    output: Path = field(help="output folder for tables (CSV/JSON/Markdown) and plots (PNG)")
    sr: list[Path] = field(
        [],
        help="SR result folder(s) to evaluate (mode A): image files, or a `dp2osr upscale` / `sample` output "
        "(NAME/seed_XXXX.png: each seed is evaluated as its own set, or only --sr-seed)",
    )
    sr_seed: int | None = field(
        None, help="for --sr folders of NAME/seed_XXXX.png: evaluate only this seed (default: every seed)"
    )
    names: list[str] = field([], help="labels for the --sr folders; empty = the folder names")
    hr: Path | None = field(None, help="HR (ground-truth) folder; without it only no-reference metrics run")
    metrics: list[str] = field(
        DEFAULT_METRICS,
        help="pyiqa metric names besides PSNR/SSIM (which always run when --hr is given; "
        "'none' = no others); metrics needing weights must find them in --weights-dir or pyiqa's cache",
    )
    crop_border: int = field(0, help="pixels cropped from each border of SR and HR before every metric")
    name_pattern: str | None = field(None, help="regex applied to SR file stems to get the HR stem")
    name_replace: str = field("", help="replacement for --name-pattern (re.sub syntax, e.g. '\\1')")
    device: str = field("auto", help="device for pyiqa metrics: auto, cpu, cuda, cuda:1, ...")
    weights_dir: Path | None = field(None, help="folder of IQA weight files (else pyiqa's torch-hub cache)")
    pools: list[Path] = field([], help="rewards.parquet file(s) (or folders holding one) of candidate pools")
    pool_names: list[str] = field([], help="labels for the --pools; empty = their parent folder names")
    allow_separate_scales: bool = field(
        False,
        help="with several --pools whose raw scores (scores.parquet beside rewards.parquet) are missing, plot "
        "each pool's own min-max normalised reward, labelled as not comparable (default: refuse). With the "
        "raw scores, every pool's reward is recomputed with bounds fitted on all pools together",
    )
    reward_column: str = field("reward", help="column of rewards.parquet used for Best/Mean/Worst@M")
    ms: list[int] = field([], help="values of M; empty = 1, 2, 4, ... up to the pool size")
    reward_curve: Path | None = field(None, help="table with columns step, reward[, more] to plot (mode C)")
    curve_smooth: int = field(1, help="moving-average window for the reward curve plot (1 = raw)")
    data_root: list[Path] = data_root_field()


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))


def _write_folders(cfg: EvalConfig, out: Path) -> list[str]:
    """Mode A's tables (per image, summary JSON and Markdown); returns the problems with the image pairs."""
    table, summary, problems = evaluate_folders(cfg)
    _write_csv(out / PER_IMAGE_CSV, table)
    _write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2))
    _write_text(out / SUMMARY_MD, summary_markdown(summary))
    print(summary_markdown(summary))
    for p in problems:
        print(f"eval: problem: {p}", file=sys.stderr)
    return problems


def _write_pools(cfg: EvalConfig, out: Path) -> None:
    """Mode B's Best/Mean/Worst@M table, Markdown and plot, and the per-image spread."""
    table, spread, scale = evaluate_pools(cfg)
    table["scale"] = scale
    _write_csv(out / BESTM_CSV, table)
    _write_csv(out / SPREAD_CSV, spread)
    text = bestm_markdown(table, spread, cfg.reward_column, scale)
    _write_text(out / BESTM_MD, text)
    plots.write_png(plots.plot_bestm(table, "Best / Mean / Worst@M", ylabel=scale), out / BESTM_PNG)
    print(text)


@tables.with_data_roots
def run(cfg: EvalConfig) -> None:
    """Run every mode whose inputs are given; raises `PartialFailure` (after writing every table) when image
    pairs were missing or mismatched."""
    if not (cfg.sr or cfg.pools or cfg.reward_curve):
        raise ValueError("nothing to evaluate: give --sr (with --hr), --pools and/or --reward-curve")
    if cfg.crop_border < 0:
        raise ValueError(f"--crop-border must be >= 0, got {cfg.crop_border}")
    out = Path(cfg.output)
    check_output_dir(out)  # writes nothing: an output that can never be written is named first
    _check_inputs(cfg)
    with output_lock(out, "eval"):
        _evaluate(cfg, out)


def _check_inputs(cfg: EvalConfig) -> None:
    """Every input folder and table is there (FileNotFoundError naming the first missing one), before anything
    is written to ``--output``."""
    for folder in cfg.sr:
        if not Path(folder).exists():
            raise FileNotFoundError(f"SR folder not found: {folder}")
        sr_sets(folder, "", cfg.sr_seed)  # a seed layout without --sr-seed's seed, or without images
    if cfg.hr is not None and not Path(cfg.hr).is_dir():
        raise FileNotFoundError(f"HR folder not found: {cfg.hr}")
    for pool in cfg.pools:
        find_rewards(pool)
    if cfg.reward_curve is not None and not Path(cfg.reward_curve).is_file():
        raise FileNotFoundError(f"reward curve table not found: {cfg.reward_curve}")


def _evaluate(cfg: EvalConfig, out: Path) -> None:
    """`run` once the output folder ``out`` is this run's."""
    _write_text(out / CONFIG_JSON, json.dumps(to_dict(cfg), indent=2, default=str))
    problems: list[str] = []
    if cfg.sr:
        problems = _write_folders(cfg, out)
    if cfg.pools:
        _write_pools(cfg, out)
    if cfg.reward_curve:
        curve = plots.read_table(Path(cfg.reward_curve))
        plots.write_png(plots.plot_curve(curve, smooth=max(1, cfg.curve_smooth)), out / CURVE_PNG)
    print(f"eval: outputs in {out}", file=sys.stderr)
    if problems:
        raise PartialFailure(f"{len(problems)} problem(s) with the image pairs (reported above)")
