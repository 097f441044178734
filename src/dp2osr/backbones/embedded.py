"""The embedded default SR model: SD2's code path (UNet + ControlNet, DDPM, same sampler and loss) at CPU size.

Real SD2/FLUX weights cannot be downloaded on a fresh machine, so the package ships a small model of its own
(``src/dp2osr/assets/embedded/``, trained by ``scripts/train_embedded.py`` with ``dp2osr train --mode sft``).
It is an `SD2Backbone` with two parts replaced by fixed, parameter-free stand-ins:

- the VAE by `ResidualSpaceToDepth`: the latent of an image ``x`` with control (bicubic-upsampled LR) ``c`` is
  ``z = space_to_depth_f(s · (x − c))`` (f = 4: 48 latent channels at 1/4 resolution) and
  ``decode(z, c) = c + depth_to_space_f(z) / s`` — lossless, so the denoiser only has to model the detail the
  LR lacks (a quick experiment: +5 dB PSNR-Y over encoding the image itself). The scale s = 10 gives the
  latents a standard deviation of about 0.8 on the training crops (0.32 at s = 4), close to the unit variance
  the DDPM noise schedule assumes (SD's VAE scaling factor serves the same purpose), and it divides whatever
  noise a sample has left in its latents by 10 in the image;
- the text encoder by one constant prompt embedding (a saved tensor): prompts are ignored and there is no
  classifier-free guidance (``default_guidance = 1``).

The scheduler is DDPM with v-prediction (epsilon gave pure noise at a small training budget), and the
ControlNet's conditioning embedder downsamples by 4 (three ``conditioning_embedding_out_channels``) to match
the stand-in's factor. Folder layout (``save_pretrained``): ``unet/``, ``scheduler/``, ``controlnet/``,
``prompt_embeds.safetensors`` and ``dp2osr.json`` (which also records the autoencoder's factor and scale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dp2osr.backbones.base import Backbone, Cond, require_parts
from dp2osr.backbones.sd2 import SD2Backbone

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "embedded"
PROMPT_FILE = "prompt_embeds.safetensors"
CONDITIONING_CHANNELS = (16, 32, 64)  # 3 entries: the embedder downsamples by 2**2 = 4, the stand-in's factor


class ResidualSpaceToDepth(torch.nn.Module):
    """A fixed, lossless stand-in for the VAE that encodes the residual over the control image.

    ``encode(x, c) = pixel_unshuffle(scale · (x − c), factor)``: ``(B, 3, H, W) -> (B, 3·factor², H/f, W/f)``;
    ``decode(z, c) = c + pixel_shuffle(z, factor) / scale`` inverts it exactly (up to float rounding).
    ``scale`` brings the residual's typical spread closer to the unit-variance noise of the diffusion.
    """

    def __init__(self, factor: int = 4, scale: float = 10.0) -> None:
        super().__init__()
        if factor < 1 or scale <= 0:
            raise ValueError(f"factor must be >= 1 and scale > 0, got {factor} and {scale}")
        self.factor, self.scale = int(factor), float(scale)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    def encode(self, images: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle((images - control) * self.scale, self.factor)

    def decode(self, latents: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        return control + F.pixel_shuffle(latents, self.factor) / self.scale


def embedded_controlnet(unet: UNet2DConditionModel, load_weights_from_unet: bool = True) -> ControlNetModel:
    """``ControlNetModel.from_unet`` with a ×4 conditioning embedder (the stand-in autoencoder's factor)."""
    return ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=CONDITIONING_CHANNELS,
        load_weights_from_unet=load_weights_from_unet,
    )


