"""Build a pyiqa metric from local files only (``create``) and score a batch with it (``score_batch``).

Base layer: ``engine.scoring``, ``upscale --select``, ``evaluate`` and the held-out evaluation build their
metrics here. ``create`` reads the catalogue (``specs``), finds the files (``weights``) before pyiqa runs, so
nothing is downloaded and nothing waits on the network, and builds the model inside the safe, offline patches of
``loading``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dp2osr.metrics.loading import (
    BRISQUE_TOKEN,
    load_clipiqa_prompts,
    load_network,
    local_state_dicts,
    serve_brisque_svm,
    set_brisque_svm,
    timm_without_download,
    weights_only_torch_load,
)
from dp2osr.metrics.specs import MetricSpec, get_spec, min_size, random_weight_names
from dp2osr.metrics.weights import find_weights, niqe_mat, packaged
from dp2osr.runtime import resolve_device


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


@dataclasses.dataclass
class _Plan:
    """How one metric is built: ``pyiqa.create_metric``'s keyword arguments and what runs around and after it."""

    kwargs: dict[str, Any]
    served: dict[str, Path] = dataclasses.field(
        default_factory=dict
    )  # torchvision backbones from local files
    post: Callable[[torch.nn.Module], None] | None = None  # applied to the built model's net
    no_timm_download: bool = False
    brisque_svm: dict[str, torch.Tensor] | None = None


def _from_files(spec: MetricSpec, files: dict[str, Path]) -> _Plan:
    """The plan of a weight-backed metric whose files were found (``spec.loader`` says how they reach pyiqa)."""
    ckpt = files[spec.weights[0].filename]  # type: ignore[index]
    if spec.loader == "path":
        served = {wf.filename: files[wf.filename] for wf in spec.weights or () if wf.cache == "torchvision"}
        return _Plan({"pretrained_model_path": str(ckpt)}, served=served)
    if spec.loader == "afine":
        return _Plan({"pretrained_model_path": str(ckpt), "clip_backbone": str(files["ViT-B-32.pt"])})
    if spec.loader == "topiq":
        return _Plan({"pretrained": False, "backbone_pretrain": False}, post=load_network(ckpt, "params"))
    if spec.loader == "maniqa":
        return _Plan({"pretrained": False}, post=load_network(ckpt, None), no_timm_download=True)
    if spec.loader == "clipiqa":
        return _Plan(
            {"pretrained": False, "backbone": str(files["RN50.pt"])}, post=load_clipiqa_prompts(ckpt)
        )
    return _Plan({})  # loaded by pyiqa itself (a Hugging Face model found in its cache)


def _plan(spec: MetricSpec, weights_dir: Path | None, allow_random_weights: bool) -> _Plan:
    """How to build ``spec``; a ValueError names a missing file or a metric without random weights."""
    if spec.loader == "niqe" and not allow_random_weights:
        try:
            path: Any = str(find_weights(spec, weights_dir)["niqe_modelparameters.mat"])
        except ValueError:  # no official file: the packaged parameters
            path = niqe_mat(packaged("niqe_pris.safetensors"))
        return _Plan({"pretrained_model_path": path})
    if spec.loader == "brisque" and not allow_random_weights:
        svm = packaged("brisque_svm.safetensors")
        return _Plan({"pretrained_model_path": BRISQUE_TOKEN}, post=set_brisque_svm(svm), brisque_svm=svm)
    if allow_random_weights:
        if spec.random_kwargs is None:
            raise ValueError(
                f"metric {spec.name!r} cannot be built with random weights; allowed: {random_weight_names()}"
            )
        return _Plan(dict(spec.random_kwargs))
    if spec.weights:
        return _from_files(spec, find_weights(spec, weights_dir))
    return _Plan({})


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
    dev = resolve_device(device)
    plan = _plan(spec, weights_dir, allow_random_weights)

    import pyiqa  # slow (~4 s): only when a metric is really built

    tee = _Tee(sys.stdout)
    try:
        with contextlib.ExitStack() as stack:
            if plan.no_timm_download:
                stack.enter_context(timm_without_download())
            stack.enter_context(weights_only_torch_load())
            stack.enter_context(local_state_dicts(plan.served))
            if plan.brisque_svm is not None:
                stack.enter_context(serve_brisque_svm(plan.brisque_svm))
            stack.enter_context(contextlib.redirect_stdout(tee))
            model = pyiqa.create_metric(spec.pyiqa_name, device=dev, **plan.kwargs)
            if plan.post is not None:
                plan.post(model.net)
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
    smallest = min_size(name)
    if min(images.shape[-2:]) < smallest:
        raise ValueError(
            f"metric {name!r} needs images of at least {smallest} px on the short side, "
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
