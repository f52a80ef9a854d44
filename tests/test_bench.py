"""pyramid/bench.py: the benchmark runs on a tiny model and reports sane figures (no timing thresholds)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from pyramid.bench import (bound_name, get_args_parser, ideal_rate, main, measure_write, write_synthetic_faces,
                           write_table_inputs)


def test_ideal_rate_overlaps_on_gpu_and_adds_up_on_cpu():
    assert ideal_rate(100.0, 25.0, torch.device("cuda")) == 25.0
    assert ideal_rate(100.0, 25.0, torch.device("cuda"), 10.0) == 10.0  # the writer can be the bound
    assert ideal_rate(100.0, 25.0, torch.device("cuda"), 40.0) == 25.0
    assert ideal_rate(100.0, 25.0, torch.device("cpu")) == pytest.approx(20.0)
    assert ideal_rate(100.0, 25.0, torch.device("cpu"), 10.0) == pytest.approx(20.0)
    assert bound_name({"decode": 30.0, "model": 10.0, "write": 20.0}) == "model"


def test_write_bound_writes_real_files_and_cleans_up(tmp_path, monkeypatch):
    import pyramid.writer

    saved = []
    real_save = pyramid.writer.save_atomic
    monkeypatch.setattr(pyramid.writer, "save_atomic",
                        lambda obj, path, **options: (saved.append(obj), real_save(obj, path, **options)))
    files_per_second, megabytes_per_second = measure_write(tmp_path, 8, 4, 3, 7, threads=2)
    assert len(saved) == 9  # whole batches: 7 files asked, 3 batches of 3
    assert all(value.shape == (1, side * side, 8) for pyramid in saved
               for value, side in zip(pyramid.values(), (4, 2, 1)))
    file_bytes = 4 * 8 * (16 + 4 + 1)
    assert 0 < files_per_second and megabytes_per_second > files_per_second * file_bytes / 1e6  # + zip overhead
    assert list(tmp_path.iterdir()) == []


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
    assert {"raw read(), files", "torch.load, files", "PyramidDataset before (mmap + clone)", "PyramidDataset, files",
            "raw pread(), pack rows", "PyramidDataset, pack",
            "README's old loop: DataLoader(batch 4, shuffle, 0 workers), files",
            "dataset.loader(4, shuffle=True), files", "dataset.loader(4, shuffle=True), pack",
            "dataset.loader(4, shuffle=True), preload cpu"} <= set(rows)
    assert figures["preload_seconds"] > 0
    for name, (rate, size) in rows.items():
        assert 0 < rate < 1e7 and 1.0e6 < size < 1.1e6, name
def test_gpu_table_runs_on_cpu_with_quick_counts(tmp_path, capsys):
    # In this process (the end-to-end runs are subprocesses all the same), no decode workers: seconds saved.
    args = get_args_parser().parse_args(["--table", "--random", "tiny", "--quick", "--batch_sizes", "4",
                                         "--num_workers", "0", "--save", str(tmp_path / "table.json")])
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
    # 256x256 PNGs decode faster than 1024x1024 ones: the two inputs really differ.
    assert figures["rows"][1]["decode_bound"] > figures["rows"][0]["decode_bound"]
    for dtype in ("fp16", "bf16"):  # computed on CPU here, on the GPU there
        cosines = figures["fidelity"][dtype]
        assert list(cosines) == ["16x16", "8x8", "4x4", "2x2", "1x1"]
        assert all(0.99 < value <= 1.0 + 1e-6 for value in cosines.values()), (dtype, cosines)


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
