"""The held-out reward of a model over training: sample held-out images with fixed seeds, score, normalise.

At step 0 (the starting ControlNet) and at each later step, the held-out LR images are sampled with the same M
seeds, the candidates are scored, and the hybrid reward is computed under the min-max bounds of the step-0
pool, so every step is read on one scale (rewards of later steps can leave [0, 1]). One row per step:
``reward`` = Mean@M, ``best`` / ``worst`` = Best@M / Worst@M, ``reward_se`` = the seed-to-seed standard error
of Mean@M (`bestm.mean_se`; the plot shades ±1.96 of it), and PSNR / SSIM on the Y channel (not in the
reward; NaN when there is no HR), in ``reward_curve.csv`` and ``reward_curve.png``.

`dp2osr curve` (over a run's checkpoints), `dp2osr train --eval-data` (live weights) and the quickstart all
use `HeldoutEval`. Finished pools are kept: a rerun resumes and only samples what is missing.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dp2osr import metrics as metric_lib
from dp2osr import plots
from dp2osr.backbones import Backbone, cast, load_release_state
from dp2osr.engine import score_shards, scoring
from dp2osr.engine.checkpoints import checkpoint_problem, read_state, saved_checkpoints
from dp2osr.engine.options import SamplingOptions
from dp2osr.engine.pool_store import read_image
from dp2osr.engine.pools import read_candidates, read_inputs, sample_pool, state_gather
from dp2osr.engine.provenance import model_fields
from dp2osr.engine.scoring import ScoreOptions
from dp2osr.errors import StageError
from dp2osr.images import load_image, write_parquet
from dp2osr.math import bestm
from dp2osr.math.quality import psnr_y, ssim_y
from dp2osr.math.reward import fit_bounds, hybrid_reward

CURVE_CSV = "reward_curve.csv"
CURVE_PNG = "reward_curve.png"
CURVE_COLUMNS = ["step", "reward", "best", "worst", "reward_se", "psnr", "ssim"]
QUALITY_COLUMNS = ["image_id", "seed", "psnr", "ssim"]


# ---------------------------------------------------------------------------------------------- pools
def score_pool(
    cands: Path,
    out: Path,
    metrics: list[str],
    weights_dir: Path | None = None,
    device: str = "auto",
    dither: int = 0,
    state=None,
    run_device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Score the pool in ``cands`` into ``out`` (resumes; hybrid reward, pool scope); returns its scores table.
    ``dither``: `ScoreOptions.dither` (each score the mean over that many dithered copies; 0 = plain). With
    ``state`` the images are dealt to the processes (``run_device``: this process's device) and the main
    process's table is the whole pool's; every process raises when any met a problem."""
    opts = ScoreOptions(weights_dir=weights_dir, device=device, dither=dither)
    result = scoring.score_pool(Path(cands), Path(out), list(metrics), opts, state=state, device=run_device)
    errors = set(result.errors.values())
    if state is not None and state.num_processes > 1:
        errors = set().union(*state_gather(state, errors))
    if errors:
        raise StageError(f"scoring {cands} failed: " + "; ".join(sorted(errors)))
    return result.scores


def _quality_rows(cands: pd.DataFrame) -> list[tuple]:
    rows = []
    for r in cands.itertuples():
        if not r.hr_path:
            rows.append((r.image_id, int(r.seed), float("nan"), float("nan")))
            continue
        sr = read_image(r.abs_path)[0].permute(1, 2, 0).double().numpy()
        hr = load_image(Path(r.hr_path))[0].permute(1, 2, 0).double().numpy()
        rows.append((r.image_id, int(r.seed), psnr_y(sr, hr), ssim_y(sr, hr)))
    return rows


