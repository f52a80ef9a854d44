"""Read the levels of pyramid files fast: each by its own bytes, parsed directly (no torch.load).

A file the extractor writes is torch.save's zip archive, stored uncompressed: a small pickle
(`data.pkl`) that names, per key, a storage record and its shape, then one record per storage.
torch.load spends most of its time on machinery around those few hundred bytes (about a tenth of the
rate a plain read() of the files gives). Here the zip directory (pyramid/ptzip.py) and the pickle are parsed
with the standard library, once per layout (the files of one run share it). The levels asked for are then read
straight into their tensors, records that lie next to each other by one preadv() (every level of a
file is one call; the few bytes between records go to a scratch buffer): no copy, no mapping, hardly
a byte beyond the levels asked for. The head of the file, each record's header and the zip directory at its
end are read with the data and compared with the layout's on every read (and the file's size with the size
of the file it was parsed from), so a layout serves a file only where every byte the parse relied on is the
same: a file laid out otherwise, or damaged, is parsed afresh, and gives the same result whichever file was
read before it. Anything this parser does not recognise (another layout, another torch, a compressed
archive) goes to torch.load, which then either reads it or raises its error, so the values are always
torch.load's.

Nothing in a file is trusted before it is checked: every size and offset it claims must lie inside the
file (a 1 GiB pickle record in a 100 kB file is refused before anything is allocated), shapes must be sizes
(not negative) and a level's shape [1, s*s, D]; with `expect` (what the manifest says every file holds:
Expected) the keys, dtypes and shapes must be those and the file no larger than they make it. Only a regular
file is opened (a FIFO would block). Every error raised names the file: exits.DamagedFile.
"""

import io
import math
import os
import pickle
import stat
import struct
from collections import OrderedDict

import numpy as np
import torch

from pyramid.exits import DamagedFile
from pyramid.ptzip import LOCAL_CRC, NotPlain, PastTheEnd, local_header, read_directory
from pyramid.tree import level_name_side
from pyramid.validate import OPEN_FLAGS, expected_tensors, most_file_bytes, not_regular

# How much of each end of a file the first two reads take: the pickle of a 10-level pyramid and the zip
# directory of its ~15 records are each well under 2 KiB; larger ones are read again, exactly.
EDGE_BYTES = 4096
# The storage types this parser reads, by the names data.pkl gives them.
DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
          "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32}
# numpy dtype objects, not types: comparing an array's dtype with one is a pointer check, with a type a lookup.
# numpy has no bfloat16: a bfloat16 level is held in numpy as its raw 16 bits, uint16 (the loader's buffers, the
# pack's arrays); `as_numpy` and `from_numpy` go between the two without a copy.
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
                 torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.uint16),
                 torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32)}
# --store_dtype's names (tree.STORE_DTYPES, manifest.json's "store_dtype") as torch dtypes.
STORED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def numpy_dtype(dtype):
    """The numpy dtype that holds a torch dtype's values in numpy: itself, or uint16 (raw bits) for bfloat16."""
    return _NUMPY_DTYPES[dtype]


def as_numpy(tensor):
    """A numpy array over a contiguous CPU tensor's memory (no copy); a bfloat16 tensor's as uint16 raw bits."""
    return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def from_numpy(array, dtype):
    """The tensor of `dtype` over a numpy array's memory (no copy): the inverse of `as_numpy`."""
    tensor = torch.from_numpy(array)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor
# Records less than this apart are read by one preadv, the bytes between them into a scratch buffer:
# the gaps between the records of a pyramid are a few dozen bytes (a data descriptor, the next header).
MERGE_GAP = 4096


class OutMismatch(Exception):
    """A tensor given to read into does not fit the level (dtype or size): the caller's mistake."""


class _Damage(Exception):
    """The file holds what no pyramid holds (negative shapes, other keys or shapes than the manifest's, more
    bytes than they take): read_pyramid raises DamagedFile naming it, as for ptzip.PastTheEnd, without asking
    torch.load."""


