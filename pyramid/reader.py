"""Read the levels of one pyramid file fast: its own bytes, parsed directly, no torch.load.

A file the extractor writes is torch.save's zip archive, stored uncompressed: a small pickle
(`data.pkl`) that names, per key, a storage record and its shape, then one record per storage.
torch.load spends most of its time on machinery around those few hundred bytes (about a tenth of the
rate a plain read() of the files gives). Here the zip directory and the pickle are parsed with the
standard library and each level asked for is read by one pread() straight into its own tensor: no
copy, no mapping, only the bytes of the levels asked for. Anything this parser does not recognise
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


class NotPlain(Exception):
    """The file is not the plain layout this reader parses; torch.load reads it instead."""


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


def _data_offset(file, head, local_offset):
    """Where a record's bytes start: after its local header, whose name and extra field lengths vary."""
    header = head[local_offset:local_offset + 30] if local_offset + 30 <= len(head) else os.pread(
        file, 30, local_offset)
    if header[:4] != LOCAL_HEADER:
        raise NotPlain("bad local zip header")
    name_length, extra_length = struct.unpack_from("<HH", header, 26)
    return local_offset + 30 + name_length + extra_length


def _read_plain(file, levels):
    size = os.fstat(file).st_size
    head = os.pread(file, min(size, EDGE_BYTES), 0)
    tail = head if size <= EDGE_BYTES else os.pread(file, EDGE_BYTES, size - EDGE_BYTES)
    records = _directory(head, tail, size)
    prefix = next((name[:-len("data.pkl")] for name in records if name.endswith("/data.pkl")), None)
    if prefix is None or prefix.count("/") != 1:
        raise NotPlain("no data.pkl")
    if (byteorder := records.get(prefix + "byteorder")) is not None:
        start = _data_offset(file, head, byteorder[0])
        if os.pread(file, byteorder[1], start) != b"little":
            raise NotPlain("big-endian file")
    pickle_offset, pickle_size = records[prefix + "data.pkl"]
    start = _data_offset(file, head, pickle_offset)
    pickled = head[start:start + pickle_size] if start + pickle_size <= len(head) else os.pread(
        file, pickle_size, start)
    content = _Unpickler(io.BytesIO(pickled)).load()
    if not isinstance(content, dict) or not all(isinstance(v, _TensorRecord) for v in content.values()):
        raise NotPlain("not a dict of tensors")
    wanted = list(content) if levels is None else levels
    pyramid = {}
    for level in wanted:
        record = content.get(level)
        if record is None:
            continue  # the caller reports missing levels with the keys the file has
        if record.offset != 0 or record.stride != _contiguous_stride(record.shape) \
                or record.numel != _numel(record.shape):
            raise NotPlain("a view into a larger storage")
        local_offset, stored = records[f"{prefix}data/{record.key}"]
        tensor = torch.empty(record.shape, dtype=record.dtype)
        buffer = memoryview(tensor.numpy()).cast("B")
        if stored != len(buffer):
            raise NotPlain("storage size differs from the tensor's")
        if os.preadv(file, [buffer], _data_offset(file, head, local_offset)) != len(buffer):
            raise NotPlain("file shorter than its directory says")
        pyramid[level] = tensor
    return pyramid, list(content)


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


def read_pyramid(path, levels=None):
    """(levels, keys): {key: tensor} for `levels` (None: every key) of the file at `path`, each tensor
    owning its storage, equal to torch.load(path, weights_only=True)[key]; and the file's keys in order.

    Levels the file lacks are left out; the caller names them. A file this reader cannot parse is read
    by torch.load, so a broken file raises torch.load's error.
    """
    file = os.open(path, os.O_RDONLY)
    try:
        try:
            return _read_plain(file, levels)
        except (NotPlain, KeyError, ValueError, EOFError, pickle.UnpicklingError, struct.error,
                UnicodeDecodeError, TypeError, AttributeError):
            pass
    finally:
        os.close(file)
    content = torch.load(path, weights_only=True, map_location="cpu")
    keys = list(content)
    wanted = keys if levels is None else [level for level in levels if level in content]
    return {level: content[level] for level in wanted}, keys
