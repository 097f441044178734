"""`dp2osr upscale` gives the released scripts' pixels: compared with the stock diffusers pipelines they run
(StableDiffusionControlNetPipeline, FluxControlNetPipeline), called the way the scripts call them — PIL bicubic
resizing of the 8-bit input (short side up to process size / scale when smaller, x scale, down to a multiple
of 8), one torch.Generator seeded with the seed, the pipeline's 8-bit output colour-fixed (AdaIN) against its
control image at the processing size, truncated to 8 bits and resized back with PIL — on tiny SD2-base- and
FLUX.1-dev-shaped folders with a release-format ControlNet (one model.safetensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dp2osr.backbones import load_backbone, save_release
from dp2osr.upscale import UpscaleConfig, run

PROCESS_SIZE, STEPS, SEED, PROMPT = 128, 3, 0, "a house by a lake"
# (LR height, width) by scale: square and non-square, x4 and x1. All but x4's square are brought up to the
# process size and resized back; x4's 19x25 runs at 168x128, no multiple of FLUX's 16 (its pipeline shrinks it).
CASES = {4: {"square": (32, 32), "wide": (19, 25)}, 1: {"square": (40, 40), "wide": (75, 100)}}


def _lr(path, h, w, seed):
    rng = np.random.default_rng(seed)
    smooth = rng.random((h // 4 + 2, w // 4 + 2, 3)) * 255
    img = Image.fromarray(smooth.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255)
    Image.fromarray(noisy.astype(np.uint8)).save(path)


def _adain_8bit(image: Image.Image, reference: Image.Image) -> Image.Image:
    """AdaIN of an 8-bit image against an 8-bit reference (per-channel mean and std), truncated to 8 bits."""

    def tensor(im):
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255

    x, ref = tensor(image), tensor(reference)

    def stats(t):
        flat = t.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + 1e-5).sqrt()[..., None, None]

    (mx, sx), (mr, sr) = stats(x), stats(ref)
    out = ((x - mx) / sx * sr + mr).clamp(0, 1)
    return Image.fromarray(out.mul(255).byte()[0].permute(1, 2, 0).numpy())


def _release_like(pipe, path, upscale: int, seed: int, **call) -> np.ndarray:
    """One input through a stock pipeline as the released test scripts run it."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short = PROCESS_SIZE // upscale
    brought_up = width < short or height < short
    if brought_up:
        scale = short / min(width, height)
        image = image.resize((int(scale * width), int(scale * height)), Image.BICUBIC)
    image = image.resize((image.size[0] * upscale, image.size[1] * upscale), Image.BICUBIC)
    image = image.resize((image.size[0] // 8 * 8, image.size[1] // 8 * 8), Image.BICUBIC)
    generator = torch.Generator("cpu").manual_seed(seed)
    image_arg = call.pop("image_arg")
    out = pipe(
        prompt=PROMPT,
        height=image.size[1],
        width=image.size[0],
        num_inference_steps=STEPS,
        generator=generator,
        **{image_arg: image},
        **call,
    ).images[0]
    out = _adain_8bit(out, image)
    if brought_up:
        out = out.resize((width * upscale, height * upscale), Image.BICUBIC)
    return np.asarray(out)


def _sd2_pipeline(folder, release):
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDPMScheduler,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    controlnet = ControlNetModel.from_unet(unet)
    controlnet.load_state_dict(load_file(str(release)), strict=True)
    pipe = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        controlnet=controlnet,
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    call = {"guidance_scale": 3.5, "negative_prompt": "dotted, noise, blur, lowres, smooth"}
    return pipe, {**call, "image_arg": "image"}


def _flux_pipeline(folder, release):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxControlNetPipeline,
        FluxTransformer2DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    cfg = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=4,
        num_single_layers=0,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
    )
    controlnet.load_state_dict(load_file(str(release)), strict=True)
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        transformer=transformer,
        controlnet=controlnet,
    )
    # the tiny T5 tokenizer's length stands in for FLUX.1-dev's 512 (which both sides use there)
    call = {"guidance_scale": 2.5, "max_sequence_length": 32, "controlnet_conditioning_scale": 1.0}
    return pipe, {**call, "image_arg": "control_image"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd2", "flux"])
def test_upscale_gives_the_release_pixels(family, tmp_path):
    bb = load_backbone(f"{family}-tiny")
    folder, release = tmp_path / "base", tmp_path / "release" / "model.safetensors"
    bb.save_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():  # a ControlNet whose zero convolutions are not zero, so the control matters
        for p in bb.controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_release(bb.controlnet, release)
    pipe, call = (_sd2_pipeline if family == "sd2" else _flux_pipeline)(folder, release)
    pipe.set_progress_bar_config(disable=True)
    for upscale, cases in CASES.items():
        inputs = tmp_path / f"in_x{upscale}"
        inputs.mkdir()
        for k, (name, (h, w)) in enumerate(cases.items()):
            _lr(inputs / f"{name}.png", h, w, seed=k)
        out = tmp_path / f"out_x{upscale}"
        run(
            UpscaleConfig(
                input=inputs,
                output=out,
                backbone=family,
                base=folder,
                controlnet=release,
                upscale=upscale,
                steps=STEPS,
                seed=SEED,
                process_size=PROCESS_SIZE,
                prompt_source="text",
                prompt=PROMPT,
                layout="flat",
                dtype="fp32",
                device="cpu",
            )
        )
        for path in sorted(inputs.glob("*.png")):
            want = _release_like(pipe, path, upscale, SEED, **call)
            got = np.asarray(Image.open(out / path.name))
            assert got.shape == want.shape, (path.name, upscale)
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.max() <= 2, (family, path.name, upscale, diff.max(), (diff > 0).mean())
            assert (diff > 0).mean() < 0.01, (family, path.name, upscale, (diff > 0).mean())
    other_seed = _release_like(pipe, path, upscale, SEED + 1, **call)  # the comparison sees the noise
    assert np.abs(got.astype(int) - other_seed.astype(int)).max() > 2
