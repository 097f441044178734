"""Stage 1 of the pipeline: HR photos -> LR/HR training pairs (``dp2osr degrade``).

The LR images come from a Real-ESRGAN-style second-order degradation (Wang et al., "Real-ESRGAN: Training
Real-World Blind Super-Resolution with Pure Synthetic Data", ICCV-W 2021, §3), written here in torch from the
paper's description: two rounds of blur -> random resize -> noise -> JPEG, then the resize to HR/scale with a
sinc filter and JPEG in random order. Defaults are those of Real-ESRGAN's x4plus training config.

Every random choice for an image comes from its own seed (``image_seed``: base seed + CRC-32 of the ID)
through explicit generators (a CPU ``torch.Generator`` for noise, a ``numpy.random.Generator`` for the
parameters), never the global RNGs: a rerun writes the same pairs bit-for-bit on the same device, a pair does
not depend on the other files in the folder, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dp2osr import tables
from dp2osr.config import check_choice, check_choices, check_resume, check_seed, field, save_config
from dp2osr.errors import PartialFailure
from dp2osr.images import MIN_LR_SIDE, ImageReadError, list_images, load_image, save_image, to_uint8
from dp2osr.math.kernels import bivariate_kernel, sinc_kernel
from dp2osr.paths import check_output_dir, file_sha
from dp2osr.progress import bar as progress_bar
from dp2osr.runtime import output_lock, resolve_device

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_KERNEL_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]  # Real-ESRGAN's probabilities of KERNEL_TYPES
RESIZE_MODES = ("area", "bilinear", "bicubic")
PAIRS_COLUMNS = ["image_id", "hr_path", "lr_path", "source", "seed", "source_sha"]
CONFIG_NAME = "degrade_config.yaml"
# Options that do not change the pairs; all others must match when resuming into an existing output folder.


class ImageTooSmallError(ValueError):
    """An image smaller than the HR crop."""


class _Round(NamedTuple):
    """The options of one degradation round (round 2 reads the fields suffixed ``2``)."""

    kernel_prob: list[float]
    sinc_prob: float
    blur_sigma: list[float]
    betag_range: list[float]
    betap_range: list[float]
    resize_prob: list[float]
    resize_range: list[float]
    gaussian_noise_prob: float
    noise_range: list[float]
    poisson_scale_range: list[float]
    gray_noise_prob: float
    jpeg_range: list[int]


@dataclass
class DegradationParams:
    """Ranges and probabilities of the second-order degradation (defaults: Real-ESRGAN x4plus)."""

    kernel_range: list[int] = field([7, 21], help="blur/sinc kernel sizes: odd sizes in [min, max]")
    kernel_prob: list[float] = field(_KERNEL_PROB, help="round 1: probabilities of " + "/".join(KERNEL_TYPES))
    sinc_prob: float = field(0.1, help="round 1: probability of a sinc kernel instead of the above")
    blur_sigma: list[float] = field([0.2, 3.0], help="round 1: Gaussian kernel sigma range (pixels)")
    betag_range: list[float] = field([0.5, 4.0], help="round 1: generalised-Gaussian shape beta range")
    betap_range: list[float] = field([1.0, 2.0], help="round 1: plateau kernel shape beta range")
    resize_prob: list[float] = field([0.2, 0.7, 0.1], help="round 1: probabilities of up, down, keep")
    resize_range: list[float] = field([0.15, 1.5], help="round 1: resize factor range")
    gaussian_noise_prob: float = field(0.5, help="round 1: probability of Gaussian (else Poisson) noise")
    noise_range: list[float] = field([1.0, 30.0], help="round 1: Gaussian noise sigma range (of 255)")
    poisson_scale_range: list[float] = field([0.05, 3.0], help="round 1: Poisson noise scale range")
    gray_noise_prob: float = field(0.4, help="round 1: probability of gray noise (same in all channels)")
    jpeg_range: list[int] = field([30, 95], help="round 1: JPEG quality range")
    second_blur_prob: float = field(0.8, help="round 2: probability of blurring at all")
    kernel_prob2: list[float] = field(_KERNEL_PROB, help="round 2: kernel type probabilities")
    sinc_prob2: float = field(0.1, help="round 2: probability of a sinc kernel")
    blur_sigma2: list[float] = field([0.2, 1.5], help="round 2: Gaussian kernel sigma range")
    betag_range2: list[float] = field([0.5, 4.0], help="round 2: generalised-Gaussian beta range")
    betap_range2: list[float] = field([1.0, 2.0], help="round 2: plateau beta range")
    resize_prob2: list[float] = field([0.3, 0.4, 0.3], help="round 2: probabilities of up, down, keep")
    resize_range2: list[float] = field([0.3, 1.2], help="round 2: resize factor range")
    gaussian_noise_prob2: float = field(0.5, help="round 2: probability of Gaussian (else Poisson) noise")
    noise_range2: list[float] = field([1.0, 25.0], help="round 2: Gaussian noise sigma range (of 255)")
    poisson_scale_range2: list[float] = field([0.05, 2.5], help="round 2: Poisson noise scale range")
    gray_noise_prob2: float = field(0.4, help="round 2: probability of gray noise")
    jpeg_range2: list[int] = field([30, 95], help="round 2: JPEG quality range")
    final_sinc_prob: float = field(0.8, help="final step: probability of a sinc filter")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(DegradationParams):
            name, value = f.name, getattr(self, f.name)
            if name.startswith(("kernel_prob", "resize_prob")):
                n = len(KERNEL_TYPES) if name.startswith("kernel") else 3
                if len(value) != n or min(value) < 0 or abs(sum(value) - 1) > 1e-6:
                    raise ValueError(f"{name} must be {n} probabilities >= 0 summing to 1, got {value}")
            elif name.endswith(("_prob", "_prob2")):
                if not 0 <= value <= 1:
                    raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
            elif len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got {value}")
        if not _odd_sizes(self.kernel_range):
            raise ValueError(f"kernel_range must contain an odd size >= 1, got {self.kernel_range}")
        for name in ("jpeg_range", "jpeg_range2"):
            if not 1 <= getattr(self, name)[0] <= getattr(self, name)[1] <= 100:
                raise ValueError(f"{name} must lie in [1, 100], got {getattr(self, name)}")

    def round_params(self, index: int) -> _Round:
        """The options of round ``index`` (1 or 2)."""
        suffix = "" if index == 1 else "2"
        return _Round(*(getattr(self, name + suffix) for name in _Round._fields))


@dataclass
class _PairOptions:
    input: Path = field(help="HR image folder (non-recursive) or one HR image", run_only=True)
    output: Path = field(
        help="output folder: hr/ID.png, lr/ID.png, pairs.parquet, degrade_config.yaml", run_only=True
    )
    hr_size: int = field(512, help="HR crop size (square, pixels); a multiple of --scale")
    scale: int = field(4, help="downscaling factor: the LR is hr_size/scale pixels")
    crop: str = field(
        "random", help="HR crop position (random: seeded per image)", choices=["random", "center"]
    )
    seed: int = field(0, help="base seed; an image's seed is seed + CRC-32 of its ID (file stem)")
    device: str = field(
        "cpu",
        help="torch device (auto: cuda when available)",
        choices=["cpu", "cuda", "auto"],
        run_only=True,
    )
    overwrite: bool = field(
        False, help="recompute pairs that exist (default: keep them and resume)", run_only=True
    )


# Base order puts _PairOptions' fields (input, output, ...) first in --help, then the degradation ranges.
@dataclass
class DegradeConfig(DegradationParams, _PairOptions):
    """HR photos -> LR/HR training pairs with a Real-ESRGAN-style second-order degradation.

    Each HR image is cropped to --hr-size, then degraded twice with blur (Gaussian, generalised-Gaussian,
    plateau or sinc kernels), random resize, Gaussian or Poisson noise and JPEG, and finally resized to
    hr_size/scale with a sinc filter and JPEG in random order. Writes OUTPUT/hr/ID.png, OUTPUT/lr/ID.png,
    OUTPUT/pairs.parquet and OUTPUT/degrade_config.yaml (ID = file stem). Each image has its own seed, so a
    rerun gives identical pairs and an interrupted run resumes (existing pairs are kept). Unreadable images
    and images smaller than the crop are reported and skipped; the exit code is then 1.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self)
        check_seed(self.seed)
        if self.scale < 1 or self.hr_size < self.scale or self.hr_size % self.scale:
            raise ValueError(f"hr_size must be a multiple of scale >= 1, got {self.hr_size} and {self.scale}")
        if self.hr_size // self.scale < MIN_LR_SIDE:
            raise ValueError(
                f"--hr-size {self.hr_size} / --scale {self.scale} gives {self.hr_size // self.scale} px LR images; "
                f"the smallest supported LR side is {MIN_LR_SIDE} px"
            )


