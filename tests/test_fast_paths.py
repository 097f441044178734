"""Sampling fast paths (Backbone.optimize, --channels-last / --fuse-qkv / --compile) against the plain path."""

import pytest
import torch

from dp2osr.backbones import load_backbone
from dp2osr.engine.options import SamplingOptions, load_model
from dp2osr.engine.provenance import options_sha
from dp2osr.engine.sampler import generate

SEEDS = [0, 1]


def _sample(name: str, **fast) -> tuple[torch.Tensor, object]:
    bb = load_backbone(name)
    bb.optimize(**fast)
    cond = bb.encode_prompts(["a sharp photo"], "blur" if bb.uses_negative_prompt else None)
    control = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    out = generate(bb, control, cond, SEEDS, steps=2, guidance=bb.default_guidance)
    return out, bb


@pytest.fixture(scope="module")
def plain():
    return {name: _sample(name)[0] for name in ("sd2-tiny", "flux-tiny")}


@pytest.mark.parametrize("name", ["sd2-tiny", "flux-tiny"])
def test_channels_last_matches_plain(plain, name):
    out, bb = _sample(name, channels_last=True)
    convs = [p for m in bb.fast_modules().values() for p in m.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    if name == "sd2-tiny":
        assert convs  # the UNet and ControlNet convolutions really changed layout
    # CPU convolutions in channels-last order sum in another order: equal to float rounding (measured 2e-6).
    torch.testing.assert_close(out, plain[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sd2-tiny", "flux-tiny"])
def test_fused_qkv_matches_plain(plain, name):
    out, bb = _sample(name, fuse_qkv=True)
    for module in bb.fast_modules().values():  # the denoiser and the ControlNet both fused
        fused = [m for m in module.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
        assert fused, type(module).__name__
    # One matmul over the concatenated weights: equal to float rounding (bit-equal at these sizes on CPU).
    torch.testing.assert_close(out, plain[name], rtol=0, atol=1e-5)


@pytest.mark.slow  # inductor compiles the UNet/transformer and the ControlNet: ~1 min each on one CPU core
@pytest.mark.parametrize("name", ["sd2-tiny", "flux-tiny"])
def test_compile_matches_plain(plain, name):
    out, bb = _sample(name, compile=True)
    assert all(m._compiled_call_impl is not None for m in bb.fast_modules().values())
    # Inductor fuses element-wise ops and may reorder sums: equal to float rounding (measured ~1e-6).
    torch.testing.assert_close(out, plain[name], rtol=0, atol=1e-4)


def test_optimize_keeps_state_dict_and_plain_controlnet():
    bb = load_backbone("sd2-tiny")
    before = {k: v.clone() for k, v in bb.controlnet.state_dict().items()}
    bb.optimize(fuse_qkv=True, channels_last=True)
    assert set(before) < set(bb.controlnet.state_dict())  # fusing adds to_qkv / to_kv
    plain = bb.plain_controlnet()  # what a checkpoint's release weights are loaded into
    state = plain.state_dict()
    assert set(state) == set(before)
    assert all(torch.equal(state[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="already optimized"):
        bb.optimize(compile=True)


def test_options_select_fast_paths_and_hash():
    plain = SamplingOptions(backbone="sd2-tiny", device="cpu")
    fast = SamplingOptions(backbone="sd2-tiny", device="cpu", fuse_qkv=True, channels_last=True)
    bb_plain, bb_fast = load_model(plain), load_model(fast)
    assert bb_plain.fast_paths == {}
    assert bb_fast.fast_paths == {"channels_last": True, "fuse_qkv": True, "compile": False}
    # Not bit-identical to the plain path, so a pool resumed with other fast paths is sampled again.
    sha_plain = options_sha(bb_plain, plain, 4, "m")
    assert sha_plain != options_sha(bb_fast, fast, 4, "m")
    # Off, they add nothing to the hash: pools sampled before the options existed stay current.
    from dp2osr.engine import provenance

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(provenance, "fast_paths", lambda opts: {})
        assert options_sha(bb_plain, plain, 4, "m") == sha_plain


def test_fuse_qkv_refused_where_nothing_supports_it(monkeypatch):
    bb = load_backbone("sd2-tiny")
    monkeypatch.setattr(bb, "fast_modules", lambda: {"text_encoder": bb.text_encoder})  # transformers' CLIP
    with pytest.raises(ValueError, match="--fuse-qkv: no part of sd2-tiny"):
        bb.optimize(fuse_qkv=True)


def test_checkpoint_controlnet_gets_fast_paths(tmp_path):
    """`curve` loads each checkpoint into a plain ControlNet, then applies the backbone's fast paths."""
    from dp2osr.backbones import save_release
    from dp2osr.engine.heldout import controlnet_from

    trained = load_backbone("sd2-tiny")
    with torch.no_grad():
        for p in trained.controlnet.parameters():
            p.add_(0.01)  # a "trained" checkpoint, unlike the backbone's own ControlNet
    save_release(trained.controlnet, tmp_path / "model.safetensors")
    bb = load_backbone("sd2-tiny").optimize(fuse_qkv=True)
    net = controlnet_from(bb, tmp_path / "model.safetensors")
    assert any(hasattr(m, "to_qkv") for m in net.modules())
    state, want = net.state_dict(), trained.controlnet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in want.items())
    fused = [m for m in net.modules() if hasattr(m, "to_qkv")][0]  # fused from the loaded weights
    torch.testing.assert_close(
        fused.to_qkv.weight, torch.cat([fused.to_q.weight, fused.to_k.weight, fused.to_v.weight])
    )
