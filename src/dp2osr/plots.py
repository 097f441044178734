"""Plots for ``eval`` and ``report``: Best/Mean/Worst@M of several models, reward curves. PNG bytes out.

matplotlib is used headless (Agg) and imported lazily; each function returns the PNG as bytes so callers can
write a file (``write_png``) or embed it in HTML.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from dp2osr.images import atomic_write

_STYLES = {"best": "-", "mean": "--", "worst": ":"}
_MARKERS = {"best": "^", "mean": "o", "worst": "v"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def write_png(data: bytes, path: Path) -> None:
    """Write PNG bytes atomically (`images.atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def plot_bestm(table: pd.DataFrame, title: str = "Best / Mean / Worst@M", ylabel: str = "") -> bytes:
    """One figure, all models: colour = model, line style = statistic, x = M on a log2 axis.

    ``table`` has columns ``model, m, best, mean, worst`` (as written by ``eval`` to ``bestm.csv``);
    ``ylabel`` names the reward's scale (e.g. normalised jointly over which pools).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, part) in enumerate(table.groupby("model", sort=False)):
        part = part.sort_values("m")
        for stat in ("best", "mean", "worst"):
            ax.plot(
                part["m"],
                part[stat],
                linestyle=_STYLES[stat],
                marker=_MARKERS[stat],
                color=colours[i % len(colours)],
                label=f"{model} {stat.capitalize()}@M",
            )
    ms = sorted({int(m) for m in table["m"]})
    if ms and max(ms) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ms)
    ax.set_xticklabels([str(m) for m in ms])
    ax.set_xlabel("M (samples per image: the first M seeds)")
    ax.set_ylabel(
        textwrap.fill(f"{ylabel or 'reward'} (mean over images)", 45), fontsize=8 if ylabel else None
    )
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=max(1, table["model"].nunique()), loc="best")
    return _to_png(fig)


def plot_curve(
    df: pd.DataFrame, smooth: int = 1, max_panels: int = 6, title: str = "Training curve"
) -> bytes:
    """Line plot of ``reward`` (and any other numeric columns, one panel each) against ``step``.

    ``smooth`` > 1 overlays a centred moving average of that many points over the raw (faint) line. The
    reward panel shades the evaluation noise, so a change inside it does not read as a trend: ±1.96
    ``reward_se`` (the seed-to-seed standard error of Mean@M, when the table has it) and the Worst@M to
    Best@M range (when it has ``best`` and ``worst``). ``reward_se`` gets no panel of its own.
    """
    if "step" not in df.columns or "reward" not in df.columns:
        raise ValueError(f"a reward curve needs columns 'step' and 'reward'; got {list(df.columns)}")
    df = df.sort_values("step")
    skip = ("step", "reward", "reward_se")
    extra = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    cols = ["reward", *extra][:max_panels]
    plt = _pyplot()
    fig, axes = plt.subplots(len(cols), 1, figsize=(7, 2.6 * len(cols) + 0.6), sharex=True, squeeze=False)
    for ax, col in zip(axes[:, 0], cols):
        y = df[col].to_numpy(dtype=np.float64)
        x = df["step"].to_numpy()
        if smooth > 1 and len(y) >= smooth:
            ax.plot(x, y, color="C0", alpha=0.3, linewidth=1)
            ys = pd.Series(y).rolling(smooth, center=True, min_periods=1).mean()
            ax.plot(x, ys, color="C0", linewidth=2, label=f"{col} (moving average, {smooth})")
            ax.legend(fontsize=8)
        else:
            ax.plot(x, y, color="C0", marker="o" if len(y) <= 30 else None, linewidth=1.5)
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
    _noise_bands(axes[0, 0], df)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    return _to_png(fig)


def plot_pref_accuracy(df: pd.DataFrame, title: str = "Preference accuracy against the reference") -> bytes:
    """Accuracy against ``step``, one line per ``set`` of pairs (held-out, training), each shaded with its
    interval (``lo`` to ``hi``); a dashed line at 0.5, the share a policy without a preference scores."""
    missing = {"step", "set", "accuracy", "lo", "hi"} - set(df.columns)
    if missing:
        raise ValueError(
            f"a preference-accuracy table needs columns {sorted(missing)}; got {list(df.columns)}"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for n, (name, part) in enumerate(df.sort_values("step").groupby("set", sort=True)):
        x = part["step"].to_numpy()
        lo, hi = part["lo"].to_numpy(np.float64), part["hi"].to_numpy(np.float64)
        ax.fill_between(x, lo, hi, color=f"C{n}", alpha=0.2)
        ax.plot(x, part["accuracy"], color=f"C{n}", marker="o", label=f"{name} pairs (band: 95% interval)")
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("share of pairs with Δ < 0")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _to_png(fig)


def _noise_bands(ax, df: pd.DataFrame) -> None:
    """Shade the reward panel's noise: Worst@M..Best@M and Mean@M ± 1.96 seed-to-seed standard errors."""
    x = df["step"].to_numpy()
    shaded = False
    if {"best", "worst"} <= set(df.columns):
        ax.fill_between(x, df["worst"], df["best"], color="C0", alpha=0.08, label="Worst@M to Best@M")
        shaded = True
    if "reward_se" in df.columns and df["reward_se"].notna().any():
        y, se = df["reward"].to_numpy(dtype=np.float64), df["reward_se"].to_numpy(dtype=np.float64)
        ax.fill_between(
            x,
            y - 1.96 * se,
            y + 1.96 * se,
            color="C0",
            alpha=0.25,
            label="±1.96 s.e. over seeds (evaluation noise)",
        )
        shaded = True
    if shaded:
        ax.legend(fontsize=8)


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table, chosen by suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    raise ValueError(f"{path}: expected a .csv, .tsv or .parquet table")
