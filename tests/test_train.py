"""`dp2osr train` on the tiny backbones: what trains, what stays frozen, checkpoints, resume, divergence."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dp2osr.engine.objectives as objectives_mod
import dp2osr.engine.trainer as trainer_mod
import dp2osr.train as train_mod
from dp2osr.backbones import load_backbone, save_release
from dp2osr.cli import main


def _png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A degrade-style folder (2 LR/HR pairs, 16 -> 64 px) and a preference-pair table over 4 candidates each."""
    root = tmp_path_factory.mktemp("data")
    rows, pairs = [], []
    for i, name in enumerate(["a", "b"]):
        _png(root / "lr" / f"{name}.png", 16, 16, i)
        _png(root / "hr" / f"{name}.png", 64, 64, 10 + i)
        rows.append((name, f"hr/{name}.png", f"lr/{name}.png", "", i))
        for s in range(4):
            _png(root / "pool" / name / f"seed_{s:04d}.png", 64, 64, 100 + 10 * i + s)
        for w, lo, wi in ((0, 3, 1.2), (1, 2, 0.8), (0, 2, 1.1), (1, 3, 0.9)):
            pairs.append(
                (
                    name,
                    w,
                    lo,
                    f"{name}/seed_{w:04d}.png",
                    f"{name}/seed_{lo:04d}.png",
                    str(root / "lr" / f"{name}.png"),
                    0.9,
                    0.1,
                    wi,
                    1.0 + (0.1 if i else -0.1),
                )
            )
    pd.DataFrame(rows, columns=["image_id", "hr_path", "lr_path", "source", "seed"]).to_parquet(
        root / "pairs.parquet"
    )
    cols = [
        "image_id",
        "win_seed",
        "lose_seed",
        "win_path",
        "lose_path",
        "lr_path",
        "win_reward",
        "lose_reward",
        "w_intra",
        "w_inter",
    ]
    df = pd.DataFrame(pairs, columns=cols)
    df["weight"] = df.w_intra * df.w_inter
    df.to_parquet(root / "pool" / "pref_pairs.parquet")
    return root


