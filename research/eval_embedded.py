"""Evaluate an embedded SR model against bicubic on the held-out photos of ``scripts/train_embedded.py``.

    python research/eval_embedded.py --photos PHOTOS --model MODEL --out eval.json [--seeds 0 1 2 3]

Test set: one 256² HR crop per held-out photo (``train_embedded.HOLDOUT``, never trained on), degraded to a
64² LR with the training degradation (``MILD``); bicubic = the LR upsampled ×4, the model = `dp2osr upscale`'s
sampler (``super_resolve``) with one output per seed. Metrics:

- PSNR-Y / SSIM-Y (``dp2osr.evaluate``, Real-ISR convention);
- the offline hybrid reward (``dp2osr.metrics`` preset ``offline`` plus ms_ssim: FR ms_ssim, fsim, gmsd + NR piqe), with the
  min-max bounds fitted once over bicubic and every model output together (``reward.fit_bounds``) so the rows
  share one scale; PIQE rewards noise-like texture, so also ``entropy`` (NR, not in the reward) and
  ``grad_ratio`` = mean |∇Y| of the output / of the HR (1 = as sharp as the HR; bicubic is well below);
- seed-to-seed variation of the model: per-pixel std over seeds (8-bit levels) and the std of PSNR-Y.

Without pyiqa (e.g. on the GPU machine) only PSNR/SSIM, grad_ratio and the seed variation are computed.
Prints a Markdown table and writes JSON (``--out``) plus, with ``--images``, side-by-side PNGs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "scripts")
)  # train_embedded: photos, degradation
import train_embedded as T

from dp2osr.backbones import load_backbone
from dp2osr.engine.sampler import super_resolve
from dp2osr.images import save_image
from dp2osr.math.geometry import resize
from dp2osr.math.quality import psnr_y, ssim_y, y_channel

REWARD_METRICS = (
    "ms_ssim",
    "fsim",
    "gmsd",
    "piqe",
)  # the offline preset plus ms_ssim (these crops are 256 px)
EXTRA_METRICS = ("entropy",)  # NR, not in the reward


def grad_energy(rgb: np.ndarray) -> float:
    """Mean gradient magnitude of the Y channel (HxWx3 in [0, 1])."""
    y = y_channel(rgb) / 255.0
    gy, gx = np.diff(y, axis=0)[:, :-1], np.diff(y, axis=1)[:-1, :]
    return float(np.mean(np.sqrt(gx * gx + gy * gy)))


def _np(img: torch.Tensor) -> np.ndarray:
    return img.squeeze(0).permute(1, 2, 0).double().clamp(0, 1).numpy()


def _q8(img: torch.Tensor) -> torch.Tensor:
    """As saved to PNG: 8-bit levels (every metric sees what a user would get)."""
    return (img.clamp(0, 1) * 255).round() / 255


def run_model(args, pairs) -> dict[str, dict[str, torch.Tensor]]:
    """``{method: {image_id: (S, 3, H, W)}}`` for bicubic and the model with each colour fix."""
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    bb = load_backbone("embedded", base=args.model).to(device, torch.float32)
    steps = args.steps or bb.default_steps
    size = args.process_size or bb.default_process_size
    cond = bb.encode_prompts([""])
    out: dict[str, dict[str, torch.Tensor]] = {"bicubic": {}}
    out.update({f"model ({fix})": {} for fix in args.color_fix})
    t0 = time.time()
    for image_id, hr, lr in pairs:
        up = resize(lr, tuple(hr.shape[-2:]))
        out["bicubic"][image_id] = _q8(up)
        sr = super_resolve(
            bb, up, cond, args.seeds, steps=steps, guidance=None, process_size=size, color_fix_method="none"
        )
        for fix in args.color_fix:
            from dp2osr.math.colorfix import color_fix

            out[f"model ({fix})"][image_id] = _q8(color_fix(sr, up, fix) if fix != "none" else sr)
    sec = (time.time() - t0) / max(1, len(pairs))
    print(
        f"sampled {len(pairs)} images x {len(args.seeds)} seeds, {steps} steps, process size {size}: "
        f"{sec:.1f} s per image on {device}",
        file=sys.stderr,
    )
    return out, {
        "steps": steps,
        "process_size": size,
        "seconds_per_image": round(sec, 2),
        "device": str(device),
    }


def score(outputs, pairs, use_pyiqa: bool, device: str) -> pd.DataFrame:
    """Long table: method, image_id, seed, metric, value."""
    hr_of = {i: hr for i, hr, _ in pairs}
    models = {}
    if use_pyiqa:
        from dp2osr import metrics

        dev = (
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        models = {m: metrics.create(m, dev) for m in (*REWARD_METRICS, *EXTRA_METRICS)}
    rows = []
    for method, images in outputs.items():
        for image_id, batch in images.items():
            hr = hr_of[image_id]
            g_hr = grad_energy(_np(hr))
            pyiqa_scores = {}
            if models:
                from dp2osr.metrics import get_spec, score_batch

                for m, model in models.items():
                    ref = hr if get_spec(m).family == "fr" else None
                    pyiqa_scores[m] = score_batch(model, batch, ref)
            for k in range(batch.shape[0]):
                seed = k if method != "bicubic" else -1
                sr = _np(batch[k : k + 1])
                vals = {
                    "psnr_y": psnr_y(sr, _np(hr)),
                    "ssim_y": ssim_y(sr, _np(hr)),
                    "grad_ratio": grad_energy(sr) / g_hr,
                }
                vals.update({m: float(v[k]) for m, v in pyiqa_scores.items()})
                rows += [(method, image_id, seed, m, v) for m, v in vals.items()]
    return pd.DataFrame(rows, columns=["method", "image_id", "seed", "metric", "value"])


def add_reward(table: pd.DataFrame) -> pd.DataFrame:
    """Append the hybrid reward, normalised with bounds fitted on all methods together."""
    from dp2osr.math.reward import fit_bounds, hybrid_reward
    from dp2osr.metrics import catalogue

    part = table[table.metric.isin(REWARD_METRICS)].copy()
    part["image_id"] = part.method + "|" + part.image_id  # one candidate = (method, image, seed)
    cat = catalogue(list(REWARD_METRICS))
    rewards = hybrid_reward(part[["image_id", "seed", "metric", "value"]], cat, bounds=fit_bounds(part, cat))
    method_image = rewards.image_id.str.split("|", n=1, expand=True)
    extra = pd.DataFrame(
        {
            "method": method_image[0],
            "image_id": method_image[1],
            "seed": rewards.seed,
            "metric": "reward",
            "value": rewards.reward,
        }
    )
    return pd.concat([table, extra], ignore_index=True)


def summarise(table: pd.DataFrame, outputs, seeds: list[int]) -> dict:
    """Per method and metric: mean over images of the per-image mean over seeds, its std over images."""
    summary: dict = {}
    per_image = table.groupby(["method", "metric", "image_id"]).value.mean().reset_index()
    for (method, metric), g in per_image.groupby(["method", "metric"], sort=False):
        summary.setdefault(method, {})[metric] = {
            "mean": float(g.value.mean()),
            "std": float(g.value.std(ddof=0)),
        }
    for method, images in outputs.items():
        if method == "bicubic" or len(seeds) < 2:
            continue
        pix = [float((b * 255).std(dim=0, unbiased=False).mean()) for b in images.values()]
        sub = table[(table.method == method) & (table.metric == "psnr_y")]
        summary[method]["seed_pixel_std"] = {"mean": float(np.mean(pix)), "std": float(np.std(pix))}
        summary[method]["seed_psnr_std"] = {
            "mean": float(sub.groupby("image_id").value.std(ddof=0).mean()),
            "std": 0.0,
        }
    return summary


def markdown(summary: dict) -> str:
    order = [
        "reward",
        "ms_ssim",
        "fsim",
        "gmsd",
        "piqe",
        "entropy",
        "psnr_y",
        "ssim_y",
        "grad_ratio",
        "seed_pixel_std",
        "seed_psnr_std",
    ]
    metrics = [m for m in order if any(m in s for s in summary.values())]
    arrows = {
        "reward": "↑",
        "ms_ssim": "↑",
        "fsim": "↑",
        "gmsd": "↓",
        "piqe": "↓",
        "entropy": "↑",
        "psnr_y": "↑",
        "ssim_y": "↑",
        "grad_ratio": "→1",
        "seed_pixel_std": "",
        "seed_psnr_std": "",
    }
    lines = [
        "| method | " + " | ".join(f"{m} {arrows[m]}".strip() for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for method, s in summary.items():
        cells = [f"{s[m]['mean']:.4g} ± {s[m]['std']:.2g}" if m in s else "–" for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="photo folder (its HOLDOUT photos are used)")
    p.add_argument(
        "--model", type=Path, default=None, help="embedded model folder (default: the shipped one)"
    )
    p.add_argument("--out", type=Path, required=True, help="JSON output")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--process-size", type=int, default=None, help="default: the model's")
    p.add_argument("--color-fix", nargs="+", default=["adain", "none"], help="colour fixes to evaluate")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--images", type=Path, default=None, help="write LR-up | model (seeds) | HR comparison PNGs"
    )
    p.add_argument("--no-pyiqa", action="store_true", help="skip pyiqa metrics and the reward")
    p.add_argument("--limit", type=int, default=None, help="first N held-out photos only (quick checks)")
    args = p.parse_args(argv)
    _, held = T.split_photos(args.photos)
    if not held:
        raise SystemExit(f"{args.photos}: none of the held-out photos {T.HOLDOUT} is there")
    pairs = T.eval_pairs(held[: args.limit] if args.limit else held)
    outputs, settings = run_model(args, pairs)
    use_pyiqa = not args.no_pyiqa and importlib.util.find_spec("pyiqa") is not None
    if not use_pyiqa:
        print("note: pyiqa not available: no reward, ms_ssim/fsim/gmsd/piqe/entropy", file=sys.stderr)
    table = score(outputs, pairs, use_pyiqa, args.device)
    if use_pyiqa:
        table = add_reward(table)
    summary = summarise(table, outputs, args.seeds)
    md = markdown(summary)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": str(args.model or "shipped"),
        "images": [i for i, _, _ in pairs],
        "seeds": args.seeds,
        "settings": settings,
        "degradation": "train_embedded.MILD",
        "summary": summary,
        "per_image": table.to_dict(orient="records"),
        "markdown": md,
    }
    args.out.write_text(json.dumps(result, indent=1))
    if args.images is not None:
        fix = args.color_fix[0]
        for image_id, hr, _lr in pairs:
            row = [outputs["bicubic"][image_id], *outputs[f"model ({fix})"][image_id].split(1), hr]
            save_image(torch.cat(row, -1), args.images / f"{image_id}.png")
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