class Expected:
    """What every file of a tree holds, from its manifest, computed once: `tensors` {key: (torch dtype, shape
    (1, s*s, D))}, and `most_bytes`, the largest such a file can be."""

    def __init__(self, manifest):
        tensors = expected_tensors(manifest)
        self.tensors = {key: (STORED_DTYPES[dtype], shape) for key, (dtype, shape) in tensors.items()}
        self.most_bytes = most_file_bytes(tensors)


def expected_from(manifest):
    """Expected of a manifest (tree.read_manifest's, checked), or None for a tree without one."""
    return None if manifest is None else Expected(manifest)


def _check_tensors(tensors, expect):
    """Raise _Damage unless `tensors` {key: (dtype, shape)} are sizes, each level [1, s*s, D], and with
    `expect` exactly its keys, dtypes and shapes."""
    for key, (_, shape) in tensors.items():
        if not all(type(size) is int and size >= 0 for size in shape):
            raise _Damage(f"{key!r} has shape {list(shape)}: not sizes")
        side = level_name_side(key)
        if side is not None and (len(shape) != 3 or shape[0] != 1 or shape[1] != side * side or shape[2] < 1):
            raise _Damage(f"{key} has shape {list(shape)}; a level holds [1, {side * side}, D]")
    if expect is None:
        return
    if tensors.keys() != expect.tensors.keys():
        raise _Damage(f"holds keys {list(tensors)}; manifest.json says {list(expect.tensors)}")
    for key, (dtype, shape) in tensors.items():
        if (dtype, tuple(shape)) != expect.tensors[key]:
            wanted_dtype, wanted_shape = expect.tensors[key]
            raise _Damage(f"{key} is {dtype} {list(shape)}; manifest.json says {wanted_dtype} {list(wanted_shape)}")


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


class Layout:
    """Where a file keeps what: its first bytes up to the end of data.pkl (the pickle, hence the keys,
    dtypes and shapes), per storage record its local header and position, and its zip directory to the end
    of the file. Files written the same way share one layout; every read checks the bytes it relies on (see
    _read_with)."""

    def __init__(self, head, keys, tensors, byteorder, size, directory):
        self.head = head  # bytes [0, end of data.pkl)
        self.keys = keys  # the file's keys, in order
        self.tensors = tensors  # {key: (local header offset, local header or None where damaged, dtype, shape)}
        self.byteorder = byteorder  # (local header offset, local header) of the byteorder record, or None
        self.size = size  # of the file it was parsed from: another size is another layout
        self.directory = directory  # (offset, bytes to the end of the file, CRC fields zeroed, their slices)
        self.accepted = ()  # the Expected this layout's keys, dtypes and shapes were found to match
        self._plans = {}

    def accept(self, expect):
        """Raise _Damage unless the layout's tensors are what `expect` says (checked once per Expected)."""
        if expect is None or expect in self.accepted:  # by identity: Expected has no __eq__
            return
        _check_tensors({key: (dtype, shape) for key, (_, _, dtype, shape) in self.tensors.items()}, expect)
        self.accepted = (*self.accepted[-3:], expect)

    def plan(self, levels):
        """The reads that fetch `levels` (a tuple of keys this file has), in file order: one per run of
        records less than MERGE_GAP apart, each a _Read."""
        plan = self._plans.get(levels)
        if plan is not None:
            return plan
        spans = [(0, self.head, ())]  # (offset, expected bytes or a level, CRC fields within them)
        if self.byteorder is not None:
            offset, header = self.byteorder
            spans.append((offset, header + b"little", (LOCAL_CRC,)))
        for level in dict.fromkeys(levels):
            offset, header, dtype, shape = self.tensors[level]
            if header is None:
                raise NotPlain(f"the local zip header of {level} is damaged")
            spans += [(offset, header, (LOCAL_CRC,)), (offset + len(header), level, math.prod(shape) * dtype.itemsize)]
        spans.append(self.directory)
        runs = []
        for span in sorted(spans, key=lambda span: span[0]):
            if not runs or span[0] - runs[-1][-1][0] - _span_length(runs[-1][-1]) > MERGE_GAP:
                runs.append([])
            runs[-1].append(span)
        self._plans[levels] = plan = [_Read(run) for run in runs]
        return plan


