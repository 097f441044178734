"""The ``report`` stage: one self-contained HTML page of results (no network, no external files).

Everything is embedded: images and plots as base64 ``data:`` URIs, CSS and a few lines of JS inline. The page
holds the ``eval`` tables (from ``--eval-dirs``), the Best/Mean/Worst@M plot (computed from ``--pools``, or
taken from an eval folder), the reward curve, and per-image comparisons: LR, then each pool's best and worst
seed, then HR, with a before/after slider to compare any two of them. Every file name, model name and prompt
is HTML-escaped. Images are downscaled to ``--max-side`` and re-encoded (JPEG by default) to keep the page
small.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dp2osr import eval_pools, evaluate, plots, tables
from dp2osr.config import check_choices, data_root_field, field, to_dict
from dp2osr.engine.pool_store import exists, read_image
from dp2osr.images import IMAGE_SUFFIXES, ImageReadError, atomic_write, to_uint8
from dp2osr.math import bestm
from dp2osr.math.change import NOISE_METHOD, change_sentence, pool_change
from dp2osr.paths import check_output_file


@dataclass
class ReportConfig:
    """Write one self-contained HTML page of results (tables, plots, per-image comparisons with a slider).

    Inputs are all optional but at least one is needed: --eval-dirs (outputs of `dp2osr eval`), --pools
    (rewards.parquet of candidate pools, e.g. base model then DP²O model) and --reward-curve.
    """

    output: Path = field(help="HTML file to write (a folder gets report.html inside)")
    eval_dirs: list[Path] = field(
        [], help="output folders of `dp2osr eval` whose tables and plots to include"
    )
    pools: list[Path] = field(
        [], help="rewards.parquet file(s) (or folders holding one), e.g. base then DP²O"
    )
    names: list[str] = field([], help="labels for the --pools; empty = their parent folder names")
    allow_separate_scales: bool = field(
        False,
        help="with several --pools whose raw scores (scores.parquet beside rewards.parquet) are missing, show "
        "each pool's own min-max normalised reward, labelled as not comparable (default: refuse). With the "
        "raw scores, every pool's reward is recomputed with bounds fitted on all pools together",
    )
    reward_column: str = field("reward", help="rewards.parquet column that ranks seeds (best/worst)")
    reward_curve: Path | None = field(None, help="table with columns step, reward[, more] to plot")
    pref_accuracy: Path | None = field(
        None,
        help="pref_accuracy.csv (of `train --heldout-pairs` or the quickstart): preference accuracy against the "
        "reference over steps, held-out vs training pairs, with intervals",
    )
    lr_dir: Path | None = field(
        None, help="LR folder (files named IMAGE_ID.*), if the pools do not record it"
    )
    hr_dir: Path | None = field(
        None, help="HR folder (files named IMAGE_ID.*), if the pools do not record it"
    )
    max_images: int = field(6, help="number of images in the per-image comparison")
    select: str = field(
        "first",
        help="which images to show: first (by id) or gain (largest mean-reward gain, last pool vs first)",
        choices=["first", "gain"],
    )
    max_side: int = field(384, help="images are downscaled to at most this many pixels per side")
    image_format: str = field("jpeg", help="encoding of embedded images", choices=["jpeg", "png"])
    title: str = field("DP²O-SR results", help="page title")
    data_root: list[Path] = data_root_field()

    def __post_init__(self) -> None:
        check_choices(self)


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_uri(path: Path, max_side: int, fmt: str = "jpeg") -> str:
    """An image file as a ``data:`` URI, downscaled (Lanczos) so neither side exceeds ``max_side``."""
    im = Image.fromarray(to_uint8(read_image(path)))
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", optimize=True)
        return _data_uri(buf.getvalue(), "image/png")
    im.save(buf, format="JPEG", quality=90)
    return _data_uri(buf.getvalue(), "image/jpeg")


# ------------------------------------------------------------------------------------------ pools
def _find_by_stem(folder: Path | None, stem: str) -> Path | None:
    if folder is None:
        return None
    for suffix in IMAGE_SUFFIXES:
        p = Path(folder) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _pool(table_path: Path, df: pd.DataFrame, column: str) -> dict:
    for col in ("image_id", "seed", "path", column):
        if col not in df.columns:
            raise ValueError(f"{table_path}: no column {col!r}; columns: {list(df.columns)}")
    return {"path": table_path, "df": df, "lrhr": eval_pools.lr_hr_table(df)}


def read_pools(cfg: ReportConfig) -> tuple[list[dict], list[str], str]:
    """``(pools, labels, scale)``: the --pools on one scale (`eval_pools.read_pools`)."""
    paths = [eval_pools.find_rewards(p) for p in cfg.pools]
    labels = eval_pools.unique_labels(paths, cfg.names, "pools", lambda p: p.parent.name)
    tables, scale = eval_pools.read_pools(paths, labels, cfg.allow_separate_scales)
    if cfg.reward_column != "reward" and not cfg.reward_column.startswith("norm_"):
        scale = f"{cfg.reward_column}, as stored in each pool"
    return [_pool(p, tables[label], cfg.reward_column) for p, label in zip(paths, labels)], labels, scale


# ------------------------------------------------------------------------------------- the verdict
def verdict_html(
    before: pd.DataFrame, after: pd.DataFrame, labels: tuple[str, str], column: str = "reward"
) -> str:
    """The change sentence as an HTML paragraph whose tooltip explains the noise figure ('' if not comparable)."""
    try:
        change = pool_change(before, after, column)
    except ValueError:
        return ""
    text = change_sentence(change, labels[0], labels[1])
    return f'<p class="verdict" title="{_esc(NOISE_METHOD)}">{_esc(text)}</p>'


def _choose_images(pools: list[dict], cfg: ReportConfig) -> tuple[list[str], int]:
    """The image ids to show, and how many images every pool has (the ones that could be shown)."""
    sets = [set(p["df"]["image_id"].astype(str)) for p in pools]
    common = sorted(set.intersection(*sets))
    if cfg.select == "gain" and len(pools) >= 2:
        means = [p["df"].groupby("image_id")[cfg.reward_column].mean() for p in (pools[0], pools[-1])]
        common.sort(key=lambda i: -(means[1].get(i, np.nan) - means[0].get(i, np.nan)))
    return common[: max(0, cfg.max_images)], len(common)


def shown_note(shown: int, total: int, select: str) -> str:
    """``6 of 8 images shown (...)`` when fewer are shown than exist, else ``all 8 images shown``."""
    if shown >= total:
        return f"All {total} image{'s' if total != 1 else ''} shown."
    which = "the largest mean-reward gains" if select == "gain" else "the first by id"
    return f"{shown} of {total} images shown ({which})."


def _comparison_rows(pools: list[dict], labels: list[str], cfg: ReportConfig) -> str:
    """HTML for the per-image section: a strip of images and a slider compare per image."""
    ids, total = _choose_images(pools, cfg)
    if not ids:
        return "<p>No image is present in every pool.</p>"
    blocks = [f'<p class="note shown">{_esc(shown_note(len(ids), total, cfg.select))}</p>']
    for n, image_id in enumerate(ids):
        lr = hr = None
        prompt = ""
        for p in pools:
            a, b, c = p["lrhr"].get(image_id, (None, None, ""))
            lr, hr, prompt = lr or a, hr or b, prompt or c
        lr = _find_by_stem(cfg.lr_dir, image_id) or lr
        hr = _find_by_stem(cfg.hr_dir, image_id) or hr
        cells: list[tuple[str, Path | None]] = [("LR", lr)]
        for label, p in zip(labels, pools):
            rows = p["df"][p["df"]["image_id"].astype(str) == image_id]
            best = rows.loc[rows[cfg.reward_column].idxmax()]
            worst = rows.loc[rows[cfg.reward_column].idxmin()]
            for kind, r in (("best", best), ("worst", worst)):
                caption = f"{label} · {kind} · seed {int(r['seed'])} · {float(r[cfg.reward_column]):.3f}"
                cells.append((caption, eval_pools.resolve_path(p["path"].parent, r["path"])))
        cells.append(("HR", hr))
        figs, options = [], []
        for k, (caption, path) in enumerate(cells):
            if path is None or not exists(path):
                figs.append(
                    f'<figure class="cell missing"><div>not available</div><figcaption>{_esc(caption)}'
                    "</figcaption></figure>"
                )
                continue
            try:
                uri = image_uri(Path(path), cfg.max_side, cfg.image_format)
            except ImageReadError as exc:
                print(f"report: skipping unreadable image: {exc}", file=sys.stderr)
                continue
            cls = ' class="lr"' if caption == "LR" else ""
            two_lines = _esc(caption).replace(" · ", "<br>", 1)
            figs.append(
                f'<figure class="cell"><img{cls} data-k="{k}" src="{uri}" alt="{_esc(caption)}" '
                f'title="{_esc(Path(path).name)}"><figcaption>{two_lines}</figcaption></figure>'
            )
            options.append((k, caption))
        # Default comparison: the first pool's worst seed against the last pool's worst (the quality floor).
        keys = [k for k, _ in options]
        left = 2 if 2 in keys else (keys[0] if keys else 0)
        right = 2 * len(pools) if len(pools) > 1 and 2 * len(pools) in keys else (keys[-1] if keys else 0)
        opts = "".join(f'<option value="{k}">{_esc(c)}</option>' for k, c in options)
        compare = (
            f'<div class="cmp" data-left="{left}" data-right="{right}">'
            '<div class="cmp-box"><img class="cmp-after" alt="right image">'
            '<img class="cmp-before" alt="left image">'
            '<div class="cmp-line"></div></div>'
            f'<input type="range" class="cmp-range" min="0" max="100" value="50" aria-label="slider {n}">'
            f'<div class="cmp-sel">left <select class="cmp-left">{opts}</select> right '
            f'<select class="cmp-right">{opts}</select></div></div>'
            if len(options) >= 2
            else ""
        )
        prompt_html = f'<p class="prompt">prompt: {_esc(prompt)}</p>' if prompt else ""
        blocks.append(
            f'<section class="row"><h3>{_esc(image_id)}</h3>{prompt_html}<div class="row-body">'
            f'<div class="strip">{"".join(figs)}</div>{compare}</div></section>'
        )
    return "\n".join(blocks)


# ------------------------------------------------------------------------------------------ tables
def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(summary: dict, folder: Path) -> str:
    metrics = list(summary.get("metrics", {}))
    header = ["model", "images"] + [
        f"{m.upper()} {'↑' if summary['metrics'][m]['higher_better'] else '↓'}" for m in metrics
    ]
    rows = []
    for label, entry in summary.get("models", {}).items():
        cells = [label, str(entry.get("n_images", ""))]
        for m in metrics:
            s = entry.get("metrics", {}).get(m)
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s and s.get("n") else "–")
        rows.append(cells)
    proto = summary.get("protocol", {})
    parts = [f"<h3>{_esc(folder.name)}</h3>", _table(header, rows)]
    parts.append(
        f'<p class="note">PSNR/SSIM on the Y channel: {_esc(proto.get("y_channel", "?"))}; crop border '
        f"{_esc(proto.get('crop_border', '?'))}; ± is the {_esc(proto.get('std', 'std'))}; pyiqa "
        f"{_esc(proto.get('pyiqa', '?'))}, torch {_esc(proto.get('torch', '?'))}.</p>"
    )
    problems = summary.get("problems", [])
    if problems:
        items = "".join(f"<li>{_esc(p)}</li>" for p in problems)
        parts.append(
            f'<details class="problems" open><summary>{len(problems)} problem(s)</summary>'
            f"<ul>{items}</ul></details>"
        )
    return "\n".join(parts)


def _bestm_table_html(table: pd.DataFrame) -> str:
    rows = [
        [str(r.model), str(r.m), f"{r.best:.4f}", f"{r.mean:.4f}", f"{r.worst:.4f}"]
        for r in table.itertuples()
    ]
    return _table(["model", "M", "Best@M", "Mean@M", "Worst@M"], rows)


def _scale_note(scale) -> str:
    values = [str(v) for v in dict.fromkeys(scale) if isinstance(v, str) and v]
    return f'<p class="note">Scale: {_esc(values[0])}.</p>' if values else ""


def _bestm_section(pools: list[dict], labels: list[str], scale: str, column: str) -> str:
    """Best/Mean/Worst@M plot and table of the pools on their scale, and the first-to-last verdict."""
    tables = []
    for label, p in zip(labels, pools):
        _, seeds, mat = bestm.rewards_matrix(p["df"], column)
        stats = bestm.best_mean_worst(mat, bestm.default_ms(len(seeds)))
        part = pd.DataFrame({k: stats[k] for k in ("m", "best", "mean", "worst")})
        part.insert(0, "model", label)
        tables.append(part)
    table = pd.concat(tables, ignore_index=True)
    png = plots.plot_bestm(table, "Best / Mean / Worst@M", ylabel=scale)
    verdict = ""
    if len(pools) >= 2 and scale != eval_pools.SEPARATE_SCALE:
        verdict = verdict_html(pools[0]["df"], pools[-1]["df"], (labels[0], labels[-1]), column)
    return (
        "<h2>Best / Mean / Worst@M</h2>"
        + _img(png, "Best/Mean/Worst@M plot")
        + _bestm_table_html(table)
        + _scale_note([scale])
        + verdict
    )


def _img(png: bytes, alt: str) -> str:
    return f'<img class="plot" src="{_data_uri(png, "image/png")}" alt="{_esc(alt)}">'


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}.note{color:#555;font-size:.85em}
.plot{max-width:100%;border:1px solid #ddd}.row{border-top:1px solid #ddd;padding:.5em 0}
.row-body{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.strip{display:flex;flex-wrap:wrap;gap:6px;flex:1 1 620px}
.cell{margin:0;width:200px}.cell img{width:200px;display:block}
.cell img.lr{image-rendering:pixelated}.cell figcaption{font-size:.75em;color:#444;overflow-wrap:anywhere}
.missing div{width:200px;height:200px;background:#eee;display:flex;align-items:center;justify-content:center}
.cmp{flex:0 0 min(448px,100%)}.cmp-box{position:relative;line-height:0}
.cmp-box img{width:100%;display:block}.cmp-before{position:absolute;top:0;left:0;clip-path:inset(0 50% 0 0)}
.cmp-line{position:absolute;top:0;bottom:0;left:50%;width:2px;background:#fff;box-shadow:0 0 2px #000}
.cmp-range{width:100%}.cmp-sel{font-size:.85em}.prompt{font-size:.85em;color:#555}.problems{color:#a00}
.verdict{font-weight:600;cursor:help}
"""

