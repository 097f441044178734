"""The ``score`` stage: IQA scores and the hybrid reward of every candidate (METHOD.md §2.3–2.4).

Reads ``candidates.parquet`` (written by ``sample``), scores every candidate with every metric — FR metrics
against the candidate's HR, NR metrics alone — and writes ``scores.parquet`` (long: one row per candidate and
metric, raw pyiqa values) and ``rewards.parquet`` (one row per candidate: the hybrid reward and each metric
oriented and normalised), both described in docs/ARCHITECTURE.md.

Resumable: the scores of each finished image go to their own part file under ``scores_parts/`` (written
atomically), and a rerun skips every (image, metric) whose candidates are all scored; at the end the parts are
merged into ``scores_parts/_merged.parquet`` (every score ever computed in this folder, kept so that adding a
metric later does not recompute the others) and the two tables are written from it. Scores are keyed by
(image_id, seed, metric, candidate path): delete ``scores_parts/`` to force a full rescore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dp2osr import metrics as metric_lib
from dp2osr.config import check_choice, field, save_config
from dp2osr.images import ImageReadError, load_image, write_parquet
from dp2osr.math.reward import SCOPES, hybrid_reward

CANDIDATES_FILE = "candidates.parquet"
SCORES_FILE = "scores.parquet"
REWARDS_FILE = "rewards.parquet"
PARTS_DIR = "scores_parts"
MERGED_PART = "_merged.parquet"
CONFIG_FILE = "score_config.yaml"
_PART_COLUMNS = ["image_id", "seed", "metric", "value", "path"]


@dataclass
class ScoreConfig:
    """Score every candidate of a `sample` pool with IQA metrics and compute the hybrid reward.

    Full-reference (FR) metrics compare each candidate with its HR image; candidates without an HR (empty
    hr_path) get no FR scores and their reward uses the NR metrics alone. Writes scores.parquet and
    rewards.parquet; an interrupted run resumes where it stopped (rerun the same command). The default
    `offline` preset needs no model weights; `paper` needs the weights of LPIPS, TOPIQ, A-FINE, MANIQA, MUSIQ,
    CLIP-IQA+ and Q-Align (see --weights-dir).
    """

    candidates: Path = field(help="folder holding candidates.parquet (the output folder of `sample`)")
    output: Path | None = field(None, help="output folder (default: the candidates folder)")
    preset: str = field(
        "offline",
        help="metric set: offline (no weights: ms_ssim, fsim, gmsd, piqe) or paper (METHOD.md §2.3)",
        choices=sorted(metric_lib.PRESETS),
    )
    metrics: list[str] | None = field(None, help="metric names (pyiqa names); overrides --preset")
    weights_dir: Path | None = field(
        None,
        help="folder with metric weight files (flat, or a copied torch-hub cache); pyiqa's cache is also searched",
    )
    device: str = field("auto", help="where metrics run", choices=["auto", "cpu", "cuda"])
    batch_size: int = field(8, help="candidates of one image scored per metric call")
    w_fr: float = field(0.5, help="reward weight of the mean normalised FR score [paper: 0.5]")
    w_nr: float = field(0.5, help="reward weight of the mean normalised NR score [paper: 0.5]")
    scope: str = field(
        "pool",
        help="min-max normalisation scope: pool (all candidates) or image (one image's candidates)",
        choices=list(SCOPES),
    )


def _candidates_dir(path: Path) -> Path:
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return path.parent
    if not (path / CANDIDATES_FILE).is_file():
        raise FileNotFoundError(f"no {CANDIDATES_FILE} in {path} (give the output folder of `sample`)")
    return path


def read_candidates(folder: Path) -> pd.DataFrame:
    """``candidates.parquet`` with ``path`` made absolute (``abs_path``) and ``hr_path`` empty where missing."""
    table = pd.read_parquet(folder / CANDIDATES_FILE)
    need = {"image_id", "seed", "path", "hr_path"}
    if not need <= set(table.columns):
        raise ValueError(
            f"{folder / CANDIDATES_FILE}: needs columns {sorted(need)}, has {list(table.columns)}"
        )
    if table.empty:
        raise ValueError(f"{folder / CANDIDATES_FILE} has no candidates")
    table = table.reset_index(drop=True)
    table["image_id"] = table["image_id"].astype(str)
    table["seed"] = table["seed"].astype("int64")
    table["path"] = table["path"].astype(str)
    table["hr_path"] = table["hr_path"].fillna("").astype(str)
    dup = table.duplicated(["image_id", "seed"])
    if dup.any():
        raise ValueError(
            f"{folder / CANDIDATES_FILE}: duplicate (image_id, seed) rows, e.g. {table[dup].head(3)}"
        )
    table["abs_path"] = [str(folder / p) for p in table["path"]]
    return table


def _part_name(image_id: str, metrics: list[str]) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)[:60]
    digest = hashlib.sha1("\0".join([image_id, *sorted(metrics)]).encode()).hexdigest()[:12]
    return f"{safe}-{digest}.parquet"


def _read_parts(parts_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """Every stored score (merged file, then per-image parts, oldest first; later rows win) and the parts."""
    frames = []
    merged = parts_dir / MERGED_PART
    if merged.is_file():
        frames.append(pd.read_parquet(merged))
    parts = sorted(
        (p for p in parts_dir.glob("*.parquet") if p.name != MERGED_PART and not p.name.startswith(".tmp_")),
        key=lambda p: (p.stat().st_mtime_ns, p.name),
    )
    frames += [pd.read_parquet(p) for p in parts]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(_PART_COLUMNS, _dtypes())}), parts
    table = pd.concat(frames, ignore_index=True)[_PART_COLUMNS]
    table = table.drop_duplicates(["image_id", "seed", "metric", "path"], keep="last").reset_index(drop=True)
    return table, parts


def _dtypes() -> list[str]:
    return ["object", "int64", "object", "float64", "object"]


def _needed(cands: pd.DataFrame, specs: dict[str, metric_lib.MetricSpec]) -> pd.DataFrame:
    """Every (candidate, metric) to score, in candidate order then metric order; FR only where there is an HR."""
    rows = []
    has_hr = cands["hr_path"] != ""
    for order, (name, spec) in enumerate(specs.items()):
        sub = cands[has_hr] if spec.family == "fr" else cands
        rows.append(
            pd.DataFrame(
                {
                    "row": sub.index.to_numpy(),
                    "image_id": sub["image_id"].to_numpy(),
                    "seed": sub["seed"].to_numpy(),
                    "path": sub["path"].to_numpy(),
                    "metric": name,
                    "order": order,
                }
            )
        )
    return (
        pd.concat(rows, ignore_index=True).sort_values(["row", "order"], kind="stable").reset_index(drop=True)
    )


class _Scorer:
    """Builds metrics lazily and scores stacks of same-size candidates, falling back to one at a time."""

    def __init__(self, cfg: ScoreConfig, specs: dict[str, metric_lib.MetricSpec]) -> None:
        self.cfg, self.specs = cfg, specs
        self.models: dict[str, torch.nn.Module] = {}
        self.max_batch: dict[str, int] = {}

    def build(self, names: list[str]) -> None:
        for name in names:
            if name not in self.models:
                self.models[name] = metric_lib.create(name, self.cfg.device, self.cfg.weights_dir)
                cap = self.specs[name].max_batch
                self.max_batch[name] = max(1, min(self.cfg.batch_size, cap or self.cfg.batch_size))

    def score(self, name: str, images: torch.Tensor, ref: torch.Tensor | None) -> np.ndarray:
        model, size = self.models[name], self.max_batch[name]
        out = []
        for i in range(0, images.shape[0], size):
            chunk = images[i : i + size]
            try:
                out.append(metric_lib.score_batch(model, chunk, ref))
            except Exception as exc:
                if chunk.shape[0] == 1:
                    raise RuntimeError(f"metric {name!r} failed: {exc}") from exc
                values = np.concatenate([metric_lib.score_batch(model, x[None], ref) for x in chunk])
                print(
                    f"score: metric {name!r} failed on a batch of {chunk.shape[0]} ({type(exc).__name__}: {exc}); "
                    "scoring it one image at a time",
                    file=sys.stderr,
                )
                self.max_batch[name] = size = 1
                out.append(values)
        return np.concatenate(out) if out else np.zeros(0)


def _load(path: str, errors: dict[str, str]) -> torch.Tensor | None:
    """The image, or None after recording why it cannot be read (each file reported once)."""
    try:
        return load_image(Path(path))
    except ImageReadError as exc:
        errors.setdefault(path, str(exc))
        return None


def _score_image(
    rows: pd.DataFrame,
    todo: list[str],
    scorer: _Scorer,
    errors: dict[str, str],
    progress: object,
) -> pd.DataFrame:
    """Scores of one image's candidates (``rows``) with the metrics ``todo``, as part-file rows."""
    tensors = {r.Index: _load(r.abs_path, errors) for r in rows.itertuples()}
    hr_cache: dict[str, torch.Tensor | None] = {}
    results = []
    for name in todo:
        spec = scorer.specs[name]
        # Group the readable candidates by (HR, size) so each stack shares one reference and one shape.
        groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for r in rows.itertuples():
            x = tensors[r.Index]
            if x is None or (spec.family == "fr" and not r.hr_path):
                continue
            groups.setdefault((r.hr_path if spec.family == "fr" else "", tuple(x.shape)), []).append(r.Index)
        for (hr_path, shape), idx in groups.items():
            if min(shape[-2:]) < spec.min_size:
                raise ValueError(
                    f"metric {name!r} needs images of at least {spec.min_size} px, but {rows.loc[idx[0], 'path']} "
                    f"is {shape[-1]}x{shape[-2]}; choose other metrics (--metrics)"
                )
            ref = None
            if spec.family == "fr":
                if hr_path not in hr_cache:
                    hr_cache[hr_path] = _load(hr_path, errors)
                ref = hr_cache[hr_path]
                if ref is None:
                    continue
                if tuple(ref.shape) != shape:
                    errors.setdefault(
                        f"{hr_path}|{shape}",
                        f"HR {hr_path} is {ref.shape[-1]}x{ref.shape[-2]} but candidates "
                        f"{[rows.loc[i, 'path'] for i in idx][:3]} are {shape[-1]}x{shape[-2]}; FR not scored",
                    )
                    continue
            values = scorer.score(name, torch.cat([tensors[i] for i in idx]), ref)
            progress.update(len(idx))  # type: ignore[attr-defined]
            sub = rows.loc[idx]
            results.append(
                pd.DataFrame(
                    {
                        "image_id": sub["image_id"].to_numpy(),
                        "seed": sub["seed"].to_numpy(dtype=np.int64),
                        "metric": name,
                        "value": values.astype(np.float64),
                        "path": sub["path"].to_numpy(),
                    }
                )
            )
    if not results:
        return pd.DataFrame(columns=_PART_COLUMNS)
    return pd.concat(results, ignore_index=True)


