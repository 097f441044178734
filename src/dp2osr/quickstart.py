"""`dp2osr quickstart`: the whole DP²O loop, small enough for a laptop CPU, ending in one HTML report.

degrade -> sample (M candidates) -> score -> pair -> train (DPO) -> eval -> report, each stage called as a
function (the same code the sub-commands run) and each writing its artefacts in a numbered subfolder of the
output, so a user can open every table and image along the way:

    OUT/1_degrade/{train,heldout}/   LR/HR crops (pairs.parquet); the crops are tiles of the photos
    OUT/2_sample/                    M candidates per training crop from the base model (candidates.parquet)
    OUT/3_score/                     IQA scores and hybrid reward of every candidate
    OUT/4_pair/                      top-N x bottom-N preference pairs with HPO weights
    OUT/5_train/                     DPO checkpoints every --eval-every steps, metrics.jsonl
    OUT/6_eval/step_NNNNNN/          held-out candidates of the ControlNet at that step, scored
    OUT/6_eval/step_NNNNNN/guard/    the first and last held-out pools scored by the guard metrics (not in the reward)
    OUT/6_eval/                      reward_curve.csv, Best/Mean/Worst@M (joint/base, joint/dp2o), summary.md
    OUT/report.html

Honesty rules: the held-out crops never enter the preference pairs (photos are cut into tiles and the tiles
are split in a checkerboard, so no pixel is shared); base and DP²O sample the same held-out crops with the
same seeds; before/after rewards are normalised jointly over both pools (``reward.fit_bounds``) and the
reward curve uses the bounds of the step-0 pool, so numbers at different steps share one scale. The before/after
table always shows guard metrics that are not in the reward — PSNR-Y, SSIM-Y and a no-reference metric
(``--guard-metrics``) — so a reward that rises while they fall (reward hacking) is visible, and one sentence
says whether the change of Mean@M is beyond its standard error (``report.change_sentence``).

The functions below are reused by ``scripts/ablations.py``; a rerun with the same options resumes.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP (users can override it). With the default, active wait policy the threads spin
# at every barrier; on a machine whose cores are shared with other processes a sampling call was measured
# 2 to 80 times slower (one batch of 8 at 64 px on 2 busy cores: 0.13-0.28 s passive, 0.23-22 s active).
# On free cores the two should be close (not measured: this project's machines were never idle).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dp2osr import degrade as degrade_stage
from dp2osr import evaluate as evaluate_stage
from dp2osr import metrics as metric_lib
from dp2osr import train as train_stage
from dp2osr.backbones import Backbone
from dp2osr.config import check_choice, check_resume, field, save_config
from dp2osr.engine import heldout, pools
from dp2osr.engine.options import SamplingOptions, load_model
from dp2osr.engine.pools import read_candidates, read_inputs
from dp2osr.engine.trainer import latest_checkpoint
from dp2osr.errors import StageError
from dp2osr.images import list_images, load_image, save_image, write_parquet
from dp2osr.math.colorfix import COLOR_FIXES
from dp2osr.math.degradations import MILD
from dp2osr.math.hpo import HPO_MODES
from dp2osr.math.reward import SCOPES, fit_bounds, hybrid_reward
from dp2osr.pair import build_pairs
from dp2osr.paths import check_output_dir
from dp2osr.report import NOISE_METHOD, ReportConfig, build_html, change_sentence, pool_change

CONFIG_NAME = "quickstart_config.yaml"
TIMINGS_NAME = "timings.json"  # seconds per stage, summed over the runs into one --output
PHOTOS = Path(__file__).parent / "assets" / "photos"
CURVE_CSV = heldout.CURVE_CSV
PAIR_WEIGHTS = {"hybrid": (0.5, 0.5), "fr": (1.0, 0.0), "nr": (0.0, 1.0)}
DEGRADATIONS = {"mild": MILD, "realesrgan": {}}  # the LR degradation of the crops (see --degradation)
_BASE_LABEL, _DPO_LABEL = "base ControlNet", "DP²O ControlNet"
# Offline no-reference guards, in order of preference (NIQE needs >= 96 px; BRISQUE and PIQE work at any size).
GUARD_CHOICES = ("niqe", "brisque", "piqe")


@dataclass
class QuickstartConfig:
    """Run the whole DP²O-SR loop on the embedded model and bundled photos, then write an HTML report.

    degrade -> sample M candidates per training crop -> score (hybrid reward) -> pair (top-N x bottom-N,
    HPO) -> DPO training of the ControlNet -> every --eval-every steps sample and score held-out crops that
    never enter the pairs -> report: Best/Mean/Worst@M before vs after (same held-out crops, same seeds,
    rewards normalised jointly), the reward curve, PSNR/SSIM (not in the reward). With the defaults it takes
    a few minutes on 2 CPU cores; raise --images/--samples/--steps to make it bigger. Each stage's outputs
    are in numbered subfolders of --output; rerun the same command to resume an interrupted run.

    Defaults differ from the paper's recipe for this scale (see docs/QUICKSTART.md): 60 steps of 32 pairs
    instead of 1000 steps of 1024, beta 500 instead of 5000, lr 3e-5 instead of 2e-5.
    """

    output: Path = field(Path("quickstart_out"), help="output folder (stage subfolders and report.html)", run_only=True)
    backbone: str = field(
        "embedded",
        help="model: embedded (the small SR model shipped in the package) or any --backbone of `dp2osr "
        "sample` (sd2-tiny: random weights, for tests)",
    )
    base: Path | None = field(
        None, help="base model folder (default: the backbone's own; embedded: the shipped one)"
    )
    controlnet: Path | None = field(
        None, help="ControlNet to start from, the DPO reference (default: the base's)"
    )
    photos: Path | None = field(None, help="folder of HR photos to cut into crops (default: the 4 bundled)")
    degradation: str = field(
        "mild",
        help="LR degradation: mild (the embedded model's training range) or realesrgan (`dp2osr degrade`'s "
        "defaults, Real-ESRGAN x4plus: much harsher than the embedded model has seen)",
        choices=["mild", "realesrgan"],
    )
    hr_size: int = field(64, help="HR crop side (the LR is hr_size/4); photos are cut into tiles this big")
    images: int = field(10, help="training crops: the DPO pairs come from these only")
    heldout: int = field(8, help="held-out crops for evaluation: never in the DPO pairs")
    samples: int = field(8, help="M: candidates per training crop (paper: 32 for SD2, 64 for FLUX)")
    eval_samples: int | None = field(
        None, help="candidates (seeds) per held-out crop at each evaluation (default: --samples)"
    )
    pairs_n: int | None = field(
        None, help="N winners x N losers per crop (N=1: best vs worst); overrides --ratio"
    )
    ratio: float = field(0.25, help="N = round(ratio*M) when --pairs-n is not given (paper: 1/4 for SD2)")
    hpo: str = field(
        "both", help="HPO pair weights: both, intra, inter, none", choices=list(HPO_MODES)
    )
    pair_reward: str = field(
        "hybrid",
        help="reward that ranks candidates into pairs: hybrid (0.5 FR + 0.5 NR, paper), fr or nr only "
        "(an ablation; evaluation always uses the hybrid reward)",
        choices=list(PAIR_WEIGHTS),
    )
    reward_scope: str = field(
        "pool",
        help="min-max normalisation scope of the pairing reward: pool (over all candidates, the paper's) "
        "or image (over one crop's M candidates, so FR and NR weigh equally within each group)",
        choices=list(SCOPES),
    )
    metrics: list[str] = field(
        list(metric_lib.PRESETS["offline"]),
        help="IQA metrics of the reward (pyiqa names). Default: the offline preset of `dp2osr score` (FR fsim, "
        "gmsd; NR piqe: no weights, any crop size). With weights: lpips topiq_fr musiq ... (see --weights-dir)",
    )
    weights_dir: Path | None = field(
        None, help="folder with IQA metric weights (only for weight-backed metrics)"
    )
    score_dither: int = field(
        0,
        help="`dp2osr score --dither K` for every reward score (training pool and held-out pools; not the guards): "
        "the mean over K invisibly dithered copies, so that the pairs do not follow PIQE's reaction to the last "
        "bit (0 = plain scores)",
    )
    guard_metrics: list[str] | None = field(
        None,
        help="metrics NOT in the reward, shown beside it on the first and last held-out pools so that reward "
        "hacking is visible (PSNR-Y/SSIM-Y are always shown). Default: the first of niqe (crops >= 96 px), "
        "brisque, piqe that is not in --metrics",
    )
    steps: int = field(60, help="DPO optimizer steps (paper: 1000)")
    batch_size: int = field(
        32,
        help="preference pairs per step (paper: 1024). With 4, the gradient of one step is mostly the noise of "
        "single pairs, and Adam turns it into steps of size lr: measured here, the model drifted (its error on "
        "the winners grew as fast as on the losers) and held-out reward fell",
    )
    beta: float = field(
        500.0,
        help="DPO beta (paper: 5000). An earlier experiment at this scale found 500 gave twice the "
        "held-out gain of 5000, whose logit -beta/2*delta saturates the sigmoid within a few steps",
    )
    lr: float = field(3e-5, help="AdamW learning rate (paper: 2e-5)")
    winner_sft: float = field(
        0.0, help="λ of `dp2osr train --winner-sft`: a supervised term on the winners added to the DPO loss (not "
        "in the paper; 0 = off)"
    )
    ema_decay: float = field(
        0.0,
        help="train with an EMA of the weights (`dp2osr train --ema-decay`); 0 = off: 60 steps are too few",
    )
    eval_every: int = field(20, help="evaluate the held-out reward every K steps (the reward curve)")
    sample_steps: int | None = field(None, help="denoising steps per sample (default: the backbone's)")
    sample_batch: int = field(8, help="seeds sampled together in one batched call")
    color_fix: str = field(
        "adain",
        help="colour correction of every sample against the upsampled LR",
        choices=list(COLOR_FIXES),
    )
    seed: int = field(0, help="whole-run seed: degradations, crop choice, sampling seeds, data order, noise")
    device: str = field("auto", help="auto, cpu or cuda", choices=["auto", "cpu", "cuda"], run_only=True)
    overwrite: bool = field(False, help="delete an earlier quickstart in --output first (default: resume it)", run_only=True)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        check_choice("pair_reward", self.pair_reward, list(PAIR_WEIGHTS))
        check_choice("reward_scope", self.reward_scope, list(SCOPES))
        check_choice("device", self.device, ["auto", "cpu", "cuda"])
        check_choice("degradation", self.degradation, list(DEGRADATIONS))
        for name in ("images", "heldout", "samples", "steps", "batch_size", "eval_every", "sample_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.score_dither < 0:
            raise ValueError(f"--score-dither must be >= 0 (0 = plain scores), got {self.score_dither}")
        if self.samples < 2 or (self.eval_samples is not None and self.eval_samples < 1):
            raise ValueError(f"--samples must be >= 2 (a winner and a loser), got {self.samples}")
        if self.hr_size < 16 or self.hr_size % 16:
            raise ValueError(f"--hr-size must be a multiple of 16 (>= 16), got {self.hr_size}")
        # The options the stages own are checked by the stages' own configs (hpo, beta, lr, ema, winner term,
        # colour fix, sampling options).
        self.guards()
        self.train_config(Path("pref_pairs.parquet"), self.output)
        self.sampling_options()
        self.degrade_config(self.output, self.output)

    def sampling_options(self) -> SamplingOptions:
        """How every pool is sampled: the crops whole, at their own size (a larger process size would
        upsize them first)."""
        return SamplingOptions(
            backbone=self.backbone, base=self.base, controlnet=self.controlnet, device=self.device,
            steps=self.sample_steps, batch_size=self.sample_batch, process_size=self.hr_size,
            color_fix=self.color_fix,
        )  # fmt: skip

    def train_config(self, pairs: Path, out: Path) -> train_stage.TrainConfig:
        """`dp2osr train --mode dpo` with this quickstart's options: a checkpoint every --eval-every steps, all
        kept (the reward curve samples each)."""
        base = train_stage.TrainConfig(mode="dpo", data=pairs, output=out)
        return dataclasses.replace(
            base, backbone=self.backbone, base=self.base, controlnet=self.controlnet, device=self.device,
            steps=self.steps, lr=self.lr, batch_size=self.batch_size, beta=self.beta, winner_sft=self.winner_sft,
            hpo=self.hpo, seed=self.seed, checkpoint_every=self.eval_every, keep_checkpoints=0, log_every=1,
            ema_decay=self.ema_decay,
        )  # fmt: skip

    def degrade_config(self, tiles: Path, out: Path) -> degrade_stage.DegradeConfig:
        """`dp2osr degrade` of the crops: centre crops of the whole tile, the chosen degradation preset."""
        return degrade_stage.DegradeConfig(
            input=tiles, output=out, hr_size=self.hr_size, scale=4, crop="center", seed=self.seed,
            **DEGRADATIONS[self.degradation],
        )  # fmt: skip

    def guards(self) -> list[str]:
        """The guard metrics: ``--guard-metrics``, or the first offline NR metric that works at the crop size
        and is not in the reward. A guard that is also in ``--metrics`` is a ValueError."""
        if self.guard_metrics:
            both = sorted(set(self.guard_metrics) & set(self.metrics))
            if both:
                raise ValueError(f"--guard-metrics {both} are in the reward (--metrics); a guard must not be")
            metric_lib.catalogue(self.guard_metrics)  # unknown names fail here
            return list(dict.fromkeys(self.guard_metrics))
        usable = [
            m for m in GUARD_CHOICES if m not in self.metrics and self.hr_size >= metric_lib.get_spec(m).min_size
        ]
        if not usable:
            raise ValueError(
                f"--metrics {self.metrics} use every offline guard {list(GUARD_CHOICES)}; give --guard-metrics"
            )
        return usable[:1]

    @property
    def m_eval(self) -> int:
        return self.eval_samples or self.samples


@dataclass
class Layout:
    """Where each stage writes. The ablation script points the shared stages of its variants at one run."""

    root: Path
    degrade: Path
    sample: Path
    score: Path
    pair: Path
    train: Path
    eval: Path
    base_pool: Path  # held-out candidates of the base model (evaluation at step 0)

    @classmethod
    def of(cls, root: Path) -> Layout:
        root = Path(root)
        ev = root / "6_eval"
        return cls(
            root,
            root / "1_degrade",
            root / "2_sample",
            root / "3_score",
            root / "4_pair",
            root / "5_train",
            ev,
            ev / "step_000000",
        )


# --------------------------------------------------------------------------------------------- data
def tiles(
    photos: list[Path], size: int
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Cut each photo into non-overlapping ``size`` tiles (grid centred); split them in a checkerboard.

    Returns ``(training tiles, held-out tiles)`` as (id, ``(1, 3, size, size)``) lists: a tile at grid
    (row, col) is held out when row + col is odd, so both sets cover every photo and share no pixel.
    """
    train, held = [], []
    for path in photos:
        img = load_image(path)
        h, w = img.shape[-2:]
        rows, cols = h // size, w // size
        top, left = (h - rows * size) // 2, (w - cols * size) // 2
        for r in range(rows):
            for c in range(cols):
                y, x = top + r * size, left + c * size
                tile = img[..., y : y + size, x : x + size]
                (held if (r + c) % 2 else train).append((f"{path.stem}_r{r}c{c}", tile))
    return train, held


