"""Where and how long a command runs: the one device resolver, the process layout under `accelerate launch` /
torchrun, and a clock of the time spent per stage over resumed runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dp2osr.images import atomic_write


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu`` / ``cuda`` / ``cuda:N`` as given, checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return dev


def process_state(device: str):
    """(accelerate ``PartialState``, this process's device). One process: ``resolve_device(device)``; under
    `accelerate launch` / torchrun with ``--device auto``: each process's own device."""
    from accelerate import PartialState

    resolved = resolve_device(device)
    state = PartialState(cpu=resolved.type == "cpu")
    own = state.device if device == "auto" and state.num_processes > 1 else resolved
    return state, own


class RunClock:
    """Seconds per stage and in total, summed over every run into one output folder: a resumed run adds its
    own time to what the earlier runs spent (kept in ``path`` after every stage, so a killed run counts too)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.prior = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.now: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def lap(self, name: str, start: float) -> None:
        """Add the time since ``start`` to stage ``name`` and save the totals."""
        self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - start
        self.now["total"] = time.perf_counter() - self.t0
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.totals(), indent=2)))

    def totals(self) -> dict:
        """``{stage: seconds, "total": seconds, "runs": n}`` over the earlier runs and this one."""
        keys = dict.fromkeys([*self.prior, *self.now])
        out = {k: self.prior.get(k, 0.0) + self.now.get(k, 0.0) for k in keys if k != "runs"}
        return {**out, "runs": int(self.prior.get("runs", 0)) + 1}
