"""`dp2osr curve`: the held-out hybrid reward over the checkpoints of a training run (the paper's reward curve).

At step 0 (the run's starting ControlNet) and at every ``checkpoint-NNNNNN`` of the run, the held-out LR
images are sampled with the same M seeds and scored (`dp2osr.engine.heldout`); the rows go to
``reward_curve.csv`` and ``reward_curve.png``. A rerun resumes, and a rerun after more checkpoints were saved
only samples those.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dp2osr import metrics as metric_lib
from dp2osr import tables
from dp2osr.backbones import NAMES
from dp2osr.config import (
    check_range,
    check_resume,
    check_seed,
    data_root_field,
    field,
    load_yaml,
    save_config,
)
from dp2osr.engine.heldout import (
    CURVE_CSV,
    CURVE_PNG,
    HeldoutEval,
    controlnet_from,
    read_heldout,
    run_checkpoints,
    step_dir,
)
from dp2osr.engine.options import MAX_SAMPLES, SamplingOptions, load_model
from dp2osr.engine.provenance import weights_sha
from dp2osr.images import atomic_write
from dp2osr.paths import check_output_dir
from dp2osr.runtime import output_lock, process_state
from dp2osr.train import CONFIG_NAME as TRAIN_CONFIG
from dp2osr.train import TrainConfig

CONFIG_NAME = "curve_config.yaml"


# ------------------------------------------------------------------------------------------ command
@dataclass(kw_only=True)
class CurveConfig(SamplingOptions):
    """The held-out hybrid reward of a training run's starting model and of every checkpoint it saved.

    RUN_DIR is a `dp2osr train` output folder (checkpoint-NNNNNN/model.safetensors; train with
    --keep-checkpoints 0 to keep them all). HELDOUT is a `dp2osr degrade` folder of images that were not in the
    training pairs (or a folder of LR images: then only no-reference metrics can score). The model options
    default to the run's own (its train_config.yaml); step 0 is its starting ControlNet. Writes
    OUTPUT/step_NNNNNN/ (candidates and scores), OUTPUT/reward_curve.csv and OUTPUT/reward_curve.png.
    """

    # Not "--run": torchrun would take it for an abbreviation of its own --run-path and stop.
    run_dir: Path = field(help="a `dp2osr train` output folder", run_only=True)
    heldout: Path = field(
        help="held-out images: a `dp2osr degrade` folder (LR with HR) or a folder of LR images"
    )
    output: Path | None = field(None, help="output folder (default: RUN_DIR/reward_curve)", run_only=True)
    backbone: str | None = field(None, help="model family (default: the run's)", choices=list(NAMES))
    base: Path | None = field(None, help="base model folder (default: the run's --base)")
    controlnet: Path | None = field(None, help="the step-0 ControlNet (default: the run's --controlnet)")
    samples: int = field(4, help="M: seeds per held-out image (the same at every step)")
    seed: int = field(50_000, help="seed of the first sample (seeds SEED .. SEED+M-1)")
    preset: str = field(
        "offline",
        help="metric set of the reward: offline (no weights) or paper (the paper's FR + NR sets; needs weights)",
        choices=sorted(metric_lib.PRESETS),
    )
    metrics: list[str] | None = field(None, help="metric names (pyiqa names); overrides --preset")
    weights_dir: Path | None = field(None, help="folder with IQA metric weights (for weight-backed metrics)")
    dither: int = field(
        0,
        help="score each sample as the mean over K invisibly dithered copies (`dp2osr score --dither`); 0 = plain",
    )
    upscale: int = field(4, help="LR -> output scale factor")
    limit: int | None = field(None, help="use only the first N held-out images (sorted by ID)")
    data_root: list[Path] = data_root_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("samples", self.samples, 1, MAX_SAMPLES, integer=True)
        check_seed(self.seed)
        if self.dither < 0:
            raise ValueError(f"--dither must be >= 0 (0 = plain scores), got {self.dither}")


def with_run_model(cfg: CurveConfig) -> CurveConfig:
    """``cfg`` with backbone / base / controlnet filled in from the run's train_config.yaml where not given."""
    path = Path(cfg.run_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --run-dir must be a `dp2osr train` output folder")
    saved = load_yaml(TrainConfig, path)
    for name in ("backbone", "base", "controlnet"):
        value = saved.get(name)
        if getattr(cfg, name) is None and value is not None:
            setattr(cfg, name, value if name == "backbone" else Path(value))
    cfg.backbone = cfg.backbone or "embedded"
    return cfg


SOURCE_NAME = (
    "source.json"  # in each step_NNNNNN/: the run and the checkpoint (with its content hash) it is of
)


def record_source(out: Path, step: int, run_dir: Path, checkpoint: Path | None) -> None:
    """Record in the step's pool folder which run and which checkpoint content it was sampled from."""
    record = {
        "run": os.path.abspath(run_dir),
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
        "checkpoint_sha": weights_sha(str(checkpoint)) if checkpoint else "",
    }
    atomic_write(step_dir(out, step) / SOURCE_NAME, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))


