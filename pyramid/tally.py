"""A run's counts: this process's, published to the team as they grow and added once at the end; the team's
sums, against the to-do list and into the run's runs.jsonl line.

The team's sums live in its key-value store (team.py). Where that store is gone with the main process, a sum
reads as nothing done: nobody is left to finish the run's record, and nothing says its work is complete.
"""

import threading


class Tally:
    """This process's counts, read by the heartbeat thread to publish progress, and the team's sums of them.
    `todo` is the length of the run's to-do list, set once the plan is shared."""

    def __init__(self, team):
        self.team = team
        self.todo = 0
        self.writer = None
        self.unreadable = 0  # images the decoder could not read
        self.too_large = 0  # images that do not fit in the device's memory even alone
        self.published = 0
        self.peer_stopped = False
        self.encoding_started = None  # after the model loaded: the rate in the summary excludes start-up
        self._publishing = threading.Lock()  # the heartbeat's thread, the main one and the watchdog's
        self._once = threading.Lock()  # the main thread and the watchdog's: the counts go to the team once
        self._counted = False

    @property
    def written(self):
        return self.writer.written if self.writer is not None else 0

    @property
    def failed(self):
        """Recorded failures: unreadable images, images too large for the device's memory, images whose features
        came out non-finite, and images whose file could not be written for a reason of its own (a name the file
        system or the tree refuses)."""
        if self.writer is None:
            return self.unreadable + self.too_large
        return self.unreadable + self.too_large + self.writer.non_finite + self.writer.unwritable

    @property
    def done(self):
        return self.written + self.failed

    def publish(self, progress=None):
        """Add this process's newly done images to the team's count; redraw `progress` on main; see peers' stop."""
        team = self.team
        with self._publishing:
            done = self.done
            if done != self.published:
                team.add("done", done - self.published)
                team.add(f"done/{team.rank}", done - self.published)
                self.published = done
        if progress is not None:
            progress.update(team.add("done", 0))
        if team.world_size > 1 and team.stop_requested():
            self.peer_stopped = True

    def add_to_team(self, write_error=False):
        """Add this process's counts to the team's, once (the main thread or the watchdog's)."""
        with self._once:
            if self._counted:
                return
            self._counted = True
        self.publish()
        self.team.add("written", self.written)
        self.team.add("failed", self.failed)
        if write_error:
            self.team.add("write_errors")

    def undone(self):
        """Images of the to-do list neither written nor recorded failures, by every process's counts."""
        try:
            return max(0, self.todo - self.team.add("written", 0) - self.team.add("failed", 0))
        except Exception:
            return self.todo

    def all_done(self):
        """True when the processes wrote or recorded as failed every image of the to-do list."""
        try:
            return self.team.add("written", 0) + self.team.add("failed", 0) >= self.todo
        except Exception:
            return False

    def into_record(self, record, skipped):
        """On the main process, the team's counts (and notes) into the run's runs.jsonl line `record`."""
        team = self.team
        if not team.is_main:
            return
        try:
            record.update(written=team.add("written", 0), skipped=skipped, failed=team.add("failed", 0),
                          per_process=[team.add(f"done/{rank}", 0) for rank in range(team.world_size)])
            if notes := team.posts("notes"):
                record["notes"] = notes
        except Exception:  # the store is gone: the counts taken before stand
            pass