def _odd_sizes(size_range: list[int]) -> list[int]:
    return [k for k in range(int(size_range[0]), int(size_range[1]) + 1) if k % 2 == 1]


def _beta(rng: np.random.Generator, low: float, high: float) -> float:
    """A shape exponent, half of the time below 1 and half above when the range straddles 1."""
    if low < 1 and (high <= 1 or rng.random() < 0.5):
        return float(rng.uniform(low, min(1.0, high)))
    return float(rng.uniform(max(1.0, low), high))


def random_kernel(
    kind: str,
    size: int,
    rng: np.random.Generator,
    sigma_range: Sequence[float],
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
) -> torch.Tensor:
    """A random kernel of a ``KERNEL_TYPES`` kind: isotropic (σx = σy, θ = 0) or not (θ ~ U(-π, π))."""
    check_choice("kernel type", kind, KERNEL_TYPES)
    sigma_x = float(rng.uniform(*sigma_range))
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y, theta = float(rng.uniform(*sigma_range)), float(rng.uniform(-math.pi, math.pi))
    if kind.startswith("generalized"):
        return bivariate_kernel(size, sigma_x, sigma_y, theta, "generalized", _beta(rng, *betag_range))
    if kind.startswith("plateau"):
        return bivariate_kernel(size, sigma_x, sigma_y, theta, "plateau", _beta(rng, *betap_range))
    return bivariate_kernel(size, sigma_x, sigma_y, theta)


