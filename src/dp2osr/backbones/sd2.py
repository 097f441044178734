"""C-SD2: Stable Diffusion 2 base + a diffusers ControlNet (arXiv 2510.18851), epsilon or v prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

from dp2osr.backbones.base import Backbone, Cond, require_parts


class SD2Backbone(Backbone):
    """UNet2DConditionModel + ControlNetModel.from_unet; the control image is the upsampled LR in pixels."""

    kind = "sd2"
    default_steps = 50
    default_guidance = 3.5
    default_negative_prompt = "dotted, noise, blur, lowres, smooth"
    uses_negative_prompt = True
    default_process_size = 512
    pair_ratio = 0.25
    preferred_dtype = "fp16"
    train_guidance = None  # no CFG while training
    base_parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    base_description = "Stable Diffusion 2 base (stabilityai/stable-diffusion-2-base, downloaded on a machine with network access)"
    controlnet_description = "ControlNetModel.from_unet(<this UNet>) (an SD2 ControlNet for this base model)"

    def __init__(
        self,
        *,
        name: str,
        unet: UNet2DConditionModel,
        vae: Any,
        text_encoder: torch.nn.Module | None,
        tokenizer: Any,
        scheduler: DDPMScheduler,
        controlnet: ControlNetModel | None = None,
    ) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        super().__init__(
            name=name, controlnet=controlnet or ControlNetModel.from_unet(unet), scheduler=scheduler
        )

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    # ---- conditioning ---------------------------------------------------------------------------
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # the encoder may have been offloaded to the CPU
        return self.text_encoder(ids)[0].to(self.device, self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None) -> Cond:
        cond = {"prompt_embeds": self._embed(prompts)}
        if negative_prompt is not None:
            cond["negative_prompt_embeds"] = self._embed([negative_prompt] * len(prompts))
        return cond

    def encode_images(self, images: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        return (self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    def prepare_control(self, control_image: torch.Tensor, generators=None) -> torch.Tensor:
        return control_image.to(self.device, self.dtype)  # pixels: nothing drawn

    def control_tile(self, control: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        f = self.latent_factor
        return control[..., y0 * f : y1 * f, x0 * f : x1 * f]

    # ---- denoiser ---------------------------------------------------------------------------------
    def predict(self, latents, timesteps, cond, control, *, guidance=None, controlnet=None, trunk=None):
        net = controlnet if controlnet is not None else self.controlnet
        emb = cond["prompt_embeds"]
        cfg = guidance is not None and guidance > 1 and "negative_prompt_embeds" in cond
        if control.shape[0] != latents.shape[0]:
            control = control.expand(latents.shape[0], -1, -1, -1)
        if cfg:  # one batched call for the unconditional and conditional branches
            if trunk is not None:
                raise ValueError("a shared trunk is for training passes, which use no CFG")
            latents = torch.cat([latents, latents])
            emb = torch.cat([cond["negative_prompt_embeds"], emb])
            control = torch.cat([control, control])
            timesteps = torch.cat([timesteps, timesteps])
        down, mid = net(
            latents, timesteps, encoder_hidden_states=emb, controlnet_cond=control, return_dict=False
        )
        down, mid = [d.to(latents.dtype) for d in down], mid.to(latents.dtype)
        if trunk is not None:
            out = self._unet_head(trunk, down, mid)
        else:
            out = self.unet(
                latents,
                timesteps,
                encoder_hidden_states=emb,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
        return out

    def _splittable(self) -> bool:
        """Whether the UNet uses only the forward features :meth:`trunk` / :meth:`_unet_head` reproduce (SD2's,
        the embedded model's and the tiny test models' do); any other UNet takes the plain ``unet()`` path."""
        c = self.unet.config
        return (
            c.class_embed_type is None
            and c.num_class_embeds is None
            and c.addition_embed_type is None
            and c.encoder_hid_dim is None
            and c.time_cond_proj_dim is None
            and not c.center_input_sample
            and getattr(self.unet, "position_net", None) is None
        )

    @torch.no_grad()
    def trunk(self, latents, timesteps, cond):
        """The UNet's time embedding, ``conv_in``, down blocks and mid block, which the ControlNet's residuals
        do not reach (they are added to the skip connections and to the mid block's output): the same steps as
        ``UNet2DConditionModel.forward`` up to that point. :meth:`_unet_head` finishes the forward; together
        they equal ``unet(...)`` (tests/test_backbones.py)."""
        if not self._splittable():
            return None
        u, emb = self.unet, cond["prompt_embeds"]
        temb = u.time_embedding(u.get_time_embed(sample=latents, timestep=timesteps), None)
        if u.time_embed_act is not None:
            temb = u.time_embed_act(temb)
        h = u.conv_in(latents)
        skips = (h,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=temb, encoder_hidden_states=emb)
            else:
                h, res = block(hidden_states=h, temb=temb)
            skips += res
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, temb, encoder_hidden_states=emb)
            else:
                h = u.mid_block(h, temb)
        odd = any(side % 2**u.num_upsamplers for side in latents.shape[-2:])
        return {"mid": h, "skips": skips, "temb": temb, "emb": emb, "odd_size": odd}

    def _unet_head(self, trunk: dict, down: list[torch.Tensor], mid: torch.Tensor) -> torch.Tensor:
        """The rest of the UNet forward after :meth:`trunk`: ControlNet residuals added, up blocks, output."""
        u = self.unet
        skips = tuple(s + d for s, d in zip(trunk["skips"], down, strict=True))
        h, temb, emb = trunk["mid"] + mid, trunk["temb"], trunk["emb"]
        size = None
        for i, block in enumerate(u.up_blocks):
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if i < len(u.up_blocks) - 1 and trunk["odd_size"]:
                size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                h = block(
                    hidden_states=h,
                    temb=temb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=emb,
                    upsample_size=size,
                )
            else:
                h = block(hidden_states=h, temb=temb, res_hidden_states_tuple=res, upsample_size=size)
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    def set_timesteps(self, steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=self.device)
        return self.scheduler.timesteps

    # ---- training ---------------------------------------------------------------------------------
    def sample_timesteps(self, batch, latent_hw, generator):
        n = self.scheduler.config.num_train_timesteps
        return torch.randint(0, n, (batch,), generator=generator).to(self.device)

    def noisy_and_target(self, x0, noise, timesteps):
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(x0, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")

    # ---- parts ----------------------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.unet, "vae": self.vae}
        if self.text_encoder is not None:
            parts["text_encoder"] = self.text_encoder
        return parts

    def tokenizers(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer} if self.tokenizer is not None else {}

    @classmethod
    def controlnet_for(cls, denoiser: UNet2DConditionModel, load_weights: bool = True) -> ControlNetModel:
        return ControlNetModel.from_unet(denoiser, load_weights_from_unet=load_weights)

    @classmethod
    def load(cls, base: Path, dtype: torch.dtype, make_controlnet, name: str) -> SD2Backbone:
        """Load an SD2-base folder in diffusers layout; ``make_controlnet(unet)`` gives the ControlNet."""
        return load_sd2(
            require_parts(base, cls.base_parts, "Stable Diffusion 2 base"), dtype, make_controlnet, name
        )


def load_sd2(base: Path, dtype: torch.dtype, make_controlnet, name: str) -> SD2Backbone:
    """The parts of an SD2-base folder (checked by ``SD2Backbone.load``)."""
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype)
    return SD2Backbone(
        name=name,
        unet=unet,
        vae=AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32),  # kept float32
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(base / "scheduler"),
        controlnet=make_controlnet(unet),
    )
