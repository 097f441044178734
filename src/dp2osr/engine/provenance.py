"""What a sample was made from: the content and option hashes a rerun reads to decide whether an output is current.

Every sample the job runner (`engine.jobs`) writes records in its PNG the hash of its LR and the hash of the
options that decide it (`options_sha`); a rerun redoes a sample whose record differs (`sample_is_current`). It sits
in the engine, between the options (`engine.options`) it hashes and the job runner.
"""

from __future__ import annotations

import json
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


def model_identity(opts: ModelOptions) -> str:
    """`model_fields` as one string, for the options hash."""
    return json.dumps(model_fields(opts), sort_keys=True)


# Keys of the record every sample carries in its PNG (tEXt chunks): what it was made from.
LR_SHA_KEY, OPTIONS_SHA_KEY = "dp2osr:lr_sha", "dp2osr:options_sha"


def options_sha(bb: Backbone, opts: SamplingOptions, upscale: int, model: str) -> str:
    """A hash of everything besides the LR that decides a sample: the model identity, the resolved sampling
    settings, the scale, the prompt source, the weights' dtype and the fast paths that are on (not the run-only
    batch sizes)."""
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
