"""Image I/O shared by every stage: robust reading, tensors in [0, 1], atomic PNG writes.

Reading returns RGB floats in [0, 1] as an image viewer would show the file, and reports unreadable files by
name (``ImageReadError``, a ValueError):

- EXIF orientation is applied (a phone photo stored sideways with orientation 6 reads upright).
- Transparency (RGBA, LA, PA, or a palette / grey / RGB image with a transparent colour) is composited on
  white: the colour of a fully transparent pixel is arbitrary and must not reach the model.
- Palette (P), 1-bit, grayscale (L) and CMYK images are converted to RGB; grayscale is repeated to 3 channels.
- 16-bit and 32-bit integer images are scaled by their bit depth in the file (a 16-bit PNG by 65535), never by
  their pixel values, so a dark 16-bit image stays dark. Float images (mode F) are clipped to [0, 1] after
  dividing by their maximum when it exceeds 1.

Writing goes through a temporary file in the target folder and ``os.replace``, so a killed job never leaves
a half-written file that a resumed job would mistake for a finished one. The temporary file is created with
the permissions of an ordinary file (``0o666`` minus the umask), so outputs are as readable as any other.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MIN_LR_SIDE = 8  # the smallest LR side upscale and sample accept
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


def _int_full_scale(rawmode: str) -> float:
    """The full-scale value of an integer image from its rawmode in the file (``I;16B`` -> 65535)."""
    match = re.match(r"I;(\d+)", rawmode)
    if match is None:  # plain "I": 32-bit signed
        return float(2**31 - 1)
    bits = int(match.group(1)) - (1 if "S" in rawmode[match.end() :] else 0)
    return float(2**bits - 1)


def _file_rawmode(im: Image.Image) -> str:
    """How the pixels are stored in the file (read before ``load()``, which drops this information)."""
    if not im.tile:
        return im.mode
    args = im.tile[0].args
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else im.mode


def _upright(im: Image.Image) -> Image.Image:
    """``im`` as a viewer shows it (EXIF orientation applied); a corrupt EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(im)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError, struct.error):
        return im


