"""`dp2osr curve`: the held-out hybrid reward over the checkpoints of a training run (the paper's reward curve).

At step 0 (the run's starting ControlNet) and at every ``checkpoint-NNNNNN`` of the run, the held-out LR
images are sampled with the same M seeds, the candidates are scored, and the hybrid reward is computed under
the min-max bounds of the step-0 pool, so every step is read on one scale (rewards of later steps can leave
[0, 1]). One row per step: ``reward`` = Mean@M, ``best`` / ``worst`` = Best@M / Worst@M, and PSNR / SSIM on
the Y channel (not in the reward; NaN when there is no HR), in ``reward_curve.csv`` and ``reward_curve.png``.

The same functions evaluate during training (`dp2osr train --eval-data`) and in `dp2osr quickstart`.
Finished pools are kept: a rerun resumes, and a rerun after more checkpoints were saved only samples those.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dp2osr import metrics as metric_lib
from dp2osr import plots
from dp2osr.backbones import NAMES, Backbone, cast, load_release_state
from dp2osr.config import check_resume, field, load_yaml, save_config
from dp2osr.images import load_image, write_parquet
from dp2osr.math import bestm
from dp2osr.math.reward import fit_bounds, hybrid_reward
from dp2osr.engine.sampler import SamplingOptions

CURVE_CSV = "reward_curve.csv"
CURVE_PNG = "reward_curve.png"
CONFIG_NAME = "curve_config.yaml"
CURVE_COLUMNS = ["step", "reward", "best", "worst", "psnr", "ssim"]


# ---------------------------------------------------------------------------------------------- pools
def sample_pool(
    bb: Backbone,
    images: pd.DataFrame,
    folder: Path,
    seeds: list[int],
    opts: SamplingOptions,
    controlnet: torch.nn.Module | None = None,
    model: str = "base",
    upscale: int = 4,
    state=None,
) -> None:
    """`dp2osr sample` of ``images`` into ``folder`` with ``controlnet`` (default: the backbone's own).

    ``state`` (accelerate's ``PartialState`` or ``Accelerator``; None: one process): each process samples its
    share of the (image, seed) work and the main process writes the manifest once all are done.
    """
    from dp2osr.sample import sample_candidates, write_manifest

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    old = bb.controlnet
    bb.controlnet = controlnet if controlnet is not None else old
    try:
        sample_candidates(
            bb, images, folder, seeds, opts, upscale=upscale, rank=rank, world=world, show_progress=rank == 0
        )
    finally:
        bb.controlnet = old
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        write_manifest(images, folder, seeds, f"{opts.backbone}|{model}")


def score_pool(
    cands: Path, out: Path, metrics: list[str], weights_dir: Path | None = None, device: str = "auto"
) -> pd.DataFrame:
    """`dp2osr score` of the pool in ``cands`` (resumes); returns its long scores table."""
    from dp2osr.score import ScoreConfig, score

    status = score(
        ScoreConfig(candidates=cands, output=out, metrics=list(metrics), weights_dir=weights_dir, device=device)
    )
    if status != 0:
        raise RuntimeError(f"scoring {cands} failed (see the messages above)")
    return pd.read_parquet(Path(out) / "scores.parquet")


def quality(cands: Path) -> pd.DataFrame:
    """PSNR and SSIM (Y channel, Real-ISR convention; not in the reward) of every candidate; NaN without HR.

    Kept in ``cands/quality.parquet`` (redone when candidates.parquet is newer): a reward curve re-reads every
    earlier pool at each evaluation, and SSIM at 512 px costs about 0.5 s per image on a CPU.
    """
    from dp2osr.evaluate import psnr_y, ssim_y
    from dp2osr.score import read_candidates

    cache, manifest = Path(cands) / "quality.parquet", Path(cands) / "candidates.parquet"
    if cache.is_file() and cache.stat().st_mtime >= manifest.stat().st_mtime:
        return pd.read_parquet(cache)
    rows = []
    for r in read_candidates(cands).itertuples():
        if not r.hr_path:
            rows.append((r.image_id, int(r.seed), float("nan"), float("nan")))
            continue
        sr = load_image(Path(r.abs_path))[0].permute(1, 2, 0).double().numpy()
        hr = load_image(Path(r.hr_path))[0].permute(1, 2, 0).double().numpy()
        rows.append((r.image_id, int(r.seed), psnr_y(sr, hr), ssim_y(sr, hr)))
    table = pd.DataFrame(rows, columns=["image_id", "seed", "psnr", "ssim"])
    write_parquet(table, cache)
    return table


def pool_rewards(scores: pd.DataFrame, cands: Path, bounds: dict, metrics: list[str]) -> pd.DataFrame:
    """Hybrid reward (0.5/0.5) under fixed ``bounds``, with PSNR/SSIM, LR/HR and candidate paths."""
    from dp2osr.score import read_candidates

    table = hybrid_reward(scores, metric_lib.catalogue(list(metrics)), bounds=bounds)
    info = read_candidates(cands)[["image_id", "seed", "abs_path", "lr_path", "hr_path"]]
    return table.merge(info, on=["image_id", "seed"]).merge(quality(cands), on=["image_id", "seed"])


def pool_stats(df: pd.DataFrame) -> dict[str, float]:
    """Best/Mean/Worst@M at M = the whole pool, and the mean PSNR/SSIM of every candidate."""
    _, _, mat = bestm.rewards_matrix(df, "reward")
    s = bestm.best_mean_worst(mat, [mat.shape[1]])
    return {
        "best": float(s["best"][0]),
        "mean": float(s["mean"][0]),
        "worst": float(s["worst"][0]),
        "psnr": float(df["psnr"].mean()),
        "ssim": float(df["ssim"].mean()),
    }


def curve_from_pools(pools: dict[int, Path], metrics: list[str]) -> pd.DataFrame:
    """One row per step from scored pools ``{step: folder}``, normalised with the first step's bounds."""
    steps = sorted(pools)
    scores = {s: pd.read_parquet(pools[s] / "scores.parquet") for s in steps}
    bounds = fit_bounds(scores[steps[0]], metric_lib.catalogue(list(metrics)))
    rows = [{"step": s, **pool_stats(pool_rewards(scores[s], pools[s], bounds, metrics))} for s in steps]
    return pd.DataFrame(rows).rename(columns={"mean": "reward"})[CURVE_COLUMNS]


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
    import json

    found = {}
    for ckpt in sorted(Path(run).glob("checkpoint-*")):
        state, model = ckpt / "train_state.json", ckpt / "model.safetensors"
        if state.is_file() and model.is_file():
            found[int(json.loads(state.read_text())["step"])] = model
    return found


def controlnet_from(bb: Backbone, model: Path) -> torch.nn.Module:
    """A copy of the backbone's ControlNet holding the release-format weights in ``model``."""
    net = copy.deepcopy(bb.controlnet)
    load_release_state(net, model, "the run's ControlNet")
    return cast(net, bb.device, bb.dtype).eval()


def read_heldout(heldout: Path, metrics: list[str], limit: int | None = None) -> pd.DataFrame:
    """The held-out images (`sample.read_inputs`), checked to be scorable by ``metrics``."""
    from dp2osr.sample import read_inputs

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
    ) -> None:
        self.bb, self.folder, self.opts = bb, Path(folder), opts
        self.weights_dir, self.upscale = weights_dir, upscale
        self.metrics = metric_lib.resolve_names("offline", metrics)
        self.images = read_heldout(heldout, self.metrics, limit)
        self.seeds = [seed + k for k in range(samples)]

    def steps(self) -> list[int]:
        """Steps whose pool is complete on disk."""
        done = [p for p in self.folder.glob("step_*") if (p / "scores.parquet").is_file()]
        return sorted(int(p.name.removeprefix("step_")) for p in done)

    def pool(self, step: int, controlnet: torch.nn.Module | None = None, state=None) -> None:
        """Sample (with ``controlnet``; None: the backbone's own) and score the pool of ``step``.

        With ``state`` (see `sample_pool`) every process samples its share; the main process scores.
        """
        folder = step_dir(self.folder, step)
        with torch.no_grad():
            sample_pool(
                self.bb, self.images, folder, self.seeds, self.opts, controlnet, f"step {step}", self.upscale,
                state,
            )  # fmt: skip
        if state is None or state.is_main_process:
            score_pool(folder, folder, self.metrics, self.weights_dir, self.opts.device)
        if state is not None:
            state.wait_for_everyone()

    def curve(self) -> pd.DataFrame:
        """The curve of every step evaluated so far, written to FOLDER/reward_curve.{csv,png}."""
        table = curve_from_pools({s: step_dir(self.folder, s) for s in self.steps()}, self.metrics)
        write_curve(table, self.folder, f"Held-out reward, {len(self.images)} images x {len(self.seeds)} seeds")
        return table


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
    heldout: Path = field(help="held-out images: a `dp2osr degrade` folder (LR with HR) or a folder of LR images")
    output: Path | None = field(None, help="output folder (default: RUN_DIR/reward_curve)", run_only=True)
    backbone: str | None = field(None, help="model family (default: the run's)", choices=list(NAMES))
    base: Path | None = field(None, help="base model folder (default: the run's --base)")
    controlnet: Path | None = field(None, help="the step-0 ControlNet (default: the run's --controlnet)")
    samples: int = field(4, help="M: seeds per held-out image (the same at every step)")
    seed: int = field(50_000, help="seed of the first sample (seeds SEED .. SEED+M-1)")
    preset: str = field(
        "offline",
        help="metric set of the reward: offline (no weights) or paper (METHOD.md §2.3)",
        choices=sorted(metric_lib.PRESETS),
    )
    metrics: list[str] | None = field(None, help="metric names (pyiqa names); overrides --preset")
    weights_dir: Path | None = field(None, help="folder with IQA metric weights (for weight-backed metrics)")
    upscale: int = field(4, help="LR -> output scale factor")
    limit: int | None = field(None, help="use only the first N held-out images (sorted by ID)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")


def with_run_model(cfg: CurveConfig) -> CurveConfig:
    """``cfg`` with backbone / base / controlnet filled in from the run's train_config.yaml where not given."""
    from dp2osr.train import CONFIG_NAME as TRAIN_CONFIG
    from dp2osr.train import TrainConfig

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


def curve(cfg: CurveConfig) -> int:
    """Run ``dp2osr curve``: sample and score the held-out images at step 0 and every checkpoint.

    Under ``accelerate launch`` / ``torchrun`` the sampling of every step is shared by the processes.
    """
    from accelerate import PartialState

    from dp2osr.engine.sampler import load_model, resolve_device

    cfg = with_run_model(cfg)
    out = Path(cfg.output or Path(cfg.run_dir) / "reward_curve")
    checkpoints = run_checkpoints(cfg.run_dir)
    if not checkpoints:
        raise ValueError(f"{cfg.run_dir} holds no finished checkpoint-NNNNNN/ (with model.safetensors)")
    names = metric_lib.resolve_names(cfg.preset, cfg.metrics)
    read_heldout(cfg.heldout, names, cfg.limit)  # bad input fails before the model loads
    check_resume(cfg, out / CONFIG_NAME, "a reward curve", "use the same options or another --output")
    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = state.device if cfg.device == "auto" and state.num_processes > 1 else resolve_device(cfg.device)
    bb = load_model(cfg, device)
    state.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    if state.is_main_process:
        save_config(cfg, out / CONFIG_NAME)
    ev = HeldoutEval(
        bb, cfg.heldout, out, cfg, samples=cfg.samples, seed=cfg.seed, metrics=names,
        weights_dir=cfg.weights_dir, limit=cfg.limit, upscale=cfg.upscale,
    )  # fmt: skip
    for step in [0, *sorted(checkpoints)]:
        if state.is_main_process:
            print(f"curve: step {step} -> {step_dir(out, step)}", file=sys.stderr)
        ev.pool(step, None if step == 0 else controlnet_from(bb, checkpoints[step]), state)
    if not state.is_main_process:
        return 0
    table = ev.curve()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"curve: {out / CURVE_CSV} and {out / CURVE_PNG}", file=sys.stderr)
    return 0
