"""pyramid/watchdog.py: a stalled main thread, and one that never runs its SIGTERM handler (signals masked),
each end the process with every thread's stack and their status, after the run's record.

Each case is a small Python process without torch (a fraction of a second to start): the watchdog ends
the process it watches, which a test must not be.
"""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO

# A main thread that is "stuck" as a kernel would be: signals masked, sleeping in C. give_up writes the
# record it was handed to RECORD, as the run would append its runs.jsonl line.
STUCK = """
import signal, sys, time
from pathlib import Path
from pyramid.watchdog import Watchdog

def give_up(message, status):
    Path(sys.argv[2]).write_text(f"{status} {message}")

signal.signal(signal.SIGTERM, lambda *_: None)  # a Python handler, as StopSignals installs
with Watchdog(float(sys.argv[1]), give_up, reacted=lambda: False, where="process 1 on here: ") as watchdog:
    watchdog.arm()
    print("ready", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    time.sleep(120)
"""
SLEEP_FRAME = f'File "<string>", line {STUCK.splitlines().index("    time.sleep(120)") + 1} in <module>'


def start_stuck(stall_timeout, record):
    process = subprocess.Popen([sys.executable, "-c", STUCK, str(stall_timeout), str(record)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert process.stdout.readline() == "ready\n", process.stderr.read()
    return process


def test_a_stalled_main_thread_ends_with_its_stacks_and_status_4(tmp_path):
    started = time.monotonic()
    process = start_stuck(1.5, tmp_path / "record")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 4, stderr
    assert time.monotonic() - started < 15, stderr
    assert "error: process 1 on here: no batch finished in 2 s (--stall_timeout 1.5); stuck; every thread's " \
           "stack follows" in stderr
    assert SLEEP_FRAME in stderr, stderr  # the stuck thread's stack
    assert (tmp_path / "record").read_text().startswith("4 process 1 on here: no batch finished")


def test_sigterm_to_a_main_thread_with_signals_masked_ends_the_process_within_the_grace(tmp_path):
    process = start_stuck(600, tmp_path / "record")
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    waited = time.monotonic() - sent
    assert process.returncode == 143, stderr
    assert 9 < waited < 20, (waited, stderr)  # SIGNAL_REACT_SECONDS, well inside torchrun's 30 s
    assert "SIGTERM came 10 s ago and the main thread has not responded; stopping at once" in stderr
    assert SLEEP_FRAME in stderr, stderr
    assert (tmp_path / "record").read_text().startswith("143 process 1 on here: SIGTERM came")
