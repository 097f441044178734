"""Reliability: images read as viewers show them, safe weight loading, output permissions, escaped Markdown,
and the minimum input size."""

import os
import pathlib
import pickle
import re
import stat

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dp2osr import metrics
from dp2osr.cli import main
from dp2osr.degrade import DegradeConfig
from dp2osr.errors import PartialFailure
from dp2osr.evaluate import EvalConfig
from dp2osr.evaluate import run as evaluate
from dp2osr.images import (
    MIN_LR_SIDE,
    ImageReadError,
    _int_full_scale,
    check_min_side,
    load_image,
    save_image,
    write_parquet,
)
from dp2osr.mdtext import md_escape
from dp2osr.metrics.loading import load_clipiqa_prompts


def _hwc(path) -> np.ndarray:
    return load_image(path)[0].permute(1, 2, 0).numpy()


def _blocks(h=16, w=24) -> np.ndarray:
    """An asymmetric uint8 RGB image of 8x8 blocks (survives JPEG well)."""
    rng = np.random.default_rng(0)
    small = (rng.random((h // 8, w // 8, 3)) > 0.5).astype(np.uint8) * 255
    return np.kron(small, np.ones((8, 8, 1), np.uint8))


# ----------------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_6_reads_rotated(tmp_path, fmt):
    arr = _blocks()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer rotates it 90° clockwise
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    got = _hwc(path)
    want = np.rot90(arr, k=-1).astype(np.float32) / 255
    assert got.shape == want.shape == (24, 16, 3)
    tol = 0 if fmt == "PNG" else 0.05
    assert np.abs(got - want).mean() <= tol


# ---------------------------------------------------------------------------------------------- 16 bit
def test_dark_16bit_png_scaled_by_bit_depth(tmp_path):
    a16 = np.arange(256, dtype=np.uint16).reshape(16, 16)  # max 255 of 65535: almost black
    Image.fromarray(a16).save(tmp_path / "dark16.png")
    a8 = np.round(a16 / 257).astype(np.uint8)  # the same picture in 8 bits: 0 or 1
    Image.fromarray(a8).save(tmp_path / "dark8.png")
    got16, got8 = _hwc(tmp_path / "dark16.png"), _hwc(tmp_path / "dark8.png")
    np.testing.assert_allclose(got16[..., 0], a16 / 65535, atol=1e-7)
    assert np.abs(got16 - got8).max() <= 0.5 / 255 + 1e-6
    assert got16.max() < 0.005


def test_16bit_mid_tones_equal_8bit(tmp_path):
    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "mid16.png")
    Image.fromarray(a8).save(tmp_path / "mid8.png")
    np.testing.assert_allclose(_hwc(tmp_path / "mid16.png"), _hwc(tmp_path / "mid8.png"), atol=1e-6)


def test_integer_full_scale_from_file_rawmode():
    assert _int_full_scale("I;16B") == _int_full_scale("I;16") == 65535
    assert _int_full_scale("I;32S") == _int_full_scale("I") == 2**31 - 1
    assert _int_full_scale("I;32") == 2**32 - 1


# ------------------------------------------------------------------------------------ modes and alpha
def test_alpha_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [255, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.round(_hwc(tmp_path / "rgba.png") * 255)
    np.testing.assert_array_equal(got[0, 0], [255, 255, 255])  # transparent red -> white
    np.testing.assert_array_equal(got[0, 1], [0, 0, 255])
    assert got[0, 2, 0] == 255 and abs(got[0, 2, 1] - 127) <= 1 and got[0, 2, 1] == got[0, 2, 2]

    la = np.array([[[0, 0], [0, 255], [200, 255]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = np.round(_hwc(tmp_path / "la.png") * 255)
    np.testing.assert_array_equal(got[0], [[255, 255, 255], [0, 0, 0], [200, 200, 200]])


def test_palette_with_transparency_grayscale_and_cmyk(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (253 * 3))
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "pal.png")
    pal.save(tmp_path / "pal_t.png", transparency=2)  # index 2 (black) is transparent
    np.testing.assert_array_equal(
        np.round(_hwc(tmp_path / "pal.png") * 255)[0], [[10, 20, 30], [200, 100, 50], [0, 0, 0]]
    )
    np.testing.assert_array_equal(np.round(_hwc(tmp_path / "pal_t.png") * 255)[0, 2], [255, 255, 255])

    Image.fromarray(np.array([[0, 77, 255]], np.uint8), "L").save(tmp_path / "gray.png")
    got = _hwc(tmp_path / "gray.png")
    assert got.shape == (1, 3, 3)
    np.testing.assert_array_equal(np.round(got * 255), [[[0] * 3, [77] * 3, [255] * 3]])

    cmyk = np.array([[[0, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(
        np.round(_hwc(tmp_path / "cmyk.tif") * 255)[0], [[255, 255, 255], [255, 0, 0], [0, 0, 0]]
    )


# ------------------------------------------------------------------------------------- weight loading
class _Payload:
    """Unpickling this touches ``marker``: the stand-in for code hidden in a weight file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_payload_really_runs_under_full_unpickling(tmp_path):
    control = tmp_path / "control_marker"
    torch.save({"params": _Payload(control)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert control.exists()  # so the tests below would see a run payload


@pytest.mark.parametrize(
    "name, filename",
    [("topiq_nr", "cfanet_nr_koniq_res50-9a73138b.pth"), ("musiq", "musiq_koniq_ckpt-e95806b9.pth")],
)
def test_malicious_weight_file_refused_unrun(tmp_path, monkeypatch, name, filename):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty_hub"))
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"params": _Payload(marker)}, weights / filename)
    with pytest.raises(ValueError, match=re.escape(filename)):
        metrics.create(name, "cpu", weights_dir=weights)
    assert not marker.exists()
    assert torch.load is not None and torch.load.__module__.startswith("torch")  # restored


def test_clipiqa_prompts_loaded_weights_only(tmp_path):
    prompts = torch.randn(16, 512)
    torch.save(prompts, tmp_path / "prompts.pth")
    net = torch.nn.Module()
    net.prompt_learner = torch.nn.Module()
    net.prompt_learner.ctx = torch.nn.Parameter(torch.zeros(16, 512))
    load_clipiqa_prompts(tmp_path / "prompts.pth")(net)
    assert torch.equal(net.prompt_learner.ctx.data, prompts)

    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        load_clipiqa_prompts(tmp_path / "evil.pth")(net)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_image(torch.rand(3, 8, 8), tmp_path / "out" / "a.png")
        write_parquet(pd.DataFrame({"a": [1, 2]}), tmp_path / "out" / "t.parquet")
    finally:
        os.umask(old)
    for name in ("a.png", "t.parquet"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == mode, name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "t.parquet"]  # no temp left


# --------------------------------------------------------------------------------------------- markdown
EVIL = "<script>x</script>|a"


def _cells(line: str) -> list[str]:
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_md_escape():
    assert md_escape(EVIL) == "&lt;script&gt;x&lt;/script&gt;\\|a"
    assert md_escape("a_b*c`d[e](f)~g\\h\nnext & more") == "a\\_b\\*c\\`d\\[e\\](f)\\~g\\\\h next &amp; more"


def test_markdown_outputs_escape_names(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    for folder, name in (("sr", "im.png"), ("hr", "im.png"), ("sr", "x<b>y|z.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / folder / name)
    out = tmp_path / "out"
    cfg = EvalConfig(output=out, sr=[tmp_path / "sr"], names=[EVIL], hr=tmp_path / "hr", metrics=["none"])
    with pytest.raises(PartialFailure):  # the SR file without HR is a problem
        evaluate(cfg)
    text = (out / "eval_summary.md").read_text()
    assert "<script>" not in text and "<b>" not in text
    assert md_escape(EVIL) in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(_cells(line)) for line in table}) == 1

    rows = [
        {"image_id": "im0", "seed": s, "path": f"im0/seed_{s:04d}.png", "reward": 0.1 * s} for s in range(2)
    ]
    (tmp_path / "pool").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "pool" / "rewards.parquet")
    evaluate(EvalConfig(output=out, pools=[tmp_path / "pool"], pool_names=[EVIL]))
    text = (out / "bestm.md").read_text()
    assert "<script>" not in text and md_escape(EVIL) in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(_cells(line)) for line in table[:4]}) == 1


# ------------------------------------------------------------------------------------------ minimum size
def test_check_min_side_names_file_and_size():
    check_min_side(torch.zeros(1, 3, MIN_LR_SIDE, 40), "ok.png")
    with pytest.raises(
        ImageReadError, match=r"small\.png: image is 3x5; the smallest supported side is 8 px"
    ):
        check_min_side(torch.zeros(1, 3, 5, 3), "small.png")


def test_sample_rejects_tiny_inputs_by_name(tmp_path, capsys):
    folder = tmp_path / "lr"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.zeros((5, 3, 3), np.uint8)).save(folder / "tiny.png")  # 3 wide, 5 high
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "dot.png")
    out = tmp_path / "pool"
    rc = main(
        [
            "sample",
            "--input",
            str(folder),
            "--output",
            str(out),
            "--backbone",
            "sd2-tiny",
            "--steps",
            "1",
            "--samples",
            "1",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "tiny.png: image is 3x5; the smallest supported side is 8 px" in err
    assert "dot.png: image is 1x1" in err
    assert list(pd.read_parquet(out / "candidates.parquet").image_id.unique()) == ["good"]


def test_degrade_refuses_lr_below_minimum(tmp_path):
    with pytest.raises(ValueError, match=r"--hr-size 16 / --scale 4 gives 4 px LR images.*8 px"):
        DegradeConfig(input=tmp_path, output=tmp_path, hr_size=16, scale=4)
    DegradeConfig(input=tmp_path, output=tmp_path, hr_size=32, scale=4)


# ---------------------------------------------------------------------------------------------- output paths
@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: output paths must be refused before."""
    import dp2osr.engine.options as options_mod
    import dp2osr.engine.trainer as trainer_mod

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(options_mod, "load_backbone", refuse)
    monkeypatch.setattr(trainer_mod, "load_backbone", refuse)


@pytest.fixture
def inputs(tmp_path):
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(lr / "x.png")
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "candidates.parquet").write_bytes(b"")
    (tmp_path / "r.parquet").write_bytes(b"")
    return tmp_path


def _unwritable(tmp_path) -> pathlib.Path:
    """A folder this process cannot write in (a read-only mode for users; /sys for root, which ignores modes)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = pathlib.Path("/sys")
    try:
        (folder / "dp2osr_probe").touch()
    except OSError:
        return folder
    pytest.skip("no unwritable folder available")


# command -> (arguments besides the output, whether the output is a file)
STAGE_ARGS = {
    "upscale": (lambda d: ["--input", str(d / "lr"), "--backbone", "sd2-tiny"], False),
    "sample": (lambda d: ["--input", str(d / "lr"), "--backbone", "sd2-tiny"], False),
    "degrade": (lambda d: ["--input", str(d / "lr"), "--hr-size", "64"], False),
    "train": (lambda d: ["--mode", "dpo", "--data", str(d / "r.parquet"), "--backbone", "sd2-tiny"], False),
    "curve": (lambda d: ["--run-dir", str(d / "run"), "--heldout", str(d / "lr")], False),
    "quickstart": (lambda d: [], False),
    "eval": (lambda d: ["--pools", str(d / "pool")], False),
    "score": (lambda d: ["--candidates", str(d / "pool"), "--metrics", "psnr"], False),
    "report": (lambda d: ["--eval-dirs", str(d / "pool")], True),
    "pair": (lambda d: ["--rewards", str(d / "r.parquet")], True),
}


@pytest.mark.parametrize("command", list(STAGE_ARGS))
def test_output_that_is_a_file_is_refused_first(command, inputs, no_model, capsys):
    args, is_file = STAGE_ARGS[command]
    taken = inputs / "taken"
    taken.write_text("not yours")
    # a folder output given as a file; a file output whose folder is a file
    output = taken / "out.html" if is_file else taken
    assert main([command, *args(inputs), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(taken) in err and "file" in err
    assert taken.read_text() == "not yours"


@pytest.mark.parametrize("command", list(STAGE_ARGS))
def test_output_in_unwritable_folder_is_refused_first(command, inputs, no_model, tmp_path, capsys):
    args, is_file = STAGE_ARGS[command]
    output = _unwritable(tmp_path) / ("out.parquet" if is_file else "out")
    assert main([command, *args(inputs), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err and str(output) in err


def test_file_output_that_is_a_folder_is_refused(inputs, capsys):
    folder = inputs / "a_folder.parquet"
    folder.mkdir()
    assert main(["pair", "--rewards", str(inputs / "r.parquet"), "--output", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_pair_does_not_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    rewards = tmp_path / "rewards.parquet"
    pd.DataFrame(
        {
            "image_id": ["a"] * 4,
            "seed": [0, 1, 2, 3],
            "path": [f"a/seed_{s:04d}.png" for s in range(4)],
            "reward": [0.9, 0.1, 0.5, 0.3],
            "lr_path": ["lr/a.png"] * 4,
        }
    ).to_parquet(rewards)
    mine = tmp_path / "existing.txt"
    mine.write_text("my notes")
    args = ["pair", "--rewards", str(rewards), "--output", str(mine), "--n", "1"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and mine.read_text() == "my notes"
    assert main([*args, "--overwrite"]) == 0
    assert len(pd.read_parquet(mine)) == 1
    assert main(args) == 0  # its own table: replaced on a rerun without --overwrite


# ------------------------------------------------------------------------------------------- large inputs
def test_large_input_refused_with_estimate_before_model_loads(tmp_path, no_model, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 4000), (80, 90, 100)).save(big)
    assert main(["upscale", str(big), "--output", str(tmp_path / "out"), "--backbone", "sd2-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "big.png" in err
    assert (
        "24000x16000" in err and "GiB peak memory" in err and "latent tiles" in err and "s on this CPU" in err
    )
    assert "--max-pixels 0" in err
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.new("RGB", (48, 32), (80, 90, 100)).save(lr / "x.png")
    args = [
        "sample",
        "--input",
        str(lr),
        "--output",
        str(tmp_path / "pool"),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "1",
        "--samples",
        "1",
    ]
    assert main([*args, "--max-pixels", str(192 * 128 - 1)]) == 2
    assert "192x128" in capsys.readouterr().err
    assert not (tmp_path / "pool").exists()


def test_max_pixels_zero_lifts_the_limit(tmp_path, capsys):
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.new("RGB", (48, 32), (80, 90, 100)).save(lr / "x.png")
    args = [
        "sample",
        "--input",
        str(lr),
        "--output",
        str(tmp_path / "pool"),
        "--backbone",
        "sd2-tiny",
        "--steps",
        "1",
        "--samples",
        "1",
        "--max-pixels",
        "0",
    ]
    assert main(args) == 0
    assert "largest image x.png: output 192x128" in capsys.readouterr().err  # tiled: its estimate is shown


@pytest.mark.parametrize("name", ["embedded", "sd2-tiny", "flux-tiny"])
def test_size_traits_match_the_loaded_model(name):
    from dp2osr.backbones import load_backbone, size_traits

    bb, t = load_backbone(name), size_traits(name)
    assert (t.latent_factor, t.latent_channels, t.pixel_multiple, t.process_size, t.steps) == (
        bb.latent_factor,
        bb.latent_channels,
        bb.pixel_multiple,
        bb.default_process_size,
        bb.default_steps,
    )


@pytest.mark.parametrize(
    "name, lr_hw", [("sd2-tiny", (12, 20)), ("flux-tiny", (20, 12)), ("sd2-tiny", (8, 8))]
)
def test_tile_plan_is_what_the_sampler_runs(name, lr_hw):
    """The estimate's tile count is the number of denoiser calls per step (tile batch 1), and progress moves
    after every tile, summing to the steps."""
    from dp2osr.backbones import load_backbone
    from dp2osr.engine.budget import estimate
    from dp2osr.engine.sampler import super_resolve

    bb = load_backbone(name)
    calls, ticks = [], []
    real = bb.predict
    bb.predict = lambda *a, **k: calls.append(1) or real(*a, **k)
    super_resolve(
        bb,
        torch.rand(1, 3, *lr_hw),
        bb.encode_prompts([""], None),
        [0],
        steps=2,
        guidance=1.0,
        process_size=bb.default_process_size,
        upscale=4,
        tile_threshold=bb.default_process_size,  # tiled, as the estimate is asked below
        progress=ticks.append,
    )
    est = estimate(
        lr_hw, name, upscale=4, samples=1, batch_size=1, tile_batch=1, tile_threshold=bb.default_process_size
    )
    assert len(calls) == 2 * est.tiles and est.out_hw == (lr_hw[0] * 4, lr_hw[1] * 4)
    assert len(ticks) == 2 * est.tiles and sum(ticks) == pytest.approx(2)
