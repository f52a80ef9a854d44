"""Split the to-do list across processes: disjoint, balanced, no padding."""


def shard_for_rank(items, rank, world_size):
    """The share of `items` that process `rank` of `world_size` handles.

    Contiguous blocks whose sizes differ by at most one; every item lands in exactly one share,
    and a share may be empty when there are fewer items than processes. Contiguous keeps each
    process's files together on disk, which is kinder to the file system than a stride.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (1 if rank < extra else 0)]
