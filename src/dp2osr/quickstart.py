"""`dp2osr quickstart`: the whole DP²O loop, small enough for a laptop CPU, ending in one HTML report.

A composition of the stages: each step is a sub-command's ``run()`` with that stage's own config (nested in
this one, with the quickstart's defaults), writing to a numbered subfolder, so every artefact can be opened:

    OUT/1_degrade/{train,heldout}/   `dp2osr degrade` of tiles of the photos (train and held-out crops)
    OUT/2_sample/                    `dp2osr sample`: M candidates per training crop from the base model
    OUT/3_score/                     `dp2osr score`: IQA scores and the reward of every candidate
    OUT/4_pair/                      `dp2osr pair`: top-N x bottom-N preference pairs with HPO weights
    OUT/5_train/                     `dp2osr train --mode dpo`: a checkpoint every --train.checkpoint-every steps
    OUT/6_eval/step_NNNNNN/          `dp2osr curve`: held-out candidates of every checkpoint, scored
    OUT/6_eval/step_NNNNNN/guard/    `dp2osr score` of the first and last pools with the guard metrics
    OUT/6_eval/                      `dp2osr eval` of the two pools (joint/), summary.md
    OUT/report.html                  `dp2osr report` with the before/after summary as its first section

Held-out crops never enter the pairs (photos are cut into tiles split in a checkerboard: no pixel is shared);
base and DP²O sample them with the same seeds (`dp2osr.before_after`). A rerun with the same options resumes.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP (users can override it): with the active wait policy, threads spin at every
# barrier and sampling on cores shared with other processes is many times slower (docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dp2osr import before_after, curve, degrade, pair, sample, score, train
from dp2osr.config import (
    MAX_SEED,
    check_choices,
    check_range,
    check_resume,
    check_seed,
    field,
    is_saved_config,
    nested,
    save_config,
)
from dp2osr.degrade import DegradeConfig
from dp2osr.engine.options import MAX_SAMPLES, SamplingOptions
from dp2osr.engine.trainer import latest_checkpoint
from dp2osr.images import checkerboard_counts, checkerboard_tiles, list_images, save_image
from dp2osr.math.degradations import MILD
from dp2osr.pair import PairConfig
from dp2osr.paths import check_output_dir, remove_paths
from dp2osr.runtime import LOCK_NAME, RunClock, output_lock
from dp2osr.sample import SampleConfig
from dp2osr.score import ScoreConfig
from dp2osr.train import TrainConfig

CONFIG_NAME = "quickstart_config.yaml"
REPORT_NAME = "report.html"
TIMINGS_NAME = "timings.json"  # seconds per stage, summed over the runs into one --output
PHOTOS = Path(__file__).parent / "assets" / "photos"
# The options of each stage that the quickstart sets itself (`fixed`): no flags, no YAML keys.
_MODEL = "backbone base controlnet device seed".split()
_FIXED_SAMPLE = [*_MODEL, *"input output upscale process_size limit overwrite".split()]
_FIXED_DEGRADE = "input output hr_size scale crop seed device overwrite".split()
_FIXED_TRAIN = [*_MODEL, *"mode data output hpo keep_checkpoints resume upscale eval_data eval_every".split()]
_FIXED_TRAIN += "eval_samples eval_metrics eval_sample_steps eval_process_size heldout_pairs".split()
# The paper's: 1000 steps of 1024 pairs, beta 5000, lr 2e-5; why these: docs/QUICKSTART.md.
_TRAIN = {"mode": "dpo", "steps": 60, "lr": 3e-5, "batch_size": 32, "beta": 500.0}
_TRAIN_LOGS = {"checkpoint_every": 20, "keep_checkpoints": 0, "log_every": 1}
_TRAIN_HELP = (
    "DPO training (paper: 1000 steps of 1024 pairs, beta 5000, lr 2e-5; here: a CPU's, docs/QUICKSTART.md)"
)
_SEED_STRIDE = 100_000  # the sampling seeds of the training pool start at SEED x this, the held-out at + half


@dataclass
class QuickstartConfig:
    """Run the whole DP²O-SR loop on the embedded model and bundled photos, then write an HTML report.

    degrade -> sample -> score -> pair -> DPO training -> held-out pools at every checkpoint -> eval, report:
    Best/Mean/Worst@M before vs after on held-out crops, the reward curve, guard metrics outside the reward.
    Each stage's options are its sub-command's, as --STAGE.OPTION (e.g. --train.beta 5000, --sample.samples
    16). A few minutes on 2 CPU cores; rerun the same command to resume an interrupted run.
    """

    output: Path = field(Path("quickstart_out"), help="output folder (stages, report.html)", run_only=True)
    backbone: str = field(
        "embedded",
        help="embedded (the small SR model shipped in the package) or a `dp2osr sample --backbone`",
    )
    base: Path | None = field(None, help="base model folder (default: the backbone's own)")
    controlnet: Path | None = field(
        None, help="the starting ControlNet, DPO's reference (default: the base's)"
    )
    photos: Path | None = field(None, help="folder of HR photos to cut into crops (default: the 4 bundled)")
    hr_size: int = field(64, help="HR crop side (the LR is hr_size/4); photos are cut into tiles this big")
    images: int = field(10, help="training crops: the DPO pairs come from these only")
    heldout: int = field(8, help="held-out crops for evaluation: never in the DPO pairs")
    eval_samples: int | None = field(None, help="seeds per held-out crop (default: --sample.samples)")
    guard_metrics: list[str] | None = field(
        None,
        help="metrics NOT in the reward, shown beside it for the first and last held-out pools (PSNR-Y and SSIM-Y "
        "always are). Default: the first of niqe (crops >= 96 px), brisque, piqe that is not in the reward",
    )
    seed: int = field(0, help="whole-run seed: degradations, crop choice, sampling seeds, data order, noise")
    data_seed: int | None = field(
        None,
        help="seed of the data alone: degradations, crop choice and the pools' sampling seeds (default: --seed). "
        "Runs with the same --data-seed and different --seed share their crops and pools and differ only in "
        "training (data order, noise)",
    )
    device: str = field("auto", help="auto, cpu or cuda", choices=["auto", "cpu", "cuda"], run_only=True)
    overwrite: bool = field(False, help="delete an earlier quickstart in --output first", run_only=True)
    degrade: DegradeConfig = nested(
        DegradeConfig, "the LR degradation (here: the mild preset)", _FIXED_DEGRADE, **MILD
    )
    sample: SampleConfig = nested(
        SampleConfig, "every pool's sampling", _FIXED_SAMPLE, samples=8, batch_size=8
    )
    score: ScoreConfig = nested(ScoreConfig, "the training pool's reward", ["candidates", "output", "device"])
    pair: PairConfig = nested(PairConfig, "preference pairs", ["rewards", "output", "overwrite"], ratio=0.25)
    train: TrainConfig = nested(TrainConfig, _TRAIN_HELP, _FIXED_TRAIN, **_TRAIN, **_TRAIN_LOGS)

    def __post_init__(self) -> None:
        check_choices(self)
        self.output = Path(self.output)
        check_range("images", self.images, 1, integer=True)
        check_range("heldout", self.heldout, 1, integer=True)
        check_range("sample.samples", self.sample.samples, 2, integer=True)  # a winner and a loser
        if self.eval_samples is not None:
            check_range("eval_samples", self.eval_samples, 1, MAX_SAMPLES, integer=True)
        # The stages' seeds are derived from this one (SEED x 100000 + k): they must stay seeds too.
        check_seed(self.seed, high=MAX_SEED // _SEED_STRIDE - 1)
        if self.data_seed is not None:
            check_seed(self.data_seed, high=MAX_SEED // _SEED_STRIDE - 1)
        if self.hr_size < 16 or self.hr_size % 16:
            raise ValueError(f"--hr-size must be a multiple of 16 (>= 16), got {self.hr_size}")
        before_after.guards(self.guard_metrics, self.reward_metrics, self.hr_size)

    @property
    def reward_metrics(self) -> list[str]:
        return score.resolved_metrics(self.score)

    @property
    def pool_seed(self) -> int:
        """The seed of the crops, degradations and pools: --data-seed, or --seed."""
        return self.seed if self.data_seed is None else self.data_seed


@dataclass(frozen=True)
class Layout:
    """Where each stage writes, under ``root``."""

    root: Path

    degrade = property(lambda self: self.root / "1_degrade")
    sample = property(lambda self: self.root / "2_sample")
    score = property(lambda self: self.root / "3_score")
    pair = property(lambda self: self.root / "4_pair")
    train = property(lambda self: self.root / "5_train")
    eval = property(lambda self: self.root / "6_eval")
    stages = property(lambda self: [self.degrade, self.sample, self.score, self.pair, self.train, self.eval])


def resolved(cfg: QuickstartConfig, lay: Layout) -> QuickstartConfig:
    """``cfg`` with every stage's `fixed` options set: its folders in ``lay``, the model, device and seeds."""
    model = {"backbone": cfg.backbone, "base": cfg.base, "controlnet": cfg.controlnet, "device": cfg.device}
    return dataclasses.replace(
        cfg,
        data_seed=None if cfg.data_seed == cfg.seed else cfg.data_seed,  # the same run as without it
        degrade=dataclasses.replace(
            cfg.degrade, hr_size=cfg.hr_size, scale=4, crop="center", seed=cfg.pool_seed
        ),
        sample=dataclasses.replace(
            cfg.sample,
            **model,
            input=lay.degrade / "train",
            output=lay.sample,
            seed=cfg.pool_seed * _SEED_STRIDE,
            process_size=cfg.hr_size,
        ),
        score=dataclasses.replace(cfg.score, candidates=lay.sample, output=lay.score, device=cfg.device),
        pair=dataclasses.replace(
            cfg.pair, rewards=lay.score / "rewards.parquet", output=lay.pair / "pref_pairs.parquet"
        ),
        train=dataclasses.replace(
            cfg.train,
            **model,
            seed=cfg.seed,
            data=lay.pair / "pref_pairs.parquet",
            output=lay.train,
            hpo=cfg.pair.hpo,
        ),
    )


