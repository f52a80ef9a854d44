"""pyramid/writer.py: atomic files, the failures record, write errors."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import hostile_names
import pytest
import torch

from pyramid.levels import build_pyramid, split_pyramids, split_twins
from pyramid.ptzip import is_complete_archive
from pyramid.tree import scan_outputs, temporary_name, writer_tag
from pyramid.writer import Writer, WriterGone, record_failure, save_atomic, write_atomic


def test_save_atomic_leaves_only_the_final_file(tmp_path):
    save_atomic({"1x1": torch.ones(1, 1, 4)}, tmp_path / "a.pt")
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["1x1"], torch.ones(1, 1, 4))


def test_save_atomic_removes_its_temporary_on_error(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"1x1": torch.ones(1, 1, 4)}, tmp_path / "a.pt")
    assert os.listdir(tmp_path) == []


def test_writer_splits_batches_into_files(tmp_path):
    levels = build_pyramid(torch.randn(3, 16, 5), 4)
    writer = Writer(tmp_path)
    writer.submit_batch(["x/a.pt", "b.pt", "x/y/c.pt"], levels)
    writer.close()
    assert writer.written == 3
    assert scan_outputs(tmp_path) == ({"x/a.pt", "b.pt", "x/y/c.pt"}, [])
    loaded = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(loaded) == ["4x4", "2x2", "1x1"]
    assert torch.equal(loaded["4x4"][0], levels["4x4"][1])


def test_writer_reports_the_first_error_with_the_path(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    writer = Writer(tmp_path)
    writer.submit_batch(["blocker/a.pt"], build_pyramid(torch.randn(1, 4, 2), 2))
    with pytest.raises(OSError, match="blocker"):
        writer.close()
    assert writer.written == 0


def test_record_failure_appends_json_lines(tmp_path):
    record_failure(tmp_path, "a/b.png", "OSError: truncated")
    record_failure(tmp_path, "c d.jpg", "ValueError: empty file")
    lines = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert lines == [{"path": "a/b.png", "error": "OSError: truncated"},
                     {"path": "c d.jpg", "error": "ValueError: empty file"}]


class LateValues:
    """Stands in for a CUDA event: the batch's values arrive only when the writer waits on it."""

    def __init__(self, levels, values):
        self.levels, self.values, self.waited = levels, values, 0

    def synchronize(self):
        self.waited += 1
        for key, value in self.values.items():
            self.levels[key].copy_(value)


def test_several_writer_threads_write_every_file_once_with_its_own_values(tmp_path):
    writer = Writer(tmp_path, max_pending=2, threads=3)
    batches = [build_pyramid(torch.randn(4, 16, 5), 4) for _ in range(7)]
    for number, levels in enumerate(batches):
        writer.submit_batch([f"{number}/{i}.pt" for i in range(4)], levels)
    writer.close()
    assert writer.written == 28
    assert len(scan_outputs(tmp_path)[0]) == 28
    for number, levels in enumerate(batches):
        for i in range(4):
            loaded = torch.load(tmp_path / f"{number}/{i}.pt", weights_only=True)
            for key, value in levels.items():
                assert torch.equal(loaded[key], value[i:i + 1]), (number, i, key)
                assert loaded[key].untyped_storage().nbytes() == loaded[key].numel() * 4


def test_writer_waits_for_ready_before_reading_and_releases_after(tmp_path):
    # The values arrive when the writer waits on `ready`, as a side-stream copy completes its event:
    # a writer that read first would save zeros.
    values = build_pyramid(torch.randn(3, 16, 5), 4)
    levels = {key: torch.zeros_like(value) for key, value in values.items()}
    ready = LateValues(levels, values)
    released = []
    writer = Writer(tmp_path, threads=2)
    writer.submit_batch(["a.pt", "b.pt", "c.pt"], levels, ready=ready, release=lambda: released.append(True))
    writer.close()
    assert ready.waited == 1 and released == [True]
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["4x4"], values["4x4"][2:3])


