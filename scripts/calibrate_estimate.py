"""Calibrate the cost model behind `upscale` / `sample` --max-pixels estimates on this CPU.

For one backbone (a fresh process each, so the peak resident memory is its own), samples one image of
PROCESS_SIZE x TILES_X with BATCH seeds and reports, per latent pixel of one sample:
  act_bytes_per_latent_px  peak resident memory growth during sampling / (samples x tile latent pixels)
  cpu_s_per_latent_px      wall time / (steps x tiles x samples x tile latent pixels)
These are the constants of `dp2osr.backbones.loading.SizeTraits`.

    python scripts/calibrate_estimate.py embedded
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from dp2osr.backbones import load_backbone
from dp2osr.engine.sampler import super_resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("backbone")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.backbone)
    ps, f = bb.default_process_size, bb.latent_factor
    cond = bb.encode_prompts([""], None if not bb.uses_negative_prompt else "")
    small = torch.rand(1, 3, ps, ps)
    super_resolve(bb, small, cond, [0], steps=1, guidance=bb.default_guidance, process_size=ps)  # warm-up
    image = torch.rand(1, 3, ps, 2 * ps)  # tiled: two-three tiles side by side
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    super_resolve(
        bb,
        image,
        cond,
        list(range(args.batch)),
        steps=args.steps,
        guidance=bb.default_guidance,
        process_size=ps,
        tile_threshold=ps,  # tiled: the per-tile activations are what is calibrated
        tile_batch=1,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    tile_px = (ps // f) ** 2
    tiles = 3  # tile_starts over 2x the tile side with a quarter overlap
    print(f"{args.backbone}: latent factor {f}, channels {bb.latent_channels}, process size {ps}")
    print(f"  act_bytes_per_latent_px = {max(peak, 0) / (args.batch * tile_px):.0f}")
    print(f"  cpu_s_per_latent_px     = {seconds / (args.steps * tiles * args.batch * tile_px):.3g}")


if __name__ == "__main__":
    main()
