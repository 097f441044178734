"""The resumable scorer: IQA scores and the hybrid reward of every candidate of a pool.

Reads ``candidates.parquet`` (written by ``sample``), scores every candidate with every metric — FR metrics
against the candidate's HR, NR metrics alone — and writes ``scores.parquet`` (long: one row per candidate and
metric, raw pyiqa values) and ``rewards.parquet`` (one row per candidate: the hybrid reward and each metric
oriented and normalised), both in docs/ARCHITECTURE.md. Used by `dp2osr score` and the held-out evaluation.

Resumable: the scores of finished images go to part files under ``scores_parts/`` (written atomically, one
per process every few hundred images or a minute: `engine.score_store`), and a rerun skips every (image,
metric) whose candidates are all scored; at the end the parts are merged into ``scores_parts/_merged.parquet``
(every score ever computed in this folder, kept so that adding a metric later does not recompute the others)
and the two tables are written from it. Scores are keyed by (image_id, seed, metric, candidate path) and by
content: the SHA-256 of the candidate file and, for FR metrics, of its HR, so a candidate re-made (``sample
--overwrite``) or an HR replaced is scored again; a file whose size and mtime are those recorded when it was
last hashed (by `sample` or an earlier run) is not hashed again. Delete ``scores_parts/`` to force a full
rescore.

Dithered scoring (``ScoreOptions.dither`` K > 0): each score is the mean over K invisibly dithered copies
(`math.dither`), which steadies metrics whose ranking of a crop's candidates reacts to the last bit (PIQE at
64 px: docs/IQA_OFFLINE.md). Scores are keyed by K as well.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dp2osr import metrics as metric_lib
from dp2osr import tables
from dp2osr.config import check_choices, field
from dp2osr.engine import score_shards, score_store
from dp2osr.engine.pool_store import read_image
from dp2osr.engine.pools import read_pool
from dp2osr.engine.score_store import MERGED_PART, PART_COLUMNS, PARTS_DIR, PartWriter, read_parts
from dp2osr.images import ImageReadError, write_parquet
from dp2osr.math.dither import dithered
from dp2osr.math.reward import SCOPES, hybrid_reward
from dp2osr.paths import check_not_link

SCORES_FILE = tables.SCORES.filename
REWARDS_FILE = tables.REWARDS.filename
_KEY = [
    "image_id",
    "seed",
    "metric",
    "path",
    "sha",
    "ref_sha",
    "dither",
]  # a score's identity: candidate + content


def _needed(cands: pd.DataFrame, specs: dict[str, metric_lib.MetricSpec], dither: int = 0) -> pd.DataFrame:
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
                    "sha": sub["sha"].to_numpy(),
                    "ref_sha": sub["hr_sha"].to_numpy() if spec.family == "fr" else "",
                    "metric": name,
                    "dither": dither,
                    "order": order,
                }
            )
        )
    return (
        pd.concat(rows, ignore_index=True).sort_values(["row", "order"], kind="stable").reset_index(drop=True)
    )


class _Scorer:
    """Builds metrics lazily and scores stacks of same-size candidates, falling back to one at a time."""

    def __init__(
        self,
        opts: ScoreOptions,
        specs: dict[str, metric_lib.MetricSpec],
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg, self.specs, self.device = opts, specs, opts.device if device is None else device
        self.models: dict[str, torch.nn.Module] = {}
        self.max_batch: dict[str, int] = {}

    def build(self, names: list[str]) -> None:
        for name in names:
            if name not in self.models:
                self.models[name] = metric_lib.create(name, self.device, self.cfg.weights_dir)
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
        return read_image(path)
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
            stack = torch.cat([tensors[i] for i in idx])
            if scorer.cfg.dither:
                shas = [rows.loc[i, "sha"] for i in idx]
                copies = [scorer.score(name, dithered(stack, shas, k), ref) for k in range(scorer.cfg.dither)]
                values = np.mean(copies, axis=0)
            else:
                values = scorer.score(name, stack, ref)
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
                        "sha": sub["sha"].to_numpy(),
                        "ref_sha": sub["hr_sha"].to_numpy() if spec.family == "fr" else "",
                        "dither": scorer.cfg.dither,
                    }
                )
            )
    if not results:
        return pd.DataFrame(columns=PART_COLUMNS)
    return pd.concat(results, ignore_index=True)


def _merge(parts_dir: Path, needed: pd.DataFrame) -> pd.DataFrame:
    """Fold the parts into the merged file; return this run's scores table (needed order, scored rows only)."""
    stored, parts = read_parts(parts_dir)
    if parts:
        write_parquet(stored, parts_dir / MERGED_PART)
        for p in parts:
            p.unlink(missing_ok=True)
    table = needed.merge(stored, on=_KEY, how="inner", sort=False)
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
    scores: pd.DataFrame, cands: pd.DataFrame, specs: dict[str, metric_lib.MetricSpec], cfg: ScoreOptions
):
    """The rewards table: each candidate's absolute path, LR/HR, prompt and model (what `pair` and `report`
    need), reward and norm_<metric> per metric."""
    carried = ["image_id", "seed", "path", *[c for c in tables.REWARDS.optional if c in cands.columns]]
    columns = [*carried, "reward", *[f"norm_{m}" for m in specs]]
    info = cands.assign(path=cands["abs_path"])[carried]
    if scores.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64" if c not in info else info[c].dtype) for c in columns}
        )
    rewards = hybrid_reward(scores, specs, w_fr=cfg.w_fr, w_nr=cfg.w_nr, scope=cfg.scope)
    table = info.merge(rewards, on=["image_id", "seed"], how="inner", sort=False)
    for m in specs:
        if f"norm_{m}" not in table:
            table[f"norm_{m}"] = np.nan
    return table[columns].reset_index(drop=True)


