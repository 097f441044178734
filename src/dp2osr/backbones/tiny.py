"""Tiny offline versions of the SD2 and FLUX backbones, built from config in code.

Same classes and code paths as the real models, a few hundred thousand parameters, random weights from a
fixed seed, and their own small tokenizers, so every command and test runs on a CPU with no downloads.
`Backbone.save_pretrained` writes them in diffusers layout, and `load_backbone("sd2"|"flux", base=folder)`
loads them back through the same code as real checkpoints.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from dp2osr.backbones.flux import FluxBackbone
from dp2osr.backbones.sd2 import SD2Backbone

_CHARS = list(string.ascii_lowercase + string.digits + ",.-'!?():;")
TINY_PROCESS_SIZE = 64
TINY_STEPS = 4


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Character-level CLIP BPE tokenizer (no merges): every word is spelled out."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 32) -> T5Tokenizer:
    """Character-level unigram T5 tokenizer (built without sentencepiece files)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _tiny_clip(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def _tiny_vae(latent_channels: int, **extra) -> AutoencoderKL:
    # 4 blocks -> factor 8, like the real VAEs; norm groups divide every width.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_PROCESS_SIZE,
        **extra,
    )


def build_sd2_tiny(seed: int = 0) -> SD2Backbone:
    """SD2-style backbone: CrossAttn UNet (linear projections, like SD2), factor-8 VAE, CLIP text encoder."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=TINY_PROCESS_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)  # default conditioning embedder: factor 8, like the VAE
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    bb = SD2Backbone(
        name="sd2-tiny",
        unet=unet,
        vae=_tiny_vae(4, scaling_factor=0.18215),
        text_encoder=_tiny_clip(tokenizer, 16),
        tokenizer=tokenizer,
        scheduler=scheduler,
        controlnet=controlnet,
    )
    bb.default_process_size = TINY_PROCESS_SIZE
    bb.default_steps = TINY_STEPS
    return bb


def build_flux_tiny(seed: int = 0) -> FluxBackbone:
    """FLUX-style backbone: 4 double + 1 single blocks, guidance embedding, CLIP + T5, flow-matching Euler."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2x2 packing
        num_layers=4,  # >= the ControlNet's 4 double blocks, so every ControlNet block output is used
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_layers=2,
            num_heads=2,
            dropout_rate=0.0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=16,
        max_image_seq_len=256,
        base_shift=0.5,
        max_shift=1.15,
    )
    bb = FluxBackbone(
        name="flux-tiny",
        transformer=transformer,
        vae=_tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_tiny_clip(tokenizer, 16),
        text_encoder_2=t5,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        max_sequence_length=32,
    )
    bb.default_process_size = TINY_PROCESS_SIZE
    bb.default_steps = TINY_STEPS
    return bb
