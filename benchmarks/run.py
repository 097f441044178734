"""DP²O-SR benchmarks on CPU: each of our paths against the naive way, side by side in one run.

    .venv/bin/python benchmarks/run.py                    # full run (~5 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick            # fewer repetitions and cases (~2-3 min)
    .venv/bin/python benchmarks/run.py --json bench.json  # also write the results as JSON
    .venv/bin/python benchmarks/run.py --only sampling training

Sections (see docs/PERFORMANCE.md for what each measures and why):

- sampling: candidates/s of ``dp2osr.sampling.generate`` with all M seeds in one batched call, against one call
  per seed (and, at M = 16, a stock diffusers ``StableDiffusionControlNetPipeline`` call per seed, how the
  published scripts sampled), on the tiny SD2 model; scaling with M and with image size (sizes above the
  process size are tiled by ``dp2osr.sampling.super_resolve``).
- scoring: scores/s of batched against per-image metric calls, per offline metric (``bench_score.py``).
- training: DPO step time and peak memory of ``dp2osr.train`` (shared frozen UNet, frozen copy of only the
  ControlNet, cached latents and prompt embeddings) against a naive step (policy UNet+ControlNet plus a
  deep-copied reference UNet+ControlNet, VAE and text encoder run every step), each variant in its own
  subprocess so its peak resident memory is its own. Model: the SD2-base architecture at 1/16 width, 128 px,
  whose parameters *and* activations are both 1/256 of real SD2 at 512 px, so memory proportions are real.
- degradation: images/s of ``dp2osr.degrade.degrade_image``.

Repetitions of ours and the naive way alternate (ABAB..., order flipped every round) so machine noise hits
both alike; medians are reported. Ratios are naive time / our time (> 1: ours is faster) and our memory /
naive memory (< 1: ours uses less).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common
import torch
from common import median, peak_rss_mb, reset_peak_rss, rss_mb

SECTIONS = ("sampling", "scoring", "training", "degradation")
TRAIN_WIDTH_DIV = 16
TRAIN_SIZE = 128


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
    from dp2osr.sampling import generate, super_resolve

    bb = build_sd2_tiny()
    steps, guidance = args.steps, bb.default_guidance
    size = bb.default_process_size
    g = torch.Generator().manual_seed(0)
    control = torch.rand(1, 3, size, size, generator=g)
    cond = bb.encode_prompts([""], bb.default_negative_prompt)
    kw = {"steps": steps, "guidance": guidance}
    rounds = 2 if args.quick else 3
    out = []
    print(
        f"  tiny SD2 ({common.n_params(bb.unet) / 1e6:.2f} M UNet), {steps} steps, CFG {guidance} with the "
        f"negative prompt, {rounds} rounds",
        flush=True,
    )

    def ours(seeds, **k):
        return lambda: generate(bb, control, cond, seeds, **kw, **k)

    def loop(seeds, **k):
        return lambda: [generate(bb, control, cond, [s], **kw, **k) for s in seeds]

    ours([0])()  # warm-up
    ms = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    for m in ms:
        seeds = list(range(m))
        fns = {"ours": ours(seeds), "loop": loop(seeds)}
        if m == 16:
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

            def pipeline_loop(seeds=seeds, pipe=pipe):
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

            pipeline_loop(seeds[:1])  # warm-up
            fns["pipeline"] = pipeline_loop
        t = alternate(fns, rounds)
        rate = {k: m / median(v) for k, v in t.items()}
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
        print_row(out[-1] if "pipeline" not in rate else out[-2])
        if "pipeline" in rate:
            print_row(out[-1])

    # Image size: above the process size the sampler tiles the latents (super_resolve, as `sample` does).
    m = 4
    seeds = list(range(m))
    sizes = (128, 256) if args.quick else (128, 256, 384)
    for side in sizes:
        lr_up = torch.rand(1, 3, side, side, generator=g)
        kw_sr = {"steps": steps, "guidance": guidance, "process_size": size}
        fns = {
            "ours": lambda lr_up=lr_up, kw_sr=kw_sr: super_resolve(bb, lr_up, cond, seeds, **kw_sr),
            "loop": lambda lr_up=lr_up, kw_sr=kw_sr: [
                super_resolve(bb, lr_up, cond, [s], **kw_sr) for s in seeds
            ],
        }
        t = alternate(fns, 1 if side >= 256 else rounds)
        rate = {k: m / median(v) for k, v in t.items()}
        lat = side // bb.latent_factor
        tile = size // bb.latent_factor
        from dp2osr.sampling import tile_starts

        n_tiles = len(tile_starts(lat, tile, tile - tile // 4, 1)) ** 2
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
    return out


# ---- scoring -----------------------------------------------------------------------------------------------
def bench_scoring(args) -> list[dict]:
    import bench_score

    from dp2osr import metrics

    size, n = 256, 8 if args.quick else 16
    cands, hr, source = bench_score.make_inputs(n, size)
    rounds = 2 if args.quick else 3
    print(f"  {n} candidates of {size}x{size} ({source}), batch {n}, {rounds} rounds", flush=True)
    out = []
    for name in metrics.PRESETS["offline"]:
        r = bench_score.bench(name, cands, hr, n, rounds, torch.device("cpu"))
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
def make_training_data(root: Path, n_pairs: int, size: int) -> tuple[Path, Path]:
    """A saved SD2-base-at-1/16-width model folder and a pref_pairs.parquet with ``n_pairs`` pairs."""
    import pandas as pd

    from dp2osr.images import save_image, write_parquet

    torch.manual_seed(0)
    bb = common.build_sd2(TRAIN_WIDTH_DIV)
    base = root / "model"
    bb.save_pretrained(base)
    data = root / "data"
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_pairs):
        lr = torch.rand(1, 3, size // 4, size // 4, generator=g)
        save_image(lr, data / f"lr/{i}.png")
        for tag in ("win", "lose"):
            up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
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


def _import_training_modules() -> None:
    """Everything either variant imports, loaded before the baseline is read so that it is not counted."""
    import accelerate  # noqa: F401
    import diffusers.optimization  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    import dp2osr.train  # noqa: F401


def train_worker(
    variant: str, base: Path, data: Path, out: Path, warmup: int, steps: int, batch: int
) -> dict:
    """One variant's steps in this (fresh) process; returns step times and memory (MiB above the baseline)."""
    _import_training_modules()
    torch.manual_seed(0)
    baseline = rss_mb()
    marks: dict[str, float] = {}
    if variant == "ours":
        import dp2osr.train as T

        class MarkedCache(T.FrozenCache):
            """Constructed by train() right after the models and optimizer exist: reset the peak there."""

            def __init__(self, *a, **k):
                marks["loaded"] = rss_mb()
                marks["reset"] = reset_peak_rss()
                super().__init__(*a, **k)

        save = T.save_checkpoint

        def marked_save(*a, **k):  # first called after the last step
            marks.setdefault("peak", peak_rss_mb())
            return save(*a, **k)

        T.FrozenCache, T.save_checkpoint = MarkedCache, marked_save
        cfg = T.TrainConfig(
            mode="dpo",
            data=data,
            output=out,
            backbone="sd2",
            base=base,
            device="cpu",
            steps=warmup + steps,
            batch_size=batch,
            checkpoint_every=10**9,
            keep_checkpoints=1,
            hpo="both",
            seed=0,
        )
        rc = T.train(cfg)
        if rc != 0:
            raise RuntimeError(f"dp2osr train returned {rc}")
        secs = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        times = [b - a for a, b in zip([0.0] + secs[:-1], secs)]
    else:
        times = naive_steps(base, data, warmup + steps, batch, marks)
    return {
        "variant": variant,
        "step_s": times[warmup:],
        "warmup_s": times[:warmup],
        "loaded_mb": marks["loaded"] - baseline,
        "peak_mb": marks["peak"] - baseline,
        "peak_reset": marks["reset"],
    }


