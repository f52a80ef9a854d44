"""The zip layout torch.save writes (a .pt file): one set of its records' formats, read and made here.

torch.save writes an uncompressed zip: per record (`<name>/data.pkl`, `<name>/byteorder`, one
`<name>/data/<n>` per storage, `<name>/version`, ..., last `<name>/.data/serialization_id`) a local header
(its extra field pads the data to 64 bytes), the data, a data descriptor (CRC32 and sizes); then the central
directory, one entry per record, a zip64 end record and its locator, and the end-of-central-directory record
(whose 32-bit fields say the same while the file is under 4 GiB). Three parts of the project read or make
these bytes, each with the formats below:

- `is_complete_archive`: whether a file's footer says it is whole (a rerun redoes the files a crash cut short);
- `read_directory` and `local_header`: the records of a file and where their data lies, every size and offset
  the bytes claim bounded by the file's own (the training reader's parse, pyramid/reader.py);
- `ArchiveLayout`: torch.save's bytes made once per shape and filled in per file (pyramid/writer.py).

Bytes laid out otherwise (compressed or zip64 records, another torch) raise NotPlain: the reader then leaves
the file to torch.load, the writer to torch.save. A record that claims bytes past the end raises PastTheEnd.
"""

import io
import math
import os
import stat
import struct
import zlib


class RecordFormat(struct.Struct):
    """The fixed part of a zip record: its struct format, and its signature (its first four bytes)."""

    def __init__(self, signature, layout):
        super().__init__(layout)
        self.signature = signature


# signature, version, flags, method, time, date, CRC32, sizes, name and extra field lengths
LOCAL_HEADER = RecordFormat(b"PK\x03\x04", "<4s5H3L2H")
DATA_DESCRIPTOR = RecordFormat(b"PK\x07\x08", "<4s3L")  # signature, CRC32, sizes
# signature, versions, flags, method, time, date, CRC32, sizes, name/extra/comment lengths, disk, attributes,
# the offset of the record's local header
DIRECTORY_ENTRY = RecordFormat(b"PK\x01\x02", "<4s6H3L5H2L")
# signature, its size, versions, disks, entries here and in all, directory size and offset
ZIP64_END = RecordFormat(b"PK\x06\x06", "<4sQ2H2L4Q")
ZIP64_LOCATOR = RecordFormat(b"PK\x06\x07", "<4sLQL")  # signature, disk, offset of the zip64 end record, disks
# signature, disks, entries here and in all, directory size and offset, comment length
END_OF_DIRECTORY = RecordFormat(b"PK\x05\x06", "<4s4H2LH")
# The CRC32 fields: each file's own, so never compared between files of one layout. (A local header's is zero
# where a data descriptor follows the data, as in torch.save's files; a zip tool's files have it there.)
LOCAL_CRC = slice(14, 18)
DIRECTORY_CRC = 16  # its offset in a directory entry
HAS_DESCRIPTOR = 0x08  # flag bit 3: the CRC32 and sizes follow the data, in a data descriptor
IN_ZIP64 = 0xFFFFFFFF  # a 32-bit size or offset that says "see the zip64 extra field"
# How much of a file's end is_complete_archive reads: its end records, and in a small file its directory's start.
TAIL_BYTES = 4096


class NotPlain(Exception):
    """The bytes are not laid out as torch.save lays out its zip: the reader leaves the file to torch.load,
    the writer leaves its files to torch.save."""


class PastTheEnd(Exception):
    """A record or the directory claims bytes past the end of the file's records: a damaged file."""


def end_of_directory(data, at):
    """(entries, directory size, directory offset, comment length) of the end-of-central-directory record at
    `at` in `data` (a file's last bytes); None where no whole one is there."""
    if at < 0 or len(data) - at < END_OF_DIRECTORY.size or data[at:at + 4] != END_OF_DIRECTORY.signature:
        return None
    _, _, _, _, entries, directory_size, directory_offset, comment_length = END_OF_DIRECTORY.unpack_from(data, at)
    return entries, directory_size, directory_offset, comment_length


