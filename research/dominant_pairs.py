"""Experiment: the quickstart, per seed, with only Pareto-dominant preference pairs.

Composed of the quickstart's stages: degrade, sample, score and pair run as in `dp2osr quickstart`; then the
pairs are kept only where the winner beats the loser on both halves of the training pool's reward (the mean
normalised FR score and NR score, the ``norm_<metric>`` columns of 3_score/rewards.parquet), the intra-group
HPO weights are renormalised to mean 1 over the kept pairs of each crop, and the kept pairs
(4_pair/dominant_pairs.parquet) are what DPO trains on; held-out evaluation and report follow as in the
quickstart (`quickstart.run_stages`, with --train.data pointed at the kept pairs). It tests whether removing
the pairs that trade fidelity against texture gives DPO a consistent direction on the embedded model
(docs/QUICKSTART.md, "Measured": it did not). Every quickstart option applies; the table is that of
`scripts/ablations.py --mode seeds` (OUTPUT/seeds.md and .json):

    python research/dominant_pairs.py --seeds 0 1 2 3 4 --output runs/seeds_dominant
    python research/dominant_pairs.py --seeds 0 --images 4 --heldout 2 --sample.samples 4 --train.steps 2

By hand, for one finished quickstart folder Q: keep the dominant rows of Q/4_pair/pref_pairs.parquet (as
`dominant` does), write them with `dp2osr.tables.write(tables.PREF_PAIRS, ...)`, then
`dp2osr train --mode dpo --data filtered.parquet --output Q2 ...` and `dp2osr curve --run-dir Q2 ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd

from dp2osr import before_after, curve, pair, report, sample, score, tables
from dp2osr import metrics as metric_lib
from dp2osr.config import add_arguments, build_config
from dp2osr.quickstart import Layout, QuickstartConfig, prepare_data, prepare_output, run_stages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from ablations import seeds_table  # noqa: E402


def dominant(pairs: pd.DataFrame, rewards: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The ``pairs`` whose winner is better in both FR and NR (mean normalised scores in ``rewards``), with
    the intra-group weights renormalised to mean 1 per crop."""
    r = rewards.set_index(["image_id", "seed"])
    for family in ("fr", "nr"):
        names = [f"norm_{m}" for m, s in metric_lib.catalogue(metrics).items() if s.family == family]
        r[family] = r[names].mean(axis=1)
    win = r.loc[list(zip(pairs.image_id, pairs.win_seed)), ["fr", "nr"]].to_numpy()
    lose = r.loc[list(zip(pairs.image_id, pairs.lose_seed)), ["fr", "nr"]].to_numpy()
    kept = pairs[(win > lose).all(axis=1)].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"no dominant pair among the {len(pairs)} pairs: nothing to train on")
    kept["w_intra"] = kept.w_intra / kept.groupby("image_id").w_intra.transform("mean")
    kept["weight"] = kept.w_intra * kept.w_inter
    print(f"dominant pairs: {len(kept)} of {len(pairs)}", file=sys.stderr)
    return kept


def run_seed(cfg: QuickstartConfig) -> dict:
    """One quickstart run (resumable) that trains on the dominant pairs only; returns its summary."""
    cfg = prepare_output(cfg)
    lay = Layout(Path(cfg.output))
    t = time.perf_counter()
    prepare_data(cfg, lay.degrade)
    sample.run(cfg.sample)
    rewards = score.run(cfg.score).rewards
    pairs = pair.run(cfg.pair)
    kept = dominant(pairs, rewards, cfg.reward_metrics)
    data = tables.write(tables.PREF_PAIRS, kept, lay.pair / "dominant_pairs.parquet")
    before = time.perf_counter() - t
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=data))
    s = run_stages(cfg, lay)  # stages 1-4 resume with no work; train and eval use the kept pairs
    s["pairs"], s["pairs_all"] = len(kept), len(pairs)  # run_stages counted the pair stage's table
    s["timings"] = {**s["timings"], "before_filter": before, "total": s["timings"]["total"] + before}
    (lay.eval / "summary.json").write_text(json.dumps(s, indent=2))
    joint = [lay.eval / "joint" / k for k in ("base", "dp2o")]
    page = report.ReportConfig(
        output=lay.root / "report.html",
        pools=joint,
        names=[before_after.BASE_LABEL, before_after.DPO_LABEL],
        reward_curve=lay.eval / curve.CURVE_CSV,
        max_images=6,
        select="first",
        title="dp2osr quickstart, Pareto-dominant pairs only: DP²O on held-out crops",
    )
    report.run(page, sections=[before_after.summary_html(cfg, s)])  # again, with the pairs trained on
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode", choices=["seeds"], default="seeds", help="as scripts/ablations.py's (seeds only)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="whole-run seeds")
    add_arguments(parser, QuickstartConfig)
    args = parser.parse_args(argv)
    if "output" not in vars(args):
        args.output = Path("dominant_runs")
    cfg = build_config(QuickstartConfig, args)
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    command = "python research/dominant_pairs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict] = []
    for seed in args.seeds:
        s = run_seed(dataclasses.replace(cfg, seed=seed, output=root / f"seed_{seed}"))
        rows.append({"seed": seed, "summary": s})
        print(seeds_table(rows))
    (root / "seeds.md").write_text(f"Command: `{command}`\n\n{seeds_table(rows)}")
    (root / "seeds.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"table: {root / 'seeds.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