def curve_config(cfg: QuickstartConfig, lay: Layout) -> curve.CurveConfig:
    """`dp2osr curve` of the run's checkpoints on the held-out crops, sampled as the training pool was."""
    sampling = {f.name: getattr(cfg.sample, f.name) for f in dataclasses.fields(SamplingOptions)}
    return curve.CurveConfig(
        **sampling,
        run_dir=lay.train,
        heldout=lay.degrade / "heldout",
        output=lay.eval,
        samples=cfg.eval_samples or cfg.sample.samples,
        seed=cfg.pool_seed * _SEED_STRIDE + _SEED_STRIDE // 2,
        preset=cfg.score.preset,
        metrics=cfg.reward_metrics,
        weights_dir=cfg.score.weights_dir,
        dither=cfg.score.dither,
    )


def prepare_data(cfg: QuickstartConfig, folder: Path) -> None:
    """Stage 1: tiles of the photos -> `dp2osr degrade` into ``folder``/train and ``folder``/heldout."""
    photos = list_images(Path(cfg.photos) if cfg.photos is not None else PHOTOS)
    train_tiles, held = checkerboard_tiles(photos, cfg.hr_size)
    check_inputs(cfg, (len(train_tiles), len(held)))
    rng = np.random.default_rng(cfg.pool_seed)
    for name, pool, n in (("train", train_tiles, cfg.images), ("heldout", held, cfg.heldout)):
        tile_dir = folder / f"tiles_{name}"
        for tile_id, tile in [pool[i] for i in sorted(rng.permutation(len(pool))[:n])]:
            if not (tile_dir / f"{tile_id}.png").is_file():
                save_image(tile, tile_dir / f"{tile_id}.png")
        degrade.run(dataclasses.replace(cfg.degrade, input=tile_dir, output=folder / name))