def check_sources(out: Path, run_dir: Path) -> None:
    """Refuse an output folder holding the pools of another run (its curve would mix the two runs). A pool of
    this run whose checkpoint was replaced is sampled again: its samples record the checkpoint's content
    (`engine.provenance.model_identity`). The starting model's pool (no checkpoint) is no run's own: runs from
    one model share it (the ablations link it), and a pool of another model is sampled again the same way."""
    here = os.path.abspath(run_dir)
    for record in sorted(Path(out).glob(f"step_*/{SOURCE_NAME}")):
        try:
            source = json.loads(record.read_text())
            owner, checkpoint = source.get("run"), source.get("checkpoint")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{record} is not a readable pool record; choose another --output") from None
        if owner != here and checkpoint:
            raise ValueError(
                f"{out} holds the reward curve of the run {owner} ({record.parent.name}), not of --run-dir "
                f"{run_dir}; choose another --output"
            )


@tables.with_data_roots
def run(cfg: CurveConfig) -> pd.DataFrame:
    """Run ``dp2osr curve``: sample and score the held-out images at step 0 and every checkpoint.

    Under ``accelerate launch`` / ``torchrun`` the sampling of every step is shared by the processes.
    """
    out = Path(cfg.output or Path(cfg.run_dir) / "reward_curve")
    check_output_dir(out)
    with output_lock(out, "curve", process_state(cfg.device)[0]):
        return _curve(cfg, out)


def _curve(cfg: CurveConfig, out: Path) -> pd.DataFrame:
    """`run` once the output folder ``out`` is this run's."""
    cfg = with_run_model(cfg)
    checkpoints = run_checkpoints(cfg.run_dir)
    if not checkpoints:
        raise ValueError(f"{cfg.run_dir} holds no finished checkpoint-NNNNNN/ (with model.safetensors)")
    names = metric_lib.resolve_names(cfg.preset, cfg.metrics)
    read_heldout(cfg.heldout, names, cfg.limit)  # bad input fails before the model loads
    check_sources(out, cfg.run_dir)
    check_resume(cfg, out / CONFIG_NAME, "a reward curve", "use the same options or another --output")
    state, device = process_state(cfg.device)
    bb = load_model(cfg, device)
    state.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    if state.is_main_process:
        save_config(cfg, out / CONFIG_NAME)
    ev = HeldoutEval(
        bb,
        cfg.heldout,
        out,
        cfg,
        samples=cfg.samples,
        seed=cfg.seed,
        metrics=names,
        weights_dir=cfg.weights_dir,
        limit=cfg.limit,
        upscale=cfg.upscale,
        dither=cfg.dither,
    )
    for step in [0, *sorted(checkpoints)]:
        if state.is_main_process:
            print(f"curve: step {step} -> {step_dir(out, step)}", file=sys.stderr)
        net = None if step == 0 else controlnet_from(bb, checkpoints[step])
        ev.pool(step, net, state, source=None if step == 0 else str(checkpoints[step]))
        if state.is_main_process:
            record_source(out, step, cfg.run_dir, checkpoints.get(step))
    if not state.is_main_process:
        return pd.DataFrame()
    table = ev.curve()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"curve: {out / CURVE_CSV} and {out / CURVE_PNG}", file=sys.stderr)
    return table
