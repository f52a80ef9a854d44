"""Hostile inputs for the tools and the reader, each made from a real pyramid file or tree by one damage:
sizes that lie, shapes that are negative, keys that are paths, FIFOs, broken JSON, rewritten pack arrays."""

import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import torch

END_OF_DIRECTORY = b"PK\x05\x06"
DIRECTORY_ENTRY = b"PK\x01\x02"
LOCAL_HEADER = b"PK\x03\x04"

# What a JSON file of the tree may hold instead of its content: each must be refused in one line naming it.
BAD_JSON = {
    "invalid JSON": b'{"format": 1, ',
    "not an object": b"[1, 2, 3]\n",
    "binary junk": bytes(range(256)) * 4,
    "empty": b"",
}


def members(path):
    """{record name: bytes} of a torch.save archive, in the archive's order."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_archive(path, records):
    """An uncompressed zip of `records` {name: bytes}, as torch.save lays out its records (no alignment)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(zipfile.ZipInfo(name), data)


def _directory_entries(data):
    """[(offset of the central directory entry, its name)] of a zip's bytes."""
    at = data.rfind(END_OF_DIRECTORY)
    count, _, offset = struct.unpack_from("<HII", data, at + 10)
    entries = []
    for _ in range(count):
        assert data[offset:offset + 4] == DIRECTORY_ENTRY
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, offset + 28)
        entries.append((offset, data[offset + 46:offset + 46 + name_length].decode()))
        offset += 46 + name_length + extra_length + comment_length
    return entries


def claim_record_size(path, name_end, size):
    """Make the zip directory (and the local header) of the record whose name ends with `name_end` claim
    `size` bytes, the file itself unchanged in length: e.g. a 1 GiB data.pkl in a 100 kB file."""
    data = bytearray(path.read_bytes())
    for offset, name in _directory_entries(data):
        if name.endswith(name_end):
            struct.pack_into("<II", data, offset + 20, size, size)  # compressed, uncompressed sizes
            local, = struct.unpack_from("<I", data, offset + 42)
            struct.pack_into("<II", data, local + 18, size, size)
            path.write_bytes(bytes(data))
            return
    raise KeyError(name_end)


def break_directory(path):
    """Overwrite the end-of-directory record's signature: the zip directory cannot be found, every record's
    bytes are intact."""
    data = bytearray(path.read_bytes())
    at = data.rfind(END_OF_DIRECTORY)
    data[at:at + 4] = b"PK\x00\x00"
    path.write_bytes(bytes(data))


class _Storage:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2 over a persistent storage."""

    def __init__(self, storage, shape, stride):
        self.storage, self.shape, self.stride = storage, tuple(shape), tuple(stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", obj.dtype, obj.key, "cpu", obj.numel
        return None


_STORAGES = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage, torch.float64: torch.DoubleStorage,
             torch.bfloat16: torch.BFloat16Storage}


def rewrite_tensor(path, key, shape, stride=None, numel=None):
    """Rewrite the file's data.pkl so that `key` claims `shape` (and `stride`, `numel`: by default those of a
    contiguous tensor of that shape), its storage record untouched: e.g. shape (-1, -64, 8) over 512 values."""
    records = members(path)
    pickle_name = next(name for name in records if name.endswith("/data.pkl"))
    content = torch.load(path, weights_only=True)
    tensors, storages = {}, {}
    for index, (name, tensor) in enumerate(content.items()):
        storage_key = str(index)
        storages[name] = _Storage(storage_key, _STORAGES[tensor.dtype], tensor.numel())
        tensors[name] = _Tensor(storages[name], tensor.shape, tensor.stride())
    if stride is None:
        stride, step = [], 1
        for side in reversed(shape):
            stride.insert(0, step)
            step *= side
    tensors[key] = _Tensor(_Storage(storages[key].key, storages[key].dtype,
                                    numel if numel is not None else int(np.prod(shape))), shape, stride)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(tensors)
    prefix = pickle_name.removesuffix("data.pkl")
    # The storages renumbered in order of the keys, as torch.save numbers them.
    rebuilt = {pickle_name: buffer.getvalue()}
    for name, record in records.items():
        if name != pickle_name and not name.startswith(prefix + "data/"):
            rebuilt[name] = record
    for index, tensor in enumerate(content.values()):
        rebuilt[f"{prefix}data/{index}"] = tensor.contiguous().numpy().tobytes()
    write_archive(path, rebuilt)


def make_fifo(path):
    """A FIFO in place of `path` (removed first): opening it to read blocks until a writer comes."""
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def replace_with_directory(path):
    if path.exists():
        path.unlink()
    path.mkdir()
    return path


def rewrite_npy(path, fortran=False, row_shape=None, dtype=None):
    """Rewrite a pack array in place: the same values in Fortran order, or reshaped to another row shape,
    or in another dtype."""
    array = np.load(path)
    if row_shape is not None:
        array = array.reshape(array.shape[0], *row_shape)
    if dtype is not None:
        array = array.astype(dtype)
    if fortran:
        array = np.asfortranarray(array)
    with open(path, "wb") as file:
        np.lib.format.write_array(file, array)


def edit_json(path, **changes):
    """Set keys of a JSON object file."""
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))
