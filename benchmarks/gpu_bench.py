"""Real-size SD2 and FLUX ControlNets on one GPU: sampling throughput, DPO training step, matmul efficiency.

    PYTHONPATH=src python benchmarks/gpu_bench.py            # on a CUDA machine (~2-3 min, one process)
    .venv/bin/python benchmarks/gpu_bench.py --tiny          # the same code on CPU with tiny configs (a test)

Builds the SD2-base UNet + ``ControlNetModel.from_unet`` + SD2 VAE, and the FLUX.1-dev transformer +
``FluxControlNetModel.from_transformer`` (4 double blocks) + FLUX VAE, with random weights (weights do not
change speed or memory) directly on the GPU in bf16, wraps them in dp2osr's own ``SD2Backbone`` /
``FluxBackbone`` (text encoders left out: prompts are random embeddings of the real shapes, SD2 (B, 77, 1024),
FLUX T5 (B, 512, 4096) + pooled (B, 768)), and measures with dp2osr's code paths:

- the GPU's bf16 matmul peak (a large ``torch.matmul``), and the fraction of it that one UNet / transformer
  forward reaches (FLOPs from ``torch.utils.flop_counter.FlopCounterMode``);
- sampling at 512² with ``dp2osr.engine.sampler.generate`` for M = 1, 8, 16 seeds in one batched call: time per
  denoising step (SD2 with CFG, i.e. a batch of 2M), VAE decode per image, and the per-image time and
  images/s extrapolated to the default 50 (SD2) / 25 (FLUX) steps, with the achieved TFLOP/s of the denoising
  steps and their fraction of the matmul peak;
- the same with each sampling fast path (``--fast-paths``: dp2osr's ``--channels-last``, ``--fuse-qkv``,
  ``--compile`` and all three, applied by ``Backbone.optimize`` to copies of the denoiser and ControlNet),
  beside the plain rows (``speedup_vs_plain``); compiled paths at ``--compile-ms`` only (one compilation per
  shape), each M after an untimed one-step call at that M;
- one DP²O training step as ``dp2osr train --mode dpo --mixed-precision bf16`` does it (fp32 ControlNet master
  weights + AdamW, frozen bf16 UNet/transformer shared with a frozen bf16 reference ControlNet, cached
  latents): step time and peak memory (``torch.cuda.max_memory_allocated``) at 512², SD2 with 2 pairs,
  FLUX with 1 pair and gradient checkpointing on ControlNet and transformer; and the naive step (a
  deep-copied reference UNet/transformer + ControlNet, VAE encoding of winner and loser (FLUX: and the
  control) every step) for comparison -- FLUX's naive step last, as it may not fit in 80 GB.

Each part is guarded (an error is recorded and the rest goes on); results are printed as a table and
written as JSON after every part to ``$OUT/gpu_bench.json`` (when ``$OUT`` is set) or ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common
import torch

T0 = time.perf_counter()
RESULTS: dict = {"errors": []}
JSON_PATH: Path | None = None


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def save() -> None:
    RESULTS["elapsed_s"] = round(time.perf_counter() - T0, 1)
    if JSON_PATH is not None:
        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(RESULTS, indent=2, default=str))


@contextlib.contextmanager
def guarded(name: str):
    """Run a part; on error record it (and free what it held) and go on with the next part."""
    log(f"-- {name}")
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- one failing part must not lose the others' numbers
        oom = isinstance(exc, torch.OutOfMemoryError)
        RESULTS["errors"].append({"part": name, "error": f"{type(exc).__name__}: {exc}"[:2000], "oom": oom})
        log(f"   {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        if not oom:
            traceback.print_exc()
    finally:
        free()
        save()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def build_on(device: torch.device, dtype: torch.dtype):
    """Create modules directly on ``device`` in ``dtype`` (no CPU copy, no fp32 detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 3)


