"""Where a command runs: the one device resolver, and the process layout under `accelerate launch` / torchrun."""

from __future__ import annotations

import torch


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
