"""pyramid/reader.py: read_pyramid gives torch.load's values, for every layout, or torch.load's error."""

import os

import numpy as np
import pytest
import torch

from pyramid.exits import DamagedFile
from pyramid.reader import OutMismatch, read_pyramid
from pyramid.synthetic import LEVELS, make_pyramid
from pyramid.writer import save_atomic


def assert_same_as_torch_load(path, levels=None):
    got, keys = read_pyramid(path, levels)
    expected = torch.load(path, weights_only=True)
    assert keys == list(expected)
    assert list(got) == (list(expected) if levels is None else [level for level in levels if level in expected])
    for key, tensor in got.items():
        assert tensor.dtype == expected[key].dtype and tensor.shape == expected[key].shape
        assert torch.equal(tensor, expected[key])
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_files_of_every_layout_read_like_torch_load(tmp_path):
    save_atomic(make_pyramid(0), tmp_path / "writer.pt")  # the extractor's way: through a buffer
    # torch.save to a path names the archive after the file: same size, the records elsewhere.
    torch.save(make_pyramid(1), tmp_path / "ab.pt")
    torch.save(make_pyramid(2), tmp_path / "cd.pt")
    torch.save(make_pyramid(3), tmp_path / "a_much_longer_name.pt")
    torch.save({"16x16": make_pyramid(4)["16x16"].double(), "x": torch.arange(5)}, tmp_path / "other.pt")
    for _ in range(2):  # the second time from the remembered layouts
        for path in sorted(tmp_path.iterdir()):
            assert_same_as_torch_load(path)
            assert_same_as_torch_load(path, ["1x1", "8x8", "nope"])


def test_a_view_into_a_larger_storage_is_read_by_torch_load(tmp_path):
    pyramid = make_pyramid(0)
    pyramid["16x16"] = torch.randn(2, 256, 8)[1:]
    torch.save(pyramid, tmp_path / "view.pt")
    got, _ = read_pyramid(tmp_path / "view.pt")
    assert torch.equal(got["16x16"], pyramid["16x16"])


