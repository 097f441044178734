"""`dp2osr train`: supervised ControlNet training (sft) and DP²O preference training (dpo), one loop.

Only the ControlNet trains. DPO's reference is the frozen initial ControlNet (or, with LoRA, the same
ControlNet with its adapter disabled) sharing the one frozen UNet/transformer in memory. Latents, control
images and prompt embeddings are cached (train_data.FrozenCache). Runs unchanged under `accelerate launch`.
Read `step()` below for the objective: METHOD.md §3.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dp2osr.backbones import load_backbone, save_release
from dp2osr.config import check_choice, check_resume, field, save_config
from dp2osr.engine.train_data import FrozenCache, batch_indices, read_examples
from dp2osr.math.loss import dpo_loss, mse_per_sample
from dp2osr.pair import HPO_MODES
from dp2osr.engine.sampler import ModelOptions

CONFIG_NAME = "train_config.yaml"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; no checkpoint is written from that state."""


@dataclass(kw_only=True)
class TrainConfig(ModelOptions):
    """Train the ControlNet: --mode sft (supervised, on LR/HR pairs) or --mode dpo (DP²O, on preference pairs).

    DPO data is the pref_pairs.parquet of `dp2osr pair`; SFT data is a `dp2osr degrade` folder. --controlnet
    is the starting point (and DPO's frozen reference). Writes OUTPUT/checkpoint-NNNNNN/ (model.safetensors in
    the release format, controlnet/ in diffusers format, state/ for --resume), OUTPUT/final/, metrics.jsonl
    and TensorBoard logs (OUTPUT/tb). Effective batch = batch_size x grad_accum x processes (paper: 1024 pairs).
    """

    mode: str = field(help="sft | dpo", choices=["sft", "dpo"])
    data: Path = field(help="dpo: pref_pairs.parquet (or its folder); sft: a `dp2osr degrade` folder")
    output: Path = field(help="output folder (checkpoints, logs, final model)", run_only=True)
    steps: int = field(1000, help="optimizer steps (paper: 1000; most of the gain by 500)", run_only=True)
    lr: float = field(2e-5, help="AdamW learning rate (paper: 2e-5)")
    weight_decay: float = field(1e-2, help="AdamW weight decay")
    warmup_steps: int = field(0, help="linear learning-rate warm-up steps")
    batch_size: int = field(4, help="pairs (dpo) or images (sft) per micro-batch per process")
    grad_accum: int = field(1, help="micro-batches per optimizer step (paper: effective batch 1024 pairs)")
    beta: float = field(5000.0, help="DPO β in ℓ = −log σ(−β/2 · Δ), Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)); "
                        "the 1/2 is inside, as METHOD.md writes it (paper: 5000)")
    winner_sft: float = field(0.0, help="dpo: λ of an added supervised term on the winners, L = mean(w·(ℓ + λ·(e_θ(w) "
                              "− e_ref(w)))); not in the paper, 0 = off. ℓ pulls on e_θ(w) with β/4 at the start, "
                              "so λ = β/4 pulls as hard; it keeps DPO from lowering ℓ by moving away from winners "
                              "and losers alike")
    hpo: str = field("both", help="pair weights: both = w_intra·w_inter (HPO), intra, inter, none = plain "
                     "Diffusion-DPO", choices=list(HPO_MODES))
    prompt_dropout: float = field(0.1, help="sft: probability of training a sample with the empty prompt")
    upscale: int = field(4, help="LR -> training image scale factor")
    mixed_precision: str = field("no", help="autocast dtype for the forward passes; the trained weights and DPO's "
                                 "frozen reference ControlNet stay fp32, the frozen UNet/transformer, VAE and text "
                                 "encoders take this dtype",
                                 choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = field(False, help="recompute activations in backward (less memory, slower)")
    use_8bit_adam: bool = field(False, help="bitsandbytes 8-bit AdamW: the optimizer state of large tensors in 8 bits "
                                "(bitsandbytes is installed with pyiqa; tested on the CPU)")
    lora_rank: int = field(0, help="train a LoRA of this rank on the ControlNet instead of all its weights; the "
                           "DPO reference is then the ControlNet with the adapter disabled (needs peft)")
    max_grad_norm: float = field(1.0, help="gradient clipping norm")
    ema_decay: float = field(0.0, help="keep an exponential moving average of the trained weights with this decay "
                             "(e.g. 0.999) and save it as the model; 0 = off")
    cache: bool = field(True, help="cache VAE latents, control images and prompt embeddings (off: re-encode "
                        "every step, for benchmarks)")
    seed: int = field(0, help="seed of data order, noise and timesteps")
    checkpoint_every: int = field(100, help="save a checkpoint every K steps (and at the end)", run_only=True)
    keep_checkpoints: int = field(2, help="keep only the newest K checkpoints (0 = all)", run_only=True)
    log_every: int = field(1, help="log metrics every K steps", run_only=True)
    resume: bool = field(False, help="continue from the newest checkpoint in OUTPUT", run_only=True)
    eval_data: Path | None = field(None, help="held-out images (a `dp2osr degrade` folder, never in the training "
                                   "data): their hybrid reward is evaluated at step 0 and every --eval-every steps "
                                   "-> OUTPUT/eval/reward_curve.{csv,png}, TensorBoard eval/* (the reward curve)")
    eval_every: int = field(0, help="evaluate every K steps (0 = at every checkpoint)")
    eval_samples: int = field(4, help="seeds per held-out image (the same seeds at every evaluation)")
    eval_metrics: list[str] | None = field(None, help="IQA metrics of the held-out reward (default: the offline "
                                           "preset, ms_ssim fsim gmsd piqe)")
    eval_sample_steps: int | None = field(None, help="denoising steps of the held-out samples (default: the "
                                          "backbone's)")
    eval_process_size: int | None = field(None, help="process size of the held-out samples (default: the "
                                          "backbone's)")

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ["sft", "dpo"])
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError(f"--beta and --lr must be > 0, got {self.beta} and {self.lr}")
        if self.winner_sft < 0:
            raise ValueError(f"--winner-sft must be >= 0, got {self.winner_sft}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"--prompt-dropout must be in [0, 1], got {self.prompt_dropout}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in Path(out).glob("checkpoint-*") if (p / "train_state.json").is_file())
    return found[-1] if found else None


