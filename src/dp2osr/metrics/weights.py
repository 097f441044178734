"""Where a metric's weight files are found on disk, and the NIQE / BRISQUE parameters shipped with dp2osr.

Base layer, used by ``build.create`` before pyiqa runs: this project's machines cannot download, so a missing
file is a ``ValueError`` naming the metric and the file instead of a network timeout. Nothing here is copied
into a cache; files are read in place.

Where weights are found (``find_weights``): first in ``weights_dir`` (flat, or laid out like a copied torch-hub
cache: ``pyiqa/``, ``checkpoints/``, ``clip/`` sub-folders), then in pyiqa's own caches
(``~/.cache/torch/hub/pyiqa`` for pyiqa checkpoints, ``.../checkpoints`` for torchvision backbones, ``.../clip``
and ``~/.cache/clip`` for OpenAI CLIP). Q-Align (``qalign``) is a Hugging Face model (``q-future/one-align``)
that pyiqa loads by repository id: it must be in the Hugging Face cache (``HF_HOME``); ``weights_dir`` cannot
redirect it.

Packaged parameters (``IQA_PARAMS_DIR``, ``dp2osr/iqa_params/``): NIQE's and BRISQUE's, as numeric safetensors
files (sources, licences and the conversion are in its README). An official ``niqe_modelparameters.mat`` in
``weights_dir`` or pyiqa's cache takes precedence for NIQE.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import quote

import torch

from dp2osr.metrics.specs import MetricSpec

# Sub-folders of a torch-hub cache, by where a file lives; a weights_dir may mirror this layout.
_CACHE_SUBDIRS = {"pyiqa": "pyiqa", "torchvision": "checkpoints", "clip": "clip"}

# NIQE / BRISQUE parameters shipped with the package (scripts/convert_iqa_params.py wrote them).
IQA_PARAMS_DIR = Path(__file__).resolve().parent.parent / "iqa_params"


def _cache_dirs(cache: str) -> list[Path]:
    """Where pyiqa's own loaders look for a file of kind ``cache``."""
    dirs = [Path(torch.hub.get_dir()) / _CACHE_SUBDIRS[cache]]
    if cache == "clip":  # A-FINE's CLIP loader uses the OpenAI default instead of torch hub
        dirs.append(Path("~/.cache/clip").expanduser())
    return dirs


def _hf_cached(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers brings it
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def find_weights(spec: MetricSpec, weights_dir: Path | None = None) -> dict[str, Path]:
    """Local paths of every file ``spec`` needs, ``{filename: path}``; a ValueError names what is missing.

    Looks in ``weights_dir`` (flat or torch-hub layout) first, then in pyiqa's caches (see module docstring).
    """
    if not spec.weights:
        return {}
    if weights_dir is not None and not Path(weights_dir).is_dir():
        raise FileNotFoundError(f"weights_dir not found: {weights_dir}")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for wf in spec.weights:
        if wf.cache == "hf":
            path = _hf_cached(wf.filename)
            if path is None:
                missing.append(
                    f"Hugging Face model {wf.filename} ({wf.url}), not in the Hugging Face cache; "
                    "download it there (huggingface-cli download) — weights_dir cannot hold it"
                )
                continue
            found[wf.filename] = path
            continue
        # pyiqa caches a file under its URL-quoted name ("CLIP-IQA%2B_..."): accept both spellings.
        names = list(dict.fromkeys([wf.filename, quote(wf.filename)]))
        dirs = []
        if weights_dir is not None:
            dirs += [Path(weights_dir), Path(weights_dir) / _CACHE_SUBDIRS[wf.cache]]
        dirs += _cache_dirs(wf.cache)
        places = [d / n for d in dirs for n in names]
        hit = next((p for p in places if p.is_file()), None)
        if hit is None:
            where = ", ".join(str(d) for d in dirs)
            missing.append(f"{wf.filename} ({wf.role}; from {wf.url}), looked in {where}")
        else:
            found[wf.filename] = hit
    if missing:
        hint = (
            " Put the file(s) in --weights-dir (nothing is downloaded)."
            if spec.weights[0].cache != "hf"
            else ""
        )
        raise ValueError(
            f"metric {spec.name!r} needs weights that are not here: " + "; ".join(missing) + "." + hint
        )
    return found


def packaged(filename: str) -> dict[str, torch.Tensor]:
    """The tensors of ``dp2osr/iqa_params/<filename>`` (float64), a ValueError naming the file if it is absent."""
    from safetensors.torch import load_file

    path = IQA_PARAMS_DIR / filename
    if not path.is_file():
        raise ValueError(f"packaged IQA parameters not found: {path} (reinstall dp2osr)")
    return load_file(path)


def niqe_mat(params: dict[str, torch.Tensor]) -> io.BytesIO:
    """The packaged NIQE parameters as the in-memory .mat that pyiqa's NIQE reads (scipy.io.loadmat)."""
    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(
        buf,
        {
            "mu_prisparam": params["mu_pris_param"].numpy().reshape(1, -1),
            "cov_prisparam": params["cov_pris_param"].numpy(),
        },
    )
    buf.seek(0)
    return buf
