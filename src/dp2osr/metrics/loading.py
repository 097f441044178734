"""How local weight files reach pyiqa, safely and offline: patches held while a metric is built, and post-build
loads.

Base layer, used only by ``build.create``. ``pretrained_model_path`` is passed where pyiqa's handling of it
matches its default download branch (lpips, musiq, niqe, afine_*). Where it does not, the metric is built
without weights and the file is loaded exactly as pyiqa's default branch would have loaded it: topiq_* (pyiqa
loads a ``pretrained_model_path`` with ``strict=False`` — a wrong file would silently leave random weights),
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
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dp2osr.metrics.weights import IQA_PARAMS_DIR

BRISQUE_TOKEN = "<dp2osr packaged BRISQUE SVM>"  # the "path" pyiqa's BRISQUE is given; see serve_brisque_svm


@contextlib.contextmanager
def local_state_dicts(files: dict[str, Path]) -> Iterator[None]:
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
def timm_without_download() -> Iterator[None]:
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


def _file_name(f: Any) -> str:
    return str(getattr(f, "name", f))


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
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


@contextlib.contextmanager
def serve_brisque_svm(svm: dict[str, torch.Tensor]) -> Iterator[None]:
    """Answer pyiqa BRISQUE's ``torch.load(path, weights_only=False)`` for ``BRISQUE_TOKEN`` from ``svm``.

    pyiqa reads ``(sv_coef, sv)`` from a pickle; this hands it the packaged tensors instead, so no pickle is read.
    Any other path goes to the real ``torch.load``.
    """
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, str) and f == BRISQUE_TOKEN:
            return svm["sv_coef"].clone(), svm["sv"].clone()
        return original(f, *args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


# ------------------------------------------------------------------------------- post-build steps
def load_network(path: Path, weight_keys: str | None) -> Callable[[torch.nn.Module], None]:
    """A post-build step loading ``path`` strictly, as pyiqa's default (download) branch would."""

    def load(net: torch.nn.Module) -> None:
        from pyiqa.archs.arch_util import load_pretrained_network

        load_pretrained_network(net, str(path), True, weight_keys=weight_keys)

    return load


def set_brisque_svm(svm: dict[str, torch.Tensor]) -> Callable[[torch.nn.Module], None]:
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


def load_clipiqa_prompts(path: Path) -> Callable[[torch.nn.Module], None]:
    """CLIP-IQA+'s learned prompts, loaded the way pyiqa's CLIPIQA does it."""

    def load(net: torch.nn.Module) -> None:
        ctx = net.prompt_learner.ctx
        ctx.data = torch.load(path, map_location="cpu", weights_only=True).to(ctx.device)

    return load
