"""Faults through the real CLI: SIGKILL at random moments (1 and 2 processes, the whole launch or one
rank), SIGINT/SIGTERM, and output directories that cannot take the files.

Every interrupted run is compared with one uninterrupted run of the same images: the files that
exist are complete and equal to it, and a rerun ends with exactly its files.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import warm
from conftest import REPO, accelerate_launch, run_cli, save_tiny_dinov2, write_images
from pyramid.tree import LOCK_NAME, is_temporary_name, temporary_name

TWO_CPU_PROCESSES = REPO / "tests" / "accelerate_cpu_2proc.yaml"
NUM_IMAGES = 40
# torchrun SIGTERMs the survivors of a dead rank and SIGKILLs them 30 s later; a survivor that
# exits on the SIGTERM ends the launch well before that.
LAUNCH_TEARDOWN_SECONDS = 25
# At 100 ms a forward pass (batches of 1 or 2), the 40 images take seconds: a kill after the first files lands
# mid-run on any machine, however fast it writes them otherwise (forked warm, runs end in about a second here).
SLOW_DEVICE = {"FAULT_SLOW_MS": "100"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model):
    """(input dir of NUM_IMAGES small images, output dir of one uninterrupted 1-process run)."""
    root = tmp_path_factory.mktemp("faults")
    write_images(root / "in", NUM_IMAGES, names=[f"{i % 3}/{i:05d}.png" for i in range(NUM_IMAGES)])
    result = run_cli("--input_dir", root / "in", "--output_dir", root / "reference", "--model", tiny_model,
                     "--num_workers", 1)
    assert result.returncode == 0, result.stderr
    return root / "in", root / "reference"


def extractor_command(processes, *args):
    """The extractor through tests/faulty_forward.py, which changes nothing unless the environment asks for a
    fault (start() asks for a slower device)."""
    return faulty_command(processes, *args)


def start(command, log_path, env=None):
    """Start a run to be interrupted, on a slower device (a kill after its first files lands mid-run), in a session
    of its own: os.killpg then reaches it and its decode workers, as Ctrl-C would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **SLOW_DEVICE, **(env or {}))
    with open(log_path, "w") as log:
        return warm.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)


def outputs(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*.pt"))


def temporaries(directory):
    return sorted(p for p in Path(directory).rglob("*") if is_temporary_name(p.name))


def wait_for_outputs(directory, count, process, timeout=180):
    """Poll until `directory` holds `count` .pt files; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while len(outputs(directory)) < count:
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no {count} files in {directory} after {timeout} s"
        time.sleep(0.02)
    return True


def assert_complete_and_equal(directory, reference):
    """Every .pt in `directory` loads and equals the reference run's file of the same name."""
    for name in outputs(directory):
        got = torch.load(Path(directory) / name, weights_only=True)
        want = torch.load(Path(reference) / name, weights_only=True)
        assert list(got) == list(want), name
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-5), (name, key)