class Memory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU (``--tiny``) the peak of
    live tensors (common.TensorMemory), counting ``objects`` that exist before the block."""

    def __init__(self, device: torch.device, *objects) -> None:
        self.device, self.objects = device, objects
        self.before = self.peak = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.tm = common.TensorMemory()
            self.tm.track(*self.objects)
            self.before = self.tm.current
            self.tm.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.tm.__exit__(*exc)
            self.peak = self.tm.peak
        return False


def frac(achieved: float, peak: float) -> float:
    return round(achieved / peak, 3) if peak > 0 and math.isfinite(peak) else float("nan")


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def median_time(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return common.median([common.timed(fn, device) for _ in range(reps)])


# ---- parts -------------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, tiny: bool) -> float:
    """Measured dense bf16 matmul throughput (TFLOP/s): the reference for the efficiency fractions."""
    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 3 if tiny else 20

    def run():
        for _ in range(reps):
            torch.matmul(a, b)

    t = median_time(run, device, 5, warmup=1 if tiny else 5)  # warm-up lets the clocks settle
    return 2 * n**3 * reps / t / 1e12


def make_sd2(device, dtype, tiny: bool):
    from diffusers import DDPMScheduler

    with build_on(device, dtype):
        bb = common.build_sd2(16 if tiny else 1, text_encoder=False)
    bb.scheduler = DDPMScheduler(**common.SD2_SCHEDULER)  # scheduler tensors on the CPU in fp32, as loaded
    return bb.to(device, dtype)


def make_flux(device, dtype, tiny: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with build_on(device, dtype):
        bb = common.build_flux(tiny=tiny)
    bb.scheduler = FlowMatchEulerDiscreteScheduler(**common.FLUX_SCHEDULER)
    return bb.to(device, dtype)


def random_cond(bb, batch: int, device, dtype, cfg: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    if bb.kind == "sd2":
        shape = (batch, 77, bb.unet.config.cross_attention_dim)
        cond = {"prompt_embeds": torch.randn(shape, generator=g)}
        if cfg:
            cond["negative_prompt_embeds"] = torch.randn(shape, generator=g)
    else:
        cfg_t = bb.transformer.config
        cond = {
            "prompt_embeds": torch.randn(
                (batch, bb.max_sequence_length, cfg_t.joint_attention_dim), generator=g
            ),
            "pooled_prompt_embeds": torch.randn((batch, cfg_t.pooled_projection_dim), generator=g),
        }
    return {k: v.to(device, dtype) for k, v in cond.items()}


def denoiser_forward(bb, batch: int, size: int, device, dtype):
    """A closure running one plain UNet / transformer forward (no ControlNet) at ``batch`` x ``size``²."""
    f = bb.latent_factor
    g = torch.Generator().manual_seed(1)
    lat = torch.randn((batch, bb.latent_channels, size // f, size // f), generator=g).to(device, dtype)
    cond = random_cond(bb, batch, device, dtype, cfg=False)
    t = torch.full((batch,), 500.0, device=device)
    if bb.kind == "sd2":

        def fwd():
            with torch.no_grad():
                bb.unet(lat, t.to(dtype), encoder_hidden_states=cond["prompt_embeds"], return_dict=False)
    else:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        h, w = lat.shape[-2:]
        hidden = bb._pack(lat)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        guidance = torch.full((batch,), 2.5, device=device, dtype=torch.float32)

        def fwd():
            with torch.no_grad():
                bb.transformer(
                    hidden_states=hidden,
                    timestep=(t / 1000).to(dtype),
                    guidance=guidance,
                    pooled_projections=cond["pooled_prompt_embeds"],
                    encoder_hidden_states=cond["prompt_embeds"],
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )

    return fwd


def efficiency(bb, batch: int, size: int, device, dtype, peak: float, reps: int) -> dict:
    fwd = denoiser_forward(bb, batch, size, device, dtype)
    fwd()  # warm-up
    flops = flops_of(fwd)
    t = median_time(fwd, device, reps)
    achieved = flops / t / 1e12
    out = {
        "batch": batch,
        "px": size,
        "tflop_per_forward": round(flops / 1e12, 3),
        "forward_s": round(t, 4),
        "achieved_tflops": round(achieved, 3),
        "fraction_of_matmul_peak": frac(achieved, peak),
    }
    log(
        f"   {bb.kind} denoiser forward, batch {batch} at {size}px: {flops / 1e12:.2f} TFLOP in {t * 1e3:.1f} ms = "
        f"{achieved:.1f} TFLOP/s = {frac(achieved, peak):.1%} of the matmul peak"
    )
    return out


def step_flops(bb, m: int, size: int, cond: dict, control: torch.Tensor, device, dtype) -> float:
    """FLOPs of one denoising step (denoiser + ControlNet, CFG doubling included) at batch ``m``."""
    f = bb.latent_factor
    lat = torch.zeros((m, bb.latent_channels, size // f, size // f), device=device, dtype=dtype)
    ctrl = bb.prepare_control(control.to(device))
    t = torch.full((m,), 500.0, device=device)
    conds = {k: v.expand(m, *v.shape[1:]) for k, v in cond.items()}
    with torch.no_grad():
        return flops_of(lambda: bb.predict(lat, t, conds, ctrl, guidance=bb.default_guidance))


def sampling(bb, ms, size: int, steps_timed: int, device, dtype, peak: float, flops_step=None) -> list[dict]:
    """Per-step and decode times of dp2osr.engine.sampler.generate with M seeds in one call (hooks on
    predict/decode), each M after an untimed one-step call at that M (a compiled model compiles per shape).
    ``flops_step``: FLOPs of one step at the largest M (default: counted here on ``bb``)."""
    from dp2osr.engine.sampler import generate

    cfg = bb.uses_negative_prompt
    guidance = bb.default_guidance
    cond = random_cond(bb, 1, device, dtype, cfg)
    control = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(2))
    if flops_step is None:
        flops_step = step_flops(bb, max(ms), size, cond, control, device, dtype)
    marks: list[tuple[str, float]] = []
    predict, decode = bb.predict, bb.decode_latents

    def timed_predict(*a, **k):
        sync(device)
        marks.append(("predict", time.perf_counter()))
        return predict(*a, **k)

    def timed_decode(*a, **k):
        sync(device)
        marks.append(("decode", time.perf_counter()))
        out = decode(*a, **k)
        sync(device)
        marks.append(("decoded", time.perf_counter()))
        return out

    bb.predict, bb.decode_latents = timed_predict, timed_decode
    try:
        rows = []
        for m in ms:
            seeds = list(range(m))
            generate(bb, control, cond, seeds, steps=1, guidance=guidance)  # warm-up (and compile) at this M
            marks.clear()
            wall = common.timed(
                lambda seeds=seeds: generate(bb, control, cond, seeds, steps=steps_timed, guidance=guidance),
                device,
            )
            rows.append(sampling_row(bb, m, size, steps_timed, marks, wall, flops_step * m / max(ms), peak))
        base = rows[0]["images_per_s"]
        for r in rows:
            r["speedup_vs_M1"] = round(r["images_per_s"] / base, 2)
        return rows
    finally:  # back to the class's methods (an instance attribute would be bound to bb in a copy of it too)
        del bb.predict, bb.decode_latents


def sampling_row(bb, m, size, steps_timed, marks, wall, flops_step, peak) -> dict:
    """One M's row from the predict/decode marks of a timed ``generate`` call."""
    starts = [t for k, t in marks if k == "predict"]
    dec = [t for k, t in marks if k == "decode"]
    done = [t for k, t in marks if k == "decoded"]
    step_times = [b - a for a, b in zip(starts, [*starts[1:], dec[0]])]
    step_s = common.median(step_times[1:] if len(step_times) > 1 else step_times)
    decode_s = sum(b - a for a, b in zip(dec, done)) / m
    fixed_s = max(0.0, wall - sum(step_times) - decode_s * m)
    n_steps = bb.default_steps if size >= 256 else steps_timed
    per_image = (step_s * n_steps + fixed_s) / m + decode_s
    achieved = flops_step / step_s / 1e12
    r = {
        "M": m,
        "px": size,
        "denoiser_batch": 2 * m if bb.uses_negative_prompt else m,
        "step_s": round(step_s, 4),
        "decode_s_per_image": round(decode_s, 4),
        "fixed_s": round(fixed_s, 4),
        "default_steps": n_steps,
        "s_per_image": round(per_image, 4),
        "images_per_s": round(1 / per_image, 3),
        "measured_steps": steps_timed,
        "measured_wall_s": round(wall, 3),
        "tflop_per_step": round(flops_step / 1e12, 4),
        "achieved_tflops": round(achieved, 3),
        "fraction_of_matmul_peak": frac(achieved, peak),
    }
    log(
        f"   {bb.kind} M={m:2d}: {step_s * 1e3:8.1f} ms/step (batch {r['denoiser_batch']}), decode "
        f"{decode_s * 1e3:6.1f} ms/img -> {per_image:7.3f} s/img at {n_steps} steps = "
        f"{1 / per_image:6.2f} img/s, {achieved:.4g} TFLOP/s = {frac(achieved, peak):.1%} of the matmul peak"
    )
    return r


