"""slurm/: the requeue decision in isolation, then the templates on a real SLURM cluster of one or two nodes.

The cluster tests need `sbatch` and a cluster that answers: .ci/slurm-up starts a private one on this
machine (config in $PYRAMID_SLURM_DIR, default /tmp/pyramid-slurm), two nodes in network namespaces
with two fake GPUs each; SLURM_CONF, if set, points the tests at another. Without either they skip and
say why; the two-node tests also skip, with slurm-up's reason, where the cluster has one node.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_HIDDEN, run_cli, write_images

CI_CLUSTER_CONF = Path(os.environ.get("PYRAMID_SLURM_DIR", "/tmp/pyramid-slurm")) / "slurm.conf"
JOB_NAME = "pyramid-test"
LEVEL_TOKENS = {"16x16": 256, "8x8": 64, "4x4": 16, "2x2": 4, "1x1": 1}
SUMMARY = re.compile(r"^(?:done|not finished): (\d+) written, (\d+) skipped", re.MULTILINE)
PER_PROCESS = re.compile(r"^done: .*; per process: ([\d, ]+)$", re.MULTILINE)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def test_templates_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/slurm-up installs it)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sh"))
    assert "slurm/extract.sh" in scripts and "slurm/extract_multinode.sh" in scripts
    result = subprocess.run(["shellcheck", *scripts, ".ci/slurm-up", ".ci/slurm-down"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# The requeue decision of slurm/common.sh, with scontrol and scancel replaced by functions that
# record their calls (scancel also delivers its SIGTERM, to the background job), and a command that
# stands for the extractor (or its launcher): it exits with STATUS on SIGTERM, after appending a
# runs.jsonl line with status RECORDED for its $PYRAMID_RUN_ID to the --output_dir it was given when
# RECORDED is set. With SEND_USR1=1 it first sends SIGUSR1 to the shell that runs it, as SLURM would
# before the time limit, and exits 99 if no SIGTERM follows within 10 s; otherwise it ends on its own
# after 0.3 s the same way.
REQUEUE_HARNESS = r"""
source slurm/common.sh
scontrol() { echo "scontrol $*" >>"$CALLS"; }
scancel() { echo "scancel $*" >>"$CALLS"; kill -TERM $(jobs -p); }
SLURM_JOB_ID=42
SLURM_RESTART_COUNT=1
# shellcheck disable=SC2016
run_and_requeue_on_usr1 "$STOP" bash -c 'end() {
        if [ -n "$RECORDED" ]; then
            echo "{\"run_id\": \"$PYRAMID_RUN_ID\", \"status\": $RECORDED}" >>"$OUT/runs.jsonl"
        fi
        exit "$STATUS"
    }
    trap end TERM
    if [ "$SEND_USR1" = 0 ]; then sleep 0.3; end; fi
    sleep 0.1; kill -USR1 $PPID
    for _ in $(seq 200); do sleep 0.05; done
    exit 99' extractor $OUTPUT_ARGS
echo "returned $?"
"""


def run_requeue_harness(tmp_path, send_usr1, status, stop, recorded="", output_args=None):
    """(last stdout line, scontrol/scancel calls, stderr) of the harness; the output dir is tmp_path/out."""
    calls, out = tmp_path / "calls", tmp_path / "out"
    out.mkdir(exist_ok=True)
    # The line of the job's previous run (restart 0) must not be taken for this one's (restart 1).
    (out / "runs.jsonl").write_text('{"run_id": "slurm-42-0", "status": 0}\n')
    env = dict(os.environ, CALLS=str(calls), SEND_USR1=str(int(send_usr1)), STATUS=str(status), STOP=stop,
               RECORDED=str(recorded), OUT=str(out),
               OUTPUT_ARGS=" ".join(output_args if output_args is not None else ["--output_dir", str(out)]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", "-c", REQUEUE_HARNESS], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=30)
    recorded_calls = calls.read_text().splitlines() if calls.exists() else []
    return result.stdout.strip().splitlines()[-1], recorded_calls, result.stdout + result.stderr


@pytest.mark.parametrize("send_usr1, status, stop, expected_calls", [
    (True, 143, "process", ["scontrol requeue 42"]),        # stopped by the signal: resume later
    (True, 1, "process", ["scontrol requeue 42"]),          # accelerate launch reports a stop as 1
    (True, 0, "process", []),                               # finished before the signal took effect
    (True, 3, "process", []),                               # finished, some images broken: rerun won't fix
    (False, 143, "process", []),                            # killed by something else: not ours to requeue
    (True, 1, "steps", ["scancel --signal=TERM 42", "scontrol requeue 42"]),
])
def test_requeue_only_when_stopped_before_the_end(tmp_path, send_usr1, status, stop, expected_calls):
    """Without a runs.jsonl line (a killed run), the decision rests on the command's own status."""
    returned, calls, output = run_requeue_harness(tmp_path, send_usr1, status, stop)
    assert returned == f"returned {status}", output
    assert calls == expected_calls, output


