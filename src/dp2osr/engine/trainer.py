"""The trainer behind `dp2osr train`: setup -> one readable loop -> checkpoints.

Only the ControlNet trains. DPO's reference is the frozen initial ControlNet (or, with LoRA, the same
ControlNet with its adapter disabled) sharing the one frozen UNet/transformer in memory. Latents, control
images and prompt embeddings are computed once, before the first step (`frozen_store`). Runs unchanged under
`accelerate launch`.
The objectives are `dp2osr.engine.objectives`; ``cfg`` everywhere is a `dp2osr.train.TrainConfig`.
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
from typing import Any

import torch
from tqdm import tqdm

from dp2osr.backbones import Backbone, load_backbone, save_release
from dp2osr.engine import checkpoints, frozen_store, pref_accuracy
from dp2osr.engine.heldout import HeldoutEval
from dp2osr.engine.objectives import dpo_objective, noise_batch, sft_objective
from dp2osr.engine.options import SamplingOptions
from dp2osr.engine.train_data import batch_indices, data_table, existing_table
from dp2osr.errors import TrainingDiverged
from dp2osr.images import atomic_write, follow_umask
from dp2osr.paths import append_text, file_sha
from dp2osr.progress import bar as progress_bar

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    accelerator: Any
    bb: Backbone
    net: torch.nn.Module  # the trained ControlNet (accelerate-prepared)
    reference: torch.nn.Module | None  # DPO's frozen reference (None: SFT, or LoRA's disabled adapter)
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    ema: Any | None
    data: Any  # the batches: `frozen_store.FrozenStore`, or `train_data.OnTheFly` (--no-cache)
    out: Path
    start: int  # the step to start from (a resumed run's checkpoint)
    writer: Any | None  # the Accelerator when it logs to trackers (main process)
    heldout: HeldoutEval | None
    accuracy: pref_accuracy.TrainAccuracy | None = None  # --heldout-pairs
    eval_seconds: float = 0.0  # held-out evaluation time, kept out of the training clock
    data_sha: str = ""  # content hash of the training-data table, recorded in every checkpoint


# ------------------------------------------------------------------------------------------- setup
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (`checkpoints.newest_complete`); None when there is none."""
    try:
        return checkpoints.newest_complete(out)
    except ValueError:
        return None


def _make_optimizer(params, cfg):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError("--use-8bit-adam needs the bitsandbytes package") from exc
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _trainable(bb: Backbone, cfg) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the ControlNet to train, DPO's frozen reference copy or None)."""
    net, reference = bb.controlnet, None
    if cfg.lora_rank > 0:
        from peft import LoraConfig

        net.requires_grad_(False)
        net.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    elif cfg.mode == "dpo":
        # In fp32 like the policy's master weights: a reference stored in bf16/fp16 holds rounded weights and
        # runs the ops autocast leaves alone (norms, element-wise products with weights) in another precision,
        # so policy and reference differ before any training. Measured at step 1 of a bf16 run from a
        # ControlNet with trained-like weights: DPO logit 0.26 (tiny SD2) and −0.05 (tiny FLUX) at β 500, ten
        # times that at the paper's β 5000, where ℓ = ln 2 needs 0 (tests/test_train.py).
        reference = copy.deepcopy(net).requires_grad_(False).eval()
    net.train()
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
        for m in bb.frozen_modules().values():
            if hasattr(m, "enable_gradient_checkpointing") and getattr(
                m, "_supports_gradient_checkpointing", False
            ):
                m.enable_gradient_checkpointing()
    return net, reference