# Sampling fast paths (dp2osr's --channels-last / --fuse-qkv / --compile, Backbone.optimize), each measured
# beside the plain path on the same model in the same run; "all" is the three together.
FAST_PATHS = {
    "channels_last": {"channels_last": True},
    "fuse_qkv": {"fuse_qkv": True},
    "compile": {"compile": True},
    "all": {"channels_last": True, "fuse_qkv": True, "compile": True},
}


def fast_variant(bb, fast: dict):
    """A shallow copy of ``bb`` with deep copies of its denoiser and ControlNet optimised by ``fast`` (``bb``
    itself stays plain; the copies are freed with the variant)."""
    v = copy.copy(bb)
    assert "predict" not in vars(v), "the copy would call the plain modules through bb's bound predict"
    v.fast_paths = {}
    for name, module in bb.fast_modules().items():
        setattr(v, name, copy.deepcopy(module))
    return v.optimize(**fast)


def fast_sampling(
    bb, name: str, args, size: int, device, dtype, peak: float, res: dict, within_budget
) -> None:
    """Sampling with each fast path of ``args.fast_paths`` beside the plain rows in ``res["sampling"]``."""
    plain = {r["M"]: r for r in res.get("sampling", [])}
    if not plain:
        return
    flops_max = plain[max(plain)]["tflop_per_step"] * 1e12
    out = res.setdefault("sampling_fast", {})
    for path in args.fast_paths:
        if not within_budget(f"sampling {path}"):
            continue
        with guarded(f"{name}: sampling {path}"):
            t = time.perf_counter()
            variant = fast_variant(bb, FAST_PATHS[path])
            ms = (
                sorted(plain)
                if not FAST_PATHS[path].get("compile")
                else [m for m in args.compile_ms if m in plain]
            )
            rows = sampling(
                variant, ms, size, args.sample_steps, device, dtype, peak, flops_max * max(ms) / max(plain)
            )
            for r in rows:
                r["speedup_vs_plain"] = round(r["images_per_s"] / plain[r["M"]]["images_per_s"], 3)
            out[path] = {"rows": rows, "part_s": round(time.perf_counter() - t, 1)}
            del variant


