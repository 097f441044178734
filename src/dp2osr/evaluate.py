"""The ``eval`` stage: IQA tables for SR folders, Best/Mean/Worst@M of candidate pools, reward curves.

PSNR and SSIM follow the Real-ISR convention (the one that reproduces published RealSR numbers, e.g.
OSEDiff's 25.15 dB / 0.7341): both on the Y channel of YCbCr (ITU-R BT.601 for 8-bit RGB,
``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with RGB in [0, 1]). PSNR uses the unrounded Y scaled to
[0, 1] (``10 log10(1 / (MSE + 1e-8))``); SSIM rounds Y to integers 0..255 (as MATLAB does) and uses an
11×11 Gaussian window (σ = 1.5), 'valid' filtering, no downsampling, in float64. These are numerically
pyiqa's ``psnr`` / ``ssim`` with ``test_y_channel=True, color_space='ycbcr'`` (checked by the tests), but
computed in NumPy so 100 images take seconds instead of minutes. Note that pyiqa's *default* ``psnry`` and
``ssim`` use the YIQ luma instead, which gives different numbers (23.83 dB / 0.7073 for OSEDiff).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dp2osr import plots
from dp2osr.config import field, to_dict
from dp2osr.errors import PartialFailure
from dp2osr.images import IMAGE_SUFFIXES, ImageReadError, list_images, load_image
from dp2osr.math import bestm
from dp2osr.math.quality import psnr_y, ssim_y
from dp2osr.math.reward import joint_rewards
from dp2osr.mdtext import md_escape
from dp2osr.paths import check_output_dir

PER_IMAGE_CSV = "eval_per_image.csv"
SUMMARY_JSON = "eval_summary.json"
SUMMARY_MD = "eval_summary.md"
BESTM_CSV = "bestm.csv"
BESTM_MD = "bestm.md"
BESTM_PNG = "bestm.png"
SPREAD_CSV = "pool_spread.csv"
CURVE_PNG = "reward_curve.png"
CONFIG_JSON = "eval_config.json"
SCORES_FILE = "scores.parquet"  # raw metric values beside a pool's rewards.parquet (written by `dp2osr score`)
SCORE_CONFIG = "score_config.yaml"  # the reward weights and scope it was scored with
SEPARATE_SCALE = "hybrid reward, each pool min-max normalised separately: NOT comparable across pools"

# pyiqa metrics that run offline without weights and are cheap on CPU (512 px: gmsd 9, fsim 80, piqe 23 ms).
DEFAULT_METRICS = ["gmsd", "fsim", "piqe"]
BUILTIN = ("psnr", "ssim")


@dataclass
class EvalConfig:
    """Evaluate super-resolution results.

    A) --sr FOLDER [FOLDER ...] [--hr FOLDER]: per-image and mean ± std tables of PSNR/SSIM (Y channel of
       YCbCr, Real-ISR convention) and pyiqa --metrics; SR and HR are matched by file stem (see
       --name-pattern). A missing or size-mismatched pair is reported by name and the exit status is 1.
    B) --pools rewards.parquet [...]: Best/Mean/Worst@M table and plot, per-image spread over seeds.
    C) --reward-curve TABLE: (step, reward[, metric ...]) CSV/Parquet -> PNG line plot.
    Any combination may be given in one call; everything is written to --output.
    """

    output: Path = field(help="output folder for tables (CSV/JSON/Markdown) and plots (PNG)")
    sr: list[Path] = field(
        [],
        help="SR result folder(s) to evaluate (mode A): image files, or a `dp2osr upscale` / `sample` output "
        "(NAME/seed_XXXX.png: each seed is evaluated as its own set, or only --sr-seed)",
    )
    sr_seed: int | None = field(
        None, help="for --sr folders of NAME/seed_XXXX.png: evaluate only this seed (default: every seed)"
    )
    names: list[str] = field([], help="labels for the --sr folders; empty = the folder names")
    hr: Path | None = field(None, help="HR (ground-truth) folder; without it only no-reference metrics run")
    metrics: list[str] = field(
        DEFAULT_METRICS,
        help="pyiqa metric names besides PSNR/SSIM (which always run when --hr is given; "
        "'none' = no others); metrics needing weights must find them in --weights-dir or pyiqa's cache",
    )
    crop_border: int = field(0, help="pixels cropped from each border of SR and HR before every metric")
    name_pattern: str | None = field(None, help="regex applied to SR file stems to get the HR stem")
    name_replace: str = field("", help="replacement for --name-pattern (re.sub syntax, e.g. '\\1')")
    device: str = field("auto", help="device for pyiqa metrics: auto, cpu, cuda, cuda:1, ...")
    weights_dir: Path | None = field(None, help="folder of IQA weight files (else pyiqa's torch-hub cache)")
    pools: list[Path] = field([], help="rewards.parquet file(s) (or folders holding one) of candidate pools")
    pool_names: list[str] = field([], help="labels for the --pools; empty = their parent folder names")
    allow_separate_scales: bool = field(
        False,
        help="with several --pools whose raw scores (scores.parquet beside rewards.parquet) are missing, plot "
        "each pool's own min-max normalised reward, labelled as not comparable (default: refuse). With the "
        "raw scores, every pool's reward is recomputed with bounds fitted on all pools together",
    )
    reward_column: str = field("reward", help="column of rewards.parquet used for Best/Mean/Worst@M")
    ms: list[int] = field([], help="values of M; empty = 1, 2, 4, ... up to the pool size")
    reward_curve: Path | None = field(None, help="table with columns step, reward[, more] to plot (mode C)")
    curve_smooth: int = field(1, help="moving-average window for the reward curve plot (1 = raw)")










def _crop(t, border: int):
    return t[..., border:-border, border:-border] if border > 0 else t


def _pyiqa_metrics(names: list[str], cfg: EvalConfig, have_hr: bool) -> tuple[dict, dict[str, str]]:
    """Build the metrics from local files (``dp2osr.metrics``): ``({name: (spec, model)}, skipped)``.

    An unknown metric or missing weights is a ValueError naming it; nothing is skipped silently (a
    full-reference metric without ``--hr`` is listed in ``skipped`` with the reason).
    """
    wanted = [m for m in dict.fromkeys(names) if m.lower() not in (*BUILTIN, "none")]
    if not wanted:
        return {}, {}
    from dp2osr import metrics as catalogue

    out, skipped = {}, {}
    for name, spec in catalogue.catalogue(wanted).items():
        if spec.family == "fr" and not have_hr:
            skipped[name] = "full-reference metric, but no --hr folder was given"
            continue
        out[name] = (spec, catalogue.create(name, cfg.device, cfg.weights_dir))
    return out, skipped


# -------------------------------------------------------------------------------------------- matching
def match_pairs(
    sr_dir: Path, hr_dir: Path, pattern: str | None = None, replace: str = "",
    items: list[tuple[str, Path]] | None = None,
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``([(name, sr_path, hr_path)], problems)``: SR files matched to HR files by (mapped) stem.

    ``items`` (``[(stem, path)]``) replaces the image files of ``sr_dir`` (e.g. one seed of a seed layout).
    An SR file without an HR file and an HR file without an SR file are problems (by name).
    """  # fmt: skip
    try:
        rx = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise ValueError(f"--name-pattern {pattern!r} is not a valid regex: {exc}") from exc
    hr_by_stem: dict[str, Path] = {}
    for p in list_images(hr_dir):
        if p.stem in hr_by_stem:
            raise ValueError(
                f"HR folder {hr_dir} has two files with stem {p.stem!r}: {hr_by_stem[p.stem].name}, {p.name}"
            )
        hr_by_stem[p.stem] = p
    pairs, problems, used = [], [], set()
    for sr_stem, sp in items if items is not None else [(p.stem, p) for p in list_images(sr_dir)]:
        stem = rx.sub(replace, sr_stem) if rx else sr_stem
        shown = f"{Path(sr_dir).name}/{sp.relative_to(sr_dir).as_posix() if items is not None else sp.name}"
        if stem not in hr_by_stem:
            problems.append(f"missing HR: {shown} has no HR file with stem {stem!r} in {hr_dir}")
            continue
        if stem in used:
            problems.append(f"ambiguous: several SR files in {sr_dir} map to HR stem {stem!r}")
            continue
        used.add(stem)
        pairs.append((sp.relative_to(sr_dir).as_posix() if items is not None else sp.name, sp, hr_by_stem[stem]))
    for stem in sorted(set(hr_by_stem) - used):
        problems.append(f"missing SR: HR {hr_by_stem[stem].name} has no SR file in {sr_dir}")
    return pairs, problems