def test_after_an_error_every_batch_is_released_and_nothing_hangs(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    released, submitted = [], []
    writer = Writer(tmp_path, max_pending=1, threads=2)
    with pytest.raises(OSError, match="blocker"):
        for number in range(50):  # the error surfaces in submit_batch once a thread has hit it
            writer.submit_batch(["blocker/a.pt" if number == 0 else f"ok{number}.pt"],
                                build_pyramid(torch.randn(1, 4, 2), 2),
                                release=lambda number=number: released.append(number))
            submitted.append(number)
    with pytest.raises(OSError, match="blocker"):
        writer.close()
    assert sorted(released) == submitted and len(submitted) < 50
    assert not (tmp_path / "blocker.pt").exists() and scan_outputs(tmp_path)[1] == []


class DyingWriter(Writer):
    """A writer whose threads end on their first batch, as a thread hit by an error that is not an Exception."""

    def write_batch(self, slot, relative_outputs, levels):
        raise SystemExit  # ends a thread without a word; `except Exception` does not catch it


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the threads die on purpose
def test_a_writer_whose_threads_died_raises_instead_of_waiting_for_ever(tmp_path):
    writer = DyingWriter(tmp_path, max_pending=1, threads=2)
    started = time.monotonic()
    with pytest.raises(WriterGone, match="thread"):
        for number in range(10):  # two batches end the two threads, one fills the queue, the next waits
            writer.submit_batch([f"{number}.pt"], build_pyramid(torch.randn(1, 4, 2), 2))
    assert time.monotonic() - started < 10
    with pytest.raises(WriterGone, match="ended unexpectedly"):
        writer.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the threads die on purpose
def test_close_says_so_when_one_of_the_threads_died(tmp_path):
    died = threading.Event()

    class OneDies(Writer):
        def write_batch(self, slot, relative_outputs, levels):
            if not died.is_set():
                died.set()
                raise SystemExit
            super().write_batch(slot, relative_outputs, levels)

    writer = OneDies(tmp_path, threads=2)
    for number in range(4):
        writer.submit_batch([f"{number}.pt"], build_pyramid(torch.randn(1, 4, 2), 2))
    with pytest.raises(WriterGone, match="1 of the writer's 2 thread"):
        writer.close()
    assert writer.written == 3


def test_a_wait_for_a_host_buffer_ends_when_its_holder_is_gone():
    from pyramid.encoder import HostCopies

    copies = HostCopies("cpu", batch_size=2)

    def writer_gone():
        raise WriterGone("the writer's 4 thread(s) ended unexpectedly")

    copies.holder_alive = writer_gone
    started = time.monotonic()
    with pytest.raises(WriterGone):
        copies._next_free()  # no buffer is ever released
    assert time.monotonic() - started < 10


def test_host_copies_off_cuda_hand_the_levels_through():
    from pyramid.encoder import HostCopies

    levels = build_pyramid(torch.randn(2, 16, 3), 4)
    host, ready, release = HostCopies("cpu", batch_size=2).start(levels)
    assert ready is None and release is None
    assert all(host[key] is value for key, value in levels.items())


def test_images_flagged_non_finite_get_no_file_and_are_reported(tmp_path):
    # The flags arrive with the values (a CUDA copy) and their memory is reused once released: the writer
    # must read them after `ready` and before `release`.
    values = build_pyramid(torch.randn(4, 16, 5), 4)
    levels = {key: torch.zeros_like(value) for key, value in values.items()}
    finite = torch.zeros(4, 2, dtype=torch.bool)
    arriving = {**values, "finite": torch.tensor([[True, True], [False, True], [True, False], [True, True]])}
    ready = LateValues({**levels, "finite": finite}, arriving)
    reported = []
    writer = Writer(tmp_path, threads=2)
    writer.submit_batch(["a.pt", "b.pt", "c.pt", "d.pt"], levels, ready=ready, release=lambda: finite.fill_(True),
                        finite=finite, on_non_finite=lambda position, flags: reported.append((position, flags)))
    writer.submit_batch(["e.pt"], build_pyramid(torch.randn(1, 16, 5), 4), finite=torch.ones(1, 1, dtype=torch.bool),
                        on_non_finite=lambda *_: reported.append("e"))
    writer.close()
    assert reported == [(1, [False, True]), (2, [True, False])]
    assert scan_outputs(tmp_path) == ({"a.pt", "d.pt", "e.pt"}, [])
    assert writer.written == 3 and writer.non_finite == 2
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["4x4"], values["4x4"][3:4])


