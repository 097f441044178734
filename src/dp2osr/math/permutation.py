"""A keyed permutation of ``range(n)`` evaluated one index at a time: the training data order at any size.

``permuted(i, n, key)`` is the position-``i`` element of a pseudo-random permutation of ``range(n)`` chosen by
``key``, in O(1) time and memory per index (no permutation is materialised). It is a Feistel network over
``2**m`` values (the smallest power of two >= n; the two halves may differ by one bit) with cycle walking: the
network is applied again while the value is ``>= n``, which keeps it a bijection on ``range(n)`` and takes
fewer than 2 applications on average. The round function is the SplitMix64 finaliser of the half and its
round key; the four 64-bit round keys come from a BLAKE2b hash of the caller's key.
"""

from __future__ import annotations

import functools
import hashlib

ROUNDS = 4
_M64 = (1 << 64) - 1


@functools.lru_cache(maxsize=64)
def round_keys(key: str) -> tuple[int, ...]:
    """The ``ROUNDS`` 64-bit round keys of ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8 * ROUNDS, person=b"dp2osr-order").digest()
    return tuple(int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(ROUNDS))


def _mix(x: int, k: int) -> int:
    z = (x + k) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _feistel(x: int, bits: int, keys: tuple[int, ...]) -> int:
    """One application of the network: a bijection of ``range(2**bits)``."""
    a, b = bits // 2, bits - bits // 2  # widths of the left and right halves
    left, right = x >> b, x & ((1 << b) - 1)
    for k in keys:
        # (L, R) -> (R, L ^ F(R)): invertible whatever F is; the halves swap widths
        left, right = right, left ^ (_mix(right, k) & ((1 << a) - 1))
        a, b = b, a
    return (left << b) | right


def permuted(i: int, n: int, key: str) -> int:
    """Element ``i`` (0 <= i < n) of the permutation of ``range(n)`` chosen by ``key``."""
    if not 0 <= i < n:
        raise ValueError(f"index {i} is outside range({n})")
    bits, keys = (n - 1).bit_length(), round_keys(key)
    x = _feistel(i, bits, keys)
    while x >= n:  # cycle walking: stays in i's cycle, so the result is unique to i
        x = _feistel(x, bits, keys)
    return x