# ------------------------------------------------------------------------------------------ mode A
SEED_FILE = re.compile(r"^seed_(\d+)\.png$")


def seed_layout(folder: Path) -> dict[int, list[tuple[str, Path]]]:
    """``{seed: [(NAME, NAME/seed_XXXX.png)]}`` of a `dp2osr upscale` / `sample` output folder (empty if none)."""
    out: dict[int, list[tuple[str, Path]]] = {}
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        for f in sorted(sub.iterdir()):
            m = SEED_FILE.match(f.name)
            if m and f.is_file():
                out.setdefault(int(m.group(1)), []).append((sub.name, f))
    return out


def sr_sets(folder: Path, label: str, seed: int | None) -> list[tuple[str, list[tuple[str, Path]] | None]]:
    """The image sets of one --sr folder: ``[(label, items)]``; items None = the folder's image files, else
    ``[(stem, path)]`` of one seed of a NAME/seed_XXXX.png layout (label ``LABEL seed N`` when it has several)."""
    folder = Path(folder)
    if not folder.is_dir() or any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        return [(label, None)]  # an image file, or a folder of images (list_images reports a missing one)
    seeds = seed_layout(folder)
    if not seeds:
        raise ValueError(
            f"no images in SR folder {folder}: expected image files ({', '.join(IMAGE_SUFFIXES)}) or "
            "NAME/seed_XXXX.png subfolders (the output of dp2osr upscale / sample)"
        )
    if seed is not None:
        if seed not in seeds:
            raise ValueError(f"--sr-seed {seed}: {folder} holds seeds {sorted(seeds)} only")
        return [(label, seeds[seed])]
    if len(seeds) == 1:
        return [(label, next(iter(seeds.values())))]
    return [(f"{label} seed {s}", items) for s, items in sorted(seeds.items())]


