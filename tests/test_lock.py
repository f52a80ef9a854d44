"""pyramid/lock.py: a live run's lock refuses a second one; a gone run's lock never blocks the next."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import run_cli, write_images
from pyramid.exits import UsageError
from pyramid.lock import OutputLock, why_stale
from pyramid.tree import LOCK_NAME


def write_lock(directory, age_seconds=0, **holder):
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"token": "old", **holder}))
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_lock_is_refused_naming_host_and_process(tmp_path):
    first = OutputLock(tmp_path).acquire()
    try:
        with pytest.raises(UsageError, match=f"host {socket.gethostname()}, process {os.getpid()}"):
            OutputLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    OutputLock(tmp_path).acquire().release()  # free again once released


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    lock = OutputLock(tmp_path).acquire()
    try:
        assert "its process is gone" in lock.taken_over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_lock_of_another_host_counts_until_its_heartbeat_is_old(tmp_path):
    write_lock(tmp_path, age_seconds=5, host="node-elsewhere", pid=1, slurm_job="77", slurm_restart=0)
    with pytest.raises(UsageError, match=r"host node-elsewhere, process 1 \(SLURM job 77, run 1\)"):
        OutputLock(tmp_path, stale_after=60).acquire()
    write_lock(tmp_path, age_seconds=600, host="node-elsewhere", pid=1)
    lock = OutputLock(tmp_path, stale_after=60).acquire()
    assert "no heartbeat for" in lock.taken_over
    lock.release()


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    lock = OutputLock(tmp_path, refresh_seconds=0.05).acquire()
    try:
        then = time.time() - 600
        os.utime(tmp_path / LOCK_NAME, (then, then))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    finally:
        lock.release()


@pytest.mark.parametrize("holder, me, stale", [
    # A requeued SLURM job, restarted on another node: the lock of its earlier run is gone at once.
    ({"host": "n1", "pid": 5, "slurm_job": "9", "slurm_restart": 0},
     {"host": "n2", "slurm_job": "9", "slurm_restart": 1}, True),
    ({"host": "n1", "pid": 5, "slurm_job": "9", "slurm_restart": 1},
     {"host": "n2", "slurm_job": "9", "slurm_restart": 1}, False),   # the same run's other node
    ({"host": "n1", "pid": 5, "slurm_job": "8", "slurm_restart": 0},
     {"host": "n2", "slurm_job": "9", "slurm_restart": 3}, False),   # another job: only its heartbeat says
    ({}, {"host": "n2"}, False),                                     # unreadable: by its age alone
])
def test_why_stale(holder, me, stale):
    assert (why_stale(holder, 1.0, me) is not None) == stale


def test_a_live_run_refuses_a_second_launch_at_once(tmp_path, tiny_model):
    write_images(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from pyramid.lock import OutputLock; OutputLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(60)",
                               str(os.path.dirname(os.path.dirname(__file__))), str(tmp_path / "out")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        # -X importtime's lines on stderr say what the refused run imported.
        result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                         "--num_workers", 0, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == 2, result.stderr
        assert f"host {socket.gethostname()}, process {holder.pid}" in result.stderr
        assert not list((tmp_path / "out").glob("*.pt"))
        refused_after = time.monotonic() - started
        imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        said = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        assert "pyramid.lock" in imported and not {"torch", "accelerate", "transformers"} & imported
        assert len(said) == 1 and said[0].startswith(f"error: {tmp_path / 'out'} is being written by another run")
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (killed, its lock left behind) the next run goes ahead.
    assert (tmp_path / "out" / LOCK_NAME).exists()
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                     "--num_workers", 0)
    assert result.returncode == 0, result.stderr
    assert "took over the lock" in result.stderr and len(list((tmp_path / "out").glob("*.pt"))) == 2
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released at the end
    assert refused_after < 60


def refused_launch(tmp_path, monkeypatch, rank):
    """extract.main in this process, as the launch's process `rank`, into a directory whose lock this process
    holds; the run loop (torch, accelerate) made unimportable, so reaching it raises ImportError."""
    from pyramid import extract

    write_images(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # main() sets it
    monkeypatch.setitem(sys.modules, "pyramid.loop", None)
    live = OutputLock(tmp_path / "out").acquire()
    try:
        return extract.main(extract.get_args_parser().parse_args(
            ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")]))
    finally:
        live.release()


def test_the_main_process_refuses_a_live_run_before_the_run_loop_loads(tmp_path, monkeypatch, capsys):
    assert refused_launch(tmp_path, monkeypatch, rank=0) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'out'} is being written by another run (host {socket.gethostname()}, process "
        f"{os.getpid()}); wait for it to end, or stop it, or use another --output_dir\n")
    record, = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert record["status"] == 2 and "is being written by another run" in record["error"]


def test_the_other_processes_of_a_launch_leave_the_lock_to_the_main_one(tmp_path, monkeypatch, capsys):
    """Another rank cannot tell its own team's lock from another run's: it goes on to the run loop, where the
    main process's plan (its refusal included) reaches it."""
    with pytest.raises(ImportError):
        refused_launch(tmp_path, monkeypatch, rank=1)
    assert capsys.readouterr().err == "" and not (tmp_path / "out" / "runs.jsonl").exists()


def test_verify_stats_and_pack_refuse_a_tree_a_live_run_is_writing(tmp_path, capsys):
    """They read the files at hand: under a live run, half of them (verify said "7 ok")."""
    from pyramid import pack, stats, verify
    from pyramid.synthetic import write_tree

    tree = write_tree(tmp_path / "tree", ["a", "b"])
    tools = {"verify": verify, "stats": stats, "pack": pack}
    live = OutputLock(tree).acquire()
    try:
        for name, tool in tools.items():
            assert tool.main(tool.get_args_parser().parse_args([str(tree)])) == 2, name
            assert capsys.readouterr().err == (
                f"error: {tree} is being written by a live run (host {socket.gethostname()}, process {os.getpid()}); "
                f"wait for it to end (or stop it and rerun it to finish), then run this again\n"), name
    finally:
        live.release()
    assert not (tree / "stats.pt").exists() and not (tree / "pack").exists()
    # A lock a killed run left behind blocks nothing.
    write_lock(tree, host=socket.gethostname(), pid=dead_pid())
    for name, tool in tools.items():
        assert tool.main(tool.get_args_parser().parse_args([str(tree)])) == 0, (name, capsys.readouterr())
    assert (tree / "stats.pt").exists() and (tree / "pack").exists()