@dataclass(kw_only=True)
class ScoreOptions:
    """How a pool is scored: the options of `dp2osr score` that change its numbers, plus where metrics run
    (`dp2osr.score.ScoreConfig` adds the pool, the output and the metric names)."""

    weights_dir: Path | None = field(
        None,
        help="folder with metric weight files (flat, or a copied torch-hub cache); pyiqa's cache is also searched",
    )
    device: str = field("auto", help="where metrics run: auto, cpu, cuda or cuda:N")
    batch_size: int = field(8, help="candidates of one image scored per metric call")
    w_fr: float = field(0.5, help="reward weight of the mean normalised FR score [paper: 0.5]")
    w_nr: float = field(0.5, help="reward weight of the mean normalised NR score [paper: 0.5]")
    scope: str = field(
        "pool",
        help="min-max normalisation scope: pool (all candidates) or image (one image's candidates)",
        choices=list(SCOPES),
    )
    dither: int = field(
        0,
        help="K > 0: each score is the mean over K copies of the candidate with every 8-bit value moved by -1, 0 "
        "or +1 (invisible; the pattern is fixed by the file's hash). Steadies metrics whose ranking of a crop's "
        "candidates reacts to the last bit (PIQE at 64 px; docs/IQA_OFFLINE.md); costs K times the scoring. "
        "0 = plain scores",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.dither < 0:
            raise ValueError(f"--dither must be >= 0 (0 = plain scores), got {self.dither}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("w_fr", "w_nr"):
            w = getattr(self, name)
            if not np.isfinite(w) or w < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {w}")
        if self.w_fr + self.w_nr == 0:
            raise ValueError("--w-fr and --w-nr are both 0: every reward would be 0")


@dataclass
class ScoreResult:
    """The long scores table, the rewards table (both written), and the problems met, by file."""

    scores: pd.DataFrame
    rewards: pd.DataFrame
    errors: dict[str, str]


def _todo(
    cands: pd.DataFrame, specs: dict, parts_dir: Path, dither: int = 0
) -> tuple[pd.DataFrame, dict[str, list[str]], int]:
    """(every needed (candidate, metric), the metrics still to score per image, the scores that means)."""
    needed = _needed(cands, specs, dither)
    stored, _ = read_parts(parts_dir)
    merged = needed.merge(stored[_KEY], on=_KEY, how="left", indicator=True)
    missing = merged[merged["_merge"] == "left_only"]
    todo_by_image = {
        img: list(dict.fromkeys(g["metric"])) for img, g in missing.groupby("image_id", sort=False)
    }
    pending = missing[["image_id", "metric"]].drop_duplicates()
    total = len(needed.merge(pending, on=["image_id", "metric"]))  # whole (image, metric) stacks are redone
    return needed, todo_by_image, total


def score_pool(
    cand_dir: Path,
    out_dir: Path,
    names: list[str],
    opts: ScoreOptions | None = None,
    state=None,
    device: str | torch.device | None = None,
) -> ScoreResult:
    """Score every candidate of the pool in ``cand_dir`` with the metrics ``names`` into ``out_dir``.

    Resumes from ``out_dir/scores_parts``; writes scores.parquet and rewards.parquet. Unreadable files are
    reported on stderr by name and left out of the tables (``errors``); every other candidate is scored.
    With an accelerate ``state`` of several processes, each scores its share of the images on ``device``
    (default: ``opts.device``) and the main process writes the tables (`dp2osr.engine.score_shards`); the
    other processes return empty tables and their own problems.
    """
    from tqdm import tqdm

    from dp2osr.progress import bar as progress_bar

    opts = opts or ScoreOptions()
    check_not_link(out_dir / PARTS_DIR, "the stored scores folder")  # its files are merged and deleted
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    specs = metric_lib.catalogue(names)
    pool, pool_meta = read_pool(cand_dir)
    parts_dir = out_dir / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    cands = score_store.content_hashes(score_shards.deal_images(pool, rank, world), parts_dir, cand_dir, rank)
    needed, todo_by_image, total = _todo(cands, specs, parts_dir, opts.dither)
    done_images = cands["image_id"].nunique() - len(todo_by_image)
    if done_images:
        print(f"score: {done_images} image(s) already scored in {parts_dir}, skipped", file=sys.stderr)
    scorer = _Scorer(opts, specs, device)
    scorer.build([n for n in names if any(n in m for m in todo_by_image.values())])
    errors: dict[str, str] = {}
    by_image = {img: g for img, g in cands.groupby("image_id", sort=False)}
    start = time.perf_counter()
    parts = PartWriter(parts_dir, rank)
    with progress_bar(total=total, unit="score", desc="score", dynamic_ncols=True) as progress:
        try:
            for image_id, todo in todo_by_image.items():
                n_errors = len(errors)
                parts.add(_score_image(by_image[image_id], todo, scorer, errors, progress))
                for message in list(errors.values())[n_errors:]:
                    tqdm.write(f"score: error: {message}", file=sys.stderr)
        finally:  # the images finished before an error are kept
            parts.close()
    if total:
        elapsed = time.perf_counter() - start
        print(
            f"score: {total} score(s) in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} scores/s)",
            file=sys.stderr,
        )
    if world == 1:
        return _write_tables(cands, needed, parts_dir, out_dir, specs, opts, pool_meta, errors)
    score_shards.write_shard(parts_dir / score_shards.SHARDS_DIR, rank, cands, errors)
    state.wait_for_everyone()
    result = ScoreResult(pd.DataFrame(columns=list(tables.SCORES.columns)), pd.DataFrame(), errors)
    if state.is_main_process:
        cands, errors = score_shards.read_shards(parts_dir / score_shards.SHARDS_DIR, world, pool)
        needed = _needed(cands, specs, opts.dither)
        result = _write_tables(cands, needed, parts_dir, out_dir, specs, opts, pool_meta, errors)
    state.wait_for_everyone()  # every process returns once the tables are written
    return result


def _write_tables(
    cands: pd.DataFrame,
    needed: pd.DataFrame,
    parts_dir: Path,
    out_dir: Path,
    specs: dict[str, metric_lib.MetricSpec],
    opts: ScoreOptions,
    pool_meta: dict,
    errors: dict[str, str],
) -> ScoreResult:
    """Merge the parts and write scores.parquet and rewards.parquet for the whole pool ``cands``."""
    scores = _merge(parts_dir, needed)
    score_store.fold_stamps(parts_dir)
    tables.write(tables.SCORES, scores, out_dir / SCORES_FILE)
    rewards = _rewards(scores, cands, specs, opts)
    meta = dict(metrics=list(specs), w_fr=opts.w_fr, w_nr=opts.w_nr, scope=opts.scope, dither=opts.dither)
    tables.write(tables.REWARDS, rewards, out_dir / REWARDS_FILE, {**pool_meta, **meta})
    print(
        f"score: {len(rewards)} candidate(s), {len(specs)} metric(s) -> {out_dir / SCORES_FILE}, "
        f"{out_dir / REWARDS_FILE}",
        file=sys.stderr,
    )
    return ScoreResult(scores, rewards, errors)
