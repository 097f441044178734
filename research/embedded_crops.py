"""Side-by-side crops of embedded models against bicubic (and OSEDiff, and the HR) for docs/EMBEDDED.md.

    python research/embedded_crops.py --realsr DIR --models OLD NEW --names v1 v2 --out docs/embedded_crops.png

Rows: text and foliage/buildings from RealSR (real camera LR, 128 px; OSEDiff's published outputs beside), and a
face from the bundled astronaut photo (degraded like the training data, the ``mild`` preset of
``dp2osr.math.degradations``; no OSEDiff output exists for it, so that cell is grey). Each model upscales only
the LR region of its crop (32 px -> 128 px, one tile), seed 0, its default steps; crops are shown at 2x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from dp2osr.degrade import DegradationParams, degrade_image
from dp2osr.engine.options import SamplingOptions, load_model, sampling_settings
from dp2osr.engine.sampler import super_resolve
from dp2osr.images import load_image, save_image
from dp2osr.math.degradations import PRESETS
from dp2osr.math.geometry import resize

# (RealSR file, top, left) of a 128 px HR crop (LR: /4)
REALSR_CROPS = [
    ("Canon_004_LR4.png", 200, 200),
    ("Canon_005_LR4.png", 96, 256),
    ("Nikon_012_LR4.png", 192, 192),
]


def cases(realsr: Path) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(label, LR crop, HR crop, OSEDiff crop or None)."""
    out = []
    for name, y, x in REALSR_CROPS:
        lr, hr = load_image(realsr / "test_LR" / name), load_image(realsr / "test_HR" / name)
        ose = realsr / "results_osediff" / name
        crop = (..., slice(y, y + 128), slice(x, x + 128))
        out.append(
            (
                name,
                lr[..., y // 4 : y // 4 + 32, x // 4 : x // 4 + 32],
                hr[crop],
                load_image(ose)[crop] if ose.is_file() else None,
            )
        )
    face = load_image(SRC / "dp2osr" / "assets" / "photos" / "astronaut.png")[..., 20:148, 80:208]
    lr = degrade_image(face, 4, DegradationParams(**PRESETS["mild"]), torch.Generator().manual_seed(0))
    out.append(("astronaut (MILD)", lr, face, None))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realsr", type=Path, required=True)
    p.add_argument("--models", type=Path, nargs="+", required=True, help="embedded model folders")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = []
    data = cases(args.realsr)
    outputs: list[list[torch.Tensor]] = [[] for _ in data]
    for folder in args.models:
        opts = SamplingOptions(backbone="embedded", base=folder, device="cpu")
        bb, s = load_model(opts), None
        s = sampling_settings(bb, opts)
        for k, (_, lr, hr, _) in enumerate(data):
            up = resize(lr, tuple(hr.shape[-2:]))
            with torch.no_grad():
                sr = super_resolve(
                    bb,
                    up,
                    bb.encode_prompts([""]),
                    [0],
                    steps=s["steps"],
                    guidance=s["guidance"],
                    process_size=s["process_size"],
                )
            outputs[k].append(sr)
    for (label, lr, hr, ose), srs in zip(data, outputs):
        up = resize(lr, tuple(hr.shape[-2:]))
        grey = torch.full_like(hr, 0.5)
        rows.append(torch.cat([up, *srs, ose if ose is not None else grey, hr], dim=-1).clamp(0, 1))
        print(label, file=sys.stderr)
    grid = F.interpolate(torch.cat(rows, dim=-2), scale_factor=2, mode="nearest")
    save_image(grid, args.out)
    print(f"columns: bicubic | {' | '.join(str(m) for m in args.models)} | OSEDiff | HR -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