def dpo_step(
    bb, net, ref_net, ref_predict, targets, control, cond, w, g, opt, autocast, shared: bool
) -> float:
    """One DP²O step + optimizer update. ``shared`` (ours): the product's ``noise_batch`` and ``dpo_objective``
    (the denoiser's trunk, SD2: UNet down + mid blocks, once for both passes; the reference pass first, with
    the ControlNet ``ref_net``); otherwise (naive) ``common.naive_dpo_objective``: the policy pass, then the
    reference's own whole forward ``ref_predict`` (see benchmarks/run.py)."""
    from dp2osr.engine.objectives import dpo_objective, noise_batch

    nb = noise_batch(bb, targets, control, cond, g)
    if shared:
        reference = functools.partial(contextlib.nullcontext, ref_net)
        loss = dpo_objective(bb, net, reference, nb, w, beta=5000.0, autocast=autocast)[0]
    else:
        loss = common.naive_dpo_objective(bb, net, ref_predict, nb, w, beta=5000.0, autocast=autocast)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def training(bb, variant: str, pairs: int, size: int, checkpointing: bool, device, dtype, steps: int) -> dict:
    """Step time and peak memory of our DPO step ('ours') or the naive one ('naive')."""
    from dp2osr.backbones import cast

    g = torch.Generator().manual_seed(3)

    def autocast():  # as --mixed-precision bf16; fp32 runs (--tiny on CPU) need none
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    net = cast(bb.controlnet, dtype=torch.float32).train().requires_grad_(True)  # fp32 master weights
    ref_net = copy.deepcopy(net).requires_grad_(False).eval()  # fp32, as dp2osr.train keeps it
    if checkpointing:
        net.enable_gradient_checkpointing()
        for m in bb.frozen_modules().values():
            if getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-5, weight_decay=1e-2)
    cond = random_cond(bb, pairs, device, dtype, cfg=False)
    w = torch.ones(pairs, device=device)
    lr_up = torch.rand((pairs, 3, size, size), generator=g).to(device)
    images = torch.rand((2, pairs, 3, size, size), generator=g).to(device)  # winner, loser
    ref_bb, extra = bb, []
    if variant == "ours":  # latents and control computed once (frozen_store)
        with torch.no_grad():
            targets = torch.stack([bb.encode_images(images[0], lr_up), bb.encode_images(images[1], lr_up)])
            control = bb.prepare_control(lr_up)
    else:  # a second full denoiser for the reference; VAE encoding inside every step
        name = bb.denoiser_name
        ref_bb = copy.copy(bb)
        setattr(ref_bb, name, copy.deepcopy(getattr(bb, name)))
        extra = [getattr(ref_bb, name)]

    def ref_predict(noisy, t, cond_, control_):
        return ref_bb.predict(noisy, t, cond_, control_, guidance=bb.train_guidance, controlnet=ref_net)

    def step():
        nonlocal targets, control
        if variant == "naive":
            with torch.no_grad():
                targets = torch.stack(
                    [bb.encode_images(images[0], lr_up), bb.encode_images(images[1], lr_up)]
                )
                control = bb.prepare_control(lr_up)
        ours = variant == "ours"
        return dpo_step(bb, net, ref_net, ref_predict, targets, control, cond, w, g, opt, autocast, ours)

    if variant == "naive":
        targets = control = None
    try:
        loss0 = step()  # warm-up (allocates the optimizer state)
        with Memory(
            device,
            *bb.frozen_modules().values(),
            net,
            ref_net,
            opt,
            *extra,
            cond,
            images,
            lr_up,
            *([targets, control] if variant == "ours" else []),
        ) as mem:
            times = [common.timed(step, device) for _ in range(steps)]
        res = {
            "variant": variant,
            "pairs": pairs,
            "px": size,
            "gradient_checkpointing": checkpointing,
            "step_s": round(common.median(times), 4),
            "step_times_s": [round(t, 4) for t in times],
            "memory_before_step_gib": gib(mem.before),
            "peak_memory_gib": gib(mem.peak),
            "first_loss": loss0,
        }
        log(
            f"   {bb.kind} {variant:5s}: {res['step_s']:.3f} s/step, peak {res['peak_memory_gib']:.2f} GiB "
            f"(weights+optimizer {res['memory_before_step_gib']:.2f} GiB), {pairs} pair(s) at {size}px"
        )
        return res
    finally:
        if checkpointing:
            net.disable_gradient_checkpointing()
            for m in bb.frozen_modules().values():
                if getattr(m, "_supports_gradient_checkpointing", False):
                    m.disable_gradient_checkpointing()
        bb.controlnet = cast(net.eval().requires_grad_(False), dtype=dtype)


