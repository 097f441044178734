"""`dp2osr train`: supervised ControlNet training (sft) and DP²O preference training (dpo), one loop.

The options are `TrainConfig`; the work is `dp2osr.engine.trainer` (setup -> loop -> checkpoints) with the
objectives of `dp2osr.engine.objectives` (Diffusion-DPO weighted by HPO, arXiv 2510.18851 §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dp2osr import tables
from dp2osr.config import (
    check_choices,
    check_range,
    check_resume,
    check_seed,
    data_root_field,
    field,
    save_config,
    to_dict,
)
from dp2osr.engine import frozen_store, trackers, trainer
from dp2osr.engine.options import MAX_STEPS, ModelOptions
from dp2osr.engine.trainer import latest_checkpoint
from dp2osr.errors import TrainingDiverged
from dp2osr.math.hpo import HPO_MODES
from dp2osr.paths import check_not_link, check_output_dir
from dp2osr.runtime import output_lock, process_group, resolve_device

CONFIG_NAME = "train_config.yaml"


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
    beta: float = field(
        5000.0,
        help="DPO β in ℓ = −log σ(−β/2 · Δ), Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)); "
        "the 1/2 is inside the sigmoid's argument (paper: 5000)",
    )
    winner_sft: float = field(
        0.0,
        help="dpo: λ of an added supervised term on the winners, L = mean(w·(ℓ + λ·(e_θ(w) "
        "− e_ref(w)))); not in the paper, 0 = off. ℓ pulls on e_θ(w) with β/4 at the start, "
        "so λ = β/4 pulls as hard; meant to stop DPO lowering ℓ by moving away from winners "
        "and losers alike (small-scale runs: docs/QUICKSTART.md)",
    )
    hpo: str = field(
        "both",
        help="pair weights: both = w_intra·w_inter (HPO), intra, inter, none = plain Diffusion-DPO",
        choices=list(HPO_MODES),
    )
    prompt_dropout: float = field(0.1, help="sft: probability of training a sample with the empty prompt")
    upscale: int = field(4, help="LR -> training image scale factor")
    mixed_precision: str = field(
        "no",
        help="autocast dtype for the forward passes; the trained weights and DPO's "
        "frozen reference ControlNet stay fp32, the frozen UNet/transformer, VAE and text "
        "encoders take this dtype",
        choices=["no", "fp16", "bf16"],
    )
    gradient_checkpointing: bool = field(
        False, help="recompute activations in backward (less memory, slower)"
    )
    use_8bit_adam: bool = field(
        False,
        help="bitsandbytes 8-bit AdamW: the optimizer state of large tensors in 8 bits "
        "(bitsandbytes comes with pyiqa; memory: docs/PERFORMANCE.md)",
    )
    lora_rank: int = field(
        0,
        help="train a LoRA of this rank on the ControlNet instead of all its weights; the "
        "DPO reference is then the ControlNet with the adapter disabled (needs peft)",
    )
    max_grad_norm: float = field(1.0, help="gradient clipping norm")
    ema_decay: float = field(
        0.0,
        help="keep an exponential moving average of the trained weights with this decay "
        "(e.g. 0.999) and save it as the model; 0 = off",
    )
    cache: bool = field(
        True,
        help="compute VAE latents, control images and prompt embeddings once, before the first step, into "
        "OUTPUT/frozen/ (reused by --resume; read per batch) (off: re-encode every step, for benchmarks)",
    )
    seed: int = field(0, help="seed of data order, noise and timesteps")
    checkpoint_every: int = field(100, help="save a checkpoint every K steps (and at the end)", run_only=True)
    keep_checkpoints: int = field(2, help="keep only the newest K checkpoints (0 = all)", run_only=True)
    log_every: int = field(1, help="log metrics every K steps", run_only=True)
    report_to: str = field(
        "tensorboard",
        help="where metrics.jsonl's scalars also go: tensorboard (OUTPUT/tb), wandb (Weights & Biases, project "
        "dp2osr; needs the wandb package), all (both), none",
        choices=list(trackers.REPORT_TO),
        run_only=True,
    )
    resume: bool = field(False, help="continue from the newest checkpoint in OUTPUT", run_only=True)
    eval_data: Path | None = field(
        None,
        help="held-out images (a `dp2osr degrade` folder, never in the training "
        "data): their hybrid reward is evaluated at step 0 and every --eval-every steps "
        "-> OUTPUT/eval/reward_curve.{csv,png} and eval/* of the --report-to trackers (the reward curve)",
    )
    heldout_pairs: Path | None = field(
        None,
        help="dpo: a pref_pairs.parquet built like the training pairs (`dp2osr sample`, `score`, `pair`) from "
        "images never in the training data: at step 0 and every --eval-every steps, the share of its pairs (and "
        "of up to 256 training pairs) whose winner the policy prefers more than the reference does -> "
        "metrics.jsonl (pref_*) and OUTPUT/pref_accuracy.{csv,png}; forward passes only",
    )
    pref_draws: int = field(4, help="noise/timestep draws per pair of the preference accuracy")
    eval_every: int = field(0, help="evaluate every K steps (0 = at every checkpoint)")
    eval_samples: int = field(4, help="seeds per held-out image (the same seeds at every evaluation)")
    eval_metrics: list[str] | None = field(
        None, help="IQA metrics of the held-out reward (default: the offline preset, fsim gmsd piqe)"
    )
    eval_sample_steps: int | None = field(
        None, help="denoising steps of the held-out samples (default: the backbone's)"
    )
    eval_process_size: int | None = field(
        None, help="process size of the held-out samples (default: the backbone's)"
    )
    data_root: list[Path] = data_root_field()

    def __post_init__(self) -> None:
        check_choices(self)
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "checkpoint_every",
            "log_every",
            "eval_samples",
            "pref_draws",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "beta", "max_grad_norm"):  # 0 or less: no update, or gradient ascent
            check_range(name, getattr(self, name), 0, above=True)
        for name in ("weight_decay", "winner_sft"):
            check_range(name, getattr(self, name), 0)
        for name in ("warmup_steps", "lora_rank", "keep_checkpoints"):
            check_range(name, getattr(self, name), 0, integer=True)
        check_range("upscale", self.upscale, 1, integer=True)
        check_seed(self.seed)
        if self.eval_sample_steps is not None:
            check_range("eval_sample_steps", self.eval_sample_steps, 1, MAX_STEPS, integer=True)
        if self.eval_process_size is not None:
            check_range("eval_process_size", self.eval_process_size, 16, integer=True)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.prompt_dropout <= 1:
            raise ValueError(f"--prompt-dropout must be in [0, 1], got {self.prompt_dropout}")
        if self.heldout_pairs is not None and self.mode != "dpo":
            raise ValueError(
                f"--heldout-pairs {self.heldout_pairs} needs --mode dpo (the accuracy is against its reference)"
            )
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")


@tables.with_data_roots
def run(cfg: TrainConfig) -> Path:
    """Run training; returns the final model's folder. Raises `TrainingDiverged` (no broken checkpoint is
    written; the last good one is kept) when the loss or the gradient stops being finite."""
    check_output_dir(cfg.output)
    cpu = resolve_device(cfg.device).type == "cpu"
    if not cpu:
        # The cuDNN attention backend hit "illegal memory access" in the FLUX DPO backward (torch 2.11, H200);
        # the flash / memory-efficient backends ran the same step fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = Path(cfg.output)
    with output_lock(out, "train", process_group(cpu)):
        return _train(cfg, cpu, out)


def _train(cfg: TrainConfig, cpu: bool, out: Path) -> Path:
    """`run` once the output folder is this run's."""
    from accelerate import Accelerator

    for name, what in (
        ("final", "the final model folder"),
        (frozen_store.FOLDER, "the frozen inputs folder"),
    ):
        check_not_link(out / name, what)  # replaced by the run: a link's target would be deleted or written
    resume_from = trainer.resume_point(cfg, out)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=cpu,
        log_with=trackers.make(cfg.report_to, out, resume_from, to_dict(cfg)) or None,
    )
    if resume_from:
        check_resume(cfg, out / CONFIG_NAME, "a training run", "resume with the same options")
    run_ = trainer.setup(cfg, accelerator, resume_from)
    if accelerator.is_main_process:
        save_config(cfg, out / CONFIG_NAME)
    try:
        trainer.train_loop(run_, cfg)
    except TrainingDiverged as exc:
        last = latest_checkpoint(out)
        raise TrainingDiverged(
            f"stopped: {exc}; no checkpoint was written from this state (last good: {last or 'none'}). "
            "Lower --lr or --beta, or use --mixed-precision bf16/no."
        ) from exc
    finally:
        if run_.writer is not None:  # not end_training(): that also takes the process group down
            for tracker in run_.writer.trackers:
                tracker.finish()
    accelerator.wait_for_everyone()
    return trainer.finish(out, cfg.steps) if accelerator.is_main_process else out / "final"
