"""Small-scale DP²O experiments composed of `dp2osr quickstart`'s stages (no second pipeline).

Two modes:

- ``--mode seeds``: the whole quickstart with several whole-run seeds (degradations, crops, sampling seeds,
  data order and noise all change). Tabulates, per seed, the held-out Best/Mean/Worst@M of the base and the
  DP²O ControlNet (joint normalisation, as the quickstart's report) and PSNR/SSIM, and counts the seeds in
  which both Mean@M and Worst@M rose (the target: at least 4 of 5).
- ``--mode ablations``: the paper's ablations at small scale, per seed: pair reward hybrid vs FR-only
  (``--score.w-fr 1 --score.w-nr 0``) vs NR-only; top-N x bottom-N vs N=1 (``--pair.n 1``); HPO on vs off
  (``--pair.hpo none``); and beta 5000 (the paper's) vs the quickstart's 500 (``--train.beta 5000``); on
  request (``--variants``) also lr 1e-4 (``lr1e4``) and three times the DPO steps (``steps3x``). All
  variants of a seed share the crops, the training pool and its scores (in the first variant's folder), and
  the base model's held-out pool (each variant's 6_eval/step_000000 links to the first's); each has its own
  pairs, training and final held-out pool. Outcomes are read under one fixed normalisation: the min-max
  bounds of the base model's held-out pool (so values can leave [0, 1] and are comparable across variants).

Every quickstart option is accepted (``--train.steps``, ``--sample.samples``, ``--images``, ...) and applies
to every run. Examples:

    python scripts/ablations.py --mode seeds --seeds 0 1 2 3 4 --output runs/seeds
    python scripts/ablations.py --mode ablations --seeds 0 --output runs/ablations --train.steps 120
    python scripts/ablations.py --mode ablations --seeds 0 --variants hybrid n1 --images 4 --sample.samples 4

Each run keeps its folders (and report.html) under --output; the table goes to OUTPUT/MODE.md and stdout.
A rerun with the same options resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dp2osr.config import add_arguments, build_config, check_resume, save_config
from dp2osr.engine.heldout import step_dir
from dp2osr.engine.scoring import PARTS_DIR
from dp2osr.paths import check_output_dir
from dp2osr.quickstart import CONFIG_NAME, Layout, QuickstartConfig, prepare_output, resolved, run_stages

# name -> (description, {stage: options changed from the quickstart's})
VARIANTS: dict[str, tuple[str, dict[str, dict]]] = {
    "hybrid": ("hybrid reward, top-N x bottom-N, HPO (the quickstart)", {}),
    "fr_only": ("FR-only reward for pairing", {"score": {"w_fr": 1.0, "w_nr": 0.0}}),
    "nr_only": ("NR-only reward for pairing", {"score": {"w_fr": 0.0, "w_nr": 1.0}}),
    "n1": ("N = 1 (best vs worst)", {"pair": {"n": 1}}),
    "no_hpo": ("HPO off (uniform pair weights)", {"pair": {"hpo": "none"}}),
    "beta5000": ("beta = 5000 (the paper's; quickstart: 500)", {"train": {"beta": 5000.0}}),
    "lr1e4": ("lr = 1e-4 (quickstart: 3e-5)", {"train": {"lr": 1e-4}}),
    "steps3x": ("3x the DPO steps", {}),
}
FORMATS = (
    ("worst", ".4f"),
    ("best", ".4f"),
    ("psnr", ".2f"),
    ("ssim", ".4f"),
)  # table columns after the mean


@dataclass(frozen=True)
class VariantLayout(Layout):
    """A variant's folders: pair/train/eval under ``root``; crops and training pool in ``shared`` (the first
    variant's folder), and its scores too unless ``own_score`` (a variant with another pairing reward)."""

    shared: Path = Path(".")
    own_score: bool = False

    degrade = property(lambda self: Layout(self.shared).degrade)
    sample = property(lambda self: Layout(self.shared).sample)
    score = property(lambda self: Layout(self.root if self.own_score else self.shared).score)