def test_broken_files_raise_torch_loads_error_naming_the_file(tmp_path):
    save_atomic(make_pyramid(0), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    read_pyramid(tmp_path / "a.pt")  # remember the layout of this size
    (tmp_path / "a.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(Exception) as from_torch:
        torch.load(tmp_path / "a.pt", weights_only=True)
    with pytest.raises(DamagedFile) as from_reader:
        read_pyramid(tmp_path / "a.pt")
    first_line = str(from_torch.value).splitlines()[0]
    assert str(from_reader.value) == f"{tmp_path / 'a.pt'}: cannot be read ({from_torch.type.__name__}: {first_line})"
    # Same size, the local header of a level's record renamed: the remembered layout no longer fits,
    # so the file is parsed afresh (torch.load reads it too: it goes by the central directory).
    damaged = bytearray(data)
    at = data.index(b"data/0")
    damaged[at:at + 6] = b"data/9"
    (tmp_path / "a.pt").write_bytes(bytes(damaged))
    assert_same_as_torch_load(tmp_path / "a.pt")


def test_reads_into_given_rows(tmp_path):
    save_atomic(make_pyramid(5), tmp_path / "a.pt")
    batch = torch.zeros(3, 64, 8)
    got, _ = read_pyramid(tmp_path / "a.pt", ["8x8"], out={"8x8": batch[1]})
    assert got["8x8"].data_ptr() == batch[1].data_ptr()
    assert torch.equal(batch[1], make_pyramid(5)["8x8"][0]) and not batch[0].any() and not batch[2].any()
    with pytest.raises(OutMismatch):
        read_pyramid(tmp_path / "a.pt", ["8x8"], out={"8x8": torch.zeros(63, 8)})
    assert LEVELS[1] == "8x8"


def test_adjacent_records_are_one_read_and_numpy_rows_are_read_into(tmp_path, monkeypatch):
    for index in range(3):
        save_atomic(make_pyramid(index), tmp_path / f"{index}.pt")
    read_pyramid(tmp_path / "0.pt")  # the layout, parsed once
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *args: calls.append(args[2]) or preadv(*args))
    monkeypatch.setattr(os, "pread", lambda *args: pytest.fail("a read outside the plan"))
    rows = {level: np.zeros((3, *make_pyramid(0)[level].shape[1:]), np.float32) for level in LEVELS}  # (3, s*s, D)
    for index in range(3):
        got, _ = read_pyramid(tmp_path / f"{index}.pt", LEVELS, out={level: rows[level][index] for level in LEVELS})
        assert all(got[level] is not None for level in LEVELS)
    assert calls == [0, 0, 0]  # every level of a file, its head and headers: one preadv from its first byte
    for level in LEVELS:
        assert np.array_equal(rows[level], torch.cat([make_pyramid(index)[level] for index in range(3)]).numpy())
    calls.clear()
    got, _ = read_pyramid(tmp_path / "1.pt", ["1x1"])  # the head, then the far-away record
    assert len(calls) == 2 and torch.equal(got["1x1"], make_pyramid(1)["1x1"])
    with pytest.raises(OutMismatch):
        read_pyramid(tmp_path / "1.pt", ["1x1"], out={"1x1": np.zeros((1, 8), np.float64)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_size_files_are_parsed_by_their_bytes_into_tensors_and_numpy_rows(tmp_path, monkeypatch, dtype):
    from pyramid.reader import from_numpy, numpy_dtype

    pyramid = {key: value.to(dtype) for key, value in make_pyramid(4).items()}
    save_atomic(pyramid, tmp_path / "a.pt")
    assert_same_as_torch_load(tmp_path / "a.pt")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("read by torch.load: the parser did not take this file")

    monkeypatch.setattr(torch, "load", no_torch_load)
    got, _ = read_pyramid(tmp_path / "a.pt", ["1x1", "4x4"])
    assert all(got[key].dtype == dtype and torch.equal(got[key], pyramid[key]) for key in got)
    rows = {key: np.empty(pyramid[key].shape[1:], numpy_dtype(dtype)) for key in ("8x8", "2x2")}  # the loader's
    read_pyramid(tmp_path / "a.pt", list(rows), out=rows)
    for key, row in rows.items():
        assert row.dtype == (np.uint16 if dtype == torch.bfloat16 else np.float16)  # bf16 as its raw bits
        assert torch.equal(from_numpy(row, dtype), pyramid[key][0])


def test_a_layout_of_another_dtype_read_before_does_not_decide_a_file_of_the_same_size(tmp_path):
    """An fp16 and a bf16 file of the same shapes have the same size: the fp16 file's remembered layout,
    which the bf16 tree's manifest does not accept, must not make the bf16 file read as damaged."""
    from pyramid.reader import expected_from

    fp16 = {key: value.to(torch.float16) for key, value in make_pyramid(5).items()}
    bf16 = {key: value.to(torch.bfloat16) for key, value in make_pyramid(6).items()}
    save_atomic(fp16, tmp_path / "half.pt")
    save_atomic(bf16, tmp_path / "brain.pt")
    assert (tmp_path / "half.pt").stat().st_size == (tmp_path / "brain.pt").stat().st_size
    manifest = {"levels": LEVELS, "hidden_size": fp16["1x1"].shape[-1], "flip": False}
    read_pyramid(tmp_path / "half.pt", expect=expected_from({**manifest, "store_dtype": "fp16"}))
    got, _ = read_pyramid(tmp_path / "brain.pt", expect=expected_from({**manifest, "store_dtype": "bf16"}))
    assert all(got[key].dtype == torch.bfloat16 and torch.equal(got[key], bf16[key]) for key in bf16)
    with pytest.raises(DamagedFile, match="half.pt"):  # and the file of the other dtype is still named
        read_pyramid(tmp_path / "half.pt", expect=expected_from({**manifest, "store_dtype": "bf16"}))
