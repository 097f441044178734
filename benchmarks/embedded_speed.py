"""Time `dp2osr upscale`'s sampler on one 128 px photo with two embedded models, side by side.

    python benchmarks/embedded_speed.py --models OLD NEW [--rounds 3]

Each round times one upscale (default steps, seed 0, 512 px output, 25 latent tiles) per model, alternating
models so that load on a shared machine hits both alike; prints each model's median seconds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from dp2osr.engine.options import SamplingOptions, load_model, sampling_settings
from dp2osr.engine.sampler import super_resolve
from dp2osr.images import load_image
from dp2osr.math.geometry import resize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, nargs=2, required=True)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    lr = load_image(SRC / "dp2osr" / "assets" / "astronaut_lr.png")
    up = resize(lr, (lr.shape[-2] * 4, lr.shape[-1] * 4))
    runs = []
    for folder in args.models:
        opts = SamplingOptions(backbone="embedded", base=folder, device="cpu")
        bb = load_model(opts)
        runs.append((bb, sampling_settings(bb, opts), []))
    for _ in range(args.rounds):
        for bb, s, times in runs:
            t0 = time.perf_counter()
            with torch.no_grad():
                super_resolve(
                    bb,
                    up,
                    bb.encode_prompts([""]),
                    [0],
                    steps=s["steps"],
                    guidance=s["guidance"],
                    process_size=s["process_size"],
                    tile_batch=4,
                )
            times.append(time.perf_counter() - t0)
    medians = [statistics.median(t) for _, _, t in runs]
    for folder, m in zip(args.models, medians):
        print(f"{folder}: {m:.1f} s (median of {args.rounds})")
    print(f"ratio second/first: {medians[1] / medians[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
