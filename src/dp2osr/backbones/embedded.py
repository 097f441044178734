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
from dp2osr.images import follow_umask

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "embedded"
PROMPT_FILE = "prompt_embeds.safetensors"
SHARPENER_FILE = "sharpener.safetensors"
CONDITIONING_CHANNELS = (16, 32, 64)  # 3 entries: the embedder downsamples by 2**2 = 4, the stand-in's factor


LUMA = (0.299, 0.587, 0.114)  # BT.601: adding the same value to R, G and B changes Y only, never Cb or Cr


def gray(residual: torch.Tensor) -> torch.Tensor:
    """The luma part of an RGB residual ``(B, 3, H, W)`` as an equal change of R, G and B (no chroma)."""
    w = torch.tensor(LUMA, device=residual.device, dtype=residual.dtype).view(1, 3, 1, 1)
    return (residual * w).sum(1, keepdim=True).expand_as(residual)


class Sharpener(torch.nn.Module):
    """A small deterministic ×``factor`` SR branch: the bicubic-upsampled LR plus a predicted residual.

    Works at the LR's resolution (space-to-depth of the upsampled image, ``blocks`` residual conv blocks of
    ``channels``, depth-to-space back), so it is cheap: 0.29 M parameters and about 5 GMAC per 128² LR at
    the defaults. Trained with an L1 loss on LR/HR pairs (scripts/train_embedded.py, stage 0); the diffusion
    model then only has to add the texture it cannot predict.
    """

    def __init__(self, factor: int = 4, channels: int = 48, blocks: int = 6) -> None:
        super().__init__()
        self.factor, self.channels, self.n_blocks = int(factor), int(channels), int(blocks)
        c_in = 3 * self.factor**2
        self.head = torch.nn.Conv2d(c_in, channels, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Conv2d(channels, channels, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(channels, channels, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.tail = torch.nn.Conv2d(channels, c_in, 3, padding=1)
        torch.nn.init.zeros_(self.tail.weight)  # starts as bicubic
        torch.nn.init.zeros_(self.tail.bias)

    def config(self) -> dict:
        return {"factor": self.factor, "channels": self.channels, "blocks": self.n_blocks}

    def forward(self, upsampled: torch.Tensor) -> torch.Tensor:
        x = self.head(F.pixel_unshuffle(upsampled, self.factor))
        for block in self.blocks:
            x = x + block(x)
        return upsampled + F.pixel_shuffle(self.tail(x), self.factor)


class ResidualSpaceToDepth(torch.nn.Module):
    """A fixed, lossless stand-in for the VAE that encodes the residual over a base image.

    The base is the control image ``c`` (the bicubic-upsampled LR), or ``sharpener(c)`` when a `Sharpener` is
    given. ``encode(x, c) = pixel_unshuffle(scale · (x − base), factor)``:
    ``(B, 3, H, W) -> (B, 3·factor², H/f, W/f)``; ``decode(z, c) = base + detail · pixel_shuffle(z, factor) /
    scale`` inverts it exactly (up to float rounding) at ``detail = 1``. ``scale`` brings the residual's typical
    spread closer to the unit-variance noise of the diffusion. With ``luma_only`` the residual is reduced to its
    luma part (`gray`) on both sides: the diffusion adds detail in brightness only and the colours are the
    base's (human vision resolves far less colour detail than brightness detail, and colour speckle is the most
    visible artefact of a small generative model). ``detail`` < 1 scales the generated residual down at decode.
    """

    def __init__(
        self,
        factor: int = 4,
        scale: float = 10.0,
        sharpener: Sharpener | None = None,
        luma_only: bool = False,
        detail: float = 1.0,
    ) -> None:
        super().__init__()
        if factor < 1 or scale <= 0 or detail < 0:
            raise ValueError(
                f"factor must be >= 1, scale > 0 and detail >= 0, got {factor}, {scale}, {detail}"
            )
        self.factor, self.scale = int(factor), float(scale)
        self.sharpener = sharpener
        self.luma_only, self.detail = bool(luma_only), float(detail)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    def base(self, control: torch.Tensor) -> torch.Tensor:
        if self.sharpener is None:
            return control
        with torch.no_grad():
            return self.sharpener(control.float()).to(control.dtype)

    def _residual(self, r: torch.Tensor) -> torch.Tensor:
        return gray(r) if self.luma_only else r

    def encode(self, images: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(self._residual(images - self.base(control)) * self.scale, self.factor)

    def decode(self, latents: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        residual = self._residual(F.pixel_shuffle(latents, self.factor) / self.scale)
        return self.base(control) + self.detail * residual

    def config(self) -> dict:
        out = {
            "type": "residual_space_to_depth",
            "factor": self.factor,
            "scale": self.scale,
            "luma_only": self.luma_only,
            "detail": self.detail,
        }
        if self.sharpener is not None:
            out["sharpener"] = self.sharpener.config()
        return out


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
        autoencoder: ResidualSpaceToDepth | None = None,
    ) -> None:
        vae = autoencoder if autoencoder is not None else ResidualSpaceToDepth(factor, residual_scale)
        if unet.config.in_channels != vae.latent_channels or unet.config.out_channels != vae.latent_channels:
            raise ValueError(
                f"the UNet must take and give {vae.latent_channels} channels (3 x {factor}^2), "
                f"got in {unet.config.in_channels} / out {unet.config.out_channels}"
            )
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(
                f"prompt_embeds must have shape (1, tokens, dim), got {tuple(prompt_embeds.shape)}"
            )
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
        self,
        device: str | torch.device,
        dtype: torch.dtype = torch.float32,
        controlnet_dtype: torch.dtype | None = None,
    ) -> Backbone:
        super().to(device, dtype, controlnet_dtype)
        self.prompt_embeds = self.prompt_embeds.to(self.device, dtype)
        self.vae.to(self.device)  # the sharpener (if any) stays float32: it is small and runs once per image
        return self

    def save_pretrained(self, path: Path) -> None:
        path = Path(path)
        super().save_pretrained(path)
        save_file(
            {"prompt_embeds": self.prompt_embeds.detach().float().cpu().contiguous()}, str(path / PROMPT_FILE)
        )
        meta = json.loads((path / "dp2osr.json").read_text())
        meta["autoencoder"] = self.vae.config()
        if self.vae.sharpener is not None:
            state = {
                k: v.detach().float().cpu().contiguous() for k, v in self.vae.sharpener.state_dict().items()
            }
            save_file(state, str(path / SHARPENER_FILE))
        (path / "dp2osr.json").write_text(json.dumps(meta, indent=2))
        follow_umask(path)


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
        raise ValueError(
            f"widths must be >= 2 multiples of 16, the first >= 48 (latent channels), got {widths}"
        )
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
        name="embedded",
        unet=unet,
        scheduler=scheduler,
        prompt_embeds=prompt_embeds,
        residual_scale=residual_scale,
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
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype)
    return EmbeddedBackbone(
        name=name,
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(base / "scheduler"),
        prompt_embeds=load_file(str(base / PROMPT_FILE))["prompt_embeds"],
        controlnet=make_controlnet(unet),
        autoencoder=load_autoencoder(base, meta.get("autoencoder", {})),
    )


def load_autoencoder(base: Path, ae: dict) -> ResidualSpaceToDepth:
    """The stand-in autoencoder a model folder's dp2osr.json describes (with its sharpener's weights)."""
    sharpener = None
    if "sharpener" in ae:
        sharpener = Sharpener(**ae["sharpener"])
        path = base / SHARPENER_FILE
        if not path.is_file():
            raise ValueError(f"{base}: dp2osr.json names a sharpener but {SHARPENER_FILE} is missing")
        sharpener.load_state_dict(load_file(str(path)), strict=True)
        sharpener.requires_grad_(False).eval()
    return ResidualSpaceToDepth(
        int(ae.get("factor", 4)),
        float(ae.get("scale", 10.0)),
        sharpener,
        bool(ae.get("luma_only", False)),
        float(ae.get("detail", 1.0)),
    )