@pytest.mark.parametrize("send_usr1, recorded, expected_calls", [
    (True, 143, ["scontrol requeue 42"]),   # stopped by the signal
    (True, 130, ["scontrol requeue 42"]),
    (True, 0, []),                          # finished as the signal came: the launcher's 1 is no stop
    (True, 3, []),                          # finished with broken images
    (True, 2, []),                          # refused: a requeue would be refused again
    (False, 143, []),                       # stopped by someone else
])
def test_the_runs_own_status_decides_under_a_launcher(tmp_path, send_usr1, recorded, expected_calls):
    """`accelerate launch` returns 1 whatever happened: the run's runs.jsonl line says what it was."""
    returned, calls, output = run_requeue_harness(tmp_path, send_usr1, 1, "process", recorded=recorded)
    assert returned == f"returned {recorded}", output
    assert calls == expected_calls, output
    if recorded != 1:
        assert f"the launcher returned 1; the run reported {recorded}" in output


@pytest.mark.parametrize("form", ["separate", "equals", "default"])
def test_the_output_dir_is_found_among_the_arguments(tmp_path, form):
    out = tmp_path / "out"
    args = {"separate": ["--model", "m", "--output_dir", str(out), "--limit", "2"],
            "equals": ["--output_dir=elsewhere", f"--output_dir={out}"],
            "default": ["--model", "m"]}[form]
    found = subprocess.run(["bash", "-c", 'source slurm/common.sh; output_dir_of "$@"', "sh", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout.strip()
    assert found == (str(out) if form != "default" else "data/feature_pyramids")
    if form != "default":
        returned, calls, output = run_requeue_harness(tmp_path, True, 1, "process", recorded=0, output_args=args)
        assert returned == "returned 0" and calls == [], output


@pytest.fixture(scope="module")
def slurm_env():
    """The environment for SLURM commands: SLURM_CONF of an answering cluster, and this Python first on PATH."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: SLURM is not installed (.ci/slurm-up installs it and starts a test cluster)")
    conf = os.environ.get("SLURM_CONF") or (str(CI_CLUSTER_CONF) if CI_CLUSTER_CONF.exists() else None)
    if conf is None:
        pytest.skip(f"no test cluster: {CI_CLUSTER_CONF} is absent and SLURM_CONF is unset (run .ci/slurm-up)")
    # The job runs `python` and `accelerate` from PATH: the template's "activate the environment" step.
    env = dict(os.environ, SLURM_CONF=conf, PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=60)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        answer = (ping.stdout + ping.stderr).strip().splitlines()
        pytest.skip(f"the SLURM cluster of {conf} does not answer: {answer[0] if answer else ping.returncode}")
    return env


@pytest.fixture(scope="module")
def two_nodes(slurm_env):
    """The names of two idle nodes of the cluster, or a skip with the reason slurm-up gave."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=slurm_env, capture_output=True, text=True,
                         timeout=60).stdout
    idle = sorted({name for name, state in (line.split() for line in out.splitlines()) if state == "idle"})
    if len(idle) < 2:
        reason_file = Path(slurm_env["SLURM_CONF"]).parent / "multinode"
        reason = reason_file.read_text().strip() if reason_file.exists() else "see .ci/slurm-up"
        pytest.skip(f"the cluster has {len(idle)} idle node(s), two-node tests need 2: {reason}")
    return idle[:2]


class Job:
    """A batch job submitted from the repository root, as a user would; cancelled if a test leaves it running."""

    def __init__(self, env, script, sbatch_options, extractor_args):
        self.env = env
        result = subprocess.run(["sbatch", "--parsable", f"--job-name={JOB_NAME}", *sbatch_options,
                                 f"slurm/{script}", *map(str, extractor_args)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        self.id = result.stdout.strip().split(";")[0]
        self.log_path = REPO / "logs" / f"{JOB_NAME}-{self.id}.out"

    def info(self):
        """JobState, Restarts and ExitCode from `scontrol show job` (there is no accounting daemon)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=self.env, capture_output=True,
                             text=True, timeout=60).stdout
        return dict(re.findall(r"\b(JobState|Restarts|ExitCode)=(\S+)", out))

    def wait(self, until, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if until(info):
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {self.id}: no {what} within {timeout} s; last {self.info()}\n{self.log()}")

    def wait_to_end(self, timeout=240):
        return self.wait(lambda info: info.get("JobState") in FINAL_STATES, timeout, "end")

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else f"(no log at {self.log_path})"

    def signal_batch(self, signal):
        subprocess.run(["scancel", f"--signal={signal}", "--batch", self.id], env=self.env, check=True,
                       timeout=60)

    def cleanup(self):
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=60)
        self.log_path.unlink(missing_ok=True)


@pytest.fixture
def submit(slurm_env):
    jobs = []

    def submit(script, sbatch_options, extractor_args):
        jobs.append(Job(slurm_env, script, sbatch_options, extractor_args))
        return jobs[-1]

    yield submit
    for job in jobs:
        job.cleanup()


def assert_every_pyramid_written(images, input_dir, output_dir):
    for image in images:
        path = output_dir / image.relative_to(input_dir).with_suffix(".pt")
        assert path.exists(), f"no output for {image.name}"
        pyramid = torch.load(path, weights_only=True)
        assert list(pyramid) == list(LEVEL_TOKENS)
        for key, tokens in LEVEL_TOKENS.items():
            assert pyramid[key].dtype == torch.float32 and pyramid[key].shape == (1, tokens, TINY_HIDDEN)
            assert torch.isfinite(pyramid[key]).all()
    assert sorted(p.name for p in output_dir.rglob("*.pt")) == sorted(i.with_suffix(".pt").name for i in images)


def file_identity(path):
    """Inode and mtime: a file rewritten through a temporary name and a rename changes both."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def extractor_args(tiny_model, input_dir, output_dir):
    return ["--input_dir", input_dir, "--output_dir", output_dir, "--model", tiny_model,
            "--batch_size", 4, "--num_workers", 0]


def test_extract_sh_runs_the_extraction_to_the_end(tmp_path, tiny_model, submit):
    input_dir, output_dir = tmp_path / "images", tmp_path / "pyramids"
    images = write_images(input_dir, 6)
    # One fake GPU: one process, started without a launcher. Everything else as shipped.
    job = submit("extract.sh", ["--gres=gpu:1"], extractor_args(tiny_model, input_dir, output_dir))
    info = job.wait_to_end()
    log = job.log()
    assert info == {"JobState": "COMPLETED", "Restarts": "0", "ExitCode": "0:0"}, log
    assert_every_pyramid_written(images, input_dir, output_dir)
    assert f"job {job.id} run 1 on" in log and ": 1 process(es)" in log, log
    assert SUMMARY.findall(log) == [("6", "0")], log


def test_extract_sh_takes_the_runs_own_status_from_runs_jsonl(tmp_path, tiny_model, submit):
    """Under `accelerate launch` (two fake GPUs) a broken image exits 1 from the launcher; the job ends
    with the run's own status 3, read from its runs.jsonl line, and is not requeued. torchrun's restart
    (--max_restarts 1 in the template) tries the broken image once more, in a line of its own."""
    input_dir, output_dir = tmp_path / "images", tmp_path / "pyramids"
    write_images(input_dir, 3)
    (input_dir / "00001.png").write_bytes((input_dir / "00001.png").read_bytes()[:200])
    # --output_dir=DIR: the template finds it in this form too.
    job = submit("extract.sh", ["--gres=gpu:2"], ["--input_dir", input_dir, f"--output_dir={output_dir}",
                                                  "--model", tiny_model, "--num_workers", 0])
    info = job.wait_to_end()
    log = job.log()
    assert info == {"JobState": "FAILED", "Restarts": "0", "ExitCode": "3:0"}, log
    assert "the launcher returned 1; the run reported 3" in log, log
    records = [json.loads(line) for line in (output_dir / "runs.jsonl").read_text().splitlines()]
    assert [(record["run_id"], record["status"], record["failed"]) for record in records] == \
        [(f"slurm-{job.id}-0", 3, 1)] * 2
    assert [(record["written"], record["skipped"]) for record in records] == [(2, 0), (0, 2)]
    assert sorted(p.name for p in output_dir.glob("*.pt")) == ["00000.pt", "00002.pt"]


def test_two_nodes_two_processes_each_write_every_image_once(tmp_path, tiny_model, submit, two_nodes,
                                                             monkeypatch):
    input_dir = tmp_path / "images"
    images = write_images(input_dir, 24, names=[f"{i % 3}/{i:05d}.png" for i in range(24)])
    # Two processes per node on CPUs (gloo): what PYRAMID_NUM_PROCESSES is for; the job inherits it.
    monkeypatch.setenv("PYRAMID_NUM_PROCESSES", "2")
    job = submit("extract_multinode.sh", ["--nodes=2", "--gres=gpu:2"],
                 extractor_args(tiny_model, input_dir, tmp_path / "two_nodes"))
    single = run_cli(*extractor_args(tiny_model, input_dir, tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    info = job.wait_to_end()
    log = job.log()
    assert info == {"JobState": "COMPLETED", "Restarts": "0", "ExitCode": "0:0"}, log
    for rank, node in enumerate(two_nodes):  # each node in the log under its own hostname
        assert f"pyramid: node {rank} ({node}): 2 process(es)" in log, log
    assert "on 4 process(es)" in log, log
    assert_every_pyramid_written(images, input_dir, tmp_path / "two_nodes")
    # Written exactly once: 24 files, 24 writes over all processes, not more.
    assert SUMMARY.findall(log) == [("24", "0")], log
    per_process = [int(count) for count in PER_PROCESS.findall(log)[0].split(", ")]
    assert len(per_process) == 4 and sum(per_process) == 24, log
    for image in images:
        name = image.relative_to(input_dir).with_suffix(".pt")
        one = torch.load(tmp_path / "one" / name, weights_only=True)
        two = torch.load(tmp_path / "two_nodes" / name, weights_only=True)
        assert list(one) == list(two)
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-5), (name, key)


@pytest.mark.parametrize("script, nodes", [("extract.sh", []), ("extract_multinode.sh", ["--nodes=1"]),
                                           ("extract_multinode.sh", ["--nodes=2"])])
def test_signalled_job_requeues_and_the_second_run_finishes(request, tmp_path, tiny_model, submit, script, nodes):
    if nodes == ["--nodes=2"]:
        request.getfixturevalue("two_nodes")
    input_dir, output_dir = tmp_path / "images", tmp_path / "pyramids"
    # Enough work (several seconds on two processes) that the signal lands while the first run is writing;
    # the two-node job starts its four processes close together, and half of it is as many seconds.
    images = write_images(input_dir, 200 if nodes == ["--nodes=2"] else 400, size=(256, 256))
    job = submit(script, ["--gres=gpu:2", *nodes], extractor_args(tiny_model, input_dir, output_dir))

    deadline = time.monotonic() + 180
    while not any(output_dir.glob("*.pt")):
        assert time.monotonic() < deadline, f"no file written within 180 s\n{job.log()}"
        assert job.info().get("JobState") in {"PENDING", "RUNNING"}, f"job ended early {job.info()}\n{job.log()}"
        time.sleep(0.05)
    # What `#SBATCH --signal=B:USR1@300` does before the time limit.
    job.signal_batch("USR1")

    requeued = job.wait(lambda info: (info.get("Restarts"), info.get("JobState")) == ("1", "PENDING")
                        or info.get("JobState") in FINAL_STATES, 120, "requeue")
    assert requeued["JobState"] == "PENDING", f"not requeued: {requeued}\n{job.log()}"
    first_run = {p.name: file_identity(p) for p in output_dir.glob("*.pt")}
    assert 0 < len(first_run) < len(images), f"the first run wrote {len(first_run)} of {len(images)}"

    info = job.wait_to_end()
    log = job.log()
    assert info == {"JobState": "COMPLETED", "Restarts": "1", "ExitCode": "0:0"}, log
    assert_every_pyramid_written(images, input_dir, output_dir)
    # No duplicate work: the first run's files are untouched, and the second wrote exactly the rest.
    assert {name: file_identity(output_dir / name) for name in first_run} == first_run
    assert SUMMARY.findall(log) == [(str(len(first_run)), "0"),
                                    (str(len(images) - len(first_run)), str(len(first_run)))], log
    # The log holds both runs (--open-mode=append) and says why the job came back.
    for line in (f"job {job.id} run 1", "time limit near", f"requeueing job {job.id}", f"job {job.id} run 2"):
        assert line in log, f"{line!r} missing from the log:\n{log}"
    assert "2 process(es)" in log, log
