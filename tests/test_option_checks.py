"""Every option checked before any work, the same way for flags and YAML (types from the config fields, finite
values and ranges), and no non-finite result saved as a finished output."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dp2osr.engine.jobs as jobs_mod
import dp2osr.engine.trainer as trainer_mod
import dp2osr.train as train_mod
import dp2osr.upscale as upscale_mod
from dp2osr.cli import build_parser, main
from dp2osr.config import build_config
from dp2osr.errors import TrainingDiverged
from dp2osr.quickstart import QuickstartConfig
from dp2osr.sample import SampleConfig
from dp2osr.score import ScoreConfig
from dp2osr.train import TrainConfig
from dp2osr.upscale import UpscaleConfig


def _png(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _config(command, cls, tmp_path, text, *flags):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    args = build_parser(command)[0].parse_args([command, "--config", str(path), *flags])
    return build_config(cls, args)


def _refused(capsys, argv) -> str:
    """The one-line error of a refused command (exit code 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ YAML types
@pytest.mark.parametrize(
    "text, key, allowed",
    [
        ('samples: "2"', "samples", "integer"),
        ("samples: 1.5", "samples", "integer"),
        ("samples: [4]", "samples", "integer"),
        ('seed: "7"', "seed", "integer"),
        ("samples: null", "samples", "integer"),
        ("dtype: fp64", "dtype", "bf16"),
        ('overwrite: "false"', "overwrite", "true or false"),
        ("overwrite: 0", "overwrite", "true or false"),
        ("tile_overlap: half", "tile_overlap", "number"),
        ("prompt: 12", "prompt", "string"),
        ("input: 5", "input", "path"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, monkeypatch, text, key, allowed):
    monkeypatch.chdir(tmp_path)
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(text + "\n")
    err = _refused(capsys, ["upscale", str(_png(tmp_path / "x.png", 12, 12)), "--config", str(yaml_file)])
    value = text.split(": ", 1)[1].strip('"')
    assert str(yaml_file) in err and key in err and value in err and allowed in err, err
    assert not (tmp_path / "upscaled").exists()


def test_yaml_train_steps_null_and_nested_stage_values(tmp_path, capsys):
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("steps: null\n")
    err = _refused(
        capsys, ["train", "--mode", "dpo", "--data", "d", "--output", "o", "--config", str(yaml_file)]
    )
    assert str(yaml_file) in err and "steps" in err and "null" in err and "integer" in err
    # a stage's options nested in the quickstart's YAML get the same checks, named with the stage
    for text, key in (
        ('train:\n  steps: "5"\n', "train.steps"),
        ("sample:\n  samples: 2.5\n", "sample.samples"),
    ):
        yaml_file.write_text(text)
        err = _refused(capsys, ["quickstart", "--output", str(tmp_path / "q"), "--config", str(yaml_file)])
        assert str(yaml_file) in err and key in err and "integer" in err
    yaml_file.write_text("train:\n  gradient_checkpointing: 'yes'\n")
    err = _refused(capsys, ["quickstart", "--output", str(tmp_path / "q"), "--config", str(yaml_file)])
    assert "train.gradient_checkpointing" in err and "true or false" in err
    assert not (tmp_path / "q").exists()


def test_broken_yaml_files_name_the_file(tmp_path, capsys):
    png = str(_png(tmp_path / "x.png", 12, 12))
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("samples: [1, 2\nseed: 3\n")
    assert str(syntax) in _refused(capsys, ["upscale", png, "--config", str(syntax)])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert str(binary) in _refused(capsys, ["upscale", png, "--config", str(binary)])
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"samples: 2\x00\x01\n")
    assert str(nul) in _refused(capsys, ["upscale", png, "--config", str(nul)])


def test_yaml_values_that_are_right_are_read_as_the_fields_types(tmp_path):
    # a single string where a list is expected is a one-element list (not its characters)
    cfg = _config("score", ScoreConfig, tmp_path, "candidates: pool\nmetrics: fsim\n")
    assert cfg.metrics == ["fsim"]
    # YAML 1.1 reads 2e-5 (no dot) as a string; a number field reads it as the number it is
    cfg = _config("upscale", UpscaleConfig, tmp_path, "input: x.png\nguidance: 2e0\ntile_overlap: 0\n")
    assert cfg.guidance == 2.0 and isinstance(cfg.tile_overlap, float)
    cfg = _config("train", TrainConfig, tmp_path, "mode: dpo\ndata: d\noutput: o\nlr: 2e-5\nbeta: 250\n")
    assert cfg.lr == 2e-5 and cfg.beta == 250.0 and isinstance(cfg.beta, float)
    cfg = _config("upscale", UpscaleConfig, tmp_path, "input: x.png\nsteps: null\noverwrite: true\n")
    assert cfg.steps is None and cfg.overwrite is True
    # flags still override the YAML
    cfg = _config("upscale", UpscaleConfig, tmp_path, "input: x.png\nsamples: 3\n", "--samples", "2")
    assert cfg.samples == 2


# ------------------------------------------------------------------------------------ finite values, ranges
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--guidance", "inf"),
        ("--guidance", "1e30"),
        ("--guidance", "nan"),
        ("--guidance", "-5"),
        ("--steps", "-1"),
        ("--steps", "0"),
        ("--seed", "-1"),
        ("--samples", str(10**12)),
        ("--tile-overlap", "nan"),
    ],
)
def test_sampling_options_out_of_range(tmp_path, capsys, flag, value):
    err = _refused(
        capsys,
        ["upscale", str(_png(tmp_path / "x.png", 12, 12)), "--output", str(tmp_path / "o"), flag, value],
    )
    assert flag in err and value in err.replace("1e+30", "1e30").replace("1000000000000", str(10**12))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--beta", "inf"),
        ("--beta", "nan"),
        ("--max-grad-norm", "nan"),
        ("--max-grad-norm", "-1"),
        ("--max-grad-norm", "0"),
        ("--lora-rank", "-3"),
        ("--seed", "-1"),
        ("--winner-sft", "nan"),
        ("--weight-decay", "inf"),
        ("--warmup-steps", "-1"),
        ("--eval-samples", "0"),
    ],
)
def test_training_options_out_of_range(tmp_path, capsys, flag, value):
    argv = ["train", "--mode", "dpo", "--data", str(tmp_path), "--output", str(tmp_path / "o"), flag, value]
    err = _refused(capsys, argv)
    assert flag in err and value in err, err
    assert not (tmp_path / "o").exists()


