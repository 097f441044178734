"""Experiment trackers of `train --report-to`, through accelerate's tracking API: TensorBoard in OUTPUT/tb
(the default), Weights & Biases (project ``dp2osr``, files in OUTPUT/wandb), both, or none.

`make` builds the trackers the Accelerator is created with (``Accelerator(log_with=...)``); the trainer
starts them (``init_trackers``) and logs every metrics.jsonl row to them (``accelerator.log``). A resumed run's
TensorBoard event file purges the steps after its checkpoint, which the run logs again. It sits in the engine
beside the trainer.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPORT_TO = ("tensorboard", "wandb", "all", "none")
TRACKERS = ("tensorboard", "wandb")


def names(report_to: str) -> list[str]:
    """The trackers ``report_to`` names; ``wandb`` without the wandb package is refused (ValueError)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {list(REPORT_TO)}, got {report_to!r}")
    wanted = list(TRACKERS) if report_to == "all" else [] if report_to == "none" else [report_to]
    if "wandb" in wanted and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--report-to {report_to}: the wandb package is not installed (pip install wandb)")
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None:
        print("note: tensorboard not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        wanted.remove("tensorboard")
    return wanted


def make(report_to: str, out: Path, resume_from: Path | None, config: dict) -> list:
    """The accelerate trackers of ``report_to`` for the run in ``out`` (``resume_from``: its checkpoint)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    made = []
    for name in names(report_to):
        if name == "tensorboard":
            purge = None
            if resume_from is not None:  # TensorBoard hides the earlier files' events from this step on
                purge = json.loads((Path(resume_from) / "train_state.json").read_text())["step"] + 1
            made.append(TensorBoardTracker("tb", str(out), purge_step=purge))
        else:
            made.append(WandBTracker("dp2osr", dir=str(out), name=Path(out).name, config=config))
    return made
