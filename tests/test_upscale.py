"""`dp2osr upscale` end to end on the tiny SD2 and FLUX backbones."""

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from dp2osr.backbones import load_backbone
from dp2osr.cli import main
from dp2osr.engine.sampler import generate, super_resolve
from dp2osr.images import load_image
from dp2osr.prompts import make_prompt_fn


def _png(path, h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), "L").save(path)
    elif mode == "RGBA":
        Image.fromarray((rng.random((h, w, 4)) * 255).astype(np.uint8), "RGBA").save(path)
    else:
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_upscale_non_square_and_tiled(backbone, tmp_path):
    """A 12x20 LR (x4 -> 48x80: short side below the 64 px process size, upsized and resized back) and a
    24x40 LR (-> 96x160: larger than the process size, so latents are tiled) keep their aspect ratio."""
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "small.png", 12, 20)
    _png(inp / "wide.png", 24, 40, seed=1)
    out = tmp_path / "out"
    rc = main(
        [
            "upscale",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--backbone",
            backbone,
            "--samples",
            "2",
            "--steps",
            "2",
            "--seed",
            "5",
        ]
    )
    assert rc == 0
    for name, size in (("small", (80, 48)), ("wide", (160, 96))):
        files = sorted(p.name for p in (out / name).glob("*.png"))
        assert files == ["seed_0005.png", "seed_0006.png"]
        a, b = (np.asarray(Image.open(out / name / f)) for f in files)
        assert Image.open(out / name / files[0]).size == size
        assert not np.array_equal(a, b)  # different seeds, different samples
    assert (out / "upscale_config.yaml").is_file()


