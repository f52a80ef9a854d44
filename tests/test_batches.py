"""pyramid/batches.py: a batch's forward passes halved on out-of-memory errors (faults put into the model's
forward pass from outside, tests/faulty_forward.py, on the run in this process), an image too large even alone,
and what a failure record says of features that came out non-finite."""

from types import SimpleNamespace

import torch
from PIL import Image
from test_loop import extract_in_process, failures, file_values, last_run, summary_line

from conftest import write_images
from faulty_forward import faulty
from pyramid.batches import Batches, non_finite_message
from pyramid.encoder import HostCopies
from pyramid.stopping import StopSignals
from pyramid.writer import Writer

# --- Batches on its own: a stand-in encoder on the CPU, the real copies and writer, in this process -----------


class StandInEncoder:
    """encoder.Encoder's interface: each image's patches are its first pixel's value everywhere (a file shows
    which image made it), inf for the value `non_finite`; out of memory for a pass that `too_much` says."""

    def __init__(self, too_much, non_finite=None):
        self.device, self.dtype, self.info = torch.device("cpu"), torch.float32, SimpleNamespace(grid_size=2)
        self.too_much, self.non_finite = too_much, non_finite
        self.passes, self.resets = [], 0

    def __call__(self, pixels):  # (B, 3, H, W) uint8 -> (B, G*G, D) fp32
        self.passes.append(pixels.shape[0])
        if self.too_much(pixels):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (a pass of {len(pixels)})")
        values = pixels[:, 0, 0, 0].float()  # (B,)
        if self.non_finite is not None:
            values[values == self.non_finite] = float("inf")
        return values.view(-1, 1, 1).expand(-1, 4, 3).clone()  # (B, 4, 3)

    def reset_padding(self):
        self.resets += 1


def encode(tmp_path, encoder, batches_of, flip=False, rows=8):
    """Batches.encode for each list of image numbers in `batches_of` (image i's pixels are all i, its mirror's
    100 + i), written by a real Writer; returns (the Batches, {file: its values by level}, failed, notes)."""
    failed, notes = [], []
    tally = SimpleNamespace(writer=Writer(tmp_path, threads=1), too_large=0)
    settings = SimpleNamespace(flip=flip, store_dtype="fp32")
    batches = Batches(encoder, HostCopies("cpu", rows), tally, settings, rows, StopSignals(),
                      lambda image, message: failed.append((image, message)), notes.append)
    for numbers in batches_of:
        pixels = torch.tensor(numbers, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 14, 14).clone()
        if flip:
            pixels = torch.cat([pixels, pixels + 100])  # the images, then their mirrors in the same order
        batches.encode([f"{number}.png" for number in numbers], pixels)
    tally.writer.close()
    files = {path.name: {key: value.unique().tolist() for key, value in torch.load(path, weights_only=True).items()}
             for path in sorted(tmp_path.glob("*.pt"))}
    return batches, files, failed, notes


def test_a_pass_out_of_memory_is_halved_and_the_run_goes_on_at_the_smaller_size(tmp_path):
    encoder = StandInEncoder(lambda pixels: len(pixels) > 2)
    batches, files, failed, notes = encode(tmp_path, encoder, [list(range(8)), [8, 9, 10]])
    assert encoder.passes == [8, 4, 2, 2, 2, 2, 2, 1]  # the second batch starts at the size that fitted
    assert notes == ["out of memory at batch 8; going on at batch 4", "out of memory at batch 4; going on at batch 2"]
    assert (batches.rows, encoder.resets, failed) == (2, 2, [])
    assert files == {f"{i}.pt": {"2x2": [float(i)], "1x1": [float(i)]} for i in range(11)}


def test_with_flip_a_smaller_pass_keeps_each_image_with_its_mirror(tmp_path):
    encoder = StandInEncoder(lambda pixels: len(pixels) > 2)  # a pass of 2 rows: one image and its mirror
    _, files, _, notes = encode(tmp_path, encoder, [[0, 1, 2, 3]], flip=True, rows=4)
    assert encoder.passes == [8, 4, 2, 2, 2, 2]
    assert notes == ["out of memory at batch 4; going on at batch 2", "out of memory at batch 2; going on at batch 1"]
    assert files == {f"{i}.pt": {"2x2": [float(i)], "1x1": [float(i)], "flip/2x2": [100.0 + i],
                                 "flip/1x1": [100.0 + i]} for i in range(4)}


def test_an_image_too_large_alone_and_one_non_finite_are_recorded_failures_of_their_own_images(tmp_path):
    encoder = StandInEncoder(lambda pixels: len(pixels) > 4 or bool((pixels[:, 0, 0, 0] == 5).any()), non_finite=6)
    batches, files, failed, notes = encode(tmp_path, encoder, [list(range(8))])
    assert encoder.passes == [8, 4, 4, 2, 1, 1, 1, 1]
    assert notes == ["out of memory at batch 8; going on at batch 4", "out of memory at batch 4; going on at batch 2",
                     "out of memory at batch 2; going on at batch 1"]
    assert batches.tally.too_large == 1
    assert failed == [
        ("5.png", "out of memory even alone (batch 1), computed in fp32: OutOfMemoryError: CUDA out of memory. "
                  "Tried to allocate 2.00 GiB (a pass of 1); it needs a device with more free memory"),
        ("6.png", non_finite_message("fp32", [False, False]))]
    assert sorted(files) == [f"{i}.pt" for i in (0, 1, 2, 3, 4, 7)]


