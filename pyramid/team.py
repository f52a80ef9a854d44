"""The processes of one run and what they share, over the process group's key-value store.

No collective ever runs inside the loop: the to-do list is set once by the main process and read
by the others, counts are added to store counters, and each process beats a heartbeat counter and
publishes its done count, so that a process waiting at the end can tell a slow peer from a dead or
stuck one and never hangs.
"""

import os
import pickle
import threading
import time
from collections import defaultdict
from pathlib import Path

KEY_PREFIX = "pyramid/"
HEARTBEAT_SECONDS = 1.0
# A peer whose heartbeat has not moved for this long is taken for dead and not waited for.
STALE_AFTER_SECONDS = 120.0
# The same for a process that is stopping on SIGINT/SIGTERM: its launcher is tearing the team down
# (torchrun SIGTERMs the survivors of a dead rank and SIGKILLs them 30 s later), so it waits only
# for peers still beating, long enough to hear a few of their beats...
STOPPING_STALE_AFTER_SECONDS = 5.0
# ... and for none, beating or not, past this long after the stop: a peer stuck with its signals
# masked beats on (its heartbeat thread runs) but never ends, and the main process must still write
# its runs.jsonl line well within the launcher's 30 s.
STOPPING_WAIT_SECONDS = 15.0


def usable_cpus():
    """The CPUs this process may run on (its affinity mask: a SLURM allocation, taskset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpus_per_process():
    """This process's share of `usable_cpus()` among the node's processes of the run (LOCAL_WORLD_SIZE), at least 1."""
    return max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def usable_memory():
    """Bytes of memory this process may still take, or None where unknown: the kernel's MemAvailable,
    within the limits of this process's cgroups (a SLURM job, a container may be allowed less)."""
    available = None
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    left = _cgroup_memory_left()
    return left if available is None else available if left is None else min(available, left)


