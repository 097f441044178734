"""Does best-of-M selection by a no-reference metric improve the metrics it was not chosen by?

On RealSR (``test_LR`` 128 px, ``test_HR`` 512 px, same file names) runs, for the first ``--n`` images,
``dp2osr upscale --samples M --select nr`` with the embedded model (seeds 0..M-1; the default selector at
512 px is NIQE), then scores every sample with PSNR-Y / SSIM-Y against the HR and with BRISQUE and PIQE (no
reference). For each metric it compares the selected sample with seed 0 (what `upscale` gives without
selection) and with the mean over the M seeds (a random pick): mean over images, the mean paired
difference, its standard error over images (std / sqrt(n), ddof=1) and the number of images where the
selected sample is better. Raw per-image, per-seed values go to ``--json``.

    python research/measure_select_nr.py [--realsr DIR] [--n 20] [--samples 4] [--work /tmp/select_nr] \
        [--json docs/results/select_nr.json]

``--realsr`` defaults to ``$DP2OSR_REALSR``, else ``shared/data/realsr`` beside the repository. The upscales
are kept in ``--work``: a rerun (or a larger ``--n``) resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from dp2osr import metrics, upscale
from dp2osr.images import load_image
from dp2osr.math.quality import psnr_y, ssim_y

REPO = Path(__file__).resolve().parents[1]
GUARDS = ("psnr", "ssim", "brisque", "piqe")  # metrics outside the selecting one
HIGHER_BETTER = {"psnr": True, "ssim": True, "brisque": False, "piqe": False, "niqe": False}


def default_realsr() -> Path:
    env = os.environ.get("DP2OSR_REALSR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "realsr"


def run_upscale(realsr: Path, names: list[str], work: Path, samples: int) -> None:
    lr = work / "lr"
    lr.mkdir(parents=True, exist_ok=True)
    for extra in set(p.name for p in lr.iterdir()) - set(names):  # copies of an earlier, larger --n
        (lr / extra).unlink()
    for name in names:
        if not (lr / name).is_file():
            shutil.copyfile(realsr / "test_LR" / name, lr / name)
    cfg = upscale.UpscaleConfig(
        input=lr, output=work / "sr", samples=samples, seed=0, select="nr", device="cpu", batch_size=samples
    )
    upscale.run(cfg)


def score_image(realsr: Path, name: str, work: Path, models: dict) -> pd.DataFrame:
    """One row per seed: the selector's scores (scores.csv), PSNR-Y, SSIM-Y, BRISQUE, PIQE."""
    stem = Path(name).stem
    table = pd.read_csv(work / "sr" / stem / upscale.SCORES_CSV)
    hr_t = load_image(realsr / "test_HR" / name)
    hr = hr_t[0].permute(1, 2, 0).double().numpy()
    rows = []
    for file in table["file"]:
        sr_t = load_image(work / "sr" / stem / file)
        sr = sr_t[0].permute(1, 2, 0).double().numpy()
        row = {"psnr": psnr_y(sr, hr), "ssim": ssim_y(sr, hr)}
        row.update({m: float(metrics.score_batch(models[m], sr_t)[0]) for m in ("brisque", "piqe")})
        rows.append(row)
    table = table.drop(columns=[c for c in GUARDS if c in table.columns]).join(pd.DataFrame(rows))
    table.insert(0, "image", stem)
    return table


def paired(chosen: np.ndarray, other: np.ndarray, higher_better: bool) -> dict:
    d = chosen - other
    sign = 1 if higher_better else -1
    return {
        "mean_diff": float(d.mean()),
        "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"),
        "images_better": int((sign * d > 0).sum()),
        "images_worse": int((sign * d < 0).sum()),
    }


def summarise(table: pd.DataFrame, selector: str) -> dict:
    out = {}
    for m in (selector, *GUARDS):
        wide = table.pivot(index="image", columns="seed", values=m)
        chosen = table[table["chosen"]].set_index("image")[m].reindex(wide.index).to_numpy()
        seed0 = wide[wide.columns.min()].to_numpy()
        mean = wide.mean(axis=1).to_numpy()
        out[m] = {
            "higher_better": HIGHER_BETTER[m],
            "selected": float(chosen.mean()),
            "seed0": float(seed0.mean()),
            "seed_mean": float(mean.mean()),
            "vs_seed0": paired(chosen, seed0, HIGHER_BETTER[m]),
            "vs_seed_mean": paired(chosen, mean, HIGHER_BETTER[m]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--realsr", type=Path, default=default_realsr())
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/select_nr"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = sorted(p.name for p in (args.realsr / "test_LR").glob("*.png"))[: args.n]
    if not names:
        raise SystemExit(f"no test_LR/*.png in {args.realsr}")
    run_upscale(args.realsr, names, args.work, args.samples)
    models = {m: metrics.create(m) for m in ("brisque", "piqe")}
    table = pd.concat([score_image(args.realsr, n, args.work, models) for n in names], ignore_index=True)
    selector = [c for c in table.columns if c not in ("image", "seed", "file", "reward", "chosen", *GUARDS)][
        0
    ]
    summary = summarise(table, selector)
    result = {
        "images": len(names),
        "samples": args.samples,
        "selector": selector,
        "summary": summary,
        "per_seed": table.to_dict(orient="records"),
    }
    print(f"{len(names)} images x {args.samples} seeds, selected by {selector}")
    print(
        "| metric | seed 0 | mean of seeds | selected | selected − seed 0 (± s.e.) | better / worse images |"
    )
    print("|---|---|---|---|---|---|")
    for m, s in summary.items():
        v = s["vs_seed0"]
        arrow = "↑" if s["higher_better"] else "↓"
        print(
            f"| {m} {arrow} | {s['seed0']:.4f} | {s['seed_mean']:.4f} | {s['selected']:.4f} | "
            f"{v['mean_diff']:+.4f} ± {v['se']:.4f} | {v['images_better']} / {v['images_worse']} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
