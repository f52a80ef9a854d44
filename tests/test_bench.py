"""pyramid/bench.py: the benchmark runs on a tiny model and reports sane figures (no timing thresholds)."""

import json
import sys
import time

import pytest
import torch

import warm
from conftest import REPO
from pyramid.bench import get_args_parser, ideal_rate, main, run_child


def test_a_child_that_prints_more_than_a_pipe_holds_is_read_to_its_end():
    # One `failed:` line per broken image, far more than the 64 KiB a pipe holds, on both pipes.
    script = ("import resource, sys\n"
              "sys.stdout.write('x' * 300_000 + '\\n')\n"
              "sys.stderr.write(''.join(f'failed: image{i}.png: truncated\\n' for i in range(20_000)))\n"
              "bytearray(50 << 20)\n"  # a peak RSS wait4 must report
              "sys.exit(3)\n")
    started = time.monotonic()
    status, usage, stdout, stderr = run_child([sys.executable, "-c", script], timeout=60)
    assert time.monotonic() - started < 30
    assert status == 3 and stdout == "x" * 300_000 + "\n"
    assert stderr.count("failed: ") == 20_000 and stderr.endswith("failed: image19999.png: truncated\n")
    assert usage.ru_maxrss > 50 << 10  # KiB: the child's own, not this process's children's sum
    with pytest.raises(RuntimeError, match="ran past 0.5 s and was killed; the end of its stderr:\nstarted"):
        run_child([sys.executable, "-c", "import sys, time; print('started', file=sys.stderr, flush=True); "
                   "time.sleep(60)"], timeout=0.5)
    assert time.monotonic() - started < 30


def test_ideal_rate_overlaps_on_gpu_and_adds_up_on_cpu():
    assert ideal_rate(100.0, 25.0, torch.device("cuda")) == 25.0
    assert ideal_rate(100.0, 25.0, torch.device("cuda"), 10.0) == 10.0  # the writer can be the bound
    assert ideal_rate(100.0, 25.0, torch.device("cuda"), 40.0) == 25.0
    assert ideal_rate(100.0, 25.0, torch.device("cpu")) == pytest.approx(20.0)
    assert ideal_rate(100.0, 25.0, torch.device("cpu"), 10.0) == pytest.approx(20.0)


def test_bench_refuses_mixed_or_missing_sources_before_work(capsys):
    for args, message in ((["--table", "--synthetic", "4"], "--table makes its own"),
                          (["--synthetic", "4"], "--model or --random"),
                          (["--random", "tiny"], "--input_dir or --synthetic"),
                          (["--table", "--output_dir", "/no/such/dir"], "--output_dir /no/such/dir does not exist")):
        assert main(get_args_parser().parse_args(args)) == 2, args
        assert message in capsys.readouterr().err, args


def test_bench_reports_positive_consistent_figures():
    result = warm.run(
        [sys.executable, "-m", "pyramid.bench", "--random", "tiny", "--synthetic", "8", "--batch_size", "4",
         "--num_workers", "1", "--baseline", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["images"] == 8 and figures["device"] == "cpu" and figures["dtype"] == "fp32"
    for name in ("decode_bound", "model_bound", "write_bound", "write_bound_mb", "end_to_end", "baseline", "ideal"):
        assert 0 < figures[name] < 1e6, name
    assert figures["end_to_end_over_ideal"] == pytest.approx(figures["end_to_end"] / figures["ideal"])
    assert figures["end_to_end_over_baseline"] == pytest.approx(figures["end_to_end"] / figures["baseline"])
    assert figures["ideal"] < min(figures["decode_bound"], figures["model_bound"])
    assert 50 < figures["peak_rss_mib"] < 8192
    assert figures["min_cosine_vs_baseline"] >= 0.9999  # our files equal the straightforward computation


def test_reader_figures_side_by_side_on_a_synthetic_tree():
    result = warm.run(
        [sys.executable, "-m", "pyramid.bench", "--reader", "--synthetic_tree", "12", "--reader_items", "12",
         "--rounds", "1", "--num_workers", "0", "--batch_size", "4", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["files"] == 12 and figures["levels"] == 5 and 1.0 < figures["file_mb"] < 1.1
    assert 1.0 < figures["pack_gb"] * 1000 / 12 < 1.1  # the pack takes what the files take
    rows = figures["rows"]
    assert {"raw read(), files", "raw read() into batch rows, files", "torch.load, files",
            "torch.load mmap + clone, files", "PyramidDataset, files",
            "raw pread(), pack rows", "PyramidDataset, pack",
            "plain loop: DataLoader(batch 4, shuffle, 0 workers), files",
            "dataset.loader(4, shuffle=True), files", "dataset.loader(4, shuffle=True), pack",
            "dataset.loader(4, shuffle=True), preload cpu"} <= set(rows)
    assert figures["preload_seconds"] > 0
    for name, (rate, size) in rows.items():
        assert 0 < rate < 1e7 and 1.0e6 < size < 1.1e6, name


def test_save_random_model_gives_a_model_the_tools_load(tmp_path):
    from pyramid.encoder import load_model_info

    directory = tmp_path / "models" / "random-tiny"
    result = warm.run([sys.executable, "-m", "pyramid.bench", "--save_random_model", str(directory),
                             "--random", "tiny"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"saved a random-weight DINOv2 (tiny: hidden size 32, 2 layers, 2 heads) to "
                                    f"{directory}; pass --model {directory}")
    info, _ = load_model_info(directory)
    assert (info.hidden_size, info.grid_size) == (32, 16) and info.revision.startswith("sha256:")
    # A second save would mix two models in one folder: refused.
    assert main(get_args_parser().parse_args(["--save_random_model", str(directory)])) == 2


def test_reader_rows_pack_with_the_threads_this_process_may_use(tmp_path, monkeypatch):
    """The pack the reader rows need is built on min(8, the CPUs of this process's affinity), not the machine's."""
    import argparse

    from pyramid import readbench
    from pyramid.synthetic import write_tree

    tree = write_tree(tmp_path / "tree", ["a", "b"])
    monkeypatch.setattr("os.cpu_count", lambda: 128)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {4, 5, 6})
    built = []

    class Built(Exception):
        """Stops the bench once the pack's threads are known: the rows themselves are the test above's."""

    def build_pack(root, levels, workers):
        built.append(workers)
        raise Built

    monkeypatch.setattr(readbench, "build_pack", build_pack)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the bench's, not this test process's
    args = argparse.Namespace(tree=tree, synthetic_tree=None, reader_items=2, rounds=1, batch_size=None,
                              num_workers=None, json=False)
    with pytest.raises(Built):
        readbench.reader_main(args)
    assert built == [3]
