"""The ``pair`` stage: rewards -> top-N × bottom-N preference pairs with HPO weights (arXiv 2510.18851).

Reads ``rewards.parquet`` (written by ``score``: one row per candidate, ``image_id, seed, path, reward``),
ranks each image's M candidates by reward, keeps the N best as winners and the N worst as losers, forms all
N×N (winner, loser) pairs, weights every pair with Hierarchical Preference Optimization, and writes
``pref_pairs.parquet`` for ``train --mode dpo``.

Conventions (our choices where the paper is silent):

- Ties in reward are broken by seed ascending: of two candidates with equal reward the lower seed ranks
  higher. With rows sorted by seed first, the result does not depend on the order of the input rows.
- N from a ratio is ``max(1, floor(ratio · M + 0.5))`` (round half up, not Python's round-half-to-even).
- σ_g, the reward spread of group g, is the population standard deviation (ddof = 0) of all M candidates.
- A disabled HPO level is stored as weight 1, so ``weight == w_intra · w_inter`` holds in every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dp2osr import tables
from dp2osr.config import check_choice, check_choices, data_root_field, field, save_config
from dp2osr.math.hpo import HPO_MODES, inter_weights, intra_weights, n_from_ratio, select_pairs
from dp2osr.paths import check_output_file

PAIR_COLUMNS = list(tables.PREF_PAIRS.columns)
DEFAULT_RATIO = 0.25  # N/M when the pool's table names none (the paper's SD2 setting, N = 8 of M = 32)


def build_pairs(
    rewards_df: pd.DataFrame, n: int | None, ratio: float | None, hpo: str = "both"
) -> pd.DataFrame:
    """The ``pref_pairs`` table (docs/ARCHITECTURE.md) from a rewards table.

    Args:
        rewards_df: one row per candidate with columns ``image_id, seed, path, reward, lr_path`` (others are
            ignored), as `tables.read` gives the ``rewards.parquet`` that ``score`` writes.
        n: N winners and N losers per image; overrides ``ratio`` when given.
        ratio: N = :func:`n_from_ratio` (M, ratio) per image when ``n`` is None.
        hpo: one of :data:`HPO_MODES`; a disabled level's weight column is 1.

    Returns:
        One row per pair, columns :data:`PAIR_COLUMNS`, groups in sorted ``image_id`` order. Paths are copied
        unchanged (the caller rebases them to the output's folder).
    """
    check_choice("hpo", hpo, HPO_MODES)
    if n is None and ratio is None:
        raise ValueError("give N (--n) or a ratio (--ratio)")
    df = _checked_rewards(rewards_df)
    built = _all_pairs(df, n, ratio)
    if built is None:  # some image breaks a rule: the per-image loop names the first one
        rows, group_stds = _group_pairs(df, n, ratio)
        out = pd.DataFrame(rows)
        groups = pd.factorize(out["image_id"])[0]
        built = out, groups, np.array(list(group_stds.values()))
    out = _with_hpo_weights(*built, hpo)
    return out.astype({"win_seed": "int64", "lose_seed": "int64"})[PAIR_COLUMNS]


def _checked_rewards(rewards_df: pd.DataFrame) -> pd.DataFrame:
    """The needed columns, checked, sorted by (image_id, seed) so the output does not depend on row order."""
    required = ["image_id", "seed", "path", "reward", "lr_path"]
    missing = [c for c in required if c not in rewards_df.columns]
    if missing:
        raise ValueError(f"rewards table lacks column(s) {missing}; needs {required}")
    if rewards_df.empty:
        raise ValueError("rewards table is empty")
    df = rewards_df[required].copy()
    df["image_id"] = df["image_id"].astype(str)
    dup = df.duplicated(["image_id", "seed"])
    if dup.any():
        first = df[dup].iloc[0]
        raise ValueError(
            f"duplicate candidate in rewards table: image_id={first.image_id!r}, seed={first.seed}"
        )
    # Sorting first makes the output independent of the input's row order.
    df = df.sort_values(["image_id", "seed"], kind="stable").reset_index(drop=True)

    return df


def _group_pairs(df: pd.DataFrame, n: int | None, ratio: float | None) -> tuple[list[dict], dict[str, float]]:
    """(one row per top-N x bottom-N pair of every image, each image's reward spread σ_g)."""
    rows: list[dict] = []
    group_stds: dict[str, float] = {}
    for image_id, group in df.groupby("image_id", sort=True):
        m = len(group)
        n_g = n if n is not None else n_from_ratio(m, ratio)
        if 2 * n_g > m:
            raise ValueError(
                f"image {image_id!r} has M={m} candidates, too few for N={n_g} winners and losers"
            )
        rewards = group["reward"].to_numpy(dtype=np.float64)
        seeds = group["seed"].to_numpy()
        paths = group["path"].astype(str).to_numpy()
        lr_paths = group["lr_path"].astype(str).unique()
        if len(lr_paths) != 1:
            raise ValueError(f"image {image_id!r} has several lr_path values: {lr_paths.tolist()}")
        for w, lo in select_pairs(rewards, seeds, n_g):
            rows.append(
                {
                    "image_id": image_id,
                    "win_seed": int(seeds[w]),
                    "lose_seed": int(seeds[lo]),
                    "win_path": paths[w],
                    "lose_path": paths[lo],
                    "lr_path": lr_paths[0],
                    "win_reward": float(rewards[w]),
                    "lose_reward": float(rewards[lo]),
                }
            )
        group_stds[image_id] = float(np.std(rewards, ddof=0))

    return rows, group_stds


def _all_pairs(
    df: pd.DataFrame, n: int | None, ratio: float | None
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray] | None:
    """The rows of `_group_pairs` computed for all images at once, each row's image (its index in sorted
    ``image_id`` order) and each image's σ_g; None when an image breaks a rule of `_group_pairs` (it names it)."""
    seeds = df["seed"].to_numpy()
    rewards = df["reward"].to_numpy(dtype=np.float64)
    if seeds.dtype.kind not in "iu" or not np.isfinite(rewards).all():
        return None
    codes, ids = pd.factorize(df["image_id"])  # df is sorted by image_id: each image's rows are contiguous
    m = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(m)[:-1]])
    try:
        per_m = {int(k): n if n is not None else n_from_ratio(int(k), ratio) for k in np.unique(m)}
    except ValueError:
        return None
    n_g = np.array([per_m[int(k)] for k in m], dtype=np.int64)
    lr_codes = pd.factorize(df["lr_path"].astype(str))[0]
    if (n_g < 1).any() or (2 * n_g > m).any() or (lr_codes != np.repeat(lr_codes[starts], m)).any():
        return None
    # Within an image: reward descending, then seed ascending (`select_pairs`); seeds are unique per image.
    order = np.lexsort((seeds, -rewards, codes))
    per_image = n_g * n_g
    group = np.repeat(np.arange(len(m)), per_image)
    local = np.arange(len(group)) - np.repeat(np.cumsum(per_image) - per_image, per_image)
    win = order[starts[group] + local // n_g[group]]
    lose = order[starts[group] + m[group] - n_g[group] + local % n_g[group]]
    paths, lr = df["path"].astype(str).to_numpy(), df["lr_path"].astype(str).to_numpy()
    out = pd.DataFrame(
        {
            "image_id": np.asarray(ids, dtype=object)[group],
            "win_seed": seeds[win].astype(np.int64),
            "lose_seed": seeds[lose].astype(np.int64),
            "win_path": paths[win],
            "lose_path": paths[lose],
            "lr_path": lr[starts[group]],
            "win_reward": rewards[win],
            "lose_reward": rewards[lose],
        }
    )
    stds = np.empty(len(m))
    for k in np.unique(m):  # images of one size at once: σ_g of each row of an (images, M) matrix
        of_size = np.flatnonzero(m == k)
        stds[of_size] = np.std(rewards[starts[of_size, None] + np.arange(k)], axis=1, ddof=0)
    return out, group, stds


def _with_hpo_weights(
    out: pd.DataFrame, groups: np.ndarray, group_stds: np.ndarray, hpo: str
) -> pd.DataFrame:
    """``out`` with w_intra, w_inter and weight = w_intra · w_inter (a disabled level is 1); ``groups``: each
    row's image (an index into ``group_stds``, σ_g of each image)."""
    ones = np.ones(len(out))
    if hpo in ("both", "intra"):
        out["w_intra"] = intra_weights((out["win_reward"] - out["lose_reward"]).to_numpy(), groups)
    else:
        out["w_intra"] = ones
    if hpo in ("both", "inter"):
        out["w_inter"] = inter_weights(group_stds)[groups]
    else:
        out["w_inter"] = ones
    out["weight"] = out["w_intra"] * out["w_inter"]
    if (out["weight"] < 0).any():
        raise ValueError(
            f"negative HPO weight (min {out['weight'].min():.4g}); rewards must lie in [0, 1] "
            "(as `score` writes them) or use --hpo none"
        )
    return out


@dataclass
class PairConfig:
    """Curate preference pairs from rewards (arXiv 2510.18851): per image, rank the M candidates by reward,
    pair each of the top-N winners with each of the bottom-N losers (N×N pairs), and weight each pair with
    Hierarchical Preference Optimization (w = w_intra · w_inter). Writes pref_pairs.parquet for `train`."""

    # RUF009: ruff cannot tell that config.field returns a dataclasses.field.
    rewards: Path = field(help="rewards.parquet written by `dp2osr score` (or the folder holding it)")
    output: Path | None = field(None, help="output table (default: pref_pairs.parquet by --rewards)")
    n: int | None = field(
        None, help="winners and losers per image, N (N=1: best vs worst); overrides --ratio"
    )
    ratio: float | None = field(
        None,
        help="N = max(1, round(ratio*M)) when --n is not given; default: the ratio of the model that sampled the "
        "pool (recorded in the rewards table): 0.25 for SD2-like (paper: N=8 of M=32), 0.0625 for FLUX (N=4 of M=64)",
    )
    hpo: str = field(
        "both",
        help="HPO weights: both (w_intra*w_inter), intra, inter, or none (uniform, plain Diffusion-DPO)",
        choices=list(HPO_MODES),
    )
    overwrite: bool = field(
        False, help="replace an existing --output that is not a pairs table written by pair", run_only=True
    )
    data_root: list[Path] = data_root_field()

    def __post_init__(self) -> None:
        self.rewards = Path(self.rewards)
        if self.output is not None:
            self.output = Path(self.output)
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.ratio is not None and not 0 < self.ratio <= 0.5:
            raise ValueError(f"ratio must be in (0, 0.5], got {self.ratio}")
        check_choices(self)


def _is_pairs_table(path: Path) -> bool:
    """Whether ``path`` is a Parquet table with the columns `pair` writes (so pair may replace it)."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except Exception:  # not Parquet at all
        return False
    return {"image_id", "win_seed", "lose_seed", "win_path", "lose_path", "weight"} <= names


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a folder, in an unwritable folder, or an existing file that pair did not write
    (unless ``overwrite``)."""
    check_output_file(output)
    if output.exists() and not overwrite and not _is_pairs_table(output):
        raise ValueError(
            f"--output {output} exists and is not a pairs table written by pair; pass --overwrite "
            "to replace it, or choose another --output"
        )


@tables.with_data_roots
def run(cfg: PairConfig) -> pd.DataFrame:
    """Run the ``pair`` stage: read rewards, build pairs, write ``pref_pairs.parquet`` and its config.

    Everything comes from the rewards table: candidate and LR paths, prompts, and (for the default ratio)
    the pair ratio of the model that sampled the pool, from the table's metadata.
    """
    rewards = tables.table_path(tables.REWARDS, cfg.rewards)
    output = cfg.output if cfg.output is not None else rewards.parent / tables.PREF_PAIRS.filename
    check_output(output, cfg.overwrite)
    rewards_df, meta = tables.read(tables.REWARDS, rewards)
    if "lr_path" not in rewards_df.columns:
        raise ValueError(f"{rewards} has no lr_path column (written by an older dp2osr score); score again")
    ratio = cfg.ratio
    if cfg.n is None and ratio is None:
        ratio = float(meta.get("pair_ratio", DEFAULT_RATIO))
    pairs = build_pairs(rewards_df, n=cfg.n, ratio=ratio, hpo=cfg.hpo)
    prompts = rewards_df.get("prompt", pd.Series(dtype=str))
    if (prompts != "").any():  # the prompt each image was sampled with, for training (none: no column)
        pairs = pairs.merge(rewards_df[["image_id", "prompt"]].drop_duplicates("image_id"), on="image_id")
    tables.write(tables.PREF_PAIRS, pairs, output)
    save_config(cfg, output.with_name(output.stem + ".config.yaml"))
    groups = pairs["image_id"].nunique()
    n_values = sorted(set(pairs.groupby("image_id").size().map(lambda p: math.isqrt(p))))
    print(
        f"pair: {groups} images, {len(pairs)} pairs (N={','.join(map(str, n_values))}), hpo={cfg.hpo}, "
        f"weight range [{pairs['weight'].min():.4f}, {pairs['weight'].max():.4f}] -> {output}"
    )
    return pairs
