"""Loading a backbone: a base model folder (diffusers layout) plus a ControlNet.

``embedded`` without a base folder loads the small model shipped in the package (``assets/embedded/``, see
``backbones/embedded.py``); its ControlNet has a x4 conditioning embedder (``embedded_controlnet``).

The ControlNet is either the published release format (one ``model.safetensors`` state dict, loaded strictly
into ``ControlNetModel.from_unet`` / ``FluxControlNetModel.from_transformer(num_layers=4,
num_single_layers=0)``) or a diffusers ControlNet folder (``config.json`` + weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dp2osr.backbones.base import Backbone, cast, load_release_state

FAMILIES = ("sd2", "flux")
TINY = ("sd2-tiny", "flux-tiny")
EMBEDDED = "embedded"  # the small SR model shipped in the package (backbones/embedded.py)
NAMES = FAMILIES + TINY + (EMBEDDED,)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

WHERE = {
    "sd2": "a Stable Diffusion 2 base model (stabilityai/stable-diffusion-2-base, downloaded on a machine with "
    "network access)",
    "flux": "a FLUX.1-dev model (black-forest-labs/FLUX.1-dev)",
    "embedded": "an embedded dp2osr model (as written by scripts/train_embedded.py)",
}


def require_parts(base: Path | None, parts: list[str], what: str) -> Path:
    """Check that ``base`` is a folder with every subfolder in ``parts``; say where to put it if not."""
    if base is None:
        raise ValueError(f"no base model given: pass --base PATH to {what} in diffusers layout")
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(
            f"base model folder not found: {base}. Put {what} there in diffusers layout "
            f"(subfolders {', '.join(parts)}, ...) or pass --base PATH; nothing is downloaded at run time"
        )
    missing = [p for p in parts if not (base / p).is_dir()]
    if missing:
        raise ValueError(
            f"{base} is not {what} in diffusers layout: missing subfolder(s) {', '.join(missing)}"
        )
    return base


def _family_of(base: Path) -> str | None:
    meta = Path(base) / "dp2osr.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("backbone")
    if (Path(base) / "transformer").is_dir():
        return "flux"
    if (Path(base) / "unet").is_dir():
        return "sd2"
    return None


def new_controlnet(family: str, denoiser: torch.nn.Module) -> torch.nn.Module:
    """A ControlNet initialised from the denoiser's weights (the start of supervised training)."""
    from diffusers import ControlNetModel

    from dp2osr.backbones.flux import flux_controlnet_from

    if family == EMBEDDED:
        from dp2osr.backbones.embedded import embedded_controlnet

        return embedded_controlnet(denoiser)
    return ControlNetModel.from_unet(denoiser) if family == "sd2" else flux_controlnet_from(denoiser)


def load_controlnet(
    family: str, path: Path, denoiser: torch.nn.Module, dtype: torch.dtype
) -> torch.nn.Module:
    """A ControlNet from a release ``.safetensors`` file or a diffusers folder, checked against the denoiser."""
    from diffusers import ControlNetModel, FluxControlNetModel

    from dp2osr.backbones.flux import flux_controlnet_from

    path = Path(path)
    cls = FluxControlNetModel if family == "flux" else ControlNetModel
    if path.is_dir():
        if path.joinpath("config.json").is_file():
            return cls.from_pretrained(path, torch_dtype=dtype)
        if not path.joinpath("model.safetensors").is_file():
            raise ValueError(
                f"{path}: a ControlNet folder needs config.json (diffusers) or model.safetensors"
            )
        path = path / "model.safetensors"  # a release folder holding only model.safetensors
    if not path.is_file():
        raise FileNotFoundError(f"ControlNet checkpoint not found: {path}")
    if family == "sd2":
        net = ControlNetModel.from_unet(denoiser, load_weights_from_unet=False)
        what = "ControlNetModel.from_unet(<this UNet>) (an SD2 ControlNet for this base model)"
    elif family == EMBEDDED:
        from dp2osr.backbones.embedded import embedded_controlnet

        net = embedded_controlnet(denoiser, load_weights_from_unet=False)
        what = "the embedded model's ControlNet (from_unet with a x4 conditioning embedder)"
    else:
        net = flux_controlnet_from(denoiser, load_weights=False)
        what = "FluxControlNetModel.from_transformer(<this transformer>, num_layers=4, num_single_layers=0)"
    load_release_state(net, path, what)
    return cast(net, dtype=dtype)


def load_backbone(
    name: str,
    base: Path | None = None,
    controlnet: Path | None = None,
    dtype: str | torch.dtype = "fp32",
) -> Backbone:
    """Build or load a backbone by name: ``sd2`` | ``flux`` (need ``base``), ``sd2-tiny`` | ``flux-tiny`` or
    ``embedded`` (without ``base``: the model shipped in the package, ``assets/embedded/``).

    A tiny name with ``base`` loads a saved tiny folder through the real loader. Without ``controlnet``, a
    ``controlnet/`` subfolder of ``base`` is used when present, else a new ControlNet initialised from the
    denoiser (the start of supervised training).
    """
    if name not in NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(NAMES)}")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    family = name.removesuffix("-tiny")
    if name == EMBEDDED and base is None:
        from dp2osr.backbones.embedded import shipped_folder

        base = shipped_folder()
    if name in TINY and base is None:
        from dp2osr.backbones.tiny import build_flux_tiny, build_sd2_tiny

        bb = build_sd2_tiny() if name == "sd2-tiny" else build_flux_tiny()
        if controlnet is not None:
            denoiser = bb.unet if family == "sd2" else bb.transformer
            bb.controlnet = load_controlnet(family, controlnet, denoiser, torch.float32)
        return bb
    found = _family_of(base) if base is not None and Path(base).is_dir() else None
    if found is not None and found != family:
        raise ValueError(f"{base} holds a {found} model, but backbone {name!r} was asked for")
    if controlnet is None and base is not None and (Path(base) / "controlnet" / "config.json").is_file():
        controlnet = Path(base) / "controlnet"

    def make_controlnet(denoiser: torch.nn.Module) -> torch.nn.Module:
        if controlnet is not None:
            return load_controlnet(family, controlnet, denoiser, torch_dtype)
        return cast(new_controlnet(family, denoiser), dtype=torch_dtype)

    if family == "sd2":
        from dp2osr.backbones.sd2 import load_sd2

        bb = load_sd2(require_parts(base, ["unet"], WHERE["sd2"]), torch_dtype, make_controlnet, name)
    elif family == EMBEDDED:
        from dp2osr.backbones.embedded import load_embedded

        bb = load_embedded(require_parts(base, ["unet"], WHERE[EMBEDDED]), torch_dtype, make_controlnet, name)
    else:
        from dp2osr.backbones.flux import load_flux

        bb = load_flux(
            require_parts(base, ["transformer"], WHERE["flux"]), torch_dtype, make_controlnet, name
        )
    meta = Path(base) / "dp2osr.json"
    if meta.is_file():  # defaults a saved small model carries (process size, steps)
        info = json.loads(meta.read_text())
        for key in ("default_process_size", "default_steps", "default_guidance"):
            if key in info:
                setattr(bb, key, info[key])
    bb.dtype = torch_dtype
    return bb
