"""The training objectives on their own (tiny SD2, CPU): no training loop, no files.

Hand derivation used below. Per pair, Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)) with e the per-sample MSE,
and ℓ = −log σ(−β/2 · Δ). At policy = reference every e_θ = e_ref, so Δ = 0 and ℓ = −log σ(0) = ln 2 for
every pair, whatever the weights (the weighted mean of a constant, Σ wᵢ·ln 2 / Σ… = ln 2 when weights are
normalised by their count: dpo_loss averages w·ℓ, so with w ≡ c the loss is c·ln 2). The gradient of ℓ with
respect to e_θ(w) is β/2 · σ(β/2 · Δ) > 0 (= β/4 at Δ = 0): a step against it lowers the winner's error.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from dp2osr.backbones import load_backbone
from dp2osr.engine.objectives import dpo_objective, noise_batch, sft_objective


@pytest.fixture(scope="module")
def bb():
    return load_backbone("sd2-tiny")


def _batch(bb, b: int = 3, seed: int = 0):
    """(targets (2, B, 4, 8, 8), control, cond): random clean latents for winners and losers of B pairs."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn((2, b, 4, 8, 8), generator=g)
    control = bb.prepare_control(torch.rand((b, 3, 64, 64), generator=g))
    cond = bb.encode_prompts([""] * b)
    return targets, control, cond


def _perturbed(net: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """A copy with every weight moved a little (a ControlNet whose residuals are not all zero)."""
    other = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def test_noise_is_shared_by_winner_and_loser(bb):
    targets, control, cond = _batch(bb)
    nb = noise_batch(bb, targets, control, cond, torch.Generator().manual_seed(0))
    b = nb.examples
    assert nb.noisy.shape == (2 * b, 4, 8, 8) and torch.equal(nb.timesteps[:b], nb.timesteps[b:])
    # epsilon prediction: target = the noise itself, the same for a pair's winner and loser
    assert torch.equal(nb.target[:b], nb.target[b:])


@pytest.mark.parametrize("weights", [torch.ones(3), torch.tensor([0.5, 1.0, 1.5])])
def test_dpo_loss_is_ln2_at_policy_equal_reference(bb, weights):
    """Δ = 0 for every pair -> ℓ = ln 2; the weighted mean of ln 2 with weights of mean 1 is ln 2."""
    policy = _perturbed(bb.controlnet)
    reference = copy.deepcopy(policy)
    targets, control, cond = _batch(bb)
    nb = noise_batch(bb, targets, control, cond, torch.Generator().manual_seed(0))
    loss, stats = dpo_objective(
        bb, policy, lambda: contextlib.nullcontext(reference), nb, weights, beta=500.0
    )
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-9)
    assert stats["policy_err_w"] == pytest.approx(stats["ref_err_w"], rel=1e-6)


def test_dpo_gradient_lowers_the_winner_error(bb):
    """One small step down the DPO gradient lowers e_θ(w) − e_θ(l) relative to the reference (Δ < 0)."""
    policy = _perturbed(bb.controlnet)
    reference = copy.deepcopy(policy).requires_grad_(False)
    targets, control, cond = _batch(bb)
    nb = noise_batch(bb, targets, control, cond, torch.Generator().manual_seed(0))
    ref = lambda: contextlib.nullcontext(reference)  # noqa: E731
    loss, _ = dpo_objective(bb, policy, ref, nb, torch.ones(3), beta=500.0)
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad / (p.grad.norm() + 1e-12))
    after, stats = dpo_objective(bb, policy, ref, nb, torch.ones(3), beta=500.0)
    assert after.item() < math.log(2)  # σ(−β/2·Δ) > 1/2 <=> Δ < 0
    assert stats["reward_margin"] > 0 and stats["accuracy"] > 0


def test_hpo_weights_scale_each_pair(bb):
    """With the same batch, doubling one pair's weight adds exactly that pair's ℓ once more to Σ w·ℓ / B."""
    policy, reference = _perturbed(bb.controlnet), _perturbed(bb.controlnet, 0.02)
    targets, control, cond = _batch(bb)
    nb = noise_batch(bb, targets, control, cond, torch.Generator().manual_seed(0))
    ref = lambda: contextlib.nullcontext(reference)  # noqa: E731
    base, _ = dpo_objective(bb, policy, ref, nb, torch.ones(3), beta=50.0)
    losses = [dpo_objective(bb, policy, ref, nb, torch.eye(3)[i] * 3, beta=50.0)[0] for i in range(3)]
    # weight 3 on pair i only: (3·ℓ_i)/3 = ℓ_i, so the three add up to the unweighted Σ ℓ / 3 times 3
    assert sum(x.item() for x in losses) == pytest.approx(3 * base.item(), rel=1e-5)
    doubled, _ = dpo_objective(bb, policy, ref, nb, torch.tensor([2.0, 1.0, 1.0]), beta=50.0)
    assert doubled.item() == pytest.approx(base.item() + losses[0].item() / 3, rel=1e-5)


def test_sft_objective_is_the_mse_to_the_target(bb):
    targets, control, cond = _batch(bb, b=2)
    nb = noise_batch(bb, targets[:1], control, cond, torch.Generator().manual_seed(0))
    loss, stats = sft_objective(bb, bb.controlnet, nb)
    with torch.no_grad():
        pred = bb.predict(nb.noisy, nb.timesteps, nb.cond, nb.control, controlnet=bb.controlnet)
    assert loss.item() == pytest.approx(torch.mean((pred - nb.target) ** 2).item(), rel=1e-6)
    assert stats["loss"] == pytest.approx(loss.item())