def params(bb) -> dict:
    """Parameters in millions."""
    name = bb.denoiser_name
    parts = {name: getattr(bb, name), "controlnet": bb.controlnet, "vae": bb.vae}
    return {k: round(common.n_params(m) / 1e6, 1) for k, m in parts.items()}


def family(name: str, args, device, dtype, peak: float) -> None:
    size = 64 if args.tiny else 512
    res = RESULTS.setdefault(name, {})
    bb = None
    with guarded(f"{name}: build"):
        t = time.perf_counter()
        bb = (make_sd2 if name == "sd2" else make_flux)(device, dtype, args.tiny)
        sync(device)
        res["params_million"] = params(bb)
        res["build_s"] = round(time.perf_counter() - t, 1)
        if device.type == "cuda":
            res["weights_gib"] = gib(torch.cuda.memory_allocated(device))
        log(f"   built {name} in {res['build_s']} s: {res['params_million']} (million params)")
    if bb is None:
        return

    def within_budget(part: str) -> bool:
        over = time.perf_counter() - T0 > args.budget
        if over:
            log(f"   skipping {name} {part}: {time.perf_counter() - T0:.0f} s > --budget {args.budget:.0f} s")
            RESULTS.setdefault("skipped", []).append(f"{name}: {part}")
        return not over

    if within_budget("denoiser efficiency"):
        with guarded(f"{name}: denoiser efficiency"):
            res["efficiency"] = efficiency(
                bb, 16 if name == "sd2" else 4, size, device, dtype, peak, args.reps
            )
    if within_budget("sampling"):
        with guarded(f"{name}: sampling"):
            res["sampling"] = sampling(bb, (1, 8, 16), size, args.sample_steps, device, dtype, peak)
    pairs, ckpt = (2, False) if name == "sd2" else (1, True)
    res["training"] = {}
    for variant in ("ours", "fast", "naive"):  # FLUX's naive step last of all: it may not fit in memory
        if variant == "fast":  # the sampling fast paths between our step and the (least needed) naive one
            fast_sampling(bb, name, args, size, device, dtype, peak, res, within_budget)
        elif within_budget(f"training {variant}"):
            with guarded(f"{name}: training {variant}"):
                res["training"][variant] = training(
                    bb, variant, pairs, size, ckpt, device, dtype, args.train_steps
                )
    tr = res["training"]
    for e in RESULTS["errors"]:
        if e["part"] == f"{name}: training naive" and e["oom"]:
            tr["naive_out_of_memory"] = True  # the naive step does not fit on this GPU
    if "ours" in tr and "naive" in tr:
        tr["speedup"] = round(tr["naive"]["step_s"] / tr["ours"]["step_s"], 3)
        tr["memory_ratio"] = round(tr["ours"]["peak_memory_gib"] / tr["naive"]["peak_memory_gib"], 3)
    del bb
    free()


