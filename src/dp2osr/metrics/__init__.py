"""IQA metrics for the reward and evaluation: the catalogue, local weight files, building and scoring pyiqa models.

Base layer (below backbones, engine and stages): ``score``, ``upscale --select``, ``evaluate``, the held-out
evaluation and the quickstart use it as ``from dp2osr import metrics as metric_lib``. One module per concern:

- ``specs``: metric names, families (FR/NR), orientation, presets, minimum sizes and the weight files each
  needs; imports neither torch nor pyiqa, and neither does importing this package;
- ``weights``: where weight files are found (``weights_dir``, pyiqa's caches, the Hugging Face cache) and the
  NIQE / BRISQUE parameters shipped with dp2osr;
- ``loading``: how those files reach pyiqa safely (``torch.load`` with ``weights_only=True``) and offline;
- ``build``: ``create`` (a metric built from local files only) and ``score_batch``.

``create``, ``score_batch``, ``find_weights`` and ``IQA_PARAMS_DIR`` are imported on first use, so reading the
catalogue does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from dp2osr.metrics.specs import (
    FAMILIES,
    PRESETS,
    MetricSpec,
    WeightFile,
    catalogue,
    get_spec,
    min_size,
    pyiqa_configs,
    resolve_names,
)

# name -> the submodule that defines it, imported on first access (PEP 562)
_LAZY = {"create": "build", "score_batch": "build", "find_weights": "weights", "IQA_PARAMS_DIR": "weights"}

__all__ = [
    "FAMILIES",
    "IQA_PARAMS_DIR",
    "PRESETS",
    "MetricSpec",
    "WeightFile",
    "catalogue",
    "create",
    "find_weights",
    "get_spec",
    "min_size",
    "pyiqa_configs",
    "resolve_names",
    "score_batch",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups (and monkeypatching) see a plain module attribute
    return value
