"""The frozen training inputs on disk (OUTPUT/frozen/): computed once before `dp2osr train`'s first step.

Only the ControlNet trains, so the VAE latents of the training images, the control images and the prompt
embeddings never change. `prepare` computes them in one pass sharded over the processes (each encodes the
targets and controls of its share of the distinct LR images, and its share of the distinct prompts; one
process does everything) with `train_data.FrozenEncoder`, and writes them as blocks of fixed-shape rows: one
raw file per (kind, row shape, dtype, process), memory-mapped by every process (the processes of a node share
the page cache) and read per micro-batch, so a process's memory does not grow with the pool. Rows are the
encoders' tensors bit for bit (same dtype), so training from the store equals encoding every step
(`train_data.OnTheFly`, ``--no-cache``). A control that is the upsampled LR itself (pixel controls: SD2, the
embedded model) is kept as its 8-bit LR and rebuilt per batch (resize + ``prepare_control``, exact); other
controls (FLUX's latents) are kept as prepared.

Layout: ``manifest.json`` (written last: a folder without it is incomplete) names the blocks and the
fingerprint of the inputs (data table hash, mode, pair weights, backbone, base, precision, upscale);
``data_files.parquet`` records the size and modification time of every image encoded (`data_stamps`; a
``--no-cache`` run records its images in OUTPUT/data_files.parquet instead). A run
with the same fingerprint and unchanged images (a resume) reuses the folder, any other rebuilds it (a resume
whose images changed is refused). ``examples/SLOT.npy`` holds, per
example, the (block, row) of each slot (``target0``, ``target1``, ``control``, ``cond.NAME``) and
``examples/weights.npy`` the pair weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dp2osr.backbones import Backbone, Cond
from dp2osr.engine import data_stamps
from dp2osr.engine.train_data import Examples, FrozenEncoder, OnTheFly, assemble, read_examples
from dp2osr.images import atomic_write, load_image, write_parquet
from dp2osr.paths import text_sha
from dp2osr.runtime import from_main

FORMAT = 1
FOLDER = "frozen"
MANIFEST = "manifest.json"
LR8 = "lr8"  # kind of a pixel control kept as its 8-bit LR


def fingerprint(cfg, data_sha: str) -> str:
    """What the stored inputs depend on: the data table's content hash and the options that change them."""
    keys = {
        "format": FORMAT,
        "data_sha": data_sha,
        **{
            k: str(getattr(cfg, k)) for k in ("mode", "hpo", "backbone", "base", "mixed_precision", "upscale")
        },
    }
    return text_sha(json.dumps(keys, sort_keys=True))


def check_unchanged(output: Path) -> None:
    """Refuse (ValueError naming the file) to resume a run in ``output`` whose images changed since it read
    them: its checkpoints were trained on the old ones."""
    changed = data_stamps.first_changed(Path(output) / FOLDER) or data_stamps.first_changed(output)
    if changed:
        raise ValueError(
            f"--resume: {changed} changed since {output} was trained on it (its size or modification time "
            "differs, or it is gone); restore it, or train into another --output"
        )


def training_inputs(cfg, bb: Backbone, state, data_sha: str):
    """The batches of ``cfg``'s training data: the stored inputs (`FrozenStore`, built or reused under
    OUTPUT/frozen/), or with ``--no-cache`` `train_data.OnTheFly`. ``state``: the accelerate state (ranks).
    An image replaced since the inputs were stored (`data_stamps`) makes them encoded again (a resume is
    refused before: `check_unchanged`)."""
    enc = FrozenEncoder(bb, cfg.upscale)
    folder = Path(cfg.output) / FOLDER
    if not cfg.cache:
        ex = read_examples(cfg.data, cfg.mode, cfg.hpo)
        if state.is_main_process:  # no store: the run's images are recorded in OUTPUT, for a later --resume
            data_stamps.record(data_stamps.stamps(data_stamps.example_paths(ex)), Path(cfg.output))
        return OnTheFly(enc, ex)
    if state.is_main_process:  # the store's own record holds for a run that reads the store
        (Path(cfg.output) / data_stamps.FILE).unlink(missing_ok=True)
    # one stat per image, on the main process only; every process needs the answer (the build is collective)
    changed = (data_stamps.first_changed(folder) or "") if state.is_main_process else ""
    if state.num_processes > 1:
        changed = from_main(changed)
    fp = fingerprint(cfg, data_sha)
    if changed or not is_complete(folder, fp):
        if changed and state.is_main_process:
            print(f"note: {changed} changed since {folder} was encoded; encoding it again", file=sys.stderr)
        build(folder, enc, lambda: read_examples(cfg.data, cfg.mode, cfg.hpo), state, fp)
    return FrozenStore(folder, enc)


