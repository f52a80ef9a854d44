"""What a reader of an output tree checks before it trusts a file: level names, regular files, the content of
manifest.json and pack.json, and each pack array's header and size against them.

Every check raises exits.DamagedFile naming the file and what is wrong, in one line, before a name becomes
a path, a size becomes an allocation or a count becomes a loop.
"""

import json
import math
import os
import stat

from pyramid.exits import DamagedFile
from pyramid.tree import (
    FLIP_PREFIX,
    PACK_RECORD_NAME,
    STORE_BYTES,
    STORE_DTYPES,
    flip_twin,
    is_level_name,
    pack_dir,
    pack_level_path,
    pack_stored_dtype,
    stored_dtype,
)
from pyramid.tree import level_name_side as level_side

# numpy's dtype of a pack array per stored dtype (numpy has no bfloat16: its raw 16 bits, as uint16).
PACK_NUMPY_DTYPES = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2"}
# A manifest.json is a few kB; pack.json about 100 bytes a file. Larger ones are not what the tools wrote.
MANIFEST_MAX_BYTES = 1 << 20
PACK_RECORD_BYTES_PER_FILE = 4096
# A file's bytes beyond its tensors' data: the pickle, the zip headers and directory, the records' alignment.
FILE_OVERHEAD_BYTES = 16384
FILE_OVERHEAD_BYTES_PER_KEY = 1024
NPY_HEADER_MAX_BYTES = 10000  # numpy's own limit on an .npy header it reads
# Read-only, without blocking (a FIFO's open waits for a writer), not inherited by child processes.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def check_level_names(names, source):
    """Raise DamagedFile naming `source` unless `names` is a list of distinct level names."""
    if not isinstance(names, list) or not names:
        raise DamagedFile(source, f"levels are {names!r}, not a list of level names such as ['16x16', '8x8']")
    bad = [name for name in names if not is_level_name(name)]
    if bad:
        raise DamagedFile(source, f"{bad[0]!r} is not a level name ('{{s}}x{{s}}' or 'flip/{{s}}x{{s}}')")
    if len(set(names)) != len(names):
        raise DamagedFile(source, f"levels {names} name one level twice")


def file_kind(mode):
    """'a FIFO', 'a directory', ... for a file mode that is not a regular file's."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def not_regular(path, mode):
    return DamagedFile(path, f"is {file_kind(mode)}, not a regular file; only regular files are read here")


def regular_status(path):
    """os.lstat of `path`, or DamagedFile where it is anything but a regular file (a FIFO would block its reader)."""
    status = os.lstat(path)
    if not stat.S_ISREG(status.st_mode):
        raise not_regular(path, status.st_mode)
    return status


def open_regular(path):
    """A read-only descriptor of the regular file at `path`; DamagedFile for a FIFO, a directory, a device.

    Opened without blocking (a FIFO's open would wait for a writer) and checked by fstat, so what is
    checked is what is read."""
    fd = os.open(path, OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small_file(path, limit):
    """The bytes of the regular file at `path`, refused (DamagedFile) beyond `limit` bytes or when not regular."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DamagedFile(path, f"is {size} bytes, more than such a file ever holds ({limit})")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def read_json_object(path, limit, what_to_do):
    """The JSON object in the file at `path`; DamagedFile naming it when it is not one (`what_to_do` ends it)."""
    data = read_small_file(path, limit)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedFile(path, f"is not UTF-8 text; {what_to_do}") from None
    except ValueError as error:
        raise DamagedFile(path, f"is not valid JSON ({error}); {what_to_do}") from None
    if not isinstance(value, dict):
        raise DamagedFile(path, f"holds a JSON {type(value).__name__}, not an object; {what_to_do}")
    return value


def _positive_int(value):
    return type(value) is int and value > 0


MANIFEST_ADVICE = "restore it, or rerun the extractor with --overwrite to remake the tree"


def check_manifest(manifest, path):
    """Raise DamagedFile unless what the parsed manifest holds of what the tools use is of the right type: the
    levels (plain level names), the hidden size, flip, the stored dtype."""
    if "levels" in manifest:
        check_level_names(manifest["levels"], path)
        flips = [level for level in manifest["levels"] if level.startswith(FLIP_PREFIX)]
        if flips:
            raise DamagedFile(path, f"levels hold {flips[0]!r}: flip/ twins are said by 'flip', not listed; "
                                    f"{MANIFEST_ADVICE}")
    if "hidden_size" in manifest and not _positive_int(manifest["hidden_size"]):
        raise DamagedFile(path, f"hidden_size is {manifest['hidden_size']!r}, not a positive integer; "
                                f"{MANIFEST_ADVICE}")
    if type(manifest.get("flip", False)) is not bool:
        raise DamagedFile(path, f"flip is {manifest.get('flip')!r}, not true or false; {MANIFEST_ADVICE}")
    store_dtype = manifest.get("store_dtype", "fp32")
    if store_dtype not in STORE_DTYPES:
        raise DamagedFile(path, f"store_dtype is {store_dtype!r}, not one of {', '.join(STORE_DTYPES)}; "
                                f"{MANIFEST_ADVICE}")


def check_manifest_complete(manifest, path):
    """Raise DamagedFile unless the manifest names the levels and the hidden size, which the tools read files by."""
    for key in ("levels", "hidden_size"):
        if key not in manifest:
            raise DamagedFile(path, f"has no {key}; {MANIFEST_ADVICE}")


def expected_tensors(manifest):
    """{key: (stored dtype name, shape (1, s*s, D))} of every key the manifest's files hold."""
    levels = list(manifest["levels"])
    if manifest.get("flip"):
        levels += [flip_twin(level) for level in levels]
    dtype = manifest.get("store_dtype", "fp32")
    return {level: (dtype, (1, level_side(level) ** 2, manifest["hidden_size"])) for level in levels}


def most_file_bytes(tensors):
    """The most bytes a file of `tensors` ({key: (dtype name, shape)}) takes: the data, and the archive around it."""
    data = sum(math.prod(shape) * STORE_BYTES[dtype] for dtype, shape in tensors.values())
    return data + FILE_OVERHEAD_BYTES + FILE_OVERHEAD_BYTES_PER_KEY * len(tensors)


def check_pack_record(record, path):
    """Raise DamagedFile unless the parsed pack.json is one the pack tool writes: count, names and file records
    that agree, levels that are level names, shapes [count, s*s, D]. (Whether it is the tree's pack now is
    tree.pack_staleness's question, and whether its arrays hold what it says, check_pack_array's.)"""
    rerun = "rerun python -m pyramid.pack to rebuild the pack"
    count = record.get("count")
    if type(count) is not int or count < 0:
        raise DamagedFile(path, f"count is {count!r}, not a number of files; {rerun}")
    names, files = record.get("names"), record.get("files")
    if not isinstance(names, list) or len(names) != count or not all(isinstance(name, str) for name in names):
        raise DamagedFile(path, f"names are not {count} strings; {rerun}")
    if not isinstance(files, list) or len(files) != count or not all(
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and type(entry[1]) is int and type(entry[2]) is int for entry in files):
        raise DamagedFile(path, f"files are not {count} [path, size, mtime_ns] entries; {rerun}")
    if record.get("manifest") is not None and not isinstance(record["manifest"], dict):
        raise DamagedFile(path, f"manifest is a {type(record['manifest']).__name__}, not an object; {rerun}")
    if record.get("dtype", "fp32") not in STORE_DTYPES:
        raise DamagedFile(path, f"dtype is {record.get('dtype')!r}, not one of {', '.join(STORE_DTYPES)}; {rerun}")
    check_level_names(record.get("levels"), path)
    shapes = record.get("shapes")
    if not isinstance(shapes, dict) or set(shapes) != set(record["levels"]):
        raise DamagedFile(path, f"shapes do not name exactly its levels; {rerun}")
    widths = set()
    for level in record["levels"]:
        shape = shapes[level]
        side = level_side(level)
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(size) is int for size in shape)
                and shape[0] == count and shape[1] == side * side and shape[2] > 0):
            raise DamagedFile(path, f"shape of {level} is {shape!r}, not [{count}, {side * side}, D]; {rerun}")
        widths.add(shape[2])
    if len(widths) > 1:
        raise DamagedFile(path, f"its levels have different hidden sizes {sorted(widths)}; {rerun}")


