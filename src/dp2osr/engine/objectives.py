"""The training objectives of one micro-batch: supervised (SFT) and DP²O's Diffusion-DPO, as plain functions.

Both start from `noise_batch`: clean latents are noised at one timestep per example, and in DPO the winner
and the loser of a pair share the noise and the timestep. `dpo_objective` runs the frozen reference
ControlNet and the policy on the same noisy latents and applies `dp2osr.math.loss.dpo_loss` with the pair
weights (HPO); at policy = reference its loss is ln 2 for every pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from dp2osr.backbones import Backbone, Cond
from dp2osr.math.loss import dpo_loss, mse_per_sample


@dataclass
class NoisedBatch:
    """A micro-batch ready for the denoiser: K targets (1 for SFT, winner and loser for DPO) of B examples,
    flattened to ``K·B`` rows in target-major order (rows ``[:B]`` are the winners)."""

    noisy: torch.Tensor  # (K·B, C, h, w)
    target: torch.Tensor  # (K·B, C, h, w): epsilon, v or flow velocity
    timesteps: torch.Tensor  # (K·B,)
    control: torch.Tensor  # (K·B, ...)
    cond: Cond  # batch K·B
    examples: int  # B


def noise_batch(
    bb: Backbone, targets: torch.Tensor, control: torch.Tensor, cond: Cond, g: torch.Generator
) -> NoisedBatch:
    """Noise ``targets`` ``(K, B, C, h, w)``: one noise draw and one timestep per example, shared by its K
    targets, all drawn on the CPU generator ``g`` (so a run is reproducible on any device)."""
    k, b = targets.shape[:2]
    hw = tuple(targets.shape[-2:])
    noise = torch.randn(targets.shape[1:], generator=g).to(bb.device, targets.dtype)
    t = bb.sample_timesteps(b, hw, g)
    x0, noise, t = targets.flatten(0, 1), noise.repeat(k, 1, 1, 1), t.repeat(k)
    control = control.repeat(k, *([1] * (control.dim() - 1)))
    cond = {key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in cond.items()}
    noisy, target = bb.noisy_and_target(x0, noise, t)
    return NoisedBatch(noisy, target, t, control, cond, b)


def sft_objective(
    bb: Backbone,
    policy: torch.nn.Module,
    nb: NoisedBatch,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised loss: the mean squared error of the policy's prediction, and its diagnostics."""
    err = denoise_errors(bb, policy, nb, autocast=autocast)
    return err.mean(), {"loss": err.mean().item()}


def denoise_errors(
    bb: Backbone,
    net: torch.nn.Module,
    nb: NoisedBatch,
    trunk=None,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """e(x) of every row of ``nb`` ``(K·B,)``: the mean squared error of the denoiser's prediction with
    ControlNet ``net`` (``trunk``: `Backbone.trunk` of these latents, computed once for several nets)."""
    with autocast():
        pred = bb.predict(
            nb.noisy,
            nb.timesteps,
            nb.cond,
            nb.control,
            guidance=bb.train_guidance,
            controlnet=net,
            trunk=trunk,
        )
    return mse_per_sample(pred.float(), nb.target.float())


def dpo_objective(
    bb: Backbone,
    policy: torch.nn.Module,
    reference: Callable[[], AbstractContextManager[torch.nn.Module]],
    nb: NoisedBatch,
    weights: torch.Tensor,
    *,
    beta: float,
    winner_sft: float = 0.0,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO loss of a batch of (winner, loser) pairs weighted by ``weights`` ``(B,)``, and diagnostics.

    ``reference()`` is a context manager yielding the frozen reference ControlNet (with LoRA: the policy with
    its adapter disabled). The frozen denoiser's part that the ControlNet does not reach (SD2: the UNet's down
    and mid blocks, `Backbone.trunk`) runs once for both passes. The reference pass runs first, so its
    activations are freed before the policy's graph is built (the same numbers in either order).
    """
    b = nb.examples
    with torch.no_grad():
        with autocast():
            trunk = bb.trunk(nb.noisy, nb.timesteps, nb.cond)
        with reference() as ref:
            ref_err = denoise_errors(bb, ref, nb, trunk, autocast)
    err = denoise_errors(bb, policy, nb, trunk, autocast)
    del trunk
    o = dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], beta, weights, winner_sft)
    stats = {
        "loss": o.loss.item(),
        "accuracy": o.accuracy.item(),
        "reward_margin": o.reward_margin.item(),
        "policy_err_w": o.policy_err_w.item(),
        "policy_err_l": o.policy_err_l.item(),
        "ref_err_w": o.ref_err_w.item(),
        "ref_err_l": o.ref_err_l.item(),
    }
    return o.loss, stats
