"""Which training checkpoints are complete, what each was trained on, and loading one for ``--resume``.

A checkpoint folder (``checkpoint-NNNNNN/``, written by `engine.trainer.save_checkpoint`) counts once its
``train_state.json`` is written, last: the step, the content hash of the training-data table (``data_sha``) and
the size and CRC-32 of every file in it. A resume picks the newest checkpoint whose files are all there, at their
sizes, with whole safetensors and zip (torch.save) containers and their recorded checksums, and says which newer ones it passed over; it refuses a
resume on other data and a checkpoint holding pickles that are more than tensors. It sits in the engine beside
the trainer, which calls it.
"""

from __future__ import annotations

import json
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import torch

from dp2osr.images import atomic_write
from dp2osr.paths import file_sha

STATE_FILE = "train_state.json"


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` is not whole (its header's tensors must end where the file ends)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return f"{path} is truncated"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path} has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"{path} is truncated ({size} bytes; its header needs {8 + n + max(ends, default=0)})"
    return None


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped:  # torch.save's format: a truncated file has lost its central directory
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError):
            return f"{path} is truncated"
    return None


def read_state(folder: Path) -> dict:
    """The checkpoint's ``train_state.json``; a ValueError naming the file when it is not a readable record."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON (cut short?)") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path} holds no training step")
    return state


def checkpoint_problem(folder: Path, content: bool = False) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None: it is), naming the file. ``content``: also compare
    every file's CRC-32 with the one recorded when it was saved (reads the whole checkpoint: a file damaged in
    place at its full size; tensor files carry no checksum of their own)."""
    folder = Path(folder)
    try:
        state = read_state(folder)
    except (ValueError, OSError) as exc:
        return str(exc)
    for rel, size in state.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated ({path.stat().st_size} of {size} bytes)"
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pkl"):
            problem = _file_problem(path)
            if problem:
                return problem
    for rel, crc in state.get("crc32", {}).items() if content else ():
        if _crc32(folder / rel) != crc:
            return f"{folder / rel} is damaged (its content differs from when it was saved)"
    return None


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def saved_checkpoints(out: Path) -> list[Path]:
    """Every checkpoint folder that got as far as its ``train_state.json``, oldest first."""
    return sorted(p for p in Path(out).glob("checkpoint-*") if (p / STATE_FILE).is_file())


def newest_complete(out: Path, say: bool = False, content: bool = False) -> Path | None:
    """The newest complete checkpoint in ``out``; ``say``: name on stderr each newer one passed over;
    ``content``: its files' checksums verified too (`checkpoint_problem`). Refuses (ValueError) when checkpoints
    were saved but none is complete."""
    saved = saved_checkpoints(out)
    skipped = []
    for folder in reversed(saved):
        problem = checkpoint_problem(folder, content)
        if problem is None:
            for name, why in skipped if say else []:
                print(f"note: {name} is incomplete ({why}); resuming from {folder.name}", file=sys.stderr)
            return folder
        skipped.append((folder.name, problem))
    if skipped:
        raise ValueError(f"no complete checkpoint in {out}: {skipped[0][0]}: {skipped[0][1]}")
    return None


def write_state(folder: Path, step: int, data_sha: str) -> None:
    """Write ``train_state.json`` last: the step, the data's hash and the size and CRC-32 of every file of the
    checkpoint (read back once, from the page cache: about 1 s per 2 GB)."""
    folder = Path(folder)
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / STATE_FILE]
    files = {str(p.relative_to(folder)): p.stat().st_size for p in paths}
    crc = {str(p.relative_to(folder)): _crc32(p) for p in paths}
    record = {"step": step, "data_sha": data_sha, "files": files, "crc32": crc}
    atomic_write(folder / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(record)))


def check_data(folder: Path, data: Path) -> None:
    """Refuse (ValueError) resuming ``folder`` on a data table whose content differs from the one it was
    trained on (a checkpoint without the record is taken as it is)."""
    recorded = read_state(folder).get("data_sha")
    if recorded and recorded != file_sha(data):
        raise ValueError(
            f"--resume: {data} is not the data {folder.name} was trained on (its content changed); resume "
            "with that data or train into another --output"
        )


def load(accelerator, folder: Path, ema=None) -> int:
    """Load the resumable state of ``folder`` (and its EMA); returns its step. A file that is more than
    tensors (a pickle that could run code) or cannot be read is refused in one line naming the checkpoint."""
    try:
        accelerator.load_state(str(folder / "state"))
        if ema is not None:
            ema.load_state_dict(torch.load(folder / "ema.pt", map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:
        raise ValueError(
            f"{folder}: refused to load its state: a file in it holds more than tensors (a pickle that could run "
            "code); remove that checkpoint to resume from an earlier one"
        ) from None
    except (RuntimeError, EOFError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{folder}: its state cannot be loaded ({first}); remove that checkpoint to resume from an earlier one"
        ) from None
    return read_state(folder)["step"]
