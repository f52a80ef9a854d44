"""One run at a time per output directory: a lock file naming its run, kept fresh by a heartbeat."""

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pyramid.exits import DamagedFile, UsageError
from pyramid.tree import LOCK_NAME, pid_alive
from pyramid.validate import open_regular

# The holder touches its lock this often; a lock untouched for STALE_AFTER_SECONDS belongs to a run
# that is gone (killed, or on a node that died). The margin covers clock differences between nodes
# and a shared filesystem's attribute caching (NFS caches a file's times for up to 60 s).
REFRESH_SECONDS = 10.0
STALE_AFTER_SECONDS = 120.0


def describe(holder):
    """'host node3, process 4242 (SLURM job 77, run 2)' for a lock's content."""
    text = f"host {holder.get('host', '?')}, process {holder.get('pid', '?')}"
    if holder.get("slurm_job"):
        text += f" (SLURM job {holder['slurm_job']}, run {int(holder.get('slurm_restart', 0)) + 1})"
    return text


def this_run():
    """What a lock says about the run holding it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0), "token": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def why_stale(holder, age_seconds, me, stale_after=STALE_AFTER_SECONDS):
    """Why the run that wrote `holder` is gone, or None while it may be alive.

    `age_seconds`: since the lock was last touched; `me`: this run (`this_run()`).
    """
    if age_seconds > stale_after:
        return f"no heartbeat for {age_seconds:.0f} s"
    if holder.get("slurm_job") and holder.get("slurm_job") == me.get("slurm_job") \
            and int(holder.get("slurm_restart", 0)) < int(me.get("slurm_restart", 0)):
        return "an earlier run of this requeued SLURM job"  # SLURM ends every step of a run before it requeues
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"]):
        return "its process is gone"
    return None


# What a lock holds, each of its type: a torn or foreign file's other values are left out.
LOCK_FIELDS = {"host": str, "pid": int, "slurm_job": str, "slurm_restart": int, "token": str, "started": str}
LOCK_MAX_BYTES = 65536  # a lock is a line of JSON; more is not one


def _read(path):
    """(content, seconds since last touched) of a lock file, or (None, None) when there is none.

    Opening the file before fstat makes a network filesystem revalidate its cached times.
    A torn or foreign file reads as {} and counts by its age alone; so do fields of another type.
    DamagedFile where something other than a regular file has the lock's name (a FIFO would block its
    reader, a directory can never be replaced by a run's lock).
    """
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None, None
    except DamagedFile as error:
        raise DamagedFile(path, f"{error.problem}; it is no lock of a run: remove it") from None
    with os.fdopen(fd, "rb") as file:
        age = time.time() - os.fstat(file.fileno()).st_mtime
        data = file.read(LOCK_MAX_BYTES)
    try:
        content = json.loads(data)
    except ValueError:
        content = {}
    if not isinstance(content, dict):
        return {}, age
    content = {key: value for key, value in content.items() if key in LOCK_FIELDS and type(value) is LOCK_FIELDS[key]}
    if not 0 < content.get("pid", 1) < 1 << 31:  # os.kill(-1, 0) would ask about every process, 2**70 overflows
        del content["pid"]
    return content, age


def live_run(output_dir):
    """'host node3, process 4242 (...)' of the live run holding the lock of `output_dir`, or None: no lock,
    or one left by a run that is gone (the same test a new run makes before it takes a lock over)."""
    holder, age = _read(Path(output_dir) / LOCK_NAME)
    if holder is None or why_stale(holder, age, this_run()) is not None:
        return None
    return describe(holder)


def written_by_another_run(output_dir, holder):
    """The refusal of a launch into `output_dir` while the live run `holder` (`describe`'s words) writes it."""
    return UsageError(f"{output_dir} is being written by another run ({holder}); "
                      f"wait for it to end, or stop it, or use another --output_dir")


def refuse_a_live_run(output_dir):
    """Raise `written_by_another_run` while a live run holds the lock of `output_dir`: the extractor's main
    process looks before torch loads, so a second launch is refused in a fraction of a second, not after
    seconds of imports. Taking the lock (OutputLock.acquire, later) still decides, atomically; a lock that
    cannot be read here for the file system's reasons is left to it. DamagedFile for something other than a
    regular file under the lock's name."""
    try:
        holder = live_run(output_dir)
    except OSError:
        return
    if holder is not None:
        raise written_by_another_run(output_dir, holder)


class OutputLock:
    """The lock of one output directory, held by the main process of a run from planning to the end."""

    def __init__(self, output_dir, refresh_seconds=REFRESH_SECONDS, stale_after=STALE_AFTER_SECONDS):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.refresh_seconds = refresh_seconds
        self.stale_after = stale_after
        self.me = None
        self.taken_over = None  # why the lock of a gone run was replaced, for the log
        self._stop = threading.Event()
        self._thread = None

    def acquire(self):
        """Take the lock of the existing output directory, replacing one left by a run that is gone;
        UsageError while a live run holds it. Taking it again changes nothing."""
        if self.me is not None:
            return self
        me = this_run()
        mine = self.output_dir / f"{LOCK_NAME}.{me['token']}"
        try:
            mine.write_text(json.dumps(me), encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--output_dir {self.output_dir} is not writable") from error
        try:
            for _ in range(3):  # a takeover raced by another launch goes round again
                try:
                    os.link(mine, self.path)  # atomic "create if absent", on NFS too
                    self.me = me
                    break
                except FileExistsError:
                    self._set_aside_if_stale(me)
            else:
                raise UsageError(f"{self.output_dir} is contended by several launches at once; rerun one")
        finally:
            mine.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._refresh, name="pyramid-lock", daemon=True)
        self._thread.start()
        return self

    def _set_aside_if_stale(self, me):
        holder, age = _read(self.path)
        if holder is None:
            return  # released meanwhile: try again
        reason = why_stale(holder, age, me, self.stale_after)
        if reason is None:
            raise written_by_another_run(self.output_dir, describe(holder))
        aside = self.output_dir / f"{LOCK_NAME}.stale.{me['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved, _ = _read(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            # Another launch replaced the stale lock between our read and our rename: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise written_by_another_run(self.output_dir, describe(moved))
        aside.unlink(missing_ok=True)
        self.taken_over = f"took over the lock of {describe(holder)}: {reason}"

    def _holds(self):
        holder, _ = _read(self.path)
        return holder is not None and self.me is not None and holder.get("token") == self.me["token"]

    def _refresh(self):
        while not self._stop.wait(self.refresh_seconds):
            try:
                if not self._holds():
                    return  # taken over after this run stalled for longer than stale_after: not ours now
                os.utime(self.path)
            except OSError:
                pass  # a hiccup of the filesystem; the next beat tries again

    def release(self):
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.me is not None and self._holds():
            self.path.unlink(missing_ok=True)
        self.me = None
