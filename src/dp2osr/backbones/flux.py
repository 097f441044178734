"""C-FLUX: FLUX.1-dev + a FluxControlNetModel with 4 double blocks (arXiv 2510.18851), flow matching.

Timesteps are in the scheduler's units (σ·1000) everywhere outside this file, as ``scheduler.timesteps`` are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from dp2osr.backbones.base import Backbone, Cond, require_parts

CONTROLNET_DOUBLE_LAYERS = 4  # the released C-FLUX / DP²O-FLUX ControlNets
CONTROLNET_SINGLE_LAYERS = 0


def flux_controlnet_from(
    transformer: FluxTransformer2DModel, load_weights: bool = True
) -> FluxControlNetModel:
    cfg = transformer.config
    return FluxControlNetModel.from_transformer(
        transformer,
        num_layers=CONTROLNET_DOUBLE_LAYERS,
        num_single_layers=CONTROLNET_SINGLE_LAYERS,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        load_weights_from_transformer=load_weights,
    )


class FluxBackbone(Backbone):
    """FluxTransformer2DModel + FluxControlNetModel; the control image enters as packed VAE latents."""

    kind = "flux"
    default_steps = 25
    default_guidance = 2.5
    default_negative_prompt = ""
    default_process_size = 512
    pair_ratio = 1 / 16
    preferred_dtype = "bf16"
    train_guidance = 2.5
    denoiser_name = "transformer"
    base_parts = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    base_description = "a FLUX.1-dev model (black-forest-labs/FLUX.1-dev)"
    controlnet_description = (
        "FluxControlNetModel.from_transformer(<this transformer>, num_layers=4, num_single_layers=0)"
    )

    def __init__(
        self,
        *,
        name: str,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler: FlowMatchEulerDiscreteScheduler,
        controlnet: FluxControlNetModel | None = None,
        max_sequence_length: int = 512,
    ) -> None:
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = min(max_sequence_length, tokenizer_2.model_max_length)
        super().__init__(
            name=name, controlnet=controlnet or flux_controlnet_from(transformer), scheduler=scheduler
        )

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def pixel_multiple(self) -> int:
        return self.latent_factor * 2  # latents are packed in 2x2 patches

    # ---- conditioning ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None) -> Cond:
        """CLIP pooled embedding + T5 token embeddings; FLUX-dev uses no negative prompt."""
        clip_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # the encoders may have been offloaded to the CPU
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder_2.device)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return {
            "prompt_embeds": embeds.to(self.device, self.dtype),
            "pooled_prompt_embeds": pooled.to(self.device, self.dtype),
        }

    def encode_images(self, images: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return ((z - self.vae.config.shift_factor) * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    def prepare_control(self, control_image: torch.Tensor, generators=None) -> torch.Tensor:
        """Sampling: one draw from the VAE posterior per generator, before anything else is drawn from it (as
        FluxControlNetPipeline does); training (no generators): the posterior mode."""
        if generators is None:
            return self.encode_images(control_image)
        dist = self.vae.encode(control_image.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        z = torch.cat([dist.sample(generator=g) for g in generators])
        return ((z - self.vae.config.shift_factor) * self.vae.config.scaling_factor).to(self.dtype)

    def control_tile(self, control: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return control[..., y0:y1, x0:x1]

    # ---- denoiser ---------------------------------------------------------------------------------
    @staticmethod
    def _pack(z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return FluxPipeline._pack_latents(z, b, c, h, w)

    def predict(self, latents, timesteps, cond, control, *, guidance=None, controlnet=None, trunk=None):
        if trunk is not None:
            raise ValueError("FLUX has no denoiser trunk to share (its ControlNet feeds the first block)")
        net = controlnet if controlnet is not None else self.controlnet
        b, c, h, w = latents.shape
        if control.shape[0] != b:
            control = control.expand(b, -1, -1, -1)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        emb = cond["prompt_embeds"]
        txt_ids = torch.zeros(emb.shape[1], 3, device=latents.device, dtype=latents.dtype)
        g = None
        if self.transformer.config.guidance_embeds:
            value = self.default_guidance if guidance is None else guidance
            g = torch.full((b,), float(value), device=latents.device, dtype=torch.float32)
        common = dict(
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=g,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=emb,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )
        hidden = self._pack(latents)
        blocks, single = net(hidden_states=hidden, controlnet_cond=self._pack(control), **common)
        # One dtype for the residuals whichever ControlNet made them: accelerate returns a prepared model's outputs
        # in fp32, and the transformer's bf16 hidden states plus fp32 residuals would round differently from the
        # reference's bf16 ones (DPO's policy and reference must agree exactly at the start)
        blocks = None if blocks is None else [r.to(latents.dtype) for r in blocks]
        single = None if single is None else [r.to(latents.dtype) for r in single]
        out = self.transformer(
            hidden_states=hidden,
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=single,
            **common,
        )[0]
        return FluxPipeline._unpack_latents(
            out, h * self.latent_factor, w * self.latent_factor, self.latent_factor
        )

    def _mu(self, latent_hw: tuple[int, int]) -> float:
        cfg = self.scheduler.config
        seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        return calculate_shift(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )

    def set_timesteps(self, steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if self.scheduler.config.get("use_dynamic_shifting", False):
            self.scheduler.set_timesteps(sigmas=sigmas, mu=self._mu(latent_hw), device=self.device)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        return self.scheduler.timesteps

    def step(self, output, t, latents, generators):
        return self.scheduler.step(output, t, latents).prev_sample  # Euler: deterministic

    # ---- training ---------------------------------------------------------------------------------
    def sample_timesteps(self, batch, latent_hw, generator):
        """σ = shift·u / (1 + (shift − 1)·u), u = sigmoid(N(0, 1)): logit-normal with FLUX's resolution shift."""
        u = torch.sigmoid(torch.randn(batch, generator=generator))
        shift = float(np.exp(self._mu(latent_hw)))
        sigma = shift * u / (1 + (shift - 1) * u)
        return (sigma * 1000).to(self.device)

    def noisy_and_target(self, x0, noise, timesteps):
        s = (timesteps.float() / 1000).view(-1, 1, 1, 1).to(x0.dtype)
        return (1 - s) * x0 + s * noise, noise - x0

    # ---- parts ----------------------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    def tokenizers(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2}

    @classmethod
    def controlnet_for(
        cls, denoiser: FluxTransformer2DModel, load_weights: bool = True
    ) -> FluxControlNetModel:
        return flux_controlnet_from(denoiser, load_weights)

    @classmethod
    def controlnet_from_folder(cls, path: Path, dtype: torch.dtype) -> FluxControlNetModel:
        return FluxControlNetModel.from_pretrained(path, torch_dtype=dtype)

    @classmethod
    def load(cls, base: Path, dtype: torch.dtype, make_controlnet, name: str) -> FluxBackbone:
        """Load a FLUX.1-dev folder in diffusers layout; ``make_controlnet(transformer)`` gives the ControlNet."""
        return load_flux(require_parts(base, cls.base_parts, "FLUX.1-dev"), dtype, make_controlnet, name)


def load_flux(base: Path, dtype: torch.dtype, make_controlnet, name: str) -> FluxBackbone:
    """The parts of a FLUX.1-dev folder (checked by ``FluxBackbone.load``)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer", torch_dtype=dtype)
    return FluxBackbone(
        name=name,
        transformer=transformer,
        vae=AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32),  # kept float32
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=dtype),
        text_encoder_2=T5EncoderModel.from_pretrained(base / "text_encoder_2", torch_dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(base / "tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(base / "scheduler"),
        controlnet=make_controlnet(transformer),
    )
