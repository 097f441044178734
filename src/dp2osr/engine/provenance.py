"""What a sample was made from: the content and option hashes a rerun reads to decide whether an output is current.

Every sample the job runner (`engine.jobs`) writes records in its PNG the hash of its LR and the hash of the
options that decide it (`options_sha`); a rerun redoes a sample whose record differs (`sample_is_current`). It sits
in the engine, between the options (`engine.options`) it hashes and the job runner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dp2osr.backbones import Backbone
from dp2osr.engine.options import ModelOptions, SamplingOptions, fast_paths, sampling_settings
from dp2osr.images import read_png_text
from dp2osr.paths import file_sha, text_sha


def _where(ref: Path | str | None) -> str:
    """A model reference as stored: an existing path made absolute, a Hub id as given, empty for none."""
    if not ref:
        return ""
    return str(Path(ref).resolve()) if Path(ref).exists() else str(ref)


def model_fields(opts: ModelOptions) -> dict[str, str]:
    """The model, as the candidates and rewards tables store it: backbone name, base and ControlNet (empty:
    the backbone's own)."""
    return {"backbone": opts.backbone, "base": _where(opts.base), "controlnet": _where(opts.controlnet)}


def model_identity(model: ModelOptions | dict[str, str]) -> str:
    """The model as one string, for the options hash: `model_fields` (or such a dict) plus, when the base or
    the ControlNet is a local file or folder, its weights' fingerprint (`weights_sha`), so a model replaced at
    the same path is another model. The tables keep only the paths."""
    fields = model_fields(model) if isinstance(model, ModelOptions) else dict(model)
    weights = {k: weights_sha(fields.get(k, "")) for k in ("base", "controlnet")}
    weights = {k: v for k, v in weights.items() if v}
    if weights:  # absent without local weights: hashes made before it existed still hold
        fields["weights"] = weights
    return json.dumps(fields, sort_keys=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_FILE_SHAS: dict[
    tuple, str
] = {}  # (path, size, mtime) -> content hash: a model file is hashed once per process


def weights_sha(ref: str) -> str:
    """The fingerprint of the model weights at ``ref``: a file's content hash (SHA-256, once per process and
    file version); for a folder, a hash of the relative path, size and modification time of every weight file
    in it (``WEIGHT_SUFFIXES``; reading a multi-GB base model at every run would cost more than it guards);
    empty for anything that is not a local path (a Hugging Face id, a training step)."""
    path = Path(ref) if ref else None
    if path is None or not path.exists():
        return ""
    if path.is_file():
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _FILE_SHAS:
            _FILE_SHAS[key] = file_sha(path)
        return _FILE_SHAS[key]
    listing = []
    for root, _, files in sorted(os.walk(path, followlinks=True)):
        for name in sorted(files):
            if name.endswith(WEIGHT_SUFFIXES):
                st = os.stat(os.path.join(root, name))
                listing.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
    return text_sha(json.dumps(listing))


# Keys of the record every sample carries in its PNG (tEXt chunks): what it was made from.
LR_SHA_KEY, OPTIONS_SHA_KEY = "dp2osr:lr_sha", "dp2osr:options_sha"


def options_sha(
    bb: Backbone, opts: SamplingOptions, upscale: int, model: str, seed: int | None = None
) -> str:
    """A hash of everything besides the LR that decides a sample: the model identity, the resolved sampling
    settings, the scale, the prompt source, the weights' dtype and the fast paths that are on (not the run-only
    batch sizes); ``seed`` where the file name does not carry it (the flat layout's ``OUT/ID.png``)."""
    settings = {k: v for k, v in sampling_settings(bb, opts).items() if k != "tile_batch"}
    settings.update({k: True for k, on in fast_paths(opts).items() if on})  # absent when off: old hashes hold
    record = {
        "model": model,
        **settings,
        "upscale": upscale,
        "dtype": str(bb.dtype),
        "prompt_source": opts.prompt_source,
        "prompt": opts.prompt,
        "ram_path": str(opts.ram_path or ""),
        "dape_path": str(opts.dape_path or ""),
    }
    if seed is not None:
        record["seed"] = seed
    return text_sha(json.dumps(record, sort_keys=True, default=str))


def lr_file_sha(path: Path) -> str | None:
    """The content hash of the LR at ``path``; None when it cannot be read (its samples are then never current)."""
    try:
        return file_sha(path)
    except OSError:
        return None


def sample_is_current(path: Path, lr_sha: str | None, opt_sha: str) -> bool:
    """Whether the sample at ``path`` decodes and records that it was made from ``lr_sha`` with ``opt_sha``."""
    record = read_png_text(path) if lr_sha is not None else None
    return record is not None and record.get(LR_SHA_KEY) == lr_sha and record.get(OPTIONS_SHA_KEY) == opt_sha
