"""How the pipeline's bookkeeping grows with the pool: synthetic pools of ~10^3..10^6 candidates (tables only).

Each size is a pool of n candidates (M = 32 per image, the paper's SD2 setting) written as the tables the
stages exchange: candidates.parquet, rewards.parquet, pref_pairs.parquet (N = 8 winners x 8 losers per image,
so 2n pairs) and a ``scores_parts/`` folder holding every score already (2 metrics, one FR, one NR). No image
file is made: what is timed is the work done per row — reading the tables, building the pairs, reading the
training examples, the data order per micro-batch (`batch_indices`: a cached seeded randperm per epoch up to
2**16 pairs, the keyed permutation above; and the keyed permutation alone at every size), and `score`'s
bookkeeping when everything is scored (finding what is left to do, merging the stored scores into the
tables' rows). Each line prints the best of ``--repeats`` runs per size (fewer where one run takes over a
second), the growth exponent fitted on log(time) against log(n), and the time projected from the largest
size, with that exponent and linearly (exponents below 1 come from fixed costs at small n), to the paper's
counts (1 M candidates, 1.92 M pairs). The data order is also timed at 1.92 M pairs directly.

The resume of a finished pool (``--resume-sizes``) is what a rerun of `sample` does besides loading the model,
on a files-layout pool of empty candidate files whose stamps (size, mtime, hashes) its last manifest recorded:
reading the stamps, planning (a `stat` per candidate, trusted while size and mtime match), recording every
candidate, each image's prompt and HR hash, and writing the manifest (`resume_finished`). Real candidates differ
only in their size, which a trusted file is never read for.

The training data path's memory per process is measured on stores of the frozen inputs
(`dp2osr.engine.frozen_store`) of 10^4..10^6 pairs (``--memory-pairs``; tiny rows written directly, no model):
a fresh process opens the store and reads ``--memory-batches`` micro-batches of the data order; printed are its
anonymous memory (its own, not shared) before and after, and the file pages it maps (the page cache the
processes of a node share, reclaimable), next to the store's size on disk.

    .venv/bin/python benchmarks/scale.py                   # 10^3, 10^4, 10^5 candidates (~3 min, 2 cores)
    .venv/bin/python benchmarks/scale.py --sizes 1024 10016 100000 300000 --repeats 2
    .venv/bin/python benchmarks/scale.py --sizes 1024 10016 100000 1000000 --repeats 1 \
        --resume-sizes 100000 1000000 --memory-pairs         # the paper's scale (~15 min, 2 cores)
    .venv/bin/python benchmarks/scale.py --memory-only --memory-pairs 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dp2osr import metrics as metric_lib
from dp2osr import tables
from dp2osr.engine import frozen_store, jobs, pools, scoring, train_data
from dp2osr.engine.provenance import file_sha
from dp2osr.images import write_parquet
from dp2osr.math.permutation import permuted
from dp2osr.pair import build_pairs

M, N = 32, 8  # candidates per image, winners (and losers) per image: 2 * N * N / M = 2 pairs per candidate
PAPER_CANDIDATES, PAPER_PAIRS = 1_000_000, 1_920_000
MICRO_BATCH = 16
METRICS = ["psnr", "piqe"]  # one FR, one NR: keys only, no metric is run


def make_pool(root: Path, n: int) -> dict[str, Path]:
    """The tables of a pool of ``n`` candidates (a multiple of M) under ``root`` (no image files)."""
    rng = np.random.default_rng(n)
    images = n // M
    ids = np.repeat([f"img{i:07d}" for i in range(images)], M)
    seeds = np.tile(np.arange(M, dtype=np.int64), images)
    paths = [f"pool/{i}/seed_{s:04d}.png" for i, s in zip(ids, seeds)]
    lr = [f"data/lr/{i}.png" for i in ids]
    hr = [f"data/hr/{i}.png" for i in ids]
    cands = pd.DataFrame({"image_id": ids, "seed": seeds, "path": paths, "lr_path": lr, "hr_path": hr})
    pool = root / "pool"
    pool.mkdir(parents=True)
    os.chdir(root)  # the tables name paths relative to the working folder, as a stage's caller does
    tables.write(tables.CANDIDATES, cands, pool)
    rewards = cands.assign(reward=rng.random(n))
    tables.write(tables.REWARDS, rewards, pool)
    pairs = build_pairs(rewards, N, None)
    tables.write(tables.PREF_PAIRS, pairs, root / "pairs")
    shas = [f"{k:064x}" for k in range(n)]
    hr_shas = {h: f"{k:064x}" for k, h in enumerate(dict.fromkeys(hr))}
    scored = pd.DataFrame(
        {
            "image_id": np.concatenate([ids, ids]),
            "seed": np.concatenate([seeds, seeds]),
            "metric": np.repeat(METRICS, n),
            "value": rng.random(2 * n),
            "path": [os.path.relpath(p, "pool") for p in paths] * 2,
            "sha": shas * 2,
            "ref_sha": [hr_shas[h] for h in hr] + [""] * n,
            "dither": 0,
        }
    )
    (pool / scoring.PARTS_DIR).mkdir()
    write_parquet(scored, pool / scoring.PARTS_DIR / scoring.MERGED_PART)
    return {"pool": pool, "pairs": root / "pairs", "shas": shas, "hr_shas": hr_shas}


def _best(fn, repeats: int, budget: float = 1.0) -> float:
    """The best of ``repeats`` runs of ``fn``, stopping early once ``budget`` seconds are spent (large sizes)."""
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _keyed_per_micro(n_pairs: int, micro_batches: int = 200) -> float:
    """Mean seconds per micro-batch of the keyed permutation alone (the order of pools above 2**16 examples)."""
    t = time.perf_counter()
    for k in range(micro_batches):
        pos = k * MICRO_BATCH
        [permuted((pos + i) % n_pairs, n_pairs, f"0:{(pos + i) // n_pairs}") for i in range(MICRO_BATCH)]
    return (time.perf_counter() - t) / micro_batches


def _order_per_micro(n_pairs: int, micro_batches: int = 200) -> float:
    """Mean seconds per micro-batch of `batch_indices` over the first ``micro_batches`` of a fresh run."""
    train_data._epoch_order.cache_clear()
    t = time.perf_counter()
    for k in range(micro_batches):
        train_data.batch_indices(n_pairs, k // 4, k % 4, 0, MICRO_BATCH, 4, 1, 0)
    return (time.perf_counter() - t) / micro_batches


def time_size(n: int, repeats: int) -> dict[str, tuple[float, int, int]]:
    """{stage: (seconds, the count it grows with, that count at the paper's scale)} for ``n`` candidates."""
    specs = metric_lib.catalogue(METRICS)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        made = make_pool(Path(tmp), n)
        pool, pairs_dir = made["pool"], made["pairs"]
        rewards, _ = tables.read(tables.REWARDS, pool)
        n_pairs = len(tables.read(tables.PREF_PAIRS, pairs_dir)[0])
        cands = scoring.read_pool(pool)[0]
        cands = cands.assign(sha=made["shas"], hr_sha=cands["hr_path"].map(_hr_key(made["hr_shas"], pool)))
        parts = pool / scoring.PARTS_DIR
        needed = scoring._needed(cands, specs)
        c, p = (
            (n, PAPER_CANDIDATES),
            (n_pairs, PAPER_PAIRS),
        )  # what each stage grows with, and its paper count
        out = {
            "tables.read candidates": (_best(lambda: tables.read(tables.CANDIDATES, pool), repeats), *c),
            "tables.read rewards": (_best(lambda: tables.read(tables.REWARDS, pool), repeats), *c),
            "tables.read pref_pairs": (_best(lambda: tables.read(tables.PREF_PAIRS, pairs_dir), repeats), *p),
            "pair.build_pairs": (_best(lambda: build_pairs(rewards, N, None), repeats), *c),
            "train_data.read_examples": (
                _best(lambda: train_data.read_examples(pairs_dir, "dpo"), repeats),
                *p,
            ),
            "batch_indices / micro-batch": (min(_order_per_micro(n_pairs) for _ in range(repeats)), *p),
            "keyed permutation / micro-b.": (min(_keyed_per_micro(n_pairs) for _ in range(repeats)), *p),
            "score _todo (all scored)": (_best(lambda: scoring._todo(cands, specs, parts), repeats), *c),
            "score _merge (all scored)": (_best(lambda: scoring._merge(parts, needed), repeats), *c),
        }
        todo = scoring._todo(cands, specs, parts)[1]
        assert not todo, f"the synthetic pool should be fully scored; {len(todo)} image(s) left"
        os.chdir(cwd)
    return out


def _hr_key(hr_shas: dict[str, str], pool: Path) -> dict[str, str]:
    """The synthetic HR hashes keyed by the absolute HR paths the candidates table reads back."""
    return {os.path.normpath(os.path.join(pool.parent, h)): s for h, s in hr_shas.items()}


MODEL = {"backbone": "sd2", "base": "base", "controlnet": "controlnet"}
OPTIONS_SHA = "0" * 64  # what every synthetic candidate records it was sampled with


def make_finished_pool(root: Path, n: int) -> pd.DataFrame:
    """A finished files-layout pool of ``n`` candidates under ``root / "pool"``: an empty file per candidate
    (``ID/seed_XXXX.png``), a tiny LR and HR file per image, and the stamps its last manifest recorded (size,
    mtime, LR hash, options hash, hash of each file); returns its images (``image_id, lr_path, hr_path``)."""
    ids = [f"img{i:07d}" for i in range(n // M)]
    data, out = root / "data", root / "pool"
    data.mkdir(parents=True)
    rows = []
    for image_id in ids:
        for kind in ("lr", "hr"):
            (data / f"{image_id}_{kind}.png").write_bytes(f"{kind} {image_id}".encode())
        lr_sha = file_sha(data / f"{image_id}_lr.png")
        (out / image_id).mkdir(parents=True)
        for s in range(M):
            rel = pools.candidate_path(image_id, s)
            (out / rel).touch()
            st = (out / rel).stat()
            rows.append((rel, st.st_size, st.st_mtime_ns, lr_sha, OPTIONS_SHA, f"{len(rows):064x}"))
    write_parquet(pd.DataFrame(rows, columns=pools._STAMP_COLUMNS), out / pools.STAMPS_FILE)
    lr = [str(data / f"{i}_lr.png") for i in ids]
    return pd.DataFrame(
        {"image_id": ids, "lr_path": lr, "hr_path": [p[: -len("lr.png")] + "hr.png" for p in lr]}
    )


def resume_finished(images: pd.DataFrame, out: Path) -> None:
    """What a rerun of `sample` does on the finished pool ``out`` besides loading the model: read the stamps,
    plan (`jobs._plan`: a `stat` per candidate, trusted while size and mtime match), record every candidate
    (`pools.manifest_records`, another `stat`), each image's prompt and HR hash, and write the manifest."""
    seeds = list(range(M))
    stamps = pools.read_stamps(out)
    job_list = jobs.chunk_jobs(list(zip(images.image_id, images.lr_path)), seeds, 8)
    real = jobs.options_sha
    jobs.options_sha = lambda *a, **k: OPTIONS_SHA  # the hash of the sampling settings: needs a backbone
    try:
        todo = jobs._plan(None, job_list, out, None, 4, MODEL, False, stamps, False)[0]
    finally:
        jobs.options_sha = real
    assert not todo, f"the synthetic pool should be finished; {len(todo)} job(s) left"
    records, missing = pools.manifest_records(images, out, seeds, job_list, stamps)
    assert not missing, f"{len(missing)} candidate(s) missing"
    info = pools.image_info(images, out)
    pools.combine_manifest(images, out, records, info, MODEL, {"pair_ratio": N / M})


def time_resume(n: int) -> tuple[float, float]:
    """(seconds to make, seconds to resume) a finished pool of ``n`` candidates (`resume_finished`)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        images = make_finished_pool(Path(tmp), n)
        made = time.perf_counter() - t
        t = time.perf_counter()
        resume_finished(images, Path(tmp) / "pool")
        return made, time.perf_counter() - t


def resume_sizes(sizes: list[int]) -> None:
    """Print the resume of a finished pool of each count of candidates, with its fitted growth exponent."""
    print("resume of a finished pool (files layout, empty files; no model):")
    times = []
    for n in sizes:
        made, took = time_resume(n)
        times.append(took)
        print(f"{n:>12,d} candidates: {_fmt(took)} (made in {_fmt(made)})", flush=True)
    if len(sizes) > 1:
        slope = float(np.polyfit(np.log(sizes), np.log(times), 1)[0])
        print(f"exponent {slope:.2f}; {_fmt(times[-1] * PAPER_CANDIDATES / sizes[-1])} at 1 M, linearly")


def make_store(folder: Path, n_pairs: int) -> None:
    """A store of ``n_pairs`` DPO pairs (2 pairs per candidate, M per LR image) with tiny random rows: an 8-bit
    4x4 LR per image, a 4x2x2 fp32 latent per candidate, two prompts' 8x4 embeddings."""
    rng = np.random.default_rng(n_pairs)
    lrs = [f"lr/{i:07d}.png" for i in range(max(1, n_pairs // (2 * M)))]
    win = rng.integers(0, M, n_pairs)
    lose = (win + 1 + rng.integers(0, M - 1, n_pairs)) % M
    img = np.arange(n_pairs) % len(lrs)
    ex = train_data.Examples(
        [
            [f"pool/{i:07d}/seed_{a:04d}.png", f"pool/{i:07d}/seed_{b:04d}.png"]
            for i, a, b in zip(img, win, lose)
        ],
        [lrs[i] for i in img],
        ["a photo"] * n_pairs,
        torch.ones(n_pairs),
    )
    (folder / "examples").mkdir(parents=True)
    w = frozen_store._Writer(folder, 0)
    for i, lr in enumerate(lrs):
        w.add(frozen_store.LR8, lr, torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8))
        for s in range(M):
            w.add(
                "latent", frozen_store._target_key(f"pool/{i:07d}/seed_{s:04d}.png", lr), torch.randn(4, 2, 2)
            )
    for prompt in ("", "a photo"):
        w.add("cond.prompt_embeds", prompt, torch.randn(8, 4))
    w.close()
    frozen_store.write_index(folder, ex, 1, "benchmark")


def _memory() -> dict[str, float]:
    """This process's anonymous memory and mapped file pages (MB), from /proc/self/smaps_rollup."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return {"anonymous": fields["Anonymous"], "file": fields["Rss"] - fields["Anonymous"]}


def read_store(folder: Path, batches: int) -> dict[str, float]:
    """Memory of this process before and after opening ``folder`` and reading ``batches`` micro-batches."""
    from types import SimpleNamespace

    bb = SimpleNamespace(device=torch.device("cpu"), prepare_control=lambda up: up)  # SD2's pixel control
    enc = train_data.FrozenEncoder(bb, 4)
    before = _memory()
    store = frozen_store.FrozenStore(folder, enc)
    for k in range(batches):
        idx = train_data.batch_indices(len(store), k // 4, k % 4, 0, MICRO_BATCH, 4, 8, 0)
        store.batch(idx)
    after = _memory()
    return {"before": before["anonymous"], "after": after["anonymous"], "file": after["file"]}


def memory_sizes(pairs: list[int], batches: int) -> None:
    """Print the training data path's memory per process for stores of each count of ``pairs``."""
    print(f"training data path, {batches} micro-batches of {MICRO_BATCH} read by a fresh process (MB):")
    print(f"{'pairs':>12s}{'store on disk':>15s}{'anon. before':>14s}{'anon. after':>13s}{'file pages':>12s}")
    for n in pairs:
        with tempfile.TemporaryDirectory() as tmp:
            make_store(Path(tmp), n)
            disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
            cmd = [sys.executable, __file__, "--read-store", tmp, "--memory-batches", str(batches)]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{n:>12,d}{disk:>15.1f}{got['before']:>14.1f}{got['after']:>13.1f}{got['file']:>12.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_024, 10_016, 100_000], help="candidates")
    ap.add_argument("--repeats", type=int, default=3, help="runs per size; the best is kept")
    ap.add_argument("--memory-pairs", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument(
        "--resume-sizes", type=int, nargs="*", default=[10_016, 100_000], help="candidates of finished pools"
    )
    ap.add_argument("--memory-batches", type=int, default=200, help="micro-batches read per store")
    ap.add_argument("--memory-only", action="store_true", help="only the training data path's memory")
    ap.add_argument("--read-store", type=Path, help=argparse.SUPPRESS)  # the fresh process of memory_sizes
    args = ap.parse_args(argv)
    if args.read_store is not None:
        print(json.dumps(read_store(args.read_store, args.memory_batches)))
        return 0
    if args.memory_only:
        memory_sizes(args.memory_pairs, args.memory_batches)
        return 0
    if len(set(args.sizes)) < 2 or any(n < M or n % M for n in args.sizes + args.resume_sizes):
        raise ValueError(f"--sizes needs at least 2 sizes, multiples of M = {M}, got {args.sizes}")
    t0 = time.perf_counter()
    if args.resume_sizes:
        resume_sizes(sorted(args.resume_sizes))
    runs = {n: time_size(n, args.repeats) for n in sorted(args.sizes)}
    stages = list(next(iter(runs.values())))
    head = f"{'stage':30s}" + "".join(f"{f'n={n:,}':>14s}" for n in runs)
    head += f"{'exponent':>10s}  projected: with the exponent / linear from the largest n"
    print(head)
    for stage in stages:
        xs = np.array([runs[n][stage][1] for n in runs], dtype=float)
        ts = np.array([runs[n][stage][0] for n in runs])
        slope = float(np.polyfit(np.log(xs), np.log(ts), 1)[0])
        target = next(runs[n][stage][2] for n in runs)
        fitted, linear = ts[-1] * (target / xs[-1]) ** slope, ts[-1] * target / xs[-1]
        cells = "".join(f"{_fmt(t):>14s}" for t in ts)
        print(f"{stage:30s}{cells}{slope:10.2f}  {_fmt(fitted)} / {_fmt(linear)} at {target / 1e6:g} M")
    direct = _order_per_micro(PAPER_PAIRS, 500)
    print(
        f"batch_indices at {PAPER_PAIRS:,} pairs, measured: {direct * 1e3:.3f} ms per micro-batch of {MICRO_BATCH}"
    )
    if args.memory_pairs:
        memory_sizes(args.memory_pairs, args.memory_batches)
    print(f"(pairs = 2 x candidates; {time.perf_counter() - t0:.0f} s in all)")
    return 0


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    raise SystemExit(main())