def is_complete(folder: Path, fp: str) -> bool:
    if not (folder / data_stamps.FILE).is_file():  # a store from before images were recorded
        return False
    try:
        return json.loads((folder / MANIFEST).read_text())["fingerprint"] == fp
    except (OSError, ValueError, KeyError):
        return False


# -------------------------------------------------------------------------------------------- writing
class _Writer:
    """One process's blocks: each row appended to the raw file of its (kind, shape, dtype)."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = folder, rank
        self.blocks: list[dict] = []
        self.keys: list[tuple[str, str, int, int]] = []  # (kind, key, block, row)
        self._files: dict[tuple, tuple[int, object]] = {}

    def add(self, kind: str, key: str, t: torch.Tensor) -> None:
        t = t.contiguous()
        sig = (kind, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        if sig not in self._files:
            name = f"{kind}-r{self.rank:03d}-{len(self.blocks):03d}.bin"
            self.blocks.append(
                {"file": name, "kind": kind, "shape": list(sig[1]), "dtype": sig[2], "rows": 0}
            )
            self._files[sig] = (len(self.blocks) - 1, (self.folder / name).open("wb"))
        b, f = self._files[sig]
        f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.keys.append((kind, key, b, self.blocks[b]["rows"]))
        self.blocks[b]["rows"] += 1

    def close(self) -> None:
        for _, f in self._files.values():
            f.close()
        keys = pd.DataFrame(self.keys, columns=["kind", "key", "block", "row"])
        write_parquet(keys, self.folder / f"keys-r{self.rank:03d}.parquet")
        (self.folder / f"blocks-r{self.rank:03d}.json").write_text(json.dumps(self.blocks))


def _target_key(path: str, lr_path: str) -> str:
    return f"{path}\n{lr_path}"  # latents depend on the LR too (autoencoders that encode a residual over it)


def _as_lr8(lr: torch.Tensor) -> torch.Tensor | None:
    """``lr`` as uint8 when it is exactly k/255 everywhere (as an 8-bit image reads), else None."""
    u8 = (lr * 255).round().clamp(0, 255).to(torch.uint8)
    return u8 if torch.equal(u8.float() / 255.0, lr) else None


@torch.no_grad()
def encode_share(enc: FrozenEncoder, ex: Examples, w: _Writer, rank: int, world: int) -> None:
    """Encode this process's share: every ``world``-th distinct LR (its control and the latents of the targets
    paired with it) and every ``world``-th distinct prompt (the empty one included: prompt dropout)."""
    targets: dict[str, set[str]] = {}
    for paths, lr in zip(ex.images, ex.lr):
        targets.setdefault(lr, set()).update(paths)
    for lr_path in sorted(targets)[rank::world]:
        lr = load_image(Path(lr_path))
        up = enc.upsample(lr)
        control = enc.control(up)
        lr8 = _as_lr8(lr[0]) if control.shape[-2:] == up.shape[-2:] else None
        if lr8 is not None:
            w.add(LR8, lr_path, lr8)
        else:
            w.add("control", lr_path, control)
        for path in sorted(targets[lr_path]):
            w.add("latent", _target_key(path, lr_path), enc.latents(path, lr_path, up))
    for prompt in sorted(set(ex.prompts) | {""})[rank::world]:
        for name, t in enc.cond(prompt).items():
            w.add(f"cond.{name}", prompt, t[0])


def build(folder: Path, enc: FrozenEncoder, examples, state, fp: str) -> None:
    """Write the store of ``examples()`` (read by every process) into ``folder``, sharded over ``state``'s
    processes; the main process then writes the per-example index and the manifest."""
    state.wait_for_everyone()  # every process has seen the folder incomplete before it is cleared
    if state.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "examples").mkdir(parents=True)
    state.wait_for_everyone()
    ex = examples()
    files = data_stamps.stamps(data_stamps.example_paths(ex)) if state.is_main_process else None
    writer = _Writer(folder, state.process_index)
    encode_share(enc, ex, writer, state.process_index, state.num_processes)
    writer.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_index(folder, ex, state.num_processes, fp, files)
    state.wait_for_everyone()


def _lookup(keys: pd.DataFrame, kinds: list[str], wanted: list[str], what: str) -> np.ndarray:
    """``(len(wanted), 2)`` int64 (block, row) of each wanted key among the rows of ``kinds``."""
    rows = keys[keys.kind.isin(kinds)].set_index("key")[["block", "row"]]
    found = rows.reindex(wanted)
    if found.isna().any().any():
        raise RuntimeError(f"frozen store: no {what} stored for {wanted[int(found.block.isna().argmax())]!r}")
    return found.to_numpy(np.int64)


def write_index(folder: Path, ex: Examples, world: int, fp: str, files: pd.DataFrame | None = None) -> None:
    """Join the processes' blocks and keys into the per-example (block, row) columns and the manifest; record
    the images encoded (``files``: their `data_stamps.stamps` taken before encoding; default: now)."""
    blocks, frames = [], []
    for r in range(world):
        keys = pd.read_parquet(folder / f"keys-r{r:03d}.parquet")
        frames.append(keys.assign(block=keys.block + len(blocks)))
        blocks += json.loads((folder / f"blocks-r{r:03d}.json").read_text())
    keys = pd.concat(frames, ignore_index=True)
    names = sorted(k.removeprefix("cond.") for k in keys.kind.unique() if k.startswith("cond."))
    slots = {}
    for j in range(len(ex.images[0])):
        wanted = [_target_key(p[j], lr) for p, lr in zip(ex.images, ex.lr)]
        slots[f"target{j}"] = _lookup(keys, ["latent"], wanted, "latents")
    slots["control"] = _lookup(keys, ["control", LR8], ex.lr, "control")
    empty = {}
    for name in names:
        slots[f"cond.{name}"] = _lookup(keys, [f"cond.{name}"], ex.prompts, "prompt embedding")
        empty[name] = _lookup(keys, [f"cond.{name}"], [""], "prompt embedding")[0].tolist()
    for slot, arr in slots.items():
        np.save(folder / "examples" / f"{slot}.npy", arr)
    np.save(folder / "examples" / "weights.npy", ex.weights.numpy().astype(np.float32))
    data_stamps.record(data_stamps.stamps(data_stamps.example_paths(ex)) if files is None else files, folder)
    manifest = {
        "fingerprint": fp,
        "examples": len(ex),
        "slots": list(slots),
        "cond": names,
        "empty_prompt": empty,
        "blocks": blocks,
    }
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


# -------------------------------------------------------------------------------------------- reading
class FrozenStore:
    """Batches read from a store folder: memory-mapped rows, nothing held per example."""

    def __init__(self, folder: Path, enc: FrozenEncoder) -> None:
        self.folder, self.enc = Path(folder), enc
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        cols = self.folder / "examples"
        self.slots = {s: np.load(cols / f"{s}.npy", mmap_mode="r") for s in self.manifest["slots"]}
        self.weights = np.load(cols / "weights.npy", mmap_mode="r")
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.manifest["examples"])

    def row(self, block: int, row: int) -> torch.Tensor:
        """Row ``row`` of block ``block``: the stored tensor, bit for bit."""
        meta = self.manifest["blocks"][block]
        if block not in self._maps:
            self._maps[block] = np.memmap(self.folder / meta["file"], dtype=np.uint8, mode="r").reshape(
                meta["rows"], -1
            )
        raw = torch.from_numpy(np.array(self._maps[block][row]))
        return raw.view(getattr(torch, meta["dtype"])).reshape(meta["shape"])

    def control(self, block: int, row: int) -> torch.Tensor:
        t = self.row(block, row)
        if self.manifest["blocks"][block]["kind"] != LR8:
            return t
        return self.enc.control(self.enc.upsample((t.float() / 255.0).unsqueeze(0)))

    def cond(self, i: int, drop: bool) -> Cond:
        names, empty = self.manifest["cond"], self.manifest["empty_prompt"]
        at = {n: (empty[n] if drop else self.slots[f"cond.{n}"][i]) for n in names}
        return {n: self.row(int(b), int(r)).unsqueeze(0) for n, (b, r) in at.items()}

    def batch(self, idx: list[int], drop_prompt: list[bool] | None = None):
        """(targets ``(K, B, C, h, w)``, control ``(B, ...)``, cond, weights ``(B,)``) for examples ``idx``."""
        k = sum(s.startswith("target") for s in self.slots)
        targets = [[self.row(*map(int, self.slots[f"target{j}"][i])) for i in idx] for j in range(k)]
        controls = [self.control(*map(int, self.slots["control"][i])) for i in idx]
        conds = [self.cond(i, bool(drop_prompt and drop_prompt[n])) for n, i in enumerate(idx)]
        weights = torch.from_numpy(np.array(self.weights[idx]))
        return assemble(self.enc.bb.device, targets, controls, conds, weights)
