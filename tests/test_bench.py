"""pyramid/bench.py: the benchmark runs on a tiny model and reports sane figures (no timing thresholds)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TORCHVISION
from pyramid.bench import (
    bound_name,
    dirty_limit_bytes,
    format_models_table,
    get_args_parser,
    ideal_rate,
    main,
    measure_model_rows,
    measure_write,
    run_child,
    write_levers,
    write_regime,
    write_synthetic_faces,
    write_table_inputs,
)


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
    assert bound_name({"decode": 30.0, "model": 10.0, "write": 20.0}) == "model"


@pytest.mark.parametrize("serialise, function", [("layout", "write_atomic"), ("torch.save", "save_atomic")])
def test_write_bound_writes_real_files_and_cleans_up(tmp_path, monkeypatch, serialise, function):
    import pyramid.writer

    written = []
    real = getattr(pyramid.writer, function)
    monkeypatch.setattr(pyramid.writer, function,
                        lambda content, path, **options: (written.append(path), real(content, path, **options)))
    files_per_second, megabytes_per_second, used = measure_write(tmp_path, 8, 4, 3, 7, threads=2, serialise=serialise)
    assert len(written) == 9 and used == serialise  # whole batches: 7 files asked, 3 batches of 3
    file_bytes = 4 * 8 * (16 + 4 + 1)
    assert 0 < files_per_second and megabytes_per_second > files_per_second * file_bytes / 1e6  # + zip overhead
    assert list(tmp_path.iterdir()) == []


def test_write_regime_tells_memory_page_cache_and_disk_apart(tmp_path):
    limit = dirty_limit_bytes()
    assert limit is not None and limit > 0  # Linux: /proc/sys/vm and /proc/meminfo
    assert write_regime(tmp_path, 10**6) == "page cache" or write_regime(tmp_path, 10**6) == "memory (tmpfs)"
    if write_regime(tmp_path, 10**6) == "page cache":
        assert write_regime(tmp_path, 2 * limit) == "disk"
    if Path("/dev/shm").is_dir():
        assert write_regime("/dev/shm", 10**15) == "memory (tmpfs)"


def test_write_levers_measure_both_serialisers_and_the_gil(tmp_path):
    levers = write_levers(tmp_path, 8, 4, 4, 8, (1, 2), rounds=1)
    assert set(levers["files_per_second"]) == {"layout", "torch.save"}
    assert all(set(per) == {"1", "2"} and all(rate > 0 for rate in per.values())
               for per in levers["files_per_second"].values())
    assert all(value is None or value >= 0 for value in levers["gil_ms_per_file"].values())
    assert levers["serialiser"] == "layout" and levers["regime"] in ("page cache", "memory (tmpfs)")
    assert list(tmp_path.iterdir()) == []


def test_preflight_says_what_a_run_here_would_use(capsys):
    assert main(get_args_parser().parse_args(["--preflight", "--random", "tiny", "--num_workers", "1"])) == 0
    lines = capsys.readouterr().out.splitlines()
    said = {line.partition(":")[0]: line for line in lines}
    assert said["device"].startswith("device: cpu (torch sees no CUDA device)")
    assert "torch " + torch.__version__ in said["libraries"]
    assert said["PNG decoder"].startswith("PNG decoder: pyspng ")  # installed here (requirements.txt)
    assert said["attention"].startswith("attention: sdpa: ") and "fp32, batch 16, cpu" in said["attention"]
    assert said["files"].startswith("files: torch.save's bytes made by ArchiveLayout")
    assert "image processor" in said and "/dev/shm" in said and "torch.compile" in said and "disk" in said


def test_preflight_names_the_missing_png_decoder(capsys, monkeypatch):
    import pyramid.decode

    monkeypatch.setattr(pyramid.decode, "pyspng", None)
    assert main(get_args_parser().parse_args(["--preflight", "--random", "tiny", "--num_workers", "0"])) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PNG decoder"))
    assert "pyspng is not installed" in line and "docs/gpu.md" in line


def test_table_inputs_are_prepare_sized_pngs(tmp_path):
    directory = write_table_inputs(tmp_path / "in256", 256, count=5, unique=2)
    names = sorted(path.name for path in directory.iterdir())
    assert names == [f"{i:05d}.png" for i in range(5)]
    pixels = [np.asarray(Image.open(directory / name)) for name in names]
    assert all(image.shape == (256, 256, 3) for image in pixels)
    assert np.array_equal(pixels[0], pixels[2]) and not np.array_equal(pixels[0], pixels[1])


def test_bench_refuses_mixed_or_missing_sources_before_work(capsys):
    for args, message in ((["--table", "--synthetic", "4"], "--table makes its own"),
                          (["--synthetic", "4"], "--model or --random"),
                          (["--random", "tiny"], "--input_dir or --synthetic"),
                          (["--table", "--output_dir", "/no/such/dir"], "--output_dir /no/such/dir does not exist")):
        assert main(get_args_parser().parse_args(args)) == 2, args
        assert message in capsys.readouterr().err, args


def test_synthetic_faces_are_real_looking_pngs(tmp_path):
    paths = sorted(write_synthetic_faces(tmp_path, 2, side=128).iterdir())
    first, second = (np.asarray(Image.open(path)) for path in paths)
    assert first.shape == (128, 128, 3) and first.std() > 20
    assert not np.array_equal(first, second)


def test_bench_reports_positive_consistent_figures():
    result = subprocess.run(
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
    result = subprocess.run(
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
def test_gpu_table_runs_on_cpu_with_quick_counts(tmp_path, capsys, monkeypatch):
    # In this process (the end-to-end runs are subprocesses all the same), no decode workers: seconds saved.
    # torch.compile stands aside (compiling takes minutes here): --compile's measuring code still runs.
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)
    args = get_args_parser().parse_args(["--table", "--random", "tiny", "--quick", "--batch_sizes", "4",
                                         "--num_workers", "0", "--compile", "--save", str(tmp_path / "table.json")])
    assert main(args) == 0
    markdown = capsys.readouterr().out
    figures = json.loads((tmp_path / "table.json").read_text())
    assert "| 256x256 PNG | 4 | 16 |" in markdown and "| fp16 | " in markdown
    assert figures["device"] == "cpu" and figures["dtype"] == "fp32" and figures["model"] == "random tiny"
    assert [(row["input"], row["batch_size"], row["images"]) for row in figures["rows"]] == [
        ("1024x1024 PNG", 4, 8), ("256x256 PNG", 4, 16)]
    for row in figures["rows"]:
        rates = {"decode": row["decode_bound"], "model": row["model_bound"], "write": row["write_bound"]}
        assert all(0 < rate < 1e6 for rate in rates.values()) and 0 < row["end_to_end"] < 1e6
        assert row["ideal"] == pytest.approx(1 / (1 / rates["model"] + 1 / rates["decode"]))
        assert row["end_to_end_over_ideal"] == pytest.approx(row["end_to_end"] / row["ideal"])
        assert row["bound"] == min(rates, key=rates.get)
    assert all(row["files_went_to"] in ("page cache", "memory (tmpfs)") for row in figures["rows"])
    assert figures["serialiser"] == "layout" and figures["attention"].startswith("sdpa: ")
    write = figures["write"]
    assert set(write["files_per_second"]) == {"layout", "torch.save"} and write["disk_files_per_second"] > 0
    assert "| layout | " in markdown and "| torch.save | " in markdown and "Disk-bound: " in markdown
    assert figures["compiled"]["model_bound"] > 0 and "--compile: model bound" in markdown
    # 256x256 PNGs decode faster than 1024x1024 ones: the two inputs really differ.
    assert figures["rows"][1]["decode_bound"] > figures["rows"][0]["decode_bound"]
    for dtype in ("fp16", "bf16"):  # computed on CPU here, on the GPU there
        cosines = figures["fidelity"][dtype]
        assert list(cosines) == ["16x16", "8x8", "4x4", "2x2", "1x1"]
        assert all(0.99 < value <= 1.0 + 1e-6 for value in cosines.values()), (dtype, cosines)


def test_model_rows_measure_each_encoder_and_resolution(tmp_path, capsys):
    """--models' rows, at the tiny size: each family and resolution loads and runs with its own grid; a DINOv3
    where torchvision is missing says so instead of a figure."""
    rows = (("dinov2", "tiny", 224), ("dinov2", "tiny", 448), ("dinov3", "tiny", 224), ("dinov3", "tiny", 256))
    figures = measure_model_rows(torch.device("cpu"), "fp32", 2, 4, tmp_path, rows)
    assert [(row["model"], row["resolution"]) for row in figures] == [(f"{f}-{s}", r) for f, s, r in rows]
    assert [row.get("grid") for row in figures[:2]] == [16, 32] and figures[1]["levels"] == 6
    if TORCHVISION:
        assert [(row["grid"], row["levels"]) for row in figures[2:]] == [(14, 2), (16, 5)]
    else:
        assert all("torchvision" in row["skipped"] for row in figures[2:])
    assert all(row["model_bound"] > 0 for row in figures if "skipped" not in row)
    table = format_models_table({"dtype": "fp32", "device_name": "cpu", "batch_size": 2, "images": 4,
                                 "rows": figures})
    assert "| dinov2-tiny | 448 | 32x32 .. 1x1 (6) | " in table
    assert ("| dinov3-tiny | 224 | 14x14 .. 7x7 (2) | " if TORCHVISION else "| dinov3-tiny | 224 | | not measured") \
        in table
    assert main(get_args_parser().parse_args(["--models", "--random", "tiny"])) == 2  # random sizes of its own
    assert "drop --model, --random" in capsys.readouterr().err


def test_save_random_model_gives_a_model_the_tools_load(tmp_path):
    from pyramid.encoder import load_model_info

    directory = tmp_path / "models" / "random-tiny"
    result = subprocess.run([sys.executable, "-m", "pyramid.bench", "--save_random_model", str(directory),
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
    from synthetic_trees import write_tree

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