def quality(cands: Path, state=None) -> pd.DataFrame:
    """PSNR and SSIM (Y channel, Real-ISR convention; not in the reward) of every candidate; NaN without HR.

    Kept in ``cands/quality.parquet`` (redone when candidates.parquet is newer): a reward curve re-reads every
    earlier pool at each evaluation, and SSIM at 512 px costs about 0.5 s per image on a CPU. With ``state``
    of several processes each computes the candidates of its images (`score_shards.deal_images`) and the main
    process writes the table (the one one process writes); the others return their own rows.
    """
    cache, manifest = Path(cands) / "quality.parquet", Path(cands) / "candidates.parquet"
    if cache.is_file() and cache.stat().st_mtime >= manifest.stat().st_mtime:
        return pd.read_parquet(cache)
    pool = read_candidates(cands)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = score_shards.deal_images(pool, rank, world)
    rows = _quality_rows(mine)
    if world > 1:
        parts = state_gather(state, list(zip(mine.index.tolist(), rows)))
        if rank != 0:
            return pd.DataFrame(rows, columns=QUALITY_COLUMNS)
        rows = [row for _, row in sorted(pair for part in parts for pair in part)]
    table = pd.DataFrame(rows, columns=QUALITY_COLUMNS)
    write_parquet(table, cache)
    return table


def pool_rewards(scores: pd.DataFrame, cands: Path, bounds: dict, metrics: list[str]) -> pd.DataFrame:
    """Hybrid reward (0.5/0.5) under fixed ``bounds``, with PSNR/SSIM, LR/HR and candidate paths."""
    table = hybrid_reward(scores, metric_lib.catalogue(list(metrics)), bounds=bounds)
    info = read_candidates(cands)[["image_id", "seed", "abs_path", "lr_path", "hr_path"]]
    return table.merge(info, on=["image_id", "seed"]).merge(quality(cands), on=["image_id", "seed"])


def pool_stats(df: pd.DataFrame) -> dict[str, float]:
    """Best/Mean/Worst@M at M = the whole pool, the seed-to-seed standard error of Mean@M (``mean_se``) and the
    mean PSNR/SSIM of every candidate."""
    _, _, mat = bestm.rewards_matrix(df, "reward")
    s = bestm.best_mean_worst(mat, [mat.shape[1]])
    return {
        "best": float(s["best"][0]),
        "mean": float(s["mean"][0]),
        "worst": float(s["worst"][0]),
        "mean_se": bestm.mean_se(mat),
        "psnr": float(df["psnr"].mean()),
        "ssim": float(df["ssim"].mean()),
    }


def curve_from_pools(pools: dict[int, Path], metrics: list[str]) -> pd.DataFrame:
    """One row per step from scored pools ``{step: folder}``, normalised with the first step's bounds."""
    steps = sorted(pools)
    scores = {s: pd.read_parquet(pools[s] / "scores.parquet") for s in steps}
    bounds = fit_bounds(scores[steps[0]], metric_lib.catalogue(list(metrics)))
    rows = [{"step": s, **pool_stats(pool_rewards(scores[s], pools[s], bounds, metrics))} for s in steps]
    return pd.DataFrame(rows).rename(columns={"mean": "reward", "mean_se": "reward_se"})[CURVE_COLUMNS]


def write_curve(curve: pd.DataFrame, folder: Path, title: str = "Held-out reward") -> Path:
    """``reward_curve.csv`` and ``reward_curve.png`` in ``folder``; returns the CSV's path."""
    folder.mkdir(parents=True, exist_ok=True)
    curve.to_csv(folder / CURVE_CSV, index=False, float_format="%.6f")
    plots.write_png(plots.plot_curve(curve, title=title), folder / CURVE_PNG)
    return folder / CURVE_CSV


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


# ------------------------------------------------------------------------------------ checkpoints
def run_checkpoints(run: Path) -> dict[int, Path]:
    """``{step: model.safetensors}`` of the finished checkpoints of a `dp2osr train` output folder."""
    found = {}
    for ckpt in saved_checkpoints(run):
        model = ckpt / "model.safetensors"
        if model.is_file() and checkpoint_problem(ckpt) is None:  # one being written, or cut short: not yet
            found[read_state(ckpt)["step"]] = model
    return found


