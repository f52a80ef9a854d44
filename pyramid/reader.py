"""Read the levels of one pyramid file fast: its own bytes, parsed directly, no torch.load.

A file the extractor writes is torch.save's zip archive, stored uncompressed: a small pickle
(`data.pkl`) that names, per key, a storage record and its shape, then one record per storage.
torch.load spends most of its time on machinery around those few hundred bytes (about a tenth of the
rate a plain read() of the files gives). Here the zip directory and the pickle are parsed with the
standard library, once per layout (the files of one run share it), and each level asked for is read
by one preadv() of its record's header and data straight into its own tensor: no copy, no mapping,
only the bytes of the levels asked for; the head of the file and each record's header are compared
with the layout's on every read, so a file laid out otherwise is parsed afresh, never misread. Anything this parser does not recognise
(another layout, another torch, a compressed archive, a broken file) goes to torch.load, which then
either reads it or raises its own error, so the values are always torch.load's.
"""

import io
import os
import pickle
import struct
from collections import OrderedDict

import torch

# How much of each end of a file the first two reads take: the pickle of a 10-level pyramid and the zip
# directory of its ~15 records are each well under 2 KiB; larger ones are read again, exactly.
EDGE_BYTES = 4096
# Storage types whose tensors numpy can hold (a bfloat16 file goes to torch.load).
DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
          "LongStorage": torch.int64, "IntStorage": torch.int32}
END_OF_DIRECTORY = b"PK\x05\x06"
DIRECTORY_ENTRY = b"PK\x01\x02"
LOCAL_HEADER = b"PK\x03\x04"
CRC_FIELD = slice(14, 18)  # of a local header: differs from file to file, so never compared


class NotPlain(Exception):
    """The file is not the plain layout this reader parses; torch.load reads it instead."""


class OutMismatch(Exception):
    """A tensor given to read into does not fit the level (dtype or size): the caller's mistake."""


class _TensorRecord:
    """What data.pkl says about one tensor: which storage, its dtype, offset, shape and stride."""

    __slots__ = ("key", "dtype", "numel", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride, *_):
        self.key, self.dtype, self.numel = storage
        self.offset, self.shape, self.stride = offset, tuple(shape), tuple(stride)


