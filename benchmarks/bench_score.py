"""Scores/s of batched versus per-image metric calls, per metric, measured side by side in one run.

The score stage stacks the M candidates of one image into one metric call (``--batch-size``). This script
measures what that buys for each metric: the same candidates (SR outputs against their HR; RealSR test images
when present, else synthetic noisy copies) scored once per image and once in stacks, alternating the two
modes over several rounds so machine noise hits both alike, and checks the values agree.

    .venv/bin/python benchmarks/bench_score.py                     # offline preset, 512 px, CPU or GPU
    .venv/bin/python benchmarks/bench_score.py --metrics psnr gmsd --size 256 --n 16 --batch 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dp2osr import metrics
from dp2osr.images import load_image
from dp2osr.runtime import resolve_device

REALSR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realsr"


def make_inputs(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` candidates ``(n, 3, size, size)`` of one image and its HR ``(1, 3, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    hr_files = sorted((REALSR / "test_HR").glob("*.png")) if (REALSR / "test_HR").is_dir() else []
    if hr_files:
        hr = load_image(hr_files[0])[..., :size, :size]
        sr_file = REALSR / "results_osediff" / hr_files[0].name
        base = load_image(sr_file)[..., :size, :size] if sr_file.is_file() else hr
        source = f"RealSR {hr_files[0].name}"
    else:
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        hr = torch.stack([xx, yy, (xx + yy) / 2])[None]
        base, source = hr, "synthetic"
    if hr.shape[-1] < size or hr.shape[-2] < size or base.shape != hr.shape:
        raise SystemExit(f"images smaller than --size {size}")
    sigma = torch.linspace(0.01, 0.1, n).view(n, 1, 1, 1)
    cands = (base + sigma * torch.randn((n, *base.shape[1:]), generator=g)).clamp(0, 1)
    return cands, hr, source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(
    name: str, cands: torch.Tensor, hr: torch.Tensor, batch: int, rounds: int, device: torch.device
) -> dict:
    spec = metrics.get_spec(name)
    model = metrics.create(name, device)
    ref = hr if spec.family == "fr" else None
    cap = min(batch, spec.max_batch or batch)
    n = cands.shape[0]

    def per_image() -> torch.Tensor:
        return torch.cat(
            [torch.from_numpy(metrics.score_batch(model, cands[i : i + 1], ref)) for i in range(n)]
        )

    def batched() -> torch.Tensor:
        return torch.cat(
            [torch.from_numpy(metrics.score_batch(model, cands[i : i + cap], ref)) for i in range(0, n, cap)]
        )

    a, b = per_image(), batched()  # warm-up (and correctness)
    max_diff = float((a - b).abs().max())
    times: dict[str, list[float]] = {"per_image": [], "batched": []}
    for _ in range(rounds):
        for mode, fn in (("per_image", per_image), ("batched", batched)):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[mode].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "metric": name,
        "batch": cap,
        "per_image": n / med["per_image"],
        "batched": n / med["batched"],
        "ratio": med["per_image"] / med["batched"],
        "max_diff": max_diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--metrics", nargs="+", default=list(metrics.PRESETS["offline"]))
    parser.add_argument("--size", type=int, default=512, help="candidate side in px")
    parser.add_argument("--n", type=int, default=16, help="candidates of the image")
    parser.add_argument("--batch", type=int, default=8, help="candidates per batched call")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (median reported)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cands, hr, source = make_inputs(args.n, args.size)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"device {device}{gpu}, {torch.get_num_threads()} CPU threads, {args.n} candidates of "
        f"{args.size}x{args.size} ({source}), batch {args.batch}, median of {args.rounds} rounds"
    )
    print(
        f"{'metric':10} {'batch':>5} {'per-image/s':>12} {'batched/s':>10} {'speed-up':>9} {'max |diff|':>11}"
    )
    for name in args.metrics:
        r = bench(name, cands, hr, args.batch, args.rounds, device)
        print(
            f"{r['metric']:10} {r['batch']:5d} {r['per_image']:12.2f} {r['batched']:10.2f} "
            f"{r['ratio']:8.2f}x {r['max_diff']:11.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
