"""pyramid/shard.py: chunks claimed through a shared counter give every item to exactly one process."""

import threading
import time

import pytest
import torch.distributed as dist

from pyramid.shard import CHUNKS_PER_PROCESS, CLAIM_KEY, MAX_CHUNK, ChunkSampler, chunk_size_for, chunk_range
from pyramid.team import Team


@pytest.mark.parametrize("count, world_size, expected", [
    (0, 1, 1), (13, 4, 1), (400, 2, 25), (70_000, 64, 137), (10_000_000, 8, MAX_CHUNK)])
def test_chunk_size(count, world_size, expected):
    assert chunk_size_for(count, world_size) == expected


def test_chunks_cover_the_list_once():
    assert [list(chunk_range(c, 3, 7)) for c in range(4)] == [[0, 1, 2], [3, 4, 5], [6], []]


def samplers_over_one_store(world_size, total, chunk_size):
    store = dist.HashStore()
    teams = [Team(rank, world_size, store) for rank in range(world_size)]
    return [ChunkSampler(total, chunk_size, lambda team=team: team.add(CLAIM_KEY) - 1) for team in teams]


@pytest.mark.parametrize("world_size, total", [(1, 0), (1, 10), (2, 101), (3, 7), (8, 3)])
def test_concurrent_processes_take_every_item_once(world_size, total):
    samplers = samplers_over_one_store(world_size, total, chunk_size_for(total, world_size))
    taken = [[] for _ in samplers]
    threads = [threading.Thread(target=lambda s=s, out=out: out.extend(s)) for s, out in zip(samplers, taken)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(i for share in taken for i in share) == list(range(total))


def test_a_slow_process_takes_less():
    total = 2 * 16 * CHUNKS_PER_PROCESS
    fast, slow = samplers_over_one_store(2, total, chunk_size_for(total, 2))
    taken = {"fast": [], "slow": []}

    def consume(sampler, name, seconds_per_item):
        for index in sampler:
            taken[name].append(index)
            time.sleep(seconds_per_item)

    threads = [threading.Thread(target=consume, args=(fast, "fast", 0.001)),
               threading.Thread(target=consume, args=(slow, "slow", 0.01))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(taken["fast"] + taken["slow"]) == list(range(total))
    assert len(taken["fast"]) > 3 * len(taken["slow"]), {k: len(v) for k, v in taken.items()}


def test_a_world_without_processes_is_refused():
    with pytest.raises(ValueError):
        chunk_size_for(5, 0)
