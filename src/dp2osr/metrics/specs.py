"""The IQA metric catalogue: names, families, orientation, presets, minimum sizes and the weight files each needs.

Base layer, imported by the stages that name metrics (``score``, ``upscale --select``, ``evaluate``, the
quickstart) before anything is built; it imports neither torch nor pyiqa, so validating names is cheap. The paper
scores every candidate with image-quality models from ``pyiqa``: a full-reference (FR) set compared against the
HR and a no-reference (NR) set. For each metric name this says whether it is FR or NR and whether lower values
are better (both read from pyiqa's own ``DEFAULT_CONFIGS``, never restated here), which weight files it needs,
how they reach pyiqa (``loader``), and the smallest image it accepts (``min_size``).

Presets (``PRESETS``):

- ``paper``: FR {lpips, topiq_fr, afine_fr}, NR {maniqa, musiq, clipiqa+, topiq_nr, afine_nr, qalign}
  (arXiv 2510.18851). Every one of them needs weights.
- ``offline``: FR {fsim, gmsd}, NR {piqe}: hand-crafted metrics that need no weights and score images of any
  size (the quickstart's 64 px crops included). None of the offline NR metrics is a trustworthy judge of
  quality: PIQE, BRISQUE and NIQE all score OSEDiff's outputs above RealSR's HR images, and PIQE and BRISQUE
  score added luma noise as better. PIQE is the NR half because, of the two that work at 64 px, its hybrid
  reward does not ask the embedded model for more grain than it makes, while BRISQUE's does (measured with
  ``scripts/measure_reward_halves.py``; docs/IQA_OFFLINE.md). ``ms_ssim`` (an FR metric for images of at
  least 176 px) can be added by name.

NIQE and BRISQUE also work offline, by name (``niqe``, ``brisque``), from parameters shipped with this package
(see ``weights``). NIQE needs images of at least 96 px on the short side (one 96 px block).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dp2osr.math.reward import FAMILIES

_PYIQA_HUB = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
_CLIP_URLS = {
    "RN50.pt": "https://openaipublic.azureedge.net/clip/models/"
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "ViT-B-32.pt": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
}


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One file a metric needs: its name, where it comes from and which cache pyiqa looks in.

    ``cache`` is ``pyiqa`` (pyiqa checkpoints), ``torchvision`` (ImageNet backbones), ``clip`` (OpenAI CLIP) or
    ``hf`` (a Hugging Face repository; ``filename`` is then the repository id).
    """

    filename: str
    url: str
    cache: str
    role: str = "checkpoint"


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """What the scorer needs to know about one metric.

    ``weights`` is the tuple of files the metric needs (empty: none), or ``None`` for a pyiqa metric this
    catalogue does not describe (then pyiqa's own loading is used and errors are reported as they come).
    ``max_batch`` caps how many images one call may take (``None``: any); ``min_size`` is the smallest short
    side the metric accepts; ``random_kwargs`` builds it with random weights (tests only).
    """

    name: str
    pyiqa_name: str
    family: str
    lower_better: bool
    weights: tuple[WeightFile, ...] | None
    loader: str = "none"
    min_size: int = 1
    max_batch: int | None = None
    random_kwargs: dict[str, Any] | None = None


def _pyiqa_file(name: str) -> WeightFile:
    return WeightFile(name, _PYIQA_HUB + quote(name), "pyiqa")


def _clip(name: str) -> WeightFile:
    return WeightFile(name, _CLIP_URLS[name], "clip", role="CLIP backbone")


_ALEXNET = WeightFile(
    "alexnet-owt-7be5be79.pth",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "torchvision",
    role="ImageNet AlexNet backbone",
)
_VGG16 = WeightFile(
    "vgg16-397923af.pth",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "torchvision",
    role="ImageNet VGG16 backbone",
)
_RANDOM_TOPIQ = {"pretrained": False, "backbone_pretrain": False}