class _Unpickler(pickle.Unpickler):
    """data.pkl with every tensor replaced by its _TensorRecord; anything but a dict of tensors is refused."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRecord
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        raise NotPlain(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid  # ("storage", torch.float32, "0", "cpu", numel)
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise NotPlain(str(pid))
        return key, dtype, numel


def _directory(head, tail, size):
    """{name: (offset of the record's local header, stored size)} from the end-of-directory record."""
    at = tail.rfind(END_OF_DIRECTORY)
    if at < 0 or len(tail) - at < 22:
        raise NotPlain("no end of zip directory in the last bytes")
    entries, directory_size, directory_offset = struct.unpack_from("<HII", tail, at + 10)
    tail_start = size - len(tail)
    if directory_offset < tail_start:
        raise NotPlain("zip directory larger than the bytes read")
    records, position = {}, directory_offset - tail_start
    for _ in range(entries):
        if tail[position:position + 4] != DIRECTORY_ENTRY:
            raise NotPlain("bad zip directory entry")
        method, = struct.unpack_from("<H", tail, position + 10)
        stored, _, name_length, extra_length, comment_length = struct.unpack_from("<IIHHH", tail, position + 20)
        local_offset, = struct.unpack_from("<I", tail, position + 42)
        if method != 0 or stored == 0xFFFFFFFF or local_offset == 0xFFFFFFFF:
            raise NotPlain("compressed or zip64 record")
        name = bytes(tail[position + 46:position + 46 + name_length]).decode("utf-8")
        records[name] = (local_offset, stored)
        position += 46 + name_length + extra_length + comment_length
    return records


def _local_header(file, head, local_offset):
    """The local header of a zip record (signature to extra field) with its CRC zeroed: the bytes that
    say where the record's data starts and which record it is, the same in every file of one layout."""
    fixed = head[local_offset:local_offset + 30] if local_offset + 30 <= len(head) else os.pread(
        file, 30, local_offset)
    if fixed[:4] != LOCAL_HEADER:
        raise NotPlain("bad local zip header")
    name_length, extra_length = struct.unpack_from("<HH", fixed, 26)
    length = 30 + name_length + extra_length
    header = bytearray(head[local_offset:local_offset + length] if local_offset + length <= len(head)
                       else os.pread(file, length, local_offset))
    header[CRC_FIELD] = bytes(4)
    return bytes(header)


class Layout:
    """Where a file keeps what: its first bytes up to the end of data.pkl (the pickle, hence the keys,
    dtypes and shapes), and per storage record its local header and position. Files written the same
    way share one layout; every read checks the bytes it relies on (see _read_with)."""

    def __init__(self, head, keys, tensors, byteorder):
        self.head = head  # bytes [0, end of data.pkl)
        self.keys = keys  # the file's keys, in order
        self.tensors = tensors  # {key: (local header offset, local header, dtype, shape)}
        self.byteorder = byteorder  # (local header offset, local header) of the byteorder record, or None


def _parse_layout(file, size):
    head = os.pread(file, min(size, EDGE_BYTES), 0)
    tail = head if size <= EDGE_BYTES else os.pread(file, EDGE_BYTES, size - EDGE_BYTES)
    records = _directory(head, tail, size)
    prefix = next((name[:-len("data.pkl")] for name in records if name.endswith("/data.pkl")), None)
    if prefix is None or prefix.count("/") != 1:
        raise NotPlain("no data.pkl")
    byteorder = None
    if (record := records.get(prefix + "byteorder")) is not None:
        byteorder = (record[0], _local_header(file, head, record[0]))
    pickle_offset, pickle_size = records[prefix + "data.pkl"]
    start = pickle_offset + len(_local_header(file, head, pickle_offset))
    if start + pickle_size > len(head):
        head = os.pread(file, start + pickle_size, 0)
    head = head[:start + pickle_size]
    content = _Unpickler(io.BytesIO(head[start:])).load()
    if not isinstance(content, dict) or not all(isinstance(v, _TensorRecord) for v in content.values()):
        raise NotPlain("not a dict of tensors")
    tensors = {}
    for key, record in content.items():
        if record.offset != 0 or record.stride != _contiguous_stride(record.shape) \
                or record.numel != _numel(record.shape):
            raise NotPlain("a view into a larger storage")
        local_offset, stored = records[f"{prefix}data/{record.key}"]
        if stored != record.numel * record.dtype.itemsize:
            raise NotPlain("storage size differs from the tensor's")
        tensors[key] = (local_offset, _local_header(file, head, local_offset), record.dtype, record.shape)
    return Layout(head, list(content), tensors, byteorder)


def _target(out, level, dtype, shape):
    """The tensor a level is read into: out[level] when given (checked to fit), else a new one."""
    if out is None or level not in out:
        return torch.empty(shape, dtype=dtype)
    target = out[level]
    if target.dtype != dtype or target.numel() != _numel(shape) or not target.is_contiguous():
        raise OutMismatch(f"out[{level!r}] is {target.dtype} {list(target.shape)}, the file holds {dtype} {list(shape)}")
    return target


def _read_with(layout, file, levels, out):
    """The levels of the file by `layout`, or NotPlain where the file's bytes say it is laid out otherwise.

    One pread checks the head (data.pkl unchanged: same keys, dtypes, shapes); each level is one
    preadv of its record's local header and its data straight into a new tensor, and the header read
    must be the expected one (signature, name, lengths): so the data read is that record's.
    """
    if os.pread(file, len(layout.head), 0) != layout.head:
        raise NotPlain("another layout")
    if layout.byteorder is not None:
        offset, expected = layout.byteorder
        header, order = bytearray(len(expected)), bytearray(6)
        os.preadv(file, [header, order], offset)
        header[CRC_FIELD] = bytes(4)
        if header != expected or order != b"little":
            raise NotPlain("another layout, or a big-endian file")
    pyramid = {}
    for level in (layout.keys if levels is None else levels):
        spec = layout.tensors.get(level)
        if spec is None:
            continue  # the caller reports missing levels with the keys the file has
        offset, expected, dtype, shape = spec
        tensor = _target(out, level, dtype, shape)
        data = memoryview(tensor.numpy()).cast("B")
        header = bytearray(len(expected))
        if os.preadv(file, [header, data], offset) != len(header) + len(data):
            raise NotPlain("file shorter than its directory says")
        header[CRC_FIELD] = bytes(4)
        if header != expected:
            raise NotPlain("another layout")
        pyramid[level] = tensor
    return pyramid, layout.keys


# The layouts seen, by file size: a tree written by one extractor run has one or two.
_layouts = {}
MAX_LAYOUTS = 64


def _read_plain(file, levels, out):
    size = os.fstat(file).st_size
    layout = _layouts.get(size)
    if layout is not None:
        try:
            return _read_with(layout, file, levels, out)
        except NotPlain:
            pass
    layout = _parse_layout(file, size)
    if len(_layouts) >= MAX_LAYOUTS:
        _layouts.clear()
    _layouts[size] = layout
    return _read_with(layout, file, levels, out)


def _contiguous_stride(shape):
    stride, step = [], 1
    for side in reversed(shape):
        stride.append(step)
        step *= side
    return tuple(reversed(stride))


def _numel(shape):
    count = 1
    for side in shape:
        count *= side
    return count


def read_pyramid(path, levels=None, out=None):
    """(levels, keys): {key: tensor} for `levels` (None: every key) of the file at `path`, each tensor
    owning its storage, equal to torch.load(path, weights_only=True)[key]; and the file's keys in order.

    `out`: {key: contiguous tensor of the level's dtype and size} to read into instead (rows of a batch),
    returned in place of new tensors, in their own shape. Levels the file lacks are
    left out; the caller names them. A file this reader cannot parse is read by torch.load, so a broken
    file raises torch.load's error.
    """
    file = os.open(path, os.O_RDONLY)
    try:
        try:
            return _read_plain(file, levels, out)
        except (NotPlain, KeyError, ValueError, EOFError, pickle.UnpicklingError, struct.error,
                TypeError, AttributeError):
            pass
    finally:
        os.close(file)
    content = torch.load(path, weights_only=True, map_location="cpu")
    keys = list(content)
    wanted = keys if levels is None else [level for level in levels if level in content]
    pyramid = {level: content[level] for level in wanted}
    for level in wanted:
        if out is not None and level in out:
            _target(out, level, pyramid[level].dtype, pyramid[level].shape).copy_(pyramid[level].reshape(out[level].shape))
            pyramid[level] = out[level]
    return pyramid, keys
