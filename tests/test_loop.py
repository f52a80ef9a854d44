"""pyramid/loop.py: the failures record between runs, default sizes, and images whose features come out
non-finite (the real CLI on a real model that overflows on some images only)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import warm
from conftest import REPO, run_cli, save_tiny_dinov2, write_images
from faulty_forward import faulty
from pyramid.batches import non_finite_message
from pyramid.plan import default_batch_size, default_num_workers, prune_failures
from pyramid.tree import FAILURES_NAME
from pyramid.writer import record_failure


def test_prune_failures_keeps_others_and_drops_retried_and_torn_lines(tmp_path):
    record_failure(tmp_path, "a.png", "OSError: truncated")
    record_failure(tmp_path, "b.png", "ValueError: empty file")
    with open(tmp_path / FAILURES_NAME, "a") as file:
        file.write('{"path": "c.pn')  # a line torn by a kill
    prune_failures(tmp_path, {"a.png"})
    lines = (tmp_path / FAILURES_NAME).read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["b.png"]
    prune_failures(tmp_path, {"b.png"})
    assert not (tmp_path / FAILURES_NAME).exists()


def test_prune_failures_knows_a_name_that_is_not_utf8_and_keeps_other_lines_byte_for_byte(tmp_path):
    odd, other = os.fsdecode(b"bad\xfe.png"), os.fsdecode(b"other\xff.png")
    record_failure(tmp_path, odd, "broken")
    record_failure(tmp_path, other, "broken too")
    with open(tmp_path / FAILURES_NAME, "ab") as file:
        file.write(b'{"path": "hand\xe9.png", "error": "a line in Latin-1, by hand"}\n')
    kept = (tmp_path / FAILURES_NAME).read_bytes().splitlines(keepends=True)[1:]
    prune_failures(tmp_path, {odd})
    assert (tmp_path / FAILURES_NAME).read_bytes() == b"".join(kept)
    prune_failures(tmp_path, {other, os.fsdecode(b"hand\xe9.png")})
    assert not (tmp_path / FAILURES_NAME).exists()


def test_defaults_follow_the_device(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_batch_size(torch.device("cuda")) == 64 and default_batch_size(torch.device("cpu")) == 16
    cpu_workers = default_num_workers(torch.device("cpu"))
    assert cpu_workers >= 1
    assert default_num_workers(torch.device("cuda")) == max(1, min(16, cpu_workers - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: never zero workers
    assert default_num_workers(torch.device("cpu")) == 1


# --- No non-finite file: a real model that overflows on some images only ---------------------------------

TRIGGER_THRESHOLD = 2.0  # normalised red (ImageNet mean/std): only near-white patches exceed it


def save_overflowing_dinov2(directory, amplification):
    """A tiny random DINOv2, saved with save_pretrained, edited so that its features overflow for images
    with a near-white region on their LEFT side, and only for those.

    Channel 0 of the patch embedding is 100 * (mean red of the patch - TRIGGER_THRESHOLD), plus a position
    embedding of +100 on the left half of the grid and -100 on the right: positive only for white patches on
    the left. Large next to the other channels, it decides the sign of that channel after layer 0's
    LayerNorm (about +-5.6), which MLP unit 0 reads (weight 10): GELU gives about 56 or exactly 0. That unit's
    fc2 weights are `amplification`: 56 * 1e38 overflows fp32, 56 * 1e4 only fp16; 0 times either adds
    nothing. Layer 1's LayerNorm turns the infinity into NaN (inf - inf), and attention carries it to
    every token of that image: the image's features are NaN, the other images' are finite. A mirrored
    image moves the white region to the other side, so an image and its mirror differ.
    """
    from transformers import Dinov2Model

    save_tiny_dinov2(directory)
    model = Dinov2Model.from_pretrained(directory)
    with torch.no_grad():
        embeddings = model.embeddings
        projection = embeddings.patch_embeddings.projection  # Conv2d(3, D, 14, stride 14)
        projection.weight[0] = 0
        projection.weight[0, 0] = 100 / (14 * 14)
        projection.bias[0] = -100 * TRIGGER_THRESHOLD
        grid = embeddings.position_embeddings[0, 1:, 0].view(37, 37)  # (row, column) of the stored grid
        grid[:, :18] = 100
        grid[:, 18:] = -100
        embeddings.position_embeddings[0, 0, 0] = 0
        embeddings.cls_token[0, 0, 0] = -1000  # the CLS token never triggers
        mlp = model.encoder.layer[0].mlp
        mlp.fc1.weight[0] = 0
        mlp.fc1.weight[0, 0] = 10
        mlp.fc1.bias[0] = 0
        mlp.fc2.weight[:, 0] = amplification
    model.save_pretrained(directory)
    return directory


def write_trigger_images(directory, kinds):
    """One 224x224 PNG per kind, named NN_kind.png: dark noise, with a white band on the left, on the right,
    or all white. The noise is seeded by position: the same name has the same dark pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, kind in enumerate(kinds):
        pixels = np.random.default_rng(index).integers(0, 100, size=(224, 224, 3), dtype=np.uint8)
        if kind == "left":
            pixels[:, :80] = 255
        elif kind == "right":
            pixels[:, -80:] = 255
        elif kind == "white":
            pixels[:] = 255
        Image.fromarray(pixels).save(directory / f"{index:02d}_{kind}.png")
    return directory


