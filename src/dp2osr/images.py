"""Image I/O shared by every stage: robust reading, tensors in [0, 1], atomic PNG writes.

Reading converts what users actually have (grayscale, palette, RGBA, 16-bit) to 8-bit-equivalent RGB floats
and reports unreadable files by name. Writing goes through a temporary file and ``os.replace`` so a killed
job never leaves a half-written PNG that a resumed job would mistake for a finished one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An input image that cannot be read; the message names the file."""


def list_images(path: Path) -> list[Path]:
    """The image files at ``path`` (a file, or a folder searched non-recursively), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
    return files


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """HxWx3 float32 in [0, 1] from any PIL mode (16-bit and float modes included)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = np.repeat(np.clip(arr / max(float(arr.max()), 1.0), 0, 1)[..., None], 3, axis=2)
    else:
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            # Composite on white: transparent pixels carry arbitrary colours.
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def load_image(path: Path) -> torch.Tensor:
    """Read an image as a ``(1, 3, H, W)`` float32 tensor in [0, 1]; raises ImageReadError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = _to_rgb_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` or ``(1, 3, H, W)`` float in [0, 1] -> HxWx3 uint8 (round half up)."""
    if image.dim() == 4:
        image = image[0]
    arr = image.detach().float().clamp(0, 1).mul(255).add(0.5).floor().byte()
    return arr.permute(1, 2, 0).cpu().numpy()


def save_image(image: torch.Tensor, path: Path) -> None:
    """Write a ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1] as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_parquet(df, path: Path) -> None:
    """Write a pandas DataFrame to Parquet atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
