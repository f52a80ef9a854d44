"""pyramid/chunks.py: chunks claimed through a shared counter give every item to exactly one process."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch.distributed as dist

import warm
from conftest import REPO, free_port, write_images
from pyramid.chunks import CHUNKS_PER_PROCESS, CLAIM_KEY, MAX_CHUNK, ChunkSampler, chunk_range, chunk_size_for
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


BURNERS = 2


def pin(pid, core):
    """Every thread of process `pid` to `core` (taskset -a)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), {core})
        except ProcessLookupError:
            pass  # a thread that ended


def test_a_straggler_does_less_and_every_image_is_written_once(tmp_path, tiny_model):
    """Two real processes on two cores; rank 0 shares its core with BURNERS busy loops, rank 1 has its own.

    The slow one is rank 0, the main process, which also starts encoding first (it planned while
    rank 1 waited): with a fixed split each would do half, with chunks claimed on demand rank 1 does
    clearly more. Prints the counts (pytest -s) for the record.
    """
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to pin a slow and a free process apart")
    slow_core, free_core = sorted(os.sched_getaffinity(0))[:2]
    count = 400
    write_images(tmp_path / "in", count)
    port = free_port()
    processes, burners = [], []
    try:
        for rank, core in ((0, slow_core), (1, free_core)):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1")
            processes.append(warm.Popen(
                [sys.executable, str(REPO / "extract_distributed.py"),
                 "--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                 "--model", str(tiny_model), "--batch_size", "2", "--num_workers", "0"],
                env=env, stderr=subprocess.PIPE, text=True))
            pin(processes[-1].pid, core)
        # The busy loops start with the encoding, so they slow rank 0's work, not its start-up.
        deadline = time.monotonic() + 300
        while not list((tmp_path / "out").glob("*.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Rank 0's main thread, which encodes, also yields to the loops (nice 19): it stays the slow one
        # however loaded the machine is.
        for process, core in zip(processes, (slow_core, free_core)):
            pin(process.pid, core)  # again: threads started before the first pinning keep their first affinity
        os.setpriority(os.PRIO_PROCESS, processes[0].pid, 19)
        burners = [subprocess.Popen(["taskset", "-c", str(slow_core), sys.executable, "-c", "while True: pass"])
                   for _ in range(BURNERS)]
        # Once every file exists the straggler gets its core back, so its exit is not slow too.
        while len(list((tmp_path / "out").glob("*.pt"))) < count and time.monotonic() < deadline + 300:
            time.sleep(0.1)
        for burner in burners:
            burner.kill()
        os.setpriority(os.PRIO_PROCESS, processes[0].pid, 0)
        logs = [process.communicate(timeout=600)[1] for process in processes]
    finally:
        for process in processes + burners:
            process.kill()
            process.wait()
    assert [process.returncode for process in processes] == [0, 0], logs
    summary = [line for line in logs[0].splitlines() if line.startswith("done: ")][0]
    print(summary)
    assert summary.startswith(f"done: {count} written, 0 skipped")  # each image once, not twice
    slow, free = map(int, summary.rpartition("per process: ")[2].split(", "))
    assert slow + free == count and len(list((tmp_path / "out").glob("*.pt"))) == count
    assert free > 1.5 * slow, summary

