"""The sampler every stage shares: seeded, batched over seeds, tiled in latent space for large images.

Sample k of a batch has its own CPU generator seeded with ``seed_k``, drawn from in the order of the diffusers
pipelines the released scripts run (StableDiffusionControlNetPipeline, FluxControlNetPipeline) with one
generator: FLUX's control latent sampled from the VAE posterior, the initial latents, then every stochastic
scheduler step's noise. So an (image, seed) gives the same output whatever the batch size, device count or
order, and the release's output for that seed. The input geometry and the post-processing are the release's
too (`release_input`, `finish`): PIL bicubic resizing of 8-bit images, the decoded image quantised to 8 bits,
colour-fixed at the processing size and truncated to 8 bits. Images whose processing size is larger than the
tiling threshold are denoised in overlapping latent tiles blended with smooth weights (memory bound by the
tile, not the image), and decoded with a tiled VAE; below it the model makes one call over the image.

It sits in the engine right above the backbones and the geometry maths: the job runner (`engine.jobs`) calls
`super_resolve` for every sample; the options, the provenance hashes and the output files live in
`engine.options`, `engine.provenance` and `engine.jobs`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from dp2osr.backbones import Backbone, Cond
from dp2osr.images import to_pil, to_uint8
from dp2osr.math.colorfix import color_fix
from dp2osr.math.geometry import ramp, tile_starts


def _rows(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` with batch ``b`` (a batch of 1 is expanded)."""
    return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b > 1 else x


def expand_cond(cond: Cond, batch: int) -> Cond:
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


NOISE_DEVICES = ("cpu", "model")