def assert_verify_passes(output_dir, input_dir):
    result = warm.run([sys.executable, "-m", "pyramid.verify", str(output_dir), "--input_dir", str(input_dir),
                             "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problems in all" in result.stdout


def rerun_finishes_like_reference(command, output_dir, input_dir, reference):
    """Run `command` again: it must exit 0 and leave the tree an uninterrupted run leaves."""
    rerun = warm.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_finished_like_reference(output_dir, input_dir, reference)


def assert_finished_like_reference(output_dir, input_dir, reference):
    assert outputs(output_dir) == outputs(reference) and len(outputs(reference)) == NUM_IMAGES
    assert_complete_and_equal(output_dir, reference)
    assert temporaries(output_dir) == []
    assert_verify_passes(output_dir, input_dir)


def children(pid):
    """Pids of the live processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def process_tree(pid):
    """`pid` and all its descendants."""
    tree = [pid]
    for child in children(pid):
        tree += process_tree(child)
    return tree


def kill_tree(pid):
    """SIGKILL a run with all its processes at once, as a node failure or scancel would.

    os.killpg is not enough under `accelerate launch`: torchrun starts each rank in a session of
    its own, so its ranks would live on, orphaned, after their launcher.
    """
    tree = process_tree(pid)
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def alive(pid):
    """True for a process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ranks_of(launcher, output_dir):
    """{rank: pid} of a launch of two ranks with no decode workers: the launcher's descendants, less the zygote that
    tests/warm.py forks them from; rank 0 is the one whose pid the output's lock holds. (Not RANK in
    /proc/PID/environ: a forked process shows its zygote's environment there.)"""
    ranks = [pid for pid in process_tree(launcher)[1:]
             if Path(f"/proc/{pid}/comm").read_text().strip() != warm.ZYGOTE_NAME]
    holder = json.loads((Path(output_dir) / LOCK_NAME).read_text())["pid"]
    assert len(ranks) == 2 and holder in ranks, (ranks, holder)
    return {0: holder, 1: sum(ranks) - holder}


@pytest.mark.parametrize("processes, kills", [(1, 3), (2, 2)])
def test_sigkill_at_random_moments_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_model, corpus,
                                                                          processes, kills):
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = extractor_command(processes, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                                "--batch_size", 1, "--num_workers", 2 - processes)
    rng = random.Random(processes)
    landed_mid_run = 0
    for kill in range(kills):
        before = len(outputs(out)) if out.exists() else 0
        process = start(command, tmp_path / f"kill{kill}.log")
        if wait_for_outputs(out, before + rng.randint(1, 4), process):
            # A moment inside the next few writes: the pipeline writes these small images at hundreds a
            # second, so a longer wait would often land after the last file.
            time.sleep(rng.uniform(0.0, 0.02))
            killed = kill_tree(process.pid)
            process.wait(timeout=60)
            time.sleep(0.2)
            assert not any(alive(pid) for pid in killed)
        process.wait(timeout=60)
        written = outputs(out)
        landed_mid_run += len(written) < NUM_IMAGES
        # Only complete files are visible: any torn write is a hidden temporary, never a .pt.
        assert_complete_and_equal(out, reference)
        assert all(p.name.startswith(".") and not p.name.endswith(".pt") for p in temporaries(out))
    assert landed_mid_run, "every kill came after the run had finished; the test proved nothing"

    # What a writer killed inside torch.save leaves, from the dead process: the rerun must clear it.
    last = outputs(reference)[-1]
    torn = temporary_name(out / last, f"{socket.gethostname()}@{process.pid}.1")
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes((reference / last).read_bytes()[:1000])

    rerun_finishes_like_reference(command, out, input_dir, reference)


@pytest.mark.parametrize("victim", [0, 1])
def test_killing_one_rank_ends_the_launch_soon_and_a_rerun_completes(tmp_path, tiny_model, corpus, victim):
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = extractor_command(2, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                                "--batch_size", 1, "--num_workers", 0)
    launcher = start(command, tmp_path / "launch.log")
    try:
        assert wait_for_outputs(out, 2, launcher), (tmp_path / "launch.log").read_text()
        ranks = ranks_of(launcher.pid, out)
        os.kill(ranks[victim], signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait(timeout=120)  # the bound that matters is asserted below; this one only ends a hang
        ended_after = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            kill_tree(launcher.pid)
    log = (tmp_path / "launch.log").read_text()
    assert launcher.returncode != 0, log
    assert ended_after < LAUNCH_TEARDOWN_SECONDS, f"launch ended {ended_after:.0f} s after the kill\n{log}"
    assert not alive(ranks[1 - victim]), "the surviving rank outlived its launcher"
    # No bound on the count: until the launcher stops it, the survivor claims the chunks the dead rank
    # would have taken, and may finish the whole list. Whatever exists must be complete and right.
    assert_complete_and_equal(out, reference)

    rerun_finishes_like_reference(command, out, input_dir, reference)


def test_sigint_and_sigterm_stop_after_the_files_in_flight(tmp_path, tiny_model, corpus):
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = extractor_command(1, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                                "--batch_size", 2, "--num_workers", 1)
    # Ctrl-C reaches the whole process group, decode workers included; `kill PID` only the main process.
    for signum, status, send in [(signal.SIGINT, 130, os.killpg), (signal.SIGTERM, 143, os.kill)]:
        before = len(outputs(out)) if out.exists() else 0
        process = start(command, tmp_path / f"{signum.name}.log")
        assert wait_for_outputs(out, before + 2, process), (tmp_path / f"{signum.name}.log").read_text()
        send(process.pid, signum)
        sent = time.monotonic()
        process.wait(timeout=60)
        log = (tmp_path / f"{signum.name}.log").read_text()
        assert process.returncode == status, log
        assert time.monotonic() - sent < 20, log
        assert "stopped before the end; rerun the same command to finish" in log and "Traceback" not in log
        assert before + 2 <= len(outputs(out)) < NUM_IMAGES
        assert_complete_and_equal(out, reference)
        assert temporaries(out) == []  # a clean stop finishes or removes every write it began
    stopped_with = len(outputs(out))

    rerun = run_cli(*command[2:], env={"OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert f"{NUM_IMAGES - stopped_with} written, {stopped_with} skipped" in rerun.stderr
    assert_finished_like_reference(out, input_dir, reference)
    # runs.jsonl holds every run, the stopped ones included, with the status each reported.
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [run["status"] for run in runs] == [130, 143, 0]
    assert sum(run["written"] for run in runs) == NUM_IMAGES and runs[-1]["skipped"] == stopped_with
    assert [run["per_process"] for run in runs] == [[run["written"]] for run in runs]


def test_ctrl_c_during_the_last_batch_ends_complete(tmp_path, tiny_model):
    """A Ctrl-C that leaves nothing undone is a normal end: the one batch is finished and written."""
    write_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    process = start(extractor_command(1, "--input_dir", tmp_path / "in", "--output_dir", out, "--model", tiny_model,
                                      "--batch_size", 3, "--num_workers", 0), tmp_path / "log")
    deadline = time.monotonic() + 120
    while "to do on" not in (tmp_path / "log").read_text():  # planned; the model's weights load next
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    log = (tmp_path / "log").read_text()
    assert process.returncode == 0, log
    assert "stopped" not in log and "done: 3 written" in log
    assert outputs(out) == ["00000.pt", "00001.pt", "00002.pt"]
    assert json.loads((out / "runs.jsonl").read_text())["status"] == 0


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, tiny_model, corpus):
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = extractor_command(1, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                                "--batch_size", 1, "--num_workers", 1)
    for gap in (0.02, 0.2):
        process = start(command, tmp_path / "log")
        assert wait_for_outputs(out, len(outputs(out)) + 2, process), (tmp_path / "log").read_text()
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(gap)
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        process.wait(timeout=60)
        log = (tmp_path / "log").read_text()
        # 130 from the run, or -SIGINT when the second Ctrl-C found the interpreter shutting down.
        assert process.returncode in (130, -signal.SIGINT), log
        assert time.monotonic() - sent < 15, log
        assert "Traceback" not in log and "Exception ignored" not in log, log
        assert_complete_and_equal(out, reference)
        assert temporaries(out) == []


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def failure_records(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "failures.jsonl").read_text().splitlines()]


def test_a_file_where_an_output_directory_should_be(tmp_path, tiny_model):
    write_images(tmp_path / "in", 4, names=["a/b.png", "c.png", "d.png", "e/f.png"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("a file, where the images of in/a/ need a directory\n")
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                     "--num_workers", 0)
    # An error of that one file: its image's recorded failure, every other file written.
    assert result.returncode == 3, result.stderr
    assert failure_records(tmp_path / "out") == [
        {"path": "a/b.png", "error": f"cannot write {tmp_path / 'out' / 'a' / 'b.pt'}: "
                                     f"[Errno 20] Not a directory: '{tmp_path / 'out' / 'a'}'"}]
    assert error_lines(result.stderr) == [] and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "a").read_text().startswith("a file")
    assert temporaries(tmp_path / "out") == []
    assert outputs(tmp_path / "out") == ["c.pt", "d.pt", "e/f.pt"]
    for name in outputs(tmp_path / "out"):
        assert set(torch.load(tmp_path / "out" / name, weights_only=True)) == {"16x16", "8x8", "4x4", "2x2", "1x1"}


def immutable(path):
    """chattr +i `path`; root ignores permission bits but not the immutable flag. False if unsupported."""
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_unwritable_output_directories(tmp_path, tiny_model):
    write_images(tmp_path / "in", 3, names=["a.png", "sub/b.png", "sub/c.png"])
    top, inner = tmp_path / "locked", tmp_path / "inner"
    top.mkdir()
    (inner / "sub").mkdir(parents=True)
    if not immutable(top):
        pytest.skip("chattr +i does not work here (not root, or the file system has no immutable flag)")
    try:
        assert immutable(inner / "sub")
        refused = run_cli("--input_dir", tmp_path / "in", "--output_dir", top, "--model", tiny_model)
        midway = run_cli("--input_dir", tmp_path / "in", "--output_dir", inner, "--model", tiny_model,
                         "--num_workers", 0)
    finally:
        subprocess.run(["chattr", "-i", str(top), str(inner / "sub")])
    # The output directory itself: refused before any work.
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [f"error: --output_dir {top} is not writable"]
    assert list(top.iterdir()) == []
    # A directory inside it: the failures of its images, each naming its file; the others written, nothing
    # half written, exit 3.
    assert midway.returncode == 3, midway.stderr
    records = failure_records(inner)
    assert [record["path"] for record in records] == ["sub/b.png", "sub/c.png"]
    assert "sub/b.pt" in records[0]["error"] and "Operation not permitted" in records[0]["error"]
    assert error_lines(midway.stderr) == [] and "Traceback" not in midway.stderr
    assert list((inner / "sub").iterdir()) == [] and temporaries(inner) == []
    assert outputs(inner) == ["a.pt"]


def test_disk_full_gives_one_clear_error_and_no_partial_file(tmp_path, tiny_model, corpus):
    input_dir, reference = corpus
    small = tmp_path / "small"
    small.mkdir()
    # Room for about three files of ~46 kB: the fourth write fails.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.decode().strip()}); needs root")
    try:
        # --ignore_free_space: the run must start and meet the full disk, not be refused up front.
        result = run_cli("--input_dir", input_dir, "--output_dir", small / "out", "--model", tiny_model,
                         "--limit", 12, "--batch_size", 2, "--num_workers", 0, "--ignore_free_space")
        written = outputs(small / "out")
        assert_complete_and_equal(small / "out", reference)
        left = temporaries(small / "out")
        manifest = json.loads((small / "out" / "manifest.json").read_text())
    finally:
        subprocess.run(["umount", str(small)])
    assert result.returncode == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].endswith("No space left on device"), result.stderr
    assert "Traceback" not in result.stderr
    assert 1 <= len(written) < 12 and left == []
    assert manifest["hidden_size"] == 32


def test_another_model_is_refused_unless_overwrite(tmp_path, tiny_model, corpus):
    input_dir, reference = corpus
    other_model = save_tiny_dinov2(tmp_path / "other_model", seed=1)
    args = ("--input_dir", input_dir, "--output_dir", tmp_path / "out", "--limit", 2, "--num_workers", 0)
    assert run_cli(*args, "--model", tiny_model).returncode == 0
    before = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in outputs(tmp_path / "out")}

    refused = run_cli(*args, "--model", other_model)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [line for line in refused.stderr.strip().splitlines()
                                                   if line.startswith("error: ")]  # one clear line
    assert f"model: '{tiny_model}' -> '{other_model}'" in refused.stderr and "--overwrite" in refused.stderr
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in outputs(tmp_path / "out")} == before

    replaced = run_cli(*args, "--model", other_model, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"] == str(other_model)
    name = outputs(tmp_path / "out")[0]
    new = torch.load(tmp_path / "out" / name, weights_only=True)["16x16"]
    old = torch.load(reference / name, weights_only=True)["16x16"]
    assert not torch.allclose(new, old, atol=1e-3)  # the other model's features, not the first one's


def test_killing_only_the_launcher_stops_its_ranks_cleanly(tmp_path, tiny_model, corpus):
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = extractor_command(2, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                                "--batch_size", 1, "--num_workers", 0)
    # The ranks are the launcher's own children here, started cold, as in a real launch: their parent's death is
    # what this test is about.
    launcher = start(command, tmp_path / "launch.log", env={warm.COLD_RANKS: "1"})
    ranks = []
    try:
        assert wait_for_outputs(out, 2, launcher), (tmp_path / "launch.log").read_text()
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone: its ranks live in sessions of their own
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in ranks), "ranks outlived their launcher by a minute"
    finally:
        for pid in [launcher.pid, *ranks]:
            kill_tree(pid)
    assert len(outputs(out)) < NUM_IMAGES
    assert_complete_and_equal(out, reference)
    rerun_finishes_like_reference(command, out, input_dir, reference)