def train_dpo(cfg: train.TrainConfig) -> None:
    """Stage 5: `dp2osr train`, resumed from its newest checkpoint; nothing to do when it finished earlier."""
    last = latest_checkpoint(cfg.output)
    if last is not None and json.loads((last / "train_state.json").read_text())["step"] >= cfg.steps:
        return
    train.run(dataclasses.replace(cfg, resume=any(Path(cfg.output).glob("checkpoint-*"))))  # newest complete


def run_stages(cfg: QuickstartConfig, lay: Layout, prepare=prepare_data, sections=()) -> dict:
    """Every stage in order (each resumes from what ``lay`` already holds); returns the summary dict.
    ``prepare(cfg, folder)`` makes stage 1's crops; ``sections``: more HTML sections for the report."""
    clock = RunClock(lay.root / TIMINGS_NAME)
    steps = [
        ("degrade", f"{cfg.images} + {cfg.heldout} crops", lambda: prepare(cfg, lay.degrade)),
        ("sample", f"M = {cfg.sample.samples}", lambda: sample.run(cfg.sample)),
        ("score", f"{', '.join(cfg.reward_metrics)} -> reward", lambda: score.run(cfg.score)),
        ("pair", f"top-N x bottom-N, HPO {cfg.pair.hpo}", lambda: pair.run(cfg.pair)),
        ("train", f"{cfg.train.steps} DPO steps", lambda: train_dpo(cfg.train)),
        ("eval", "held-out pools of every checkpoint", lambda: curve.run(curve_config(cfg, lay))),
    ]
    done = {}
    for n, (name, text, work) in enumerate(steps, 1):
        print(f"[quickstart {n}/7] {name}: {text}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        done[name] = work()
        clock.lap(name, t)
    t = time.perf_counter()
    print("[quickstart 7/7] report: guards, before/after, report.html", file=sys.stderr, flush=True)
    pools = before_after.score_guards(cfg, lay.eval, cfg.train.steps)
    summary = before_after.compare(cfg, pools, lay.eval / "joint")
    summary["pairs"] = len(done["pair"])
    summary["curve"] = done["eval"].to_dict(orient="list")
    clock.lap("report", t)
    summary["timings"] = clock.totals()
    (lay.eval / "summary.json").write_text(json.dumps(summary, indent=2))
    (lay.eval / "summary.md").write_text(before_after.summary_markdown(cfg, summary))
    summary["report"] = str(
        before_after.write_report(cfg, summary, lay.eval, lay.root / REPORT_NAME, sections)
    )
    return summary


def check_inputs(cfg: QuickstartConfig, counts: tuple[int, int] | None = None) -> None:
    """The photos exist, are images and give enough tiles for --images and --heldout (``counts``: the tiles
    already cut; default: counted from the photos' sizes, before anything in --output changes)."""
    if counts is None:
        counts = checkerboard_counts(list_images(Path(cfg.photos) if cfg.photos else PHOTOS), cfg.hr_size)
    for (name, flag, n), got in zip(
        (("train", "images", cfg.images), ("heldout", "heldout", cfg.heldout)), counts
    ):
        if got < n:
            raise ValueError(
                f"--{flag} {n}: the photos give only {got} {name} tiles of {cfg.hr_size} px; lower it, lower "
                "--hr-size or add photos (--photos)"
            )


def prepare_output(cfg: QuickstartConfig) -> QuickstartConfig:
    """Make ``cfg.output`` ready: new, or an earlier quickstart with the same options (resumed) or
    ``--overwrite`` (its own outputs deleted first, after the inputs are checked); anything else is refused.
    Saves the resolved config there and returns it."""
    out = Path(cfg.output)
    cfg = resolved(cfg, Layout(out))
    check_inputs(cfg)
    if out.exists() and any(p != out / LOCK_NAME for p in out.iterdir()):
        if not is_saved_config(out / CONFIG_NAME, QuickstartConfig):  # then nothing here is a quickstart's
            raise ValueError(
                f"{out} is not empty and holds no quickstart's {CONFIG_NAME}; choose another --output"
            )
        if cfg.overwrite:  # only its own outputs
            remove_paths([*Layout(out).stages, out / REPORT_NAME, out / TIMINGS_NAME, out / CONFIG_NAME])
        else:
            check_resume(cfg, out / CONFIG_NAME, "a quickstart", "use --overwrite or another --output")
    save_config(cfg, out / CONFIG_NAME)
    return cfg


def run(cfg: QuickstartConfig) -> dict:
    """Run ``dp2osr quickstart``: the whole loop, then print the summary and the report's path."""
    check_output_dir(Path(cfg.output))
    with output_lock(cfg.output, "quickstart"):  # before --overwrite deletes anything
        cfg = prepare_output(cfg)
        summary = run_stages(cfg, Layout(Path(cfg.output)))
    print(before_after.summary_markdown(cfg, summary))
    print(f"total {summary['timings']['total']:.0f} s; report:")
    print(Path(summary["report"]).resolve())
    return summary