def prepare_data(cfg: QuickstartConfig, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 1: tiles of the photos -> `dp2osr degrade` -> (training, held-out) tables of LR/HR paths."""
    photos = list_images(Path(cfg.photos) if cfg.photos is not None else PHOTOS)
    train, held = tiles(photos, cfg.hr_size)
    rng = np.random.default_rng(cfg.seed)
    tables = []
    for name, pool, n in (("train", train, cfg.images), ("heldout", held, cfg.heldout)):
        if len(pool) < n:
            raise ValueError(
                f"--{'images' if name == 'train' else 'heldout'} {n}: the photos give only {len(pool)} {name} "
                f"tiles of {cfg.hr_size} px; lower it, lower --hr-size or add photos (--photos)"
            )
        chosen = [pool[i] for i in sorted(rng.permutation(len(pool))[:n])]
        tile_dir = folder / f"tiles_{name}"
        for tile_id, tile in chosen:
            if not (tile_dir / f"{tile_id}.png").is_file():
                save_image(tile, tile_dir / f"{tile_id}.png")
        degrade_stage.run(cfg.degrade_config(tile_dir, folder / name))
        tables.append(read_inputs(folder / name))
    return tables[0], tables[1]


# ---------------------------------------------------------------------------------- sample and score
def fingerprint(bb: Backbone) -> str:
    """A short hash of the weights (denoiser and ControlNet): which model a result was measured with."""
    import hashlib

    h = hashlib.sha256()
    for module in [*bb.frozen_modules().values(), bb.controlnet]:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def load_base(cfg: QuickstartConfig) -> Backbone:
    """The backbone with its reference ControlNet, loaded once for all sampling."""
    return load_model(cfg.sampling_options())


def sample_pool(
    bb: Backbone,
    images: pd.DataFrame,
    folder: Path,
    seeds: list[int],
    cfg: QuickstartConfig,
    controlnet: torch.nn.Module | None = None,
    model: str = "base",
) -> None:
    """`dp2osr sample` into ``folder`` with ``controlnet`` (default: the backbone's own)."""
    opts = cfg.sampling_options()
    _, failed = pools.sample_pool(bb, images, folder, seeds, opts, model=f"{opts.backbone}|{model}", controlnet=controlnet)
    if failed:
        raise StageError(f"crops could not be sampled: {sorted(failed)}")


def score_pool(cands: Path, out: Path, cfg: QuickstartConfig) -> pd.DataFrame:
    """`dp2osr score` (hybrid reward, pool scope) of the pool in ``cands``; returns its scores table."""
    return heldout.score_pool(cands, out, list(cfg.metrics), cfg.weights_dir, cfg.device, cfg.score_dither)


def score_guards(cands: Path, cfg: QuickstartConfig) -> pd.DataFrame:
    """The guard metrics (not in the reward) of the pool in ``cands``, into ``cands/guard/``; the reward's own
    scores are not touched."""
    return heldout.score_pool(cands, Path(cands) / "guard", cfg.guards(), cfg.weights_dir, cfg.device)


def make_pairs(cfg: QuickstartConfig, scores: pd.DataFrame, cands: Path, out: Path) -> pd.DataFrame:
    """Stage 4: rank each crop's candidates by the ``--pair-reward`` and write ``out/pref_pairs.parquet``."""
    specs = metric_lib.catalogue(list(cfg.metrics))
    w_fr, w_nr = PAIR_WEIGHTS[cfg.pair_reward]
    family = {"fr": "fr", "nr": "nr"}.get(cfg.pair_reward)
    if family and not any(s.family == family for s in specs.values()):
        raise ValueError(f"--pair-reward {family} needs at least one {family.upper()} metric in --metrics")
    rewards = hybrid_reward(scores, specs, w_fr=w_fr, w_nr=w_nr, scope=cfg.reward_scope)
    table = read_candidates(cands)[["image_id", "seed", "abs_path", "lr_path"]]
    rewards = rewards.merge(table, on=["image_id", "seed"]).rename(columns={"abs_path": "path"})
    pairs = build_pairs(rewards, n=cfg.pairs_n, ratio=None if cfg.pairs_n else cfg.ratio, hpo=cfg.hpo)
    for col in ("win_path", "lose_path", "lr_path"):  # table paths are relative to the table's folder
        pairs[col] = [os.path.relpath(p, out) for p in pairs[col]]
    write_parquet(pairs, out / "pref_pairs.parquet")
    return pairs


# ------------------------------------------------------------------------------------------- train
def train_dpo(cfg: QuickstartConfig, pairs: Path, out: Path) -> None:
    """Stage 5: `dp2osr train --mode dpo`, a checkpoint every --eval-every steps (all kept)."""
    last = latest_checkpoint(out)
    if last is not None and json.loads((last / "train_state.json").read_text())["step"] >= cfg.steps:
        return  # finished earlier (a resumed quickstart)
    train_stage.run(dataclasses.replace(cfg.train_config(pairs, out), resume=last is not None))


def controlnet_at(bb: Backbone, train_dir: Path, step: int) -> torch.nn.Module | None:
    """The ControlNet of checkpoint ``step`` (None at step 0: the base model's own)."""
    if step == 0:
        return None
    return heldout.controlnet_from(bb, train_dir / f"checkpoint-{step:06d}" / "model.safetensors")


def eval_steps(cfg: QuickstartConfig) -> list[int]:
    return sorted({*range(0, cfg.steps + 1, cfg.eval_every), cfg.steps})


def eval_seeds(cfg: QuickstartConfig) -> list[int]:
    return [cfg.seed * 100_000 + 50_000 + k for k in range(cfg.m_eval)]


# -------------------------------------------------------------------------------------------- eval
def reward_curve(cfg: QuickstartConfig, lay: Layout) -> pd.DataFrame:
    """Held-out reward at every evaluated step, normalised with the step-0 pool's bounds."""
    return heldout.curve_from_pools({s: pool_dir(lay, s) for s in eval_steps(cfg)}, list(cfg.metrics))


def pool_dir(lay: Layout, step: int) -> Path:
    return lay.base_pool if step == 0 else lay.eval / f"step_{step:06d}"


def compare(cfg: QuickstartConfig, lay: Layout) -> dict:
    """Base (step 0) vs final held-out pool, rewards normalised jointly; writes joint/{base,dp2o}."""
    final = eval_steps(cfg)[-1]
    dirs = {"base": pool_dir(lay, 0), "dp2o": pool_dir(lay, final)}
    scores = {k: pd.read_parquet(d / "scores.parquet") for k, d in dirs.items()}
    specs = metric_lib.catalogue(list(cfg.metrics))
    bounds = fit_bounds(pd.concat(scores.values(), ignore_index=True), specs)
    out: dict = {"final_step": final, "images": 0, "seeds": cfg.m_eval}
    means, tables = {}, {}
    for key, d in dirs.items():
        df = heldout.pool_rewards(scores[key], d, bounds, list(cfg.metrics))
        folder = lay.eval / "joint" / key
        df["path"] = [os.path.relpath(p, folder) for p in df.pop("abs_path")]
        write_parquet(df, folder / "rewards.parquet")
        write_parquet(scores[key], folder / "scores.parquet")  # `dp2osr eval` re-derives the joint scale
        out[key] = heldout.pool_stats(df)
        raw = scores[key].groupby("metric")["value"].mean()
        out[key].update({f"raw_{m}": float(raw[m]) for m in cfg.metrics if m in raw})
        guard = pd.read_parquet(d / "guard" / "scores.parquet").groupby("metric")["value"].mean()
        out[key].update({f"guard_{m}": float(guard[m]) for m in cfg.guards() if m in guard})
        means[key], tables[key] = df.groupby("image_id")["reward"].mean(), df
        out["images"] = len(means[key])
    gain = (means["dp2o"] - means["base"]).dropna()
    out["improved_images"] = int((gain > 0).sum())
    out["delta"] = {k: out["dp2o"][k] - out["base"][k] for k in out["base"]}
    out["change"] = pool_change(tables["base"], tables["dp2o"])
    out["change"]["sentence"] = change_sentence(out["change"], _BASE_LABEL, _DPO_LABEL)
    return out


_REWARD, _GUARD = "reward", "guard (not in the reward)"


def _arrow(name: str) -> str:
    return "↓" if metric_lib.get_spec(name).lower_better else "↑"


def summary_rows(cfg: QuickstartConfig, s: dict) -> list[tuple[str, str, float, float, float]]:
    """(label, role, base, DP²O, Δ) rows of the before/after table (M = the whole held-out pool); role says
    whether the row is the reward (or one of its metrics) or a guard metric outside it."""
    m = s["seeds"]
    keys = [
        ("best", f"Best@{m} ↑", _REWARD),
        ("mean", f"Mean@{m} ↑", _REWARD),
        ("worst", f"Worst@{m} ↑", _REWARD),
        ("psnr", "PSNR-Y (dB) ↑", _GUARD),
        ("ssim", "SSIM-Y ↑", _GUARD),
        *[(f"guard_{x}", f"{x} (raw value) {_arrow(x)}", _GUARD) for x in cfg.guards()],
        *[(f"raw_{x}", f"{x} (raw value) {_arrow(x)}", f"in the {_REWARD}") for x in cfg.metrics],
    ]
    return [
        (label, role, s["base"][k], s["dp2o"][k], s["delta"][k]) for k, label, role in keys if k in s["base"]
    ]


def _guard_note(cfg: QuickstartConfig) -> str:
    dither = f", each scored as the mean over {cfg.score_dither} dithered copies" if cfg.score_dither else ""
    return (
        f"Guards: PSNR-Y, SSIM-Y and {', '.join(cfg.guards())} are not in the reward (hybrid of "
        f"{', '.join(cfg.metrics)}{dither}): if the reward rises while the guards get worse, DP²O is exploiting "
        "the reward."
    )


def summary_markdown(cfg: QuickstartConfig, s: dict) -> str:
    lines = [
        (
            f"Held-out crops: {s['images']} (never in the DPO pairs) x {s['seeds']} seeds, the same for both "
            f"models. DP²O = step {s['final_step']}. Reward: hybrid, normalised jointly over both pools; "
            "PSNR/SSIM and the raw metric values are not normalised."
        ),
        "",
        f"| held-out | role | {_BASE_LABEL} | {_DPO_LABEL} | Δ |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {role} | {b:.4f} | {d:.4f} | {x:+.4f} |" for label, role, b, d, x in summary_rows(cfg, s)
    ]
    rose = f"Held-out crops whose mean reward rose: {s['improved_images']} of {s['images']}."
    lines += ["", _guard_note(cfg), "", rose]
    if "change" in s:
        lines += ["", s["change"]["sentence"], "", f"(How the noise is measured: {NOISE_METHOD})"]
    return "\n".join(lines) + "\n"


def _summary_html(cfg: QuickstartConfig, s: dict) -> str:
    import html

    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(role)}</td><td>{b:.4f}</td><td>{d:.4f}</td>"
        f"<td>{x:+.4f}</td></tr>"
        for label, role, b, d, x in summary_rows(cfg, s)
    )
    change = s.get("change")
    verdict = (
        f'<p class="verdict" title="{html.escape(NOISE_METHOD)}">{html.escape(change["sentence"])}</p>'
        if change
        else ""
    )
    t = s.get("timings", {})
    return (
        "<h2>What DP²O did on held-out crops</h2>"
        f"<p>{s['images']} held-out crops, never in the DPO pairs, {s['seeds']} seeds each (the same seeds for "
        f"both models). {_DPO_LABEL} = step {s['final_step']} of DPO on {s['pairs']} pairs from "
        f"{cfg.images} training crops (β {cfg.beta:g}, lr {cfg.lr:g}, batch {cfg.batch_size}, HPO "
        f"{html.escape(cfg.hpo)}, pair reward {html.escape(cfg.pair_reward)}"
        f"{f', winner term λ {cfg.winner_sft:g}' if cfg.winner_sft else ''}). Hybrid reward of "
        f"{html.escape(', '.join(cfg.metrics))}, min-max normalised jointly over both pools. "
        f"{html.escape(_guard_note(cfg))} Held-out crops whose mean reward rose: "
        f"<b>{s['improved_images']} of {s['images']}</b>.</p>"
        f"<table><thead><tr><th>held-out</th><th>role</th><th>{_BASE_LABEL}</th><th>{_DPO_LABEL}</th><th>Δ</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>{verdict}"
        f'<p class="note">Model {html.escape(s.get("model", "?"))} (weights hash). Run time {t.get("total", 0):.0f} s'
        + (f" over {t.get('runs')} runs (resumed)" if t.get("runs", 1) > 1 else "")
        + " ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k not in ("total", "runs"))
        + "). The reward curve below normalises with the step-0 pool's bounds, so its values are not those of "
        "this table.</p>"
    )


