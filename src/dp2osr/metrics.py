"""The IQA metric catalogue: names, families, orientation and the weight files each metric needs.

the paper scores every candidate with image-quality models from ``pyiqa``: a full-reference (FR) set
compared against the HR and a no-reference (NR) set. This module says, for each metric name, whether it is FR
or NR, whether lower values are better (read from pyiqa's own ``DEFAULT_CONFIGS``, never restated here), which
weight files it needs, and builds it (``create``) from local files only — this project's machines cannot
download, so a missing file is a ``ValueError`` naming the metric and the file instead of a network timeout.

Presets (``PRESETS``):

- ``paper``: FR {lpips, topiq_fr, afine_fr}, NR {maniqa, musiq, clipiqa+, topiq_nr, afine_nr, qalign}
  (arXiv 2510.18851). Every one of them needs weights.
- ``offline``: FR {fsim, gmsd}, NR {piqe}: hand-crafted metrics that need no weights and score images of any
  size (the quickstart's 64 px crops included). None of the offline NR metrics is a trustworthy judge of
  quality: PIQE, BRISQUE and NIQE all score OSEDiff's outputs above RealSR's HR images, and PIQE and BRISQUE
  score added luma noise as better. PIQE is the NR half because, of the two that work at 64 px, its hybrid
  reward does not ask the embedded model for more grain than it makes, while BRISQUE's does (measured with
  ``research/measure_reward_halves.py``; docs/IQA_OFFLINE.md). ``ms_ssim`` (an FR metric for images of at
  least 176 px) can be added by name.

NIQE and BRISQUE also work offline, by name (``niqe``, ``brisque``): their parameters ship with this package
(``dp2osr/iqa_params/``, numeric safetensors files; sources, licences and the conversion are in its README).
An official ``niqe_modelparameters.mat`` in ``weights_dir`` or pyiqa's cache takes precedence for NIQE. NIQE
needs images of at least 96 px on the short side (one 96 px block).

Where weights are found (``find_weights``): first in ``weights_dir`` (flat, or laid out like a copied torch-hub
cache: ``pyiqa/``, ``checkpoints/``, ``clip/`` sub-folders), then in pyiqa's own caches
(``~/.cache/torch/hub/pyiqa`` for pyiqa checkpoints, ``.../checkpoints`` for torchvision backbones, ``.../clip``
and ``~/.cache/clip`` for OpenAI CLIP). Files are read in place, never copied into a cache. Q-Align (``qalign``) is a Hugging Face
model (``q-future/one-align``) that pyiqa loads by repository id: it must be in the Hugging Face cache
(``HF_HOME``); ``weights_dir`` cannot redirect it.

How local files reach pyiqa: ``pretrained_model_path`` where pyiqa's handling of it matches its default
download branch (lpips, musiq, niqe, afine_*). Where it does not, the metric is built without weights and the
file is loaded exactly as pyiqa's default branch would have loaded it: topiq_* (pyiqa loads a
``pretrained_model_path`` with ``strict=False`` — a wrong file would silently leave random weights),
maniqa (pyiqa expects ``{"params": ...}`` from ``pretrained_model_path`` but the published file is a bare state
dict) and clipiqa+ (no ``pretrained_model_path`` option at all). Backbones: CLIP files are passed by path;
timm backbones are not fetched at all where the metric's checkpoint holds them (topiq_*, maniqa); the
torchvision AlexNet that LPIPS always requests is served from the local file.

Safety: while a metric is built, every ``torch.load`` (dp2osr's and pyiqa's, which passes
``weights_only=False``) runs with ``weights_only=True``. A file that needs full unpickling — which could run
code hidden in a file dropped into the weights folder — is refused with a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch

FAMILIES = ("fr", "nr")

_PYIQA_HUB = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
_CLIP_URLS = {
    "RN50.pt": "https://openaipublic.azureedge.net/clip/models/"
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "ViT-B-32.pt": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
}

# Sub-folders of a torch-hub cache, by where a file lives; a weights_dir may mirror this layout.
_CACHE_SUBDIRS = {"pyiqa": "pyiqa", "torchvision": "checkpoints", "clip": "clip"}


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

# NIQE / BRISQUE parameters shipped with the package (scripts/convert_iqa_params.py wrote them).
IQA_PARAMS_DIR = Path(__file__).resolve().parent / "iqa_params"
_BRISQUE_TOKEN = (
    "<dp2osr packaged BRISQUE SVM>"  # the "path" pyiqa's BRISQUE is given; see _serve_brisque_svm
)

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
    "brisque": ((), "brisque", {}),
    # --- no weights at all (checked offline with pyiqa 0.1.16)
    "ms_ssim": ((), "none", {"min_size": 176}),
    "fsim": ((), "none", {}),
    "gmsd": ((), "none", {}),
    "piqe": ((), "none", {}),
    "psnr": ((), "none", {}),
    "psnry": ((), "none", {}),
    "ssim": ((), "none", {}),
    "ssimc": ((), "none", {}),
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


# ----------------------------------------------------------------------------------------------- weights


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


@contextlib.contextmanager
def _local_state_dicts(files: dict[str, Path]) -> Iterator[None]:
    """Serve torchvision/torch-hub ``load_state_dict_from_url`` requests for ``files`` from disk."""
    if not files:
        yield
        return
    import torch.hub
    import torchvision.models._api as tv_api

    originals = (torch.hub.load_state_dict_from_url, tv_api.load_state_dict_from_url)

    def load(url: str, *args: Any, **kwargs: Any) -> Any:
        name = kwargs.get("file_name") or Path(url.split("?")[0]).name
        if name in files:
            return torch.load(files[name], map_location="cpu", weights_only=True)
        return originals[0](url, *args, **kwargs)

    torch.hub.load_state_dict_from_url = load  # type: ignore[assignment]
    tv_api.load_state_dict_from_url = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.hub.load_state_dict_from_url, tv_api.load_state_dict_from_url = originals  # type: ignore[assignment]


@contextlib.contextmanager
def _timm_without_download() -> Iterator[None]:
    """Build timm backbones with random weights (for metrics whose own checkpoint overwrites them)."""
    import timm

    original = timm.create_model

    def create_model(*args: Any, **kwargs: Any) -> Any:
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


class _Tee(io.TextIOBase):
    """Forward writes to ``stream`` and keep a copy (to find the URL pyiqa tried to download)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.buffer_.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _download_hint(printed: str, exc: BaseException) -> str:
    urls = re.findall(r'Downloading: "([^"]+)"', printed)
    if urls:
        return (
            f"it needs {Path(urls[-1]).name} ({urls[-1]}), which cannot be downloaded here; this metric is not in"
            " dp2osr's catalogue, so pyiqa looks for that file in its own cache (~/.cache/torch/hub/...)"
        )
    return f"it probably needs weights that are not available offline ({type(exc).__name__}: {exc})"


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _file_name(f: Any) -> str:
    return str(getattr(f, "name", f))


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` while a metric is built (pyiqa passes ``weights_only=False``).

    A weight file is plain tensors and containers; one that needs full unpickling (which can run arbitrary
    code) is refused with a ValueError naming it, before anything in it is executed.
    """
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"refusing to load {_file_name(f)}: it is not a plain weights file (it needs full unpickling, "
                "which can run code); only tensors, numbers, strings and containers of them are read"
            ) from exc

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _load_network(path: Path, weight_keys: str | None) -> Callable[[torch.nn.Module], None]:
    """A post-build step loading ``path`` strictly, as pyiqa's default (download) branch would."""

    def load(net: torch.nn.Module) -> None:
        from pyiqa.archs.arch_util import load_pretrained_network

        load_pretrained_network(net, str(path), True, weight_keys=weight_keys)

    return load


def _packaged(filename: str) -> dict[str, torch.Tensor]:
    """The tensors of ``dp2osr/iqa_params/<filename>`` (float64), a ValueError naming the file if it is absent."""
    from safetensors.torch import load_file

    path = IQA_PARAMS_DIR / filename
    if not path.is_file():
        raise ValueError(f"packaged IQA parameters not found: {path} (reinstall dp2osr)")
    return load_file(path)


def _niqe_mat(params: dict[str, torch.Tensor]) -> io.BytesIO:
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


@contextlib.contextmanager
def _serve_brisque_svm(svm: dict[str, torch.Tensor]) -> Iterator[None]:
    """Answer pyiqa BRISQUE's ``torch.load(path, weights_only=False)`` for ``_BRISQUE_TOKEN`` from ``svm``.

    pyiqa reads ``(sv_coef, sv)`` from a pickle; this hands it the packaged tensors instead, so no pickle is read.
    Any other path goes to the real ``torch.load``.
    """
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, str) and f == _BRISQUE_TOKEN:
            return svm["sv_coef"].clone(), svm["sv"].clone()
        return original(f, *args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _set_brisque_svm(svm: dict[str, torch.Tensor]) -> Callable[[torch.nn.Module], None]:
    """Set the SVR's gamma and rho from ``svm``; check its feature ranges are the ones pyiqa scales with."""

    def post(net: torch.nn.Module) -> None:
        from pyiqa.archs.brisque_arch import scale_features

        ends = scale_features(torch.stack([svm["feature_min"], svm["feature_max"]]))
        if not torch.allclose(
            ends, torch.tensor([[-1.0], [1.0]], dtype=ends.dtype).expand_as(ends), atol=1e-6
        ):
            raise ValueError(
                f"{IQA_PARAMS_DIR / 'brisque_svm.safetensors'}: its feature ranges differ from the ones pyiqa's "
                "BRISQUE scales features with; the SVM would be fed wrongly scaled features"
            )
        net.gamma, net.rho = float(svm["gamma"]), float(svm["rho"])

    return post


def _load_clipiqa_prompts(path: Path) -> Callable[[torch.nn.Module], None]:
    """CLIP-IQA+'s learned prompts, loaded the way pyiqa's CLIPIQA does it."""

    def load(net: torch.nn.Module) -> None:
        ctx = net.prompt_learner.ctx
        ctx.data = torch.load(path, map_location="cpu", weights_only=True).to(ctx.device)

    return load


def create(
    name: str,
    device: str | torch.device = "cpu",
    weights_dir: Path | None = None,
    *,
    allow_random_weights: bool = False,
) -> torch.nn.Module:
    """Build the pyiqa metric ``name`` on ``device`` from local weights only.

    Missing weights raise a ValueError naming the metric and the file (checked before pyiqa runs, so nothing
    is downloaded and nothing waits on the network). ``allow_random_weights`` builds the catalogued metrics
    that support it (musiq, topiq_nr, topiq_fr) with random weights — right interface, meaningless scores;
    for tests only. Returns pyiqa's ``InferenceModel`` (call it with ``(images)`` or ``(images, ref)``;
    ``score_batch`` does it safely). A metric this catalogue does not describe is built by pyiqa as usual;
    a failed download is then reported with the file pyiqa asked for.
    """
    spec = get_spec(name)
    dev = _device(device)
    kwargs: dict[str, Any] = {}
    served: dict[str, Path] = {}  # torchvision backbones read from local files
    post: Callable[[torch.nn.Module], None] | None = None
    no_timm_download = False
    brisque_svm: dict[str, torch.Tensor] | None = None
    if spec.loader == "niqe" and not allow_random_weights:
        try:
            kwargs["pretrained_model_path"] = str(find_weights(spec, weights_dir)["niqe_modelparameters.mat"])
        except ValueError:  # no official file: the packaged parameters
            kwargs["pretrained_model_path"] = _niqe_mat(_packaged("niqe_pris.safetensors"))
    elif spec.loader == "brisque" and not allow_random_weights:
        brisque_svm = _packaged("brisque_svm.safetensors")
        kwargs["pretrained_model_path"] = _BRISQUE_TOKEN
        post = _set_brisque_svm(brisque_svm)
    elif allow_random_weights:
        if spec.random_kwargs is None:
            allowed = sorted(n for n, k in _KNOWN.items() if "random_kwargs" in k[2])
            raise ValueError(f"metric {name!r} cannot be built with random weights; allowed: {allowed}")
        kwargs = dict(spec.random_kwargs)
    elif spec.weights:
        files = find_weights(spec, weights_dir)
        ckpt = files[spec.weights[0].filename]
        if spec.loader == "path":
            kwargs["pretrained_model_path"] = str(ckpt)
            served = {wf.filename: files[wf.filename] for wf in spec.weights if wf.cache == "torchvision"}
        elif spec.loader == "afine":
            kwargs.update(pretrained_model_path=str(ckpt), clip_backbone=str(files["ViT-B-32.pt"]))
        elif spec.loader == "topiq":
            kwargs.update(pretrained=False, backbone_pretrain=False)
            post = _load_network(ckpt, "params")
        elif spec.loader == "maniqa":
            kwargs["pretrained"] = False
            no_timm_download = True
            post = _load_network(ckpt, None)
        elif spec.loader == "clipiqa":
            kwargs.update(pretrained=False, backbone=str(files["RN50.pt"]))
            post = _load_clipiqa_prompts(ckpt)

    import pyiqa  # slow (~4 s): only when a metric is really built

    tee = _Tee(sys.stdout)
    try:
        with contextlib.ExitStack() as stack:
            if no_timm_download:
                stack.enter_context(_timm_without_download())
            stack.enter_context(_weights_only_torch_load())
            stack.enter_context(_local_state_dicts(served))
            if brisque_svm is not None:
                stack.enter_context(_serve_brisque_svm(brisque_svm))
            stack.enter_context(contextlib.redirect_stdout(tee))
            model = pyiqa.create_metric(spec.pyiqa_name, device=dev, **kwargs)
            if post is not None:
                post(model.net)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:
        raise ValueError(
            f"metric {name!r} could not be built: {_download_hint(tee.buffer_.getvalue(), exc)}"
        ) from exc
    model.eval()
    return model


def score_batch(model: torch.nn.Module, images: torch.Tensor, ref: torch.Tensor | None = None) -> np.ndarray:
    """Raw scores (float64, one per image) of ``images`` ``(B, 3, H, W)`` against ``ref`` (FR metrics).

    ``ref`` may be ``(1, 3, H, W)``; it is repeated to the batch. Inputs are copied first: some pyiqa metrics
    normalise their input in place (A-FINE) and would otherwise corrupt the caller's tensors.
    """
    name = getattr(model, "metric_name", None)
    min_size = _KNOWN[name][2].get("min_size", 1) if name in _KNOWN else 1
    if min(images.shape[-2:]) < min_size:
        raise ValueError(
            f"metric {name!r} needs images of at least {min_size} px on the short side, "
            f"got {images.shape[-2]}x{images.shape[-1]}"
        )
    dev = torch.device(getattr(model, "device", "cpu"))
    x = images.to(dev, dtype=torch.float32, copy=True)
    with torch.no_grad():
        if ref is not None:
            r = ref.to(dev, dtype=torch.float32, copy=True)
            if r.shape[0] != x.shape[0]:
                r = r.expand(x.shape[0], -1, -1, -1).clone()
            out = model(x, r)
        else:
            out = model(x)
    values = torch.as_tensor(out).detach().reshape(-1).double().cpu().numpy()
    if values.shape[0] != images.shape[0]:
        raise RuntimeError(
            f"metric returned {values.shape[0]} values for a batch of {images.shape[0]} images"
        )
    return values