@pytest.fixture(scope="module")
def other_model_reference(tmp_path_factory, corpus):
    """(model B, output dir of one uninterrupted run of model B on the corpus)."""
    root = tmp_path_factory.mktemp("model_b")
    model = save_tiny_dinov2(root / "model", seed=1)
    result = run_cli("--input_dir", corpus[0], "--output_dir", root / "reference", "--model", model,
                     "--num_workers", 1)
    assert result.returncode == 0, result.stderr
    return model, root / "reference"


def file_identity(path):
    """Inode and mtime: a file rewritten through a temporary name and a rename changes both."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def equal_files(directory, reference):
    """Names of the .pt files in `directory` whose values equal those of the same name in `reference`."""
    equal = set()
    for name in outputs(directory):
        got = torch.load(Path(directory) / name, weights_only=True)
        want = torch.load(Path(reference) / name, weights_only=True)
        if list(got) == list(want) and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want):
            equal.add(name)
    return equal


def test_overwrite_killed_at_random_moments_never_leaves_old_files_counted_as_done(tmp_path, tiny_model, corpus,
                                                                                   other_model_reference):
    input_dir, reference_a = corpus
    model_b, reference_b = other_model_reference
    out = tmp_path / "out"
    shutil.copytree(reference_a, out)  # a finished tree of model A
    common = ("--input_dir", input_dir, "--output_dir", out, "--batch_size", 1, "--num_workers", 1)
    rng = random.Random(12)
    landed_mid_run = 0
    for kill in range(2):
        kept_b = {name: file_identity(out / name) for name in equal_files(out, reference_b)}
        process = start(extractor_command(1, *common, "--model", model_b, "--overwrite"), tmp_path / f"kill{kill}.log")
        deadline = time.monotonic() + 120
        while json.loads((out / "manifest.json").read_text())["model"] != str(model_b) and process.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / f"kill{kill}.log").read_text()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))  # during the removal of model A's files, or the first writes
        kill_tree(process.pid)
        process.wait(timeout=60)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"] == str(model_b)
        files_b = equal_files(out, reference_b)
        landed_mid_run += len(files_b) < NUM_IMAGES
        if not manifest.get("replacing"):
            # Settled on model B: every file there is B's, and a rerun counts them as done.
            assert set(outputs(out)) == files_b, (kill, sorted(set(outputs(out)) - files_b))
        # Files of model B made before this run were kept, not recomputed: --overwrite resumes.
        if kill and not manifest.get("replacing"):
            assert {name: file_identity(out / name) for name in kept_b} == kept_b
    assert landed_mid_run, "every kill came after the run had finished; the test proved nothing"

    # A plain rerun finishes the replacement (the old settings are refused: tests/test_manifest.py).
    rerun = run_cli(*common, "--model", model_b)
    assert rerun.returncode == 0, rerun.stderr
    assert outputs(out) == outputs(reference_b) and equal_files(out, reference_b) == set(outputs(reference_b))
    assert "replacing" not in json.loads((out / "manifest.json").read_text())
    assert_verify_passes(out, input_dir)


# --- Faults inside the forward pass (tests/faulty_forward.py wraps Dinov2Model.forward): a process that
# raises, a process stuck with its signals masked ---------------------------------------------------------

FAULTY = REPO / "tests" / "faulty_forward.py"


def faulty_command(processes, *args):
    """The extractor through tests/faulty_forward.py: one process, or two under `accelerate launch` with
    torchrun's own restarts where `args` begins with launcher options ending in '--'."""
    launcher_args = []
    if "--" in args:
        launcher_args, args = [str(arg) for arg in args[:args.index("--")]], args[args.index("--") + 1:]
    script = [str(FAULTY), *map(str, args)]
    if processes == 1:
        return [sys.executable, *script]
    return [*accelerate_launch(TWO_CPU_PROCESSES), *launcher_args, *script]


