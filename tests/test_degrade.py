"""Tests of ``dp2osr degrade``: kernels, the seeded degradation, cropping and the full command."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data

from dp2osr.cli import main
from dp2osr.degrade import (
    KERNEL_TYPES,
    PAIRS_COLUMNS,
    DegradationParams,
    DegradeConfig,
    ImageTooSmallError,
    crop,
    degrade_image,
    image_seed,
    random_kernel,
)
from dp2osr.math.kernels import bivariate_kernel, sinc_kernel


@pytest.fixture(autouse=True)
def one_thread():
    """The images here are tiny: intra-op threads only add overhead (a lot of it on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A 96x80 crop of scikit-image's astronaut photo, (1, 3, H, W) in [0, 1]."""
    arr = data.astronaut()[100:196, 150:230]
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def _write_photos(folder, sizes: dict[str, tuple[int, int]]) -> None:
    """Save astronaut crops of the given (width, height) as PNGs named ``NAME.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = data.astronaut()
    for i, (name, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(arr[40 * i : 40 * i + h, 60 * i : 60 * i + w]).save(folder / f"{name}.png")


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_random_kernels_are_normalised(kind):
    rng = np.random.default_rng(0)
    for size in (7, 13, 21):
        k = random_kernel(kind, size, rng, [0.2, 3.0])
        assert k.shape == (size, size) and k.dtype == torch.float32
        assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert (k >= 0).all()
        # Symmetric under a half turn (x -> -x) whatever the rotation.
        torch.testing.assert_close(k, k.flip(0, 1))


def test_sinc_kernel_is_normalised_and_radial():
    for size, omega in ((7, math.pi / 3), (21, math.pi / 5), (13, math.pi)):
        k = sinc_kernel(size, omega)
        assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(k, k.T)
        assert k[size // 2, size // 2] == k.max()


def test_anisotropic_kernel_is_wider_along_its_long_axis():
    k = bivariate_kernel(21, 4.0, 1.0, theta=0.0)
    assert k[10, 10 + 4] > k[10 + 4, 10]  # x (columns) is the long axis at theta = 0
    turned = bivariate_kernel(21, 4.0, 1.0, theta=math.pi / 2)
    torch.testing.assert_close(turned, k.T, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="kernel shape"):
        bivariate_kernel(7, 1.0, 1.0, 0.0, shape="box")


# ------------------------------------------------------------------------------------------ degradation


def test_degrade_image_is_seeded(photo):
    hr = photo[..., :64, :64]
    a = degrade_image(hr, 4, None, torch.Generator().manual_seed(7))
    b = degrade_image(hr, 4, None, torch.Generator().manual_seed(7))
    c = degrade_image(hr, 4, None, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degrade_image_sizes_range_and_8bit_levels(photo):
    for seed in range(6):
        lr = degrade_image(photo, 4, DegradationParams(), torch.Generator().manual_seed(seed))
        assert lr.shape == (1, 3, 24, 20) and lr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1
        torch.testing.assert_close(lr * 255, (lr * 255).round(), atol=1e-4, rtol=0)
    assert degrade_image(photo[..., :64, :64], 2, None, torch.Generator()).shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "override",
    [
        # every branch forced: sinc blur, Poisson gray noise, always-up / always-down resizes, no final sinc
        {"sinc_prob": 1.0, "sinc_prob2": 1.0, "gaussian_noise_prob": 0.0, "gaussian_noise_prob2": 0.0},
        {
            "gray_noise_prob": 1.0,
            "gray_noise_prob2": 1.0,
            "resize_prob": [1.0, 0.0, 0.0],
            "final_sinc_prob": 0.0,
        },
        {"resize_prob": [0.0, 1.0, 0.0], "resize_prob2": [0.0, 1.0, 0.0], "resize_range": [0.15, 0.15]},
        {"kernel_prob": [0, 0, 0, 0.5, 0, 0.5], "second_blur_prob": 1.0, "kernel_range": [21, 21]},
        {"kernel_prob": [0, 0, 1, 0, 0, 0], "betag_range": [0.5, 0.8], "resize_range": [1.2, 1.5]},
    ],
)
def test_degrade_image_every_branch(photo, override):
    params = DegradationParams(**override)
    for seed in range(3):
        lr = degrade_image(photo[..., :64, :64], 4, params, torch.Generator().manual_seed(seed))
        assert lr.shape == (1, 3, 16, 16) and torch.isfinite(lr).all()
        assert lr.min() >= 0 and lr.max() <= 1


def test_degradation_is_not_trivial(photo):
    """The LR differs from a plain bicubic downscale (blur/noise/JPEG did something) but keeps the content."""
    hr = photo[..., :64, :64]
    lr = degrade_image(hr, 4, None, torch.Generator().manual_seed(0))
    plain = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    assert (lr - plain).abs().mean() > 1e-3
    assert (lr.mean() - hr.mean()).abs() < 0.15


@pytest.mark.parametrize(
    "bad",
    [
        {"kernel_prob": [0.5, 0.5]},
        {"resize_prob": [0.5, 0.6, 0.1]},
        {"sinc_prob": 1.5},
        {"noise_range": [30.0, 1.0]},
        {"kernel_range": [8, 8]},
        {"jpeg_range": [30, 101]},
    ],
)
def test_params_are_validated(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        DegradationParams(**bad)


def test_config_checks_and_field_order(tmp_path):
    with pytest.raises(ValueError, match="multiple of scale"):
        DegradeConfig(input=tmp_path, output=tmp_path, hr_size=66, scale=4)
    with pytest.raises(ValueError, match="crop"):
        DegradeConfig(input=tmp_path, output=tmp_path, crop="corner")
    names = [f.name for f in dataclasses.fields(DegradeConfig)]
    assert names[:2] == ["input", "output"] and "jpeg_range2" in names
    assert all(f.metadata.get("help") for f in dataclasses.fields(DegradeConfig))


def test_crop(photo):
    centre = crop(photo, 64, "center")
    torch.testing.assert_close(centre, photo[..., 16:80, 8:72])
    a = crop(photo, 64, "random", np.random.default_rng(3))
    b = crop(photo, 64, "random", np.random.default_rng(3))
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    index = torch.arange(96 * 80).view(1, 1, 96, 80)  # each pixel holds its position
    corners = {int(crop(index, 64, "random", np.random.default_rng(s))[0, 0, 0, 0]) for s in range(20)}
    assert len(corners) > 5 and all(c // 80 <= 32 and c % 80 <= 16 for c in corners)
    with pytest.raises(ImageTooSmallError, match="80x96"):
        crop(photo, 128, "center")


def test_image_seed_is_stable():
    assert image_seed(0, "0001") == image_seed(0, "0001")
    assert image_seed(0, "0001") != image_seed(0, "0002")
    assert image_seed(5, "0001") == image_seed(0, "0001") + 5


# ------------------------------------------------------------------------------------------ the command


def test_command_writes_pairs_and_reruns_identically(tmp_path, capsys):
    src = tmp_path / "hr_photos"
    _write_photos(src, {"a": (80, 72), "b": (64, 96)})
    args = ["degrade", "--input", str(src), "--hr-size", "64"]
    assert main([*args, "--output", str(tmp_path / "out1")]) == 0
    assert main([*args, "--output", str(tmp_path / "out2")]) == 0

    out = tmp_path / "out1"
    for image_id in ("a", "b"):
        assert Image.open(out / "hr" / f"{image_id}.png").size == (64, 64)
        assert Image.open(out / "lr" / f"{image_id}.png").size == (16, 16)
    table = pd.read_parquet(out / "pairs.parquet")
    assert list(table.columns) == PAIRS_COLUMNS
    assert table["image_id"].tolist() == ["a", "b"]
    assert table["hr_path"].tolist() == ["hr/a.png", "hr/b.png"]
    assert table["lr_path"].tolist() == ["lr/a.png", "lr/b.png"]
    assert str(table["seed"].dtype) == "int64" and table["seed"].tolist() == [
        image_seed(0, "a"),
        image_seed(0, "b"),
    ]
    assert table["source"].tolist() == [str((src / "a.png").resolve()), str((src / "b.png").resolve())]
    assert (out / "degrade_config.yaml").is_file()
    assert _files(out) == _files(tmp_path / "out2")

    # Resume: a missing LR is remade identically; an existing pair is left alone.
    before = _files(out)
    (out / "lr" / "b.png").unlink()
    mtime = (out / "hr" / "a.png").stat().st_mtime_ns
    assert main([*args, "--output", str(out)]) == 0
    assert _files(out) == before
    assert (out / "hr" / "a.png").stat().st_mtime_ns == mtime
    assert "1 new, 1 kept" in capsys.readouterr().out


def test_pair_does_not_depend_on_other_files(tmp_path):
    _write_photos(tmp_path / "both", {"a": (80, 72), "b": (64, 96)})
    _write_photos(tmp_path / "one", {"a": (80, 72)})
    for name in ("both", "one"):
        assert (
            main(
                [
                    "degrade",
                    "--input",
                    str(tmp_path / name),
                    "--output",
                    str(tmp_path / f"o_{name}"),
                    "--hr-size",
                    "64",
                ]
            )
            == 0
        )
    assert _files(tmp_path / "o_both")["lr/a.png"] == _files(tmp_path / "o_one")["lr/a.png"]


def test_corrupt_and_small_images_are_reported_and_skipped(tmp_path, capsys):
    src = tmp_path / "hr_photos"
    _write_photos(src, {"a": (80, 72), "tiny": (40, 40)})
    (src / "x.png").write_bytes(np.random.default_rng(0).bytes(500))
    out = tmp_path / "out"
    assert (
        main(["degrade", "--input", str(src), "--output", str(out), "--hr-size", "64", "--crop", "center"])
        == 1
    )
    err = capsys.readouterr().err
    assert "x.png" in err and "tiny.png" in err and "skipped 2 of 3" in err
    assert (out / "lr" / "a.png").is_file() and not (out / "lr" / "x.png").exists()
    assert pd.read_parquet(out / "pairs.parquet")["image_id"].tolist() == ["a"]


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    src = tmp_path / "hr_photos"
    _write_photos(src, {"a": (64, 64)})
    args = ["degrade", "--input", str(src), "--output", str(tmp_path / "out"), "--hr-size", "64"]
    assert main(args) == 0
    assert main([*args, "--seed", "1"]) == 2
    assert "seed" in capsys.readouterr().err
    assert main([*args, "--seed", "1", "--overwrite"]) == 0


def test_single_file_input_and_device_choice(tmp_path):
    _write_photos(tmp_path, {"a": (64, 64)})
    out = tmp_path / "out"
    assert (
        main(
            [
                "degrade",
                "--input",
                str(tmp_path / "a.png"),
                "--output",
                str(out),
                "--hr-size",
                "64",
                "--device",
                "auto",
            ]
        )
        == 0
    )
    assert (out / "lr" / "a.png").is_file()