def test_sample_and_quickstart_seeds_and_counts(tmp_path, capsys):
    with pytest.raises(ValueError, match="--seed"):
        SampleConfig(input=tmp_path, output=tmp_path / "o", seed=-1)
    with pytest.raises(ValueError, match="--samples"):
        SampleConfig(input=tmp_path, output=tmp_path / "o", samples=10**12)
    err = _refused(capsys, ["quickstart", "--output", str(tmp_path / "q"), "--eval-samples", "0"])
    assert "--eval-samples" in err and "--sample.samples" not in err
    err = _refused(capsys, ["quickstart", "--output", str(tmp_path / "q"), "--seed", "-1"])
    assert "--seed" in err
    assert not (tmp_path / "q").exists()
    assert QuickstartConfig().train.eval_samples == 4  # defaults unchanged


def test_working_size_is_guarded_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(upscale_mod, "load_model", no_model)
    err = _refused(
        capsys,
        [
            "upscale",
            str(_png(tmp_path / "x.png", 12, 12)),
            "--output",
            str(tmp_path / "o"),
            "--backbone",
            "sd2-tiny",
            "--process-size",
            "100000",
        ],
    )
    assert "x.png" in err and "--max-pixels" in err and "100000x100000" in err and "GiB" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------- non-finite results
def test_non_finite_samples_are_not_written(tmp_path, capsys, monkeypatch):
    real = jobs_mod.super_resolve

    def broken(bb, lr_up, cond, seeds, **kw):
        out = real(bb, lr_up, cond, seeds, **kw)
        out[list(seeds).index(1)] = float("nan")  # seed 1 of every image diverges
        return out

    monkeypatch.setattr(jobs_mod, "super_resolve", broken)
    inp = tmp_path / "in"
    _png(inp / "x.png", 12, 12)
    out = tmp_path / "o"
    argv = [
        "upscale",
        str(inp),
        "--output",
        str(out),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "1",
        "--samples",
        "2",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "x" in err and "seed 1" in err and "non-finite" in err
    assert not (out / "x" / "seed_0001.png").exists()


def _sft_data(root):
    rows = []
    for i, name in enumerate(["a", "b"]):
        _png(root / "lr" / f"{name}.png", 16, 16, i)
        _png(root / "hr" / f"{name}.png", 64, 64, 10 + i)
        rows.append((name, f"hr/{name}.png", f"lr/{name}.png", "", i))
    pd.DataFrame(rows, columns=["image_id", "hr_path", "lr_path", "source", "seed"]).to_parquet(
        root / "pairs.parquet"
    )
    return root


def test_non_finite_weights_are_not_saved(tmp_path, capsys, monkeypatch):
    real = trainer_mod.optimizer_step

    def diverging(run, cfg, s):
        sums = real(run, cfg, s)
        if s == 1:  # the weights after step 2 are NaN, with a finite loss and gradient
            with torch.no_grad():
                run.params[0].fill_(float("nan"))
        return sums

    monkeypatch.setattr(trainer_mod, "optimizer_step", diverging)
    data, out = _sft_data(tmp_path / "data"), tmp_path / "run"
    argv = [
        "train",
        "--mode",
        "sft",
        "--data",
        str(data),
        "--output",
        str(out),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "1",
    ]
    assert main(argv) == TrainingDiverged.exit_code
    err = capsys.readouterr().err
    assert "step 2" in err and "non-finite" in err and "checkpoint-000001" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001"]
    assert not (out / "final").exists()


def test_check_is_cheap_and_exact():
    assert trainer_mod.all_finite([torch.zeros(3), torch.ones(2, 2)])
    assert not trainer_mod.all_finite([torch.zeros(3), torch.tensor([1.0, math.inf])])
    assert not trainer_mod.all_finite([torch.tensor([math.nan], dtype=torch.bfloat16)])
    assert trainer_mod.all_finite([torch.tensor([1, 2])])  # integer buffers are always finite


def test_defaults_are_unchanged():
    """The checks refuse only what was broken: every default config still builds."""
    for cfg in (QuickstartConfig(), UpscaleConfig(input="x"), TrainConfig(mode="dpo", data="d", output="o")):
        assert dataclasses.asdict(cfg)
    assert train_mod.TrainConfig(mode="sft", data="d", output="o", lora_rank=0, max_grad_norm=1.0).seed == 0
