"""DP²O-SR benchmarks on CPU: each of our paths against the naive way, side by side in one run.

    .venv/bin/python benchmarks/run.py                    # full run (~2.5 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick            # fewer repetitions and cases (~1 min)
    .venv/bin/python benchmarks/run.py --json bench.json  # also write the results as JSON
    .venv/bin/python benchmarks/run.py --only sampling training

Sections (docs/PERFORMANCE.md has the results and what they mean):

- sampling: candidates/s of ``dp2osr.engine.sampler.generate`` with all M seeds in one batched call, against one call
  per seed (and, at M = 16, a stock diffusers ``StableDiffusionControlNetPipeline`` call per seed, how the
  published scripts sampled), on the tiny SD2 model; scaling with M and with image size (sides above the
  process size are tiled by ``dp2osr.engine.sampler.super_resolve``, as ``dp2osr sample`` does).
- scoring: scores/s of batched against per-image metric calls, per offline metric (``bench_score.py``), at
  ``dp2osr score``'s default batch of 8.
- training: DPO step time and peak tensor memory of the ``dp2osr.train`` step (one frozen UNet/transformer
  shared by policy and reference, a frozen copy of only the ControlNet, latents / control / prompt embeddings
  cached) against a naive step (a deep-copied reference UNet/transformer *and* ControlNet; images read,
  VAE-encoded and prompts text-encoded every step). Models: the real SD2-base and FLUX.1-dev architectures
  at 1/16 and 1/32 width (same depth and blocks, ``benchmarks/common.py``), 128 px, where parameters and
  activations shrink alike, so memory proportions stay close to the real ones at 512 px. Memory is the peak
  of live tensor bytes (``common.TensorMemory``, the CPU analogue of ``torch.cuda.max_memory_allocated``).
  The full run also times the real ``dp2osr.train.run()`` loop on the same model as a check.
- degradation: images/s of ``dp2osr.degrade.degrade_image`` at 256² and 512².

Repetitions of ours and the naive way alternate (ABAB..., order flipped every round) so machine noise hits
both alike; medians are reported. Ratios: for rates and times the speed-up of ours (> 1: ours is faster);
for memory ours / naive (< 1: ours uses less). One torch thread by default (--threads): on a shared 2-core
machine two threads stalled each other (steps up to 20x slower, erratically).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common
import torch
from common import median

SECTIONS = ("sampling", "scoring", "training", "degradation")


def row(
    section: str, case: str, ours: float, naive: float | None, unit: str, *, naive_name: str = "", **extra
) -> dict:
    """One result. ``ratio``: for rates (x/s) and times (s/step) the speed-up of ours over the naive way
    (> 1: ours is faster); for memory (MiB) ours / naive (< 1: ours uses less)."""
    ratio = None
    if naive is not None and naive > 0 and ours > 0:
        ratio = naive / ours if unit.startswith("s/") else ours / naive
    kind = "memory ours/naive" if unit == "MiB" else "speed-up"
    return dict(
        section=section,
        case=case,
        ours=ours,
        naive=naive,
        unit=unit,
        ratio=ratio,
        ratio_kind=kind,
        naive_name=naive_name,
        **extra,
    )


def alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Time each callable ``rounds`` times, interleaved (order reversed every other round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(common.timed(fns[n]))
    return times


# ---- sampling ----------------------------------------------------------------------------------------------
def bench_sampling(args) -> list[dict]:
    from diffusers import StableDiffusionControlNetPipeline

    from dp2osr.backbones.tiny import build_sd2_tiny
    from dp2osr.engine.sampler import generate, super_resolve
    from dp2osr.math.geometry import tile_starts

    bb = build_sd2_tiny()
    steps, guidance, size = args.steps, bb.default_guidance, bb.default_process_size
    g = torch.Generator().manual_seed(0)
    control = torch.rand(1, 3, size, size, generator=g)
    cond = bb.encode_prompts([""], bb.default_negative_prompt)
    kw = {"steps": steps, "guidance": guidance}
    # M -> interleaved rounds; image side -> rounds (sides above the process size are tiled)
    ms = {1: 2, 4: 2, 16: 2} if args.quick else {1: 3, 4: 3, 16: 3, 64: 1}
    sides = {128: 1} if args.quick else {128: 2, 256: 1}
    print(
        f"  tiny SD2 ({common.n_params(bb.unet) / 1e6:.2f} M UNet), {size} px process size, {steps} steps, "
        f"CFG {guidance} with the negative prompt; rounds per M {ms}",
        flush=True,
    )
    pipe = StableDiffusionControlNetPipeline(
        vae=bb.vae,
        text_encoder=bb.text_encoder,
        tokenizer=bb.tokenizer,
        unet=bb.unet,
        controlnet=bb.controlnet,
        scheduler=copy.deepcopy(bb.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def pipeline_loop(seeds):
        """How the published scripts sample: one pipeline call (prompt encoding included) per seed."""
        for s in seeds:
            pipe(
                "",
                image=control,
                negative_prompt=bb.default_negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=size,
                width=size,
                generator=torch.Generator().manual_seed(s),
                output_type="pt",
            )

    generate(bb, control, cond, [0], **kw)  # warm-up
    pipeline_loop([0])
    out = []
    for m, rounds in ms.items():
        seeds = list(range(m))
        fns = {
            "ours": lambda seeds=seeds: generate(bb, control, cond, seeds, **kw),
            "loop": lambda seeds=seeds: [generate(bb, control, cond, [s], **kw) for s in seeds],
        }
        if m == 16:
            fns["pipeline"] = lambda seeds=seeds: pipeline_loop(seeds)
        rate = {k: m / median(v) for k, v in alternate(fns, rounds).items()}
        out.append(
            row(
                "sampling",
                f"M={m}, {size}px",
                rate["ours"],
                rate["loop"],
                "cand/s",
                naive_name="generate() per seed",
            )
        )
        print_row(out[-1])
        if "pipeline" in rate:
            out.append(
                row(
                    "sampling",
                    f"M={m}, {size}px",
                    rate["ours"],
                    rate["pipeline"],
                    "cand/s",
                    naive_name="diffusers pipeline per seed",
                )
            )
            print_row(out[-1])
    m, seeds = 4, list(range(4))
    for side, rounds in sides.items():
        lr_up = torch.rand(1, 3, side, side, generator=g)
        kw_sr = {**kw, "process_size": size, "tile_threshold": size}  # tiled above the process size
        fns = {
            "ours": lambda lr_up=lr_up, kw_sr=kw_sr: super_resolve(bb, lr_up, cond, seeds, **kw_sr),
            "loop": lambda lr_up=lr_up, kw_sr=kw_sr: [
                super_resolve(bb, lr_up, cond, [s], **kw_sr) for s in seeds
            ],
        }
        rate = {k: m / median(v) for k, v in alternate(fns, rounds).items()}
        tile = size // bb.latent_factor
        n_tiles = len(tile_starts(side // bb.latent_factor, tile, tile - round(tile * 0.25))) ** 2
        out.append(
            row(
                "sampling",
                f"M={m}, {side}px ({n_tiles} tiles)",
                rate["ours"],
                rate["loop"],
                "cand/s",
                naive_name="super_resolve() per seed",
            )
        )
        print_row(out[-1])
    # One seed of a large image: its latent tiles denoised tile_batch at a time (ours: the default 4) or one
    # per call -- on the tiny SD2 and on the embedded model (the default of `dp2osr upscale`).
    from dp2osr.backbones import load_backbone

    emb = load_backbone("embedded")
    for name, model, side, steps_t in (("tiny SD2", bb, 256, steps), ("embedded", emb, 512, 4)):
        lr_up = torch.rand(1, 3, side, side, generator=g)
        c = model.encode_prompts([""], model.default_negative_prompt if model.uses_negative_prompt else None)
        kw_t = {
            "steps": steps_t,
            "guidance": model.default_guidance,
            "process_size": model.default_process_size,
            "tile_threshold": model.default_process_size,  # tiled above the process size
        }
        fns = {
            "ours": lambda m=model, x=lr_up, c=c, k=kw_t: super_resolve(m, x, c, [0], **k, tile_batch=4),
            "one": lambda m=model, x=lr_up, c=c, k=kw_t: super_resolve(m, x, c, [0], **k, tile_batch=1),
        }
        rate = {k: 1 / median(v) for k, v in alternate(fns, 1 if args.quick else 2).items()}
        tile = model.default_process_size // model.latent_factor
        n_tiles = len(tile_starts(side // model.latent_factor, tile, tile - round(tile * 0.25))) ** 2
        out.append(
            row(
                "sampling",
                f"{name} M=1, {side}px ({n_tiles} tiles)",
                rate["ours"],
                rate["one"],
                "cand/s",
                naive_name="one tile per call (ours: --tile-batch 4)",
            )
        )
        print_row(out[-1])
    return out


# ---- scoring -----------------------------------------------------------------------------------------------
def bench_scoring(args) -> list[dict]:
    import bench_score

    from dp2osr import metrics

    size, n, batch = 256, (8 if args.quick else 16), 8  # batch: `dp2osr score --batch-size` default
    cands, hr, source = bench_score.make_inputs(n, size)
    rounds = 2 if args.quick else 3
    print(f"  {n} candidates of {size}x{size} ({source}), batch {batch}, {rounds} rounds", flush=True)
    out = []
    for name in metrics.PRESETS["offline"]:
        r = bench_score.bench(name, cands, hr, batch, rounds, torch.device("cpu"))
        out.append(
            row(
                "scoring",
                f"{name} (batch {r['batch']})",
                r["batched"],
                r["per_image"],
                "scores/s",
                naive_name="one call per image",
                max_abs_diff=r["max_diff"],
            )
        )
        print_row(out[-1])
    return out


# ---- training ----------------------------------------------------------------------------------------------
# (family, width divisor, image px, pairs per step, gradient checkpointing): at these widths and sizes the
# parameters and the activations are both ~1/256 (SD2) or ~1/1024 and ~1/512 (FLUX) of the real models'
# at 512 px, so the memory proportions are close to the real ones.
TRAIN_CASES = {"sd2": ("sd2", 16, 128, 2, False), "flux": ("flux", 32, 128, 1, True)}


def make_training_data(root: Path, family: str, div: int, n_pairs: int, size: int) -> tuple[Path, Path]:
    """A saved model folder (the real architecture at 1/div width) and a pref_pairs.parquet of ``n_pairs``."""
    import pandas as pd

    from dp2osr.images import save_image, write_parquet

    torch.manual_seed(0)
    bb = common.build_sd2(div) if family == "sd2" else common.build_flux(div, text_encoders=True)
    base = root / f"model-{family}"
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        bb.save_pretrained(base)
    data = root / f"data-{family}"
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_pairs):
        lr = torch.rand(1, 3, size // 4, size // 4, generator=g)
        save_image(lr, data / f"lr/{i}.png")
        up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
        for tag in ("win", "lose"):
            save_image((up + 0.05 * torch.randn(up.shape, generator=g)).clamp(0, 1), data / f"{tag}/{i}.png")
        rows.append(
            {
                "image_id": str(i),
                "win_seed": 0,
                "lose_seed": 1,
                "win_path": f"win/{i}.png",
                "lose_path": f"lose/{i}.png",
                "lr_path": f"lr/{i}.png",
                "prompt": "a photo of a cat",
                "win_reward": 1.0,
                "lose_reward": 0.0,
                "w_intra": 1.0,
                "w_inter": 1.0,
                "weight": 1.0,
            }
        )
    write_parquet(pd.DataFrame(rows), data / "pref_pairs.parquet")
    return base, data


def denoiser_name(bb) -> str:
    return bb.denoiser_name


class OursTrainer:
    """The DPO step of ``dp2osr train``: the product's ``noise_batch`` and ``dpo_objective`` plus the optimizer
    update. One frozen UNet/transformer shared by policy and reference (SD2: its down and mid blocks run once
    for both, ``Backbone.trunk``), a frozen copy of only the ControlNet, and latents, control and prompt
    embeddings stored once by ``frozen_store`` (in a temporary folder, read per batch); the reference pass runs
    before the policy's, so its activations are gone before the policy's graph is built."""

    def __init__(self, family: str, base: Path, data: Path, batch: int, checkpointing: bool) -> None:
        from dp2osr.backbones import load_backbone
        from dp2osr.engine import frozen_store
        from dp2osr.engine.train_data import FrozenEncoder, read_examples
        from dp2osr.runtime import process_state

        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            self.bb = bb = load_backbone(family, base, dtype="fp32").to("cpu", torch.float32)
        self.net = bb.controlnet.train()
        if checkpointing:  # as dp2osr.train --gradient-checkpointing does
            self.net.enable_gradient_checkpointing()
            for m in bb.frozen_modules().values():
                if getattr(m, "_supports_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
        self.ref = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=2e-5, weight_decay=1e-2)
        self.ex = read_examples(data, "dpo", "both")
        self._store = tempfile.TemporaryDirectory()
        folder, enc = Path(self._store.name), FrozenEncoder(bb, 4)
        frozen_store.build(folder, enc, lambda: self.ex, process_state("cpu")[0], "benchmark")
        self.cache = frozen_store.FrozenStore(folder, enc)
        self.batch, self.s = batch, 0

    def tensors(self) -> list:
        return [*self.bb.frozen_modules().values(), self.net, self.ref, self.opt]

    def inputs(self, idx: list[int]):
        return self.cache.batch(idx, None)

    def objective(self, nb, w: torch.Tensor) -> torch.Tensor:
        from dp2osr.engine.objectives import dpo_objective

        reference = functools.partial(contextlib.nullcontext, self.ref)
        return dpo_objective(self.bb, self.net, reference, nb, w, beta=5000.0)[0]

    def step(self) -> float:
        from dp2osr.engine.objectives import noise_batch
        from dp2osr.engine.train_data import batch_indices

        idx = batch_indices(len(self.ex), self.s, 0, 0, self.batch, 1, 1, 0)
        g = torch.Generator().manual_seed(self.s * 10_007)
        self.s += 1
        targets, control, cond, w = self.inputs(idx)
        loss = self.objective(noise_batch(self.bb, targets, control, cond, g), w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        return loss.item()


class UnsharedTrainer(OursTrainer):
    """Our step with the whole UNet run in each pass (no shared trunk), reference after policy
    (``common.naive_dpo_objective``): what the trunk sharing and the pass order add on top of caching."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.ref_bb = self.bb  # the backbone whose denoiser the reference pass runs

    def objective(self, nb, w: torch.Tensor) -> torch.Tensor:
        def ref_predict(noisy, t, cond, control):
            return self.ref_bb.predict(
                noisy, t, cond, control, guidance=self.bb.train_guidance, controlnet=self.ref
            )

        return common.naive_dpo_objective(self.bb, self.net, ref_predict, nb, w, beta=5000.0)