class EmbeddedBackbone(SD2Backbone):
    """`SD2Backbone` with a residual space-to-depth autoencoder and a constant prompt embedding."""

    kind = "embedded"
    default_steps = 20
    default_guidance = 1.0  # no CFG: there is no text to guide by
    default_negative_prompt = ""
    uses_negative_prompt = False  # no text encoder: the prompt is a constant embedding
    default_process_size = 128
    pair_ratio = 0.25
    base_parts = ("unet", "scheduler")
    base_description = "an embedded dp2osr model (as written by scripts/train_embedded.py)"
    controlnet_description = "the embedded model's ControlNet (from_unet with a x4 conditioning embedder)"

    def __init__(
        self,
        *,
        name: str,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        prompt_embeds: torch.Tensor,
        controlnet: ControlNetModel | None = None,
        factor: int = 4,
        residual_scale: float = 10.0,
    ) -> None:
        vae = ResidualSpaceToDepth(factor, residual_scale)
        if unet.config.in_channels != vae.latent_channels or unet.config.out_channels != vae.latent_channels:
            raise ValueError(
                f"the UNet must take and give {vae.latent_channels} channels (3 x {factor}^2), "
                f"got in {unet.config.in_channels} / out {unet.config.out_channels}"
            )
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must have shape (1, tokens, dim), got {tuple(prompt_embeds.shape)}")
        self.prompt_embeds = prompt_embeds.detach().clone()
        super().__init__(
            name=name,
            unet=unet,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            scheduler=scheduler,
            controlnet=controlnet if controlnet is not None else embedded_controlnet(unet),
        )

    @property
    def latent_factor(self) -> int:
        return self.vae.factor

    # ---- conditioning ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None) -> Cond:
        """The constant embedding for every prompt; the negative prompt is ignored (no CFG)."""
        emb = self.prompt_embeds.to(self.device, self.dtype)
        return {"prompt_embeds": emb.expand(len(prompts), -1, -1)}

    def encode_images(self, images: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        if control is None:
            raise ValueError("the embedded model encodes the residual over the control image: pass control")
        x = images.to(self.device, torch.float32)
        return self.vae.encode(x, control.to(self.device, torch.float32)).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        if control is None:
            raise ValueError("the embedded model decodes a residual over the control image: pass control")
        z = latents.float()
        return self.vae.decode(z, control.to(z.device, torch.float32)).clamp(0, 1)

    # ---- parts ----------------------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}  # the autoencoder has no parameters; the prompt is a plain tensor

    @classmethod
    def controlnet_for(cls, denoiser: UNet2DConditionModel, load_weights: bool = True) -> ControlNetModel:
        return embedded_controlnet(denoiser, load_weights_from_unet=load_weights)

    @classmethod
    def load(cls, base: Path, dtype: torch.dtype, make_controlnet, name: str) -> EmbeddedBackbone:
        """Load an embedded-model folder (see the module docstring); ``make_controlnet(unet)`` gives the ControlNet."""
        return load_embedded(base, dtype, make_controlnet, name)

    def to(
        self, device: str | torch.device, dtype: torch.dtype = torch.float32, controlnet_dtype: torch.dtype | None = None
    ) -> Backbone:
        super().to(device, dtype, controlnet_dtype)
        self.prompt_embeds = self.prompt_embeds.to(self.device, dtype)
        return self

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        super().save_pretrained(path)
        save_file({"prompt_embeds": self.prompt_embeds.detach().float().cpu().contiguous()}, str(path / PROMPT_FILE))
        meta = json.loads((path / "dp2osr.json").read_text())
        meta["autoencoder"] = {"type": "residual_space_to_depth", "factor": self.vae.factor, "scale": self.vae.scale}
        (path / "dp2osr.json").write_text(json.dumps(meta, indent=2))


def build_embedded(
    seed: int = 0, widths: tuple[int, ...] = (64, 96, 128), residual_scale: float = 10.0
) -> EmbeddedBackbone:
    """An untrained embedded model (random UNet, ControlNet copied from it), deterministic for a seed.

    ``widths`` are the UNet's block widths (multiples of 16; the first >= 48, the latent channels), two ResNet
    layers per block, self/cross-attention only at the lowest resolution and in the middle block. The
    default: UNet 7.2M + ControlNet 3.3M parameters, 3.8 GFLOP per UNet+ControlNet call at 128 px.
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or widths[0] < 48 or any(w % 16 for w in widths):
        raise ValueError(f"widths must be >= 2 multiples of 16, the first >= 48 (latent channels), got {widths}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=48,
        out_channels=48,
        down_block_types=("DownBlock2D",) * (len(widths) - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (len(widths) - 1),
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=32,
        use_linear_projection=True,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",  # the last sampling step starts from pure noise (matters for few steps)
    )
    prompt_embeds = torch.randn((1, 4, 64), generator=gen)
    return EmbeddedBackbone(
        name="embedded", unet=unet, scheduler=scheduler, prompt_embeds=prompt_embeds, residual_scale=residual_scale
    )


def shipped_folder() -> Path:
    """The model shipped inside the package; a clear error when its files are missing."""
    if not (SHIPPED / "dp2osr.json").is_file() or not (SHIPPED / "unet").is_dir():
        raise FileNotFoundError(
            f"the embedded model's weights are missing from this installation ({SHIPPED}): reinstall dp2osr, "
            "or train one with scripts/train_embedded.py and pass --base FOLDER"
        )
    return SHIPPED


def load_embedded(base: Path, dtype: torch.dtype, make_controlnet, name: str) -> EmbeddedBackbone:
    """The parts of an embedded-model folder; ``make_controlnet(unet)`` gives the ControlNet."""
    base = require_parts(base, ["unet", "scheduler"], "an embedded dp2osr model")
    if not (base / PROMPT_FILE).is_file():
        raise ValueError(f"{base} is not an embedded dp2osr model: {PROMPT_FILE} is missing")
    meta = json.loads((base / "dp2osr.json").read_text()) if (base / "dp2osr.json").is_file() else {}
    ae = meta.get("autoencoder", {})
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype)
    return EmbeddedBackbone(
        name=name,
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(base / "scheduler"),
        prompt_embeds=load_file(str(base / PROMPT_FILE))["prompt_embeds"],
        controlnet=make_controlnet(unet),
        factor=int(ae.get("factor", 4)),
        residual_scale=float(ae["scale"]) if "scale" in ae else 10.0,
    )
