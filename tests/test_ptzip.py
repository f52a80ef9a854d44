"""pyramid/ptzip.py: the zip layout torch.save writes, read as zipfile reads it, made as torch.save makes it."""

import io
import struct
import zipfile

import hostile_files as hostile
import hostile_names
import pytest
import torch

from pyramid.ptzip import (
    END_OF_DIRECTORY,
    LOCAL_CRC,
    ZIP64_END,
    ZIP64_LOCATOR,
    ArchiveLayout,
    NotPlain,
    PastTheEnd,
    is_complete_archive,
    local_header,
    read_directory,
)
from pyramid.writer import save_atomic


def pyramid_file(path, hidden=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"16x16": torch.randn(1, 256, hidden), "1x1": torch.randn(1, 1, hidden)}, path)
    return path.read_bytes()


def torch_save_bytes(content):
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("keep", [None, 0, 10, 0.5, -1])
def test_a_file_cut_short_is_not_complete(tmp_path, keep):
    data = pyramid_file(tmp_path / "a.pt")
    if keep is not None:
        (tmp_path / "a.pt").write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    assert is_complete_archive(tmp_path / "a.pt") == (keep is None)


def test_a_file_whose_last_blocks_are_zeros_is_not_complete(tmp_path):
    data = pyramid_file(tmp_path / "a.pt")
    (tmp_path / "a.pt").write_bytes(data[:-4096] + bytes(4096))  # size kept, data lost: a crash on ext4
    assert not is_complete_archive(tmp_path / "a.pt")
    assert not is_complete_archive(tmp_path / "missing.pt")


def test_the_zip64_footer_decides_and_one_pointing_past_the_end_is_no_archive(tmp_path):
    data = pyramid_file(tmp_path / "a.pt")
    zip64_at = len(data) - END_OF_DIRECTORY.size - ZIP64_LOCATOR.size - ZIP64_END.size
    assert data[zip64_at:zip64_at + 4] == ZIP64_END.signature  # torch.save writes one into every file
    *_, directory_size, directory_offset = ZIP64_END.unpack_from(data, zip64_at)
    assert directory_offset + directory_size == zip64_at
    moved = bytearray(data)
    struct.pack_into("<Q", moved, zip64_at + 48, directory_offset - 1)  # the end record still says otherwise
    (tmp_path / "moved.pt").write_bytes(bytes(moved))
    assert not is_complete_archive(tmp_path / "moved.pt")
    # The locator pointing at a zip64 end record that would run past the file's end: False, not an error.
    past = bytearray(data)
    struct.pack_into("<Q", past, len(data) - END_OF_DIRECTORY.size - ZIP64_LOCATOR.size + 8, len(data) - 18)
    past[-18:-14] = ZIP64_END.signature  # over the end record's disk numbers, which nothing reads
    (tmp_path / "past.pt").write_bytes(bytes(past))
    assert not is_complete_archive(tmp_path / "past.pt")
    # A zip without zip64 records, as zip tools write small ones: its end record alone decides.
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as archive:
        archive.writestr("a", b"x" * 5000)
    plain = (tmp_path / "plain.zip").read_bytes()
    assert ZIP64_LOCATOR.signature not in plain and is_complete_archive(tmp_path / "plain.zip")
    (tmp_path / "plain.zip").write_bytes(plain[:100] + plain[101:])
    assert not is_complete_archive(tmp_path / "plain.zip")


def test_an_entry_that_is_no_regular_file_is_no_complete_archive_and_never_waited_on(tmp_path):
    pyramid_file(tmp_path / "real.pt")
    fifo = hostile_names.fifo(tmp_path / "fifo.pt")  # opened to read without O_NONBLOCK, it would wait for ever
    link = hostile_names.link(tmp_path / "to_real.pt", tmp_path / "real.pt")
    folder = hostile_names.folder(tmp_path / "folder.pt")
    assert hostile_names.finishes_within(10, lambda: [is_complete_archive(path) for path in (fifo, link, folder)]) \
        == [False, False, False]