def sample_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample on ``device``, seeded with its seed: every random draw of that sample comes
    from it. A CPU generator draws the same noise whatever device the model runs on; one on the model's GPU
    draws what a script that seeds ``torch.Generator(device="cuda")`` draws."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def initial_latents(
    backbone: Backbone, generators: list[torch.Generator], latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Per-sample Gaussian latents, each drawn on its generator as the diffusers pipelines draw them
    (``randn_tensor`` in the model's dtype)."""
    shape = (1, backbone.latent_channels, *latent_hw)
    noise = [
        randn_tensor(shape, generator=g, device=backbone.device, dtype=backbone.dtype) for g in generators
    ]
    sigma = getattr(backbone.scheduler, "init_noise_sigma", 1.0)  # flow matching starts from pure noise
    return torch.cat(noise) * sigma


@torch.no_grad()
def generate(
    backbone: Backbone,
    control_image: torch.Tensor,
    cond: Cond,
    seeds: list[int],
    *,
    steps: int,
    guidance: float | None,
    tile: int | None = None,
    overlap: int | None = None,
    controlnet: torch.nn.Module | None = None,
    progress: Callable[[float], None] | None = None,
    tile_batch: int = 1,
    noise_device: str = "cpu",
) -> torch.Tensor:
    """Sample one SR output per seed for one control image.

    Args:
        control_image: ``(1, 3, H, W)`` upsampled LR in [0, 1]; H, W multiples of ``backbone.pixel_multiple``.
        cond: text condition for batch 1 (or ``len(seeds)``), from ``backbone.encode_prompts``.
        seeds: one seed per output.
        tile: latent tile side (default: the whole image, no tiling); ``overlap`` in latents (default tile/4).
        tile_batch: tiles denoised together in one call (each with every seed: batch tile_batch x seeds).
        progress: called with the fraction of a denoising step done, after every tile group of a tiled image
            (1 after each step otherwise), e.g. a progress bar's ``update``.
    Returns:
        ``(len(seeds), 3, H, W)`` in [0, 1], float32 on the CPU.
    """
    f = backbone.latent_factor
    h, w = control_image.shape[-2] // f, control_image.shape[-1] // f
    b = len(seeds)
    generators = sample_generators(seeds, backbone.device if noise_device == "model" else "cpu")
    control = backbone.prepare_control(control_image.to(backbone.device), generators)  # draws first (FLUX)
    cond = expand_cond({k: v.to(backbone.device) for k, v in cond.items()}, b)
    latents = initial_latents(backbone, generators, (h, w))
    tiled = tile is not None and (h > tile or w > tile)
    th, tw = (min(tile, h), min(tile, w)) if tiled else (h, w)
    ov = (tile // 4 if overlap is None else overlap) if tiled else 0
    align = backbone.pixel_multiple // f
    ys = tile_starts(h, th, th - ov, align)
    xs = tile_starts(w, tw, tw - ov, align)
    dev, dt = latents.device, latents.dtype
    weight = ramp(th, ov, dev, dt)[:, None] * ramp(tw, ov, dev, dt)[None, :]
    coords = [(y, x) for y in ys for x in xs]
    groups = [coords[i : i + tile_batch] for i in range(0, len(coords), tile_batch)]
    timesteps = backbone.set_timesteps(steps, (th, tw))
    for t in timesteps:
        t_batch = t.expand(b).to(dev)
        if not tiled:
            out = backbone.predict(latents, t_batch, cond, control, guidance=guidance, controlnet=controlnet)
        else:
            out = torch.zeros_like(latents)
            total = torch.zeros((h, w), device=dev, dtype=dt)
            for group in groups:  # several tiles (x every seed) in one batched call
                n = len(group)
                tiles = torch.cat([latents[..., y : y + th, x : x + tw] for y, x in group])
                c_tiles = torch.cat(
                    [_rows(backbone.control_tile(control, y, y + th, x, x + tw), b) for y, x in group]
                )
                cond_n = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in cond.items()}
                o = backbone.predict(
                    tiles, t.expand(n * b).to(dev), cond_n, c_tiles, guidance=guidance, controlnet=controlnet
                )
                for (y, x), o_tile in zip(group, o.split(b)):
                    out[..., y : y + th, x : x + tw] += o_tile * weight
                    total[y : y + th, x : x + tw] += weight
                if progress is not None:  # a large image shows progress from its first tiles on
                    progress(1 / len(groups))
            out = out / total
        latents = backbone.step(out, t, latents, generators)
        if progress is not None and not tiled:
            progress(1)
    images = []
    with backbone.vae_tiling(tiled):
        for k in range(b):  # one at a time: decoder activations dominate memory at real size
            images.append(backbone.decode_latents(latents[k : k + 1], control_image).float().cpu())
    return torch.cat(images)


def pil_resize(image: torch.Tensor, size: tuple[int, int], resample: int = Image.BICUBIC) -> torch.Tensor:
    """``(1, 3, H, W)`` in [0, 1] as an 8-bit image resized by PIL to ``size`` (H, W), back in [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    pixels = np.asarray(to_pil(image).resize((size[1], size[0]), resample), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def release_input(
    lr: torch.Tensor, upscale: int, process_size: int, factor: int, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour reference, model input) for the LR ``(1, 3, h, w)``, as the released scripts and pipelines make
    them from the 8-bit image: a short side below ``process_size // upscale`` brought up to it (sides truncated
    by ``int``), the result ×``upscale``, then down to a multiple of ``factor`` — each a PIL bicubic resize, the
    colour reference — and, where that is no multiple of ``multiple`` (FLUX packs 2×2 latents), down to one by
    PIL Lanczos, as the pipeline's image processor does: the model input."""
    image = (
        torch.from_numpy(to_uint8(lr)).permute(2, 0, 1)[None].float() / 255
    )  # 8 bits, as the release reads
    h, w = image.shape[-2:]
    short = process_size // upscale
    if h < short or w < short:
        scale = short / min(h, w)
        image = pil_resize(image, (int(scale * h), int(scale * w)))
    h, w = image.shape[-2] * upscale, image.shape[-1] * upscale
    image = pil_resize(pil_resize(image, (h, w)), (h // factor * factor, w // factor * factor))
    h, w = image.shape[-2:]
    return image, pil_resize(image, (h // multiple * multiple, w // multiple * multiple), Image.LANCZOS)


def finish(decoded: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """The release's post-processing of decoded samples ``(B, 3, H, W)``: quantised to 8 bits (rounded, as
    the pipelines' PIL output), colour-fixed against ``reference`` (the 8-bit control image at the processing
    size) and truncated to 8 bits (as converting the fixed tensor to a PIL image does)."""
    out = (decoded.float().clamp(0, 1) * 255).round() / 255
    if method == "none":
        return out
    if method == "wavelet" and reference.shape[-2:] != out.shape[-2:]:  # FLUX's 16-multiple of an 8-multiple
        reference = pil_resize(reference, tuple(out.shape[-2:]))
    return (color_fix(out, reference, method) * 255).floor() / 255


def tile_threshold_for(process_size: int, tile_threshold: int | None) -> int:
    """The longest processing side sampled in one call (0: every image in one call): by default twice the
    process size."""
    return 2 * process_size if tile_threshold is None else tile_threshold


def super_resolve(
    backbone: Backbone,
    lr: torch.Tensor,
    cond: Cond,
    seeds: list[int],
    *,
    steps: int,
    guidance: float | None,
    process_size: int,
    upscale: int = 1,
    tile_threshold: int | None = None,
    tile_overlap: float = 0.25,
    color_fix_method: str = "adain",
    controlnet: torch.nn.Module | None = None,
    progress: Callable[[float], None] | None = None,
    tile_batch: int = 1,
    noise_device: str = "cpu",
) -> torch.Tensor:
    """SR outputs ``(len(seeds), 3, h·upscale, w·upscale)`` for the LR ``lr`` ``(1, 3, h, w)``, any size/aspect.

    The model runs on `release_input`'s image, in one call when its longer side is at most ``tile_threshold``
    (`tile_threshold_for`; 0: always), otherwise in latent tiles of ``process_size``; `finish` post-processes
    the samples, which are then resized (PIL bicubic, 8 bits) to ``h·upscale × w·upscale`` where the processing
    size differs from it. Values are multiples of 1/255.
    """
    out_hw = (lr.shape[-2] * upscale, lr.shape[-1] * upscale)
    m, f = backbone.pixel_multiple, backbone.latent_factor
    reference, work = release_input(lr, upscale, process_size, f, m)
    limit = tile_threshold_for(process_size, tile_threshold)
    align = m // f
    tile = max(align, process_size // f // align * align)
    tiled = limit > 0 and max(work.shape[-2:]) > limit
    out = generate(
        backbone,
        work,
        cond,
        seeds,
        steps=steps,
        guidance=guidance,
        tile=tile if tiled else None,
        overlap=int(round(tile * tile_overlap / align)) * align,
        controlnet=controlnet,
        progress=progress,
        tile_batch=tile_batch,
        noise_device=noise_device,
    )
    out = finish(out, reference, color_fix_method)
    if tuple(out.shape[-2:]) != out_hw:
        out = torch.cat([pil_resize(o[None], out_hw) for o in out])
    return out