def _span_length(span):
    return len(span[1]) if isinstance(span[1], bytes) else span[2]


class _Read:
    """One preadv of a plan: from `offset`, `length` bytes into `pieces`, each a level's key (its data,
    straight into its tensor) or a slice of a scratch buffer; what lands in the scratch must equal
    `expected` but for the bytes never compared (`zeroed`: CRC fields, the gaps between records). The
    comparison is one of integers: the scratch's bytes as one, masked (`mask`, zero over those bytes), so a
    directory of a dozen CRC fields costs no more to check than a header of one."""

    def __init__(self, spans):
        self.offset = spans[0][0]
        self.pieces, self.zeroed, expected = [], [], bytearray()
        position = self.offset
        for offset, content, extra in spans:
            if offset > position:  # a gap: read, never compared
                self.pieces.append((len(expected), len(expected) + offset - position))
                self.zeroed.append(slice(len(expected), len(expected) + offset - position))
                expected += bytes(offset - position)
            if isinstance(content, bytes):
                self.pieces.append((len(expected), len(expected) + len(content)))
                self.zeroed += [slice(len(expected) + field.start, len(expected) + field.stop) for field in extra]
                expected += content
                position = offset + len(content)
            else:
                self.pieces.append(content)
                position = offset + extra
        mask = bytearray(b"\xff" * len(expected))
        for zeroed in self.zeroed:
            expected[zeroed] = mask[zeroed] = bytes(zeroed.stop - zeroed.start)
        self.expected = int.from_bytes(expected, "little")
        self.mask = int.from_bytes(mask, "little")
        self.scratch_length = len(expected)
        self.pieces = [slice(*piece) if isinstance(piece, tuple) else piece for piece in self.pieces]
        self.length = position - self.offset


def _parse_layout(file, size):
    head = os.pread(file, min(size, EDGE_BYTES), 0)
    tail = head if size <= EDGE_BYTES else os.pread(file, EDGE_BYTES, size - EDGE_BYTES)
    records, directory = read_directory(tail, size)  # directory: (offset, bytes, CRC fields), a span of each plan
    directory_offset = directory[0]
    prefix = next((name[:-len("data.pkl")] for name in records if name.endswith("/data.pkl")), None)
    if prefix is None or prefix.count("/") != 1:
        raise NotPlain("no data.pkl")
    byteorder = None
    if (record := records.get(prefix + "byteorder")) is not None:
        byteorder = (record[0], local_header(file, head, record[0]))
    pickle_offset, pickle_size = records[prefix + "data.pkl"]
    start = pickle_offset + len(local_header(file, head, pickle_offset))
    if start + pickle_size > directory_offset:  # checked before a byte of it is read: it sizes the read
        raise PastTheEnd(f"data.pkl claims {pickle_size} bytes at {start}, past its records' end at {directory_offset}")
    if start + pickle_size > len(head):
        head = os.pread(file, start + pickle_size, 0)
    head = head[:start + pickle_size]
    content = _Unpickler(io.BytesIO(head[start:])).load()
    if not isinstance(content, dict) or not all(isinstance(v, _TensorRecord) for v in content.values()):
        raise NotPlain("not a dict of tensors")
    _check_tensors({key: (record.dtype, record.shape) for key, record in content.items()}, None)
    tensors = {}
    for key, record in content.items():
        if record.offset != 0 or record.stride != _contiguous_stride(record.shape) \
                or record.numel != math.prod(record.shape):
            raise NotPlain("a view into a larger storage")
        local_offset, stored = records[f"{prefix}data/{record.key}"]
        if stored != record.numel * record.dtype.itemsize:
            raise NotPlain("storage size differs from the tensor's")
        try:
            header = local_header(file, head, local_offset)
        except NotPlain:  # a damaged header: only a read of this level goes to torch.load
            header = None
        if header is not None and local_offset + len(header) + stored > directory_offset:
            raise PastTheEnd(f"{key} claims {stored} bytes at {local_offset + len(header)}, past its records' end "
                             f"at {directory_offset}")
        tensors[key] = (local_offset, header, record.dtype, record.shape)
    return Layout(head, list(content), tensors, byteorder, size, directory)