JS = """
document.querySelectorAll('.cmp').forEach(function (cmp) {
  var row = cmp.closest('.row');
  var before = cmp.querySelector('.cmp-before'), after = cmp.querySelector('.cmp-after');
  var line = cmp.querySelector('.cmp-line'), range = cmp.querySelector('.cmp-range');
  var selL = cmp.querySelector('.cmp-left'), selR = cmp.querySelector('.cmp-right');
  function src(k) { var im = row.querySelector('.strip img[data-k="' + k + '"]'); return im ? im.src : ''; }
  function setClip() {
    var v = Number(range.value);
    before.style.clipPath = 'inset(0 ' + (100 - v) + '% 0 0)';
    line.style.left = v + '%';
  }
  selL.value = cmp.dataset.left; selR.value = cmp.dataset.right;
  before.src = src(selL.value); after.src = src(selR.value);
  selL.addEventListener('change', function () { before.src = src(selL.value); });
  selR.addEventListener('change', function () { after.src = src(selR.value); });
  range.addEventListener('input', setClip);
  setClip();
});
"""


PREF_NOTE = (
    '<p class="note">The share of preference pairs whose winner the model prefers more than the reference does: '
    "Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)) &lt; 0, e the denoising error averaged over fixed noise and "
    "timestep draws; 0 at the start (every pair a tie), 0.5 without a preference. Held-out pairs are built like "
    "the training pairs from crops never trained on; bands: 95% bootstrap intervals over crops.</p>"
)


