"""Image geometry shared by the sampler and the data code: latent tile offsets, blending ramps, bicubic resize."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tile_starts(size: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with at most ``stride`` between starts."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, max(align, stride // align * align)))
    starts.append(size - tile)
    return sorted(set(starts))


def ramp(length: int, overlap: int, device, dtype) -> torch.Tensor:
    """1-D blending weight: linear ramps of ``overlap`` at both ends, 1 in the middle, never 0."""
    i = torch.arange(length, device=device, dtype=dtype)
    if overlap <= 0:
        return torch.ones(length, device=device, dtype=dtype)
    return torch.minimum((i + 0.5) / overlap, (length - i - 0.5) / overlap).clamp(max=1.0)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (antialiased when shrinking) of ``(B, 3, H, W)`` in [0, 1], clamped."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(0, 1)
