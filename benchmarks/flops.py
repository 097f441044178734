"""Where DP²O's compute goes, at real size: FLOPs and parameter memory of SD2 and FLUX, counted, not timed.

    .venv/bin/python benchmarks/flops.py              # 512 px, ~20 s on a CPU, no GPU and no weights needed

The real SD2-base / FLUX.1-dev architectures (benchmarks/common.py, plus the SD2 OpenCLIP-H, FLUX CLIP-L and
T5-XXL text encoders) are built on the ``meta`` device (shapes only, no memory), and
``torch.utils.flop_counter.FlopCounterMode`` counts the matrix-multiply, convolution and attention FLOPs of
each part -- including the backward pass of the DPO training step (dp2osr's ``predict``, gradient
checkpointing for FLUX as ``--gradient-checkpointing`` does). From these:

- sampling cost per candidate (SD2: 50 steps with CFG, i.e. a batch of 2; FLUX: 25 steps) + VAE decode;
- the DPO step per pair, ours (cached latents/embeddings) against naive (VAE- and text-encoding every step):
  the FLOP ratio is the most that caching can speed a step up when time follows FLOPs;
- the static training memory (weights, gradients, AdamW state; activations excluded) with bf16 frozen parts,
  fp32 ControlNet master weights + gradients + two AdamW moments (16 B/param) and a bf16 reference copy --
  ours (one frozen denoiser) against naive (two).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common
import torch
from torch.utils.flop_counter import FlopCounterMode


def tflop(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e12


def text_encoders(family: str) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if family == "sd2":
        return {"text_encoder (OpenCLIP-H)": CLIPTextModel(CLIPTextConfig(**common.sd2_text_config(1)))}
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            d_kv=64,
            feed_forward_proj="gated-gelu",
        )
    )
    return {"text_encoder (CLIP-L)": clip, "text_encoder_2 (T5-XXL)": t5}


def count(family: str, size: int) -> dict:
    meta = torch.device("meta")
    with meta:
        bb = common.build_sd2(1, text_encoder=False) if family == "sd2" else common.build_flux()
        texts = text_encoders(family)
    f, c = bb.latent_factor, bb.latent_channels
    h = size // f
    den_name = "unet" if family == "sd2" else "transformer"
    params = {den_name: getattr(bb, den_name), "controlnet": bb.controlnet, "vae": bb.vae, **texts}
    n = {k: common.n_params(m) / 1e9 for k, m in params.items()}

    def cond(b):
        if family == "sd2":
            return {"prompt_embeds": torch.empty(b, 77, 1024, device=meta)}
        return {
            "prompt_embeds": torch.empty(b, 512, 4096, device=meta),
            "pooled_prompt_embeds": torch.empty(b, 768, device=meta),
        }

    x1 = torch.empty(1, 3, size, size, device=meta)
    z1 = torch.empty(1, c, h, h, device=meta)
    ctrl1 = x1 if family == "sd2" else z1
    t1 = torch.full((1,), 500.0, device=meta)
    fw: dict[str, float] = {}
    with torch.no_grad():
        fw["vae encode"] = tflop(lambda: bb.vae.encode(x1))
        fw["vae decode"] = tflop(lambda: bb.vae.decode(z1))
        fw["predict (denoiser + controlnet)"] = tflop(
            lambda: bb.predict(z1, t1, cond(1), ctrl1, guidance=bb.train_guidance)
        )
        if family == "sd2":
            fw["controlnet alone"] = tflop(
                lambda: bb.controlnet(
                    z1, t1, encoder_hidden_states=cond(1)["prompt_embeds"], controlnet_cond=x1
                )
            )
        ids = torch.zeros(1, 512, dtype=torch.long, device=meta)
        for name, te in texts.items():
            fw[name] = tflop(lambda te=te, name=name: te(ids[:, : 77 if "CLIP" in name else 512]))

    # One DPO step on one pair (winner + loser share noise, timestep, control and prompt): batch 2.
    net = bb.controlnet.train().requires_grad_(True)
    if family == "flux":
        net.enable_gradient_checkpointing()
        bb.transformer.enable_gradient_checkpointing()
    z2, t2 = torch.empty(2, c, h, h, device=meta), torch.full((2,), 500.0, device=meta)
    ctrl2 = torch.empty(2, 3, size, size, device=meta) if family == "sd2" else z2

    def policy(trunk=None):
        out = bb.predict(z2, t2, cond(2), ctrl2, guidance=bb.train_guidance, controlnet=net, trunk=trunk)
        out.float().pow(2).mean().backward()

    def reference(trunk=None):
        with torch.no_grad():
            bb.predict(z2, t2, cond(2), ctrl2, guidance=bb.train_guidance, controlnet=net, trunk=trunk)

    # ours: the denoiser's trunk (SD2: UNet down + mid blocks; FLUX: none) once for both passes
    trunk_flop = tflop(lambda: bb.trunk(z2, t2, cond(2)))
    trunk = bb.trunk(z2, t2, cond(2))
    ours = trunk_flop + tflop(lambda: policy(trunk)) + tflop(lambda: reference(trunk))
    encodes = 2 + (1 if family == "flux" else 0)  # winner, loser (+ FLUX's control, which enters as latents)
    naive = (
        tflop(policy)
        + tflop(reference)
        + encodes * fw["vae encode"]
        + sum(v for k, v in fw.items() if k.startswith("text_encoder"))
    )
    steps = bb.default_steps
    cfg = 2 if family == "sd2" else 1
    sample = steps * cfg * fw["predict (denoiser + controlnet)"] + fw["vae decode"]

    b16, cn = 2, n["controlnet"]
    frozen = sum(v for k, v in n.items() if k != "controlnet")
    static_ours = (frozen * b16 + cn * 16 + cn * 4) * 1e9 / 2**30  # + the fp32 reference ControlNet
    static_naive = static_ours + n[den_name] * b16 * 1e9 / 2**30
    return {
        "family": family,
        "px": size,
        "params_billion": {k: round(v, 3) for k, v in n.items()},
        "forward_tflop_per_image": {k: round(v, 3) for k, v in fw.items()},
        "sampling_tflop_per_candidate": round(sample, 1),
        "sampling_steps": steps,
        "cfg_batch": cfg,
        "dpo_step_tflop_per_pair": {
            "ours": round(ours, 2),
            "naive": round(naive, 2),
            "flop_ratio_naive_over_ours": round(naive / ours, 3),
        },
        "static_training_memory_gib": {
            "ours": round(static_ours, 1),
            "naive": round(static_naive, 1),
            "ratio": round(static_ours / static_naive, 3),
            "text_encoders_in_ours": round(
                sum(v for k, v in n.items() if k.startswith("text")) * b16 * 1e9 / 2**30, 1
            ),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="image side in px")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    out = [count(fam, args.size) for fam in ("sd2", "flux")]
    for r in out:
        print(f"\n{r['family'].upper()} at {r['px']}px, params (B): {r['params_billion']}")
        for k, v in r["forward_tflop_per_image"].items():
            print(f"  {k:34s} {v:8.3f} TFLOP per image (forward)")
        print(
            f"  sampling, per candidate             {r['sampling_tflop_per_candidate']:8.1f} TFLOP "
            f"({r['sampling_steps']} steps x batch {r['cfg_batch']} + decode)"
        )
        d = r["dpo_step_tflop_per_pair"]
        print(
            f"  DPO step per pair: ours {d['ours']:.2f}, naive {d['naive']:.2f} TFLOP -> ours saves at most "
            f"{d['flop_ratio_naive_over_ours']:.2f}x"
        )
        m = r["static_training_memory_gib"]
        print(
            f"  static training memory: ours {m['ours']:.1f} GiB, naive {m['naive']:.1f} GiB "
            f"({m['ratio']:.2f}x; text encoders {m['text_encoders_in_ours']:.1f} GiB of ours), activations excluded"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
