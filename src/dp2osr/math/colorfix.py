"""Colour correction of SR outputs against the (upsampled) LR, as in the released scripts (arXiv 2510.18851).

Diffusion SR shifts colours; both fixes take the colour from the LR and keep the detail from the SR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")


def adain(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's mean and std of ``sr`` to ``ref`` (both ``(B, 3, H, W)``; sizes may differ).

    out = (sr − μ_sr) / σ_sr · σ_ref + μ_ref, statistics over H, W per image and channel (σ² the unbiased
    variance plus ``eps``, as the released scripts' colour fix computes it).
    """

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    mu_s, sd_s = stats(sr.float())
    mu_r, sd_r = stats(ref.float().expand(sr.shape[0], -1, -1, -1))
    return (sr.float() - mu_s) / sd_s * sd_r + mu_r


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """À-trous decomposition: (sum of high-frequency bands, lowest band); ``x == high + low`` exactly.

    Level i blurs with the 3×3 kernel [1,2,1]ᵀ[1,2,1]/16 at dilation 2^i, replicate padding.
    """
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 16).expand(x.shape[1], 1, 3, 3).contiguous()
    low, high = x, torch.zeros_like(x)
    for i in range(levels):
        d = 2**i
        blurred = F.conv2d(F.pad(low, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=x.shape[1])
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(sr: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep the SR's high-frequency bands and take the reference's lowest band (same sizes required)."""
    if sr.shape[-2:] != ref.shape[-2:]:
        raise ValueError(
            f"wavelet colour fix needs equal sizes, got {tuple(sr.shape[-2:])} and {tuple(ref.shape[-2:])}"
        )
    sr_high, _ = wavelet_decompose(sr.float(), levels)
    _, ref_low = wavelet_decompose(ref.float().expand(sr.shape[0], -1, -1, -1), levels)
    return sr_high + ref_low


def color_fix(sr: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` (adain | wavelet | none) and clamp to [0, 1]."""
    if method == "adain":
        out = adain(sr, ref)
    elif method == "wavelet":
        out = wavelet(sr, ref)
    elif method == "none":
        out = sr.float()
    else:
        raise ValueError(f"colour fix must be one of {list(COLOR_FIXES)}, got {method!r}")
    return out.clamp(0, 1)
