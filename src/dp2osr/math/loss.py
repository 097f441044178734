"""The DP²O training objective: Diffusion-DPO / Flow-DPO on per-sample denoising errors (arXiv 2510.18851).

Used by the ``train`` stage (``dp2osr/train.py``, ``--mode dpo``). The training loop runs the policy and the
frozen reference ControlNet on a (winner, loser) pair with one shared timestep/sigma and one shared noise,
reduces each prediction to a per-pair error with :func:`mse_per_sample`, and hands the four error vectors
to :func:`dpo_loss`. The loss itself knows nothing about the backbone: SD2 (epsilon or v target) and FLUX
(flow-matching velocity target) differ only in what ``pred`` and ``target`` are.

Sign convention (arXiv 2510.18851): an *error* is lower-is-better, so the policy prefers the winner when its
error on the winner drops relative to the reference more than its error on the loser does, i.e. when

    Δ = (e_θ(x_w) − e_ref(x_w)) − (e_θ(x_l) − e_ref(x_l)) < 0,

and the per-pair loss is ℓ = −log σ(−β/2 · Δ) with the 1/2 inside, as the paper writes it (β = 5000).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class DPOOutput:
    """Result of :func:`dpo_loss`.

    ``loss`` is what the optimiser sees (keeps the graph). Everything else is detached and is for logging.

    Attributes:
        loss: scalar, mean over the batch of ``weight · ℓ``.
        losses: ``(B,)`` unweighted per-pair losses ℓ = −log σ(logits) (keeps the graph).
        logits: ``(B,)`` the DPO logits −β/2 · Δ (detached); > 0 when the policy prefers the winner.
        accuracy: scalar, share of pairs with Δ < 0 (strictly; exactly 0 at initialisation, where Δ = 0).
        reward_margin: scalar, mean over the batch of the logits −β/2 · Δ, i.e. the implicit reward of
            the winner minus that of the loser, with implicit reward r(x) = −β/2 · (e_θ(x) − e_ref(x)).
        policy_err_w, policy_err_l, ref_err_w, ref_err_l: scalars, batch means of the four errors.
    """

    loss: Tensor
    losses: Tensor
    logits: Tensor
    accuracy: Tensor
    reward_margin: Tensor
    policy_err_w: Tensor
    policy_err_l: Tensor
    ref_err_w: Tensor
    ref_err_l: Tensor


def mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: e(x) of the paper, "mean over C,H,W of ‖target − prediction‖²".

    Args:
        pred: ``(B, ...)`` model prediction — SD2 latents ``(B, C, H, W)``, FLUX packed tokens ``(B, N, D)``.
        target: same shape as ``pred`` (epsilon, v, or flow velocity ε − x₀).

    Returns:
        ``(B,)`` mean over every non-batch dimension, in at least float32: the DPO logit multiplies error
        differences of order 1e-4 by β/2 = 2500, so half-precision sums would be noise.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.dim() == 0:
        raise ValueError("pred and target need a batch dimension, got scalars")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def dpo_loss(
    policy_err_w: Tensor,
    policy_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    weights: Tensor | None = None,
    winner_sft: float = 0.0,
) -> DPOOutput:
    """Diffusion-DPO loss on per-pair errors (arXiv 2510.18851), optionally HPO-weighted.

    Δ = (e_θ(x_w) − e_ref(x_w)) − (e_θ(x_l) − e_ref(x_l));  ℓ = −log σ(−β/2 · Δ);  L = mean_b(w_b · ℓ_b).

    Computed as ``-F.logsigmoid(logits)``, which is stable for large |β·Δ|. At initialisation (policy =
    reference) Δ = 0 and ℓ = ln 2. dℓ/dΔ = β/2 · σ(β/2 · Δ) > 0, so descending ℓ lowers the policy's error on
    the winner and raises it on the loser. Gradients reach only the policy errors' graph (the reference errors
    are expected to come from a ``no_grad`` pass; they are not detached here).

    Args:
        policy_err_w: ``(B,)`` e_θ(x_w), the policy's mean squared error on the winner.
        policy_err_l: ``(B,)`` e_θ(x_l), on the loser.
        ref_err_w: ``(B,)`` e_ref(x_w), the frozen reference's error on the winner.
        ref_err_l: ``(B,)`` e_ref(x_l), on the loser.
        beta: β > 0 (paper: 5000), with the 1/2 of the formula applied on top of it.
        weights: ``(B,)`` per-pair HPO weights w = w_intra · w_inter, or None for uniform weights 1
            (plain Diffusion-DPO). The mean divides by B, not by the sum of the weights: HPO weights already
            average to 1 over the data set, and a per-batch renormalisation would undo inter-group emphasis.
        winner_sft: λ ≥ 0 of an optional supervised term on the winners (not in the paper; 0 = off):
            L = mean_b(w_b · (ℓ_b + λ · (e_θ(x_w) − e_ref(x_w)))). Its gradient is λ·w_b on the policy's winner
            error (the reference error is a constant), against β/4·w_b from ℓ at initialisation; it pulls the
            policy towards its winners, where plain DPO may lower ℓ by moving away from winner and loser alike.

    Returns:
        :class:`DPOOutput` with the scalar loss and per-pair diagnostics.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not winner_sft >= 0:
        raise ValueError(f"winner_sft must be >= 0, got {winner_sft!r}")
    errs = {
        "policy_err_w": policy_err_w,
        "policy_err_l": policy_err_l,
        "ref_err_w": ref_err_w,
        "ref_err_l": ref_err_l,
    }
    for name, err in errs.items():
        if err.dim() != 1 or err.shape != policy_err_w.shape:
            raise ValueError(
                f"{name} must be a (B,) vector shaped like policy_err_w {tuple(policy_err_w.shape)}, "
                f"got {tuple(err.shape)}"
            )
    if weights is not None and weights.shape != policy_err_w.shape:
        raise ValueError(f"weights must have shape {tuple(policy_err_w.shape)}, got {tuple(weights.shape)}")

    delta = (policy_err_w - ref_err_w) - (policy_err_l - ref_err_l)
    logits = -0.5 * beta * delta
    losses = -F.logsigmoid(logits)
    total = losses + winner_sft * (policy_err_w - ref_err_w) if winner_sft else losses
    loss = (total if weights is None else weights.to(total.dtype) * total).mean()

    with torch.no_grad():
        return DPOOutput(
            loss=loss,
            losses=losses,
            logits=logits.detach(),
            accuracy=(delta < 0).to(losses.dtype).mean(),
            reward_margin=logits.detach().mean(),
            policy_err_w=policy_err_w.detach().mean(),
            policy_err_l=policy_err_l.detach().mean(),
            ref_err_w=ref_err_w.detach().mean(),
            ref_err_l=ref_err_l.detach().mean(),
        )