def plain_controlnet(net: torch.nn.Module, lora: bool) -> torch.nn.Module:
    """The ControlNet to save: with LoRA, a copy with the adapter fused in (loadable without peft)."""
    if not lora:
        return net
    merged = copy.deepcopy(net)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def save_checkpoint(accelerator, net, cfg: TrainConfig, step: int, folder: Path, ema=None, params=None) -> None:
    """Release-format model.safetensors + diffusers controlnet/ (both loadable by upscale) + resumable state.

    With EMA, the saved model is the averaged weights and ``ema.pt`` keeps the average for ``--resume``.
    """
    accelerator.save_state(str(folder / "state"))
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.state_dict(), folder / "ema.pt")
            ema.store(params)
            ema.copy_to(params)
        try:
            model = plain_controlnet(accelerator.unwrap_model(net), cfg.lora_rank > 0)
            save_release(model, folder / "model.safetensors")
            model.save_pretrained(folder / "controlnet")
        finally:
            if ema is not None:
                ema.restore(params)
        (folder / "train_state.json").write_text(json.dumps({"step": step}))


def _make_optimizer(params, cfg: TrainConfig):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError("--use-8bit-adam needs the bitsandbytes package") from exc
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig) -> int:
    """Run training; returns 0 on success, 3 when the loss diverged (no broken checkpoint is written)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if not cpu:
        # The cuDNN attention backend hit "illegal memory access" in the FLUX DPO backward (torch 2.11, H200);
        # the flash / memory-efficient backends ran the same step fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)
    out = Path(cfg.output)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {out}")
    if not resume_from and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue or choose another --output")
    if resume_from:
        check_resume(cfg, out / CONFIG_NAME, "a training run", "resume with the same options")
    examples = read_examples(cfg.data, cfg.mode, cfg.hpo)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    # fp32 master weights of the ControlNet as loaded (not rounded through weight_dtype); autocast does the rest
    bb = load_backbone(cfg.backbone, cfg.base, cfg.controlnet, dtype="fp32").to(
        accelerator.device, weight_dtype, controlnet_dtype=torch.float32
    )
    net = bb.controlnet
    reference = None
    if cfg.lora_rank > 0:
        from peft import LoraConfig

        net.requires_grad_(False)
        net.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    elif cfg.mode == "dpo":
        # In fp32 like the policy's master weights: a reference stored in bf16/fp16 holds rounded weights and runs
        # the ops autocast leaves alone (norms, element-wise products with weights) in another precision, so
        # policy and reference differ before any training. Measured at step 1 of a bf16 run from a ControlNet
        # with trained-like weights: DPO logit 0.26 (tiny SD2) and −0.05 (tiny FLUX) at β 500, ten times that at
        # the paper's β 5000, where METHOD.md's ℓ = ln 2 needs 0 (tests/test_train.py).
        reference = copy.deepcopy(net).requires_grad_(False).eval()
    net.train()
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
        for m in bb.frozen_modules().values():
            if hasattr(m, "enable_gradient_checkpointing") and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, cfg)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    ema = None
    if cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=False)
    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "state"))
        start = json.loads((resume_from / "train_state.json").read_text())["step"]
        if ema is not None:
            ema.load_state_dict(torch.load(resume_from / "ema.pt", map_location="cpu", weights_only=True))
            ema.to(accelerator.device)
    if accelerator.is_main_process:
        save_config(cfg, out / CONFIG_NAME)
    cache = FrozenCache(bb, cfg.upscale, enabled=cfg.cache)
    if cfg.cache:  # every prompt's embedding now; then the text encoders leave the GPU (FLUX's T5: ~9 GiB)
        for prompt in sorted(set(examples.prompts) | {""}):
            cache.cond(prompt)
        bb.offload_text_encoders()
    writer = _tensorboard(out / "tb") if accelerator.is_main_process else None
    heldout = _heldout_eval(cfg, bb, out) if cfg.eval_data is not None else None
    eval_every = cfg.eval_every or cfg.checkpoint_every
    eval_seconds = 0.0  # held-out evaluation time, kept out of the training clock ("seconds" in the log)

    def log(record: dict, tag) -> None:
        """One row of metrics.jsonl, and its values in TensorBoard under ``tag(key)`` (main process only)."""
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, v in record.items():
            if key != "step" and writer is not None:
                writer.add_scalar(tag(key), v, record["step"])

    def evaluate(done: int) -> None:
        """The held-out reward of the current weights (EMA weights when kept: the model that is saved). Every
        process samples its share; the main process scores and logs."""
        nonlocal eval_seconds
        if heldout is None or done in heldout.steps():  # a resumed run keeps its earlier evaluations
            return
        start_eval = time.perf_counter()
        model = accelerator.unwrap_model(net)
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        model.eval()
        try:
            with accelerator.autocast():
                heldout.pool(done, model, accelerator)
        finally:
            model.train()
            if ema is not None:
                ema.restore(params)
        if accelerator.is_main_process:
            table = heldout.curve()
            row = table[table.step == done].iloc[0]
            keys = ("reward", "best", "worst", "psnr", "ssim")
            record = {"step": done, **{f"eval_{k}": float(row[k]) for k in keys},
                      "eval_seconds": time.perf_counter() - start_eval}
            log(record, lambda key: key.replace("eval_", "eval/"))
            tqdm.write(f"eval step {done}: held-out reward {row['reward']:.4f} (best {row['best']:.4f}, worst "
                       f"{row['worst']:.4f}, PSNR-Y {row['psnr']:.2f} dB) -> {out / 'eval'}", file=sys.stderr)
        accelerator.wait_for_everyone()
        eval_seconds += time.perf_counter() - start_eval

    @contextlib.contextmanager
    def reference_mode():
        """Forward passes under this block use the frozen reference ControlNet."""
        if reference is not None:
            yield reference
            return
        inner = accelerator.unwrap_model(net)
        inner.disable_adapters()
        try:
            yield net
        finally:
            inner.enable_adapters()

    def step(idx: list[int], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One micro-batch: the loss and its diagnostics."""
        b = len(idx)
        drop = (torch.rand(b, generator=g) < cfg.prompt_dropout).tolist() if cfg.mode == "sft" else None
        targets, control, cond, w = cache.batch(examples, idx, drop)
        hw = tuple(targets.shape[-2:])
        noise = torch.randn(targets.shape[1:], generator=g).to(bb.device, targets.dtype)
        t = bb.sample_timesteps(b, hw, g)
        k = targets.shape[0]  # DPO: winner and loser share the noise and the timestep
        x0, noise, t = targets.flatten(0, 1), noise.repeat(k, 1, 1, 1), t.repeat(k)
        control = control.repeat(k, *([1] * (control.dim() - 1)))
        cond = {key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in cond.items()}
        noisy, target = bb.noisy_and_target(x0, noise, t)
        trunk = None
        if cfg.mode == "dpo":
            # The frozen denoiser's part that the ControlNet does not reach (SD2: the UNet's down and mid blocks)
            # runs once for both passes. The reference pass runs first, so that its activations are freed
            # before the policy's graph is built (the same numbers in either order).
            with torch.no_grad(), accelerator.autocast():
                trunk = bb.trunk(noisy, t, cond)
                with reference_mode() as ref:
                    ref_pred = bb.predict(
                        noisy, t, cond, control, guidance=bb.train_guidance, controlnet=ref, trunk=trunk
                    )
                ref_err = mse_per_sample(ref_pred.float(), target.float())
                del ref_pred
        with accelerator.autocast():
            pred = bb.predict(noisy, t, cond, control, guidance=bb.train_guidance, controlnet=net, trunk=trunk)
        del trunk
        err = mse_per_sample(pred.float(), target.float())
        if cfg.mode == "sft":
            return err.mean(), {"loss": err.mean().item()}
        o = dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], cfg.beta, w, cfg.winner_sft)
        stats = {
            "loss": o.loss.item(), "accuracy": o.accuracy.item(), "reward_margin": o.reward_margin.item(),
            "policy_err_w": o.policy_err_w.item(), "policy_err_l": o.policy_err_l.item(),
            "ref_err_w": o.ref_err_w.item(), "ref_err_l": o.ref_err_l.item(),
        }
        return o.loss, stats

    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.mode}",
               disable=not accelerator.is_local_main_process, file=sys.stderr)
    t0 = time.perf_counter()
    if start % eval_every == 0:
        evaluate(start)
    try:
        for s in bar:
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(examples), s, micro, rank, cfg.batch_size, cfg.grad_accum, world, cfg.seed)
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + s * 10_007 + micro * 101 + rank)
                with accelerator.accumulate(net):
                    loss, stats = step(idx, g)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"non-finite loss at step {s} (micro-batch {micro})")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        gn = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        if not torch.isfinite(gn):
                            raise TrainingDiverged(f"non-finite gradient norm at step {s}")
                        stats["grad_norm"] = float(gn)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    if ema is not None and accelerator.sync_gradients:
                        ema.step(params)
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + v / (1 if key == "grad_norm" else cfg.grad_accum)
            done = s + 1
            if accelerator.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps):
                record = {"step": done, "lr": scheduler.get_last_lr()[0], **sums,
                          "seconds": time.perf_counter() - t0 - eval_seconds}
                log(record, lambda key: f"train/{key}")
                bar.set_postfix({k: f"{v:.4g}" for k, v in sums.items() if k in ("loss", "accuracy", "grad_norm")})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(accelerator, net, cfg, done, out / f"checkpoint-{done:06d}", ema, params)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    _prune(out, cfg.keep_checkpoints)
            if done % eval_every == 0 or done == cfg.steps:
                evaluate(done)
    except TrainingDiverged as exc:
        last = latest_checkpoint(out)
        print(f"dp2osr train: stopped: {exc}; no checkpoint was written from this state "
              f"(last good: {last or 'none'}). Lower --lr or --beta, or use --mixed-precision bf16/no.",
              file=sys.stderr)
        return 3
    finally:
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = out / "final"
        shutil.rmtree(final, ignore_errors=True)
        src = latest_checkpoint(out)
        final.mkdir(parents=True)
        shutil.copy2(src / "model.safetensors", final / "model.safetensors")
        shutil.copytree(src / "controlnet", final / "controlnet")
        print(f"train: {cfg.steps} steps done -> {final} (load with --controlnet {final / 'model.safetensors'})",
              file=sys.stderr)
    return 0


def _heldout_eval(cfg: TrainConfig, bb, out: Path):
    """The held-out evaluator of --eval-data (curve.HeldoutEval), sampling with the backbone's defaults."""
    from dp2osr.curve import HeldoutEval
    from dp2osr.engine.sampler import SamplingOptions

    opts = SamplingOptions(
        backbone=cfg.backbone, base=cfg.base, controlnet=cfg.controlnet, device=cfg.device,
        steps=cfg.eval_sample_steps, process_size=cfg.eval_process_size,
    )  # fmt: skip
    return HeldoutEval(
        bb, cfg.eval_data, out / "eval", opts, samples=cfg.eval_samples, seed=50_000 + cfg.seed,
        metrics=cfg.eval_metrics, upscale=cfg.upscale,
    )  # fmt: skip


def _prune(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted(p for p in out.glob("checkpoint-*") if (p / "train_state.json").is_file())
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; degrade gracefully if removed
        print("note: tensorboard not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(path))

