"""Files against shards (`sample --pool-layout`): files made and the time to write and read a candidate.

A synthetic pool of n tiny PNG candidates (M = 32 per image, ``--side`` px, random pixels so the PNG does not
shrink) is written in both layouts: ``ID/seed_XXXX.png`` files (atomically, as `images.save_image` does) and
tar shards (`engine.pool_store.ShardWriter`). Printed per layout: the files and folders made, the bytes on
disk, the write time per candidate, and the read time per candidate (`pool_store.read_image`: bytes and PNG
decode; and `pool_store.read_bytes` alone) in a shuffled order, as training reads them, in a fresh process
state (no shard open or indexed yet: the shards' indexing is included). The page cache is warm on both sides:
what differs on a cluster file system is the per-file metadata work (one open per candidate against one
per shard), which a local disk hides, so the file counts are the numbers that carry over.

    .venv/bin/python benchmarks/pool_layout.py              # 10^4 candidates (~5 min on 2 busy shared cores)
    .venv/bin/python benchmarks/pool_layout.py --n 100000 --side 64
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dp2osr.engine import pool_store
from dp2osr.images import png_bytes, save_image

M = 32


def _candidates(n: int, side: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (f"img{k // M:06d}/seed_{k % M:04d}.png", torch.rand(1, 3, side, side, generator=gen))
        for k in range(n)
    ]


def _tree(folder: Path) -> tuple[int, int, int]:
    files = dirs = size = 0
    for _, dnames, fnames in os.walk(folder):
        dirs += len(dnames)
        files += len(fnames)
        size += sum(os.path.getsize(os.path.join(_, f)) for f in fnames)
    return files, dirs, size


def _read(refs: list[str], fn) -> float:
    pool_store._OPEN.clear()
    start = time.perf_counter()
    for ref in refs:
        fn(ref)
    return (time.perf_counter() - start) / len(refs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_016, help="candidates")
    ap.add_argument("--side", type=int, default=32, help="candidate side in px")
    args = ap.parse_args(argv)
    cands = _candidates(args.n, args.side)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for name, image in cands:
            save_image(image, root / "files" / name, {"dp2osr:lr_sha": "0" * 64})
        t_files = (time.perf_counter() - start) / args.n
        start = time.perf_counter()
        writer = pool_store.ShardWriter(root / "shards", 0, 0)
        refs = [writer.put(name, png_bytes(image, {"dp2osr:lr_sha": "0" * 64})) for name, image in cands]
        writer.close()
        t_shards = (time.perf_counter() - start) / args.n
        order = list(range(args.n))
        random.Random(0).shuffle(order)
        layouts = {
            "files": ([str(root / "files" / cands[k][0]) for k in order], t_files),
            "shards": ([str(root / "shards" / refs[k]) for k in order], t_shards),
        }
        print(f"{args.n} candidates of {args.side}x{args.side} px, M = {M}")
        print(
            f"{'layout':8} {'files':>7} {'folders':>7} {'MB':>7} {'write ms':>9} {'read ms':>8} {'bytes ms':>9}"
        )
        for layout, (paths, t_write) in layouts.items():
            files, dirs, size = _tree(root / layout)
            t_image = _read(paths, pool_store.read_image)
            t_bytes = _read(paths, pool_store.read_bytes)
            print(
                f"{layout:8} {files:7d} {dirs:7d} {size / 1e6:7.1f} {t_write * 1e3:9.3f} {t_image * 1e3:8.3f} "
                f"{t_bytes * 1e3:9.4f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