def _target(out, level, dtype, shape):
    """The tensor a level is read into: out[level] when given (checked to fit), else a new one. out[level]
    may also be a numpy array (rows of the loader's buffers), read into as it is."""
    if out is None or level not in out:
        return torch.empty(shape, dtype=dtype)
    target = out[level]
    if isinstance(target, np.ndarray):
        flags = target.flags
        fits = target.dtype == _NUMPY_DTYPES.get(dtype) and flags.c_contiguous and flags.writeable
    else:
        fits = target.dtype == dtype and target.is_contiguous() and target.device.type == "cpu"
    if not fits or (target.size if isinstance(target, np.ndarray) else target.numel()) != math.prod(shape):
        raise OutMismatch(f"out[{level!r}] is {target.dtype} {list(target.shape)}, the file holds {dtype} "
                          f"{list(shape)}")
    return target


def _bytes_of(target):
    """A writable buffer over a contiguous tensor or numpy array."""
    return target if isinstance(target, np.ndarray) else as_numpy(target)


def _read_with(layout, file, size, levels, out):
    """The levels of the file by `layout`, or NotPlain where the file's bytes say it is laid out otherwise.

    Each read of the layout's plan is one preadv: the head (data.pkl unchanged: same keys, dtypes,
    shapes), the byteorder record and each level's local header into a scratch buffer, compared with
    the layout's (CRC fields aside) once read, so the data read is that record's; the data straight into
    its tensor.
    """
    if size != layout.size:
        raise NotPlain("another size")
    wanted = layout.keys if levels is None else [level for level in levels if level in layout.tensors]
    pyramid = {}
    for level in wanted:
        _, _, dtype, shape = layout.tensors[level]
        pyramid[level] = _target(out, level, dtype, shape)
    for read in layout.plan(tuple(wanted)):
        scratch = bytearray(read.scratch_length)
        view = memoryview(scratch)
        buffers = [view[piece] if type(piece) is slice else _bytes_of(pyramid[piece]) for piece in read.pieces]
        if os.preadv(file, buffers, read.offset) != read.length:
            raise NotPlain("file shorter than its directory says")
        if int.from_bytes(scratch, "little") & read.mask != read.expected:
            raise NotPlain("another layout")
    return pyramid, layout.keys


# The layouts seen, by file size: a tree written by one extractor run has one or two.
_layouts = {}
MAX_LAYOUTS = 64


_last = [None]  # the layout of the last file read: the next one most likely has it too


def _read_plain(file, size, levels, out, expect):
    # Every byte the parse relied on (the head, the headers of the records read, the directory, the size) is
    # checked by the read itself, so a layout remembered from another file serves this one only where this
    # file's parse would give the same layout: one damaged file fails the same way whatever was read before.
    last = _last[0]
    if last is not None and last.size == size and _meets(last, expect):
        try:
            return _read_with(last, file, size, levels, out)
        except NotPlain:
            pass
    layout = _layouts.get(size)
    if layout is not None and layout is not last and _meets(layout, expect):
        try:
            pyramid = _read_with(layout, file, size, levels, out)
            _last[0] = layout
            return pyramid
        except NotPlain:
            pass
    layout = _parse_layout(file, size)
    layout.accept(expect)
    if len(_layouts) >= MAX_LAYOUTS:
        _layouts.clear()
    _layouts[size] = layout
    pyramid = _read_with(layout, file, size, levels, out)
    _last[0] = layout
    return pyramid