def build_html(cfg: ReportConfig, *, sections: Sequence[str] = ()) -> str:
    """The report page as a string (see the module docstring). ``sections`` are extra HTML fragments, already
    escaped, placed in order right after the page title, before the sections built from ``cfg``."""
    body: list[str] = []
    bestm_done = curve_done = False
    eval_parts = []
    for folder in map(Path, cfg.eval_dirs):
        if not folder.is_dir():
            raise FileNotFoundError(f"eval folder not found: {folder}")
        summary_path = folder / evaluate.SUMMARY_JSON
        if summary_path.is_file():
            eval_parts.append(_summary_html(json.loads(summary_path.read_text()), folder))
    if eval_parts:
        body.append("<h2>Image-quality metrics</h2>" + "\n".join(eval_parts))
    pools: list[dict] = []
    labels: list[str] = []
    if cfg.pools:
        pools, labels, scale = read_pools(cfg)
        body.append(_bestm_section(pools, labels, scale, cfg.reward_column))
        bestm_done = True
    for folder in map(Path, cfg.eval_dirs):
        if not bestm_done and (folder / evaluate.BESTM_PNG).is_file():
            parts = [_img((folder / evaluate.BESTM_PNG).read_bytes(), "Best/Mean/Worst@M plot")]
            if (folder / evaluate.BESTM_CSV).is_file():
                table = pd.read_csv(folder / evaluate.BESTM_CSV)
                parts.append(_bestm_table_html(table) + _scale_note(table.get("scale", pd.Series(dtype=str))))
            body.append("<h2>Best / Mean / Worst@M</h2>" + "".join(parts))
            bestm_done = True
    if cfg.reward_curve is not None:
        png = plots.plot_curve(plots.read_table(Path(cfg.reward_curve)))
        body.append("<h2>Reward curve</h2>" + _img(png, "reward curve"))
        curve_done = True
    for folder in map(Path, cfg.eval_dirs):
        if not curve_done and (folder / evaluate.CURVE_PNG).is_file():
            body.append(
                "<h2>Reward curve</h2>" + _img((folder / evaluate.CURVE_PNG).read_bytes(), "reward curve")
            )
            curve_done = True
    if cfg.pref_accuracy is not None:
        png = plots.plot_pref_accuracy(plots.read_table(Path(cfg.pref_accuracy)))
        body.append("<h2>Preference accuracy</h2>" + PREF_NOTE + _img(png, "preference accuracy"))
    if pools:
        body.append(
            '<h2>Per-image comparison</h2><p class="note">LR, each model\'s best and worst seed (by '
            f"{_esc(cfg.reward_column)}) and HR. The slider compares any two (default: the first and last model's "
            "worst seed).</p>" + _comparison_rows(pools, labels, cfg)
        )
    if not body:
        raise ValueError(
            "nothing to report: give --eval-dirs with eval outputs, --pools, --reward-curve and/or --pref-accuracy"
        )
    config = _esc(json.dumps(to_dict(cfg), indent=1, default=str))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(cfg.title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
        f"<h1>{_esc(cfg.title)}</h1>{''.join([*sections, *body])}"
        f'<details class="note"><summary>report config</summary><pre>{config}</pre></details>'
        f"<script>{JS}</script></body></html>"
    )


@tables.with_data_roots
def run(cfg: ReportConfig, *, sections: Sequence[str] = ()) -> Path:
    """Write the page to ``cfg.output`` (atomically); returns its path. ``sections``: as for `build_html`."""
    if cfg.max_side < 16:
        raise ValueError(f"--max-side must be >= 16, got {cfg.max_side}")
    out = Path(cfg.output)
    if out.is_dir() or out.suffix.lower() not in (".html", ".htm"):
        out = out / "report.html"
    check_output_file(out)
    page = build_html(cfg, sections=sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    print(f"report: wrote {out} ({len(page.encode()) / 1e6:.1f} MB)", file=sys.stderr)
    return out
