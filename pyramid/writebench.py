"""The write figures of pyramid.bench: the run's Writer alone, the GIL a writer thread takes, where the files went.

The write bound is files/s and MB/s of ready CPU batches split into files; the levers are the serialiser
(ArchiveLayout, or torch.save as before it) and the writer threads; the regime says whether the bytes stayed
in memory (tmpfs), waited in the page cache, or went at the disk's pace.
"""

import math
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from pyramid.cli import LazyModule
from pyramid.levels import build_pyramid
from pyramid.team import usable_memory
from pyramid.writer import SERIALISERS, Writer

# Loaded by the first measurement, so pyramid.bench's --help and bad arguments answer at once.
torch = LazyModule("torch")


def measure_write(output_dir, hidden_size, grid_size, batch_size, count, threads, serialise="layout", sync=False):
    """Files/s and MB/s of the run's Writer alone: ready CPU fp32 batches split into files on the disk
    of `output_dir` (in a temporary directory inside it, removed after). With `sync` the clock stops
    only once the files are on the disk (os.sync): the disk's pace, not the page cache's. Returns
    (files/s, MB/s, the serialiser the files were made by: "layout" or "torch.save")."""

    levels = build_pyramid(torch.randn(batch_size, grid_size * grid_size, hidden_size), grid_size)
    directory = Path(tempfile.mkdtemp(prefix="pyramid-write-bound-", dir=output_dir))
    try:
        writer = Writer(directory, threads=threads, serialise=serialise)
        batches = max(1, math.ceil(count / batch_size))
        started = time.perf_counter()
        for batch in range(batches):
            writer.submit_batch([f"{batch * batch_size + i:06d}.pt" for i in range(batch_size)], levels)
        writer.close()
        if sync:
            os.sync()
        seconds = time.perf_counter() - started
        file_bytes = (directory / "000000.pt").stat().st_size
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    files = batches * batch_size
    by_layout = writer.layouts and all(layout is not None for layout in writer.layouts.values())
    used = "layout" if by_layout else "torch.save"
    return files / seconds, files * file_bytes / seconds / 1e6, used


def measure_writer_gil(output_dir, hidden_size, grid_size, batch_size, serialise, rounds=5):
    """Milliseconds per file for which one writer thread keeps the other Python threads (the run loop) from
    running: a thread beside it wants the GIL all the time, and the time it spends blocked (neither running
    nor waiting for a core: /proc's schedstat tells those apart, so other jobs on the machine do not count)
    while the writer writes `batch_size` files, less what it spends blocked while the writer idles, is the
    writer's GIL. The median of `rounds`; None where /proc has no schedstat."""

    levels = build_pyramid(torch.randn(batch_size, grid_size * grid_size, hidden_size), grid_size)
    directory = Path(tempfile.mkdtemp(prefix="pyramid-write-gil-", dir=output_dir))
    stop, ident = threading.Event(), []

    def want_the_gil():
        ident.append(threading.get_native_id())
        while not stop.is_set():
            pass

    def blocked_during(work):
        """Seconds the GIL-wanting thread was blocked while `work()` ran, and the seconds it ran."""
        schedstat = Path(f"/proc/self/task/{ident[0]}/schedstat")
        on_cpu, waiting = map(int, schedstat.read_text().split()[:2])
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        on_cpu_after, waiting_after = map(int, schedstat.read_text().split()[:2])
        return seconds - (on_cpu_after - on_cpu + waiting_after - waiting) / 1e9, seconds

    wanting = threading.Thread(target=want_the_gil, daemon=True)
    wanting.start()
    held = []
    try:
        while not ident:
            time.sleep(0.001)
        if not Path(f"/proc/self/task/{ident[0]}/schedstat").exists():
            return None
        for number in range(rounds + 1):  # the first round makes the layout and warms the page cache
            idle_blocked, idle_seconds = blocked_during(lambda: time.sleep(0.05))
            writer = Writer(directory / str(number), threads=1, serialise=serialise)

            def write(writer=writer):
                writer.submit_batch([f"{i:06d}.pt" for i in range(batch_size)], levels)
                writer.close()

            blocked, seconds = blocked_during(write)
            if number:
                held.append(max(0.0, blocked - idle_blocked / idle_seconds * seconds) / batch_size * 1e3)
    finally:
        stop.set()
        wanting.join()
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    return statistics.median(held)


def write_levers(output_dir, hidden_size, grid_size, batch_size, count, thread_counts, rounds=1):
    """The write bound per serialiser (the run's ArchiveLayout, and torch.save as before it) and writer thread
    count, and the GIL each serialiser holds per file, in `rounds` interleaved rounds (medians)::

        {"files_per_second": {"layout": {"1": ..., "2": ...}, "torch.save": {...}},
         "gil_ms_per_file": {"layout": ..., "torch.save": ...}, "serialiser": "layout", "regime": "page cache"}
    """

    rates = {serialise: {str(threads): [] for threads in thread_counts} for serialise in SERIALISERS}
    gil = {serialise: [] for serialise in SERIALISERS}
    used = set()
    for _ in range(rounds):
        for serialise in SERIALISERS:
            for threads in thread_counts:
                rate, megabytes, made_by = measure_write(output_dir, hidden_size, grid_size, batch_size, count,
                                                         threads, serialise)
                rates[serialise][str(threads)].append(rate)
                if serialise == "layout":
                    used.add(made_by)
            gil[serialise].append(measure_writer_gil(output_dir, hidden_size, grid_size, batch_size, serialise,
                                                     rounds=3))
    file_bytes = megabytes / rate * 1e6
    return {"files_per_second": {serialise: {threads: statistics.median(values) for threads, values in per.items()}
                                 for serialise, per in rates.items()},
            "gil_ms_per_file": {serialise: None if None in values else statistics.median(values)
                                for serialise, values in gil.items()},
            "serialiser": "layout" if used == {"layout"} else "torch.save",
            "regime": write_regime(output_dir, count * file_bytes), "files": count, "rounds": rounds}


def write_regime(directory, written_bytes):
    """Where `written_bytes` written into `directory` went: "memory (tmpfs)"; "page cache" while they
    stay under the kernel's dirty limits (no writer waited for the disk); else "disk" (past them the
    kernel holds writers to the disk's pace)."""
    if _filesystem_type(directory) in ("tmpfs", "ramfs"):
        return "memory (tmpfs)"
    limit = dirty_limit_bytes()
    return "page cache" if limit is None or written_bytes < limit else "disk"


def dirty_limit_bytes():
    """The dirty page cache (bytes) a writer may fill before Linux slows it to the disk's pace: halfway
    between the background and the hard dirty thresholds, of the memory available to this process (within
    its cgroups' limits, as the kernel counts them per cgroup); None off Linux."""
    try:
        settings = {name: int(Path(f"/proc/sys/vm/{name}").read_text()) for name in
                    ("dirty_bytes", "dirty_ratio", "dirty_background_bytes", "dirty_background_ratio")}
    except (OSError, ValueError):
        return None
    available = usable_memory()
    if available is None:
        return None
    hard = settings["dirty_bytes"] or available * settings["dirty_ratio"] // 100
    background = settings["dirty_background_bytes"] or available * settings["dirty_background_ratio"] // 100
    return (hard + background) // 2


def _filesystem_type(directory):
    """The type of the filesystem `directory` is on, from /proc/mounts ("ext4", "tmpfs", ...); None if unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = os.path.realpath(directory)
    best = max((point for point in mounts if path == point[0] or path.startswith(point[0].rstrip("/") + "/")),
               key=lambda point: len(point[0]), default=None)
    return best[1] if best else None