def resume_point(cfg, out: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from (None without it); refuses a folder holding checkpoints
    without ``--resume``."""
    if not cfg.resume:
        if checkpoints.saved_checkpoints(out):
            raise ValueError(
                f"{out} already holds checkpoints; pass --resume to continue or choose another --output"
            )
        return None
    try:
        resume_from = checkpoints.newest_complete(out, say=True, content=True)
    except ValueError as exc:
        raise ValueError(f"--resume: {exc}") from None
    if resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {out}")
    checkpoints.check_data(resume_from, data_table(cfg.data, cfg.mode))
    frozen_store.check_unchanged(out)  # the table's hash does not cover its images' content
    return resume_from


def setup(cfg, accelerator, resume_from: Path | None) -> Run:
    """Load the model, optimizer (and a checkpoint's state when resuming) and the training inputs (stored
    once: `frozen_store`); open the logs (cut back to the resumed step) and the held-out evaluator."""
    from diffusers.optimization import get_scheduler

    out = Path(cfg.output)
    data_sha = file_sha(existing_table(cfg.data, cfg.mode))  # a missing table is reported before models load
    # fp32 master weights of the ControlNet as loaded (not rounded through weight_dtype); autocast does the rest
    bb = load_backbone(cfg.backbone, cfg.base, cfg.controlnet, dtype="fp32").to(
        accelerator.device, WEIGHT_DTYPES[cfg.mixed_precision], controlnet_dtype=torch.float32
    )
    net, reference = _trainable(bb, cfg)
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
        start = checkpoints.load(accelerator, resume_from, ema)
        if ema is not None:
            ema.to(accelerator.device)
    run = Run(
        accelerator,
        bb,
        net,
        reference,
        params,
        optimizer,
        scheduler,
        ema,
        None,
        out,
        start,
        None,
        None,
        data_sha=data_sha,
    )
    run.data = frozen_store.training_inputs(cfg, bb, accelerator, data_sha)
    if cfg.cache:  # every prompt's embedding is stored; the text encoders leave the GPU (FLUX's T5: ~9 GiB)
        bb.offload_text_encoders()
    if accelerator.is_main_process:
        if resume_from:  # the killed run may have logged steps after its last checkpoint
            truncate_metrics(out / "metrics.jsonl", start)
        accelerator.init_trackers("dp2osr")  # the trackers of --report-to (engine.trackers)
        run.writer = accelerator if accelerator.trackers else None
    if cfg.eval_data is not None:
        run.heldout = heldout_eval(cfg, bb, out)
    run.accuracy = pref_accuracy.for_run(cfg, bb, out)
    return run


def heldout_eval(cfg, bb: Backbone, out: Path) -> HeldoutEval:
    """The held-out evaluator of --eval-data, sampling with the backbone's defaults."""
    opts = SamplingOptions(
        backbone=cfg.backbone,
        base=cfg.base,
        controlnet=cfg.controlnet,
        device=cfg.device,
        steps=cfg.eval_sample_steps,
        process_size=cfg.eval_process_size,
    )
    return HeldoutEval(
        bb,
        cfg.eval_data,
        out / "eval",
        opts,
        samples=cfg.eval_samples,
        seed=50_000 + cfg.seed,
        metrics=cfg.eval_metrics,
        upscale=cfg.upscale,
    )


# -------------------------------------------------------------------------------------------- steps
@contextlib.contextmanager
def reference_mode(run: Run):
    """Forward passes under this block use the frozen reference ControlNet."""
    if run.reference is not None:
        yield run.reference
        return
    inner = run.accelerator.unwrap_model(run.net)
    inner.disable_adapters()
    try:
        yield run.net
    finally:
        inner.enable_adapters()


def micro_step(run: Run, cfg, idx: list[int], g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (examples ``idx``, all randomness from ``g``) and its diagnostics."""
    drop = (torch.rand(len(idx), generator=g) < cfg.prompt_dropout).tolist() if cfg.mode == "sft" else None
    targets, control, cond, w = run.data.batch(idx, drop)
    nb = noise_batch(run.bb, targets, control, cond, g)
    autocast = run.accelerator.autocast
    if cfg.mode == "sft":
        return sft_objective(run.bb, run.net, nb, autocast)
    return dpo_objective(
        run.bb,
        run.net,
        lambda: reference_mode(run),
        nb,
        w,
        beta=cfg.beta,
        winner_sft=cfg.winner_sft,
        autocast=autocast,
    )


def optimizer_step(run: Run, cfg, s: int) -> dict[str, float]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches; the diagnostics averaged over them."""
    acc, sums = run.accelerator, {}
    rank, world = acc.process_index, acc.num_processes
    for micro in range(cfg.grad_accum):
        idx = batch_indices(len(run.data), s, micro, rank, cfg.batch_size, cfg.grad_accum, world, cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + s * 10_007 + micro * 101 + rank)
        with acc.accumulate(run.net):
            loss, stats = micro_step(run, cfg, idx, g)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite loss at step {s} (micro-batch {micro})")
            acc.backward(loss)
            if acc.sync_gradients:
                gn = acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
                if not torch.isfinite(gn):
                    raise TrainingDiverged(f"non-finite gradient norm at step {s}")
                stats["grad_norm"] = float(gn)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
            if run.ema is not None and acc.sync_gradients:
                run.ema.step(run.params)
        for key, v in stats.items():
            sums[key] = sums.get(key, 0.0) + v / (1 if key == "grad_norm" else cfg.grad_accum)
    return sums


# --------------------------------------------------------------------------------------------- loop
def train_loop(run: Run, cfg) -> None:
    """Steps ``run.start`` .. ``cfg.steps``: log, checkpoint and evaluate as configured."""
    acc = run.accelerator
    eval_every = cfg.eval_every or cfg.checkpoint_every
    bar = progress_bar(
        range(run.start, cfg.steps),
        initial=run.start,
        total=cfg.steps,
        desc=f"train {cfg.mode}",
        disable=not acc.is_local_main_process,
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    if run.start % eval_every == 0:
        evaluate(run, run.start)
    for s in bar:
        sums = optimizer_step(run, cfg, s)
        done = s + 1
        if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps):
            seconds = time.perf_counter() - t0 - run.eval_seconds
            log_row(
                run,
                {"step": done, "lr": run.scheduler.get_last_lr()[0], **sums, "seconds": seconds},
                lambda key: f"train/{key}",
            )
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in sums.items() if k in ("loss", "accuracy", "grad_norm")}
            )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            folder = run.out / f"checkpoint-{done:06d}"
            save_checkpoint(acc, run.net, cfg, done, folder, run.ema, run.params, run.data_sha)
            acc.wait_for_everyone()
            if acc.is_main_process:
                prune(run.out, cfg.keep_checkpoints)
        if done % eval_every == 0 or done == cfg.steps:
            evaluate(run, done)