def controlnet_from(bb: Backbone, model: Path) -> torch.nn.Module:
    """A copy of the backbone's ControlNet holding the release-format weights in ``model`` (with the backbone's
    sampling fast paths, `Backbone.optimize`, applied after the weights are in)."""
    net = bb.plain_controlnet()
    load_release_state(net, model, "the run's ControlNet")
    return bb.optimize_module(cast(net, bb.device, bb.dtype).eval())


def read_heldout(heldout: Path, metrics: list[str], limit: int | None = None) -> pd.DataFrame:
    """The held-out images (`engine.pools.read_inputs`), checked to be scorable by ``metrics``."""
    images = read_inputs(heldout, limit)
    if images.empty:
        raise ValueError(f"{heldout}: no held-out images")
    fr = [n for n, s in metric_lib.catalogue(metrics).items() if s.family == "fr"]
    if fr and not (images.hr_path != "").all():
        raise ValueError(
            f"{heldout} has images without HR, which the full-reference metrics {fr} cannot score; give a "
            "`dp2osr degrade` folder or only no-reference metrics"
        )
    return images


class HeldoutEval:
    """The held-out reward of a model, step after step: what `dp2osr curve` and `train --eval-data` run.

    ``pool(step, controlnet)`` samples the held-out images with the same seeds into FOLDER/step_NNNNNN and
    scores them; ``curve()`` rewrites FOLDER/reward_curve.{csv,png} from every step on disk (bounds of the
    first step's pool). Pools already on disk are kept, so a resumed run does not redo them.
    """

    def __init__(
        self,
        bb: Backbone,
        heldout: Path,
        folder: Path,
        opts: SamplingOptions,
        *,
        samples: int = 4,
        seed: int = 50_000,
        metrics: list[str] | None = None,
        weights_dir: Path | None = None,
        limit: int | None = None,
        upscale: int = 4,
        dither: int = 0,
    ) -> None:
        self.bb, self.folder, self.opts = bb, Path(folder), opts
        self.weights_dir, self.upscale, self.dither = weights_dir, upscale, dither
        self.metrics = metric_lib.resolve_names("offline", metrics)
        self.images = read_heldout(heldout, self.metrics, limit)
        self.seeds = [seed + k for k in range(samples)]

    def steps(self) -> list[int]:
        """Steps whose pool is complete on disk."""
        done = [p for p in self.folder.glob("step_*") if (p / "scores.parquet").is_file()]
        return sorted(int(p.name.removeprefix("step_")) for p in done)

    def pool(
        self, step: int, controlnet: torch.nn.Module | None = None, state=None, source: str | None = None
    ) -> None:
        """Sample (with ``controlnet``; None: the backbone's own) and score the pool of ``step``.

        ``source`` names where ``controlnet`` came from in the pool's table (default: "training step N").
        With ``state`` (see `sample_pool`) every process samples, scores and measures PSNR/SSIM of its share.
        """
        folder = step_dir(self.folder, step)
        model = model_fields(self.opts)
        if controlnet is not None:
            model["controlnet"] = source or f"training step {step}"
        _, failed = sample_pool(
            self.bb,
            self.images,
            folder,
            self.seeds,
            self.opts,
            model=model,
            upscale=self.upscale,
            controlnet=controlnet,
            state=state,
            desc="held-out",
        )
        if failed:
            raise StageError(f"held-out images could not be sampled: {sorted(failed)}")
        many = state is not None and state.num_processes > 1
        run_device = self.bb.device if many else None
        args = (self.metrics, self.weights_dir, self.opts.device, self.dither)
        score_pool(folder, folder, *args, state=state if many else None, run_device=run_device)
        if many:  # PSNR/SSIM shared now (one process measures them when the curve reads them)
            quality(folder, state)
        if state is not None:
            state.wait_for_everyone()

    def curve(self) -> pd.DataFrame:
        """The curve of every step evaluated so far, written to FOLDER/reward_curve.{csv,png}."""
        table = curve_from_pools({s: step_dir(self.folder, s) for s in self.steps()}, self.metrics)
        write_curve(
            table, self.folder, f"Held-out reward, {len(self.images)} images x {len(self.seeds)} seeds"
        )
        return table