def _cgroup_memory_left(membership=Path("/proc/self/cgroup"), hierarchy=Path("/sys/fs/cgroup")):
    """Bytes the memory limits of this process's cgroup and the groups above it still allow (cgroup v2,
    or v1's memory controller), or None without a limit: a SLURM job or a container may be allowed
    less than the machine has."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    left = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, limit_name, usage_name = hierarchy, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit_name, usage_name = (hierarchy / "memory", "memory.limit_in_bytes",
                                            "memory.usage_in_bytes")
        else:
            continue
        group = root / path.lstrip("/")
        for directory in (group, *group.parents):
            if directory != root and root not in directory.parents:
                break
            try:
                limit = (directory / limit_name).read_text().strip()
                if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number
                    room = max(0, int(limit) - int((directory / usage_name).read_text()))
                    left = room if left is None else min(left, room)
            except (OSError, ValueError):
                pass
    return left


def start_process_group():
    """Start the process group on the launcher's store under a prefix of this attempt, before accelerate
    would start it on the bare store; a no-op but under torchrun with two or more processes.

    torchrun keeps one store (its agent's: TORCHELASTIC_USE_AGENT_STORE) for every attempt of a run it
    restarts (--max_restarts, static rendezvous), and the restarted group's backend would read the failed
    attempt's addresses from it: gloo fails to connect, NCCL may hang. Accelerate's PartialState then
    takes the group as it is. The restart count is the same in every process of one node's attempt; a
    multi-node run's agents do not restart together under static rendezvous (docs/scale.md).
    """
    environ = os.environ
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(environ.get("WORLD_SIZE", "1")) < 2:
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), int(environ["WORLD_SIZE"]),
                          is_master=False, timeout=timedelta(minutes=30))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            store=dist.PrefixStore(f"attempt_{attempt}/", store), rank=int(environ["RANK"]),
                            world_size=int(environ["WORLD_SIZE"]), timeout=timedelta(minutes=30))


class Team:
    """Rank, world size and shared counters of the run; with no store it is a team of one."""

    def __init__(self, rank=0, world_size=1, store=None, attempt=0):
        self.rank = rank
        self.world_size = world_size
        self.store = store
        # Keys of their own per attempt: a launcher that restarts the team (torchrun's --max_restarts)
        # may keep its store, and the restarted team must not read the failed attempt's plan, claims
        # and counts.
        self.prefix = f"{KEY_PREFIX}{attempt}/"
        self._lock = threading.Lock()
        self._local = defaultdict(int)
        self._beating = None

    @classmethod
    def from_state(cls, state):
        """The team of an accelerate PartialState: its store when distributed, else a team of one."""
        if state.num_processes == 1:
            return cls()
        import torch.distributed as dist

        return cls(state.process_index, state.num_processes, dist.distributed_c10d._get_default_store(),
                   attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0))

    @property
    def is_main(self):
        return self.rank == 0

    def add(self, key, amount=1):
        """Add `amount` to the shared counter `key` and return its new value (amount 0 reads it)."""
        with self._lock:
            if self.store is None:
                self._local[key] += amount
                return self._local[key]
            return self.store.add(self.prefix + key, amount)

    def share(self, key, value):
        """The main process's `value` for `key`, in every process (the others' `value` is ignored)."""
        if self.store is None:
            return value
        if self.is_main:
            with self._lock:
                self.store.set(self.prefix + key, pickle.dumps(value))
            return value
        with self._lock:
            return pickle.loads(self.store.get(self.prefix + key))

    def post(self, kind, text):
        """Add `text` to this process's list of `kind` ("notes", "errors"), for the main process to read."""
        number = self.add(f"{kind}/{self.rank}/count")
        with self._lock:
            if self.store is None:
                self._local[f"{kind}/{self.rank}/{number}"] = text
            else:
                self.store.set(f"{self.prefix}{kind}/{self.rank}/{number}", text.encode())

    def posts(self, kind):
        """Every process's texts of `kind`, in rank order, each in the order posted."""
        texts = []
        for rank in range(self.world_size):
            for number in range(1, self.add(f"{kind}/{rank}/count", 0) + 1):
                with self._lock:
                    if self.store is None:
                        texts.append(self._local[f"{kind}/{rank}/{number}"])
                    else:
                        texts.append(self.store.get(f"{self.prefix}{kind}/{rank}/{number}").decode())
        return texts

    def start_heartbeat(self, on_beat=None):
        """Beat every HEARTBEAT_SECONDS on a daemon thread, calling `on_beat()` each time.

        Store errors (the main process is gone) end the beats; they never raise into the run.
        """
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.add(f"beat/{self.rank}")
                    if on_beat is not None:
                        on_beat()
                except Exception:
                    return

        thread = threading.Thread(target=beat, name="pyramid-heartbeat", daemon=True)
        thread.start()
        self._beating = (stop, thread)

    def stop_heartbeat(self):
        if self._beating is not None:
            stop, thread = self._beating
            stop.set()
            thread.join()
            self._beating = None

    def request_stop(self):
        """Ask every process to stop after the batch in flight (a signal reached this one)."""
        try:
            self.add("stop")
        except Exception:
            pass

    def stop_requested(self):
        try:
            return self.add("stop", 0) > 0
        except Exception:
            return False

    def leave(self):
        """Say this process is done without waiting for the others (it is exiting on an error)."""
        try:
            self.add(f"finished/{self.rank}")
        except Exception:
            pass

    def finish(self, on_wait=None, stale_after=STALE_AFTER_SECONDS, idle_after=None, poll_seconds=0.5,
               stopping=None, stopping_stale_after=STOPPING_STALE_AFTER_SECONDS,
               stopping_wait=STOPPING_WAIT_SECONDS):
        """Say this process is done, then wait until every process is, calling `on_wait()` meanwhile.

        Waiting matters: a launcher that sees one process exit non-zero kills the rest, so nobody
        leaves early. Returns the ranks given up on, an empty list when all finished: a peer whose
        heartbeat is stale for `stale_after` seconds (dead), whose done count (`done/RANK`) has not
        moved for `idle_after` seconds (stuck: its heartbeat thread beats on), or every peer when
        the store is gone. Once `stopping()` is true (a signal came, even during the wait),
        `stopping_stale_after` replaces `stale_after`, and nobody is waited for past `stopping_wait`
        seconds after the stop was seen.
        """
        try:
            self.add(f"finished/{self.rank}")
            last_seen, last_change, stopped_at = {}, {}, None
            while True:
                waiting = [r for r in range(self.world_size) if self.add(f"finished/{r}", 0) == 0]
                if not waiting:
                    return []
                now = time.monotonic()
                for rank in waiting:
                    seen = (self.add(f"beat/{rank}", 0), self.add(f"done/{rank}", 0))
                    previous = last_seen.get(rank)
                    if previous is None or previous[0] != seen[0]:
                        last_change.setdefault(rank, {})["beat"] = now
                    if previous is None or previous[1] != seen[1]:
                        last_change.setdefault(rank, {})["done"] = now
                    last_seen[rank] = seen
                if stopping is not None and stopping() and stopped_at is None:
                    stopped_at = now
                limit = stale_after if stopped_at is None else stopping_stale_after
                gone = [r for r in waiting if now - last_change[r]["beat"] >= limit
                        or idle_after is not None and now - last_change[r]["done"] >= idle_after]
                if stopped_at is not None and now - stopped_at >= stopping_wait:
                    gone = waiting
                if gone:
                    return gone
                if on_wait is not None:
                    on_wait()
                time.sleep(poll_seconds)
        except Exception:
            return [r for r in range(self.world_size) if r != self.rank]
