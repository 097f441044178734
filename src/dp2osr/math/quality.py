"""PSNR and SSIM on the Y channel (BT.601), the Real-ISR literature's fidelity protocol.

Both take HxWx3 RGB arrays in [0, 1]; borders are cropped by the caller. They reproduce pyiqa's ``psnr`` /
``ssim`` with ``test_y_channel=True`` (SSIM on Y rounded to 0..255, as MATLAB does).
"""

from __future__ import annotations

import numpy as np

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


# ----------------------------------------------------------------------------------------------- metrics
def y_channel(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma ``16 + 65.481 R + 128.553 G + 24.966 B`` (HxW float64 in [16, 235]) of RGB in [0, 1]."""
    return np.asarray(rgb, dtype=np.float64) @ _Y_WEIGHTS + 16.0


def psnr_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """PSNR (dB) on unrounded Y in [0, 1] of two HxWx3 RGB arrays in [0, 1] (= pyiqa psnr, ycbcr Y)."""
    diff = (y_channel(sr) - y_channel(hr)) / 255.0
    return float(10.0 * np.log10(1.0 / (np.mean(diff * diff) + 1e-8)))


def _gauss_valid(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian filter with 'valid' borders over the last two axes."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma * sigma))
    g /= g.sum()
    h, w = x.shape[-2:]
    rows = sum(g[k] * x[..., :, k : k + w - size + 1] for k in range(size))
    return sum(g[k] * rows[..., k : k + h - size + 1, :] for k in range(size))


def ssim_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """SSIM on Y rounded to 0..255 (MATLAB; = pyiqa ssim, ycbcr Y) of HxWx3 RGB arrays in [0, 1]."""
    x, y = np.round(y_channel(sr)), np.round(y_channel(hr))
    if min(x.shape) < 11:
        raise ValueError(f"image {x.shape[1]}x{x.shape[0]} is smaller than the 11x11 SSIM window")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2, xx, yy, xy = _gauss_valid(np.stack([x, y, x * x, y * y, x * y]))
    s11, s22, s12 = xx - mu1 * mu1, yy - mu2 * mu2, xy - mu1 * mu2
    cs = np.maximum((2 * s12 + c2) / (s11 + s22 + c2), 0.0)
    return float(np.mean((2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1) * cs))