def parse(argv: list[str] | None = None) -> tuple[QuickstartConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["seeds", "ablations"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="whole-run seeds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS)[:6])
    parser.add_argument(
        "--curve",
        action="store_true",
        help="ablations: evaluate every --train.checkpoint-every steps (default: only the end)",
    )
    add_arguments(parser, QuickstartConfig)
    args = parser.parse_args(argv)
    if "output" not in vars(args):
        args.output = Path("ablation_runs")
    return build_config(QuickstartConfig, args), args


def variant(cfg: QuickstartConfig, name: str, seed: int, output: Path, curve: bool) -> QuickstartConfig:
    """``cfg`` with variant ``name``'s stage options, the seed and the output folder."""
    stages = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in VARIANTS[name][1].items()}
    if name == "steps3x":
        stages["train"] = dataclasses.replace(cfg.train, steps=3 * cfg.train.steps)
    c = dataclasses.replace(cfg, seed=seed, output=output, **stages)
    if not curve:
        c.train = dataclasses.replace(c.train, checkpoint_every=c.train.steps)
    return c


def run_variant(c: QuickstartConfig, lay: VariantLayout, **stages) -> dict:
    """`quickstart.prepare_output` and `run_stages` in ``lay``: the stages ``shared`` already holds resume
    with no work; a variant's own scores start from the shared ones, its step-0 pool is the shared one.
    ``stages``: `run_stages`' keyword options."""
    check_output_dir(lay.root)
    if c.overwrite and lay.root.exists():
        shutil.rmtree(lay.root)
    c = resolved(c, lay)
    check_resume(c, lay.root / CONFIG_NAME, "an ablation variant", "use --overwrite or another --output")
    save_config(c, lay.root / CONFIG_NAME)
    if lay.shared != lay.root:
        parts = Layout(lay.shared).score / PARTS_DIR
        if lay.own_score and not (lay.score / PARTS_DIR).exists():
            shutil.copytree(parts, lay.score / PARTS_DIR)
        base_pool = step_dir(lay.eval, 0)
        if not base_pool.exists():
            base_pool.parent.mkdir(parents=True, exist_ok=True)
            base_pool.symlink_to(step_dir(Layout(lay.shared).eval, 0).resolve(), target_is_directory=True)
    return run_stages(c, lay, **stages)


def ablation_row(name: str, seed: int, s: dict) -> dict:
    """The variant's final held-out pool and the base's (step 0), under the base pool's bounds."""
    first, last = s["curve"]["step"].index(0), len(s["curve"]["step"]) - 1
    row = {"variant": name, "seed": seed, "pairs": s["pairs"], "images": s["images"]}
    row["improved"] = s["improved_images"]
    for key in ("reward", "best", "worst", "psnr", "ssim"):
        row[key], row[f"base_{key}"] = s["curve"][key][last], s["curve"][key][first]
    return row


def seeds_table(rows: list[dict]) -> str:
    """Markdown: per seed, before -> after (Δ) for Mean@M, Worst@M, Best@M, PSNR, SSIM; the count of wins."""
    m = rows[0]["summary"]["seeds"]
    head = f"| seed | Mean@{m} base → DP²O (Δ) | Worst@{m} (Δ) | Best@{m} (Δ) | PSNR-Y dB (Δ) | SSIM-Y (Δ) | crops up | s |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        cells = [str(r["seed"])]
        for key, fmt in (("mean", ".4f"), *FORMATS):
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
        "| variant | seeds | pairs | held-out reward (Δ vs base) | Worst@M (Δ) | Best@M (Δ) | PSNR-Y dB (Δ) | "
        "SSIM-Y (Δ) | crops up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, part in df.groupby("variant", sort=False):
        cells = [VARIANTS[name][0], str(len(part)), f"{part['pairs'].mean():.0f}"]
        for key, fmt in (("reward", ".4f"), *FORMATS):
            after, delta = part[key].mean(), (part[key] - part[f"base_{key}"]).mean()
            cells.append(f"{after:{fmt}} ({delta:+{fmt}})")
        cells.append(f"{part['improved'].sum()}/{part['images'].sum()}")
        lines.append("| " + " | ".join(cells) + " |")
    base = df.drop_duplicates("seed")
    lines += [
        "",
        f"Base ControlNet on the same held-out crops and seeds: reward {base['base_reward'].mean():.4f}, "
        f"Worst@M {base['base_worst'].mean():.4f}, Best@M {base['base_best'].mean():.4f}, PSNR-Y "
        f"{base['base_psnr'].mean():.2f} dB, SSIM-Y {base['base_ssim'].mean():.4f} (M = the held-out seeds).",
        "Reward: hybrid (0.5 FR + 0.5 NR), min-max bounds of the base model's held-out pool, the same for every "
        "variant. 'crops up': held-out crops whose mean reward rose (summed over seeds).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    command = "python scripts/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (root / "command.txt").write_text(command + "\n")
    rows: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        if args.mode == "seeds":
            c = prepare_output(dataclasses.replace(cfg, seed=seed, output=root / f"seed_{seed}"))
            rows.append({"seed": seed, "summary": run_stages(c, Layout(c.output))})
            print(seeds_table(rows))
            continue
        first = variant(cfg, args.variants[0], seed, root / f"seed_{seed}" / args.variants[0], args.curve)
        for name in args.variants:
            c = variant(cfg, name, seed, root / f"seed_{seed}" / name, args.curve)
            lay = VariantLayout(c.output, shared=first.output, own_score=c.score != first.score)
            rows.append(ablation_row(name, seed, run_variant(c, lay)))
            print(ablations_table(rows))
    text = seeds_table(rows) if args.mode == "seeds" else ablations_table(rows)
    table = root / f"{args.mode}.md"
    table.write_text(f"Command: `{command}` ({time.perf_counter() - t0:.0f} s)\n\n{text}")
    (root / f"{args.mode}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    print(f"table: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