def failures(output_dir):
    path = output_dir / FAILURES_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary_line(stderr):
    return [line for line in stderr.splitlines() if line.startswith("done: ")][-1]


def last_run(output_dir):
    return json.loads((output_dir / "runs.jsonl").read_text().splitlines()[-1])


def outputs(directory):
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*.pt"))


def test_images_with_non_finite_features_are_failures_and_the_others_are_the_normal_files(tmp_path):
    model = save_overflowing_dinov2(tmp_path / "model", amplification=1e38)
    kinds = ["dark", "left", "right", "white", "dark", "dark"]
    common = ("--model", model, "--batch_size", 4, "--num_workers", 0)  # batches mix good and bad images
    result = run_cli("--input_dir", write_trigger_images(tmp_path / "in", kinds), "--output_dir", tmp_path / "out",
                     *common)
    assert result.returncode == 3, result.stderr
    message = non_finite_message("fp32", [False, False])
    assert message.startswith("non-finite features (NaN or inf) for the image, computed in fp32; no file written")
    assert "weights of --model are likely broken" in message
    assert failures(tmp_path / "out") == [{"path": "01_left.png", "error": message},
                                          {"path": "03_white.png", "error": message}]
    assert f"failed: 01_left.png: {message}" in result.stderr.splitlines()
    assert summary_line(result.stderr).startswith("done: 4 written, 0 skipped (already there), 2 failed in ")
    assert {key: last_run(tmp_path / "out")[key] for key in ("status", "written", "failed")} == {
        "status": 3, "written": 4, "failed": 2}
    assert outputs(tmp_path / "out") == ["00_dark.pt", "02_right.pt", "04_dark.pt", "05_dark.pt"]

    # The normal run: the bad images swapped for dark ones, so every batch has the same shape and rows.
    swapped = write_trigger_images(tmp_path / "in_ok", ["dark", "dark", "right", "dark", "dark", "dark"])
    reference = run_cli("--input_dir", swapped, "--output_dir", tmp_path / "ok", *common)
    assert reference.returncode == 0 and not failures(tmp_path / "ok"), reference.stderr
    for name in ("00_dark", "04_dark", "05_dark", "02_right"):
        got = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True)
        expected = torch.load(tmp_path / "ok" / f"{name}.pt", weights_only=True)
        assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got), name


def test_an_fp16_overflow_says_what_to_try_and_a_mirror_fails_its_image(tmp_path):
    # Overflows fp16 (56 * 1e4 > 65504), not fp32 or bf16 (which has fp32's range).
    model = save_overflowing_dinov2(tmp_path / "model", amplification=1e4)
    images = write_trigger_images(tmp_path / "in", ["dark", "left", "right"])
    result = run_cli("--input_dir", images, "--output_dir", tmp_path / "out", "--model", model, "--flip",
                     "--num_workers", 0, "--dtype", "fp16")
    assert result.returncode == 3, result.stderr
    advice = "no file written: most likely an fp16 overflow, rerun with --dtype bf16 or --dtype fp32"
    assert failures(tmp_path / "out") == [
        {"path": "01_left.png", "error": f"non-finite features (NaN or inf) for the image, computed in fp16; {advice}"},
        {"path": "02_right.png",
         "error": f"non-finite features (NaN or inf) for its mirror (--flip), computed in fp16; {advice}"}]
    assert outputs(tmp_path / "out") == ["00_dark.pt"]
    written = torch.load(tmp_path / "out" / "00_dark.pt", weights_only=True)
    assert "flip/16x16" in written and all(value.isfinite().all() for value in written.values())
    assert summary_line(result.stderr).startswith("done: 1 written, 0 skipped (already there), 2 failed in ")


def test_a_model_that_is_nan_everywhere_writes_no_file(tmp_path, tiny_model):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(tiny_model)
    with torch.no_grad():
        model.embeddings.patch_embeddings.projection.weight[5, 1, 3, 3] = float("nan")  # a damaged checkpoint
    model.save_pretrained(tmp_path / "model")
    shutil.copy(tiny_model / "preprocessor_config.json", tmp_path / "model")
    write_images(tmp_path / "in", 5)
    result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tmp_path / "model",
                     "--batch_size", 2, "--num_workers", 0)
    assert result.returncode == 3, result.stderr
    assert failures(tmp_path / "out") == [{"path": f"{i:05d}.png", "error": non_finite_message("fp32", [False, False])}
                                          for i in range(5)]
    assert outputs(tmp_path / "out") == []
    assert summary_line(result.stderr).startswith("done: 0 written, 0 skipped (already there), 5 failed in ")
    assert last_run(tmp_path / "out")["failed"] == 5