def log_row(run: Run, record: dict, tag) -> None:
    """One row of metrics.jsonl, and its values in the trackers under ``tag(key)`` (main process only)."""
    append_text(run.out / "metrics.jsonl", json.dumps(record) + "\n")
    if run.writer is not None:
        run.writer.log({tag(k): v for k, v in record.items() if k != "step"}, step=record["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of metrics.jsonl (training and eval_* rows) up to ``step``, the checkpoint a run
    resumes from: the resumed run writes the later steps again, so every step appears once."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))


def _log_eval(run: Run, done: int, seconds: float) -> None:
    table = run.heldout.curve()
    row = table[table.step == done].iloc[0]
    keys = ("reward", "best", "worst", "psnr", "ssim")
    record = {"step": done, **{f"eval_{k}": float(row[k]) for k in keys}, "eval_seconds": seconds}
    log_row(run, record, lambda key: key.replace("eval_", "eval/"))
    tqdm.write(
        f"eval step {done}: held-out reward {row['reward']:.4f} (best {row['best']:.4f}, worst "
        f"{row['worst']:.4f}, PSNR-Y {row['psnr']:.2f} dB) -> {run.out / 'eval'}",
        file=sys.stderr,
    )


def evaluate(run: Run, done: int) -> None:
    """The held-out reward of the current weights (EMA weights when kept: the model that is saved). Every
    process samples and scores its share; the main process logs."""
    if run.accuracy is not None:  # the preference accuracy of --heldout-pairs
        log = lambda record: log_row(run, record, lambda key: key.replace("pref_", "pref/"))  # noqa: E731
        run.eval_seconds += run.accuracy.at_step(run, done, lambda: reference_mode(run), log)
    heldout, acc = run.heldout, run.accelerator
    if heldout is None:
        return
    if done in heldout.steps():  # a resumed run keeps its earlier evaluations (same weights: same pools)
        if done > run.start and acc.is_main_process:  # evaluated after the checkpoint: its row was truncated
            _log_eval(run, done, 0.0)
        return
    start = time.perf_counter()
    model = acc.unwrap_model(run.net)
    if run.ema is not None:
        run.ema.store(run.params)
        run.ema.copy_to(run.params)
    model.eval()
    try:
        with acc.autocast():
            heldout.pool(done, model, acc)
    finally:
        model.train()
        if run.ema is not None:
            run.ema.restore(run.params)
    if acc.is_main_process:
        _log_eval(run, done, time.perf_counter() - start)
    acc.wait_for_everyone()
    run.eval_seconds += time.perf_counter() - start


# -------------------------------------------------------------------------------------- checkpoints
def plain_controlnet(net: torch.nn.Module, lora: bool) -> torch.nn.Module:
    """The ControlNet to save: with LoRA, a copy with the adapter fused in (loadable without peft)."""
    if not lora:
        return net
    merged = copy.deepcopy(net)
    merged.fuse_lora()
    merged.unload_lora()
    return merged


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor of ``tensors`` holds only finite values (one reduction each)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def save_checkpoint(
    accelerator, net, cfg, step: int, folder: Path, ema=None, params=None, data_sha: str = ""
) -> None:
    """Release-format model.safetensors + diffusers controlnet/ (both loadable by upscale) + resumable state.

    With EMA, the saved model is the averaged weights and ``ema.pt`` keeps the average for ``--resume``.
    Weights with a NaN or an infinity (the trained ones, or their average) raise `TrainingDiverged` before
    anything is written: the previous checkpoint stays the newest. ``train_state.json`` comes last
    (`checkpoints.write_state`, with ``data_sha``): until then the folder is not a checkpoint (a folder saved
    again loses its old one first).
    """
    saved = [*accelerator.unwrap_model(net).parameters(), *(ema.shadow_params if ema is not None else [])]
    if not all_finite(saved):
        raise TrainingDiverged(f"non-finite weights after step {step}; not saved")
    if accelerator.is_main_process:
        (folder / checkpoints.STATE_FILE).unlink(missing_ok=True)
    accelerator.save_state(str(folder / "state"))
    accelerator.wait_for_everyone()  # every process's state files are written before their sizes are recorded
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
        follow_umask(folder)
        checkpoints.write_state(folder, step, data_sha)


def prune(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0: keep all)."""
    if keep <= 0:
        return
    found = [p for p in checkpoints.saved_checkpoints(out) if checkpoints.checkpoint_problem(p) is None]
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def finish(out: Path, steps: int) -> Path:
    """Copy the newest checkpoint's model to OUTPUT/final (main process); returns the folder."""
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    src = latest_checkpoint(out)
    final.mkdir(parents=True)
    shutil.copy2(src / "model.safetensors", final / "model.safetensors")
    shutil.copytree(src / "controlnet", final / "controlnet")
    print(
        f"train: {steps} steps done -> {final} (load with --controlnet {final / 'model.safetensors'})",
        file=sys.stderr,
    )
    return final
