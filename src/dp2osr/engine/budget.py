"""Before any work: the tile plan of each image, its estimated peak memory and time, and the --max-pixels guard.

The plan is the one `sampler.super_resolve` follows: the release's processing size (the LR's short side brought
up to process size / scale, x scale, down to the model's multiple), in one call up to the tiling threshold, above
it in latent tiles of the process size with the given overlap. Memory is
the image-sized buffers (exact, from the shapes: the upsampled LR, the control image, latents and their
update, the decoded samples and their colour-fixed copies, float32) plus the activations of one denoiser call
(tile_batch x samples tiles; the backbone's calibrated bytes per latent pixel, see
`dp2osr.backbones.loading.SizeTraits`). Time is steps x tiles x samples x tile latent pixels x the calibrated
CPU seconds per latent pixel: a CPU figure, left out on an accelerator. Both are rough, but they grow with the
image the way the sampler does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dp2osr.backbones import size_traits
from dp2osr.engine.sampler import tile_threshold_for
from dp2osr.math.geometry import tile_starts

DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class Estimate:
    out_hw: tuple[int, int]
    tiles: int
    tile_latent_px: int
    peak_bytes: float
    seconds: float | None  # CPU time per image (all samples), None when not calibrated / not on the CPU
    calibrated: bool  # whether the activation term is included
    work_hw: tuple[int, int] | None = (
        None  # the size the model works at (short side brought up to the process size)
    )

    @property
    def pixels(self) -> int:
        """The larger of the output's and the working size's pixel counts: what --max-pixels bounds."""
        h, w = self.work_hw or self.out_hw
        return max(h * w, self.out_hw[0] * self.out_hw[1])

    def describe(self) -> str:
        h, w = self.out_hw
        mem = f"~{self.peak_bytes / 2**30:.1f} GiB peak memory"
        if not self.calibrated:
            mem += " plus the model and one tile's activations (not calibrated for this backbone)"
        time = f", ~{self.seconds:.0f} s on this CPU" if self.seconds is not None else ""
        work = ""
        if self.work_hw is not None and self.work_hw != self.out_hw:
            wh, ww = self.work_hw
            work = f", worked at {ww}x{wh} ({wh * ww / 1e6:.1f} MP, the process size)"
        return f"output {w}x{h} ({h * w / 1e6:.1f} MP){work}, {self.tiles} latent tiles: {mem}{time}"


def estimate(
    lr_hw: tuple[int, int],
    backbone: str,
    *,
    upscale: int,
    samples: int,
    batch_size: int,
    tile_batch: int,
    tile_overlap: float = 0.25,
    process_size: int | None = None,
    steps: int | None = None,
    cpu: bool = True,
    tile_threshold: int | None = None,
) -> Estimate:
    """The tile plan and cost estimate of one LR image of size ``lr_hw`` (see the module docstring)."""
    t = size_traits(backbone)
    ps, f, m = process_size or t.process_size, t.latent_factor, t.pixel_multiple
    height, width = lr_hw[0] * upscale, lr_hw[1] * upscale
    hw, ww, short = lr_hw[0], lr_hw[1], ps // upscale
    if min(hw, ww) < short:  # as `sampler.release_input`
        hw, ww = int(short / min(hw, ww) * hw), int(short / min(hw, ww) * ww)
    hw, ww = hw * upscale // f * f, ww * upscale // f * f
    hp, wp = hw // m * m, ww // m * m
    h, w, align = hp // f, wp // f, m // f
    tile = max(align, ps // f // align * align)
    limit = tile_threshold_for(ps, tile_threshold)
    tiled = limit > 0 and max(hp, wp) > limit and (h > tile or w > tile)
    th, tw = (min(tile, h), min(tile, w)) if tiled else (h, w)
    ov = int(round(tile * tile_overlap / align)) * align if tiled else 0
    tiles = len(tile_starts(h, th, th - ov, align)) * len(tile_starts(w, tw, tw - ov, align))
    b = min(batch_size, samples)
    image = (
        3 * 4 * (height * width * (2 + 2 * b) + 2 * hp * wp)
    )  # lr_up, samples + fixed copies, work, control
    latents = 4 * 4 * b * t.latent_channels * h * w  # latents, prediction, its sum and the step's output
    calls = min(tile_batch, tiles) * b if tiled else b
    act = calls * th * tw * (t.act_bytes_per_latent_px or 0.0)
    seconds = None
    if cpu and t.cpu_s_per_latent_px is not None:
        seconds = (steps or t.steps) * tiles * samples * th * tw * t.cpu_s_per_latent_px
    return Estimate(
        (height, width),
        tiles,
        th * tw,
        image + latents + act,
        seconds,
        t.act_bytes_per_latent_px is not None,
        (hw, ww),
    )


def image_hw(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file's header (as shown: EXIF rotations swap them), or None if unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return h, w
    except Exception:  # reported by name when the sampler reads it
        return None


def check_sizes(
    paths: list[Path], max_pixels: int, flag: str = "--max-pixels", **plan
) -> dict[Path, Estimate]:
    """The estimate of every readable image; a one-line ValueError (before any model loads) naming the first
    image whose output, or the size the model works at (the process size), exceeds ``max_pixels`` (0: no
    limit), with its estimate and how to override."""
    found = {}
    for path in paths:
        hw = image_hw(path)
        if hw is None:
            continue
        found[path] = estimate(hw, **plan)
        check_size(str(path), found[path], max_pixels, flag)
    return found


def check_size(label: str, est: Estimate, max_pixels: int, flag: str = "--max-pixels") -> None:
    """A one-line ValueError, starting with ``label`` and giving the estimate and how to override, when the
    image of ``est`` exceeds ``max_pixels`` (0: no limit)."""
    if max_pixels and est.pixels > max_pixels:
        raise ValueError(
            f"{label}: {est.describe()}; above {flag} {max_pixels} pixels. Pass {flag} 0 (no limit) or "
            f"{flag} {est.pixels} to run it anyway, or downscale the input (or lower --process-size)"
        )


def check_inputs(paths: list[Path], cfg, cpu: bool, desc: str) -> None:
    """`check_sizes` with the options of an `upscale` / `sample` config ``cfg`` (``max_pixels``, ``upscale``,
    ``samples`` and the sampling options); prints the estimate of the largest image when it is tiled."""
    found = check_sizes(paths, cfg.max_pixels, **plan_options(cfg, cpu))
    if found:
        path, est = max(found.items(), key=lambda kv: kv[1].out_hw[0] * kv[1].out_hw[1])
        if est.tiles > 1:
            print(f"{desc}: largest image {path.name}: {est.describe()}", file=sys.stderr)


def plan_options(cfg, cpu: bool) -> dict:
    """`estimate`'s keyword arguments from an `upscale` / `sample` config ``cfg``."""
    return dict(
        backbone=cfg.backbone,
        upscale=cfg.upscale,
        samples=cfg.samples,
        batch_size=cfg.batch_size,
        tile_batch=cfg.tile_batch,
        tile_overlap=cfg.tile_overlap,
        process_size=cfg.process_size,
        steps=cfg.steps,
        cpu=cpu,
        tile_threshold=cfg.tile_threshold,
    )
