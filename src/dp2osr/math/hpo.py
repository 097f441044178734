"""Preference-pair curation and Hierarchical Preference Optimization weights (arXiv 2510.18851, §3).

Conventions where the paper is silent: ties in reward are broken by seed ascending; N from a ratio is
``max(1, floor(ratio · M + 0.5))``; σ_g is the population standard deviation (ddof = 0) of a group's M rewards.
"""

from __future__ import annotations

import math

import numpy as np

#: Which HPO levels weight the loss: both, only the intra-group one, only the inter-group one, or none.
HPO_MODES = ("both", "intra", "inter", "none")


def n_from_ratio(m: int, ratio: float) -> int:
    """N winners (and N losers) for a group of M candidates: N = max(1, round(ratio · M)), half rounded up.

    Example: M = 32, ratio = 1/4 -> N = 8; M = 64, ratio = 1/16 -> N = 4; M = 2, ratio = 1/4 -> N = 1.
    """
    if m < 1:
        raise ValueError(f"group size M must be >= 1, got {m}")
    if not 0 < ratio <= 0.5:
        raise ValueError(f"ratio must be in (0, 0.5] (N winners + N losers <= M), got {ratio!r}")
    return max(1, math.floor(ratio * m + 0.5))


def select_pairs(rewards: np.ndarray, seeds: np.ndarray, n: int) -> list[tuple[int, int]]:
    """All N×N (winner, loser) pairs of one group (arXiv 2510.18851).

    Args:
        rewards: ``(M,)`` hybrid rewards of one image's candidates (higher is better).
        seeds: ``(M,)`` their sampling seeds (unique); ties in reward go to the lower seed.
        n: N, the number of winners and of losers; needs 2N <= M.

    Returns:
        ``N·N`` pairs ``(win_idx, lose_idx)`` of indices into ``rewards``, ordered by winner rank (best
        first), then by loser rank (from the best of the losers to the worst candidate).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    seeds = np.asarray(seeds)
    if rewards.ndim != 1 or seeds.shape != rewards.shape:
        raise ValueError(
            f"rewards and seeds must be (M,) vectors of one length, got {rewards.shape}, {seeds.shape}"
        )
    m = len(rewards)
    if n < 1 or 2 * n > m:
        raise ValueError(f"N must satisfy 1 <= N and 2N <= M, got N={n}, M={m}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"rewards must be finite, got {rewards[~np.isfinite(rewards)].tolist()}")
    if len(np.unique(seeds)) != m:
        raise ValueError(f"seeds within a group must be unique, got {seeds.tolist()}")
    order = np.lexsort((seeds, -rewards))  # primary key: reward descending; secondary: seed ascending
    winners, losers = order[:n], order[m - n :]
    return [(int(w), int(lo)) for w in winners for lo in losers]


def intra_weights(gaps: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
    """Intra-group HPO weights (arXiv 2510.18851): w_intra = |R_w − R_l| + (1 − μ_gap(g)).

    Args:
        gaps: ``(P,)`` reward gaps of the pairs (the absolute value is taken).
        group_ids: ``(P,)`` the group (image id) of each pair.

    Returns:
        ``(P,)`` weights; within each group they average exactly 1. Non-negative when rewards lie in [0, 1].
    """
    gaps = np.abs(np.asarray(gaps, dtype=np.float64))
    group_ids = np.asarray(group_ids)
    if gaps.ndim != 1 or group_ids.shape != gaps.shape:
        raise ValueError(
            f"gaps and group_ids must be (P,) vectors of one length, got {gaps.shape}, {group_ids.shape}"
        )
    _, inverse = np.unique(group_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    mean_gap = np.bincount(inverse, weights=gaps) / np.bincount(inverse)
    return gaps + (1.0 - mean_gap[inverse])


def inter_weights(group_stds: np.ndarray) -> np.ndarray:
    """Inter-group HPO weights (arXiv 2510.18851): w_inter(g) = σ_g + (1 − μ_σ).

    Args:
        group_stds: ``(G,)`` σ_g, the population std (ddof = 0) of the rewards of all M candidates of group g.

    Returns:
        ``(G,)`` weights averaging exactly 1 over the groups.
    """
    stds = np.asarray(group_stds, dtype=np.float64)
    if stds.ndim != 1 or len(stds) == 0:
        raise ValueError(f"group_stds must be a non-empty (G,) vector, got shape {stds.shape}")
    return stds + (1.0 - stds.mean())
