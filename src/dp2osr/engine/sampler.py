"""The sampler every stage shares: seeded, batched over seeds, tiled in latent space for large images.

Sample k of a batch always starts from ``randn(seed_k)`` drawn on its own CPU generator, and every stochastic
scheduler step draws from that generator too, so an (image, seed) gives the same output whatever the batch
size, device count or order. Images larger than the process size are denoised in overlapping latent tiles
blended with smooth weights (memory bound by the tile, not the image), and decoded with a tiled VAE.

It sits in the engine right above the backbones and the geometry maths: the job runner (`engine.jobs`) calls
`super_resolve` for every sample; the options, the provenance hashes and the output files live in
`engine.options`, `engine.provenance` and `engine.jobs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dp2osr.backbones import Backbone, Cond
from dp2osr.math.colorfix import color_fix
from dp2osr.math.geometry import ramp, resize, tile_starts


def _rows(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` with batch ``b`` (a batch of 1 is expanded)."""
    return x.expand(b, *x.shape[1:]) if x.shape[0] == 1 and b > 1 else x


def expand_cond(cond: Cond, batch: int) -> Cond:
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def initial_latents(backbone: Backbone, seeds: list[int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """Per-seed Gaussian latents drawn on the CPU (identical on every device)."""
    shape = (1, backbone.latent_channels, *latent_hw)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    sigma = getattr(backbone.scheduler, "init_noise_sigma", 1.0)  # flow matching starts from pure noise
    return torch.cat(noise).to(backbone.device, backbone.dtype) * sigma


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
    control = backbone.prepare_control(control_image.to(backbone.device))
    cond = expand_cond({k: v.to(backbone.device) for k, v in cond.items()}, b)
    latents = initial_latents(backbone, seeds, (h, w))
    generators = [torch.Generator("cpu").manual_seed(int(s) + 1) for s in seeds]  # scheduler noise stream
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


def super_resolve(
    backbone: Backbone,
    lr_up: torch.Tensor,
    cond: Cond,
    seeds: list[int],
    *,
    steps: int,
    guidance: float | None,
    process_size: int,
    tile_overlap: float = 0.25,
    color_fix_method: str = "adain",
    controlnet: torch.nn.Module | None = None,
    progress: Callable[[float], None] | None = None,
    tile_batch: int = 1,
) -> torch.Tensor:
    """SR outputs ``(len(seeds), 3, H, W)`` for the upsampled LR ``lr_up`` ``(1, 3, H, W)`` at any size/aspect.

    The short side is brought up to ``process_size`` when smaller (and the result resized back), the image is
    padded (reflect) to the model's multiple and cropped back — never squashed — and sides larger than the
    process size are tiled. Colour is then fixed against ``lr_up``.
    """
    height, width = lr_up.shape[-2:]
    scale = process_size / min(height, width)
    work = resize(lr_up, (round(height * scale), round(width * scale))) if scale > 1 else lr_up
    hw, ww = work.shape[-2:]
    m = backbone.pixel_multiple
    ph, pw = (-hw) % m, (-ww) % m
    mode = "reflect" if ph < hw and pw < ww else "replicate"
    work = F.pad(work, (0, pw, 0, ph), mode=mode)
    align = m // backbone.latent_factor
    tile = max(align, process_size // backbone.latent_factor // align * align)
    overlap = int(round(tile * tile_overlap / align)) * align
    out = generate(
        backbone,
        work,
        cond,
        seeds,
        steps=steps,
        guidance=guidance,
        tile=tile,
        overlap=overlap,
        controlnet=controlnet,
        progress=progress,
        tile_batch=tile_batch,
    )
    out = out[..., :hw, :ww]
    if scale > 1:
        out = resize(out, (height, width))
    return color_fix(out, lr_up.float().cpu(), color_fix_method)