def runs_of(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "runs.jsonl").read_text().splitlines()]


def test_a_stuck_process_ends_with_its_stacks_and_its_record(tmp_path, tiny_model, corpus):
    input_dir, reference = corpus
    out = tmp_path / "out"
    result = warm.run(faulty_command(1, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                                           "--batch_size", 2, "--num_workers", 0, "--stall_timeout", 2),
                      cwd=REPO, capture_output=True, text=True, timeout=120,
                      env=dict(os.environ, FAULT_STUCK_AT="3", OMP_NUM_THREADS="1"))
    assert result.returncode == 4, result.stderr
    assert "error: no batch finished in 2 s (--stall_timeout 2); stuck; every thread's stack follows" \
           in result.stderr
    assert "in wrapped" in result.stderr and "pyramid-writer" not in result.stderr  # the stuck frame, by file
    assert "not finished: 4 written, 0 skipped (already there), 0 failed, 36 not done in " in result.stderr
    record, = runs_of(out)
    assert (record["status"], record["written"]) == (4, 4)
    assert record["error"] == "no batch finished in 2 s (--stall_timeout 2); stuck"
    assert not (out / ".pyramid.lock").exists() and outputs(out) == outputs(reference)[:4]
    assert_complete_and_equal(out, reference)


def test_sigterm_ends_every_process_within_the_grace_though_one_is_stuck_with_signals_masked(tmp_path, tiny_model,
                                                                                             corpus):
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = faulty_command(2, "--input_dir", input_dir, "--output_dir", out, "--model", tiny_model,
                             "--batch_size", 1, "--num_workers", 0)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FAULT_RANK="1", FAULT_STUCK_AT="2")
    with open(tmp_path / "launch.log", "w") as log:
        launcher = warm.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    ranks = []
    try:
        assert wait_for_outputs(out, 3, launcher), (tmp_path / "launch.log").read_text()
        ranks = list(ranks_of(launcher.pid, out).values())
        time.sleep(1)  # rank 1 is in its second forward pass by now, for good
        launcher.send_signal(signal.SIGTERM)  # as `kill`, or scancel: the launcher SIGTERMs every rank
        sent = time.monotonic()
        launcher.wait(timeout=90)  # the bound that matters is asserted below; this one only ends a hang
        ended_after = time.monotonic() - sent
    finally:
        for pid in [launcher.pid, *ranks]:
            kill_tree(pid)
    log = (tmp_path / "launch.log").read_text()
    assert ended_after < LAUNCH_TEARDOWN_SECONDS, f"launch ended {ended_after:.0f} s after SIGTERM\n{log}"
    assert not any(alive(pid) for pid in ranks)
    assert "SIGKILL" not in log, log  # every rank ended itself, before torchrun's 30 s were up
    stuck_line = "process 1 on {}: SIGTERM came 10 s ago and the main thread has not responded; stopping at once"
    assert f"error: {stuck_line.format(socket.gethostname())}; every thread's stack follows" in log, log
    assert "in wrapped" in log  # the stuck rank's stack
    record = runs_of(out)[-1]
    assert record["status"] == 143, record
    assert record["notes"] == [stuck_line.format(socket.gethostname())]
    assert record["written"] == len(outputs(out)) < NUM_IMAGES
    assert_complete_and_equal(out, reference)


