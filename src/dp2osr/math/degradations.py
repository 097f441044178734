"""Degradation presets: overrides of `dp2osr degrade`'s Real-ESRGAN x4plus defaults, by name.

``mild``: lighter blur, noise and JPEG and smaller resize swings than Real-ESRGAN's — what everyday photos
look like, and the range the embedded model was trained on (scripts/train_embedded.py), so the quickstart's
crops are in its range.
"""

from __future__ import annotations

MILD: dict = {
    "kernel_range": [7, 15],
    "sinc_prob": 0.05,
    "blur_sigma": [0.2, 1.5],
    "resize_prob": [0.2, 0.5, 0.3],
    "resize_range": [0.5, 1.5],
    "noise_range": [1.0, 8.0],
    "poisson_scale_range": [0.05, 1.0],
    "jpeg_range": [60, 95],
    "second_blur_prob": 0.5,
    "sinc_prob2": 0.05,
    "blur_sigma2": [0.2, 1.0],
    "resize_range2": [0.5, 1.2],
    "noise_range2": [1.0, 5.0],
    "poisson_scale_range2": [0.05, 0.5],
    "jpeg_range2": [70, 95],
    "final_sinc_prob": 0.3,
}

#: name -> overrides of the Real-ESRGAN x4plus defaults (``realesrgan``: none)
PRESETS: dict[str, dict] = {"realesrgan": {}, "mild": MILD}
