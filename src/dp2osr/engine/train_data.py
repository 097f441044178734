"""Training data for `dp2osr train`: examples from the pair tables, the data order, and the frozen inputs.

Only the ControlNet trains, so the VAE latents of every training image, the prepared control images and the
prompt embeddings never change: `FrozenEncoder` computes them, `dp2osr.engine.frozen_store` stores them on
disk once before the first step, and `OnTheFly` (``--no-cache``) computes them in every step instead.
The order of examples is a pure function of (seed, step, micro-batch, process), so a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from dp2osr import tables
from dp2osr.backbones import Backbone, Cond
from dp2osr.engine.pool_store import read_image
from dp2osr.images import load_image
from dp2osr.math.geometry import resize
from dp2osr.math.permutation import permuted


@dataclass
class Examples:
    """Training examples. DPO: ``images = [win, lose]``; SFT: ``images = [hr]``. Paths are absolute."""

    images: list[list[str]]  # per example, the target image paths
    lr: list[str]
    prompts: list[str]
    weights: torch.Tensor  # (N,) HPO weight of each pair (1 for SFT)

    def __len__(self) -> int:
        return len(self.lr)


def data_table(data: Path, mode: str) -> Path:
    """The table ``--data`` names: DPO's ``pref_pairs.parquet``, SFT's ``pairs.parquet`` (or that file itself)."""
    schema = tables.PREF_PAIRS if mode == "dpo" else tables.PAIRS
    return Path(data) / schema.filename if Path(data).is_dir() else Path(data)


def existing_table(data: Path, mode: str) -> Path:
    """`data_table`, raising FileNotFoundError (naming what ``mode`` reads) when it is not a file."""
    path = data_table(data, mode)
    if not path.is_file():
        schema = tables.PREF_PAIRS if mode == "dpo" else tables.PAIRS
        raise FileNotFoundError(f"training data not found: {path} (--mode {mode} reads {schema.filename})")
    return path


def read_examples(data: Path, mode: str, hpo: str = "both") -> Examples:
    """DPO: a ``pref_pairs.parquet`` (or a folder with one); SFT: a `dp2osr degrade` folder (pairs.parquet)."""
    schema = tables.PREF_PAIRS if mode == "dpo" else tables.PAIRS
    df, _ = tables.read(schema, existing_table(data, mode))
    # Series.tolist converts a column at once; iterating a column yields its values one by one (seconds at 10^6).
    prompts = df["prompt"].tolist() if "prompt" in df.columns else [""] * len(df)
    lr = df["lr_path"].tolist()
    if mode == "sft":
        return Examples([[p] for p in df["hr_path"].tolist()], lr, prompts, torch.ones(len(df)))
    if hpo == "none":
        w = torch.ones(len(df))
    else:
        col = {"both": ["w_intra", "w_inter"], "intra": ["w_intra"], "inter": ["w_inter"]}[hpo]
        w = torch.tensor(df[col].prod(axis=1).to_numpy(), dtype=torch.float32)
    images = [[a, b] for a, b in zip(df["win_path"].tolist(), df["lose_path"].tolist())]
    return Examples(images, lr, prompts, w)


KEYED_ORDER_ABOVE = 2**16  # pools larger than this use the keyed permutation (O(1) per example)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One epoch's permutation of the ``n`` examples, drawn once (every micro-batch of the epoch reads it)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist())


def epoch_position(n: int, seed: int, epoch: int, i: int) -> int:
    """The example at position ``i`` of epoch ``epoch``'s permutation of ``n`` examples.

    Up to ``KEYED_ORDER_ABOVE`` examples: ``torch.randperm(n)`` seeded with ``seed * 7919 + epoch``, drawn once
    per epoch and kept. Above it: `dp2osr.math.permutation.permuted` keyed by (seed, epoch), computed per
    index (drawing and keeping a permutation of millions of examples per epoch costs O(n)).
    """
    if n > KEYED_ORDER_ABOVE:
        return permuted(i, n, f"{seed}:{epoch}")
    return _epoch_order(n, seed, epoch)[i]


def batch_indices(
    n: int, step: int, micro: int, rank: int, batch: int, accum: int, world: int, seed: int
) -> list[int]:
    """Example indices for (optimizer step, micro-batch, process): a slice of concatenated epoch permutations.

    Every (step, micro, rank) gets a disjoint slice of one stream, so processes never see the same example in
    a step and the order does not depend on where a run was resumed. Each epoch's permutation is
    `epoch_position`'s: a seeded ``torch.randperm`` up to ``KEYED_ORDER_ABOVE`` examples, a keyed
    permutation computed per index above (O(1) per example).
    """
    per_step = batch * accum * world
    start = step * per_step + (micro * world + rank) * batch
    return [epoch_position(n, seed, pos // n, pos % n) for pos in range(start, start + batch)]


class FrozenEncoder:
    """The frozen parts' work on one example's inputs: the upsampled LR, the VAE latents of a target image, the
    prepared control and a prompt's embeddings, each exactly as the training step consumes it (one image or
    prompt per call, results on the CPU). `dp2osr.engine.frozen_store` stores what this computes; `OnTheFly`
    calls it every step."""

    def __init__(self, bb: Backbone, upscale: int) -> None:
        self.bb, self.upscale = bb, upscale

    def upsample(self, lr: torch.Tensor) -> torch.Tensor:
        """An LR ``(1, 3, h, w)`` in [0, 1] at the training size (``upscale`` times larger)."""
        return resize(lr, (lr.shape[-2] * self.upscale, lr.shape[-1] * self.upscale))

    def lr_up(self, path: str) -> torch.Tensor:
        return self.upsample(load_image(Path(path)))

    @torch.no_grad()
    def latents(self, path: str, lr_path: str, up: torch.Tensor | None = None) -> torch.Tensor:
        """The latents of the target image ``path`` (``up``: its upsampled LR, read from ``lr_path`` if None)."""
        img = read_image(path)
        up = self.lr_up(lr_path) if up is None else up
        if img.shape[-2:] != up.shape[-2:]:
            raise ValueError(
                f"{path} is {tuple(img.shape[-2:])} but its LR {lr_path} x{self.upscale} is {tuple(up.shape[-2:])}"
            )
        return self.bb.encode_images(img, up.to(self.bb.device))[0].cpu()

    @torch.no_grad()
    def control(self, up: torch.Tensor) -> torch.Tensor:
        """The prepared control of an upsampled LR ``up``."""
        return self.bb.prepare_control(up.to(self.bb.device))[0].cpu()

    @torch.no_grad()
    def cond(self, prompt: str) -> Cond:
        return {k: v.cpu() for k, v in self.bb.encode_prompts([prompt]).items()}


def assemble(device, targets, controls, conds: list[Cond], weights: torch.Tensor):
    """A micro-batch on ``device`` from per-example CPU tensors: (targets ``(K, B, C, h, w)`` from ``K`` lists
    of ``B`` latents, control ``(B, ...)``, cond (each entry ``(B, ...)``), weights ``(B,)``)."""
    stacked = torch.stack([torch.stack(per_k) for per_k in targets])
    control = torch.stack(controls)
    cond = {key: torch.cat([c[key] for c in conds]).to(device) for key in conds[0]}
    return stacked.to(device), control.to(device), cond, weights.to(device)


class OnTheFly:
    """Training inputs encoded every step (``--no-cache``; the reference the stored inputs are checked against)."""

    def __init__(self, enc: FrozenEncoder, ex: Examples) -> None:
        self.enc, self.ex = enc, ex

    def __len__(self) -> int:
        return len(self.ex)

    def batch(self, idx: list[int], drop_prompt: list[bool] | None = None):
        """(targets ``(K, B, C, h, w)``, control ``(B, ...)``, cond, weights ``(B,)``) for examples ``idx``."""
        ex, enc = self.ex, self.enc
        k = len(ex.images[idx[0]])
        targets = [[enc.latents(ex.images[i][j], ex.lr[i]) for i in idx] for j in range(k)]
        controls = [enc.control(enc.lr_up(ex.lr[i])) for i in idx]
        prompts = [("" if drop_prompt and drop_prompt[n] else ex.prompts[i]) for n, i in enumerate(idx)]
        return assemble(enc.bb.device, targets, controls, [enc.cond(p) for p in prompts], ex.weights[idx])
