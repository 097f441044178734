"""Mode B of the ``eval`` stage (`dp2osr.evaluate`), also used by ``report``: candidate pools read from disk,
put on one reward scale, and their Best/Mean/Worst@M (`dp2osr.math.bestm`).

A pool is a rewards.parquet (one row per image and seed). Several pools are compared on one scale: the hybrid
reward is recomputed from the raw scores beside each table (scores.parquet, written by `dp2osr score`) with
min-max bounds fitted on all pools together, with the reward weights and scope the table records. The LR,
HR and prompt of a pool's images come from the table (`lr_hr_table`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from dp2osr import tables
from dp2osr.math import bestm
from dp2osr.math.reward import joint_rewards
from dp2osr.mdtext import md_escape

SCORES_FILE = (
    "scores.parquet"  # raw metric values beside a pool's rewards.parquet (written by `dp2osr score`)
)
SEPARATE_SCALE = "hybrid reward, each pool min-max normalised separately: NOT comparable across pools"


class PoolOptions(Protocol):
    """The settings mode B reads (the fields of `dp2osr.evaluate.EvalConfig` with these names)."""

    pools: list[Path]
    pool_names: list[str]
    allow_separate_scales: bool
    reward_column: str
    ms: list[int]


def unique_labels(paths: list[Path], names: list[str], what: str, default) -> list[str]:
    """Labels for ``paths`` (the --sr folders or the --pools): ``names`` when given, else ``default(path)``."""
    if names and len(names) != len(paths):
        raise ValueError(f"got {len(names)} name(s) for {len(paths)} {what}; give one per {what[:-1]}")
    labels = list(names) if names else [default(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what} labels must be unique, got {labels}; pass explicit names")
    return labels


def find_rewards(p: Path) -> Path:
    """The rewards table ``p`` names (a file, or a folder holding rewards.parquet); missing: FileNotFoundError."""
    p = tables.table_path(tables.REWARDS, p)
    if not p.is_file():
        raise FileNotFoundError(f"rewards table not found: {p}")
    return p


def resolve_path(base: Path, value) -> Path | None:
    """A path stored in a table, relative to ``base`` unless absolute; None when empty or missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "":
        return None
    p = Path(str(value))
    return p if p.is_absolute() else base / p


def lr_hr_table(df: pd.DataFrame) -> dict[str, tuple[Path | None, Path | None, str]]:
    """``{image_id: (lr, hr, prompt)}`` from a rewards table (`tables.read`: absolute paths; a column the table
    lacks gives None / "")."""
    out: dict[str, tuple[Path | None, Path | None, str]] = {}
    for row in df.drop_duplicates("image_id").itertuples():
        lr, hr = getattr(row, "lr_path", ""), getattr(row, "hr_path", "")
        out[str(row.image_id)] = (
            Path(lr) if lr else None,
            Path(hr) if hr else None,
            getattr(row, "prompt", ""),
        )
    return out


def _reward_settings(meta: dict) -> tuple[float, float, str]:
    """``(w_fr, w_nr, scope)`` a pool was scored with, from its table's metadata (a table written without it:
    the defaults of `dp2osr score`)."""
    return float(meta.get("w_fr", 0.5)), float(meta.get("w_nr", 0.5)), str(meta.get("scope", "pool"))


def _joint(pools: dict[str, pd.DataFrame], paths: list[Path], metas: list[dict]) -> dict[str, pd.DataFrame]:
    """The tables with ``reward`` and ``norm_*`` recomputed from the raw scores under bounds fitted on all pools."""
    from dp2osr import metrics as metric_lib

    scores = {label: pd.read_parquet(p.parent / SCORES_FILE) for label, p in zip(pools, paths)}
    settings = {_reward_settings(meta) for meta in metas}
    if len(settings) > 1:
        raise ValueError(f"the pools were scored with different reward weights or scopes {sorted(settings)}")
    ((w_fr, w_nr, scope),) = settings
    if scope != "pool":
        raise ValueError(
            f"pools scored with --scope {scope} cannot be put on one scale; score them with --scope pool"
        )
    names = {label: tuple(sorted(set(s["metric"]))) for label, s in scores.items()}
    if len(set(names.values())) > 1:
        raise ValueError(f"the pools were scored with different metrics: {names}")
    catalogue = metric_lib.catalogue(list(next(iter(names.values()))))
    out = {}
    for label, new in joint_rewards(scores, catalogue, w_fr, w_nr).items():
        old = pools[label]
        keep = [c for c in old.columns if c != "reward" and not c.startswith("norm_")]
        out[label] = old[keep].merge(new, on=["image_id", "seed"], how="left")
    return out


