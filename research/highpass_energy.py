"""How grainy a quickstart run's held-out outputs became: luma high-pass energy before vs after DP²O.

For each RUN (a `dp2osr quickstart` output folder, or a seed folder of `scripts/ablations.py`), the mean over
the held-out candidates of the standard deviation of Y − Gaussian(Y, σ = 1 px) (BT.601 luma, 0..255), for the
first evaluated pool (the base ControlNet) and the last (DP²O), and for the held-out HR crops:

    python research/highpass_energy.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

LUMA = np.array([0.299, 0.587, 0.114])


def energy(path: Path) -> float:
    y = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) @ LUMA
    return float((y - gaussian_filter(y, 1.0)).std())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    for run in p.parse_args(argv).runs:
        steps = sorted((run / "6_eval").glob("step_*"))
        if not steps:
            raise SystemExit(f"{run}: no 6_eval/step_* folders (not a quickstart output?)")
        base, final = ([energy(p) for p in s.glob("*/seed_*.png")] for s in (steps[0], steps[-1]))
        hr = [energy(p) for p in (run / "1_degrade" / "heldout" / "hr").glob("*.png")]
        print(
            f"{run}: base {np.mean(base):.3f}, DP²O {np.mean(final):.3f} ({np.mean(final) / np.mean(base) - 1:+.1%}), "
            f"HR {np.mean(hr):.3f}"
        )


if __name__ == "__main__":
    main()