def _args(backbone, data, out, mode="dpo", steps=3, *extra):
    src = data / "pool" if mode == "dpo" else data
    return [
        "train",
        "--mode",
        mode,
        "--data",
        str(src),
        "--output",
        str(out),
        "--backbone",
        backbone,
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--beta",
        "500",
        *extra,
    ]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_dpo_trains_controlnet_only_and_checkpoint_upscales(backbone, data, tmp_path, monkeypatch):
    captured = {}
    real_load = trainer_mod.load_backbone

    def spy(*a, **k):
        captured["bb"] = bb = real_load(*a, **k)
        captured["frozen"] = {
            n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in bb.frozen_modules().items()
        }
        captured["init"] = {k: v.clone() for k, v in bb.controlnet.state_dict().items()}
        return bb

    monkeypatch.setattr(trainer_mod, "load_backbone", spy)
    out = tmp_path / "run"
    assert main(_args(backbone, data, out, "dpo", 3, "--checkpoint-every", "2")) == 0
    m = _metrics(out)
    # Step 1: policy == reference, so every pair's loss is ln 2 and the batch loss is mean(w)·ln 2.
    assert m[0]["reward_margin"] == 0 and m[0]["accuracy"] == 0
    assert all(np.isfinite(r["loss"]) for r in m) and len(m) == 3
    bb = captured["bb"]
    for name, module in bb.frozen_modules().items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, captured["frozen"][name][k]), f"frozen {name}.{k} changed"
    trained = load_backbone(backbone, controlnet=out / "final" / "model.safetensors").controlnet.state_dict()
    unchanged = {k for k, v in captured["init"].items() if torch.equal(v, trained[k])}
    # The only exception is architectural: in the FLUX ControlNet the last double block's text-stream output
    # (its text queries, output projection and feed-forward) feeds nothing, so it gets no gradient (as in C-FLUX).
    dead = re.compile(r"transformer_blocks\.3\.(attn\.(norm_added_q|add_q_proj|to_add_out)|ff_context)\.")
    expected = {k for k in captured["init"] if backbone == "flux-tiny" and dead.match(k)}
    assert unchanged <= expected, f"trainable tensors that did not change: {sorted(unchanged - expected)[:5]}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    sr = tmp_path / "sr"
    assert (
        main(
            [
                "upscale",
                "--input",
                str(data / "lr" / "a.png"),
                "--output",
                str(sr),
                "--backbone",
                backbone,
                "--controlnet",
                str(out / "checkpoint-000002" / "controlnet"),
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert (sr / "a" / "seed_0000.png").is_file()


def test_resume_equals_uninterrupted(data, tmp_path):
    """With EMA on, so the averaged weights (what is saved) must resume exactly too."""
    full, part = tmp_path / "full", tmp_path / "part"
    ema = ("--ema-decay", "0.5")
    assert main(_args("sd2-tiny", data, full, "dpo", 4, "--checkpoint-every", "2", *ema)) == 0
    assert main(_args("sd2-tiny", data, part, "dpo", 2, "--checkpoint-every", "2", *ema)) == 0
    assert main(_args("sd2-tiny", data, part, "dpo", 4, "--checkpoint-every", "2", "--resume", *ema)) == 0
    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "accuracy", "policy_err_w", "policy_err_l", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa = load_backbone("sd2-tiny", controlnet=full / "final" / "model.safetensors").controlnet.state_dict()
    wb = load_backbone("sd2-tiny", controlnet=part / "final" / "model.safetensors").controlnet.state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_winner_sft_reaches_the_gradient_not_the_first_loss(data, tmp_path):
    """--winner-sft λ adds λ·mean(w·(e_θ(w) − e_ref(w))): 0 at step 1 (policy = reference), so the first loss is
    the plain DPO loss, but its gradient on the winners' error is larger, so the first gradient norm differs."""
    plain, sft = tmp_path / "plain", tmp_path / "sft"
    assert main(_args("sd2-tiny", data, plain, "dpo", 1)) == 0
    assert main(_args("sd2-tiny", data, sft, "dpo", 1, "--winner-sft", "50")) == 0
    a, b = _metrics(plain)[0], _metrics(sft)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert abs(a["grad_norm"] - b["grad_norm"]) > 1e-3 * a["grad_norm"]
    assert main(_args("sd2-tiny", data, tmp_path / "bad", "dpo", 1, "--winner-sft", "-1")) == 2


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_gradient_checkpointing_and_bf16_autocast(backbone, data, tmp_path):
    """--gradient-checkpointing recomputes activations in the backward pass: the same losses and gradient norms
    as without it (float tolerance). --mixed-precision bf16 (CPU autocast) trains too, and at step 1 policy and
    reference still agree exactly (reward margin 0, ℓ = ln 2 per pair), starting from a ControlNet whose weights
    are not bf16-exact and whose norm weights are not 1, like a trained one. (A reference stored in bf16, or
    FLUX residuals of another dtype than the reference's, broke this: outputs differed by up to 0.016.)"""
    bb = load_backbone(backbone)
    g = torch.Generator().manual_seed(5)
    for p in bb.controlnet.parameters():
        p.data += 0.01 * torch.randn(p.shape, generator=g)
    start = tmp_path / "start.safetensors"
    save_release(bb.controlnet, start)
    runs = {}
    for name, extra in {"plain": (), "ckpt": ("--gradient-checkpointing",)}.items():
        assert main(_args(backbone, data, tmp_path / name, "dpo", 3, "--controlnet", str(start), *extra)) == 0
        runs[name] = _metrics(tmp_path / name)
    # accelerate fixes the precision once per process, so the bf16 run gets its own
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dp2osr",
            *_args(backbone, data, tmp_path / "bf16", "dpo", 3),
            "--controlnet",
            str(start),
            "--mixed-precision",
            "bf16",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    runs["bf16"] = _metrics(tmp_path / "bf16")
    for a, b in zip(runs["plain"], runs["ckpt"], strict=True):
        for key in ("loss", "grad_norm", "policy_err_w", "policy_err_l"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    assert runs["bf16"][0]["reward_margin"] == 0 and runs["bf16"][0]["accuracy"] == 0
    assert runs["bf16"][0]["loss"] == pytest.approx(runs["plain"][0]["loss"], rel=1e-6)
    for a, b in zip(runs["plain"], runs["bf16"], strict=True):
        assert np.isfinite(b["loss"]) and b["policy_err_w"] == pytest.approx(a["policy_err_w"], rel=0.05)


def test_8bit_adam(data, tmp_path, monkeypatch):
    """--use-8bit-adam: bitsandbytes' AdamW8bit (installed with pyiqa) trains on the CPU too; its state for the
    large tensors is uint8 (what saves memory), and the losses stay finite."""
    made = []
    real = trainer_mod._make_optimizer
    monkeypatch.setattr(trainer_mod, "_make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    out = tmp_path / "adam8"
    assert main(_args("sd2-tiny", data, out, "dpo", 3, "--use-8bit-adam")) == 0
    assert type(made[0]).__name__ == "AdamW8bit"
    dtypes = {v.dtype for st in made[0].state.values() for v in st.values() if torch.is_tensor(v)}
    assert torch.uint8 in dtypes
    m = _metrics(out)
    assert len(m) == 3 and all(np.isfinite(r["loss"]) for r in m) and m[0]["reward_margin"] == 0


def test_cache_accumulation_and_tensorboard(data, tmp_path, monkeypatch):
    """The stored inputs (OUTPUT/frozen/) change no number: --no-cache (VAE and text encoders every step) logs
    the same losses. With
    --grad-accum 2 the optimizer updates once per step over 2 micro-batches with different pairs, and the logs
    reach TensorBoard (OUTPUT/tb)."""
    cached, fresh = tmp_path / "cached", tmp_path / "fresh"
    assert main(_args("sd2-tiny", data, cached, "dpo", 2)) == 0
    assert main(_args("sd2-tiny", data, fresh, "dpo", 2, "--no-cache")) == 0
    for a, b in zip(_metrics(cached), _metrics(fresh), strict=True):
        for key in ("loss", "policy_err_w", "policy_err_l", "ref_err_w", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), (a["step"], key)
    assert list((cached / "tb").glob("events.out.tfevents.*"))
    assert (cached / "frozen" / "manifest.json").is_file() and not (fresh / "frozen").exists()

    updates, batches = [], []
    real_opt, real_idx = trainer_mod._make_optimizer, trainer_mod.batch_indices

    def counted_optimizer(params, cfg):
        opt = real_opt(params, cfg)
        opt.register_step_post_hook(lambda *_: updates.append(1))
        return opt

    monkeypatch.setattr(trainer_mod, "_make_optimizer", counted_optimizer)
    monkeypatch.setattr(trainer_mod, "batch_indices", lambda *a: batches.append(real_idx(*a)) or batches[-1])
    assert (
        main(_args("sd2-tiny", data, tmp_path / "accum", "dpo", 3, "--grad-accum", "2", "--batch-size", "1"))
        == 0
    )
    assert len(updates) == 3 and len(batches) == 6
    assert all(batches[2 * i] != batches[2 * i + 1] for i in range(3))
    assert len(_metrics(tmp_path / "accum")) == 3


def test_sft_mode_and_existing_output_guard(data, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(_args("sd2-tiny", data, out, "sft", 2, "--prompt-dropout", "0.5")) == 0
    m = _metrics(out)
    assert len(m) == 2 and all(np.isfinite(r["loss"]) for r in m) and "accuracy" not in m[0]
    assert main(_args("sd2-tiny", data, out, "sft", 2)) == 2  # refuses to mix runs without --resume
    assert "--resume" in capsys.readouterr().err


def test_lora_reference_is_adapter_disabled(data, tmp_path):
    pytest.importorskip("peft")
    # A "pretrained" ControlNet: a fresh one's zero convolutions would block every gradient to a LoRA.
    bb = load_backbone("sd2-tiny")
    g = torch.Generator().manual_seed(0)
    for p in bb.controlnet.parameters():
        if not p.any():
            p.data = torch.randn(p.shape, generator=g) * 0.02
    start = tmp_path / "start.safetensors"
    save_release(bb.controlnet, start)
    lora, full = tmp_path / "lora", tmp_path / "full"
    assert main(_args("sd2-tiny", data, lora, "dpo", 2, "--lora-rank", "4", "--controlnet", str(start))) == 0
    assert main(_args("sd2-tiny", data, full, "dpo", 2, "--controlnet", str(start))) == 0
    m, f = _metrics(lora), _metrics(full)
    # LoRA's B matrix starts at zero: policy == reference at step 1, as in full fine-tuning.
    assert m[0]["policy_err_w"] == pytest.approx(m[0]["ref_err_w"], abs=1e-7)
    # The adapter-disabled reference is the initial ControlNet: the same reference errors as the frozen copy
    # of the full run (same data, noise and timesteps), at every step, while the LoRA policy has moved.
    for a, b in zip(m, f):
        assert a["ref_err_w"] == pytest.approx(b["ref_err_w"], rel=1e-5)
        assert a["ref_err_l"] == pytest.approx(b["ref_err_l"], rel=1e-5)
    assert m[1]["policy_err_w"] != pytest.approx(m[1]["ref_err_w"], rel=1e-7, abs=0)
    base = load_backbone("sd2-tiny", controlnet=start).controlnet.state_dict()
    fused = load_backbone("sd2-tiny", controlnet=lora / "final" / "model.safetensors").controlnet.state_dict()
    assert set(base) == set(fused)  # the saved ControlNet is plain (adapter fused in), loadable without peft
    assert any(not torch.equal(base[k], fused[k]) for k in base)


def test_non_finite_loss_stops_without_checkpoint(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        objectives_mod, "mse_per_sample", lambda p, t: torch.full((p.shape[0],), float("nan"))
    )
    out = tmp_path / "nan"
    assert main(_args("sd2-tiny", data, out, "dpo", 2, "--checkpoint-every", "1")) == 3
    assert "non-finite loss" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_process_ddp_on_cpu(data, tmp_path):
    """DDP training with the held-out evaluation shared by the two processes: every held-out sample is made
    once, and the curve equals the one `dp2osr curve` computes in one process from the saved checkpoints."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out, curve = tmp_path / "ddp", tmp_path / "curve"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    sampling = ["--eval-samples", "3", "--eval-sample-steps", "3", "--eval-metrics", "fsim", "gmsd", "piqe"]
    res = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "dp2osr",
            *_args(
                "sd2-tiny",
                data,
                out,
                "dpo",
                2,
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                "0",
                "--eval-data",
                str(data),
                "--eval-every",
                "1",
                *sampling,
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        len([r for r in _metrics(out) if "loss" in r]) == 2
        and (out / "final" / "model.safetensors").is_file()
    )
    assert [r["step"] for r in _metrics(out) if "eval_reward" in r] == [0, 1, 2]
    for step in (0, 1, 2):
        pool = pd.read_parquet(out / "eval" / f"step_{step:06d}" / "candidates.parquet")
        assert len(pool) == 6 and not pool.duplicated(["image_id", "seed"]).any()
    expected = pd.read_csv(out / "eval" / "reward_curve.csv")
    args = [
        "-m",
        "dp2osr",
        "curve",
        "--run-dir",
        str(out),
        "--heldout",
        str(data),
        "--samples",
        "3",
        "--steps",
        "3",
        "--metrics",
        "fsim",
        "gmsd",
        "piqe",
    ]
    for launcher, folder in (
        ([sys.executable], curve),
        ([torchrun, "--nproc_per_node", "2", "--standalone"], tmp_path / "curve2"),
    ):
        res = subprocess.run(
            [*launcher, *args, "--output", str(folder)], env=env, capture_output=True, text=True, check=False
        )
        assert res.returncode == 0, res.stderr[-3000:]
        pd.testing.assert_frame_equal(
            pd.read_csv(folder / "reward_curve.csv"), expected, rtol=1e-5, atol=1e-6
        )


def test_heldout_reward_in_train_and_curve_command(data, tmp_path):
    """--eval-data: the held-out reward at step 0, every --eval-every steps and at the end, without changing
    the training itself; `dp2osr curve` over the saved checkpoints (reloaded from disk) gives the same curve as
    the evaluation of the live weights (same seeds, same step-0 bounds)."""
    plain, run, out = tmp_path / "plain", tmp_path / "run", tmp_path / "curve"
    sampling = ["--eval-samples", "2", "--eval-sample-steps", "4", "--eval-metrics", "fsim", "gmsd", "piqe"]
    assert main(_args("sd2-tiny", data, plain, "dpo", 3, "--checkpoint-every", "2")) == 0
    assert (
        main(
            _args(
                "sd2-tiny",
                data,
                run,
                "dpo",
                3,
                "--checkpoint-every",
                "2",
                "--keep-checkpoints",
                "0",
                "--eval-data",
                str(data),
                "--eval-every",
                "2",
                *sampling,
            )
        )
        == 0
    )
    rows = _metrics(run)
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    steps = [r for r in rows if "loss" in r]
    assert [r["loss"] for r in steps] == [
        r["loss"] for r in _metrics(plain)
    ]  # evaluation did not touch training
    assert all(r["eval_seconds"] > 0 for r in evals)  # timed apart from the training clock ("seconds")
    curve = pd.read_csv(run / "eval" / "reward_curve.csv")
    assert curve.step.tolist() == [0, 2, 3] and (run / "eval" / "reward_curve.png").stat().st_size > 1000
    assert curve.reward.tolist() == pytest.approx([r["eval_reward"] for r in evals], abs=1e-6)
    assert 0 <= curve.reward[0] <= 1 and curve.reward.nunique() == 3  # the weights changed what is sampled
    assert (curve.best >= curve.reward).all() and (curve.reward >= curve.worst).all()
    for step in (0, 2, 3):
        assert len(list((run / "eval" / f"step_{step:06d}").glob("*/seed_*.png"))) == 4  # 2 images x 2 seeds

    assert (
        main(
            [
                "curve",
                "--run-dir",
                str(run),
                "--heldout",
                str(data),
                "--output",
                str(out),
                "--samples",
                "2",
                "--steps",
                "4",
                "--metrics",
                "fsim",
                "gmsd",
                "piqe",
            ]
        )
        == 0
    )
    again = pd.read_csv(out / "reward_curve.csv")
    pd.testing.assert_frame_equal(again, curve, rtol=1e-4, atol=1e-5)
    assert (out / "reward_curve.png").is_file()

    # Interrupted after step 2 and resumed: the same curve, and no step evaluated twice.
    part = tmp_path / "part"
    args = ["--checkpoint-every", "2", "--eval-data", str(data), "--eval-every", "2", *sampling]
    assert main(_args("sd2-tiny", data, part, "dpo", 2, *args)) == 0
    assert main(_args("sd2-tiny", data, part, "dpo", 3, *args, "--resume")) == 0
    assert [r["step"] for r in _metrics(part) if "eval_reward" in r] == [0, 2, 3]
    pd.testing.assert_frame_equal(
        pd.read_csv(part / "eval" / "reward_curve.csv"), curve, rtol=1e-4, atol=1e-5
    )


def test_heldout_eval_bad_input(data, tmp_path, capsys):
    lr_only = tmp_path / "lr_only"
    shutil.copytree(data / "lr", lr_only)
    out = tmp_path / "run"
    args = _args(
        "sd2-tiny", data, out, "dpo", 1, "--eval-data", str(lr_only), "--eval-metrics", "fsim", "piqe"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(lr_only) in err and "without HR" in err
    assert not list(out.glob("checkpoint-*"))  # refused before training
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["curve", "--run-dir", str(empty), "--heldout", str(data)]) == 2
    assert "train_config.yaml" in capsys.readouterr().err


def test_resume_of_a_run_saved_before_an_option_existed(data, tmp_path, capsys):
    """A config saved without the eval_* options (an older dp2osr) resumes when they are at their defaults,
    and is refused when one of them is given a different value."""
    import yaml

    out = tmp_path / "old"
    assert main(_args("sd2-tiny", data, out, "dpo", 1)) == 0
    path = out / train_mod.CONFIG_NAME
    saved = yaml.safe_load(path.read_text())
    path.write_text(
        yaml.safe_dump({k: v for k, v in saved.items() if not k.startswith("eval_")}, sort_keys=False)
    )
    assert main(_args("sd2-tiny", data, out, "dpo", 2, "--resume", "--eval-samples", "5")) == 2
    assert "eval_samples" in capsys.readouterr().err
    assert main(_args("sd2-tiny", data, out, "dpo", 2, "--resume")) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2]


def _tb_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resumed_run_logs_every_step_once(data, tmp_path, monkeypatch):
    """Interrupted in step 4 (steps 3 and the eval of step 3 logged, checkpoint at 2) and resumed: metrics.jsonl
    and TensorBoard hold each training and eval step once, with the values of an uninterrupted run."""
    sampling = [
        "--eval-data",
        str(data),
        "--eval-every",
        "1",
        "--eval-samples",
        "1",
        "--eval-sample-steps",
        "1",
        "--eval-metrics",
        "gmsd",
        "piqe",
        "--checkpoint-every",
        "2",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args("sd2-tiny", data, full, "dpo", 4, *sampling)) == 0
    real_step = trainer_mod.optimizer_step

    def interrupted(run, cfg, s):
        if s == 3:
            raise KeyboardInterrupt
        return real_step(run, cfg, s)

    monkeypatch.setattr(trainer_mod, "optimizer_step", interrupted)
    assert main(_args("sd2-tiny", data, part, "dpo", 4, *sampling)) == 130
    assert [r["step"] for r in _metrics(part) if "loss" in r] == [1, 2, 3]
    monkeypatch.setattr(trainer_mod, "optimizer_step", real_step)
    assert main(_args("sd2-tiny", data, part, "dpo", 4, *sampling, "--resume")) == 0
    rows, ref = _metrics(part), _metrics(full)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 1, 2, 3, 4]
    for key in ("loss", "eval_reward"):
        got = [r[key] for r in rows if key in r]
        assert got == pytest.approx([r[key] for r in ref if key in r], rel=1e-5, abs=1e-7)
    assert _tb_steps(part / "tb", "train/loss") == [1, 2, 3, 4]
    assert _tb_steps(part / "tb", "eval/reward") == [0, 1, 2, 3, 4]


def test_batch_indices_slice_the_seeded_epoch_permutations():
    """Each index is position ``pos % n`` of epoch ``pos // n``'s seeded permutation (drawn once per epoch),
    and the (step, micro, rank) slices of one step are disjoint."""
    from dp2osr.engine.train_data import batch_indices

    n, seed, batch, accum, world = 7, 3, 3, 2, 2

    def perm(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()

    stream = [i for epoch in range(6) for i in perm(epoch)]
    for step in range(3):
        got = [
            batch_indices(n, step, micro, rank, batch, accum, world, seed)
            for micro in range(accum)
            for rank in range(world)
        ]
        start = step * batch * accum * world
        assert [i for part in got for i in part] == stream[start : start + batch * accum * world]


def test_report_to_trackers(data, tmp_path, capsys):
    """--report-to none writes metrics.jsonl only; wandb without its package is refused in one line naming
    `pip install wandb`, before any work; tensorboard (the default) gets every metrics.jsonl scalar."""
    import importlib.util

    none = tmp_path / "none"
    assert main(_args("sd2-tiny", data, none, "dpo", 1, "--report-to", "none")) == 0
    assert len(_metrics(none)) == 1 and not (none / "tb").exists()
    tb = tmp_path / "tb"
    assert main(_args("sd2-tiny", data, tb, "dpo", 2)) == 0
    for key in ("loss", "lr", "grad_norm", "seconds"):
        assert _tb_steps(tb / "tb", f"train/{key}") == [1, 2]
    if importlib.util.find_spec("wandb") is None:
        assert main(_args("sd2-tiny", data, tmp_path / "wb", "dpo", 1, "--report-to", "wandb")) == 2
        err = capsys.readouterr().err
        assert "pip install wandb" in err and not (tmp_path / "wb" / "metrics.jsonl").exists()


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """The history rows of an offline W&B run file, by step (keys without their ``train/``-style prefix).

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    records (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last),
    each a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, part, rows = 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(part)
        part = b""
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            rows[items["_step"]] = {k.split("/", 1)[1]: v for k, v in items.items() if "/" in k}
    return rows


def test_report_to_wandb_offline(data, tmp_path, monkeypatch):
    """W&B in offline mode (its local run file under OUTPUT/wandb) gets every metrics.jsonl scalar, step by
    step, as TensorBoard does."""
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    out = tmp_path / "wb"
    assert main(_args("sd2-tiny", data, out, "dpo", 2, "--report-to", "all")) == 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    expected = {row.pop("step"): row for row in _metrics(out)}
    assert sorted(history) == sorted(expected) == [1, 2]
    for step, row in expected.items():
        assert history[step].keys() == row.keys()
        assert history[step] == pytest.approx(row, rel=1e-12), step