def test_a_process_that_raises_is_recorded_and_torchruns_restart_finishes_the_run(tmp_path, tiny_model, corpus):
    """The first attempt's rank 1 raises at its second forward pass: that attempt ends at once, recorded with
    the error and the images not done; torchrun restarts the team (--max_restarts 1), whose plan, lock and
    chunk claims come up clean, and the run ends with status 0 and a clean run's files."""
    input_dir, reference = corpus
    out = tmp_path / "out"
    command = faulty_command(2, "--max_restarts", 1, "--", "--input_dir", input_dir, "--output_dir", out,
                             "--model", tiny_model, "--batch_size", 1, "--num_workers", 0)
    result = warm.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                      env=dict(os.environ, OMP_NUM_THREADS="1", PYRAMID_RUN_ID="restarted", FAULT_RANK="1",
                                     FAULT_RAISE_AT="2", FAULT_FIRST_ATTEMPT="1"))
    assert result.returncode == 0, result.stderr
    error = f"process 1 on {socket.gethostname()}: RuntimeError: injected failure at forward pass 2"
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [f"error: {error}"]
    summaries = [line for line in result.stderr.splitlines() if line.startswith(("done:", "not finished:"))]
    assert len(summaries) == 2 and summaries[0].startswith("not finished: ") and summaries[1].startswith("done: ")
    first, restarted = runs_of(out)
    assert (first["run_id"], first["status"], first["error"]) == ("restarted", 4, error)
    assert first["written"] + first["failed"] < NUM_IMAGES
    assert (restarted["run_id"], restarted["status"]) == ("restarted", 0)
    assert restarted["written"] + restarted["skipped"] == NUM_IMAGES and restarted["skipped"] == first["written"]
    assert warm.run([sys.executable, "-m", "pyramid.runs", "status", str(out), "restarted"], cwd=REPO,
                    capture_output=True, text=True, timeout=60).stdout == "0\n"
    assert outputs(out) == outputs(reference) and temporaries(out) == []
    assert_complete_and_equal(out, reference)