def score(cfg: ScoreConfig) -> int:
    """Score the pool in ``cfg.candidates``; write scores.parquet and rewards.parquet. Returns the exit status.

    0 when every candidate was scored; 1 when some files could not be read (each is reported by name on
    stderr and left out of the tables; every other candidate is still scored and the tables are written).
    """
    from tqdm import tqdm

    check_choice("preset", cfg.preset, sorted(metric_lib.PRESETS))
    check_choice("device", cfg.device, ["auto", "cpu", "cuda"])
    check_choice("scope", cfg.scope, list(SCOPES))
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    for name in ("w_fr", "w_nr"):
        w = getattr(cfg, name)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    if cfg.weights_dir is not None and not Path(cfg.weights_dir).is_dir():
        raise FileNotFoundError(f"weights_dir not found: {cfg.weights_dir}")

    cand_dir = _candidates_dir(cfg.candidates)
    out_dir = Path(cfg.output) if cfg.output is not None else cand_dir
    names = metric_lib.resolve_names(cfg.preset, cfg.metrics)
    specs = metric_lib.catalogue(names)
    cands = read_candidates(cand_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the resolved config: the exact metric list and output folder this run used
    save_config(dataclasses.replace(cfg, metrics=names, output=out_dir), out_dir / CONFIG_FILE)
    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(exist_ok=True)

    # What is left: every needed (candidate, metric) without a stored score.
    needed = _needed(cands, specs)
    stored, _ = _read_parts(parts_dir)
    merged = needed.merge(
        stored[["image_id", "seed", "metric", "path"]],
        on=["image_id", "seed", "metric", "path"],
        how="left",
        indicator=True,
    )
    missing = merged[merged["_merge"] == "left_only"]
    todo_by_image = {
        img: list(dict.fromkeys(g["metric"])) for img, g in missing.groupby("image_id", sort=False)
    }
    pending = missing[["image_id", "metric"]].drop_duplicates()
    total = len(needed.merge(pending, on=["image_id", "metric"]))  # whole (image, metric) stacks are redone
    done_images = cands["image_id"].nunique() - len(todo_by_image)
    if done_images:
        print(f"score: {done_images} image(s) already scored in {parts_dir}, skipped", file=sys.stderr)

    scorer = _Scorer(cfg, specs)
    scorer.build([n for n in names if any(n in m for m in todo_by_image.values())])
    errors: dict[str, str] = {}
    by_image = {img: g for img, g in cands.groupby("image_id", sort=False)}
    start = time.perf_counter()
    with tqdm(total=total, unit="score", desc="score", dynamic_ncols=True) as progress:
        for image_id, todo in todo_by_image.items():
            n_errors = len(errors)
            part = _score_image(by_image[image_id], todo, scorer, errors, progress)
            for message in list(errors.values())[n_errors:]:
                tqdm.write(f"score: error: {message}", file=sys.stderr)
            if len(part):
                write_parquet(part, parts_dir / _part_name(image_id, todo))
    if total:
        elapsed = time.perf_counter() - start
        print(
            f"score: {total} score(s) in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} scores/s)",
            file=sys.stderr,
        )

    scores = _merge(parts_dir, needed)
    write_parquet(scores, out_dir / SCORES_FILE)
    rewards = _rewards(scores, cands, specs, cfg, cand_dir, out_dir)
    write_parquet(rewards, out_dir / REWARDS_FILE)
    print(
        f"score: {len(rewards)} candidate(s), {len(names)} metric(s) -> {out_dir / SCORES_FILE}, "
        f"{out_dir / REWARDS_FILE}",
        file=sys.stderr,
    )
    if errors:
        print(
            f"score: {len(errors)} problem(s); the affected candidates are missing from the tables:\n  "
            + "\n  ".join(errors.values())
            + "\nfix or remove the files (and their rows in candidates.parquet), then rerun to finish",
            file=sys.stderr,
        )
        return 1
    return 0


def _merge(parts_dir: Path, needed: pd.DataFrame) -> pd.DataFrame:
    """Fold the parts into the merged file; return this run's scores table (needed order, scored rows only)."""
    stored, parts = _read_parts(parts_dir)
    if parts:
        write_parquet(stored, parts_dir / MERGED_PART)
        for p in parts:
            p.unlink(missing_ok=True)
    table = needed.merge(stored, on=["image_id", "seed", "metric", "path"], how="inner", sort=False)
    table = table.sort_values(["row", "order"], kind="stable")
    return pd.DataFrame(
        {
            "image_id": table["image_id"].astype(str).to_numpy(),
            "seed": table["seed"].to_numpy(dtype=np.int64),
            "metric": table["metric"].astype(str).to_numpy(),
            "value": table["value"].to_numpy(dtype=np.float64),
        }
    )


def _rewards(
    scores: pd.DataFrame,
    cands: pd.DataFrame,
    specs: dict[str, metric_lib.MetricSpec],
    cfg: ScoreConfig,
    cand_dir: Path,
    out_dir: Path,
) -> pd.DataFrame:
    """rewards.parquet: image_id, seed, path (relative to ``out_dir``), reward, norm_<metric> per metric."""
    columns = ["image_id", "seed", "path", "reward", *[f"norm_{m}" for m in specs]]
    if scores.empty:
        empty = {c: pd.Series(dtype="float64") for c in columns}
        empty.update(
            image_id=pd.Series(dtype=object), seed=pd.Series(dtype="int64"), path=pd.Series(dtype=object)
        )
        return pd.DataFrame(empty)[columns]
    rewards = hybrid_reward(scores, specs, w_fr=cfg.w_fr, w_nr=cfg.w_nr, scope=cfg.scope)
    paths = cands[["image_id", "seed", "abs_path"]].copy()
    if out_dir.resolve() == cand_dir.resolve():
        paths["path"] = cands["path"]
    else:
        paths["path"] = [os.path.relpath(p, out_dir) for p in paths["abs_path"]]
    table = paths.drop(columns="abs_path").merge(rewards, on=["image_id", "seed"], how="inner", sort=False)
    for m in specs:
        if f"norm_{m}" not in table:
            table[f"norm_{m}"] = np.nan
    return table[columns].reset_index(drop=True)
