"""The embedded model (or any `dp2osr upscale` model) against bicubic and OSEDiff on RealSR ×4.

    python research/eval_realsr.py --realsr DIR [--limit N] [--every K] [--out results.json] [--crops DIR] [model options]

DIR is the RealSR test set as the Real-ISR literature uses it: ``test_LR/`` (128² LR), ``test_HR/`` (512² HR)
and ``results_osediff/`` (OSEDiff's published outputs, same names; optional). Default: the environment variable
``DP2OSR_REALSR``. The model runs with `dp2osr upscale`'s defaults (``super_resolve`` with the backbone's
steps, guidance and process size, AdaIN colour fix) and seed 0 unless options say otherwise. Per method and
image, written as 8-bit PNG values (what a user gets):

- PSNR-Y and SSIM-Y (Real-ISR convention, `dp2osr.math.quality`);
- NIQE (no reference; pyiqa with the pristine-model parameters shipped in the package; lower is better);
- chroma noise: the standard deviation of the high-pass (image minus its 3×3 box blur) of Cb and Cr (BT.601,
  0..255 scale), averaged over the two channels, and its ratio to the HR's;
- luma high-pass, the same on Y (detail and noise together), for reference.

Prints a Markdown table of the means and writes per-image values and means as JSON (``--out``). With
``--crops``, saves side-by-side crops (bicubic | model | OSEDiff | HR) of the first images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from dp2osr import metrics
from dp2osr.engine.options import SamplingOptions, load_model, sampling_settings
from dp2osr.engine.sampler import super_resolve
from dp2osr.images import load_image, save_image
from dp2osr.math.geometry import resize
from dp2osr.math.quality import psnr_y, ssim_y

_YCBCR = torch.tensor(
    [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=torch.float64
)


def ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """``(1, 3, H, W)`` RGB in [0, 1] -> Y, Cb, Cr (BT.601, 0..255 scale, offsets dropped)."""
    return torch.einsum("ij,bjhw->bihw", _YCBCR, rgb.double())


def highpass_std(channel: torch.Tensor) -> float:
    """Std of ``x − box3(x)`` over the interior (``(1, 1, H, W)``)."""
    blur = F.avg_pool2d(channel, 3, stride=1)
    return float((channel[..., 1:-1, 1:-1] - blur).std())


def q8(img: torch.Tensor) -> torch.Tensor:
    return (img.clamp(0, 1) * 255).round() / 255


def measure(img: torch.Tensor, hr: torch.Tensor, niqe) -> dict[str, float]:
    a, b = img[0].permute(1, 2, 0).double().numpy(), hr[0].permute(1, 2, 0).double().numpy()
    ycc = ycbcr(img)
    return {
        "psnr_y": psnr_y(a, b),
        "ssim_y": ssim_y(a, b),
        "niqe": float(metrics.score_batch(niqe, img.float(), None)[0]),
        "chroma_hp": (highpass_std(ycc[:, 1:2]) + highpass_std(ycc[:, 2:3])) / 2,
        "luma_hp": highpass_std(ycc[:, 0:1]),
    }


def summarise(rows: dict, names: list[str], seconds: float, s: dict, args, final: bool) -> None:
    """Means over the images done so far; the table when ``final``; the JSON (``--out``) every time, so an
    interrupted run keeps what it measured."""
    done = len(rows["model"])
    means = {
        k: {m: float(np.mean([r[m] for r in v])) for m in v[0] if m != "image"} for k, v in rows.items() if v
    }
    hr_chroma = means["hr"]["chroma_hp"]
    for v in means.values():
        v["chroma_vs_hr"] = v["chroma_hp"] / hr_chroma
    _write(args, rows, means, s, seconds, done)
    if not final:
        return
    print(f"| {done} RealSR images | PSNR-Y ↑ | SSIM-Y ↑ | NIQE ↓ | chroma HP (× HR) | luma HP |")
    print("|---|---|---|---|---|---|")
    for k, v in means.items():
        print(
            f"| {k} | {v['psnr_y']:.2f} | {v['ssim_y']:.4f} | {v['niqe']:.2f} | {v['chroma_hp']:.2f} "
            f"({v['chroma_vs_hr']:.2f}×) | {v['luma_hp']:.2f} |"
        )
    print(f"model: {seconds / done:.1f} s per image (sampling only)")


def _write(args, rows: dict, means: dict, s: dict, seconds: float, done: int) -> None:
    if not args.out:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        **s,
        "backbone": args.backbone,
        "base": str(args.base),
        "controlnet": str(args.controlnet),
        "color_fix": args.color_fix,
        "seed": args.seed,
    }
    args.out.write_text(
        json.dumps(
            {
                "settings": settings,
                "images": done,
                "means": means,
                "per_image": rows,
                "seconds_per_image": seconds / done,
            },
            indent=1,
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realsr", type=Path, default=os.environ.get("DP2OSR_REALSR"), help="RealSR folder")
    p.add_argument("--limit", type=int, default=None, help="first N images (sorted by name)")
    p.add_argument(
        "--every", type=int, default=1, help="every K-th image (sorted by name), to spread a subset"
    )
    p.add_argument("--out", type=Path, help="JSON output")
    p.add_argument("--crops", type=Path, help="folder for side-by-side crops of the first images")
    p.add_argument("--backbone", default="embedded")
    p.add_argument("--base", type=Path)
    p.add_argument("--controlnet", type=Path)
    p.add_argument("--steps", type=int)
    p.add_argument("--color-fix", default="adain")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.realsr is None or not (args.realsr / "test_LR").is_dir():
        p.error("give --realsr DIR (with test_LR/, test_HR/) or set DP2OSR_REALSR")
    names = sorted(x.name for x in (args.realsr / "test_LR").glob("*.png"))[:: args.every][: args.limit]
    opts = SamplingOptions(
        backbone=args.backbone,
        base=args.base,
        controlnet=args.controlnet,
        steps=args.steps,
        color_fix=args.color_fix,
        device="cpu",
    )
    bb = load_model(opts)
    s = sampling_settings(bb, opts)
    niqe = metrics.create("niqe", "cpu")
    rows: dict[str, list[dict]] = {"bicubic": [], "model": [], "hr": [], "osediff": []}
    seconds = 0.0
    for i, name in enumerate(names):
        lr, hr = load_image(args.realsr / "test_LR" / name), load_image(args.realsr / "test_HR" / name)
        up = resize(lr, tuple(hr.shape[-2:]))
        cond = bb.encode_prompts([""], s["negative_prompt"])
        t0 = time.perf_counter()
        with torch.no_grad():
            sr = super_resolve(
                bb,
                up,
                cond,
                [args.seed],
                steps=s["steps"],
                guidance=s["guidance"],
                process_size=s["process_size"],
                color_fix_method=args.color_fix,
                tile_batch=4,
            )
        seconds += time.perf_counter() - t0
        outs = {"bicubic": q8(up), "model": q8(sr), "hr": hr}
        ose = args.realsr / "results_osediff" / name
        if ose.is_file():
            outs["osediff"] = load_image(ose)
        for key, img in outs.items():
            rows[key].append({"image": name, **measure(img, hr, niqe)})
        if args.crops and i < 3:
            y, x = hr.shape[-2] // 2 - 64, hr.shape[-1] // 2 - 64
            tiles = [
                outs[k][..., y : y + 128, x : x + 128]
                for k in ("bicubic", "model", "osediff", "hr")
                if k in outs
            ]
            save_image(torch.cat(tiles, dim=-1), args.crops / f"{Path(name).stem}.png")
        print(
            f"{i + 1}/{len(names)} {name}: model PSNR-Y {rows['model'][-1]['psnr_y']:.2f} "
            f"(bicubic {rows['bicubic'][-1]['psnr_y']:.2f}), NIQE {rows['model'][-1]['niqe']:.2f} "
            f"(bicubic {rows['bicubic'][-1]['niqe']:.2f})",
            file=sys.stderr,
            flush=True,
        )
        summarise(rows, names, seconds, s, args, final=False)
    summarise(rows, names, seconds, s, args, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