def unique_labels(paths: list[Path], names: list[str], what: str, default) -> list[str]:
    if names and len(names) != len(paths):
        raise ValueError(f"got {len(names)} name(s) for {len(paths)} {what}; give one per {what[:-1]}")
    labels = list(names) if names else [default(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{what} labels must be unique, got {labels}; pass explicit names")
    return labels


def _score_image(name: str, sp: Path, hp: Path | None, cfg: EvalConfig, iqa: dict) -> dict | str:
    """One SR image's row of metrics, or the problem (a string) that kept it out."""
    try:
        sr_t = _crop(load_image(sp), cfg.crop_border)
        hr_t = _crop(load_image(hp), cfg.crop_border) if hp is not None else None
    except ImageReadError as exc:
        return f"unreadable: {exc}"
    if hr_t is not None and sr_t.shape != hr_t.shape:
        return (
            f"size mismatch: SR {name} is {sr_t.shape[-1]}x{sr_t.shape[-2]}, "
            f"HR {hp.name} is {hr_t.shape[-1]}x{hr_t.shape[-2]}"
        )
    row = {"image": name, "sr_path": str(sp), "hr_path": str(hp or "")}
    try:
        if hr_t is not None:
            sr_np = sr_t[0].permute(1, 2, 0).double().numpy()
            hr_np = hr_t[0].permute(1, 2, 0).double().numpy()
            row["psnr"], row["ssim"] = psnr_y(sr_np, hr_np), ssim_y(sr_np, hr_np)
        if iqa:
            from dp2osr.metrics import score_batch
        for mname, (spec, model) in iqa.items():
            if min(sr_t.shape[-2:]) < spec.min_size:
                raise ValueError(f"{mname} needs a short side >= {spec.min_size} px")
            ref = hr_t if spec.family == "fr" else None
            row[mname] = float(score_batch(model, sr_t, ref)[0])
    except (ValueError, RuntimeError) as exc:
        return f"{name}: metric failed: {exc}"
    return row


def _evaluate_set(label: str, folder: Path, items, cfg: EvalConfig, iqa: dict) -> tuple[list[dict], list[str]]:
    """Rows and problems of one SR set (a folder's images, or ``items`` of one seed)."""
    problems = []
    if cfg.hr is not None:
        pairs, probs = match_pairs(folder, Path(cfg.hr), cfg.name_pattern, cfg.name_replace, items)
        problems += [f"[{label}] {p}" for p in probs]
    elif items is not None:
        pairs = [(path.relative_to(folder).as_posix(), path, None) for _, path in items]
    else:
        pairs = [(p.name, p, None) for p in list_images(folder)]
    print(f"eval: {label}: {len(pairs)} image(s)", file=sys.stderr)
    rows = []
    for name, sp, hp in pairs:
        row = _score_image(name, sp, hp, cfg, iqa)
        if isinstance(row, str):
            problems.append(f"[{label}] {row}")
        else:
            rows.append({"model": label, **row})
    return rows, problems


def evaluate_folders(cfg: EvalConfig) -> tuple[pd.DataFrame, dict, list[str]]:
    """Mode A: ``(per-image table, summary dict, problems)``."""
    labels = unique_labels(cfg.sr, cfg.names, "SR folders", lambda p: Path(p).name)
    sets = [(lab, Path(folder), items) for label, folder in zip(labels, cfg.sr)
            for lab, items in sr_sets(folder, label, cfg.sr_seed)]  # fmt: skip
    have_hr = cfg.hr is not None
    if have_hr and not Path(cfg.hr).is_dir():
        raise FileNotFoundError(f"HR folder not found: {cfg.hr}")
    iqa, skipped = _pyiqa_metrics(cfg.metrics, cfg, have_hr)
    if not have_hr:
        skipped.update({m: "no --hr folder was given" for m in BUILTIN})
    for name, why in skipped.items():
        print(f"eval: skipping metric {name}: {why}", file=sys.stderr)
    rows, problems = [], []
    for label, folder, items in sets:
        r, p = _evaluate_set(label, folder, items, cfg, iqa)
        rows += r
        problems += p
    metric_cols = ([*BUILTIN] if have_hr else []) + list(iqa)
    table = pd.DataFrame(rows, columns=["model", "image", "sr_path", "hr_path", *metric_cols])
    info = {m: {"higher_better": True, "mode": "FR"} for m in (BUILTIN if have_hr else ())}
    info.update(
        {m: {"higher_better": not sp.lower_better, "mode": sp.family.upper()} for m, (sp, _) in iqa.items()}
    )
    models = {}
    for label, folder, _ in sets:
        part = table[table["model"] == label]
        stats = {
            m: {"mean": float(part[m].mean()), "std": float(part[m].std(ddof=0)), "n": int(part[m].count())}
            for m in metric_cols
            if len(part)
        }
        models[label] = {"sr": str(folder), "n_images": len(part), "metrics": stats}
    summary = {
        "models": models,
        "metrics": info,
        "skipped_metrics": skipped,
        "problems": problems,
        "protocol": _protocol(cfg),
    }
    return table, summary, problems


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _protocol(cfg: EvalConfig) -> dict:
    y_def = "BT.601 Y = 16 + 65.481 R + 128.553 G + 24.966 B (RGB in [0, 1], 8-bit studio range 16..235)"
    return {
        "y_channel": y_def,
        "psnr": "PSNR on unrounded Y / 255, 10*log10(1/(MSE + 1e-8)); = pyiqa psnr(test_y_channel=True, "
        "color_space='ycbcr')",
        "ssim": "SSIM on Y rounded to integers 0..255, Gaussian window 11x11 sigma 1.5, 'valid' filtering, "
        "no downsampling, float64; = pyiqa ssim(test_y_channel=True, color_space='ycbcr', downsample=False)",
        "other_metrics": "pyiqa create_metric(name) defaults (dp2osr.metrics, local weights), RGB in [0, 1]",
        "crop_border": int(cfg.crop_border),
        "std": "population std over images (ddof=0)",
        "matching": f"SR stem -> HR stem via re.sub({cfg.name_pattern!r}, {cfg.name_replace!r})"
        if cfg.name_pattern
        else "same file stem",
        "pyiqa": _version("pyiqa"),
        "torch": _version("torch"),
        "numpy": np.__version__,
    }


def summary_markdown(summary: dict) -> str:
    """A Markdown table: one row per model, ``mean ± std`` per metric (arrow = better direction)."""
    metrics = list(summary["metrics"])
    head = ["model", "n"] + [
        f"{m.upper()} {'↑' if summary['metrics'][m]['higher_better'] else '↓'}" for m in metrics
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, entry in summary["models"].items():
        cells = [_md(label), str(entry["n_images"])]
        for m in metrics:
            s = entry["metrics"].get(m)
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s and s["n"] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    proto = summary["protocol"]
    lines += [
        "",
        f"PSNR/SSIM: {proto['y_channel']}; crop border {proto['crop_border']}; mean ± {proto['std']}.",
        f"pyiqa {proto['pyiqa']}, torch {proto['torch']}.",
    ]
    if summary["problems"]:
        lines += ["", f"**{len(summary['problems'])} problem(s)**:", *[f"- {_md(p)}" for p in summary["problems"]]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ mode B
def find_rewards(p: Path) -> Path:
    p = Path(p)
    if p.is_dir():
        p = p / "rewards.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"rewards table not found: {p}")
    return p


def _reward_settings(folder: Path) -> tuple[float, float, str]:
    """``(w_fr, w_nr, scope)`` a pool was scored with (its score_config.yaml; the defaults without one)."""
    path = folder / SCORE_CONFIG
    data = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return float(data.get("w_fr", 0.5)), float(data.get("w_nr", 0.5)), str(data.get("scope", "pool"))


def _joint(tables: dict[str, pd.DataFrame], paths: list[Path]) -> dict[str, pd.DataFrame]:
    """The tables with ``reward`` and ``norm_*`` recomputed from the raw scores under bounds fitted on all pools."""
    from dp2osr import metrics as metric_lib

    scores = {label: pd.read_parquet(p.parent / SCORES_FILE) for label, p in zip(tables, paths)}
    settings = {_reward_settings(p.parent) for p in paths}
    if len(settings) > 1:
        raise ValueError(f"the pools were scored with different reward weights or scopes {sorted(settings)}")
    (w_fr, w_nr, scope), = settings
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
        old = tables[label]
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
    tables = {label: pd.read_parquet(p) for label, p in zip(labels, paths)}
    if len(paths) < 2:
        return tables, f"hybrid reward, min-max normalised over pool {labels[0]}"
    missing = [str(p.parent / SCORES_FILE) for p in paths if not (p.parent / SCORES_FILE).is_file()]
    if missing:
        if allow_separate:
            return tables, SEPARATE_SCALE
        raise ValueError(
            f"cannot put the pools on one scale: no raw scores {missing} (written by `dp2osr score` beside "
            "rewards.parquet); give pools scored by `dp2osr score`, or pass --allow-separate-scales to plot "
            "each pool on its own scale, labelled as such"
        )
    return _joint(tables, paths), f"hybrid reward, min-max normalised jointly over pools {', '.join(labels)}"


def evaluate_pools(cfg: EvalConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
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


def _md(text) -> str:
    return md_escape(text)


def bestm_markdown(table: pd.DataFrame, spread: pd.DataFrame, column: str = "reward", scale: str = "") -> str:
    lines = [f"Best / Mean / Worst@M of {_md(column)} (first M seeds; mean over images)", ""]
    if scale:
        lines[-1:-1] = [f"Scale: {_md(scale)}."]
    lines += ["| model | M | Best@M | Mean@M | Worst@M |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {_md(r.model)} | {r.m} | {r.best:.4f} | {r.mean:.4f} | {r.worst:.4f} |")
    lines += ["", "Per-image spread over seeds (mean over images)", ""]
    lines += ["| model | images | seeds | std over seeds | max − min |", "|---|---|---|---|---|"]
    for model, part in spread.groupby("model", sort=False):
        lines.append(
            f"| {_md(model)} | {len(part)} | {int(part['n_seeds'].iloc[0])} | "
            f"{part['std'].mean():.4f} | {(part['max'] - part['min']).mean():.4f} |"
        )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main
def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(cfg: EvalConfig) -> None:
    """Run every mode whose inputs are given; raises `PartialFailure` (after writing every table) when image
    pairs were missing or mismatched."""
    if not (cfg.sr or cfg.pools or cfg.reward_curve):
        raise ValueError("nothing to evaluate: give --sr (with --hr), --pools and/or --reward-curve")
    if cfg.crop_border < 0:
        raise ValueError(f"--crop-border must be >= 0, got {cfg.crop_border}")
    out = Path(cfg.output)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / CONFIG_JSON, json.dumps(to_dict(cfg), indent=2, default=str))
    problems: list[str] = []
    if cfg.sr:
        table, summary, problems = evaluate_folders(cfg)
        tmp = out / f".tmp_{os.getpid()}_{PER_IMAGE_CSV}"
        table.to_csv(tmp, index=False, float_format="%.6f")
        os.replace(tmp, out / PER_IMAGE_CSV)
        _write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2))
        _write_text(out / SUMMARY_MD, summary_markdown(summary))
        print(summary_markdown(summary))
        for p in problems:
            print(f"eval: problem: {p}", file=sys.stderr)
    if cfg.pools:
        table, spread, scale = evaluate_pools(cfg)
        table["scale"] = scale
        table.to_csv(out / BESTM_CSV, index=False, float_format="%.6f")
        spread.to_csv(out / SPREAD_CSV, index=False, float_format="%.6f")
        text = bestm_markdown(table, spread, cfg.reward_column, scale)
        _write_text(out / BESTM_MD, text)
        plots.write_png(plots.plot_bestm(table, "Best / Mean / Worst@M", ylabel=scale), out / BESTM_PNG)
        print(text)
    if cfg.reward_curve:
        curve = plots.read_table(Path(cfg.reward_curve))
        plots.write_png(plots.plot_curve(curve, smooth=max(1, cfg.curve_smooth)), out / CURVE_PNG)
    print(f"eval: outputs in {out}", file=sys.stderr)
    if problems:
        raise PartialFailure(f"{len(problems)} problem(s) with the image pairs (reported above)")
