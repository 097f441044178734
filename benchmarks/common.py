"""Shared by the benchmarks: the real SD2-base / FLUX.1-dev architectures (scalable in width), timing, memory.

The configs below are those of ``stabilityai/stable-diffusion-2-base`` (UNet, VAE, OpenCLIP-H text encoder)
and ``black-forest-labs/FLUX.1-dev`` (transformer, VAE), written out so that real-size models with random
weights can be built offline. ``width_div`` divides every channel width (and the cross-attention / text
widths) while keeping depth, block layout, head count and channels per norm group, so the *proportions*
between UNet, ControlNet, VAE and text encoder -- and the ratios a benchmark measures between them -- stay
those of the real model at 1/width_div² of its parameters.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ---- SD2-base (stabilityai/stable-diffusion-2-base) ------------------------------------------------------
SD2_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),  # diffusers' name; for SD2 these are the head counts
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
SD2_CONTROLNET_EMBED = (16, 32, 96, 256)  # ControlNetModel's default conditioning embedder (factor 8)
VAE_BASE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SD2_VAE = dict(VAE_BASE, latent_channels=4, sample_size=768, scaling_factor=0.18215)
SD2_TEXT = {  # OpenCLIP ViT-H/14 text tower as transformers' CLIPTextModel
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
SD2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

# ---- FLUX.1-dev ------------------------------------------------------------------------------------------
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_TINY_TRANSFORMER = {  # for --tiny / CPU tests: same block types, 2 + 2 blocks
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 4,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
FLUX_VAE = dict(
    VAE_BASE,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
FLUX_T5_LEN = 512  # FLUX.1-dev's max_sequence_length


def _groups(div: int) -> int:
    if 32 % div:
        raise ValueError(f"width_div must divide 32 (norm groups keep their channel count), got {div}")
    return 32 // div


def sd2_unet_config(div: int = 1) -> dict:
    return dict(
        SD2_UNET,
        block_out_channels=tuple(c // div for c in SD2_UNET["block_out_channels"]),
        cross_attention_dim=SD2_UNET["cross_attention_dim"] // div,
        norm_num_groups=_groups(div),
    )


def vae_config(base: dict, div: int = 1) -> dict:
    return dict(
        base,
        block_out_channels=tuple(c // div for c in base["block_out_channels"]),
        norm_num_groups=_groups(div),
    )


def sd2_text_config(div: int = 1, vocab_size: int = 49408) -> dict:
    return dict(
        SD2_TEXT,
        hidden_size=SD2_TEXT["hidden_size"] // div,
        intermediate_size=SD2_TEXT["intermediate_size"] // div,
        projection_dim=SD2_TEXT["projection_dim"] // div,
        vocab_size=vocab_size,
    )


def build_sd2(div: int = 1, *, text_encoder: bool = True, name: str | None = None):
    """An SD2Backbone with the SD2-base architecture at 1/div width (random weights, built where torch's
    default device/dtype point). ``text_encoder=False`` leaves the text encoder out (cond given directly)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from dp2osr.backbones.sd2 import SD2Backbone

    unet = UNet2DConditionModel(**sd2_unet_config(div))
    embed = tuple(max(1, c // div) for c in SD2_CONTROLNET_EMBED)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embed)
    te, tok = None, None
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel

        from dp2osr.backbones.tiny import tiny_clip_tokenizer

        tok = tiny_clip_tokenizer()
        te = CLIPTextModel(
            CLIPTextConfig(**sd2_text_config(div, len(tok)), bos_token_id=0, eos_token_id=1, pad_token_id=1)
        )
    return SD2Backbone(
        name=name or ("sd2" if div == 1 else f"sd2-w{div}"),
        unet=unet,
        vae=AutoencoderKL(**vae_config(SD2_VAE, div)),
        text_encoder=te,
        tokenizer=tok,
        scheduler=DDPMScheduler(**SD2_SCHEDULER),
        controlnet=controlnet,
    )


class _Tok:
    """Stands in for FLUX's T5 tokenizer where prompts are given as embeddings (only its length is read)."""

    def __init__(self, max_length: int) -> None:
        self.model_max_length = max_length


def build_flux(tiny: bool = False):
    """A FluxBackbone with FLUX.1-dev's transformer and VAE (or tiny versions) and its 4-double-block
    ControlNet; no text encoders (placeholders: prompts are given as embeddings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from dp2osr.backbones.flux import FluxBackbone

    transformer = FluxTransformer2DModel(**(FLUX_TINY_TRANSFORMER if tiny else FLUX_TRANSFORMER))
    return FluxBackbone(
        name="flux-tiny-bench" if tiny else "flux",
        transformer=transformer,
        vae=AutoencoderKL(**vae_config(FLUX_VAE, 16 if tiny else 1)),
        text_encoder=torch.nn.Module(),
        text_encoder_2=torch.nn.Module(),
        tokenizer=None,
        tokenizer_2=_Tok(FLUX_T5_LEN),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- measuring -------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn, device: torch.device | None = None) -> float:
    """Seconds one call of ``fn()`` takes (synchronising CUDA around it)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since start or the last ``reset_peak_rss`` (MiB; Linux VmHWM)."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and reset the peak RSS to the current RSS (Linux >= 4.0)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info
