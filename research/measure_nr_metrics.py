"""Do the offline no-reference metrics (NIQE, BRISQUE, PIQE) rank real SR outputs sensibly?

On RealSR (``test_LR`` 128 px, ``test_HR`` 512 px, ``results_osediff`` 512 px, same file names) scores, for the
first ``--n`` images: the HR image, OSEDiff's output, a bicubic ×4 upscale of the LR, and that upscale with
Gaussian noise added to the luma (σ = 3 of 255) or to both chroma channels (σ = 8), in BT.601 YCbCr. Each
condition is scored at the full 512 px and on centre crops (``--crops``), the same window in every condition.

It reports, per metric and crop size, the mean score per condition, whether the means rank
HR > OSEDiff > bicubic (better to worse) and whether each noise is penalised (noisy worse than bicubic), plus the
fraction of images for which each of those holds. Raw per-image values go to ``--json``.

    python research/measure_nr_metrics.py [--realsr DIR] [--n 25] [--json docs/results/nr_metrics.json]

``--realsr`` defaults to ``$DP2OSR_REALSR``, else ``shared/data/realsr`` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dp2osr import metrics

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = ("hr", "osediff", "bicubic", "bicubic+luma_noise3", "bicubic+chroma_noise8")
METRICS = ("niqe", "brisque", "piqe")

# BT.601 full-range RGB <-> YCbCr (JPEG convention), values in 0..255
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_FROM_YCC = np.linalg.inv(_TO_YCC)


def default_realsr() -> Path:
    env = os.environ.get("DP2OSR_REALSR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "realsr"


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def add_ycc_noise(
    rgb: np.ndarray, sigma: float, channels: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """``rgb`` (0..255) with N(0, sigma²) noise on the given YCbCr channels, back to 8-bit RGB."""
    ycc = rgb @ _TO_YCC.T
    for c in channels:
        ycc[..., c] += rng.normal(0.0, sigma, ycc.shape[:2])
    return np.clip(np.round(ycc @ _FROM_YCC.T), 0, 255)


def conditions(realsr: Path, name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    hr = read_rgb(realsr / "test_HR" / name)
    lr = Image.open(realsr / "test_LR" / name).convert("RGB")
    bicubic = np.asarray(lr.resize((lr.width * 4, lr.height * 4), Image.BICUBIC), dtype=np.float64)
    out = {
        "hr": hr,
        "osediff": read_rgb(realsr / "results_osediff" / name),
        "bicubic": bicubic,
        "bicubic+luma_noise3": add_ycc_noise(bicubic, 3.0, (0,), rng),
        "bicubic+chroma_noise8": add_ycc_noise(bicubic, 8.0, (1, 2), rng),
    }
    shapes = {k: v.shape for k, v in out.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: conditions differ in size: {shapes}")
    return out


def centre_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return img
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images) / 255.0).permute(0, 3, 1, 2).float()


def summarise(values: dict[str, list[float]], lower_better: bool) -> dict:
    """Means, ranking checks on the means and per-image fractions for one metric at one crop size."""
    arr = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    sign = 1.0 if lower_better else -1.0  # sign * value: lower is better

    def better(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return sign * a < sign * b

    means = {c: float(v.mean()) for c, v in arr.items()}
    m = {c: np.array([v]) for c, v in means.items()}
    return {
        "mean": means,
        "std": {c: float(v.std()) for c, v in arr.items()},
        "ranks_hr_osediff_bicubic": bool(
            better(m["hr"], m["osediff"])[0] and better(m["osediff"], m["bicubic"])[0]
        ),
        "penalises_luma_noise": bool(better(m["bicubic"], m["bicubic+luma_noise3"])[0]),
        "penalises_chroma_noise": bool(better(m["bicubic"], m["bicubic+chroma_noise8"])[0]),
        "frac_images": {
            "hr_better_than_osediff": float(better(arr["hr"], arr["osediff"]).mean()),
            "osediff_better_than_bicubic": float(better(arr["osediff"], arr["bicubic"]).mean()),
            "luma_noise_worse": float(better(arr["bicubic"], arr["bicubic+luma_noise3"]).mean()),
            "chroma_noise_worse": float(better(arr["bicubic"], arr["bicubic+chroma_noise8"]).mean()),
        },
    }


def markdown(results: dict) -> str:
    yes = {True: "yes", False: "no"}
    lines = [
        "| crop | metric | HR | OSEDiff | bicubic | +luma σ3 | +chroma σ8 | HR>OSEDiff>bicubic | penalises luma / chroma noise |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for crop, per_metric in results.items():
        for name, r in per_metric.items():
            if "error" in r:
                lines.append(f"| {crop} | {name} | {r['error']} | | | | | | |")
                continue
            mean, frac = r["mean"], r["frac_images"]
            cells = " | ".join(f"{mean[c]:.2f}" for c in CONDITIONS)
            rank = (
                f"{yes[r['ranks_hr_osediff_bicubic']]} ({frac['hr_better_than_osediff']:.0%} / "
                f"{frac['osediff_better_than_bicubic']:.0%} of images)"
            )
            noise = (
                f"{yes[r['penalises_luma_noise']]} ({frac['luma_noise_worse']:.0%}) / "
                f"{yes[r['penalises_chroma_noise']]} ({frac['chroma_noise_worse']:.0%})"
            )
            lines.append(f"| {crop} | {name} | {cells} | {rank} | {noise} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--realsr", type=Path, default=default_realsr())
    parser.add_argument("--n", type=int, default=25, help="how many images (first N by name)")
    parser.add_argument(
        "--crops", type=int, nargs="*", default=[128, 64], help="centre-crop sizes besides full"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=None, help="write raw per-image values and summaries here"
    )
    args = parser.parse_args()

    folders = [args.realsr / d for d in ("test_LR", "test_HR", "results_osediff")]
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"RealSR folder not found: {folder} (give --realsr or set DP2OSR_REALSR)")
    names = sorted(p.name for p in folders[0].glob("*.png"))[: args.n]
    rng = np.random.default_rng(args.seed)
    images = [conditions(args.realsr, n, rng) for n in names]
    models = {m: metrics.create(m, "cpu") for m in METRICS}

    raw: dict = {}
    results: dict = {}
    for crop in [None, *args.crops]:
        key = "full (512)" if crop is None else f"{crop} px"
        raw[key], results[key] = {}, {}
        for name, model in models.items():
            spec = metrics.get_spec(name)
            if crop is not None and crop < spec.min_size:
                results[key][name] = {"error": f"needs >= {spec.min_size} px"}
                continue
            per_cond = {}
            for cond in CONDITIONS:
                batch = to_tensor([centre_crop(im[cond], crop) for im in images])
                per_cond[cond] = [float(v) for v in metrics.score_batch(model, batch)]
            raw[key][name] = per_cond
            results[key][name] = summarise(per_cond, spec.lower_better)
            print(
                f"{key} {name}: " + ", ".join(f"{c} {results[key][name]['mean'][c]:.2f}" for c in CONDITIONS),
                flush=True,
            )

    table = markdown(results)
    print()
    print(f"{len(names)} RealSR images ({names[0]} .. {names[-1]}); lower is better for all three metrics")
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "images": names,
            "conditions": list(CONDITIONS),
            "noise": "N(0, sigma^2) on BT.601 full-range YCbCr channels of the bicubic upscale, rounded to 8 bit",
            "seed": args.seed,
            "summary": results,
            "per_image": raw,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
