"""`dp2osr score`: IQA scores and the hybrid reward of every candidate of a pool (the paper's reward labels).

The scoring itself (resumable, per-image part files, sharded over the processes of `accelerate launch`) is
`dp2osr.engine.scoring`; this module is the command: options, checks, the resolved config beside the output,
and the exit status.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dp2osr import metrics as metric_lib
from dp2osr import tables
from dp2osr.config import data_root_field, field, save_config
from dp2osr.engine.pools import candidates_dir
from dp2osr.engine.scoring import ScoreOptions, ScoreResult, score_pool
from dp2osr.errors import PartialFailure
from dp2osr.math.reward import FAMILIES
from dp2osr.paths import check_output_dir
from dp2osr.runtime import output_lock, process_state

CONFIG_FILE = "score_config.yaml"


@dataclass(kw_only=True)
class ScoreConfig(ScoreOptions):
    """Score every candidate of a `sample` pool with IQA metrics and compute the hybrid reward.

    Full-reference (FR) metrics compare each candidate with its HR image; candidates without an HR (empty
    hr_path) get no FR scores and their reward uses the NR metrics alone. Writes scores.parquet and
    rewards.parquet; an interrupted run resumes where it stopped (rerun the same command). The default
    `offline` preset needs no model weights; `paper` needs the weights of LPIPS, TOPIQ, A-FINE, MANIQA, MUSIQ,
    CLIP-IQA+ and Q-Align (see --weights-dir).
    """

    candidates: Path = field(help="folder holding candidates.parquet (the output folder of `sample`)")
    output: Path | None = field(None, help="output folder (default: the candidates folder)")
    preset: str = field(
        "offline",
        help="metric set: offline (no weights: " + ", ".join(metric_lib.PRESETS["offline"]) + ") or paper "
        "(the paper's FR set lpips, topiq_fr, afine_fr and NR set maniqa, musiq, clipiqa+, topiq_nr, afine_nr, "
        "qalign; needs their weights)",
        choices=sorted(metric_lib.PRESETS),
    )
    metrics: list[str] | None = field(None, help="metric names (pyiqa names); overrides --preset")
    data_root: list[Path] = data_root_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        families = {
            s.family for s in metric_lib.catalogue(resolved_metrics(self)).values()
        }  # unknown names fail
        for family in FAMILIES:
            weight, other = (self.w_fr, self.w_nr) if family == "fr" else (self.w_nr, self.w_fr)
            if weight > 0 and other == 0 and family not in families:
                raise ValueError(
                    f"--w-{family} > 0 alone needs at least one {family.upper()} metric in --metrics"
                )


def resolved_metrics(cfg: ScoreConfig) -> list[str]:
    """The metric names a config scores with: ``metrics``, else its ``preset``'s."""
    return metric_lib.resolve_names(cfg.preset, cfg.metrics)


@tables.with_data_roots
def run(cfg: ScoreConfig) -> ScoreResult:
    """Score the pool in ``cfg.candidates``; write scores.parquet and rewards.parquet.

    Under `accelerate launch` / torchrun the images are dealt to the processes and the main process writes
    the tables. Raises `PartialFailure` when some files could not be read (each is reported by name on stderr and left
    out of the tables; every other candidate is still scored and the tables are written).
    """
    state, device = process_state(cfg.device)  # a missing CUDA device fails before any work
    if cfg.weights_dir is not None and not Path(cfg.weights_dir).is_dir():
        raise FileNotFoundError(f"weights_dir not found: {cfg.weights_dir}")
    cand_dir = candidates_dir(cfg.candidates)
    out_dir = Path(cfg.output) if cfg.output is not None else cand_dir
    check_output_dir(out_dir)
    names = resolved_metrics(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir, "score", state):
        if state.is_main_process:
            # the resolved config: the exact metric list and output folder this run used
            save_config(dataclasses.replace(cfg, metrics=names, output=out_dir), out_dir / CONFIG_FILE)
        result = score_pool(cand_dir, out_dir, names, cfg, state=state, device=device)
    if result.errors:
        raise PartialFailure(
            f"{len(result.errors)} problem(s); the affected candidates are missing from the tables:\n  "
            + "\n  ".join(result.errors.values())
            + "\nfix or remove the files (and their rows in candidates.parquet), then rerun to finish"
        )
    return result
