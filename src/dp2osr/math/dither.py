"""Invisible dither of 8-bit images: the copies `dp2osr score --dither K` averages a metric over (a pure function
of the images, their content hashes and the copy's index).

Every 8-bit value moves by -1, 0 or +1 at random (a change nobody can see; the pattern is fixed by the file's
hash and k, so reruns give the same numbers). Some hand-crafted metrics rank a crop's candidates very
differently after such a change (PIQE at 64 px: within-crop Spearman 0.64 before vs after), so a preference pair
made from one raw score is partly the metric's reaction to the last bit; the mean over K copies is steadier
(PIQE, K = 16: 0.82; measured with research/measure_reward_halves.py)."""

from __future__ import annotations

import hashlib

import torch


def dithered(images: torch.Tensor, shas: list[str], k: int) -> torch.Tensor:
    """Copy ``k`` of a stack of 8-bit images in [0, 1]: every value moved by -1, 0 or +1 (of 255) at random, the
    pattern of each image fixed by its content hash and ``k``; clipped to [0, 1]."""
    out = torch.empty_like(images)
    for i, sha in enumerate(shas):
        gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{sha}:{k}".encode()).hexdigest()[:15], 16))
        step = torch.randint(-1, 2, images[i].shape, generator=gen).to(images.dtype) / 255.0
        out[i] = (images[i] + step.to(images.device)).clamp(0.0, 1.0)
    return out