def _meets(layout, expect):
    """True when a layout remembered from another file has what `expect` says; one that has not (a tree of
    another stored dtype read before, with files of the same size) says nothing about this file, whose own
    parse then decides."""
    try:
        layout.accept(expect)
        return True
    except _Damage:
        return False


def _contiguous_stride(shape):
    stride, step = [], 1
    for side in reversed(shape):
        stride.append(step)
        step *= side
    return tuple(reversed(stride))


def _first_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def read_pyramid(path, levels=None, out=None, expect=None):
    """(levels, keys): {key: tensor} for `levels` (None: every key) of the file at `path`, each tensor
    owning its storage, equal to torch.load(path, weights_only=True)[key]; and the file's keys in order.

    `out`: {key: contiguous tensor (or numpy array) of the level's dtype and size} to read into instead
    (rows of a batch), returned in place of new tensors, in their own shape. Levels the file lacks are
    left out; the caller names them. `expect`: an Expected (expected_from(manifest)), which the file's keys,
    dtypes, shapes and size must match. A file that is not a regular file, claims sizes it cannot hold, holds
    negative or odd shapes or other than `expect`, or that torch.load cannot read either, raises DamagedFile
    naming it and what is wrong; OutMismatch where `out` does not fit; OSError (naming it) where it cannot be
    opened.
    """
    file = os.open(path, OPEN_FLAGS)  # without blocking: a FIFO's open would wait for a writer (OSError names path)
    try:
        status = os.fstat(file)
        if not stat.S_ISREG(status.st_mode):
            raise not_regular(path, status.st_mode)
        size = status.st_size
        if expect is not None and size > expect.most_bytes:
            raise _Damage(f"is {size} bytes; the levels manifest.json names take at most {expect.most_bytes}")
        try:
            return _read_plain(file, size, levels, out, expect)
        except (NotPlain, KeyError, ValueError, EOFError, pickle.UnpicklingError, struct.error,
                TypeError, AttributeError, RecursionError):
            pass
    except (_Damage, PastTheEnd) as damage:
        raise DamagedFile(path, str(damage)) from None
    except OutMismatch as error:
        raise OutMismatch(f"{path}: {error}") from None
    except OSError as error:
        raise DamagedFile(path, f"cannot be read ({error.strerror or error})") from None
    except DamagedFile:
        raise
    except Exception as error:  # noqa: BLE001 - a pickle that fails otherwise: said, never read on
        raise DamagedFile(path, f"cannot be read ({_first_line(error)})") from None
    finally:
        os.close(file)
    try:  # checked a regular file just now, of a size the manifest allows
        content = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch.load's errors on a torn file: zip, pickle, runtime, OS
        raise DamagedFile(path, f"cannot be read ({_first_line(error)})") from None
    if not isinstance(content, dict) or not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise DamagedFile(path, f"is not a pyramid: it holds a {type(content).__name__}, not a dict of tensors")
    try:
        _check_tensors({key: (value.dtype, tuple(value.shape)) for key, value in content.items()}, expect)
    except _Damage as damage:
        raise DamagedFile(path, str(damage)) from None
    keys = list(content)
    wanted = keys if levels is None else [level for level in levels if level in content]
    pyramid = {level: content[level] for level in wanted}
    for level in wanted:
        if out is not None and level in out:
            try:
                target = _target(out, level, pyramid[level].dtype, pyramid[level].shape)
            except OutMismatch as error:
                raise OutMismatch(f"{path}: {error}") from None
            if isinstance(target, np.ndarray):
                target[...] = as_numpy(pyramid[level]).reshape(target.shape)
            else:
                target.copy_(pyramid[level].reshape(target.shape))
            pyramid[level] = target
    return pyramid, keys