def table() -> None:
    print("\n" + "=" * 100)
    m = RESULTS["machine"]
    print(
        f"{m.get('gpu', m['cpu_model'])}, torch {m['torch']}, diffusers {m.get('diffusers')}; bf16 matmul peak "
        f"{RESULTS.get('matmul_peak_tflops', float('nan')):.4g} TFLOP/s"
    )
    for name in ("sd2", "flux"):
        r = RESULTS.get(name, {})
        if not r:
            continue
        print(f"\n{name.upper()} {r.get('params_million')} M params")
        e = r.get("efficiency")
        if e:
            print(
                f"  denoiser forward (batch {e['batch']}, {e['px']}px): {e['tflop_per_forward']} TFLOP, "
                f"{e['forward_s'] * 1e3:.1f} ms, {e['achieved_tflops']} TFLOP/s = "
                f"{e['fraction_of_matmul_peak']:.0%} of matmul peak"
            )
        if r.get("sampling"):
            print(f"  {'M':>3} {'ms/step':>9} {'decode ms/img':>14} {'s/img':>8} {'img/s':>7} {'vs M=1':>7}")
            for s in r["sampling"]:
                print(
                    f"  {s['M']:>3} {s['step_s'] * 1e3:9.1f} {s['decode_s_per_image'] * 1e3:14.1f} "
                    f"{s['s_per_image']:8.3f} {s['images_per_s']:7.2f} {s['speedup_vs_M1']:6.2f}x   "
                    f"({s['default_steps']} steps) {s['achieved_tflops']:.4g} TFLOP/s = "
                    f"{s['fraction_of_matmul_peak']:.0%} of matmul peak"
                )
        for path, f in r.get("sampling_fast", {}).items():
            for s in f["rows"]:
                print(
                    f"  {path:>13} M={s['M']:<3} {s['step_s'] * 1e3:9.1f} ms/step {s['images_per_s']:7.2f} img/s "
                    f"{s['speedup_vs_plain']:6.3f}x plain, {s['achieved_tflops']:.4g} TFLOP/s = "
                    f"{s['fraction_of_matmul_peak']:.0%} of matmul peak"
                )
        for v, t in r.get("training", {}).items():
            if isinstance(t, dict):
                print(
                    f"  DPO step {v:5s}: {t['step_s']:.3f} s, peak {t['peak_memory_gib']:.2f} GiB, "
                    f"{t['pairs']} pair(s) at {t['px']}px"
                    + (", grad. checkpointing" if t["gradient_checkpointing"] else "")
                )
        tr = r.get("training", {})
        if tr.get("naive_out_of_memory"):
            print("  DPO step naive: OUT OF MEMORY on this GPU (two full denoiser copies do not fit)")
        if "speedup" in tr:
            print(f"  ours vs naive: {tr['speedup']:.2f}x faster, {tr['memory_ratio']:.2f}x the memory")
    for e in RESULTS["errors"]:
        print(f"  ERROR in {e['part']}: {e['error'][:200]}")
    print(f"total {time.perf_counter() - T0:.0f} s")