def naive_steps(base: Path, data: Path, n_steps: int, batch: int, marks: dict) -> list[float]:
    """The naive DPO step: two full UNet+ControlNet copies; images read, VAE-encoded and the prompts
    text-encoded every step. Same loss, optimizer, clipping, noise and timestep sampling as dp2osr.train."""
    from dp2osr.backbones import load_backbone
    from dp2osr.images import load_image
    from dp2osr.loss import dpo_loss, mse_per_sample
    from dp2osr.sampling import resize
    from dp2osr.train_data import batch_indices, read_examples

    bb = load_backbone("sd2", base, dtype="fp32")
    unet, net = bb.unet, bb.controlnet
    ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    ref_net = copy.deepcopy(net).requires_grad_(False).eval()
    net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-5, weight_decay=1e-2)
    ex = read_examples(data, "dpo", "both")
    marks["loaded"] = rss_mb()
    marks["reset"] = reset_peak_rss()

    def forward(u, c, latents, t, emb, control):
        down, mid = c(latents, t, encoder_hidden_states=emb, controlnet_cond=control, return_dict=False)
        return u(
            latents,
            t,
            encoder_hidden_states=emb,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    times = []
    for s in range(n_steps):
        t0 = time.perf_counter()
        idx = batch_indices(len(ex), s, 0, 0, batch, 1, 1, 0)
        g = torch.Generator().manual_seed(s * 10_007)
        with torch.no_grad():
            lr = [load_image(Path(ex.lr[i])) for i in idx]
            control = torch.cat([resize(x, (x.shape[-2] * 4, x.shape[-1] * 4)) for x in lr])
            win = torch.cat([load_image(Path(ex.images[i][0])) for i in idx])
            lose = torch.cat([load_image(Path(ex.images[i][1])) for i in idx])
            x0 = torch.cat([bb.encode_images(win), bb.encode_images(lose)])
            emb = bb.encode_prompts([ex.prompts[i] for i in idx])["prompt_embeds"]
        noise = torch.randn((batch, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        t = bb.sample_timesteps(batch, tuple(x0.shape[-2:]), g).repeat(2)
        control, emb = control.repeat(2, 1, 1, 1), emb.repeat(2, 1, 1)
        noisy, target = bb.noisy_and_target(x0, noise, t)
        err = mse_per_sample(forward(unet, net, noisy, t, emb, control), target)
        with torch.no_grad():
            ref_err = mse_per_sample(forward(ref_unet, ref_net, noisy, t, emb, control), target)
        o = dpo_loss(err[:batch], err[batch:], ref_err[:batch], ref_err[batch:], 5000.0, ex.weights[idx])
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    marks["peak"] = peak_rss_mb()
    return times


def bench_training(args) -> list[dict]:
    rounds = 1 if args.quick else 2
    warmup, steps, batch, n_pairs = 2, (3 if args.quick else 4), 2, 2
    results: dict[str, list[dict]] = {"ours": [], "naive": []}
    with tempfile.TemporaryDirectory(prefix="dp2osr-bench-") as tmp:
        root = Path(tmp)
        base, data = make_training_data(root, n_pairs, TRAIN_SIZE)
        bb = common.build_sd2(TRAIN_WIDTH_DIV)
        sizes = {
            k: common.n_params(m) / 1e6
            for k, m in (
                ("unet", bb.unet),
                ("controlnet", bb.controlnet),
                ("vae", bb.vae),
                ("text", bb.text_encoder),
            )
        }
        del bb
        print(
            f"  SD2-base architecture at 1/{TRAIN_WIDTH_DIV} width ("
            + ", ".join(f"{k} {v:.2f} M" for k, v in sizes.items())
            + f"), {TRAIN_SIZE} px, batch {batch} pairs, fp32, {warmup} warm-up + {steps} timed steps per "
            f"process, {rounds} round(s) of one process per variant",
            flush=True,
        )
        for r in range(rounds):
            for variant in ("ours", "naive") if r % 2 == 0 else ("naive", "ours"):
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--_train-worker",
                    variant,
                    "--_base",
                    str(base),
                    "--_data",
                    str(data),
                    "--_out",
                    str(root / f"out-{variant}-{r}"),
                    "--_steps",
                    str(steps),
                    "--_warmup",
                    str(warmup),
                    "--_batch",
                    str(batch),
                ]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"training worker {variant} failed:\n{proc.stderr[-4000:]}")
                results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    step = {v: median([t for r in rs for t in r["step_s"]]) for v, rs in results.items()}
    peak = {v: median([r["peak_mb"] for r in rs]) for v, rs in results.items()}
    loaded = {v: median([r["loaded_mb"] for r in rs]) for v, rs in results.items()}
    extra = {
        "model": f"sd2-w{TRAIN_WIDTH_DIV}",
        "image_px": TRAIN_SIZE,
        "batch_pairs": batch,
        "params_m": sizes,
        "raw": results,
    }
    out = [
        row(
            "training",
            "DPO step time",
            step["ours"],
            step["naive"],
            "s/step",
            naive_name="2 full copies + encode every step",
            **extra,
        ),
        row(
            "training",
            "peak memory",
            peak["ours"],
            peak["naive"],
            "MiB",
            naive_name="2 full copies + encode every step",
        ),
        row(
            "training",
            "memory after load",
            loaded["ours"],
            loaded["naive"],
            "MiB",
            naive_name="2 full copies + encode every step",
        ),
    ]
    for r in out:
        print_row(r)
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
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    for name in ("train-worker", "base", "data", "out"):
        parser.add_argument(f"--_{name}", help=argparse.SUPPRESS)
    for name in ("steps", "warmup", "batch"):
        parser.add_argument(f"--_{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._train_worker:
        res = train_worker(
            args._train_worker,
            Path(args._base),
            Path(args._data),
            Path(args._out),
            args._warmup,
            args._steps,
            args._batch,
        )
        print(json.dumps(res))
        return 0

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
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
