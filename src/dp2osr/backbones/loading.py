"""The backbone registry: name -> class (whose attributes are the family's traits) and how to get one.

``embedded`` without a base folder loads the small model shipped in the package (``assets/embedded/``, see
``backbones/embedded.py``); ``sd2-tiny`` / ``flux-tiny`` without one are built in code with random weights.

The ControlNet is either the published release format (one ``model.safetensors`` state dict, loaded strictly
into the class's ``controlnet_for(denoiser)``) or a diffusers ControlNet folder (``config.json`` + weights).
Nothing outside this package tests a model name: stages ask the registry (``backbone_class``, ``auto_dtype``,
``default_model_note``) or read a loaded backbone's traits.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from dp2osr.backbones.base import Backbone, cast, load_release_state, require_parts
from dp2osr.backbones.embedded import EmbeddedBackbone, shipped_folder
from dp2osr.backbones.flux import FluxBackbone
from dp2osr.backbones.hub import resolve_model_ref
from dp2osr.backbones.sd2 import SD2Backbone
from dp2osr.backbones.tiny import TINY_PROCESS_SIZE, TINY_STEPS, build_flux_tiny, build_sd2_tiny

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SizeTraits:
    """What the tile plan and cost estimate of an image need to know of a backbone before it loads.

    The two costs were measured on a 2-core CPU in fp32 with ``scripts/calibrate_estimate.py`` (one image of
    3 latent tiles, 2 samples, tile batch 1): peak resident memory growth while sampling, and wall time, per
    latent pixel of one sample (per denoising step for the time). None: not calibrated (the published models
    need their weights and an accelerator).
    """

    latent_factor: int
    latent_channels: int
    pixel_multiple: int
    process_size: int
    steps: int
    act_bytes_per_latent_px: float | None = None
    cpu_s_per_latent_px: float | None = None


@dataclass(frozen=True)
class Entry:
    """One registered backbone: its class, and where it comes from when no base folder is given."""

    cls: type[Backbone]
    size: SizeTraits
    build: Callable[[], Backbone] | None = None  # built in code (the tiny test models; always fp32)
    shipped: Callable[[], Path] | None = None  # a folder inside the package (the embedded model)
    note: str | None = None  # printed by `upscale` when this default stands in for a real model


REGISTRY: dict[str, Entry] = {
    "sd2": Entry(SD2Backbone, SizeTraits(8, 4, 8, 512, 50)),
    "flux": Entry(FluxBackbone, SizeTraits(8, 16, 16, 512, 25)),
    "sd2-tiny": Entry(
        SD2Backbone,
        SizeTraits(8, 4, 8, 64, 4, 34816, 4.7e-4),
        build=build_sd2_tiny,
        note="using the built-in sd2-tiny test model (random weights): outputs are not real SR",
    ),
    "flux-tiny": Entry(
        FluxBackbone,
        SizeTraits(8, 4, 16, 64, 4, 16384, 2.3e-4),
        build=build_flux_tiny,
        note="using the built-in flux-tiny test model (random weights): outputs are not real SR",
    ),
    "embedded": Entry(
        EmbeddedBackbone,
        SizeTraits(4, 48, 4, 128, 20, 9348, 1.15e-4),
        shipped=shipped_folder,
        note="using the embedded default model (a small CPU model shipped with dp2osr; see docs/EMBEDDED.md). "
        "For the published models pass --backbone sd2|flux --base ... --controlnet ...",
    ),
}
NAMES = tuple(REGISTRY)


def entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(NAMES)}")
    return REGISTRY[name]


def backbone_class(name: str) -> type[Backbone]:
    """The class of backbone ``name``: its attributes are the family's traits (defaults, pair ratio, ...)."""
    return entry(name).cls


def size_traits(name: str) -> SizeTraits:
    """The geometry and calibrated costs of backbone ``name``, known without loading it."""
    return entry(name).size


def trait_defaults(trait: str) -> str:
    """``embedded 20, sd2 50, flux 25, tiny test models 4``: a trait of each backbone, for help texts."""
    tiny = {"default_steps": TINY_STEPS, "default_process_size": TINY_PROCESS_SIZE}
    real = [(name, spec.cls) for name, spec in REGISTRY.items() if spec.build is None]
    if trait == "default_negative_prompt":  # only the families that guide against one
        return ", ".join(
            f"{name} {cls.default_negative_prompt!r}" for name, cls in real if cls.uses_negative_prompt
        )
    parts = [f"{name} {getattr(cls, trait):g}" for name, cls in real]
    if trait in tiny:
        parts.append(f"tiny test models {tiny[trait]}")
    return ", ".join(parts)


def auto_dtype(name: str, device: torch.device) -> str:
    """``--dtype auto``: fp32 on the CPU, the family's preferred half precision on an accelerator."""
    return "fp32" if device.type == "cpu" else backbone_class(name).preferred_dtype


