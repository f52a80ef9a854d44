"""The extractor as users run it: the real CLI in subprocesses, 1 and 2 processes, on real files."""

import json
import os
import time
from datetime import datetime

import torch
from PIL import Image

import warm
from conftest import REPO, accelerate_launch, run_cli, write_images

TWO_CPU_PROCESSES = REPO / "tests" / "accelerate_cpu_2proc.yaml"


def launch_two(*args, timeout=600, env=None):
    """`accelerate launch` with two real CPU processes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    command = [*accelerate_launch(TWO_CPU_PROCESSES), str(REPO / "extract_distributed.py"), *map(str, args)]
    return warm.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def outputs(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*.pt"))


def mtimes(directory):
    return {name: (directory / name).stat().st_mtime_ns for name in outputs(directory)}


def summary_line(stderr):
    return [line for line in stderr.splitlines() if line.startswith("done: ")][-1]


def runs(output_dir):
    return [json.loads(line) for line in (output_dir / "runs.jsonl").read_text().splitlines()]


def test_resume_writes_only_what_is_missing(tmp_path, tiny_model):
    write_images(tmp_path / "in", 6)
    args = ("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
            "--batch_size", 4, "--num_workers", 1)
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert summary_line(first.stderr).startswith("done: 6 written, 0 skipped")
    assert "per process" not in summary_line(first.stderr)  # one process
    # Output to a file or pipe (a log): no carriage-return bar updates, and for a run of seconds no
    # progress lines either (they start after 30 s: tests/test_progress.py).
    assert "\r" not in first.stderr and "progress:" not in first.stderr
    assert outputs(tmp_path / "out") == [f"{i:05d}.pt" for i in range(6)]
    before = mtimes(tmp_path / "out")

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert summary_line(second.stderr).startswith("done: 0 written, 6 skipped")
    assert mtimes(tmp_path / "out") == before

    (tmp_path / "out" / "00001.pt").unlink()
    (tmp_path / "out" / "00004.pt").unlink()
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    assert summary_line(third.stderr).startswith("done: 2 written, 4 skipped")
    after = mtimes(tmp_path / "out")
    assert sorted(name for name in after if after[name] != before.get(name)) == ["00001.pt", "00004.pt"]
    # One runs.jsonl line per run, appended at its end.
    records = runs(tmp_path / "out")
    assert [(r["status"], r["written"], r["skipped"], r["failed"], r["per_process"], r["processes"])
            for r in records] == [(0, 6, 0, 0, [6], 1), (0, 0, 6, 0, [0], 1), (0, 2, 4, 0, [2], 1)]
    assert len({r["run_id"] for r in records}) == 3
    for record in records:
        started, finished = datetime.fromisoformat(record["started"]), datetime.fromisoformat(record["finished"])
        assert started.tzinfo is not None and started <= finished
        assert record["settings"]["model"] == str(tiny_model) and record["settings"]["batch_size"] == 4


def test_broken_image_is_recorded_and_exits_3(tmp_path, tiny_model):
    write_images(tmp_path / "in", 3)
    data = (tmp_path / "in" / "00001.png").read_bytes()
    (tmp_path / "in" / "00001.png").write_bytes(data[: len(data) // 3])
    args = ("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
            "--num_workers", 1)
    result = run_cli(*args)
    assert result.returncode == 3, result.stderr
    assert outputs(tmp_path / "out") == ["00000.pt", "00002.pt"]
    assert "00001.png" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [record["path"] for record in records] == ["00001.png"] and records[0]["error"]

    again = run_cli(*args)  # tried again, recorded once, not twice
    assert again.returncode == 3
    assert len((tmp_path / "out" / "failures.jsonl").read_text().splitlines()) == 1

    Image.new("RGB", (30, 30), "red").save(tmp_path / "in" / "00001.png")
    fixed = run_cli(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert outputs(tmp_path / "out") == ["00000.pt", "00001.pt", "00002.pt"]
    assert not (tmp_path / "out" / "failures.jsonl").exists()


def test_bad_arguments_exit_2_before_any_work(tmp_path, tiny_model):
    write_images(tmp_path / "in", 2)
    started = time.monotonic()
    missing = run_cli("--input_dir", tmp_path / "nope", "--output_dir", tmp_path / "out", "--model", tiny_model)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert time.monotonic() - started < 30  # refused before loading the model
    dtype = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--dtype", "fp8")
    assert dtype.returncode == 2 and "fp8" in dtype.stderr
    assert len(dtype.stderr.strip().splitlines()) == 1
    started = time.monotonic()
    no_model = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out",
                       "--model", tmp_path / "no_such_model")
    assert time.monotonic() - started < 20  # interpreter and torch start included; no hub retries
    assert no_model.returncode == 2
    assert no_model.stderr.strip().splitlines() == [f"error: --model {tmp_path / 'no_such_model'}: no such "
                                                    f"directory (a local model is a directory saved with "
                                                    f"save_pretrained: config.json, preprocessor_config.json "
                                                    f"and the weights)"]
    assert not (tmp_path / "out").exists()


def test_clashing_targets_are_refused_naming_both(tmp_path, tiny_model):
    write_images(tmp_path / "in", 1, names=["a.png"])
    write_images(tmp_path / "in", 1, names=["a.jpg"])
    write_images(tmp_path / "in", 1, names=["b.png"])
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model)
    assert result.returncode == 2
    assert "a.jpg" in result.stderr and "a.png" in result.stderr
    assert outputs(tmp_path / "out") == [] if (tmp_path / "out").exists() else True


def test_no_images_exit_2(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model)
    assert result.returncode == 2 and "no images" in result.stderr


def test_other_settings_are_refused_unless_overwrite(tmp_path, tiny_model):
    write_images(tmp_path / "in", 2)
    args = ("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
            "--num_workers", 0)
    assert run_cli(*args).returncode == 0
    before = mtimes(tmp_path / "out")
    refused = run_cli(*args, "--dtype", "bf16")
    assert refused.returncode == 2 and "dtype" in refused.stderr and "--overwrite" in refused.stderr
    assert mtimes(tmp_path / "out") == before
    replaced = run_cli(*args, "--dtype", "bf16", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert summary_line(replaced.stderr).startswith("done: 2 written")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dtype"] == "bf16" and manifest["levels"] == ["16x16", "8x8", "4x4", "2x2", "1x1"]
    pyramid = torch.load(tmp_path / "out" / "00000.pt", weights_only=True)
    assert pyramid["16x16"].dtype == torch.float32  # files hold fp32 whatever the compute dtype


def test_limit_takes_the_first_images_in_sorted_order(tmp_path, tiny_model):
    write_images(tmp_path / "in", 5)
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                     "--limit", 2, "--num_workers", 0)
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path / "out") == ["00000.pt", "00001.pt"]


def test_two_processes_write_each_image_once_and_match_one_process(tmp_path, tiny_model):
    write_images(tmp_path / "in", 7, names=[f"{i % 3}/{i:05d}.png" for i in range(7)])
    common = ("--input_dir", tmp_path / "in", "--model", tiny_model, "--batch_size", 2, "--num_workers", 1)
    single = run_cli(*common, "--output_dir", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    double = launch_two(*common, "--output_dir", tmp_path / "two", env={"PYRAMID_RUN_ID": "two-processes"})
    assert double.returncode == 0, double.stdout + double.stderr
    assert "on 2 process(es)" in double.stderr
    summary = summary_line(double.stderr)
    assert summary.startswith("done: 7 written, 0 skipped (already there), 0 failed")  # not 14
    record, = runs(tmp_path / "two")  # one line, from the main process
    assert (record["run_id"], record["status"], record["written"], record["processes"]) == ("two-processes", 0, 7, 2)
    assert len(record["per_process"]) == 2 and sum(record["per_process"]) == 7
    assert summary.endswith(f"; per process: {record['per_process'][0]}, {record['per_process'][1]}")
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one") and len(outputs(tmp_path / "one")) == 7
    for name in outputs(tmp_path / "one"):
        one = torch.load(tmp_path / "one" / name, weights_only=True)
        two = torch.load(tmp_path / "two" / name, weights_only=True)
        assert list(one) == list(two)
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-5), (name, key)


def test_two_processes_on_one_image(tmp_path, tiny_model):
    write_images(tmp_path / "in", 1)
    result = launch_two("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                        "--num_workers", 0, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_line(result.stderr).startswith("done: 1 written")
    assert outputs(tmp_path / "out") == ["00000.pt"]
    # accelerate_config.yaml on a machine without GPUs: said once, by the main process.
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: no GPU")]
    assert warnings == [f"warning: no GPU: 2 processes share {len(os.sched_getaffinity(0))} CPU core(s) on this "
                        f"machine; one process (python extract_distributed.py, without accelerate launch) is as "
                        f"fast and loads the model once"]


def test_under_the_launcher_an_error_is_said_once_and_recorded(tmp_path, tiny_model):
    write_images(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    result = launch_two("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model,
                        "--dtype", "fp8", env={"PYRAMID_RUN_ID": "bad-dtype"}, timeout=300)
    assert result.returncode == 1, result.stderr  # what accelerate launch makes of any failure
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown --dtype 'fp8'; use one of auto, fp16, bf16, fp32"], result.stderr
    record, = runs(tmp_path / "out")
    assert (record["run_id"], record["status"], record["processes"]) == ("bad-dtype", 2, 2)
