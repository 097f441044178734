"""`dp2osr sample`: M seeded SR candidates per LR image — the preference pool's raw material.

Candidate k of an image uses seed ``seed + k`` and is written atomically to ``OUTPUT/ID/seed_XXXX.png``; a
rerun skips finished files, so a killed job resumes to exactly the pool an uninterrupted one makes. Under
``accelerate launch`` the (image, seed-chunk) work items are dealt round-robin to the processes, and the main
process writes ``candidates.parquet`` once all are done.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from dp2osr import tables
from dp2osr.config import check_range, check_resume, check_seed, data_root_field, field, save_config
from dp2osr.engine.budget import DEFAULT_MAX_PIXELS, check_inputs
from dp2osr.engine.jobs import check_outputs
from dp2osr.engine.options import MAX_SAMPLES, SamplingOptions, load_model
from dp2osr.engine.pool_store import repair_shards
from dp2osr.engine.pools import read_inputs, sample_pool
from dp2osr.engine.provenance import model_fields
from dp2osr.errors import PartialFailure
from dp2osr.paths import check_output_dir
from dp2osr.runtime import output_lock, process_state

CONFIG_NAME = "sample_config.yaml"
POOL_LAYOUTS = ("files", "shards")


@dataclass(kw_only=True)
class SampleConfig(SamplingOptions):
    """Sample M seeded SR candidates for every LR image (resumable, shardable with accelerate launch).

    INPUT is a `dp2osr degrade` folder (pairs.parquet: LR with its HR) or a folder of LR images (no HR:
    only no-reference metrics can score those). Writes OUTPUT/ID/seed_XXXX.png (--pool-layout shards: tar
    files OUTPUT/shards/*.tar holding them), OUTPUT/candidates.parquet and OUTPUT/sample_config.yaml. Rerun the same command to resume.
    """

    input: Path = field(
        help="a `dp2osr degrade` output folder (with pairs.parquet) or a folder of LR images", run_only=True
    )
    output: Path = field(help="output folder of the candidate pool", run_only=True)
    samples: int = field(
        32, help="candidates per image (M; paper: 32 for SD2, 64 for FLUX); candidate k uses seed SEED+k"
    )
    seed: int = field(0, help="seed of the first candidate")
    upscale: int = field(4, help="LR -> output scale factor (1 if the LR is already upsampled)")
    limit: int | None = field(None, help="use only the first N images (sorted by ID)", run_only=True)
    overwrite: bool = field(
        False, help="resample existing candidates (default: keep them, i.e. resume)", run_only=True
    )
    pool_layout: str = field(
        "files",
        help="how the candidates are stored: files (OUTPUT/ID/seed_XXXX.png) or shards (tar files "
        "OUTPUT/shards/*.tar of many candidates each, for pools of millions; every stage reads both)",
        choices=POOL_LAYOUTS,
    )
    max_pixels: int = field(
        DEFAULT_MAX_PIXELS,
        help="refuse an image whose output has more pixels than this (default 4096x4096), before any work, with "
        "its estimated memory and time; 0 = no limit",
        run_only=True,
    )
    data_root: list[Path] = data_root_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("samples", self.samples, 1, MAX_SAMPLES, integer=True)
        check_seed(self.seed)
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")


@tables.with_data_roots
def run(cfg: SampleConfig) -> None:
    """Run ``dp2osr sample``; raises `PartialFailure` (after writing the rest of the pool) when images failed."""
    state, device = process_state(cfg.device)
    out = Path(cfg.output)
    images = read_inputs(cfg.input, cfg.limit)
    check_output_dir(out)
    check_outputs(out, images.image_id)
    check_resume(cfg, out / CONFIG_NAME, "candidates")
    check_inputs([Path(p) for p in images.lr_path], cfg, device.type == "cpu", "sample")
    bb = load_model(cfg, device)
    with output_lock(out, "sample", state):
        _sample(cfg, state, bb, images)


def _sample(cfg: SampleConfig, state, bb, images) -> None:
    """`run` once the model is loaded and the output folder is this run's."""
    out = Path(cfg.output)
    if state.is_main_process:
        save_config(cfg, out / CONFIG_NAME)
        for stale in out.rglob(".tmp_*"):  # half-written files of a killed run
            stale.unlink()
        repair_shards(out)  # drop a member a killed run left cut short
    state.wait_for_everyone()
    seeds = [cfg.seed + k for k in range(cfg.samples)]
    result, failed = sample_pool(
        bb,
        images,
        out,
        seeds,
        cfg,
        model=model_fields(cfg),
        upscale=cfg.upscale,
        overwrite=cfg.overwrite,
        state=state,
        layout=cfg.pool_layout,
    )
    if state.is_main_process:
        print(
            f"sample: {len(images) - len(failed)} images x {len(seeds)} seeds in {out} ({result.written} new on "
            f"process 0); {len(failed)} unreadable images skipped",
            file=sys.stderr,
        )
    if failed:
        raise PartialFailure(
            f"{len(failed)} image(s) could not be sampled (reported above): {sorted(failed)[:5]}"
        )
