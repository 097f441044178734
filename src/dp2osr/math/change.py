"""Did a model change the held-out Mean@M beyond the noise? The change between two pools of the same images
and seeds, its standard error (`bestm.paired_change`) and one plain sentence saying so — pure functions on
reward tables, no I/O. Used by ``report`` (the verdict under the Best/Mean/Worst@M plot) and ``quickstart``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dp2osr.math import bestm

NOISE_METHOD = (
    "Standard error of the change of Mean@M: each held-out image's reward is averaged over its M seeds, the "
    "change is after minus before per image (same images, same seeds), and the standard error is the std of "
    "those per-image changes (ddof 1) over the square root of the number of images N; the seed-to-seed noise is "
    "part of every per-image change. With one image: the seed-to-seed standard error of the per-seed changes. "
    "Beyond noise means a change larger than the two-sided 95 % threshold of Student's t with N - 1 degrees of "
    "freedom, in standard errors (2.36 for 8 images, 12.7 for 2, 1.96 for many)."
)


def _num(x: float, signed: bool = False) -> str:
    text = f"{x:+.4f}" if signed else f"{x:.4f}"
    if x != 0 and abs(x) < 0.001:  # too small for 4 decimals: 2 significant digits
        text = f"{x:+.1e}" if signed else f"{x:.1e}"
    return text.replace("-", "−")


def change_sentence(change: dict, before: str = "the base model", after: str = "DP²O") -> str:
    """One plain sentence: did ``after`` change the held-out Mean@M beyond the noise (see NOISE_METHOD)?

    ``change`` is a `pool_change` dict: ``delta``, ``se`` (its standard error), ``df`` and ``m``.
    """
    delta, se, df = change["delta"], change["se"], change["df"]
    head = f"Mean@{change['m']} changed by {_num(delta, True)} ({after} minus {before})"
    threshold = bestm.t95(df)
    if not (np.isfinite(se) and np.isfinite(threshold)):
        return f"{head}; with one image and one seed there is no noise estimate, so this cannot be told from noise."
    noise = f"the standard error of this change is {_num(se)}"
    if abs(delta) <= threshold * se:
        return f"{head}; {noise}, so this is within noise: no measurable change of the held-out reward."
    verb = "improved" if delta > 0 else "lowered"
    times = f"{abs(delta) / se:.1f} standard errors" if se > 0 else "a change with no spread at all"
    return (
        f"{after} {verb} the held-out reward beyond the noise: {head}; {noise}, so the change is {times} "
        f"(beyond noise: more than {threshold:.2f})."
    )


def pool_change(before: pd.DataFrame, after: pd.DataFrame, column: str = "reward") -> dict:
    """The change of Mean@M over the images and seeds both pools have: ``{delta, se, df, m}``
    (`bestm.paired_change`)."""
    keys = before[["image_id", "seed"]].merge(after[["image_id", "seed"]])
    if keys.empty:
        raise ValueError("the pools share no (image, seed)")
    mats = [bestm.rewards_matrix(df.merge(keys), column)[2] for df in (before, after)]
    delta, se, df = bestm.paired_change(*mats)
    return {"delta": delta, "se": se, "df": df, "m": mats[0].shape[1]}