def _to_rgb_array(im: Image.Image, rawmode: str | None = None) -> np.ndarray:
    """HxWx3 float32 in [0, 1] from any PIL mode (see the module docstring for the rules)."""
    if im.mode.startswith("I"):
        full = 65535.0 if im.mode.startswith("I;16") else _int_full_scale(rawmode or im.mode)
        arr = np.clip(np.asarray(im, dtype=np.float64) / full, 0, 1).astype(np.float32)
        return np.repeat(arr[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        return np.repeat(np.clip(arr / max(float(arr.max()), 1.0), 0, 1)[..., None], 3, axis=2)
    if {"A", "a"} & set(im.getbands()) or "transparency" in im.info:
        # Composite on white: transparent pixels carry arbitrary colours.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: Path) -> torch.Tensor:
    """Read an image as a ``(1, 3, H, W)`` float32 tensor in [0, 1]; raises ImageReadError naming the file."""
    return decode_image(Path(path), str(path))


def decode_image(source, name: str) -> torch.Tensor:
    """`load_image` of ``source`` (a path or a binary file object); errors name ``name``."""
    try:
        with Image.open(source) as im:
            rawmode = _file_rawmode(im)
            im.load()
            arr = _to_rgb_array(_upright(im), rawmode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)


def to_tensor(image) -> torch.Tensor:
    """A PIL image or a numpy array (HxW or HxWx3; uint8, or float in [0, 1]) as ``(1, 3, H, W)`` float32 in
    [0, 1], by the rules of `load_image` (a PIL image is read as its file would be: EXIF orientation applied,
    transparency on white)."""
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"a float image array must be HxW or HxWx3, got shape {image.shape}")
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError("a float image array must hold finite values in [0, 1]")
        arr = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 or float in [0, 1], got dtype {image.dtype}")
        arr = _to_rgb_array(Image.fromarray(image))
    elif isinstance(image, Image.Image):
        arr = _to_rgb_array(_upright(image))
    else:
        raise ValueError(f"not an image (PIL image, numpy array or path): {type(image).__name__}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` / ``(1, 3, H, W)`` in [0, 1] as the RGB image `save_image` would write."""
    return Image.fromarray(to_uint8(image))


def check_min_side(image: torch.Tensor, path: Path, min_side: int = MIN_LR_SIDE) -> None:
    """Refuse an image whose short side is below ``min_side`` px; the ImageReadError names file and size."""
    h, w = image.shape[-2:]
    if min(h, w) < min_side:
        raise ImageReadError(f"{path}: image is {w}x{h}; the smallest supported side is {min_side} px")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` or ``(1, 3, H, W)`` float in [0, 1] -> HxWx3 uint8 (round half up)."""
    if image.dim() == 4:
        image = image[0]
    arr = image.detach().float().clamp(0, 1).mul(255).add(0.5).floor().byte()
    return arr.permute(1, 2, 0).cpu().numpy()


def _new_temp(path: Path) -> Path:
    """An empty, new temporary file next to ``path``, created ``0o666`` minus the umask (as ``open`` does)."""
    for _ in range(100):
        tmp = path.with_name(f".tmp_{os.getpid()}_{secrets.token_hex(4)}_{path.name}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a new temporary file next to ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def follow_umask(path: Path) -> None:
    """Give ``path`` (every file under it, for a folder) the mode ``open`` gives a new file, ``0o666`` minus the
    umask: writers that go through a private temporary file (safetensors, for one) leave ``0o600``."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for f in files:
        os.chmod(f, 0o666 & ~mask)


def save_image(image: torch.Tensor, path: Path, text: dict[str, str] | None = None) -> None:
    """Write a ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in [0, 1] as PNG, atomically; ``text`` goes into tEXt
    chunks (read back by `read_png_text`)."""
    data = png_bytes(image, text)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def png_bytes(image: torch.Tensor, text: dict[str, str] | None = None) -> bytes:
    """The bytes `save_image` writes for ``image`` and ``text``."""
    pixels = Image.fromarray(to_uint8(image))
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    pixels.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_text(path: Path) -> dict[str, str] | None:
    """The tEXt chunks of the PNG ``path`` after decoding every pixel; None when it is missing, empty,
    truncated or otherwise undecodable."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return None
            im.load()
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


def write_parquet(df, path: Path) -> None:
    """Write a pandas DataFrame to Parquet atomically (temp file + rename)."""
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def checkerboard_tiles(
    photos: list[Path], size: int
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Cut each photo into non-overlapping ``size`` tiles (grid centred); split them in a checkerboard.

    Returns ``(training tiles, held-out tiles)`` as (id, ``(1, 3, size, size)``) lists: a tile at grid
    (row, col) is held out when row + col is odd, so both sets cover every photo and share no pixel.
    """
    train_tiles, held = [], []
    for path in photos:
        img = load_image(path)
        h, w = img.shape[-2:]
        rows, cols = h // size, w // size
        top, left = (h - rows * size) // 2, (w - cols * size) // 2
        for r in range(rows):
            for c in range(cols):
                y, x = top + r * size, left + c * size
                tile = img[..., y : y + size, x : x + size]
                (held if (r + c) % 2 else train_tiles).append((f"{path.stem}_r{r}c{c}", tile))
    return train_tiles, held


def checkerboard_counts(photos: list[Path], size: int) -> tuple[int, int]:
    """(training, held-out) tiles `checkerboard_tiles` cuts from ``photos``, from their sizes alone: a grid of
    R x C tiles gives ceil(R C / 2) training tiles (row + col even) and floor(R C / 2) held out."""
    train_n = held_n = 0
    for path in photos:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(f"cannot read image {path}: {exc}") from exc
        cells = (h // size) * (w // size)
        train_n, held_n = train_n + (cells + 1) // 2, held_n + cells // 2
    return train_n, held_n