def test_the_directory_is_zipfiles_with_its_crcs_zeroed(tmp_path):
    data = pyramid_file(tmp_path / "a.pt")
    records, (offset, directory, crcs) = read_directory(data[-4096:], len(data))
    with zipfile.ZipFile(tmp_path / "a.pt") as archive:
        infos = archive.infolist()
        assert records == {info.filename: (info.header_offset, info.file_size) for info in infos}
        assert offset == archive.start_dir and offset + len(directory) == len(data)
        assert len(crcs) == len(infos)
        for crc, info in zip(crcs, infos):
            assert data[offset + crc.start:offset + crc.stop] == struct.pack("<L", info.CRC)
            assert directory[crc] == bytes(4)
        unzeroed = bytearray(directory)
        for crc in crcs:
            unzeroed[crc] = data[offset + crc.start:offset + crc.stop]
        assert bytes(unzeroed) == data[offset:]
        with open(tmp_path / "a.pt", "rb") as file:
            for info in infos:
                for head in (data[:4096], b""):  # from the bytes at hand, or read from the file
                    header = local_header(file.fileno(), head, info.header_offset)
                    start = info.header_offset + len(header)
                    assert data[start:start + info.file_size] == archive.read(info)
                    expected = bytearray(data[info.header_offset:start])
                    expected[LOCAL_CRC] = bytes(4)
                    assert header == bytes(expected)


def test_a_record_claiming_bytes_past_the_end_or_another_zip_is_said_so(tmp_path):
    path = tmp_path / "a.pt"
    pyramid_file(path)
    hostile.claim_record_size(path, "data.pkl", 1 << 30)
    data = path.read_bytes()
    with pytest.raises(PastTheEnd, match=r"record 'archive/data.pkl' claims 1073741824 bytes at 0, past its "
                                         rf"records' end at \d+ \(a file of {len(data)} bytes\)"):
        read_directory(data[-4096:], len(data))
    with zipfile.ZipFile(tmp_path / "deflated.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"x" * 1000)
    data = (tmp_path / "deflated.zip").read_bytes()
    with pytest.raises(NotPlain, match="compressed"):
        read_directory(data, len(data))
    with pytest.raises(NotPlain, match="no end of zip directory"):
        read_directory(data[:-10], len(data) - 10)
    with pytest.raises(NotPlain, match="bad local zip header"):
        local_header(-1, b"PK\x01\x02" + bytes(40), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_archive_layout_makes_torch_saves_bytes(dtype):
    shapes = {"16x16": (1, 256, 8), "4x4": (1, 16, 8), "flip/16x16": (1, 256, 8)}
    layout = ArchiveLayout(shapes, {key: dtype for key in shapes})
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        pyramid = {key: torch.randn(shape, generator=generator).to(dtype) for key, shape in shapes.items()}
        rows = [memoryview(value.view(torch.uint8).numpy()).cast("B") for value in pyramid.values()]
        made = b"".join(bytes(piece) for piece in layout.pieces(rows))
        assert made == torch_save_bytes(pyramid) and len(made) == layout.size


def test_archive_layout_refuses_an_archive_laid_out_otherwise(monkeypatch):
    real_save = torch.save

    def save_compressed(content, target):  # what a torch that compressed its records would write
        buffer = io.BytesIO()
        real_save(content, buffer)
        with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as stored, \
                zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as compressed:
            for info in stored.infolist():
                compressed.writestr(info.filename, stored.read(info))

    monkeypatch.setattr(torch, "save", save_compressed)
    with pytest.raises(NotPlain, match="compressed"):
        ArchiveLayout({"1x1": (1, 1, 8)})
    monkeypatch.setattr(torch, "save", lambda content, target: (real_save(content, target), target.write(b"x")))
    with pytest.raises(NotPlain, match="zip end record"):  # bytes after the end record
        ArchiveLayout({"1x1": (1, 1, 8)})
