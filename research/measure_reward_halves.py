"""How the FR and NR halves of an offline hybrid reward behave on the embedded model's candidate pools.

Three measurements, for every candidate NR metric (default: PIQE and BRISQUE; NIQE cannot score the
quickstart's 64 px crops), with the FR half fixed to ``--fr`` (default FSIM + GMSD):

1. **Within-crop conflict.** For each training crop of each quickstart run in ``--runs`` (its ``2_sample``
   pool: M candidates of one crop that differ only by seed), the Spearman correlation between the FR half and
   the NR half of the hybrid reward (each metric min-max normalised over the run's pool, as the pairing does).
   A negative value means the two halves disagree about which seed is better, so the pairs of that crop pull
   the model along the fidelity-texture axis, in a direction set by the weights rather than by quality.
2. **The model's own grain axis** (``--detail``). The shipped embedded model adds a diffused brightness residual
   scaled by ``detail`` (0.3) to a deterministic base image; copies with other ``detail`` values sample the
   first run's training crops with the same seeds. The hybrid reward, normalised jointly over all the copies'
   pools, says where along that axis each reward is highest: a reward whose maximum lies above the shipped
   ``detail`` asks for more grain than the model makes (PSNR-Y and SSIM-Y are shown beside it).
3. **Label reliability.** The pairs are only as good as the within-crop ranking of the reward. Every candidate
   of the runs' training pools gets an invisible change (each 8-bit value moved by -1, 0 or +1 at random) and is
   scored again; the Spearman correlation, within each crop, between the rewards before and after says how much
   of the ranking is the image and how much is the metric's reaction to the last bit (1: a stable ranking).

    python research/measure_reward_halves.py --runs RUN [RUN ...] [--nr piqe brisque] [--fr fsim gmsd] \\
        [--detail 0.15 0.3 0.45 0.6] [--dither 0 16] --work DIR --json docs/results/reward_halves.json

RUN is a `dp2osr quickstart` output folder (or an ablation run's seed folder). DIR holds the scratch pools and
scores (reruns resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import spearmanr

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from dp2osr import metrics as metric_lib
from dp2osr import sample as sample_stage
from dp2osr import score as score_stage
from dp2osr.backbones.embedded import SHIPPED
from dp2osr.math.reward import fit_bounds, hybrid_reward

GUARDS = ("psnry", "ssim")  # shown beside the detail axis, not in any reward


def score(pool: Path, out: Path, names: list[str], dither: int = 0) -> pd.DataFrame:
    """Raw scores (long table) of every candidate in ``pool`` for ``names`` (resumes in ``out``)."""
    score_stage.run(score_stage.ScoreConfig(candidates=pool, output=out, metrics=names, dither=dither))
    return pd.read_parquet(out / "scores.parquet")


def halves(scores: pd.DataFrame, fr: list[str], nr: str, bounds: dict | None = None) -> pd.DataFrame:
    """Per candidate: the FR half, the NR half and the hybrid reward (0.5 each), pool-normalised."""
    names = [*fr, nr]
    cat = metric_lib.catalogue(names)
    r = hybrid_reward(scores[scores.metric.isin(names)], cat, bounds=bounds)
    r["fr_half"] = r[[f"norm_{m}" for m in fr]].mean(axis=1)
    r["nr_half"] = r[f"norm_{nr}"]
    return r


def conflict(runs: list[Path], fr: list[str], nrs: list[str], work: Path) -> dict:
    out: dict = {}
    # each run's pool scored once with every metric (the folder `reliability` reads back); halves() picks its own
    pools = [score(run / "2_sample", work / "conflict" / f"{run.name}_all", [*fr, *nrs]) for run in runs]
    for nr in nrs:
        rhos = []
        for scores in pools:
            r = halves(scores, fr, nr)
            for _, g in r.groupby("image_id"):
                rho = spearmanr(g.fr_half, g.nr_half)[0]
                if np.isfinite(rho):
                    rhos.append(float(rho))
        rhos_a = np.asarray(rhos)
        out[nr] = {
            "crops": len(rhos),
            "mean_spearman": float(rhos_a.mean()),
            "se": float(rhos_a.std(ddof=1) / np.sqrt(len(rhos_a))),
            "frac_negative": float((rhos_a < 0).mean()),
            "per_crop": rhos,
        }
    return out


def perturbed_pool(pool: Path, out: Path, seed: int = 0) -> Path:
    """A copy of ``pool`` in which every 8-bit value of every candidate moved by -1, 0 or +1 (uniformly)."""
    rng = np.random.default_rng(seed)
    table = pd.read_parquet(pool / "candidates.parquet")
    for rel in table.path:
        dst = out / rel
        if dst.is_file():
            continue
        x = np.asarray(Image.open(pool / rel).convert("RGB"), dtype=np.int16)
        x = np.clip(x + rng.integers(-1, 2, size=x.shape), 0, 255).astype(np.uint8)
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(dst)
    table.to_parquet(out / "candidates.parquet")
    return out


def reliability(runs: list[Path], fr: list[str], nrs: list[str], work: Path, dither: int = 0) -> dict:
    """Within-crop Spearman of the scores before vs after the invisible change. With ``dither`` K, both sides
    are `score --dither K` means (their dither patterns differ, as the files do): how steady K makes a ranking."""
    out: dict = {}
    for run in runs:
        names = [*fr, *nrs]
        a = score(run / "2_sample", work / "conflict" / f"{run.name}_all", names, dither)
        b = score(
            perturbed_pool(run / "2_sample", work / "perturbed" / run.name),
            work / "perturbed_score" / run.name,
            names,
            dither,
        )
        for key, metrics in [(f"hybrid with {nr}", [*fr, nr]) for nr in nrs] + [(m, [m]) for m in names]:
            cat = metric_lib.catalogue(metrics)
            ra = hybrid_reward(a[a.metric.isin(metrics)], cat).set_index(["image_id", "seed"])
            rb = hybrid_reward(b[b.metric.isin(metrics)], cat).set_index(["image_id", "seed"]).loc[ra.index]
            for image_id in ra.index.unique("image_id"):
                rho = spearmanr(ra.loc[image_id].reward, rb.loc[image_id].reward)[0]
                if np.isfinite(rho):
                    out.setdefault(key, []).append(float(rho))
    return {k: {"crops": len(v), "mean_spearman": float(np.mean(v))} for k, v in out.items()}


def detail_axis(
    run: Path, details: list[float], fr: list[str], nrs: list[str], work: Path, samples: int
) -> dict:
    cand = pd.read_parquet(run / "2_sample" / "candidates.parquet")
    seed0 = int(cand.seed.min())
    pools = {}
    for d in details:
        model = work / f"embedded_detail_{d}"
        if not model.is_dir():
            shutil.copytree(SHIPPED, model)
            cfg = json.loads((model / "dp2osr.json").read_text())
            cfg["autoencoder"]["detail"] = d
            (model / "dp2osr.json").write_text(json.dumps(cfg, indent=2))
        pool = work / f"pool_detail_{d}"
        sample_stage.run(
            sample_stage.SampleConfig(
                backbone="embedded",
                base=model,
                input=run / "1_degrade" / "train",
                output=pool,
                samples=samples,
                seed=seed0,
                process_size=64,
                color_fix="adain",
            )
        )
        pools[d] = score(pool, work / f"score_detail_{d}", [*fr, *nrs, *GUARDS])
    table: dict = {}
    union = pd.concat(pools.values())
    for nr in nrs:
        bounds = fit_bounds(union[union.metric.isin([*fr, nr])], metric_lib.catalogue([*fr, nr]))
        table[nr] = {str(d): float(halves(pools[d], fr, nr, bounds).reward.mean()) for d in details}
    for g in GUARDS:
        table[g] = {str(d): float(pools[d][pools[d].metric == g].value.mean()) for d in details}
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="quickstart output folders")
    p.add_argument("--fr", nargs="+", default=["fsim", "gmsd"])
    p.add_argument("--nr", nargs="+", default=["piqe", "brisque"])
    p.add_argument("--detail", type=float, nargs="*", default=[0.15, 0.3, 0.45, 0.6])
    p.add_argument("--samples", type=int, default=8, help="seeds per crop on the detail axis")
    p.add_argument(
        "--dither",
        type=int,
        nargs="*",
        default=[0, 16],
        help="label reliability with `score --dither K` for each K (0: plain scores)",
    )
    p.add_argument("--work", type=Path, required=True, help="scratch folder (pools and scores)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = {"fr": a.fr, "runs": [str(r) for r in a.runs], "conflict": conflict(a.runs, a.fr, a.nr, a.work)}
    print("| NR metric | crops | mean within-crop Spearman(FR half, NR half) | crops with negative |")
    print("|---|---|---|---|")
    for nr, c in result["conflict"].items():
        print(
            f"| {nr} | {c['crops']} | {c['mean_spearman']:+.3f} ± {c['se']:.3f} | {c['frac_negative']:.0%} |"
        )
    rel = {k: reliability(a.runs, a.fr, a.nr, a.work, k) for k in a.dither}
    result["reliability"] = rel[a.dither[0]] if a.dither else {}
    result["reliability_by_dither"] = {str(k): v for k, v in rel.items()}
    print(
        "\n| reward or metric | crops | "
        + " | ".join(f"Spearman before vs after ±1 LSB, dither {k}" for k in rel)
        + " |"
    )
    print("|---|---|" + "---|" * len(rel))
    for key in next(iter(rel.values()), {}):
        cells = [f"{rel[k][key]['mean_spearman']:.3f}" for k in rel]
        print(f"| {key} | {rel[a.dither[0]][key]['crops']} | " + " | ".join(cells) + " |")
    if a.detail:
        axis = detail_axis(a.runs[0], a.detail, a.fr, a.nr, a.work, a.samples)
        result["detail_axis"] = {"run": str(a.runs[0]), "shipped": 0.3, "mean": axis}
        print("\n| detail | " + " | ".join(f"hybrid with {n}" for n in a.nr) + " | PSNR-Y | SSIM |")
        print("|---|" + "---|" * (len(a.nr) + 2))
        for d in a.detail:
            cells = [f"{axis[n][str(d)]:.4f}" for n in [*a.nr, *GUARDS]]
            print(f"| {d} | " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