def check_pack_array(path, shape, dtype):
    """The byte offset of row 0 in the .npy file at `path`, after checking it holds a C-order array of `shape`
    and `dtype` (a numpy dtype string such as '<f4') and nothing else: its header says so and its size is
    exactly the header's and the data's. DamagedFile otherwise, before any row is read."""
    import numpy as np

    rerun = "rerun python -m pyramid.pack to rebuild the pack"
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(file, max_header_size=NPY_HEADER_MAX_BYTES)
        except (ValueError, OSError, SyntaxError, TypeError) as error:
            raise DamagedFile(path, f"is not a readable .npy array ({error}); {rerun}") from None
        stored_shape, fortran_order, array_dtype = header
        offset, size = file.tell(), os.fstat(file.fileno()).st_size
    expected = np.dtype(dtype)
    if array_dtype != expected:
        raise DamagedFile(path, f"holds {array_dtype}, the tree's files hold {expected}; {rerun}")
    if fortran_order:
        raise DamagedFile(path, f"is in Fortran order, its rows are not contiguous; {rerun}")
    if tuple(stored_shape) != tuple(shape):
        raise DamagedFile(path, f"has shape {list(stored_shape)}, pack.json and manifest.json say {list(shape)}; "
                                f"{rerun}")
    data = math.prod(shape) * expected.itemsize
    if size != offset + data:
        raise DamagedFile(path, f"is {size} bytes, its header and shape make {offset + data}; {rerun}")
    return offset


def pack_arrays(root, record, manifest, levels):
    """{level: (path, byte offset of row 0, shape (N, s*s, D), numpy dtype)} of a current pack's arrays of
    `levels`, each checked against pack.json and the manifest (dtype, C order, shape, the file's size) before a
    row is served; DamagedFile naming the first array that is not so."""
    name = pack_stored_dtype(record)
    if manifest is not None and name != stored_dtype(manifest):
        raise DamagedFile(pack_dir(root) / PACK_RECORD_NAME, f"says dtype {name!r}, the manifest's store_dtype is "
                                                             f"{stored_dtype(manifest)!r}")
    dtype = PACK_NUMPY_DTYPES[name]
    hidden_size = manifest["hidden_size"] if manifest is not None else None
    arrays = {}
    for level in levels:
        shape = tuple(record["shapes"][level])  # (N, s*s, D), as check_pack_record found it
        path = pack_level_path(pack_dir(root), level)
        if hidden_size is not None and shape[2] != hidden_size:
            raise DamagedFile(pack_dir(root) / PACK_RECORD_NAME, f"shape of {level} is {list(shape)}, the manifest's "
                                                                 f"hidden size is {hidden_size}")
        arrays[level] = (path, check_pack_array(path, shape, dtype), shape, dtype)
    return arrays
