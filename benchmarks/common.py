"""Shared by the benchmarks: the real SD2-base / FLUX.1-dev architectures (scalable in width), timing, memory.

The configs below are those of ``stabilityai/stable-diffusion-2-base`` (UNet, VAE, OpenCLIP-H text encoder)
and ``black-forest-labs/FLUX.1-dev`` (transformer, VAE), written out so that real-size models with random
weights can be built offline. ``width_div`` divides every channel width (and the cross-attention / text
widths) while keeping depth, block layout, head count and channels per norm group, so the *proportions*
between UNet, ControlNet, VAE and text encoder -- and the ratios a benchmark measures between them -- stay
those of the real model at 1/width_div² of its parameters.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def flux_transformer_config(div: int = 1) -> dict:
    """FLUX.1-dev's transformer at 1/div width (head dim 16 and RoPE axes (4, 6, 6) below full size)."""
    if div == 1:
        return dict(FLUX_TRANSFORMER)
    hidden = FLUX_TRANSFORMER["attention_head_dim"] * FLUX_TRANSFORMER["num_attention_heads"] // div
    return dict(
        FLUX_TRANSFORMER,
        attention_head_dim=16,
        num_attention_heads=hidden // 16,
        joint_attention_dim=FLUX_TRANSFORMER["joint_attention_dim"] // div,
        pooled_projection_dim=FLUX_TRANSFORMER["pooled_projection_dim"] // div,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_text_encoders(div: int):
    """CLIP-L and T5-XXL (v1.1, gated GELU) text encoders at 1/div width, with small character tokenizers.
    T5 sequences are 32 tokens (FLUX: 512 at 512 px), keeping text:image tokens at FLUX's 1:2 at 128 px."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dp2osr.backbones.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer(32)
    clip_w, t5_w = 768 // div, 4096 // div
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=clip_w,
            intermediate_size=4 * clip_w,
            num_hidden_layers=12,
            num_attention_heads=max(1, clip_w // 8),
            max_position_embeddings=77,
            projection_dim=clip_w,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            d_model=t5_w,
            d_ff=10240 // div,
            d_kv=16,
            num_heads=t5_w // 16,
            num_layers=24,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
    )
    return clip, t5, tok, tok2


def build_flux(div: int = 1, *, text_encoders: bool = False, tiny: bool = False):
    """A FluxBackbone with FLUX.1-dev's transformer and VAE at 1/div width (``tiny``: 4+2 blocks, for tests)
    and its 4-double-block ControlNet. Without ``text_encoders`` the text encoders are placeholders: prompts
    are then given as embeddings."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from dp2osr.backbones.flux import FluxBackbone

    transformer = FluxTransformer2DModel(**(FLUX_TINY_TRANSFORMER if tiny else flux_transformer_config(div)))
    if text_encoders:
        clip, t5, tok, tok2 = _flux_text_encoders(div)
        length = tok2.model_max_length
    else:
        clip, t5, tok, tok2 = torch.nn.Module(), torch.nn.Module(), None, _Tok(FLUX_T5_LEN)
        length = FLUX_T5_LEN
    return FluxBackbone(
        name="flux" if div == 1 and not tiny else ("flux-tiny-bench" if tiny else f"flux-w{div}"),
        transformer=transformer,
        vae=AutoencoderKL(**vae_config(FLUX_VAE, 16 if tiny else div)),
        text_encoder=clip,
        text_encoder_2=t5,
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        max_sequence_length=length,
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- the naive DPO objective ------------------------------------------------------------------------------
def naive_dpo_objective(
    bb, policy, ref_predict, nb, weights, *, beta: float, autocast=contextlib.nullcontext
):
    """The DPO loss the naive way, the baseline for ``dp2osr.engine.objectives.dpo_objective``: the policy's
    whole forward first, then the reference's own whole forward ``ref_predict(noisy, timesteps, cond, control)``
    (no shared trunk), in the order of the Diffusion-DPO authors' training script. ``nb`` is a
    ``dp2osr.engine.objectives.NoisedBatch``; returns the loss."""
    from dp2osr.math.loss import dpo_loss, mse_per_sample

    b = nb.examples
    with autocast():
        pred = bb.predict(
            nb.noisy, nb.timesteps, nb.cond, nb.control, guidance=bb.train_guidance, controlnet=policy
        )
    err = mse_per_sample(pred.float(), nb.target.float())
    with torch.no_grad(), autocast():
        ref_err = mse_per_sample(
            ref_predict(nb.noisy, nb.timesteps, nb.cond, nb.control).float(), nb.target.float()
        )
    return dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], beta, weights).loss


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


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live CPU tensor storage while active: the CPU analogue of ``torch.cuda.max_memory_allocated``.

    Every tensor an operator returns is counted once per storage until that storage is freed (a weak reference
    on it). Tensors that exist before (weights, optimizer state, caches) are counted by passing them to
    ``track``. Unlike the process's resident memory this excludes the interpreter, libraries and allocator
    slack, so on small models it measures the models and activations, not the process. Kernel-internal
    workspaces are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        nbytes, key = st.nbytes(), st.data_ptr()
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._free(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def track(self, *objects) -> None:
        """Count the tensors in modules (parameters, gradients, buffers), optimizers (state) and containers."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for p in obj.parameters():
                    self._add(p)
                    if p.grad is not None:
                        self._add(p.grad)
                for b in obj.buffers():
                    self._add(b)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    self.track(*state.values())
            elif isinstance(obj, dict):
                self.track(*obj.values())
            elif isinstance(obj, (list, tuple)):
                self.track(*obj)
            elif isinstance(obj, torch.Tensor):
                self._add(obj)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out
