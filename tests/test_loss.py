"""Tests for dp2osr.math.loss: the Diffusion-DPO objective (arXiv 2510.18851) and the per-sample error."""

import math

import pytest
import torch

from dp2osr.math.loss import DPOOutput, dpo_loss, mse_per_sample

BETA = 5000.0


def _errs(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Four (B,) error vectors of realistic size (~0.1) in float64."""
    g = torch.Generator().manual_seed(seed)
    return tuple(0.1 + 0.01 * torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4))


def test_ln2_when_policy_equals_reference():
    """At initialisation policy = reference, so both brackets of Δ vanish: Δ = 0, logit = −β/2·0 = 0,
    ℓ = −log σ(0) = −log ½ = ln 2 for every pair, whatever the errors are. Accuracy counts Δ < 0
    strictly, so it is 0; the reward margin (mean logit) is 0."""
    _, _, ref_w, ref_l = _errs()
    out = dpo_loss(ref_w.clone(), ref_l.clone(), ref_w, ref_l, beta=BETA)
    assert isinstance(out, DPOOutput)
    assert torch.allclose(out.losses, torch.full_like(out.losses, math.log(2)), atol=0, rtol=1e-12)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert torch.equal(out.logits, torch.zeros_like(out.logits))
    assert out.accuracy.item() == 0.0
    assert out.reward_margin.item() == 0.0


def test_hand_computed_example():
    """One pair, β = 5000: e_θ(w) = 0.1001, e_ref(w) = 0.1000, e_θ(l) = e_ref(l) = 0.2000.

        Δ = (0.1001 − 0.1000) − 0 = 1e-4            (policy fits the winner *worse*: a wrong preference)
        logit = −β/2 · Δ = −2500 · 1e-4 = −0.25
        ℓ = −log σ(−0.25) = log(1 + e^{0.25}) = log(1 + 1.2840254166877414) = 0.8259394198788436
    accuracy = 0 (Δ is not < 0), reward margin = −0.25, and the diagnostics are the four inputs.
    """
    pw, rw, pl, rl = (torch.tensor([v], dtype=torch.float64) for v in (0.1001, 0.1000, 0.2000, 0.2000))
    out = dpo_loss(pw, pl, rw, rl, beta=BETA)
    assert out.logits.item() == pytest.approx(-0.25, rel=1e-9)
    assert out.loss.item() == pytest.approx(0.8259394198788436, rel=1e-9)
    assert out.losses.item() == pytest.approx(0.8259394198788436, rel=1e-9)
    assert out.accuracy.item() == 0.0
    assert out.reward_margin.item() == pytest.approx(-0.25, rel=1e-9)
    assert (out.policy_err_w.item(), out.policy_err_l.item()) == (0.1001, 0.2000)
    assert (out.ref_err_w.item(), out.ref_err_l.item()) == (0.1000, 0.2000)


def test_swap_winner_and_loser_negates_logit():
    """Swapping (w, l) turns Δ into −Δ, so the logit z = −β/2·Δ becomes −z. With ℓ(z) = −log σ(z) =
    softplus(−z): ℓ(z) − ℓ(−z) = softplus(−z) − softplus(z) = −z, i.e. ℓ − ℓ_swapped = β/2·Δ per pair;
    and σ(z) + σ(−z) = 1 gives exp(−ℓ) + exp(−ℓ_swapped) = 1. Accuracies of the two orderings add to 1
    when no Δ is exactly 0."""
    pw, pl, rw, rl = _errs(b=6, seed=1)
    out = dpo_loss(pw, pl, rw, rl, beta=BETA)
    swapped = dpo_loss(pl, pw, rl, rw, beta=BETA)
    assert torch.allclose(swapped.logits, -out.logits, rtol=1e-12, atol=0)
    assert torch.allclose(out.losses - swapped.losses, -out.logits, rtol=1e-9, atol=1e-12)
    assert torch.allclose(
        torch.exp(-out.losses) + torch.exp(-swapped.losses), torch.ones(6, dtype=torch.float64)
    )
    assert out.accuracy.item() + swapped.accuracy.item() == pytest.approx(1.0)


def test_zero_weight_gives_zero_loss_and_gradient():
    """w = 0 for every pair: L = mean(0 · ℓ) = 0 and dL/de = 0 · dℓ/de = 0. With w = (0, 1) only the second
    pair's errors receive gradient."""
    pw, pl, rw, rl = (e.clone().requires_grad_(i < 2) for i, e in enumerate(_errs(b=2)))
    out = dpo_loss(pw, pl, rw, rl, beta=BETA, weights=torch.zeros(2, dtype=torch.float64))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(pw.grad, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(pl.grad, torch.zeros(2, dtype=torch.float64))

    pw.grad = pl.grad = None
    dpo_loss(pw, pl, rw, rl, beta=BETA, weights=torch.tensor([0.0, 1.0], dtype=torch.float64)).loss.backward()
    assert pw.grad[0].item() == 0.0 and pl.grad[0].item() == 0.0
    assert pw.grad[1].item() > 0.0 and pl.grad[1].item() < 0.0


def test_weights_multiply_per_pair():
    """Two pairs, Δ₁ = 0 (ℓ₁ = ln 2) and Δ₂ = 1e-4 (ℓ₂ = 0.8259394198788436, as in the hand example),
    weights (2, 0.5): L = (2·ln 2 + 0.5·0.8259394…)/2 = (1.3862943611198906 + 0.4129697099394218)/2
    = 0.8996320355296562. The mean divides by B = 2, not by Σw; ``losses`` stay unweighted."""
    pw = torch.tensor([0.3, 0.1001], dtype=torch.float64)
    rw = torch.tensor([0.3, 0.1000], dtype=torch.float64)
    pl = rl = torch.tensor([0.4, 0.2000], dtype=torch.float64)
    out = dpo_loss(pw, pl, rw, rl, beta=BETA, weights=torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(0.8996320355296562, rel=1e-9)
    assert out.losses.tolist() == pytest.approx([math.log(2), 0.8259394198788436], rel=1e-9)
    unweighted = dpo_loss(pw, pl, rw, rl, beta=BETA)
    assert unweighted.loss.item() == pytest.approx((math.log(2) + 0.8259394198788436) / 2, rel=1e-9)


def test_gradient_matches_hand_derivative():
    """ℓ = softplus(β/2·Δ), so dℓ/dΔ = β/2 · σ(β/2·Δ); Δ is +e_θ(w) and −e_θ(l), and L = mean(w·ℓ), so
    dL/de_θ(w) = w·β/2·σ(β/2·Δ)/B and dL/de_θ(l) = −dL/de_θ(w). For the hand example (Δ = 1e-4, B = 1,
    w = 1): dL/de_θ(w) = 2500 · σ(0.25) = 2500 · 0.5621765008857981 = 1405.4412522144953."""
    pw = torch.tensor([0.1001], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([0.2000], dtype=torch.float64, requires_grad=True)
    rw, rl = torch.tensor([0.1000], dtype=torch.float64), torch.tensor([0.2000], dtype=torch.float64)
    dpo_loss(pw, pl, rw, rl, beta=BETA).loss.backward()
    assert pw.grad.item() == pytest.approx(1405.4412522144953, rel=1e-9)
    assert pl.grad.item() == pytest.approx(-1405.4412522144953, rel=1e-9)


def test_winner_sft_term_hand_values():
    """winner_sft = λ adds λ·(e_θ(w) − e_ref(w)) to each pair's ℓ before the weights. Hand example (β = 5000,
    e_θ(w) = 0.1001, e_ref(w) = 0.1000, loser errors equal), λ = 100, w = 0.5, B = 1:
        L = 0.5 · (0.8259394198788436 + 100 · 1e-4) = 0.5 · 0.8359394198788436 = 0.4179697099394218
        dL/de_θ(w) = 0.5 · (1405.4412522144953 + 100) = 752.7206261072477;  dL/de_θ(l) = −0.5 · 1405.44… (unchanged)
    At initialisation (policy = reference) the term is 0, so L = ln 2 still; λ = 0 is plain Diffusion-DPO.
    ``losses``, logits and accuracy stay those of the DPO part."""
    pw = torch.tensor([0.1001], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([0.2000], dtype=torch.float64, requires_grad=True)
    rw, rl = torch.tensor([0.1000], dtype=torch.float64), torch.tensor([0.2000], dtype=torch.float64)
    half = torch.tensor([0.5], dtype=torch.float64)
    out = dpo_loss(pw, pl, rw, rl, beta=BETA, weights=half, winner_sft=100.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.4179697099394218, rel=1e-9)
    assert out.losses.item() == pytest.approx(0.8259394198788436, rel=1e-9)
    assert pw.grad.item() == pytest.approx(752.7206261072477, rel=1e-9)
    assert pl.grad.item() == pytest.approx(-702.7206261072477, rel=1e-9)

    _, _, ref_w, ref_l = _errs()
    init = dpo_loss(ref_w.clone(), ref_l.clone(), ref_w, ref_l, beta=BETA, winner_sft=100.0)
    assert init.loss.item() == pytest.approx(math.log(2), rel=1e-12)
    pw2, pl2, rw2, rl2 = _errs(b=5, seed=3)
    assert torch.equal(
        dpo_loss(pw2, pl2, rw2, rl2, beta=BETA, winner_sft=0.0).loss,
        dpo_loss(pw2, pl2, rw2, rl2, beta=BETA).loss,
    )
    with pytest.raises(ValueError, match="winner_sft"):
        dpo_loss(pw2, pl2, rw2, rl2, beta=BETA, winner_sft=-1.0)


def test_gradient_descent_prefers_winner():
    """Treating the policy errors as free parameters, a few SGD steps on L must lower e_θ(w) − e_θ(l)
    (winner fitted better, loser worse, relative to the reference): Δ falls and accuracy reaches 1."""
    pw0, pl0, rw, rl = _errs(b=4, seed=2)
    pw, pl = pw0.clone().requires_grad_(True), pl0.clone().requires_grad_(True)
    opt = torch.optim.SGD([pw, pl], lr=1e-6)
    first = None
    for _ in range(20):
        opt.zero_grad()
        out = dpo_loss(pw, pl, rw, rl, beta=BETA)
        first = out.loss.item() if first is None else first
        out.loss.backward()
        opt.step()
    final = dpo_loss(pw, pl, rw, rl, beta=BETA)
    assert final.loss.item() < first
    assert torch.all((pw - pl).detach() < (pw0 - pl0))
    assert torch.all(pw.detach() < pw0) and torch.all(pl.detach() > pl0)
    assert final.accuracy.item() == 1.0


def test_stable_for_large_logits():
    """|β/2·Δ| = 2500·1 = 2500 overflows exp in float32; logsigmoid stays finite: ℓ ≈ 2500 for a wrong
    preference (Δ = +1) and ℓ ≈ 0 for a right one (Δ = −1)."""
    zero = torch.zeros(2)
    pw = torch.tensor([1.0, 0.0])
    pl = torch.tensor([0.0, 1.0])
    out = dpo_loss(pw, pl, zero, zero, beta=BETA)
    assert torch.all(torch.isfinite(out.losses))
    assert out.losses[0].item() == pytest.approx(2500.0)
    assert out.losses[1].item() == pytest.approx(0.0, abs=1e-6)
    assert out.accuracy.item() == 0.5


def test_dpo_loss_rejects_bad_input():
    e = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(e, e, e, e, beta=0.0)
    with pytest.raises(ValueError, match="ref_err_l"):
        dpo_loss(e, e, e, torch.zeros(2), beta=BETA)
    with pytest.raises(ValueError, match="weights"):
        dpo_loss(e, e, e, e, beta=BETA, weights=torch.ones(2))


def test_mse_per_sample_hand_values():
    """SD2 latents (B, C, H, W) = (2, 1, 1, 2): pred − target = [[0, 0]] and [[1, 3]] ->
    per-sample MSE = [(0 + 0)/2, (1 + 9)/2] = [0, 5]. FLUX tokens (B, N, D) = (2, 3, 4) with pred = 2,
    target = 0 -> 4 for both samples."""
    target = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 3.0]]]])
    assert mse_per_sample(pred, target).tolist() == [0.0, 5.0]
    tokens = torch.full((2, 3, 4), 2.0)
    assert mse_per_sample(tokens, torch.zeros(2, 3, 4)).tolist() == [4.0, 4.0]


def test_mse_per_sample_upcasts_and_checks_shapes():
    """bf16 inputs are reduced in float32 (error differences of 1e-4 matter after ×2500); float64 stays."""
    x = torch.ones(2, 4, 8, 8, dtype=torch.bfloat16)
    assert mse_per_sample(x, torch.zeros_like(x)).dtype == torch.float32
    assert mse_per_sample(x.double(), torch.zeros(2, 4, 8, 8, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="same shape"):
        mse_per_sample(torch.zeros(2, 3), torch.zeros(2, 4))
