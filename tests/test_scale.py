"""What keeps working at the paper's scale: the keyed data order (O(1) per example) and `score` sharded over
processes."""

from __future__ import annotations

import pytest

from dp2osr.engine.train_data import KEYED_ORDER_ABOVE, batch_indices, epoch_position
from dp2osr.math.permutation import permuted


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097])
def test_keyed_permutation_is_a_permutation(n):
    for key in ("0:0", "0:1", "5:0"):
        assert sorted(permuted(i, n, key) for i in range(n)) == list(range(n))


def test_keyed_permutation_is_deterministic_and_differs_per_key():
    n = 1000
    a = [permuted(i, n, "3:0") for i in range(n)]
    assert a == [permuted(i, n, "3:0") for i in range(n)]
    assert a != list(range(n))
    assert a != [permuted(i, n, "3:1") for i in range(n)]  # another epoch
    assert a != [permuted(i, n, "4:0") for i in range(n)]  # another seed
    with pytest.raises(ValueError, match="outside range"):
        permuted(n, n, "3:0")


def test_large_pools_use_the_keyed_order_small_ones_the_seeded_randperm():
    big = KEYED_ORDER_ABOVE + 3
    assert [epoch_position(big, 2, 1, i) for i in range(20)] == [permuted(i, big, "2:1") for i in range(20)]
    assert [epoch_position(big, 2, 1, i) for i in range(20)] != [
        epoch_position(big, 2, 2, i) for i in range(20)
    ]


def test_keyed_order_slices_are_disjoint_and_cover_each_epoch():
    """Above the threshold the (step, micro, rank) slices still cut one stream of whole epoch permutations:
    every example once per epoch, no index twice in a step, the same indices whatever order they are asked in."""
    n, seed, batch, accum, world = KEYED_ORDER_ABOVE + 11, 7, 64, 4, 4
    per_step = batch * accum * world
    steps = -(-2 * n // per_step)  # a little over two epochs

    def step_indices(step):
        return [
            i
            for micro in range(accum)
            for rank in range(world)
            for i in batch_indices(n, step, micro, rank, batch, accum, world, seed)
        ]

    stream = [i for step in range(steps) for i in step_indices(step)]
    for step in range(steps):
        assert len(set(stream[step * per_step : (step + 1) * per_step])) == per_step
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n : 2 * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]
    # a resumed run asks for step 5 alone and gets what the uninterrupted run got
    assert step_indices(5) == stream[5 * per_step : 6 * per_step]
    # another seed, another order
    assert batch_indices(n, 0, 0, 0, batch, accum, world, seed + 1) != stream[:batch]
