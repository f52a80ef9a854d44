"""pyramid/shard.py: every item in exactly one share, balanced, for 1..N processes."""

import pytest

from pyramid.shard import shard_for_rank


@pytest.mark.parametrize("count", [0, 1, 2, 7, 64, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shares_are_disjoint_complete_and_balanced(count, world_size):
    items = [f"{i:05d}.png" for i in range(count)]
    shares = [shard_for_rank(items, rank, world_size) for rank in range(world_size)]
    assert [item for share in shares for item in share] == items  # disjoint, complete, in order
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_fewer_items_than_processes_leaves_empty_shares():
    assert [shard_for_rank(["a"], rank, 3) for rank in range(3)] == [["a"], [], []]


def test_bad_rank_is_refused():
    with pytest.raises(ValueError):
        shard_for_rank([1, 2], 2, 2)