def is_complete_archive(path):
    """True when the regular file at `path` ends with a consistent zip footer, as every file torch.save wrote does.

    A file that a crash cut short (size 0, or data missing at its end) or whose last blocks never
    reached the disk (zeros) fails: the end record must sit in the last bytes, and the central
    directory it points to must end exactly where the end records begin, so the footer itself says
    how long the file must be. Reads at most TAIL_BYTES, never the whole file; never raises.
    """
    try:
        # Not blocking, not through a link: a FIFO swapped in since the scan is no archive, not a wait.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW), "rb") as file:
            status = os.fstat(file.fileno())
            size = status.st_size
            if not stat.S_ISREG(status.st_mode) or size < END_OF_DIRECTORY.size:
                return False
            start = max(0, size - TAIL_BYTES)
            file.seek(start)
            tail = file.read()
    except OSError:
        return False
    end_at = len(tail) - END_OF_DIRECTORY.size
    end = end_of_directory(tail, end_at)
    if end is None or end[3] != 0:
        return False
    entries, directory_size, directory_offset, _ = end
    records_start = start + end_at
    locator_at = end_at - ZIP64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at:locator_at + 4] == ZIP64_LOCATOR.signature:
        zip64_at = ZIP64_LOCATOR.unpack_from(tail, locator_at)[2] - start
        if not 0 <= zip64_at <= locator_at - ZIP64_END.size or tail[zip64_at:zip64_at + 4] != ZIP64_END.signature:
            return False
        fields = ZIP64_END.unpack_from(tail, zip64_at)
        entries, directory_size, directory_offset = fields[7], fields[8], fields[9]
        records_start = start + zip64_at
    if entries == 0 or directory_offset + directory_size != records_start:
        return False
    at = directory_offset - start
    return directory_offset < start or tail[at:at + 4] == DIRECTORY_ENTRY.signature


def directory_entries(data, position, count, records_end, file_size):
    """[(name, flags, CRC32, size, local header offset, position of the entry in `data`)] of the `count`
    central directory entries in `data` from `position`, in order. Each must be a stored (uncompressed) record
    of 32-bit sizes (else NotPlain) whose header and data lie before `records_end` (else PastTheEnd, naming the
    record and `file_size`)."""
    entries = []
    for _ in range(count):
        fields = DIRECTORY_ENTRY.unpack_from(data, position)
        signature, flags, method, crc, stored, size = fields[0], fields[3], fields[4], fields[7], fields[8], fields[9]
        name_length, extra_length, comment_length, header_at = fields[10], fields[11], fields[12], fields[16]
        if signature != DIRECTORY_ENTRY.signature:
            raise NotPlain("bad zip directory entry")
        if method != 0 or stored != size or IN_ZIP64 in (size, header_at):
            raise NotPlain("compressed or zip64 record")
        name = bytes(data[position + DIRECTORY_ENTRY.size:position + DIRECTORY_ENTRY.size + name_length]).decode()
        if header_at + LOCAL_HEADER.size + size > records_end:
            raise PastTheEnd(f"record {name!r} claims {size} bytes at {header_at}, past its records' end at "
                             f"{records_end} (a file of {file_size} bytes)")
        entries.append((name, flags, crc, size, header_at, position))
        position += DIRECTORY_ENTRY.size + name_length + extra_length + comment_length
    return entries


def read_directory(tail, size):
    """The zip directory of a file of `size` bytes from its last bytes `tail`: ({name: (local header offset,
    size)}, (the directory's offset, its bytes to the end of the file with the CRC32 fields zeroed, the slices
    of those fields in them)). NotPlain where the directory is not whole in `tail` or not torch.save's;
    PastTheEnd where it or a record claims bytes past the end."""
    at = tail.rfind(END_OF_DIRECTORY.signature)  # the last one, as zip readers look for it
    end = end_of_directory(tail, at)
    if end is None:
        raise NotPlain("no end of zip directory in the last bytes")
    entries, directory_size, directory_offset, _ = end
    tail_start = size - len(tail)
    if directory_offset + directory_size > tail_start + at:
        raise PastTheEnd(f"its zip directory claims {directory_size} bytes at {directory_offset}, past its end "
                         f"at {tail_start + at}")
    if directory_offset < tail_start:
        raise NotPlain("zip directory larger than the bytes read")
    start = directory_offset - tail_start
    records, crcs = {}, []
    for name, _, _, stored, header_at, position in directory_entries(tail, start, entries, directory_offset, size):
        records[name] = (header_at, stored)
        crcs.append(slice(position - start + DIRECTORY_CRC, position - start + DIRECTORY_CRC + 4))
    directory = bytearray(tail[start:])
    for crc in crcs:
        directory[crc] = bytes(4)
    return records, (directory_offset, bytes(directory), tuple(crcs))