def _round_kernel(rng: np.random.Generator, r: _Round, size_range: list[int]) -> torch.Tensor:
    """A round's blur kernel: sinc with probability ``sinc_prob`` (lower cut-offs allowed for large sizes)."""
    size = int(rng.choice(_odd_sizes(size_range)))
    if rng.random() < r.sinc_prob:
        return sinc_kernel(size, float(rng.uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi)))
    kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=np.asarray(r.kernel_prob) / sum(r.kernel_prob)))]
    return random_kernel(kind, size, rng, r.blur_sigma, r.betag_range, r.betap_range)


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel of ``(B, C, H, W)`` with a ``(k, k)`` kernel; same size out.

    Reflect padding as in Real-ESRGAN; replicate when the image is too small to reflect (strong downsizing).
    """
    k = kernel.shape[-1]
    p = k // 2
    mode = "reflect" if p < min(img.shape[-2:]) else "replicate"
    weight = kernel.to(img).expand(img.shape[1], 1, k, k).contiguous()
    return F.conv2d(F.pad(img, (p, p, p, p), mode=mode), weight, groups=img.shape[1])


def _resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    return F.interpolate(img, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, gen: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise of std ``sigma`` (the same in all channels if ``gray``), clamped to [0, 1]."""
    shape = (img.shape[0], 1 if gray else img.shape[1], *img.shape[-2:])
    noise = torch.randn(shape, generator=gen)  # drawn on the CPU so every device sees the same noise
    return (img + noise.to(img) * sigma).clamp(0, 1)


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, gen: torch.Generator) -> torch.Tensor:
    """Shot noise (Real-ESRGAN §3.1): Poisson counts at 2^⌈log2 #levels⌉ levels of the 8-bit image, scaled.

    Gray noise is computed on the luma (ITU-R BT.601) and added to all channels; result clamped to [0, 1].
    """
    src = img.detach().float().cpu()
    if gray:
        src = (src * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    src = (src * 255).round().clamp(0, 255) / 255
    levels = 2 ** math.ceil(math.log2(max(2, torch.unique(src).numel())))
    noise = torch.poisson(src * levels, generator=gen) / levels - src
    return (img + noise.to(img) * scale).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG compression round trip through PIL (libjpeg, 4:2:0 chroma) at ``quality``, image by image."""
    out = []
    for one in img:
        buf = io.BytesIO()
        Image.fromarray(to_uint8(one)).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out).to(img)


def _random_resize(img: torch.Tensor, rng: np.random.Generator, r: _Round, base: tuple) -> torch.Tensor:
    """Resize to ``base`` x a factor drawn up (>1) / down (<1) / keep, with a random interpolation."""
    direction = int(rng.choice(3, p=np.asarray(r.resize_prob) / sum(r.resize_prob)))
    lo, hi = r.resize_range
    factor = 1.0  # keep
    if direction == 0:  # up: U(1, high)
        factor = float(rng.uniform(1.0, max(1.0, hi)))
    elif direction == 1:  # down: U(low, 1)
        factor = float(rng.uniform(min(lo, 1.0), 1.0))
    mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
    return _resize(img, (int(base[0] * factor), int(base[1] * factor)), mode)


def _random_noise(
    img: torch.Tensor, rng: np.random.Generator, r: _Round, gen: torch.Generator
) -> torch.Tensor:
    """Gaussian noise (probability ``gaussian_noise_prob``) or Poisson; gray w.p. ``gray_noise_prob``."""
    gray = bool(rng.random() < r.gray_noise_prob)
    if rng.random() < r.gaussian_noise_prob:
        return add_gaussian_noise(img, float(rng.uniform(*r.noise_range)) / 255.0, gray, gen)
    return add_poisson_noise(img, float(rng.uniform(*r.poisson_scale_range)), gray, gen)


def degrade_image(
    hr: torch.Tensor,
    scale: int = 4,
    params: DegradationParams | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Second-order degradation of ``hr`` ``(1, 3, H, W)`` in [0, 1] -> LR ``(1, 3, H//scale, W//scale)``.

    Real-ESRGAN §3: for round 1 and 2: blur (round 2 only with ``second_blur_prob``) -> random resize
    (round 2 relative to H/scale) -> Gaussian or Poisson noise -> JPEG; then, in random order, [resize to
    H/scale + sinc filter (``final_sinc_prob``)] and JPEG. The result is rounded to 8-bit levels.
    ``generator`` is a CPU ``torch.Generator`` (default: seeded with 0); it draws the noise and seeds the
    ``numpy.random.Generator`` that draws every parameter, so a seeded generator gives a reproducible LR.
    """
    if hr.dim() != 4 or hr.shape[:2] != (1, 3):
        raise ValueError(f"hr must have shape (1, 3, H, W), got {tuple(hr.shape)}")
    params = params or DegradationParams()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    h, w = hr.shape[-2:]
    out = hr.float()
    for index, base in ((1, (h, w)), (2, (h / scale, w / scale))):
        r = params.round_params(index)
        if index == 1 or rng.random() < params.second_blur_prob:
            out = filter2d(out, _round_kernel(rng, r, params.kernel_range))
        out = _random_resize(out, rng, r, base)
        out = _random_noise(out, rng, r, generator)
        out = jpeg(out, int(rng.integers(r.jpeg_range[0], r.jpeg_range[1] + 1)))
    # Final step: the sinc filter models ringing of the final resize; its order with JPEG is random.
    final_kernel = None
    if rng.random() < params.final_sinc_prob:
        size = int(rng.choice(_odd_sizes(params.kernel_range)))
        final_kernel = sinc_kernel(size, float(rng.uniform(math.pi / 3, math.pi)))
    mode = RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))]
    quality = int(rng.integers(params.jpeg_range2[0], params.jpeg_range2[1] + 1))
    jpeg_first = bool(rng.random() < 0.5)
    out = jpeg(out, quality) if jpeg_first else out
    out = _resize(out, (h // scale, w // scale), mode)
    out = filter2d(out, final_kernel) if final_kernel is not None else out
    out = out if jpeg_first else jpeg(out, quality)
    return (out * 255.0).round().clamp(0, 255) / 255.0


def crop(
    img: torch.Tensor, size: int, mode: str = "random", rng: np.random.Generator | None = None
) -> torch.Tensor:
    """A ``size`` x ``size`` crop of ``(..., H, W)``: ``center``, or ``random`` (position drawn by ``rng``).

    Raises ImageTooSmallError when the image is smaller than the crop.
    """
    check_choice("crop", mode, ["random", "center"])
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ImageTooSmallError(f"image is {w}x{h}, smaller than the {size}x{size} crop")
    if mode == "center":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        if rng is None:
            raise ValueError("a random crop needs rng (a numpy.random.Generator)")
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[..., top : top + size, left : left + size]


def image_seed(base_seed: int, image_id: str) -> int:
    """The seed of one image: base seed + CRC-32 of its ID (stable across runs, folders and machines)."""
    return (int(base_seed) + zlib.crc32(image_id.encode("utf-8"))) % 2**63


def make_pair(
    hr_full: torch.Tensor, cfg: DegradeConfig, seed: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR crop, LR) of one loaded image, all randomness from ``seed``."""
    hr = crop(hr_full, cfg.hr_size, cfg.crop, np.random.default_rng(seed))
    lr = degrade_image(hr.to(device), cfg.scale, cfg, torch.Generator().manual_seed(seed))
    return hr, lr


def recorded_sources(out: Path) -> dict[str, str]:
    """``{image_id: hash of the photo its pair was made from}`` of an earlier run (a pair without one is redone)."""
    try:
        table, _ = tables.read(tables.PAIRS, out)
    except (ValueError, OSError):  # none yet, or cut short: every pair is made (again)
        return {}
    return dict(zip(table["image_id"], table["source_sha"])) if "source_sha" in table else {}


def run(cfg: DegradeConfig) -> pd.DataFrame:
    """Run ``dp2osr degrade``; returns the pairs table. Raises `PartialFailure` (after writing every other pair)
    when some input images were skipped (each reported on stderr)."""
    files = list_images(cfg.input)
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise ValueError(f"two input images share the ID {path.stem!r}: {seen[path.stem]} and {path}")
        seen[path.stem] = path
    out = Path(cfg.output)
    check_output_dir(out)
    with output_lock(out, "degrade"):
        return _degrade(cfg, files, out)


def _degrade(cfg: DegradeConfig, files: list[Path], out: Path) -> pd.DataFrame:
    """`run` once the output folder ``out`` is this run's."""
    check_resume(cfg, out / CONFIG_NAME, "pairs")
    device = resolve_device(cfg.device)
    save_config(cfg, out / CONFIG_NAME)

    made_from = recorded_sources(out)
    rows, skipped, made = [], [], 0
    for path in progress_bar(files, desc="degrade", unit="img", file=sys.stderr):
        image_id, seed = path.stem, image_seed(cfg.seed, path.stem)
        hr_rel, lr_rel = f"hr/{image_id}.png", f"lr/{image_id}.png"
        try:  # the photo's content: a pair made from another photo of this name is made again
            source_sha = file_sha(path)
        except OSError:  # unreadable: attempted below, and reported
            source_sha = ""
        current = bool(source_sha) and made_from.get(image_id) == source_sha
        if cfg.overwrite or not (current and (out / hr_rel).is_file() and (out / lr_rel).is_file()):
            try:
                hr, lr = make_pair(load_image(path), cfg, seed, device)
            except (ImageReadError, ImageTooSmallError) as exc:  # report, skip, go on with the others
                skipped.append(str(exc) if isinstance(exc, ImageReadError) else f"{path}: {exc}")
                tqdm.write(f"dp2osr degrade: {skipped[-1]}; skipped", file=sys.stderr)
                continue
            save_image(hr, out / hr_rel)
            save_image(lr, out / lr_rel)
            made += 1
        rows.append((image_id, str(out / hr_rel), str(out / lr_rel), str(path.resolve()), seed, source_sha))

    table = pd.DataFrame(rows, columns=PAIRS_COLUMNS).astype({"seed": "int64"})
    tables.write(tables.PAIRS, table, out)
    print(f"{len(rows)} pairs in {out} ({made} new, {len(rows) - made} kept); {len(skipped)} images skipped")
    if skipped:
        raise PartialFailure(f"skipped {len(skipped)} of {len(files)} images (reported above)")
    return table
