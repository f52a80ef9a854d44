"""Share the to-do list among processes: each claims the next small chunk when it is ready for more."""

import math

import torch

# A chunk is this many images at most. The cost of a claim is one store.add round trip (well under
# a millisecond on a TCPStore): at 64 processes of ~300 images/s each (dinov2-base on an H100),
# chunks of 256 mean ~75 claims/s on the store, against the tens of thousands of small requests/s
# it serves, and next to the one heartbeat/s each process already sends. Smaller chunks would only
# add claims; larger ones make the last process to finish keep the others waiting for longer.
MAX_CHUNK = 256
# Aim for at least this many chunks per process, so a process at half speed ends up doing about half
# as much, and the tail, when some processes have nothing left, is at most one chunk long.
CHUNKS_PER_PROCESS = 8
CLAIM_KEY = "next_chunk"


def chunk_size_for(todo_count, world_size):
    """Images per chunk for `todo_count` images on `world_size` processes: CHUNKS_PER_PROCESS chunks
    per process, at most MAX_CHUNK images, at least 1. 70,000 images on 64 processes -> 137."""
    if world_size < 1:
        raise ValueError(f"a run needs at least one process, not {world_size}")
    return max(1, min(MAX_CHUNK, math.ceil(todo_count / (world_size * CHUNKS_PER_PROCESS))))


def chunk_range(chunk, chunk_size, total):
    """The indices of chunk number `chunk`: a contiguous run of the sorted to-do list, so a process's
    files lie together in their directories. Empty past the end."""
    start = chunk * chunk_size
    return range(min(start, total), min(start + chunk_size, total))


class ChunkSampler(torch.utils.data.Sampler):
    """The DataLoader's indices into the whole to-do list, claimed a chunk at a time as it asks for them.

    `claim()` returns the next chunk number not yet taken by any process (a shared counter, e.g.
    `team.add(CLAIM_KEY) - 1`), so every index goes to exactly one process and a slow one simply
    claims less. The DataLoader iterates its sampler in the main process, a few batches ahead of the
    model (its prefetch), so a process never holds more than one chunk and those few batches.
    """

    def __init__(self, total, chunk_size, claim):
        super().__init__()
        self.total = total
        self.chunk_size = chunk_size
        self.claim = claim

    def __iter__(self):
        while True:
            indices = chunk_range(self.claim(), self.chunk_size, self.total)
            if not indices:
                return
            yield from indices
