"""Progress for people: a tqdm bar on a terminal, plain lines where no terminal is attached (logs), the summary."""

import sys
import time

from pyramid.tree import readable_text


def format_duration(seconds):
    """Seconds as H:MM:SS: 3725 -> '1:02:05'."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_bytes(count):
    """A byte count for people: 73_400_000_000 -> '73.4 GB', 2_500_000 -> '2.5 MB', 49_152 -> '49.2 KB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 1e3:.1f} KB"


class Progress:
    """Counts images done out of `total`. `update(done)` takes the running total of all processes.

    On a terminal it is a tqdm bar. Elsewhere (SLURM logs, nohup, CI) it prints plain lines, and
    only once the work has lasted `quiet_seconds` (a short run's summary says all): then one line
    every `every_percent` percent or `every_seconds` seconds, whichever comes first, so a log
    never fills with carriage-return updates.
    """

    def __init__(self, total, stream=None, interactive=None, every_percent=5, every_seconds=30, desc="images",
                 quiet_seconds=30, clock=time.monotonic):
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_percent = every_percent
        self.every_seconds = every_seconds
        self.quiet_seconds = quiet_seconds
        self.clock = clock
        self.desc = desc
        self.done = 0
        self.start = clock()
        self._last_line_time = self.start
        self._last_line_done = 0
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, done):
        if done == self.done:
            return
        self.done = done
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            return
        now = self.clock()
        if now - self.start < self.quiet_seconds:
            return
        step = max(1, self.total * self.every_percent // 100)
        if done >= self._last_line_done + step or now - self._last_line_time >= self.every_seconds \
                or done == self.total:
            self._print_line(now)

    def _print_line(self, now):
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        percent = 100 * self.done // self.total if self.total else 100
        print(f"progress: {self.done}/{self.total} {self.desc} ({percent}%), {rate:.1f} {self.desc}/s, "
              f"{format_duration(elapsed)} elapsed, {left} left", file=self.stream, flush=True)
        self._last_line_time, self._last_line_done = now, self.done

    def close(self):
        if self._bar is not None:
            self._bar.close()


def log(message, progress=None):
    """One line to stderr, above the progress bar where there is one; a file name's bytes that are not UTF-8
    are written \\xNN, as failures.jsonl has them (a stream that takes only UTF-8 would raise on them)."""
    message = readable_text(message)
    if progress is not None and progress.interactive:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def print_summary(written, skipped, failed, seconds, encoding_seconds, failures_path, undone, per_process):
    """The run's one summary line; images/s counts the time spent encoding, not loading the model.
    With several processes it ends with the images each did, in rank order. `done:` only when no image
    of the to-do list is left `undone`; else `not finished:` with their number."""
    # A rate of nothing ("0.00 images/s") reads as a stalled run: a run with nothing to encode says so.
    pace = f"{written / encoding_seconds:.2f} images/s while encoding" if written and encoding_seconds > 0 \
        else "nothing encoded"
    shares = f"; per process: {', '.join(map(str, per_process))}" if len(per_process) > 1 else ""
    head, left = ("not finished", f", {undone} not done") if undone else ("done", "")
    log(f"{head}: {written} written, {skipped} skipped (already there), {failed} failed{left} "
        f"in {format_duration(seconds)} ({seconds:.1f} s; {pace}){shares}")
    if failed:
        log(f"the failed images are listed in {failures_path}, each with its reason; fix what it says and rerun")