def main() -> int:
    global JSON_PATH
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs at 64 px on CPU: a test of this script"
    )
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="default: bf16 on a GPU, fp32 on CPU (CPU bf16 convolutions are very slow)",
    )
    parser.add_argument("--only", nargs="+", choices=["sd2", "flux"], default=["sd2", "flux"])
    parser.add_argument(
        "--sample-steps", type=int, default=4, help="denoising steps timed per M (first = warm-up)"
    )
    parser.add_argument(
        "--fast-paths",
        nargs="*",
        choices=list(FAST_PATHS),
        default=None,
        help="sampling fast paths measured beside the plain path (default: all; with --tiny: channels_last "
        "fuse_qkv, as inductor takes ~1 min per shape on a small CPU)",
    )
    parser.add_argument(
        "--compile-ms",
        nargs="+",
        type=int,
        default=[16],
        help="the M (of 1 8 16) at which the compile and all paths are measured: one compilation per shape "
        "(default: 16)",
    )
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after 1 warm-up)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the denoiser forward")
    parser.add_argument(
        "--budget", type=float, default=200, help="start no new part after this many seconds (default 200)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="default: $OUT/gpu_bench.json when $OUT is set"
    )
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.fast_paths is None:
        args.fast_paths = ["channels_last", "fuse_qkv"] if args.tiny else list(FAST_PATHS)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --tiny to test on CPU")
    JSON_PATH = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    ]
    if device.type == "cpu":
        torch.set_num_threads(1)  # a test run on a shared CPU: several threads stall each other
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    except ImportError:
        pass
    RESULTS.update(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=common.machine_info(),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        tiny=args.tiny,
        dtype=str(dtype),
        device=str(device),
    )
    log(f"{RESULTS['machine'].get('gpu', RESULTS['machine']['cpu_model'])}, torch {torch.__version__}")
    peak = float("nan")
    with guarded("matmul peak"):
        peak = matmul_peak(device, args.tiny)
        RESULTS["matmul_peak_tflops"] = round(peak, 3)
        log(f"   bf16 matmul peak: {peak:.4g} TFLOP/s")
    for name in args.only:
        family(name, args, device, dtype, peak)
    save()
    table()
    if JSON_PATH is not None:
        print(f"wrote {JSON_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
