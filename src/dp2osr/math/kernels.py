"""Blur kernels of the Real-ESRGAN degradation (Wang et al., ICCV-W 2021, §3.1): pure functions of their
parameters, used by `dp2osr.degrade` (which draws the parameters)."""

from __future__ import annotations

import math

import torch


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets from the centre of a ``size`` x ``size`` kernel, as (x, y) float64 grids."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    return x, y


def bivariate_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, shape: str = "gaussian", beta: float = 1.0
) -> torch.Tensor:
    """A normalised ``(size, size)`` float32 blur kernel (Real-ESRGAN §3.1).

    With covariance ``Σ = R(θ) diag(σx², σy²) R(θ)ᵀ`` and ``q = xᵀ Σ⁻¹ x``: ``gaussian`` is exp(-q/2),
    ``generalized`` is exp(-q^β / 2) and ``plateau`` is 1 / (1 + q^β).
    """
    x, y = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # coordinates in the kernel's principal axes
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    if shape == "gaussian":
        k = torch.exp(-0.5 * q)
    elif shape == "generalized":
        k = torch.exp(-0.5 * q**beta)
    elif shape == "plateau":
        k = 1.0 / (1.0 + q**beta)
    else:
        raise ValueError(f"kernel shape must be one of ['gaussian', 'generalized', 'plateau'], got {shape!r}")
    return (k / k.sum()).float()


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """A normalised 2-D circular low-pass (sinc) kernel with cut-off ``omega_c`` (Real-ESRGAN §3.1, eq. 3).

    ``k(r) = ωc J1(ωc r) / (2π r)``, with its limit ``ωc² / (4π)`` at the centre; it models ringing and
    overshoot artefacts.
    """
    x, y = _grid(size)
    r = torch.sqrt(x**2 + y**2)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    k = omega_c * torch.special.bessel_j1(omega_c * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r == 0, torch.full_like(r, omega_c**2 / (4 * math.pi)), k)
    return (k / k.sum()).float()
