"""Held-out preference accuracy: how often a policy prefers each pair's winner more than its reference does.

For a (winner w, loser l) pair, Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)), where e is the denoising error
of the training objective (`objectives.denoise_errors`: the per-sample errors DPO's loss is built from), averaged
over K fixed (noise, timestep) draws per pair: drawn on a CPU generator seeded by (seed, pair), the same for the
policy and the reference and at every evaluation. A pair counts as preferred when Δ < 0; a tie (Δ = 0 exactly,
as everywhere when policy = reference) does not, and its share is reported. The interval is a percentile
bootstrap over crops (`math.bootstrap`): the pairs of one crop share their images. Forward passes only, with
their own generators and their own frozen-input cache: evaluating never changes what training draws or sees.

`train --heldout-pairs` evaluates it at every evaluation (`TrainAccuracy`, on the held-out pairs and on a
sample of the training pairs); the quickstart evaluates the checkpoints of its run (`over_checkpoints`).
Both write ``pref_accuracy.{csv,png}``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dp2osr import plots
from dp2osr.backbones import Backbone
from dp2osr.engine.heldout import controlnet_from
from dp2osr.engine.objectives import NoisedBatch, denoise_errors, noise_batch
from dp2osr.engine.train_data import Examples, FrozenEncoder, OnTheFly, data_table, read_examples
from dp2osr.math.bootstrap import grouped_share_interval

ACCURACY_CSV = "pref_accuracy.csv"
ACCURACY_PNG = "pref_accuracy.png"
COLUMNS = ["step", "set", "accuracy", "lo", "hi", "ties", "pairs", "crops", "draws"]
TRAIN_PAIRS = (
    256  # training pairs evaluated beside the held-out ones: at most this many (or as many as held out)
)
_PAIRS_PER_PASS = 16  # pairs per forward pass (each 2·K rows)


@dataclass
class PairSet:
    """Preference pairs (`train_data.Examples`, winner first) and the crop each belongs to."""

    examples: Examples
    groups: np.ndarray  # (P,) image_id of each pair

    def __len__(self) -> int:
        return len(self.groups)


def read_pairs(path: Path, max_pairs: int | None = None, seed: int = 0) -> PairSet:
    """The pairs of a ``pref_pairs.parquet`` (or its folder). With ``max_pairs``: whole crops in a seeded random
    order until at least that many pairs (all of them when the table holds no more)."""
    table = data_table(Path(path), "dpo")
    ex = read_examples(table, "dpo", "none")
    groups = pd.read_parquet(table, columns=["image_id"])["image_id"].astype(str).to_numpy()
    if max_pairs is None or len(groups) <= max_pairs:
        return PairSet(ex, groups)
    crops = np.unique(groups)
    sizes = pd.Series(groups).value_counts()
    order = crops[np.random.default_rng(seed).permutation(len(crops))]
    chosen = order[: int(np.searchsorted(np.cumsum(sizes[order].to_numpy()), max_pairs)) + 1]
    keep = np.flatnonzero(np.isin(groups, chosen))
    sub = Examples(
        [ex.images[i] for i in keep],
        [ex.lr[i] for i in keep],
        [ex.prompts[i] for i in keep],
        ex.weights[keep],
    )
    return PairSet(sub, groups[keep])


def summarize(delta: np.ndarray, groups: np.ndarray, draws: int, seed: int = 0) -> dict:
    """Accuracy (share of Δ < 0), its bootstrap interval over crops, the share of ties (Δ = 0) and counts."""
    accuracy, lo, hi = grouped_share_interval(delta < 0, groups, seed=seed)
    return {
        "accuracy": accuracy,
        "lo": lo,
        "hi": hi,
        "ties": float(np.mean(delta == 0)),
        "pairs": len(delta),
        "crops": len(np.unique(groups)),
        "draws": draws,
    }


class PrefAccuracy:
    """The implicit-reward accuracy of policies against one frozen reference on one set of pairs.

    The reference's errors are computed on the first `evaluate` and kept (the reference never changes).
    """

    def __init__(self, bb: Backbone, pairs: PairSet, *, upscale: int, draws: int = 4, seed: int = 0) -> None:
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.bb, self.pairs, self.draws, self.seed = bb, pairs, draws, seed
        self.inputs = OnTheFly(FrozenEncoder(bb, upscale), pairs.examples)
        self._encoded: dict[int, tuple] = {}  # pair -> its encoded inputs (the pair sets are small)
        self._ref: torch.Tensor | None = None

    def _batch(self, i: int):
        """Pair ``i``'s (targets, control, cond), each repeated for the K draws; encoded once."""
        if i not in self._encoded:
            self._encoded[i] = self.inputs.batch([i])[:3]
        targets, control, cond = self._encoded[i]
        k = self.draws
        return (
            targets.repeat_interleave(k, dim=1),
            control.repeat_interleave(k, dim=0),
            {n: v.repeat_interleave(k, dim=0) for n, v in cond.items()},
        )

    def _noised(self, i: int) -> NoisedBatch:
        """Pair ``i`` repeated K times: K (noise, timestep) draws of its own generator; rows [w·K, l·K]."""
        targets, control, cond = self._batch(i)
        g = torch.Generator().manual_seed((self.seed + 1) * 1_000_000_007 + i)
        return noise_batch(self.bb, targets, control, cond, g)

    def _passes(self):
        """NoisedBatches of up to ``_PAIRS_PER_PASS`` pairs, rows pair-major ([w·K, l·K] per pair)."""
        for start in range(0, len(self.pairs), _PAIRS_PER_PASS):
            nbs = [self._noised(i) for i in range(start, min(len(self.pairs), start + _PAIRS_PER_PASS))]
            cond = {k: torch.cat([nb.cond[k] for nb in nbs]) for k in nbs[0].cond}
            cat = {
                f: torch.cat([getattr(nb, f) for nb in nbs])
                for f in ("noisy", "target", "timesteps", "control")
            }
            yield NoisedBatch(**cat, cond=cond, examples=len(nbs) * self.draws)

    @torch.no_grad()
    def errors(self, net: torch.nn.Module, autocast=contextlib.nullcontext) -> torch.Tensor:
        """e of every pair, image and draw with ControlNet ``net``: ``(P, 2, K)`` float64 on the CPU."""
        out = []
        for nb in self._passes():
            with autocast():
                trunk = self.bb.trunk(nb.noisy, nb.timesteps, nb.cond)
            out.append(denoise_errors(self.bb, net, nb, trunk, autocast).double().cpu())
        return torch.cat(out).reshape(len(self.pairs), 2, self.draws)

    def evaluate(
        self,
        policy: torch.nn.Module,
        reference: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]],
        autocast=contextlib.nullcontext,
    ) -> dict:
        """`summarize` of Δ per pair (mean over the K draws) of ``policy`` against ``reference()``."""
        if self._ref is None:
            with reference() as ref:
                self._ref = self.errors(ref, autocast)
        with reference() as ref:  # the reference itself: its errors again, without the forward passes
            same = policy is ref
        d = (self._ref if same else self.errors(policy, autocast)) - self._ref
        delta = (d[:, 0] - d[:, 1]).mean(dim=1).numpy()
        return summarize(delta, self.pairs.groups, self.draws, self.seed)