# name -> (weights, loader, extra MetricSpec fields). Family and orientation come from pyiqa.
_KNOWN: dict[str, tuple[tuple[WeightFile, ...], str, dict[str, Any]]] = {
    # --- the paper's FR set (arXiv 2510.18851)
    "lpips": ((_pyiqa_file("LPIPS_v0.1_alex-df73285e.pth"), _ALEXNET), "path", {}),
    "topiq_fr": (
        (_pyiqa_file("cfanet_fr_kadid_res50-2c4cc61d.pth"),),
        "topiq",
        {"random_kwargs": _RANDOM_TOPIQ},
    ),
    # A-FINE: pyiqa's forward squeezes/unsqueezes dim 0, so a batch of B > 1 becomes 5-D and fails
    "afine_fr": ((_pyiqa_file("afine.pth"), _clip("ViT-B-32.pt")), "afine", {"max_batch": 1}),
    # --- the paper's NR set
    "maniqa": ((_pyiqa_file("ckpt_koniq10k.pt"),), "maniqa", {}),
    "musiq": (
        (_pyiqa_file("musiq_koniq_ckpt-e95806b9.pth"),),
        "path",
        {"random_kwargs": {"pretrained": False}},
    ),
    "clipiqa+": ((_pyiqa_file("CLIP-IQA+_learned_prompts-603f3273.pth"), _clip("RN50.pt")), "clipiqa", {}),
    "topiq_nr": (
        (_pyiqa_file("cfanet_nr_koniq_res50-9a73138b.pth"),),
        "topiq",
        {"random_kwargs": _RANDOM_TOPIQ},
    ),
    "afine_nr": ((_pyiqa_file("afine.pth"), _clip("ViT-B-32.pt")), "afine", {"max_batch": 1}),
    "qalign": (
        (WeightFile("q-future/one-align", "https://huggingface.co/q-future/one-align", "hf", role="model"),),
        "hf",
        {"max_batch": 1},  # pyiqa asserts batch size 1
    ),
    # --- other weight-backed metrics (evaluation extras)
    "dists": ((_pyiqa_file("DISTS_weights-f5e65c96.pth"), _VGG16), "path", {}),
    # NIQE: the official file when present, else the packaged parameters; one 96 px block at least
    "niqe": ((_pyiqa_file("niqe_modelparameters.mat"),), "niqe", {"min_size": 96}),
    # BRISQUE: always the packaged SVM (pyiqa's own file is a pickle)
    "brisque": ((), "brisque", {"min_size": 7}),
    # --- no weights at all (checked offline with pyiqa 0.1.16; min_size: the smallest short side each accepts)
    "ms_ssim": ((), "none", {"min_size": 176}),
    "fsim": ((), "none", {}),
    "gmsd": ((), "none", {"min_size": 3}),
    "piqe": ((), "none", {"min_size": 8}),
    "psnr": ((), "none", {}),
    "psnry": ((), "none", {}),
    "ssim": ((), "none", {"min_size": 11}),  # its 11 px window
    "ssimc": ((), "none", {"min_size": 11}),
    "cw_ssim": ((), "none", {}),
    "vif": ((), "none", {}),
    "vsi": ((), "none", {}),
    "nlpd": ((), "none", {}),
    "mad": ((), "none", {}),
    "entropy": ((), "none", {}),
}

PRESETS: dict[str, tuple[str, ...]] = {
    "paper": (
        "lpips",
        "topiq_fr",
        "afine_fr",
        "maniqa",
        "musiq",
        "clipiqa+",
        "topiq_nr",
        "afine_nr",
        "qalign",
    ),
    "offline": ("fsim", "gmsd", "piqe"),
}


@lru_cache(maxsize=1)
def pyiqa_configs() -> dict[str, dict[str, Any]]:
    """pyiqa's ``DEFAULT_CONFIGS`` (metric_mode, lower_better, ...), read without importing pyiqa (~4 s)."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or spec.origin is None:
        raise ImportError("pyiqa is not installed (pip install pyiqa==0.1.16)")
    path = Path(spec.origin).parent / "default_model_configs.py"
    try:
        mod_spec = importlib.util.spec_from_file_location("_dp2osr_pyiqa_configs", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return dict(module.DEFAULT_CONFIGS)
    except Exception:  # noqa: BLE001 - layout changed: fall back to the real import
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        return dict(DEFAULT_CONFIGS)


def get_spec(name: str) -> MetricSpec:
    """The ``MetricSpec`` of a metric name: one of ``_KNOWN`` or any pyiqa metric (``pyiqa.list_models()``)."""
    configs = pyiqa_configs()
    if name not in configs:
        raise ValueError(
            f"unknown metric {name!r}; catalogued: {sorted(_KNOWN)}; any pyiqa metric name is also accepted "
            "(python -c 'import pyiqa; print(pyiqa.list_models())')"
        )
    cfg = configs[name]
    family = str(cfg.get("metric_mode", "")).lower()
    if family not in FAMILIES:
        raise ValueError(f"metric {name!r} is neither full-reference nor no-reference (mode {family!r})")
    lower_better = bool(cfg.get("lower_better", False))
    if name in _KNOWN:
        weights, loader, extra = _KNOWN[name]
        return MetricSpec(name, name, family, lower_better, weights, loader, **extra)
    return MetricSpec(name, name, family, lower_better, None)


def min_size(name: str | None) -> int:
    """The smallest short side (px) metric ``name`` accepts: ``get_spec(name).min_size``, read from the catalogue
    alone (no pyiqa configs), so any name works; one this catalogue does not describe accepts any size."""
    extra = _KNOWN[name][2] if name in _KNOWN else {}
    return extra.get("min_size", MetricSpec.min_size)


def random_weight_names() -> list[str]:
    """The catalogued metrics that can be built with random weights (``create(allow_random_weights=True)``)."""
    return sorted(n for n, k in _KNOWN.items() if "random_kwargs" in k[2])


def catalogue(names: list[str] | tuple[str, ...]) -> dict[str, MetricSpec]:
    """``{name: MetricSpec}`` for ``names``, in order (duplicates dropped)."""
    return {n: get_spec(n) for n in dict.fromkeys(names)}


def resolve_names(preset: str, metrics: list[str] | None = None) -> list[str]:
    """The metric names to use: ``metrics`` when given (it overrides the preset), else the preset's."""
    if metrics:
        names = list(dict.fromkeys(metrics))
    else:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        names = list(PRESETS[preset])
    for n in names:
        get_spec(n)
    return names
