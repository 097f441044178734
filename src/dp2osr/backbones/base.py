"""The backbone interface: everything that differs between SD2 and FLUX, behind one small class.

The engine (the sampler, the job runner, the trainer and its objectives) and the stages only call these methods,
so they never branch on the model.
Latents are always handled *unpacked*, ``(B, C, h, w)``; FLUX packs them into tokens inside `predict`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dp2osr.images import follow_umask

# A text condition: a dict of tensors whose first dimension is the batch (FLUX's `text_ids` excepted).
Cond = dict[str, torch.Tensor]


class Backbone(ABC):
    """A frozen base model (UNet or transformer, VAE, text encoders, scheduler) plus a trainable ControlNet.

    Subclasses set the class attributes below and implement the abstract methods.
    """

    # Traits: everything the stages need to know about a model family, read from the class (never from a name).
    kind: str = ""  # the family recorded in a saved folder's dp2osr.json ("sd2" | "flux" | "embedded")
    default_steps: int = 50
    default_guidance: float = 3.5
    default_negative_prompt: str = ""
    uses_negative_prompt: bool = False  # classifier-free guidance against a negative prompt (SD2)
    default_process_size: int = 512
    pair_ratio: float = 0.25  # N/M of the preference pairs (paper: 1/4 for SD2, 1/16 for FLUX)
    preferred_dtype: str = "fp16"  # weights dtype on CUDA with --dtype auto (fp32 on the CPU)
    train_guidance: float | None = None  # guidance passed to `predict` while training (FLUX: 2.5)
    denoiser_name: str = "unet"  # attribute (and diffusers subfolder) of the frozen denoiser
    base_parts: tuple[str, ...] = ()  # subfolders a base model folder must hold
    base_description: str = ""  # what a base folder holds, for error messages
    controlnet_description: str = ""  # how the ControlNet is built, for error messages

    def __init__(self, *, name: str, controlnet: torch.nn.Module, scheduler: Any) -> None:
        self.name = name
        self.controlnet = controlnet
        self.scheduler = scheduler
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.fast_paths: dict[str, bool] = {}  # what `optimize` applied (empty: the plain modules)
        for m in self.frozen_modules().values():  # frozen parts never train (no dropout, no grads)
            m.requires_grad_(False)
            m.eval()

    # ---- geometry -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for the SD2/FLUX VAE)."""

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latents the denoiser works on."""

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (the latent factor; ×2 for FLUX's 2×2 packing)."""
        return self.latent_factor

    # ---- conditioning ---------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None) -> Cond:
        """Text condition for a batch of prompts (with the negative prompt's embeddings when CFG is used)."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> latents ``(B, C, H/f, W/f)`` (scaled as the denoiser expects).

        ``control`` (the upsampled LR, same size) is used by autoencoders that encode a residual.
        """

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> ``(B, 3, H, W)`` in [0, 1]."""

    @abstractmethod
    def prepare_control(
        self, control_image: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """The upsampled LR ``(B, 3, H, W)`` in [0, 1] -> what the ControlNet takes (pixels or latents).

        ``generators`` (sampling, batch 1: one per sample) are for a control drawn at random, as the FLUX
        pipeline samples its control latent from the VAE posterior; a backbone whose control is deterministic
        ignores them. Without them (training) the control is deterministic.
        """

    @abstractmethod
    def control_tile(self, control: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """The part of a prepared control that matches the latent window ``[y0:y1, x0:x1]``."""

    # ---- denoiser ---------------------------------------------------------------------------------
    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Cond,
        control: torch.Tensor,
        *,
        guidance: float | None = None,
        controlnet: torch.nn.Module | None = None,
        trunk: Any | None = None,
    ) -> torch.Tensor:
        """Model output (epsilon, v or flow velocity) for ``latents`` at ``timesteps`` ``(B,)``.

        ``guidance`` is the CFG scale (SD2; needs negative embeddings in ``cond``) or the guidance-embedding
        value (FLUX). ``controlnet`` overrides the backbone's own (the frozen reference in DPO). ``trunk`` is
        :meth:`trunk` of the same ``latents``, ``timesteps`` and ``cond``, to reuse instead of recomputing.
        """

    def trunk(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> Any | None:
        """The part of the frozen denoiser's forward that the ControlNet does not affect, or None.

        DPO runs the policy and the reference ControlNet on the same noisy latents; what this returns is
        computed once (under ``no_grad``: nothing in it depends on trained weights) and passed to both
        :meth:`predict` calls. SD2: the UNet's down and mid blocks (the ControlNet's residuals are added only
        after them). FLUX: None (its ControlNet feeds the first transformer block).
        """
        return None

    @abstractmethod
    def set_timesteps(self, steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Prepare the scheduler for sampling and return its timesteps."""

    def step(
        self, output: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, generators: list
    ) -> torch.Tensor:
        """One sampler step; per-sample generators keep stochastic samplers seed-exact per row."""
        return self.scheduler.step(output, t, latents, generator=generators).prev_sample

    # ---- training ---------------------------------------------------------------------------------
    @abstractmethod
    def sample_timesteps(
        self, batch: int, latent_hw: tuple[int, int], generator: torch.Generator
    ) -> torch.Tensor:
        """Training timesteps ``(batch,)`` (DDPM indices, or FLUX sigmas), drawn on the CPU generator."""

    @abstractmethod
    def noisy_and_target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, regression target) for clean latents ``x0`` — epsilon, v, or ε − x0 for flow."""

    # ---- parts ----------------------------------------------------------------------------------
    @abstractmethod
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The frozen parts (denoiser, VAE, text encoders) by diffusers subfolder name."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The frozen UNet or transformer."""
        return getattr(self, self.denoiser_name)

    @classmethod
    @abstractmethod
    def controlnet_for(cls, denoiser: torch.nn.Module, load_weights: bool = True) -> torch.nn.Module:
        """A ControlNet shaped for ``denoiser``, initialised from its weights (or left random)."""

    @classmethod
    def controlnet_from_folder(cls, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        """A diffusers ControlNet folder (``config.json`` + weights)."""
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(path, torch_dtype=dtype)

    @classmethod
    @abstractmethod
    def load(cls, base: Path, dtype: torch.dtype, make_controlnet: Any, name: str) -> Backbone:
        """Load a base model folder (diffusers layout); ``make_controlnet(denoiser)`` gives the ControlNet."""

    def new_controlnet(self) -> torch.nn.Module:
        """A ControlNet initialised from the denoiser (the start of supervised training)."""
        return self.controlnet_for(self.denoiser)

    # ---- sampling fast paths --------------------------------------------------------------------------
    def optimize(
        self, *, channels_last: bool = False, fuse_qkv: bool = False, compile: bool = False
    ) -> Backbone:
        """Make the denoiser and the ControlNet faster for sampling, in place (inference only: not for training).

        ``channels_last``: 4-D weights in ``torch.channels_last`` memory format (the convolutions of a UNet and
        its ControlNet; a transformer has none to convert). ``fuse_qkv``: diffusers' ``fuse_qkv_projections()``
        (one matmul for Q, K and V; K and V for cross-attention) on every part whose class supports it.
        ``compile``: ``torch.compile`` of their forward (inductor, fixed shapes: one graph per tile/batch shape).
        Outputs match the plain modules up to float rounding. Raises ValueError when an option cannot apply.
        """
        wanted = {"channels_last": channels_last, "fuse_qkv": fuse_qkv, "compile": compile}
        if not any(wanted.values()):
            return self
        if self.fast_paths:
            raise ValueError(f"{self.name}: already optimized ({self.fast_paths}); load the model again")
        if compile:
            check_compile(self.device)
        if fuse_qkv and not any(supports_fused_qkv(m) for m in self.fast_modules().values()):
            raise ValueError(f"--fuse-qkv: no part of {self.name} supports fused QKV projections")
        self.fast_paths = wanted
        for name, module in self.fast_modules().items():
            setattr(self, name, self.optimize_module(module))
        return self

    def fast_modules(self) -> dict[str, torch.nn.Module]:
        """The modules `optimize` works on, by attribute name: the denoiser and the ControlNet."""
        return {self.denoiser_name: self.denoiser, "controlnet": self.controlnet}

    def optimize_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Apply the fast paths of `optimize` to ``module`` (e.g. a ControlNet swapped in later), in place."""
        if self.fast_paths.get("fuse_qkv"):
            fuse_qkv(module)
        if self.fast_paths.get("channels_last"):
            module.to(memory_format=torch.channels_last)
        if self.fast_paths.get("compile"):
            module.compile(dynamic=False)  # nn.Module.compile: same module object, same state_dict keys
        return module

    def plain_controlnet(self) -> torch.nn.Module:
        """A ControlNet of the same architecture and weights as the backbone's, without the fast paths (whose
        fused projections add state-dict keys and whose compiled forward a deep copy must not share)."""
        if not self.fast_paths:
            return copy.deepcopy(self.controlnet)
        net = type(self.controlnet).from_config(self.controlnet.config)
        plain = set(net.state_dict())
        net.load_state_dict(
            {k: v for k, v in self.controlnet.state_dict().items() if k in plain}, strict=True
        )
        return net.to(memory_format=torch.contiguous_format)

    @contextlib.contextmanager
    def vae_tiling(self, enabled: bool, tile_px: int | None = None):
        """Decode/encode in overlapping tiles while inside the block (diffusers' tiled VAE), if enabled."""
        vae = getattr(self, "vae", None)
        if not enabled or vae is None or not hasattr(vae, "enable_tiling"):
            yield
            return
        old = (vae.tile_sample_min_size, vae.tile_latent_min_size)
        px = tile_px or self.default_process_size
        vae.tile_sample_min_size, vae.tile_latent_min_size = px, px // self.latent_factor
        vae.enable_tiling()
        try:
            yield
        finally:
            vae.disable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = old

    def to(
        self,
        device: str | torch.device,
        dtype: torch.dtype = torch.float32,
        controlnet_dtype: torch.dtype | None = None,
    ) -> Backbone:
        """Move everything to ``dtype``, the ControlNet to ``controlnet_dtype`` if given (training keeps its
        float32 master weights as loaded, not rounded through ``dtype``)."""
        self.device, self.dtype = torch.device(device), dtype
        for name, m in self.frozen_modules().items():
            # the VAE stays float32, as the released scripts keep it (fp16 decoding overflows)
            cast(m, self.device, torch.float32 if name == "vae" else dtype)
        cast(self.controlnet, self.device, controlnet_dtype or dtype)
        for m in self.frozen_modules().values():
            m.requires_grad_(False)
            m.eval()
        return self

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (once every prompt embedding needed is cached)."""
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module):
                module.to("cpu")

    def save_pretrained(self, path: Path) -> None:
        """Write a diffusers-layout folder (one subfolder per part, ``controlnet/`` included)."""
        path = Path(path)
        for name, module in self.frozen_modules().items():
            module.save_pretrained(path / name)
        for name, tok in self.tokenizers().items():
            tok.save_pretrained(path / name)
        self.scheduler.save_pretrained(path / "scheduler")
        self.controlnet.save_pretrained(path / "controlnet")
        meta = {"backbone": self.kind, "name": self.name}
        meta.update(
            {k: getattr(self, k) for k in ("default_process_size", "default_steps", "default_guidance")}
        )
        (path / "dp2osr.json").write_text(json.dumps(meta, indent=2))
        follow_umask(path)

    def tokenizers(self) -> dict[str, Any]:
        return {}


def require_parts(base: Path | None, parts: list[str] | tuple[str, ...], what: str) -> Path:
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


def supports_fused_qkv(module: torch.nn.Module) -> bool:
    """Whether diffusers can fuse ``module``'s QKV projections (the method exists and no attention layer has
    added KV projections, which ``fuse_qkv_projections`` refuses)."""
    if not hasattr(module, "fuse_qkv_projections"):
        return False
    processors = getattr(module, "attn_processors", {})
    return bool(processors) and not any("Added" in type(p).__name__ for p in processors.values())


def fuse_qkv(module: torch.nn.Module) -> int:
    """Fuse ``module``'s attention projections where supported; returns how many attention layers are fused.

    diffusers' ``fuse_qkv_projections`` of a UNet fuses its (older) ``Attention`` layers, but the same method of
    a ``ControlNetModel`` (diffusers 0.42) only looks at the newer attention classes and leaves them unfused;
    those are then fused layer by layer as the UNet's method does (``fuse_projections`` + the fused processor).
    """
    if not supports_fused_qkv(module):
        return 0
    module.fuse_qkv_projections()
    if not _fused_layers(module):
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        layers = [m for m in module.modules() if isinstance(m, Attention)]
        for layer in layers:
            layer.fuse_projections(fuse=True)
        if layers:
            module.set_attn_processor(FusedAttnProcessor2_0())
    return _fused_layers(module)


def _fused_layers(module: torch.nn.Module) -> int:
    return sum(bool(getattr(m, "fused_projections", False)) for m in module.modules())


def check_compile(device: torch.device) -> None:
    """Fail early (ValueError) where ``torch.compile`` cannot work: inductor on the CPU needs a C++ compiler."""
    if not hasattr(torch, "compile"):
        raise ValueError(f"--compile needs torch.compile (torch >= 2.0; this is torch {torch.__version__})")
    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH for inductor")


def cast(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move/cast a module, skipping the dtype cast (and diffusers' warning about it) when already there."""
    if dtype is not None and any(p.dtype != dtype for p in module.parameters()):
        return module.to(device=device, dtype=dtype)
    return module.to(device) if device is not None else module


def save_release(controlnet: torch.nn.Module, path: Path) -> None:
    """Save a ControlNet the way the published checkpoints are: one ``model.safetensors`` state dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in controlnet.state_dict().items()}
    save_file(state, str(path))
    follow_umask(path)


def load_release_state(controlnet: torch.nn.Module, path: Path, what: str) -> None:
    """Strictly load a release-format state dict into ``controlnet``; errors name the file and the keys."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: expected a .safetensors ControlNet state dict or a diffusers ControlNet folder"
        )
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    own = controlnet.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape:
            k = shape[0]
            detail.append(
                f"{len(shape)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
            )
        raise ValueError(f"{path} does not match {what}: " + "; ".join(detail))
    controlnet.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