def test_non_finite_message_names_the_part_and_the_dtype_to_try():
    assert non_finite_message("bf16", [True, False, True, False]) == (
        "non-finite features (NaN or inf) for its mirror (--flip), computed in bf16; no file written: "
        "rerun with --dtype fp32")
    assert non_finite_message("fp16", [False, False, False, False]).startswith(
        "non-finite features (NaN or inf) for the image and its mirror (--flip), computed in fp16")
    # Finite as computed, beyond the range of the files' dtype once rounded into it
    assert non_finite_message("fp32", [True, False], "fp16") == (
        "features of the image beyond the range of --store_dtype fp16 (|x| > 65504): finite in fp32, inf once "
        "stored; no file written: store this tree in bf16 or fp32 (--store_dtype bf16 with another --output_dir, "
        "or with --overwrite)")
    assert non_finite_message("bf16", [True, True, True, False], "bf16").startswith(
        "features of its mirror (--flip) beyond the range of --store_dtype bf16 (|x| > 3.38953e+38)")
    assert non_finite_message("bf16", [True, True, True, False], "bf16").endswith(
        "store this tree in fp32 (--store_dtype fp32 with another --output_dir, or with --overwrite)")



def test_out_of_memory_halves_the_batch_and_writes_the_files_of_the_smaller_batch(tmp_path, tiny_model,
                                                                                   monkeypatch, capsys):
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Model

    write_images(tmp_path / "in", 10)
    assert extract_in_process(tmp_path / "in", tmp_path / "batch2", tiny_model, "--batch_size", 2) == 0
    monkeypatch.setattr(Dinov2Model, "forward", faulty(Dinov2Model.forward, oom_above=2))
    capsys.readouterr()
    assert extract_in_process(tmp_path / "in", tmp_path / "out", tiny_model, "--batch_size", 8) == 0
    stderr = capsys.readouterr().err
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: out of memory at batch 8; going on at batch 4",
                     "note: out of memory at batch 4; going on at batch 2"], stderr
    assert summary_line(stderr).startswith("done: 10 written, 0 skipped (already there), 0 failed in ")
    record = last_run(tmp_path / "out")
    assert (record["status"], record["written"]) == (0, 10)
    assert record["notes"] == [line[len("note: "):] for line in notes]
    # The files of a run at batch 2, value for value: the same images in each forward pass.
    expected, got = file_values(tmp_path / "batch2"), file_values(tmp_path / "out")
    assert sorted(got) == sorted(expected) and len(got) == 10
    for name in expected:
        assert all(torch.equal(got[name][key], expected[name][key]) for key in expected[name]), name


def test_an_image_too_large_even_alone_is_a_recorded_failure_and_its_mirror_stays_its_own(tmp_path, tiny_model,
                                                                                         monkeypatch, capsys):
    """With --flip a pass holds the images and then their mirrors: a smaller pass must keep each pair."""
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Model

    paths = write_images(tmp_path / "in", 6)
    Image.new("RGB", (64, 48), "white").save(paths[2])  # the image that needs "too much memory"
    assert extract_in_process(tmp_path / "in", tmp_path / "clean", tiny_model, "--batch_size", 4, "--flip") == 0
    forward = Dinov2Model.forward

    def out_of_memory_with_the_white_image(self, pixel_values=None, **kwargs):
        if (pixel_values.mean(dim=(1, 2, 3)) > 1.5).any():  # white, normalised: about 2.2 on every channel
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return forward(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(Dinov2Model, "forward", out_of_memory_with_the_white_image)
    capsys.readouterr()
    assert extract_in_process(tmp_path / "in", tmp_path / "out", tiny_model, "--batch_size", 4, "--flip") == 3
    stderr = capsys.readouterr().err
    assert [line for line in stderr.splitlines() if line.startswith("note:")] == [
        "note: out of memory at batch 4; going on at batch 2", "note: out of memory at batch 2; going on at batch 1"]
    failure, = failures(tmp_path / "out")
    assert failure["path"] == "00002.png"
    assert failure["error"].startswith("out of memory even alone (batch 1), computed in fp32: OutOfMemoryError: "
                                       "CUDA out of memory. Tried to allocate 80.00 GiB")
    assert summary_line(stderr).startswith("done: 5 written, 0 skipped (already there), 1 failed in ")
    expected, got = file_values(tmp_path / "clean"), file_values(tmp_path / "out")
    assert sorted(got) == sorted(set(expected) - {"00002.pt"})
    for name in got:
        assert sorted(got[name]) == sorted(expected[name])
        for key in expected[name]:
            assert torch.allclose(got[name][key], expected[name][key], atol=1e-5), (name, key)