class NaiveTrainer(UnsharedTrainer):
    """The same step done naively: the reference is a deep copy of the UNet/transformer *and* the ControlNet
    (two full model copies), and every step the images are read from disk and VAE-encoded (FLUX: the control
    image too) and the prompts text-encoded -- nothing cached. The reference pass follows the policy's, as in
    the Diffusion-DPO authors' training script."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.cache = None
        self.ref_bb = copy.copy(self.bb)  # shares VAE and text encoders, but has its own denoiser copy
        name = denoiser_name(self.bb)
        setattr(self.ref_bb, name, copy.deepcopy(getattr(self.bb, name)))

    def tensors(self) -> list:
        return [
            *self.bb.frozen_modules().values(),
            getattr(self.ref_bb, denoiser_name(self.bb)),
            self.net,
            self.ref,
            self.opt,
        ]

    def inputs(self, idx: list[int]):
        from dp2osr.images import load_image
        from dp2osr.math.geometry import resize

        bb, ex = self.bb, self.ex
        with torch.no_grad():
            lr = [load_image(Path(ex.lr[i])) for i in idx]
            lr_up = torch.cat([resize(x, (x.shape[-2] * 4, x.shape[-1] * 4)) for x in lr])
            targets = torch.stack(
                [
                    bb.encode_images(torch.cat([load_image(Path(ex.images[i][j])) for i in idx]), lr_up)
                    for j in (0, 1)
                ]
            )
            control = bb.prepare_control(lr_up)
            cond = bb.encode_prompts([ex.prompts[i] for i in idx])
        return targets, control, cond, ex.weights[idx]


def peak_tensor_memory(trainer) -> tuple[float, float]:
    """(MiB of live tensors before a step, peak MiB during it): weights, optimizer state, caches, activations."""
    gc.collect()
    tm = common.TensorMemory()
    tm.track(*trainer.tensors())
    before = tm.current
    with tm:
        trainer.step()
    return before / 2**20, tm.peak / 2**20


def train_cli_step_times(family, base, data, out, batch, checkpointing, warmup, steps) -> list[float]:
    """Per-step seconds of the real ``dp2osr.train.run()`` loop on the same model and data (a check that
    ``OursTrainer`` times what the command does)."""
    from dp2osr.train import TrainConfig
    from dp2osr.train import run as train

    cfg = TrainConfig(
        mode="dpo",
        data=data,
        output=out,
        backbone=family,
        base=base,
        device="cpu",
        steps=warmup + steps,
        batch_size=batch,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        hpo="both",
        seed=0,
        gradient_checkpointing=checkpointing,
    )
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
        train(cfg)
    secs = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0, *secs[:-1]], secs)][warmup:]


def bench_training(args) -> list[dict]:
    warmup, steps = 1, (3 if args.quick else 5)
    out = []
    with tempfile.TemporaryDirectory(prefix="dp2osr-bench-") as tmp:
        root = Path(tmp)
        for family, div, size, batch, ckpt in TRAIN_CASES.values():
            base, data = make_training_data(root, family, div, batch, size)
            torch.manual_seed(0)
            kinds = [("ours", OursTrainer), ("naive", NaiveTrainer)]
            if family == "sd2":  # FLUX has no trunk to share
                kinds.append(("unshared", UnsharedTrainer))
            trainers = {k: cls(family, base, data, batch, ckpt) for k, cls in kinds}
            bb = trainers["ours"].bb
            parts = {
                k: round(common.n_params(m) / 1e6, 3)
                for k, m in [
                    (denoiser_name(bb), getattr(bb, denoiser_name(bb))),
                    ("controlnet", bb.controlnet),
                    *bb.frozen_modules().items(),
                ]
                if k not in ("unet", "transformer") or k == denoiser_name(bb)
            }
            print(
                f"  {family.upper()} architecture at 1/{div} width ("
                + ", ".join(f"{k} {v:.2f} M" for k, v in parts.items())
                + f" params), {size} px, {batch} pair(s)/step, fp32"
                + (", gradient checkpointing" if ckpt else "")
                + f"; {warmup} warm-up + {steps} interleaved timed steps each",
                flush=True,
            )
            for tr in trainers.values():
                for _ in range(warmup):  # ours: fills the cache; both: first-call allocations
                    tr.step()
            times = alternate({k: tr.step for k, tr in trainers.items()}, steps)
            step = {k: median(v) for k, v in times.items()}
            mem = {k: peak_tensor_memory(tr) for k, tr in trainers.items()}
            name = "2 full copies + encode every step"
            extra = {
                "model": f"{family}-w{div}",
                "image_px": size,
                "batch_pairs": batch,
                "gradient_checkpointing": ckpt,
                "params_m": parts,
                "step_s": times,
            }
            out += [
                row(
                    "training",
                    f"{family} DPO step time",
                    step["ours"],
                    step["naive"],
                    "s/step",
                    naive_name=name,
                    **extra,
                ),
                row(
                    "training",
                    f"{family} peak tensor memory",
                    mem["ours"][1],
                    mem["naive"][1],
                    "MiB",
                    naive_name=name,
                ),
                row(
                    "training",
                    f"{family}  weights+optimizer+cache",
                    mem["ours"][0],
                    mem["naive"][0],
                    "MiB",
                    naive_name=name,
                ),
            ]
            if "unshared" in trainers:
                out.append(
                    row(
                        "training",
                        f"{family} DPO step: UNet trunk shared",
                        step["ours"],
                        step["unshared"],
                        "s/step",
                        naive_name="our step, whole UNet in each pass",
                    )
                )
            for r in out[-(4 if "unshared" in trainers else 3) :]:
                print_row(r)
            del trainers, bb
            gc.collect()
            if not args.quick and family == "sd2":
                cli = train_cli_step_times(
                    family, base, data, root / f"train-{family}", batch, ckpt, warmup + 1, steps
                )
                out.append(
                    row(
                        "training",
                        f"{family} `dp2osr train` loop*",
                        median(cli),
                        step["naive"],
                        "s/step",
                        naive_name=name + " (*not interleaved)",
                        step_s=cli,
                    )
                )
                print_row(out[-1])
    return out


# ---- degradation -------------------------------------------------------------------------------------------
def bench_degradation(args) -> list[dict]:
    import bench_score

    from dp2osr.degrade import degrade_image

    _, hr, source = bench_score.make_inputs(1, 512)
    n = 4 if args.quick else 8
    out = []
    for side in (256, 512):
        img = hr[..., :side, :side].contiguous()
        degrade_image(img, generator=torch.Generator().manual_seed(0))  # warm-up
        times = [
            common.timed(lambda s=s, img=img: degrade_image(img, generator=torch.Generator().manual_seed(s)))
            for s in range(n)
        ]
        out.append(
            row(
                "degradation",
                f"{side}x{side} -> x4 LR ({source})",
                1 / median(times),
                None,
                "img/s",
                naive_name="",
            )
        )
        print_row(out[-1])
    return out


# ---- output ------------------------------------------------------------------------------------------------
HEADER = f"{'section':12} {'case':34} {'ours':>10} {'naive':>10} {'unit':>9} {'ours vs naive':>14}  naive = "


def print_row(r: dict) -> None:
    naive = "" if r["naive"] is None else f"{r['naive']:10.4g}"
    ratio = ""
    if r["ratio"] is not None:
        ratio = f"{r['ratio']:.2f}x mem" if r["unit"] == "MiB" else f"{r['ratio']:.2f}x faster"
    print(
        f"{r['section']:12} {r['case']:34} {r['ours']:10.4g} {naive:>10} {r['unit']:>9} {ratio:>14}  "
        f"{r['naive_name']}",
        flush=True,
    )


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets against the rows measured in this run."""
    out = []
    for r in rows:
        if r["section"] == "sampling" and r["case"].startswith("M=16,"):
            out.append(
                {
                    "target": f"batched sampling >= 1.5x {r['naive_name']} at M = 16",
                    "measured": f"{r['ratio']:.2f}x",
                    "met": r["ratio"] >= 1.5,
                }
            )
        elif r["section"] == "training" and r["case"].endswith("DPO step time"):
            out.append(
                {
                    "target": f"{r['case']} >= 1.5x faster than naive",
                    "measured": f"{r['ratio']:.2f}x",
                    "met": r["ratio"] >= 1.5,
                }
            )
        elif r["section"] == "training" and r["case"].endswith("peak tensor memory"):
            out.append(
                {
                    "target": f"{r['case']} <= 0.7x naive",
                    "measured": f"{r['ratio']:.2f}x",
                    "met": r["ratio"] <= 0.7,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and cases")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument(
        "--steps", type=int, default=8, help="denoising steps per sample in the sampling section"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine several threads stall each other, and "
        "ours/naive ratios are the point; 0: torch's default)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.machine_info()
    start = time.perf_counter()
    print(
        f"dp2osr benchmarks ({'quick' if args.quick else 'full'}) -- {datetime.datetime.now():%Y-%m-%d %H:%M}, "
        f"{info['cpu_model']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads, "
        f"torch {info['torch']}, diffusers {info.get('diffusers')}"
    )
    print("ratios: ours vs the naive way, medians of interleaved repetitions\n")
    print(HEADER)
    rows, seconds = [], {}
    fns = {
        "sampling": bench_sampling,
        "scoring": bench_scoring,
        "training": bench_training,
        "degradation": bench_degradation,
    }
    for name in SECTIONS:
        if name in args.only:
            print(f"[{name}]", flush=True)
            t = time.perf_counter()
            rows += fns[name](args)
            seconds[name] = round(time.perf_counter() - t, 1)
    total = time.perf_counter() - start
    checks = targets(rows)
    print("\ntargets (training step against a naive one):")
    for c in checks:
        print(f"  {'met    ' if c['met'] else 'NOT met'}  {c['target']}: {c['measured']}")
    print(f"\ntotal {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    if args.json:
        doc = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": info,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "quick": args.quick,
            "sampling_steps": args.steps,
            "seconds": seconds,
            "total_seconds": round(total, 1),
            "targets": checks,
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