def local_header_length(fixed):
    """The length of a local header, signature to extra field, from its first LOCAL_HEADER.size bytes `fixed`:
    where the record's data starts. NotPlain where they are not a local header."""
    if fixed[:4] != LOCAL_HEADER.signature:
        raise NotPlain("bad local zip header")  # the reader leaves it to torch.load, which names what is wrong
    *_, name_length, extra_length = LOCAL_HEADER.unpack_from(fixed)
    return LOCAL_HEADER.size + name_length + extra_length


def local_header(file, head, offset):
    """The local header at `offset` of the open file `file` (signature to extra field) with its CRC32 zeroed: the
    bytes that say where the record's data starts and which record it is, the same in every file of one layout.
    Taken from `head` (the file's first bytes) where it lies within them, else read."""
    end = offset + LOCAL_HEADER.size
    length = local_header_length(head[offset:end] if end <= len(head) else os.pread(file, LOCAL_HEADER.size, offset))
    header = bytearray(head[offset:offset + length] if offset + length <= len(head)
                       else os.pread(file, length, offset))
    header[LOCAL_CRC] = bytes(4)
    return bytes(header)


# ----------------------------------------------------------------------------- torch.save's bytes, made

MASK64 = (1 << 64) - 1
ID_DIGITS = 20  # the serialization id: 20 digits of the record names' hash, then 20 of the folded CRC32s


def _hash_combine(seed, value):
    """c10::hash_combine on 64-bit size_t: how torch.save folds each record's CRC32 into the serialization id."""
    return seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & MASK64)


def _template_records(data):
    """[(name, data start, data size, CRC32, (offsets of its CRC32 fields))] of torch.save's archive `data`, in
    order; a layout other than torch.save's (compressed, zip64 offsets, a comment) raises NotPlain."""
    end = end_of_directory(data, len(data) - END_OF_DIRECTORY.size)
    if end is None or end[3] != 0 or end[2] == IN_ZIP64:
        raise NotPlain("zip end record")
    entries, _, directory_at, _ = end
    records = []
    for name, flags, crc, size, header_at, position in directory_entries(data, directory_at, entries, directory_at,
                                                                         len(data)):
        start = header_at + local_header_length(data[header_at:header_at + LOCAL_HEADER.size])
        if flags & HAS_DESCRIPTOR:
            if data[start + size:start + size + 4] != DATA_DESCRIPTOR.signature:
                raise NotPlain("data descriptor")
            local_crc_at = start + size + 4
        else:
            local_crc_at = header_at + LOCAL_CRC.start
        records.append((name, start, size, crc, (local_crc_at, position + DIRECTORY_CRC)))
    return records