def write_report(cfg: QuickstartConfig, lay: Layout, s: dict) -> Path:
    """Stage 7: `dp2osr eval` (Best/Mean/Worst@M, curve plot) and `dp2osr report`, plus the summary."""
    pools = [lay.eval / "joint" / "base", lay.eval / "joint" / "dp2o"]
    curve = lay.eval / CURVE_CSV
    evaluate_stage.run(
        evaluate_stage.EvalConfig(output=lay.eval, pools=pools, pool_names=[_BASE_LABEL, _DPO_LABEL], reward_curve=curve)
    )
    page = build_html(
        ReportConfig(
            output=lay.root / "report.html",
            pools=pools,
            names=[_BASE_LABEL, _DPO_LABEL],
            reward_curve=curve,
            max_images=6,
            select="first",
            title="dp2osr quickstart: DP²O on held-out crops",
        )
    )
    page = page.replace("</h1>", "</h1>" + _summary_html(cfg, s), 1)
    path = lay.root / "report.html"
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------------------------------- main
def _stage(n: int, text: str) -> None:
    print(f"[quickstart {n}/7] {text}", file=sys.stderr, flush=True)


class RunClock:
    """Seconds per stage and in total, summed over every run into one output folder: a resumed run adds its
    own time to what the earlier runs spent (kept in ``path`` after every stage, so a killed run counts too)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.prior = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.now: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def lap(self, name: str, start: float) -> None:
        """Add the time since ``start`` to stage ``name`` and save the totals."""
        self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - start
        self.now["total"] = time.perf_counter() - self.t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp_{os.getpid()}_{self.path.name}")
        tmp.write_text(json.dumps(self.totals(), indent=2))
        os.replace(tmp, self.path)

    def totals(self) -> dict:
        """``{stage: seconds, "total": seconds, "runs": n}`` over the earlier runs and this one."""
        keys = dict.fromkeys([*self.prior, *self.now])
        out = {k: self.prior.get(k, 0.0) + self.now.get(k, 0.0) for k in keys if k != "runs"}
        return {**out, "runs": int(self.prior.get("runs", 0)) + 1}


def run_stages(cfg: QuickstartConfig, lay: Layout, bb: Backbone | None = None, report: bool = True) -> dict:
    """Every stage in order (each resumes from what ``lay`` already holds); returns the summary dict."""
    clock = RunClock(lay.root / TIMINGS_NAME)
    lap = clock.lap

    t = time.perf_counter()
    _stage(
        1,
        f"degrade: cut photos into {cfg.hr_size}px crops, degrade to LR ({cfg.images} train, {cfg.heldout} held-out)",
    )
    train_images, held_images = prepare_data(cfg, lay.degrade)
    lap("degrade", t)
    t = time.perf_counter()
    bb = bb or load_base(cfg)
    lap("load", t)
    t = time.perf_counter()
    _stage(2, f"sample: {cfg.samples} candidates per training crop with the base model")
    sample_pool(bb, train_images, lay.sample, [cfg.seed * 100_000 + k for k in range(cfg.samples)], cfg)
    lap("sample", t)
    t = time.perf_counter()
    _stage(3, f"score: {', '.join(cfg.metrics)} -> hybrid reward")
    scores = score_pool(lay.sample, lay.score, cfg)
    lap("score", t)
    _stage(4, f"pair: top-N x bottom-N by the {cfg.pair_reward} reward, HPO {cfg.hpo}")
    pairs = make_pairs(cfg, scores, lay.sample, lay.pair)
    print(f"pair: {len(pairs)} pairs from {pairs.image_id.nunique()} crops -> {lay.pair}", file=sys.stderr)
    t = time.perf_counter()
    _stage(5, f"eval step 0: held-out crops x {cfg.m_eval} seeds with the base ControlNet")
    sample_pool(bb, held_images, lay.base_pool, eval_seeds(cfg), cfg)
    score_pool(lay.base_pool, lay.base_pool, cfg)
    lap("eval", t)
    t = time.perf_counter()
    sft = f", winner term {cfg.winner_sft:g}" if cfg.winner_sft else ""
    _stage(5, f"train: {cfg.steps} DPO steps of {cfg.batch_size} pairs (beta {cfg.beta:g}, lr {cfg.lr:g}{sft})")
    train_dpo(cfg, lay.pair / "pref_pairs.parquet", lay.train)
    lap("train", t)
    t = time.perf_counter()
    for step in eval_steps(cfg)[1:]:
        _stage(6, f"eval step {step}: held-out crops x {cfg.m_eval} seeds with the DPO ControlNet")
        sample_pool(
            bb,
            held_images,
            pool_dir(lay, step),
            eval_seeds(cfg),
            cfg,
            controlnet_at(bb, lay.train, step),
            model=f"dpo step {step}",
        )
        score_pool(pool_dir(lay, step), pool_dir(lay, step), cfg)
    _stage(6, f"guards (not in the reward): {', '.join(cfg.guards())} of the first and last held-out pools")
    for step in (0, eval_steps(cfg)[-1]):
        score_guards(pool_dir(lay, step), cfg)
    curve = reward_curve(cfg, lay)
    curve.to_csv(lay.eval / CURVE_CSV, index=False, float_format="%.6f")
    summary = compare(cfg, lay)
    lap("eval", t)
    summary["pairs"] = len(pairs)
    summary["model"] = f"{cfg.backbone} {fingerprint(bb)}"
    summary["curve"] = curve.to_dict(orient="list")
    summary["timings"] = clock.totals()
    (lay.eval / "summary.json").write_text(json.dumps(summary, indent=2))
    (lay.eval / "summary.md").write_text(summary_markdown(cfg, summary))
    if report:
        _stage(7, "report")
        summary["report"] = str(write_report(cfg, lay, summary))
    return summary


def prepare_output(cfg: QuickstartConfig) -> Path:
    """Make ``cfg.output`` ready: new, or an earlier quickstart with the same options (resumed) or
    ``--overwrite`` (deleted first); anything else is refused. Saves the resolved config there."""
    out = Path(cfg.output)
    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        if not (out / CONFIG_NAME).is_file():
            raise ValueError(f"{out} is not empty and holds no {CONFIG_NAME}; choose another --output")
        if cfg.overwrite:
            shutil.rmtree(out)
        else:
            check_resume(
                cfg, out / CONFIG_NAME, "a quickstart", "use --overwrite or another --output"
            )
    save_config(cfg, out / CONFIG_NAME)
    return out


def run(cfg: QuickstartConfig) -> dict:
    """Run ``dp2osr quickstart``: the whole loop, then print the summary and the report's path."""
    summary = run_stages(cfg, Layout.of(prepare_output(cfg)))
    print(summary_markdown(cfg, summary))
    print(f"total {summary['timings']['total']:.0f} s; report:")
    print(Path(summary["report"]).resolve())
    return summary
