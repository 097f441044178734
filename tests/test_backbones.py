"""Backbones: tiny models round-trip through the real loaders; the release format loads strictly."""

import pytest
import torch
from safetensors.torch import save_file

from dp2osr.backbones import load_backbone, save_release
from dp2osr.backbones.loading import load_controlnet


@pytest.fixture(scope="module", params=["sd2-tiny", "flux-tiny"])
def saved(request, tmp_path_factory):
    bb = load_backbone(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    bb.save_pretrained(folder)
    save_release(bb.controlnet, folder / "release" / "model.safetensors")
    return request.param, bb, folder


def _outputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 32, 48, generator=g)
    z = bb.encode_images(x)
    cond = bb.encode_prompts(["a red house", "a cat"], bb.default_negative_prompt or None)
    t = bb.set_timesteps(3, z.shape[-2:])[:1].expand(2)
    return bb.predict(z, t, cond, bb.prepare_control(x), guidance=bb.default_guidance)


def test_saved_tiny_model_loads_through_real_loader_with_same_outputs(saved):
    name, bb, folder = saved
    family = name.removesuffix("-tiny")
    loaded = load_backbone(family, base=folder)  # the same code path as a real SD2 / FLUX folder
    assert loaded.kind == bb.kind and loaded.default_process_size == bb.default_process_size
    torch.testing.assert_close(_outputs(loaded), _outputs(bb))


def test_release_format_and_folder_controlnets_are_equivalent(saved):
    name, bb, folder = saved
    family = name.removesuffix("-tiny")
    a = load_backbone(family, base=folder, controlnet=folder / "release" / "model.safetensors")
    b = load_backbone(family, base=folder, controlnet=folder / "controlnet")
    for (ka, va), (kb, vb) in zip(a.controlnet.state_dict().items(), b.controlnet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_mismatched_release_file_names_file_and_keys(saved, tmp_path):
    name, bb, folder = saved
    state = dict(bb.controlnet.state_dict())
    dropped = sorted(state)[0]
    del state[dropped]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(ValueError) as err:
        load_backbone(name.removesuffix("-tiny"), base=folder, controlnet=bad)
    msg = str(err.value)
    assert str(bad) in msg and "missing" in msg and "unexpected" in msg and dropped in msg


def test_corrupt_release_file_is_reported(saved, tmp_path):
    name, _, folder = saved
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_backbone(name.removesuffix("-tiny"), base=folder, controlnet=bad)


def test_missing_base_model_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers layout"):
        load_backbone("sd2", base=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--base"):
        load_backbone("flux")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing subfolder"):
        load_backbone("sd2", base=tmp_path / "empty")


def test_family_mismatch_is_an_error(saved):
    name, _, folder = saved
    other = "flux" if name.startswith("sd2") else "sd2"
    with pytest.raises(ValueError, match="holds a"):
        load_backbone(other, base=folder)


def test_training_targets():
    """SD2 epsilon target is the noise; FLUX flow target is ε − x0 with x_σ = (1−σ)x0 + σε."""
    sd = load_backbone("sd2-tiny")
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    noisy, target = sd.noisy_and_target(x0, eps, t)
    assert torch.equal(target, eps)
    a = sd.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    # v-prediction (taken from the scheduler config, as the embedded model uses): v = √ᾱ·ε − √(1−ᾱ)·x0
    sd.scheduler.register_to_config(prediction_type="v_prediction")
    noisy_v, target_v = sd.noisy_and_target(x0, eps, t)
    torch.testing.assert_close(noisy_v, noisy)
    torch.testing.assert_close(target_v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    sd.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        sd.noisy_and_target(x0, eps, t)
    fx = load_backbone("flux-tiny")
    sig = fx.sample_timesteps(4, (8, 8), torch.Generator().manual_seed(0))
    assert ((sig > 0) & (sig < 1000)).all()
    t = torch.tensor([250.0, 750.0])
    noisy, target = fx.noisy_and_target(x0, eps, t)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(noisy[1], 0.25 * x0[1] + 0.75 * eps[1])


@pytest.mark.parametrize("latent_hw", [(8, 8), (12, 20), (9, 7)])
def test_sd2_shared_trunk_equals_the_whole_unet_forward(latent_hw):
    """DPO computes the UNet's down and mid blocks once for the policy and the reference pass
    (``Backbone.trunk``) and finishes each pass with its own ControlNet's residuals; the result must be the
    plain ``unet(...)`` output, bit for bit, for two different ControlNets, and for latent sizes that are not
    a multiple of the UNet's upsampling factor (9×7). The ControlNets' zero-initialised output convolutions
    are randomised first, so that the residuals are not all zero. FLUX has no such trunk."""
    bb = load_backbone("sd2-tiny")
    other = bb.new_controlnet()
    g = torch.Generator().manual_seed(3)
    for net in (bb.controlnet, other):
        for name, p in net.named_parameters():
            if "controlnet_" in name and "cond_embedding" not in name:
                p.data = torch.randn(p.shape, generator=g) * 0.5
    z = torch.randn(3, bb.latent_channels, *latent_hw, generator=g)
    t = torch.tensor([5, 400, 950])
    cond = bb.encode_prompts(["a", "b", "c"])
    f = bb.latent_factor
    control = bb.prepare_control(torch.rand(3, 3, latent_hw[0] * f, latent_hw[1] * f, generator=g))
    trunk = bb.trunk(z, t, cond)
    assert trunk is not None and not trunk["mid"].requires_grad
    outputs = []
    for net in (bb.controlnet, other):
        whole = bb.predict(z, t, cond, control, controlnet=net)
        split = bb.predict(z, t, cond, control, controlnet=net, trunk=trunk)
        assert torch.equal(split, whole)
        outputs.append(whole)
    assert not torch.allclose(outputs[0], outputs[1])  # the residuals matter: a test that can fail
    grads = []
    for shared in (None, trunk):  # the ControlNet's gradient is the same through either path
        bb.controlnet.zero_grad()
        bb.predict(z, t, cond, control, trunk=shared).square().mean().backward()
        grads.append([p.grad.clone() for p in bb.controlnet.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads[0])
    fx = load_backbone("flux-tiny")
    assert fx.trunk(z, t, cond) is None


@pytest.mark.slow
def test_real_size_sd2_controlnet_release_roundtrip(tmp_path):
    """The SD2-base UNet architecture (866M, random weights) -> ControlNet -> model.safetensors -> loader."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    assert sum(p.numel() for p in unet.parameters()) > 800e6
    net = ControlNetModel.from_unet(unet)
    path = tmp_path / "model.safetensors"
    save_release(net, path)
    expected = net.state_dict()
    first = next(iter(expected))
    del net
    loaded = load_controlnet("sd2", path, unet, torch.float32)  # strict: raises on any missing/unexpected key
    got = loaded.state_dict()
    assert set(got) == set(expected)
    assert torch.equal(got[first], expected[first])