def read_pools(
    paths: list[Path], labels: list[str], allow_separate: bool = False
) -> tuple[dict[str, pd.DataFrame], str]:
    """``({label: rewards table}, scale)``: with several pools, the hybrid reward recomputed on one scale from
    the raw scores beside each rewards.parquet (bounds fitted on all pools together); ``scale`` says which.

    Without the raw scores: a ValueError, or with ``allow_separate`` the tables as stored, labelled as
    normalised separately.
    """
    read = [tables.read(tables.REWARDS, p) for p in paths]
    pools = {label: df for label, (df, _) in zip(labels, read)}
    if len(paths) < 2:
        return pools, f"hybrid reward, min-max normalised over pool {labels[0]}"
    missing = [str(p.parent / SCORES_FILE) for p in paths if not (p.parent / SCORES_FILE).is_file()]
    if missing:
        if allow_separate:
            return pools, SEPARATE_SCALE
        raise ValueError(
            f"cannot put the pools on one scale: no raw scores {missing} (written by `dp2osr score` beside "
            "rewards.parquet); give pools scored by `dp2osr score`, or pass --allow-separate-scales to plot "
            "each pool on its own scale, labelled as such"
        )
    return _joint(
        pools, paths, [meta for _, meta in read]
    ), f"hybrid reward, min-max normalised jointly over pools {', '.join(labels)}"


def evaluate_pools(cfg: PoolOptions) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Mode B: ``(Best/Mean/Worst@M table, per-image spread table, scale)``; tables with a ``model`` column."""
    paths = [find_rewards(p) for p in cfg.pools]
    labels = unique_labels(paths, cfg.pool_names, "pools", lambda p: p.parent.name)
    pools, scale = read_pools(paths, labels, cfg.allow_separate_scales)
    if cfg.reward_column != "reward" and not cfg.reward_column.startswith("norm_"):
        scale = f"{cfg.reward_column}, as stored in each pool"
    tables, spreads = [], []
    for label, path in zip(labels, paths):
        df = pools[label]
        try:
            ids, seeds, mat = bestm.rewards_matrix(df, cfg.reward_column)
            ms = list(cfg.ms) or bestm.default_ms(len(seeds))
            stats = bestm.best_mean_worst(mat, ms)
        except ValueError as exc:
            raise ValueError(f"pool {label!r} ({path}): {exc}") from exc
        part = pd.DataFrame({k: stats[k] for k in ("m", "best", "mean", "worst")})
        part.insert(0, "model", label)
        part["n_images"], part["pool_size"] = len(ids), len(seeds)
        tables.append(part)
        spread = bestm.per_image_spread(df, cfg.reward_column)
        spread.insert(0, "model", label)
        spreads.append(spread)
    return pd.concat(tables, ignore_index=True), pd.concat(spreads, ignore_index=True), scale


def bestm_markdown(table: pd.DataFrame, spread: pd.DataFrame, column: str = "reward", scale: str = "") -> str:
    """Markdown tables of `evaluate_pools`: Best/Mean/Worst@M per model and M, then the per-image spread."""
    lines = [f"Best / Mean / Worst@M of {md_escape(column)} (first M seeds; mean over images)", ""]
    if scale:
        lines[-1:-1] = [f"Scale: {md_escape(scale)}."]
    lines += ["| model | M | Best@M | Mean@M | Worst@M |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {md_escape(r.model)} | {r.m} | {r.best:.4f} | {r.mean:.4f} | {r.worst:.4f} |")
    lines += ["", "Per-image spread over seeds (mean over images)", ""]
    lines += ["| model | images | seeds | std over seeds | max − min |", "|---|---|---|---|---|"]
    for model, part in spread.groupby("model", sort=False):
        lines.append(
            f"| {md_escape(model)} | {len(part)} | {int(part['n_seeds'].iloc[0])} | "
            f"{part['std'].mean():.4f} | {(part['max'] - part['min']).mean():.4f} |"
        )
    return "\n".join(lines) + "\n"
