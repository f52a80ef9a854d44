"""Run extract_distributed.py with transformers' Dinov2Model.forward made to fail, as a user's GPU or driver would.

    python tests/faulty_forward.py [extractor arguments]
    accelerate launch ... tests/faulty_forward.py [extractor arguments]

The faults come from the environment (each optional), so a launcher passes them to every process:
    FAULT_OOM_ABOVE=K       torch.OutOfMemoryError for a forward pass of more than K images
    FAULT_RAISE_AT=N        RuntimeError at the process's Nth forward pass
    FAULT_STUCK_AT=N        at the Nth pass: block SIGINT and SIGTERM in the calling thread and sleep for an
                            hour, as a kernel that never returns (signals masked, the GIL free)
    FAULT_SLOW_MS=M         every forward pass M ms longer, as a slower device (a kill then lands mid-run however
                            fast this machine writes)
    FAULT_RANK=R            only in the process of rank R (default: every process)
    FAULT_FIRST_ATTEMPT=1   only in a launcher's first attempt (TORCHELASTIC_RESTART_COUNT 0 or unset)
"""

import faulthandler
import functools
import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def faulty(forward, oom_above=None, raise_at=None, stuck_at=None, slow_ms=None):
    """`forward` (Dinov2Model.forward) with the faults put in; the count is of this process's calls."""
    calls = [0]

    @functools.wraps(forward)
    def wrapped(self, pixel_values=None, **kwargs):
        import torch

        calls[0] += 1
        if oom_above is not None and pixel_values.shape[0] > oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (a batch of "
                                         f"{pixel_values.shape[0]}; injected above {oom_above})")
        if calls[0] == raise_at:
            raise RuntimeError(f"injected failure at forward pass {calls[0]}")
        if slow_ms:
            time.sleep(slow_ms / 1000)
        if calls[0] == stuck_at:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            time.sleep(3600)
        return forward(self, pixel_values=pixel_values, **kwargs)

    return wrapped


def faults_from_environment(environ):
    """The keyword arguments of `faulty` that `environ` asks for in this process; {} where none apply."""
    if "FAULT_RANK" in environ and environ.get("RANK", "0") != environ["FAULT_RANK"]:
        return {}
    if environ.get("FAULT_FIRST_ATTEMPT") == "1" and int(environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        return {}
    names = {"FAULT_OOM_ABOVE": "oom_above", "FAULT_RAISE_AT": "raise_at", "FAULT_STUCK_AT": "stuck_at",
             "FAULT_SLOW_MS": "slow_ms"}
    return {argument: int(environ[name]) for name, argument in names.items() if name in environ}


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: its stacks, to see where it waits
    faults = faults_from_environment(os.environ)
    if faults:
        from transformers.models.dinov2.modeling_dinov2 import Dinov2Model

        Dinov2Model.forward = faulty(Dinov2Model.forward, **faults)
    script = REPO / "extract_distributed.py"
    sys.argv[0] = str(script)
    sys.path.insert(0, str(REPO))
    runpy.run_path(str(script), run_name="__main__")
