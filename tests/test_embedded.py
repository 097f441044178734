"""The embedded default model: lossless stand-in autoencoder, save/load, upscale, release format, shipped weights."""

import json

import pytest
import torch

from dp2osr.backbones import embedded as emb
from dp2osr.backbones import load_backbone, save_release
from dp2osr.backbones.embedded import EmbeddedBackbone, ResidualSpaceToDepth, build_embedded
from dp2osr.images import load_image, save_image

SMALL = (48, 64)  # the smallest valid UNet: fast enough for tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bb = build_embedded(seed=3, widths=SMALL)
    path = tmp_path_factory.mktemp("embedded")
    bb.save_pretrained(path)
    return bb, path


def _same_prediction(a: EmbeddedBackbone, b: EmbeddedBackbone) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 48, 8, 8), generator=g)
    control = torch.rand((2, 3, 32, 32), generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        pa = a.predict(x, t, a.encode_prompts(["", "a cat"]), control)
        pb = b.predict(x, t, b.encode_prompts(["", "a cat"]), control)
    torch.testing.assert_close(pa, pb)


def test_stand_in_autoencoder_is_lossless():
    g = torch.Generator().manual_seed(0)
    x, c = torch.rand((2, 3, 32, 48), generator=g), torch.rand((2, 3, 32, 48), generator=g)
    ae = ResidualSpaceToDepth(4, 4.0)
    z = ae.encode(x, c)
    assert z.shape == (2, 48, 8, 12)
    torch.testing.assert_close(ae.decode(z, c), x, rtol=0, atol=1e-6)
    # through the backbone (which clamps to [0, 1]): the same, and the latent of the control itself is 0
    bb = build_embedded(seed=0, widths=SMALL)
    torch.testing.assert_close(bb.decode_latents(bb.encode_images(x, c), c), x, rtol=0, atol=1e-6)
    assert bb.encode_images(c, c).abs().max() == 0
    with pytest.raises(ValueError, match="control"):
        bb.encode_images(x)


def test_geometry_and_controlnet_embedder():
    bb = build_embedded(seed=0, widths=SMALL)
    assert (bb.latent_factor, bb.latent_channels, bb.pixel_multiple) == (4, 48, 4)
    assert len(bb.controlnet.config.conditioning_embedding_out_channels) == 3  # downsamples x4, like the AE
    assert bb.scheduler.config.prediction_type == "v_prediction"
    assert bb.default_guidance <= 1  # no CFG
    cond = bb.encode_prompts(["a", "b", "c"], negative_prompt="blur")
    assert list(cond) == ["prompt_embeds"] and cond["prompt_embeds"].shape[0] == 3
    with pytest.raises(ValueError, match="widths"):
        build_embedded(widths=(32, 64))


def test_saves_and_loads_through_load_backbone(saved):
    bb, path = saved
    meta = json.loads((path / "dp2osr.json").read_text())
    assert meta["backbone"] == "embedded" and meta["autoencoder"]["factor"] == 4
    loaded = load_backbone("embedded", base=path)
    assert isinstance(loaded, EmbeddedBackbone)
    assert loaded.default_process_size == bb.default_process_size
    _same_prediction(bb, loaded)
    with pytest.raises(ValueError, match="embedded"):
        load_backbone("sd2", base=path)  # a folder of another family


def test_release_format_controlnet(saved, tmp_path):
    _, path = saved
    trained = build_embedded(seed=7, widths=SMALL).controlnet  # different weights, same shapes
    save_release(trained, tmp_path / "model.safetensors")
    loaded = load_backbone("embedded", base=path, controlnet=tmp_path / "model.safetensors")
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(loaded.controlnet.state_dict()[k], v)
    other = build_embedded(seed=0, widths=(64, 96)).controlnet
    save_release(other, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="embedded model's ControlNet"):
        load_backbone("embedded", base=path, controlnet=tmp_path / "wrong.safetensors")


def test_upscale_cli_with_saved_model(saved, tmp_path):
    from dp2osr.cli import main

    _, path = saved
    g = torch.Generator().manual_seed(1)
    save_image(torch.rand((1, 3, 12, 20), generator=g), tmp_path / "in" / "photo.png")
    rc = main(
        [
            "upscale",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--backbone",
            "embedded",
            "--base",
            str(path),
            "--steps",
            "2",
            "--samples",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    a, b = (load_image(tmp_path / "out" / "photo" / f"seed_{s:04d}.png") for s in (0, 1))
    assert a.shape == (1, 3, 48, 80)
    assert not torch.equal(a, b)  # seed-dependent samples


def test_shipped_model_or_clear_error(tmp_path, monkeypatch):
    if (emb.SHIPPED / "dp2osr.json").is_file():
        bb = load_backbone("embedded")
        assert bb.kind == "embedded" and bb.name == "embedded"
    monkeypatch.setattr(emb, "SHIPPED", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="embedded model's weights are missing"):
        load_backbone("embedded")


def _ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    m = torch.tensor([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255
    return torch.einsum("ij,bjhw->bihw", m, rgb)


def test_luma_only_residual_keeps_the_base_colours_and_detail_scales_it():
    """luma_only: whatever the latents, Cb/Cr of the output equal the base's (BT.601 chroma rows sum to 0, so an
    equal R, G, B change moves only Y); the Y of the residual is kept exactly. detail scales the residual."""
    from dp2osr.backbones.embedded import gray

    g = torch.Generator().manual_seed(0)
    x, c = torch.rand((2, 3, 32, 32), generator=g), torch.rand((2, 3, 32, 32), generator=g)
    z = torch.randn((2, 48, 8, 8), generator=g)
    ae = ResidualSpaceToDepth(4, 10.0, luma_only=True)
    out = ae.decode(z, c)
    torch.testing.assert_close(_ycbcr(out)[:, 1:], _ycbcr(c)[:, 1:], rtol=0, atol=1e-5)
    # the encoded HR keeps exactly its luma residual: decode(encode(x)) has x's Y and c's Cb/Cr
    back = ae.decode(ae.encode(x, c), c)
    torch.testing.assert_close(_ycbcr(back)[:, 0], _ycbcr(x)[:, 0], rtol=0, atol=1e-5)
    half = ResidualSpaceToDepth(4, 10.0, luma_only=True, detail=0.5).decode(z, c)
    torch.testing.assert_close(half - c, 0.5 * (out - c), rtol=0, atol=1e-6)
    r = torch.randn((1, 3, 4, 4), generator=g)
    torch.testing.assert_close(gray(gray(r)), gray(r))  # a projection


def test_sharpener_base_round_trips_through_a_saved_folder(tmp_path):
    """A model whose autoencoder has a sharpener (non-zero weights) saves and loads to the same decode."""
    from dp2osr.backbones.embedded import Sharpener

    torch.manual_seed(0)
    sharpener = Sharpener(4, channels=16, blocks=2)
    with torch.no_grad():
        sharpener.tail.weight.normal_(0, 0.01)  # a fresh one is the identity (starts as bicubic)
    bb = build_embedded(seed=1, widths=SMALL)
    bb.vae = ResidualSpaceToDepth(4, 10.0, sharpener, luma_only=True, detail=0.7)
    bb.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "dp2osr.json").read_text())["autoencoder"]
    assert meta["sharpener"] == {"factor": 4, "channels": 16, "blocks": 2} and meta["detail"] == 0.7
    loaded = load_backbone("embedded", base=tmp_path)
    g = torch.Generator().manual_seed(2)
    z, c = torch.randn((1, 48, 8, 8), generator=g), torch.rand((1, 3, 32, 32), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_latents(z, c), bb.decode_latents(z, c))
        assert not torch.allclose(sharpener(c), c)  # the base is not bicubic: the sharpener is used
    (tmp_path / emb.SHARPENER_FILE).unlink()
    with pytest.raises(ValueError, match="sharpener"):
        load_backbone("embedded", base=tmp_path)


@pytest.mark.skipif(
    not (emb.SHIPPED / "dp2osr.json").is_file(), reason="the shipped embedded model is not installed"
)
def test_shipped_model_adds_no_colour_speckle():
    """The shipped model diffuses brightness detail only (luma_only) over a sharpened base: the chroma high-pass
    of its output stays near the bicubic's (the first model's speckle put it at about 15x), and its luma gains
    detail over the bicubic. 32 px LR crop of the bundled demo image, default steps, seed 0."""
    from dp2osr.engine.options import SamplingOptions, load_model, sampling_settings
    from dp2osr.engine.sampler import super_resolve
    from dp2osr.math.geometry import resize

    bb = load_model(SamplingOptions(device="cpu"))
    assert bb.vae.luma_only and bb.vae.sharpener is not None
    lr = load_image(emb.SHIPPED.parent / "astronaut_lr.png")[..., 40:72, 48:80]
    up = resize(lr, (128, 128))
    s = sampling_settings(bb, SamplingOptions(device="cpu"))
    with torch.no_grad():
        sr = super_resolve(
            bb,
            up,
            bb.encode_prompts([""]),
            [0],
            steps=s["steps"],
            guidance=s["guidance"],
            process_size=s["process_size"],
        )

    def highpass(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:-1, 1:-1] - torch.nn.functional.avg_pool2d(x, 3, stride=1)).std(dim=(-2, -1))

    ycc_sr, ycc_up = _ycbcr(sr), _ycbcr(up)
    assert highpass(ycc_sr[:, 1:]).mean() < 2 * highpass(ycc_up[:, 1:]).mean()
    assert highpass(ycc_sr[:, :1]).mean() > 1.2 * highpass(ycc_up[:, :1]).mean()