def default_model_note(name: str, base: Path | None, controlnet: Path | None) -> str | None:
    """What to tell a user whose model options fall back to a built-in model, or None."""
    if base is not None or (controlnet is not None and entry(name).shipped is not None):
        return None
    return entry(name).note


def _family_of(base: Path) -> str | None:
    meta = Path(base) / "dp2osr.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("backbone")
    for cls in (FluxBackbone, SD2Backbone):
        if (Path(base) / cls.denoiser_name).is_dir():
            return cls.kind
    return None


def new_controlnet(name: str, denoiser: torch.nn.Module) -> torch.nn.Module:
    """A ControlNet initialised from the denoiser's weights (the start of supervised training)."""
    return backbone_class(name).controlnet_for(denoiser)


# What loaders raise for a weight file that is cut short, corrupt, or a pickle holding more than tensors.
_BROKEN = (OSError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError)


@contextlib.contextmanager
def broken_weights_refused(path: Path, what: str) -> Iterator[None]:
    """Turn a loader's error about a broken or unsafe weight file under ``path`` into one ValueError line."""
    try:
        yield
    except FileNotFoundError:
        raise
    except _BROKEN as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(
            f"{path}: cannot load the {what}: {first} (a file cut short or corrupt, or one that holds more "
            "than tensors)"
        ) from None


def load_controlnet(name: str, path: Path, denoiser: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A ControlNet from a release ``.safetensors`` file or a diffusers folder, checked against the denoiser."""
    cls = backbone_class(name)
    path = Path(path)
    if path.is_dir():
        if path.joinpath("config.json").is_file():
            with broken_weights_refused(path, "ControlNet"):
                return cls.controlnet_from_folder(path, dtype)
        if not path.joinpath("model.safetensors").is_file():
            raise ValueError(
                f"{path}: a ControlNet folder needs config.json (diffusers) or model.safetensors"
            )
        path = path / "model.safetensors"  # a release folder holding only model.safetensors
    if not path.is_file():
        raise FileNotFoundError(f"ControlNet checkpoint not found: {path}")
    net = cls.controlnet_for(denoiser, load_weights=False)
    load_release_state(net, path, cls.controlnet_description)
    return cast(net, dtype=dtype)


def load_backbone(
    name: str,
    base: Path | None = None,
    controlnet: Path | None = None,
    dtype: str | torch.dtype = "fp32",
) -> Backbone:
    """Build or load a backbone by name: ``sd2`` | ``flux`` (need ``base``), ``sd2-tiny`` | ``flux-tiny`` or
    ``embedded`` (without ``base``: the model shipped in the package, ``assets/embedded/``).

    A tiny name with ``base`` loads a saved tiny folder through the real loader (in fp32). Without
    ``controlnet``, a ``controlnet/`` subfolder of ``base`` is used when present, else a new ControlNet
    initialised from the denoiser (the start of supervised training). ``base`` and ``controlnet`` may also be
    Hugging Face Hub references (``org/name[@revision][:file]``) found in the local cache (`hub`).
    """
    spec = entry(name)
    base = resolve_model_ref(base, "base model")
    controlnet = resolve_model_ref(controlnet, "ControlNet")
    cls = spec.cls
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if spec.build is not None:
        torch_dtype = torch.float32  # the tiny test models are small: always loaded in fp32
    if base is None and spec.shipped is not None:
        base = spec.shipped()
    if base is None and spec.build is not None:
        bb = spec.build()
        if controlnet is not None:
            bb.controlnet = load_controlnet(name, controlnet, bb.denoiser, torch.float32)
        return bb
    found = _family_of(base) if base is not None and Path(base).is_dir() else None
    if found is not None and found != cls.kind:
        raise ValueError(f"{base} holds a {found} model, but backbone {name!r} was asked for")
    if controlnet is None and base is not None and (Path(base) / "controlnet" / "config.json").is_file():
        controlnet = Path(base) / "controlnet"

    def make_controlnet(denoiser: torch.nn.Module) -> torch.nn.Module:
        if controlnet is not None:
            return load_controlnet(name, controlnet, denoiser, torch_dtype)
        return cast(cls.controlnet_for(denoiser), dtype=torch_dtype)

    base = require_parts(base, [cls.denoiser_name], cls.base_description)
    with broken_weights_refused(base, "base model"):
        bb = cls.load(base, torch_dtype, make_controlnet, name)
    meta = Path(base) / "dp2osr.json"
    if meta.is_file():  # defaults a saved small model carries (process size, steps)
        info = json.loads(meta.read_text())
        for key in ("default_process_size", "default_steps", "default_guidance"):
            if key in info:
                setattr(bb, key, info[key])
    bb.dtype = torch_dtype
    return bb
