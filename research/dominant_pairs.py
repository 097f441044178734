"""Experiment: `scripts/ablations.py` with only Pareto-dominant preference pairs.

The quickstart's pairs are kept only where the winner beats the loser on both halves of the reward (mean
normalised FR score and NR score); the intra-group HPO weights are renormalised to mean 1 over the kept pairs
of each crop. It tests whether removing the pairs that trade fidelity against texture gives DPO a consistent
direction on the embedded model (docs/QUICKSTART.md, "Measured": it did not). Every option of ablations.py
applies, e.g.

    python research/dominant_pairs.py --mode seeds --seeds 0 1 2 3 4 --output runs/seeds_dominant
"""

import sys
from pathlib import Path

import dp2osr.quickstart as qs
from dp2osr import metrics as metric_lib
from dp2osr.images import write_parquet
from dp2osr.math.reward import hybrid_reward

_make_pairs = qs.make_pairs


def dominant_pairs(cfg, scores, cands, out):
    """The quickstart's pairs, then only those whose winner is better in both FR and NR."""
    pairs = _make_pairs(cfg, scores, cands, out)
    specs = metric_lib.catalogue(list(cfg.metrics))
    r = hybrid_reward(scores, specs, scope=cfg.reward_scope)
    for family in ("fr", "nr"):
        r[family] = r[[f"norm_{m}" for m, s in specs.items() if s.family == family]].mean(axis=1)
    r = r.set_index(["image_id", "seed"])
    win = r.loc[list(zip(pairs.image_id, pairs.win_seed)), ["fr", "nr"]].to_numpy()
    lose = r.loc[list(zip(pairs.image_id, pairs.lose_seed)), ["fr", "nr"]].to_numpy()
    kept = pairs[(win > lose).all(axis=1)].reset_index(drop=True)
    kept["w_intra"] = kept.w_intra / kept.groupby("image_id").w_intra.transform("mean")
    kept["weight"] = kept.w_intra * kept.w_inter
    print(f"dominant pairs: {len(kept)} of {len(pairs)}", file=sys.stderr)
    write_parquet(kept, out / "pref_pairs.parquet")
    return kept


if __name__ == "__main__":
    qs.make_pairs = dominant_pairs  # quickstart.run_stages looks it up at call time
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import ablations

    sys.exit(ablations.main())