def test_shared_memory_the_decode_workers_need():
    from pyramid.plan import shared_memory_needed, shared_memory_warning

    # (15 workers x 2 prefetched + 2 held) batches of 64 uint8 224x224 crops; --flip doubles each batch.
    assert shared_memory_needed(64, 15, 224) == 32 * 64 * 3 * 224 * 224 == 308_281_344
    assert shared_memory_needed(64, 15, 224, flip=True) == 2 * 308_281_344
    assert shared_memory_needed(64, 0, 224) == 0  # no workers: nothing crosses processes
    # DINOv3's pixels cross as float32 (its processor resizes floats); at --resolution 448 each crop is 4x larger.
    assert shared_memory_needed(64, 15, 224, pixel_bytes=4) == 4 * 308_281_344
    assert shared_memory_needed(64, 15, 448) == 4 * 308_281_344
    assert shared_memory_warning(16, 2, 224, shm="/") is None  # plenty of room
    line = shared_memory_warning(10**6, 15, 224, shm="/")  # far more than any disk
    assert line.startswith("warning: / has ") and "15 decode workers at batch 1000000 hold up to " in line
    assert "--shm-size=" in line and "--num_workers" in line and "\n" not in line


# --- Faults in the forward pass, put in from outside (tests/faulty_forward.py), on the run in this process ----


def extract_in_process(input_dir, output_dir, model, *options):
    """The extractor's run in this process (no torch import to pay); returns its exit status."""
    from pyramid.extract import check_args, get_args_parser
    from pyramid.loop import run
    from pyramid.settings import Settings

    args = get_args_parser().parse_args(["--input_dir", str(input_dir), "--output_dir", str(output_dir),
                                         "--model", str(model), "--num_workers", "0", *map(str, options)])
    check_args(args)
    return run(Settings.from_args(args))


def file_values(directory):
    return {name: torch.load(directory / name, weights_only=True) for name in outputs(directory)}


@pytest.fixture
def faulty_model(monkeypatch):
    """faulty_model(**faults): Dinov2Model.forward with tests/faulty_forward.py's faults, for this test."""
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Model

    def put_in(**faults):
        monkeypatch.setattr(Dinov2Model, "forward", faulty(Dinov2Model.forward, **faults))

    return put_in


def test_an_error_is_said_recorded_and_never_reported_done_and_a_rerun_finishes(tmp_path, tiny_model,
                                                                                 faulty_model, capsys):
    from pyramid import runs

    write_images(tmp_path / "in", 10)
    faulty_model(raise_at=2)
    capsys.readouterr()
    assert extract_in_process(tmp_path / "in", tmp_path / "out", tiny_model, "--batch_size", 2) == 4
    stderr = capsys.readouterr().err
    lines = stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == [
        "error: RuntimeError: injected failure at forward pass 2"]
    assert "Traceback (most recent call last):" in stderr and "in wrapped" in stderr  # the traceback, in the log
    assert not [line for line in lines if line.startswith("done:")]
    assert [line for line in lines if line.startswith("not finished:")][0].startswith(
        "not finished: 2 written, 0 skipped (already there), 0 failed, 8 not done in ")
    assert ("ended early: RuntimeError: injected failure at forward pass 2; rerun the same command to finish "
            "the 8 images not done") in lines
    record = last_run(tmp_path / "out")
    assert (record["status"], record["written"], record["failed"]) == (4, 2, 0)
    assert record["error"] == "RuntimeError: injected failure at forward pass 2"
    assert len(outputs(tmp_path / "out")) == 2

    assert runs.main(runs.get_args_parser().parse_args(["status", str(tmp_path / "out"), record["run_id"]])) == 0
    said = capsys.readouterr()
    assert said.out == "4\n" and said.err == "error: RuntimeError: injected failure at forward pass 2\n"

    faulty_model()  # no fault: the rerun finishes
    assert extract_in_process(tmp_path / "in", tmp_path / "out", tiny_model, "--batch_size", 2) == 0
    assert summary_line(capsys.readouterr().err).startswith("done: 8 written, 2 skipped (already there), 0 failed")
    assert len(outputs(tmp_path / "out")) == 10


SIGNALLED_WHILE_RECORDING = """
import os, signal, sys
from pyramid import loop
record_run = loop.Extraction.record_run
def signalled(self):
    os.kill(os.getpid(), signal.SIGTERM)  # as the launcher's, sent the moment another process failed
    record_run(self)
loop.Extraction.record_run = signalled
from pyramid.extract import get_args_parser, main
sys.exit(main(get_args_parser().parse_args(sys.argv[1:])))
"""


def test_a_sigterm_while_the_run_is_recorded_leaves_its_line(tmp_path, tiny_model):
    """torchrun SIGTERMs every process as soon as one fails: the main process, recording the run by then, ends
    after its runs.jsonl line is written, not before (the line of a faulty attempt went missing that way)."""
    write_images(tmp_path / "in", 2)
    result = warm.run([sys.executable, "-c", SIGNALLED_WHILE_RECORDING, "--input_dir", tmp_path / "in",
                       "--output_dir", tmp_path / "out", "--model", tiny_model, "--num_workers", "0"],
                      cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert [(run["status"], run["written"]) for run in runs] == [(0, 2)]
