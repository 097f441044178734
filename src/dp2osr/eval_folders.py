"""Mode A of the ``eval`` stage (`dp2osr.evaluate`): IQA tables of SR folders against an HR folder.

PSNR and SSIM follow the Real-ISR convention (the one that reproduces published RealSR numbers, e.g.
OSEDiff's 25.15 dB / 0.7341): both on the Y channel of YCbCr (ITU-R BT.601 for 8-bit RGB,
``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with RGB in [0, 1]). PSNR uses the unrounded Y scaled to
[0, 1] (``10 log10(1 / (MSE + 1e-8))``); SSIM rounds Y to integers 0..255 (as MATLAB does) and uses an
11×11 Gaussian window (σ = 1.5), 'valid' filtering, no downsampling, in float64. These are numerically
pyiqa's ``psnr`` / ``ssim`` with ``test_y_channel=True, color_space='ycbcr'`` (checked by the tests), but
computed in NumPy so 100 images take seconds instead of minutes. Note that pyiqa's *default* ``psnry`` and
``ssim`` use the YIQ luma instead, which gives different numbers (23.83 dB / 0.7073 for OSEDiff).

SR and HR files are matched by file stem (optionally mapped by a regex); an SR folder is either image files
or a `dp2osr upscale` / `sample` output (NAME/seed_XXXX.png, each seed its own set).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from dp2osr.eval_pools import unique_labels
from dp2osr.images import IMAGE_SUFFIXES, ImageReadError, list_images, load_image
from dp2osr.math.quality import psnr_y, ssim_y
from dp2osr.mdtext import md_escape

BUILTIN = ("psnr", "ssim")


class FolderOptions(Protocol):
    """The settings mode A reads (the fields of `dp2osr.evaluate.EvalConfig` with these names)."""

    sr: list[Path]
    sr_seed: int | None
    names: list[str]
    hr: Path | None
    metrics: list[str]
    crop_border: int
    name_pattern: str | None
    name_replace: str
    device: str
    weights_dir: Path | None


def _crop(t, border: int):
    return t[..., border:-border, border:-border] if border > 0 else t


def _pyiqa_metrics(names: list[str], cfg: FolderOptions, have_hr: bool) -> tuple[dict, dict[str, str]]:
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
    sr_dir: Path,
    hr_dir: Path,
    pattern: str | None = None,
    replace: str = "",
    items: list[tuple[str, Path]] | None = None,
) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``([(name, sr_path, hr_path)], problems)``: SR files matched to HR files by (mapped) stem.

    ``items`` (``[(stem, path)]``) replaces the image files of ``sr_dir`` (e.g. one seed of a seed layout).
    An SR file without an HR file and an HR file without an SR file are problems (by name).
    """
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
        pairs.append(
            (sp.relative_to(sr_dir).as_posix() if items is not None else sp.name, sp, hr_by_stem[stem])
        )
    for stem in sorted(set(hr_by_stem) - used):
        problems.append(f"missing SR: HR {hr_by_stem[stem].name} has no SR file in {sr_dir}")
    return pairs, problems


# ---------------------------------------------------------------------------------------- SR sets
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
    if not folder.is_dir() or any(
        p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()
    ):
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


def _score_image(name: str, sp: Path, hp: Path | None, cfg: FolderOptions, iqa: dict) -> dict | str:
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


def _evaluate_set(
    label: str, folder: Path, items, cfg: FolderOptions, iqa: dict
) -> tuple[list[dict], list[str]]:
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


def evaluate_folders(cfg: FolderOptions) -> tuple[pd.DataFrame, dict, list[str]]:
    """Mode A: ``(per-image table, summary dict, problems)``."""
    labels = unique_labels(cfg.sr, cfg.names, "SR folders", lambda p: Path(p).name)
    sets = [
        (lab, Path(folder), items)
        for label, folder in zip(labels, cfg.sr)
        for lab, items in sr_sets(folder, label, cfg.sr_seed)
    ]
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


def _protocol(cfg: FolderOptions) -> dict:
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
        cells = [md_escape(label), str(entry["n_images"])]
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
        lines += [
            "",
            f"**{len(summary['problems'])} problem(s)**:",
            *[f"- {md_escape(p)}" for p in summary["problems"]],
        ]
    return "\n".join(lines) + "\n"