def test_tiling_is_used_only_above_the_threshold(monkeypatch):
    """One call over the image up to the tiling threshold (default: twice the process size), tiles of the
    process size above it, and one call whatever the size with threshold 0."""
    bb = load_backbone("sd2-tiny")
    calls = []
    orig = bb.predict

    def spy(latents, *a, **k):
        calls.append(tuple(latents.shape[-2:]))
        return orig(latents, *a, **k)

    monkeypatch.setattr(bb, "predict", spy)
    cond = bb.encode_prompts([""], bb.default_negative_prompt)
    super_resolve(bb, torch.rand(1, 3, 64, 64), cond, [0], steps=1, guidance=3.5, process_size=64)
    assert calls == [(8, 8)]
    calls.clear()
    super_resolve(bb, torch.rand(1, 3, 64, 128), cond, [0], steps=1, guidance=3.5, process_size=64)
    assert calls == [(8, 16)]  # 128 px: not above 2 x 64
    calls.clear()
    super_resolve(bb, torch.rand(1, 3, 64, 192), cond, [0], steps=1, guidance=3.5, process_size=64)
    assert calls and all(c == (8, 8) for c in calls) and len(calls) >= 3  # 8x24 latents in 8x8 tiles
    calls.clear()
    lr = torch.rand(1, 3, 64, 192)
    super_resolve(bb, lr, cond, [0], steps=1, guidance=3.5, process_size=64, tile_threshold=0)
    assert calls == [(8, 24)]


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_same_seed_same_output_whatever_the_batch(backbone):
    """Seed 7 alone, and seed 7 inside a batch of three (at another position), give the same image."""
    bb = load_backbone(backbone)
    control = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(["a house"], bb.default_negative_prompt or None)
    alone = generate(bb, control, cond, [7], steps=3, guidance=bb.default_guidance)
    batch = generate(bb, control, cond, [3, 7, 9], steps=3, guidance=bb.default_guidance)
    torch.testing.assert_close(batch[1:2], alone, atol=2e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-3


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_noise_device_model_draws_on_the_models_device(backbone, monkeypatch):
    """--noise-device model seeds each sample's generator on the model's device (a GPU run then draws what a
    generator seeded there draws); on a CPU model that is the CPU, so the output equals the default's."""
    import dp2osr.engine.sampler as sampler

    bb = load_backbone(backbone)
    devices = []
    real = sampler.sample_generators
    monkeypatch.setattr(
        sampler,
        "sample_generators",
        lambda seeds, device="cpu": devices.append(device) or real(seeds, device),
    )
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(["a house"], bb.default_negative_prompt or None)
    kw = dict(steps=2, guidance=bb.default_guidance)
    cpu = generate(bb, control, cond, [5], **kw)
    model = generate(bb, control, cond, [5], noise_device="model", **kw)
    assert devices == ["cpu", bb.device]
    assert torch.equal(cpu, model)


def test_batch_size_does_not_change_files(tmp_path):
    inp = _png(tmp_path / "x.png", 16, 16)
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        assert (
            main(
                [
                    "upscale",
                    "--input",
                    str(inp),
                    "--output",
                    str(out),
                    "--backbone",
                    "sd2-tiny",
                    "--samples",
                    "3",
                    "--steps",
                    "2",
                    "--batch-size",
                    str(bs),
                ]
            )
            == 0
        )
        outs.append([np.asarray(Image.open(out / "x" / f"seed_{k:04d}.png")).astype(int) for k in range(3)])
    for a, b in zip(*outs):
        assert np.abs(a - b).max() <= 1  # float rounding may move a pixel by one 8-bit level at most


def test_bad_inputs_reported_and_others_done(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "corrupt.png").write_bytes(b"\x89PNG garbage")
    _png(inp / "tiny.png", 4, 4)
    _png(inp / "gray.png", 12, 12, "L")
    _png(inp / "alpha.png", 12, 12, "RGBA")
    _png(inp / "deep.png", 12, 12, "I;16")
    out = tmp_path / "out"
    rc = main(
        ["upscale", "--input", str(inp), "--output", str(out), "--backbone", "sd2-tiny", "--steps", "1"]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "corrupt.png" in err and "tiny.png" in err and "smallest supported side" in err
    for name in ("gray", "alpha", "deep"):
        im = Image.open(out / name / "seed_0000.png")
        assert im.mode == "RGB" and im.size == (48, 48)
    assert "3 done, 2 failed" in err


def test_resume_skips_finished_files(tmp_path):
    inp = _png(tmp_path / "x.png", 12, 12)
    out = tmp_path / "out"
    args = [
        "upscale",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "1",
        "--samples",
        "2",
        "--batch-size",
        "1",
    ]
    assert main(args) == 0
    target = out / "x" / "seed_0001.png"
    before = target.stat().st_mtime_ns
    redo = out / "x" / "seed_0000.png"
    content = redo.read_bytes()
    redo.unlink()
    assert main(args) == 0
    assert target.stat().st_mtime_ns == before  # finished batches are not redone
    assert redo.read_bytes() == content  # the missing one is redone identically


def test_user_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["upscale", "--input", str(tmp_path / "nope.png"), "--output", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["upscale", "--input", str(tmp_path), "--output", str(tmp_path), "--samples", "0"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_load_image_converts_modes(tmp_path):
    for mode in ("L", "RGBA", "I;16"):
        x = load_image(_png(tmp_path / f"{mode.replace(';', '')}.png", 5, 7, mode))
        assert x.shape == (1, 3, 5, 7) and 0 <= x.min() and x.max() <= 1


def test_prompt_sources(tmp_path, monkeypatch):
    img = _png(tmp_path / "p.png", 8, 8)
    assert make_prompt_fn("none")(img, None) == ""
    assert make_prompt_fn("text", "a cat")(img, None) == "a cat"
    (tmp_path / "p.txt").write_text("tree, sky\n")
    assert make_prompt_fn("sidecar")(img, None) == "tree, sky"
    with pytest.raises(FileNotFoundError, match="--ram-path"):
        make_prompt_fn("ram")
    # A stand-in for the optional `ram` package: the provider turns its '|' tags into the prompt string.
    ram_pkg = types.ModuleType("ram")
    models = types.ModuleType("ram.models")
    ram_lora = types.ModuleType("ram.models.ram_lora")

    class FakeRAM(torch.nn.Module):
        def load_state_dict(self, state, strict=True):
            return None

    ram_lora.ram = lambda **kw: FakeRAM()
    ram_pkg.inference_ram = lambda x, model: ("building | sky | tree", "")
    for name, mod in (("ram", ram_pkg), ("ram.models", models), ("ram.models.ram_lora", ram_lora)):
        monkeypatch.setitem(sys.modules, name, mod)
    ckpt = tmp_path / "w.pth"
    torch.save({"model": {}}, ckpt)
    tag = make_prompt_fn("ram", ram_path=ckpt, dape_path=ckpt)
    assert tag(img, torch.rand(1, 3, 8, 8)) == "building, sky, tree"


def test_tagger_weights_load_strictly_with_the_ram_renaming(tmp_path):
    """RAM's ``vision_multi`` keys load into ``tagging_head``, the rebuilt buffers may be absent, a later
    checkpoint (DAPE) overrides; a key missing from both or unknown to the model is an error naming it."""
    from dp2osr.prompts import load_tagger_weights

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tagging_head = torch.nn.Linear(2, 2)
            self.lora = torch.nn.Linear(2, 1, bias=False)
            self.register_buffer("relative_position_index", torch.arange(3))

    src = Tagger()
    ram = {"model": {k.replace("tagging_head", "vision_multi"): v + 1 for k, v in src.state_dict().items()}}
    ram["model"]["relative_position_index"] = torch.zeros(3, dtype=torch.long)
    torch.save(ram, tmp_path / "ram.pth")
    torch.save({"lora.weight": torch.full((1, 2), 7.0)}, tmp_path / "dape.pth")
    model = Tagger()
    load_tagger_weights(model, [tmp_path / "ram.pth", tmp_path / "dape.pth"])
    torch.testing.assert_close(model.tagging_head.weight, src.tagging_head.weight + 1)
    assert model.lora.weight.eq(7).all() and model.relative_position_index.tolist() == [0, 1, 2]
    torch.save(
        {"model": {"tagging_head.weight": torch.zeros(2, 2), "extra.w": torch.zeros(1)}}, tmp_path / "b.pth"
    )
    with pytest.raises(
        ValueError, match=r"missing keys: lora.weight, tagging_head.bias.*unexpected keys: extra.w"
    ):
        load_tagger_weights(Tagger(), [tmp_path / "b.pth"])


def test_bare_input_and_embedded_default(tmp_path, monkeypatch, capsys):
    """`dp2osr upscale photo.png` uses the shipped embedded model and writes upscaled/NAME/seed_0000.png."""
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "photo.png", 12, 12)
    assert main(["upscale", "photo.png", "--steps", "2"]) == 0
    assert "embedded default model" in capsys.readouterr().err
    im = Image.open(tmp_path / "upscaled" / "photo" / "seed_0000.png")
    assert im.size == (48, 48)


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_tile_batch_denoises_tiles_together_with_the_same_result(backbone, monkeypatch):
    """An image tiled into 2 x 3 latent tiles, 2 seeds: tile_batch 4 makes calls of 4 and 2 tiles (x 2 seeds)
    instead of six calls of 2, and the images equal those of one tile at a time (float rounding aside)."""
    bb = load_backbone(backbone)
    control = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(["a house"], bb.default_negative_prompt or None)
    batches = []
    orig = bb.predict

    def spy(latents, *a, **k):
        batches.append(latents.shape[0])
        return orig(latents, *a, **k)

    monkeypatch.setattr(bb, "predict", spy)
    kw = {"steps": 2, "guidance": bb.default_guidance, "process_size": 64, "tile_threshold": 64}
    one = super_resolve(bb, control, cond, [3, 4], **kw, tile_batch=1)
    assert batches == [2] * 12  # 6 tiles x 2 steps, one tile (with both seeds) per call
    batches.clear()
    four = super_resolve(bb, control, cond, [3, 4], **kw, tile_batch=4)
    assert batches == [8, 4] * 2
    # 8-bit outputs (rounded, colour-fixed, truncated): float noise of the batched maths moves a pixel by a level,
    # rarely by a few where the rounding and the truncation both flip
    levels = ((four - one).abs() * 255).round()
    assert levels.max() <= 3 and (levels > 1).float().mean() < 1e-3


def test_upscale_records_resolved_config_once_per_run(tmp_path):
    """upscale_config.yaml holds the values used (backbone defaults filled in), and every run into one folder
    is on record in upscale_runs.jsonl with the input it was given."""
    import json

    import yaml

    inp = tmp_path / "in"
    inp.mkdir()
    first, second = _png(inp / "a.png", 12, 12), _png(inp / "b.png", 12, 12, seed=1)
    out = tmp_path / "out"
    for image in (first, second):
        assert (
            main(["upscale", str(image), "--output", str(out), "--backbone", "sd2-tiny", "--device", "cpu"])
            == 0
        )
    cfg = yaml.safe_load((out / "upscale_config.yaml").read_text())
    bb = load_backbone("sd2-tiny")
    assert (cfg["steps"], cfg["process_size"]) == (bb.default_steps, bb.default_process_size)
    assert (cfg["guidance"], cfg["negative_prompt"]) == (bb.default_guidance, bb.default_negative_prompt)
    assert (cfg["dtype"], cfg["device"], cfg["input"]) == ("fp32", "cpu", str(second))
    runs = [json.loads(line) for line in (out / "upscale_runs.jsonl").read_text().splitlines()]
    assert [r["input"] for r in runs] == [str(first), str(second)]
    assert all(r["steps"] == bb.default_steps and r["images_done"] == 1 for r in runs)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a/seed_0000.png",
        "b/seed_0000.png",
    ]


def test_flat_layout_in_a_fresh_process_prints_no_third_party_warnings(tmp_path):
    """`python -m dp2osr upscale --layout flat` writes OUTPUT/NAME.png; FLUX (diffusers' FluxPosEmbed) and the
    bitsandbytes import (its kernels notice) print nothing on stdout/stderr besides dp2osr's own lines."""
    import os
    import subprocess
    from pathlib import Path

    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "a.png", 12, 12)
    _png(inp / "b.png", 12, 16, seed=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    cmd = [
        sys.executable,
        "-m",
        "dp2osr",
        "upscale",
        str(inp),
        "--output",
        str(out),
        "--backbone",
        "flux-tiny",
        "--steps",
        "2",
        "--layout",
        "flat",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    assert Image.open(out / "b.png").size == (64, 48)
    text = proc.stdout + proc.stderr
    for noise in ("kernels", "gemm_4bit", "FluxPosEmbed", "FutureWarning", "Warning:"):
        assert noise not in text, text
    assert main(["upscale", str(inp), "--output", str(out), "--layout", "flat", "--samples", "2"]) == 2


def test_select_nr_writes_the_best_scoring_seed(tmp_path):
    """`--select nr` on 12 px LRs (48 px outputs, so the default selector is PIQE, lower = better): NAME.png is
    the seed whose PIQE, recomputed here, is lowest, and NAME/scores.csv lists every seed and the choice."""
    import pandas as pd

    from dp2osr import metrics

    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "a.png", 12, 12)
    _png(inp / "b.png", 12, 16, seed=1)
    out = tmp_path / "out"
    args = [
        "upscale",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "2",
        "--samples",
        "3",
        "--seed",
        "7",
        "--select",
        "nr",
    ]
    assert main(args) == 0
    piqe = metrics.create("piqe")
    for name in ("a", "b"):
        table = pd.read_csv(out / name / "scores.csv")
        assert list(table["seed"]) == [7, 8, 9] and list(table["file"]) == [
            f"seed_{s:04d}.png" for s in (7, 8, 9)
        ]
        values = [float(metrics.score_batch(piqe, load_image(out / name / f))[0]) for f in table["file"]]
        np.testing.assert_allclose(table["piqe"], values, rtol=1e-5)
        best = table["file"][int(np.argmin(values))]
        assert table.loc[table["chosen"], "file"].tolist() == [best]
        assert (out / f"{name}.png").read_bytes() == (out / name / best).read_bytes()
        assert len(set(values)) == 3  # distinct samples: the choice is not a tie-break


def test_select_nr_several_metrics_and_bad_metric(tmp_path, capsys):
    """Two selecting metrics are min-max normalised over the seeds and averaged (checked by hand); a
    full-reference selector is refused before any work."""
    import pandas as pd

    from dp2osr.upscale import choose

    scores = pd.DataFrame(
        [
            ("x", s, m, v)
            for s, m, v in [
                (0, "piqe", 10.0),
                (1, "piqe", 30.0),
                (2, "piqe", 20.0),
                (0, "brisque", 50.0),
                (1, "brisque", 10.0),
                (2, "brisque", 20.0),
            ]
        ],
        columns=["image_id", "seed", "metric", "value"],
    )
    table = choose(scores)
    # lower is better for both: piqe n = (30 - v) / 20 -> 1, 0, .5; brisque n = (50 - v) / 40 -> 0, 1, .75
    np.testing.assert_allclose(table["reward"], [0.5, 0.5, 0.625])
    assert table["chosen"].tolist() == [False, False, True]
    tie = choose(scores[scores.seed < 2])  # seeds 0 and 1 tie at 0.5: the lower seed wins
    assert tie["chosen"].tolist() == [True, False]
    img = _png(tmp_path / "x.png", 12, 12)
    args = [
        "upscale",
        "--input",
        str(img),
        "--output",
        str(tmp_path / "o"),
        "--select",
        "nr",
        "--select-metrics",
        "psnr",
    ]
    assert main(args) == 2
    assert "--select-metrics must be no-reference" in capsys.readouterr().err