def test_a_failure_record_that_cannot_be_written_is_a_write_error(tmp_path):
    def unwritable(position, flags):
        raise OSError(28, "No space left on device")

    writer = Writer(tmp_path)
    writer.submit_batch(["a.pt", "b.pt"], build_pyramid(torch.randn(2, 4, 2), 2),
                        finite=torch.tensor([[False], [True]]), on_non_finite=unwritable)
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert writer.written == 0 and writer.non_finite == 0


def torch_save_bytes(pyramid):
    buffer = io.BytesIO()
    torch.save(pyramid, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("flip", [False, True])
def test_files_are_torch_saves_bytes_without_torch_save(tmp_path, monkeypatch, flip):
    with torch.inference_mode():  # as the encoder makes them
        levels = build_pyramid(torch.randn(6 if flip else 3, 256, 768), 16)  # base size: 1 MB files
    if flip:
        levels = split_twins(levels)
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (saves.append(1), real_save(*args, **kwargs)))
    writer = Writer(tmp_path, threads=2)
    writer.submit_batch(["a.pt", "b.pt", "c.pt"], levels)
    writer.close()
    assert all(layout is not None for layout in writer.layouts.values())
    assert len(saves) <= 2  # the layout (zeros) and the check of its first file; no torch.save per file
    for name, pyramid in zip(["a.pt", "b.pt", "c.pt"], split_pyramids(levels)):
        assert (tmp_path / name).read_bytes() == torch_save_bytes(pyramid), name
        assert is_complete_archive(tmp_path / name)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert list(loaded) == list(levels) and all(
        value.is_contiguous() and value.untyped_storage().nbytes() == value.numel() * 4 for value in loaded.values())
    # Zip tools read them as torch.save's: every record's CRC32 checked.
    checked = subprocess.run([sys.executable, "-m", "zipfile", "-t", str(tmp_path / "b.pt")],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and "Done testing" in checked.stdout, checked.stdout + checked.stderr
    if shutil.which("unzip"):
        checked = subprocess.run(["unzip", "-t", str(tmp_path / "b.pt")], capture_output=True, text=True)
        assert checked.returncode == 0 and "No errors detected" in checked.stdout, checked.stdout


def test_a_torch_save_laid_out_otherwise_is_used_as_it_is(tmp_path, monkeypatch):
    # torch.save without CRC32s (a setting of recent torch, per thread) makes archives ArchiveLayout does not
    # reproduce: its first-file check sees that, and torch.save writes every file.
    from torch.utils.serialization import config

    real_save = torch.save

    def save_without_crc32(*args, **kwargs):
        before, config.save.compute_crc32 = config.save.compute_crc32, False
        try:
            return real_save(*args, **kwargs)
        finally:
            config.save.compute_crc32 = before

    monkeypatch.setattr(torch, "save", save_without_crc32)
    levels = build_pyramid(torch.randn(2, 16, 8), 4)
    writer = Writer(tmp_path)
    writer.submit_batch(["a.pt", "b.pt"], levels)
    writer.close()
    assert list(writer.layouts.values()) == [None]
    assert (tmp_path / "b.pt").read_bytes() == torch_save_bytes(split_pyramids(levels)[1])


def test_torch_save_serialiser_writes_the_same_bytes(tmp_path):
    levels = build_pyramid(torch.randn(2, 64, 8), 8)
    for serialise in ("layout", "torch.save"):
        writer = Writer(tmp_path / serialise, serialise=serialise)
        writer.submit_batch(["a.pt", "b.pt"], levels)
        writer.close()
    assert (tmp_path / "layout" / "b.pt").read_bytes() == (tmp_path / "torch.save" / "b.pt").read_bytes()
    with pytest.raises(ValueError, match="serialise"):
        Writer(tmp_path, serialise="pickle")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_size_files_are_torch_saves_bytes_by_either_serialiser(tmp_path, dtype):
    levels = {key: value.to(dtype) for key, value in build_pyramid(torch.randn(3, 256, 64), 16).items()}
    writers = {}
    for serialise in ("layout", "torch.save"):
        writers[serialise] = Writer(tmp_path / serialise, threads=2, serialise=serialise)
        writers[serialise].submit_batch(["a.pt", "b.pt", "c.pt"], levels)
        writers[serialise].close()
    assert [layout is not None for layout in writers["layout"].layouts.values()] == [True]
    for name, pyramid in zip(["a.pt", "b.pt", "c.pt"], split_pyramids(levels)):
        for serialise in writers:
            assert (tmp_path / serialise / name).read_bytes() == torch_save_bytes(pyramid), (serialise, name)
    loaded = torch.load(tmp_path / "layout" / "c.pt", weights_only=True)
    for key, value in loaded.items():
        assert value.dtype == dtype and value.is_contiguous() and torch.equal(value[0], levels[key][2])
        assert value.untyped_storage().nbytes() == value.numel() * 2  # its own storage, 2 bytes a value


def test_write_atomic_finishes_files_the_kernel_takes_in_parts(tmp_path, monkeypatch):
    real_writev = os.writev
    calls = []
    monkeypatch.setattr(os, "writev", lambda fd, buffers: (calls.append(1), real_writev(
        fd, [bytes(b"".join(bytes(piece) for piece in buffers)[:1000])]))[1])
    pieces = [b"head", memoryview(bytes(range(256)) * 20), b"", bytearray(b"tail")]
    write_atomic(pieces, tmp_path / "a.pt")
    assert (tmp_path / "a.pt").read_bytes() == b"".join(bytes(piece) for piece in pieces)
    assert len(calls) == 6 and sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_a_file_that_cannot_be_written_for_a_reason_of_its_own_is_its_images_failure(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    hostile_names.folder(root / "in_the_way.pt")
    hostile_names.link(root / "linked", outside)
    (root / "stats.pt").write_bytes(b"the statistics")
    outputs = ["a.pt", "x" * 300 + ".pt", "in_the_way.pt", "linked/b.pt", "linked/deeper/c.pt", "stats.pt",
               "pack/d.pt", ".e.pt.tmp.f.pt", os.fsdecode(b"odd\xff.pt"), hostile_names.long_name(250, ".pt"),
               "../escape.pt"]
    reported = []
    writer = Writer(root, threads=2)
    writer.submit_batch(outputs, build_pyramid(torch.randn(len(outputs), 4, 2), 2),
                        on_unwritable=lambda relative, why: reported.append((relative, why)))
    writer.close()
    why = dict(reported)
    assert sorted(why) == sorted(outputs[1:8] + outputs[10:])
    assert "File name too long" in why[outputs[1]] and "Is a directory" in why["in_the_way.pt"]
    assert "symbolic link" in why["linked/b.pt"] and "symbolic link" in why["linked/deeper/c.pt"]
    assert "statistics" in why["stats.pt"] and "pack/" in why["pack/d.pt"] and "temporary" in why[".e.pt.tmp.f.pt"]
    assert writer.written == 3 and writer.unwritable == 8 and not (tmp_path / "escape.pt").exists()
    assert scan_outputs(root) == ({"a.pt", outputs[8], outputs[9]}, [])
    assert list(outside.iterdir()) == [] and (root / "stats.pt").read_bytes() == b"the statistics"
    assert not (root / "pack").exists() and (root / "in_the_way.pt").is_dir()


def test_a_write_error_of_the_disk_still_stops_the_run(tmp_path, monkeypatch):
    def disk_full(fd, views):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", disk_full)
    reported = []
    writer = Writer(tmp_path)
    writer.submit_batch(["a.pt", "b.pt"], build_pyramid(torch.randn(2, 4, 2), 2),
                        on_unwritable=lambda *args: reported.append(args))
    with pytest.raises(OSError, match="No space left on device"):
        writer.close()
    assert reported == [] and writer.written == 0 and os.listdir(tmp_path) == []


def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    hostile_names.link(temporary_name(tmp_path / "out" / "a.pt", writer_tag()), outside)
    write_atomic([b"pyramid"], tmp_path / "out" / "a.pt")
    assert outside.read_bytes() == b"keep me" and (tmp_path / "out" / "a.pt").read_bytes() == b"pyramid"
    assert os.listdir(tmp_path / "out") == ["a.pt"]
