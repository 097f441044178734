"""Small-scale DP²O experiments built on `dp2osr quickstart` (its functions; no second pipeline).

Two modes:

- ``--mode seeds``: the whole quickstart with several whole-run seeds (degradations, crops, sampling seeds,
  data order and noise all change). Tabulates, per seed, the held-out Best/Mean/Worst@M of the base and the
  DP²O ControlNet (joint normalisation, as the quickstart's report) and PSNR/SSIM, and counts the seeds in
  which both Mean@M and Worst@M rose (the target: at least 4 of 5).
- ``--mode ablations``: the paper's ablations at small scale, per seed: pair reward hybrid vs FR-only vs
  NR-only; top-N x bottom-N vs N=1 (best vs worst); HPO on vs off; and beta 5000 (the paper's) vs the
  quickstart's 500. All variants of a seed share the crops,
  the training pool and its scores, and the base model's held-out pool; each has its own pairs, training
  and final held-out pool. Outcomes are read under one fixed normalisation: the min-max bounds of the base
  model's held-out pool (so values can leave [0, 1] and are comparable across variants).

Every quickstart option is accepted (``--steps``, ``--images``, ...) and applies to every run. Examples:

    python scripts/ablations.py --mode seeds --seeds 0 1 2 3 4 --output runs/seeds
    python scripts/ablations.py --mode ablations --seeds 0 --output runs/ablations

Each run keeps its folders (and report.html) under --output; the table goes to OUTPUT/MODE.md and stdout.
A rerun with the same options resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd

from dp2osr.config import add_arguments, build_config
from dp2osr.quickstart import Layout, QuickstartConfig, load_base, prepare_output
from dp2osr.quickstart import run_stages as run

# name -> (description, options changed from the quickstart's)
VARIANTS: dict[str, tuple[str, dict]] = {
    "hybrid": ("hybrid reward, top-N x bottom-N, HPO (the quickstart)", {}),
    "fr_only": ("FR-only reward for pairing", {"pair_reward": "fr"}),
    "nr_only": ("NR-only reward for pairing", {"pair_reward": "nr"}),
    "n1": ("N = 1 (best vs worst)", {"pairs_n": 1}),
    "no_hpo": ("HPO off (uniform pair weights)", {"hpo": "none"}),
    "beta5000": ("beta = 5000 (the paper's; quickstart: 500)", {"beta": 5000.0}),
}


def parse(argv: list[str] | None = None) -> tuple[QuickstartConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["seeds", "ablations"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="whole-run seeds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--curve",
        action="store_true",
        help="ablations: evaluate every --eval-every steps (default: only the end)",
    )
    add_arguments(parser, QuickstartConfig)
    args = parser.parse_args(argv)
    if "output" not in vars(args):
        args.output = Path("ablation_runs")
    return build_config(QuickstartConfig, args), args


def seeds_table(rows: list[dict]) -> str:
    """Markdown: per seed, before -> after (Δ) for Mean@M, Worst@M, Best@M, PSNR, SSIM; the count of wins."""
    m = rows[0]["summary"]["seeds"]
    head = f"| seed | Mean@{m} base → DP²O (Δ) | Worst@{m} (Δ) | Best@{m} (Δ) | PSNR-Y dB (Δ) | SSIM-Y (Δ) | crops up | s |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        cells = [str(r["seed"])]
        for key, fmt in (
            ("mean", ".4f"),
            ("worst", ".4f"),
            ("best", ".4f"),
            ("psnr", ".2f"),
            ("ssim", ".4f"),
        ):
            b, d = s["base"][key], s["dp2o"][key]
            cells.append(f"{b:{fmt}} → {d:{fmt}} ({d - b:+{fmt}})")
        cells += [f"{s['improved_images']}/{s['images']}", f"{s['timings']['total']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    both = sum(r["summary"]["delta"]["mean"] > 0 and r["summary"]["delta"]["worst"] > 0 for r in rows)
    lines += ["", f"Mean@{m} and Worst@{m} both rose in **{both} of {len(rows)}** seeds (target: ≥ 4 of 5)."]
    return "\n".join(lines) + "\n"


def ablations_table(rows: list[dict]) -> str:
    """Markdown: per variant (mean over seeds when several), outcomes under the base pool's bounds."""
    df = pd.DataFrame(rows)
    lines = [
        (
            "| variant | seeds | pairs | held-out reward (Δ vs base) | Worst@M (Δ) | Best@M (Δ) | PSNR-Y dB (Δ) | "
            "SSIM-Y (Δ) | crops up |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, part in df.groupby("variant", sort=False):
        cells = [VARIANTS[name][0], str(len(part)), f"{part['pairs'].mean():.0f}"]
        for key, fmt in (
            ("reward", ".4f"),
            ("worst", ".4f"),
            ("best", ".4f"),
            ("psnr", ".2f"),
            ("ssim", ".4f"),
        ):
            after, delta = part[key].mean(), (part[key] - part[f"base_{key}"]).mean()
            cells.append(f"{after:{fmt}} ({delta:+{fmt}})")
        cells.append(f"{part['improved'].sum()}/{part['images'].sum()}")
        lines.append("| " + " | ".join(cells) + " |")
    base = df.drop_duplicates("seed")
    lines += [
        "",
        (
            f"Base ControlNet on the same held-out crops and seeds: reward {base['base_reward'].mean():.4f}, "
            f"Worst@M {base['base_worst'].mean():.4f}, Best@M {base['base_best'].mean():.4f}, PSNR-Y "
            f"{base['base_psnr'].mean():.2f} dB, SSIM-Y {base['base_ssim'].mean():.4f} (M = the held-out seeds)."
        ),
        (
            "Reward: hybrid (0.5 FR + 0.5 NR), min-max bounds of the base model's held-out pool, the same for every "
            "variant. 'crops up': held-out crops whose mean reward rose (summed over seeds)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    (root / "command.txt").write_text(
        "python scripts/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv) + "\n"
    )
    bb = load_base(cfg)  # one model for every run (each run's training loads its own copy)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        if args.mode == "seeds":
            c = dataclasses.replace(cfg, seed=seed, output=root / f"seed_{seed}")
            rows.append({"seed": seed, "summary": run(c, Layout.of(prepare_output(c)), bb)})
            print(seeds_table(rows))
            continue
        shared = Layout.of(root / f"seed_{seed}" / args.variants[0])
        for name in args.variants:
            opts = dict(VARIANTS[name][1], seed=seed, output=root / f"seed_{seed}" / name)
            if not args.curve:
                opts["eval_every"] = cfg.steps
            c = dataclasses.replace(cfg, **opts)
            lay = dataclasses.replace(
                Layout.of(c.output),
                degrade=shared.degrade,
                sample=shared.sample,
                score=shared.score,
                base_pool=shared.base_pool,
            )
            prepare_output(c)
            s = run(c, lay, bb)
            first, last = s["curve"]["step"].index(0), len(s["curve"]["step"]) - 1
            row = {
                "variant": name,
                "seed": seed,
                "pairs": s["pairs"],
                "images": s["images"],
                "improved": s["improved_images"],
            }
            for key in ("reward", "best", "worst", "psnr", "ssim"):
                row[key], row[f"base_{key}"] = s["curve"][key][last], s["curve"][key][first]
            rows.append(row)
            print(ablations_table(rows))
    text = seeds_table(rows) if args.mode == "seeds" else ablations_table(rows)
    command = (root / "command.txt").read_text().strip()
    (root / f"{args.mode}.md").write_text(
        f"Command: `{command}` ({time.perf_counter() - t0:.0f} s)\n\n{text}"
    )
    (root / f"{args.mode}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    print(f"table: {root / (args.mode + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