# ---------------------------------------------------------------------------------------- tables
def write_table(rows: pd.DataFrame, folder: Path) -> Path:
    """``pref_accuracy.csv`` and its plot in ``folder``; returns the CSV's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows[COLUMNS].sort_values(["step", "set"], kind="stable")
    rows.to_csv(folder / ACCURACY_CSV, index=False, float_format="%.6f")
    plots.write_png(plots.plot_pref_accuracy(rows), folder / ACCURACY_PNG)
    return folder / ACCURACY_CSV


def read_table(folder: Path) -> pd.DataFrame:
    path = Path(folder) / ACCURACY_CSV
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)


def sentence(row: dict, where: str = "held-out") -> str:
    """One line: the accuracy with its interval, ties and counts."""
    return (
        f"{where} preference accuracy {row['accuracy']:.2f} (95% interval {row['lo']:.2f}–{row['hi']:.2f}, "
        f"bootstrap over {int(row['crops'])} crops; {int(row['pairs'])} pairs × {int(row['draws'])} draws; ties "
        f"{row['ties']:.0%})"
    )


# ------------------------------------------------------------------------------------- training
class TrainAccuracy:
    """`train --heldout-pairs`: at every evaluation, the accuracy on the held-out pairs and on up to
    max(`TRAIN_PAIRS`, held-out pairs) training pairs (whole crops, seeded) -> metrics.jsonl (``pref_heldout``,
    ``pref_train`` with ``_lo``, ``_hi``, ``_ties``) and OUTPUT/pref_accuracy.{csv,png}."""

    def __init__(self, cfg, bb: Backbone, out: Path) -> None:
        held = read_pairs(cfg.heldout_pairs)
        train = read_pairs(cfg.data, max(TRAIN_PAIRS, len(held)), cfg.seed)
        opts = {"upscale": cfg.upscale, "draws": cfg.pref_draws, "seed": cfg.seed}
        self.sets = {"heldout": PrefAccuracy(bb, held, **opts), "train": PrefAccuracy(bb, train, **opts)}
        self.out = Path(out)

    def at_step(self, run, done: int, reference, log: Callable[[dict], None]) -> float:
        """Evaluate the current weights (EMA weights when kept: the model that is saved) on the main process,
        log and write the table; returns the seconds it took. A resumed run keeps the row of its start step."""
        acc, start = run.accelerator, time.perf_counter()
        if acc.is_main_process and not (done == run.start > 0 and done in set(read_table(self.out).step)):
            model = acc.unwrap_model(run.net)
            with _policy_weights(run, model):
                rows = {k: s.evaluate(model, reference, acc.autocast) for k, s in self.sets.items()}
            table = read_table(self.out)
            new = pd.DataFrame([{"step": done, "set": k, **r} for k, r in rows.items()])
            kept = table[table.step < done]
            write_table(pd.concat([kept, new], ignore_index=True) if len(kept) else new, self.out)
            record = {f"pref_{k}{s}": rows[k][c] for k in rows for s, c in _SUFFIXES.items()}
            log({"step": done, **record, "pref_seconds": time.perf_counter() - start})
            print(
                f"eval step {done}: {sentence(rows['heldout'])}; training pairs "
                f"{rows['train']['accuracy']:.2f}",
                file=sys.stderr,
            )
        acc.wait_for_everyone()
        return time.perf_counter() - start


_SUFFIXES = {"": "accuracy", "_lo": "lo", "_hi": "hi", "_ties": "ties"}


@contextlib.contextmanager
def _policy_weights(run, model: torch.nn.Module):
    """The policy in eval mode, holding the EMA weights when the run keeps them; restored afterwards."""
    if run.ema is not None:
        run.ema.store(run.params)
        run.ema.copy_to(run.params)
    model.eval()
    try:
        yield
    finally:
        model.train()
        if run.ema is not None:
            run.ema.restore(run.params)


def for_run(cfg, bb: Backbone, out: Path) -> TrainAccuracy | None:
    """The evaluator of ``--heldout-pairs`` (None without it)."""
    return None if cfg.heldout_pairs is None else TrainAccuracy(cfg, bb, out)


# ---------------------------------------------------------------------------------- checkpoints
def over_checkpoints(
    bb: Backbone,
    checkpoints: dict[int, Path],
    sets: dict[str, PairSet],
    *,
    upscale: int,
    draws: int,
    seed: int,
) -> pd.DataFrame:
    """The accuracy of every checkpoint (``{step: model.safetensors}``) against the backbone's own ControlNet
    (step 0: the reference itself, so accuracy 0 with every pair a tie), one row per step and set of pairs."""
    reference = bb.controlnet
    evals = {k: PrefAccuracy(bb, p, upscale=upscale, draws=draws, seed=seed) for k, p in sets.items()}
    rows = []
    for step in [0, *sorted(checkpoints)]:
        net = reference if step == 0 else controlnet_from(bb, checkpoints[step])
        for name, ev in evals.items():
            rows.append(
                {"step": step, "set": name, **ev.evaluate(net, lambda: contextlib.nullcontext(reference))}
            )
    return pd.DataFrame(rows, columns=COLUMNS)