class ArchiveLayout:
    """torch.save's bytes for a pyramid of given level shapes, with the level data and the CRC32s left
    to fill in per file: the same file, byte for byte, without torch.save.

    torch.save holds the GIL for the whole file (the pickle, the zip records, the CRC32 of every byte):
    about 0.3 ms of each 1 MB pyramid, for which writer threads and the run loop then queue. But the
    archives of pyramids of one shape differ only in the level bytes, their CRC32s (in each record's
    data descriptor and central directory entry) and the serialization id (which folds the CRC32s of
    every record). So torch.save makes the archive once, of zeros, and each file is its fixed pieces
    around the level bytes, patched: zlib.crc32 (which releases the GIL on buffers over 5 KiB) reads
    the levels where they lie, and one os.writev writes them. Files load with torch.load and pass zip
    tools as torch.save's do, being the same bytes; the writer checks that on the first file of each
    layout (writer.checked_layout) and uses torch.save for a layout that differs (NotPlain here, or other bytes).
    """

    def __init__(self, shapes, dtypes=None):
        """`shapes`: {key: the shape of one image's level, (1, S*S, D)}, in the file's key order; `dtypes`:
        {key: its torch dtype} (float32 where not given): any dtype, the values' bytes are laid in as they are."""
        import torch  # here, not at the top: the resume check (paths) imports this module before torch loads

        dtypes = {key: (dtypes or {}).get(key, torch.float32) for key in shapes}
        template = io.BytesIO()
        torch.save({key: torch.zeros(shape, dtype=dtypes[key]) for key, shape in shapes.items()}, template)
        data = template.getvalue()
        records = _template_records(data)
        names = [name for name, *_ in records]
        self.level_records = []  # per key, the index of its storage record
        for number, (key, shape) in enumerate(shapes.items()):
            found = [index for index, name in enumerate(names) if name.endswith(f"/data/{number}")]
            if len(found) != 1 or records[found[0]][2] != dtypes[key].itemsize * math.prod(shape):
                raise NotPlain(f"storage record of {key}")
            self.level_records.append(found[0])
        found = [index for index, name in enumerate(names) if name.endswith("/.data/serialization_id")]
        if len(found) != 1 or found[0] != len(records) - 1 or records[found[0]][2] != 2 * ID_DIGITS:
            raise NotPlain("serialization id record")
        self.id_record = found[0]
        id_start = records[self.id_record][1]
        self.id_prefix = data[id_start:id_start + ID_DIGITS]
        self.crcs = [crc for *_, crc, _ in records]
        if self._folded(self.crcs) != data[id_start + ID_DIGITS:id_start + 2 * ID_DIGITS]:
            raise NotPlain("serialization id")
        # The fixed pieces between the level data, and where in them each CRC32 and the id digits go.
        cuts = sorted((records[index][1], records[index][1] + records[index][2]) for index in self.level_records)
        bounds = [0] + [edge for cut in cuts for edge in cut] + [len(data)]
        self.gaps = [data[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
        self.order = sorted(range(len(shapes)), key=lambda number: records[self.level_records[number]][1])
        self.patches = [[] for _ in self.gaps]  # per gap: [(offset in it, record index or None for the id)]
        for index, (*_, crc_at) in enumerate(records):
            if index in self.level_records or index == self.id_record:
                for offset in crc_at:
                    self._add_patch(bounds, offset, index)
        self._add_patch(bounds, id_start + ID_DIGITS, None)
        self.size = len(data)

    def _add_patch(self, bounds, offset, what):
        gap = next(i for i in range(len(self.gaps)) if bounds[2 * i] <= offset < bounds[2 * i + 1])
        self.patches[gap].append((offset - bounds[2 * gap], what))

    def _folded(self, crcs):
        """The id's last 20 digits: the CRC32s of every record before the id, folded in archive order."""
        combined = 0
        for crc in crcs[:self.id_record]:
            combined = _hash_combine(combined, crc)
        return b"%020d" % combined

    def pieces(self, rows):
        """The file of one image as a list of buffers: `rows` holds, per key in the file's order, the
        bytes of its level (any contiguous buffer: a row of the batch, read in place)."""
        crcs = list(self.crcs)
        for index, row in zip(self.level_records, rows):
            crcs[index] = zlib.crc32(row)
        digits = self._folded(crcs)
        crcs[self.id_record] = zlib.crc32(self.id_prefix + digits)
        pieces = []
        for number, (gap, patches) in enumerate(zip(self.gaps, self.patches)):
            if patches:
                gap = bytearray(gap)
                for offset, what in patches:
                    if what is None:
                        gap[offset:offset + ID_DIGITS] = digits
                    else:
                        struct.pack_into("<L", gap, offset, crcs[what])
            pieces.append(gap)
            if number < len(self.order):
                pieces.append(rows[self.order[number]])
        return pieces
