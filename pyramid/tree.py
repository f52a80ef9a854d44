"""The output tree: what lives in an output folder, and what of it is current.

    OUTPUT_DIR/
        a/b/c.pt                one pyramid per image: levels "16x16" ... "1x1" (with --flip also "flip/16x16" ...)
        manifest.json           what made the files (pyramid.manifest writes it)
        failures.jsonl          one {"path", "error"} line per image that failed (and "path_bytes": see failure_line)
        runs.jsonl              one line per run (pyramid.runs)
        stats.pt                statistics for normalising (pyramid.stats)
        pack/                   the packed copy (pyramid.pack): <level>.npy, flip/<level>.npy, pack.json
        .pyramid.lock           the lock of the live run (pyramid.lock)
        .c.pt.tmp.<host@pid.t>  a writer's temporary, renamed into place once complete

The pack and stats.pt are derived from the files: each records the tree it was made from (per file its
size and mtime, and the compared settings of manifest.json), and is current while the tree still is that.
Every module that reads or writes these names takes them from here.
"""

import base64
import errno
import hashlib
import json
import os
import re
import shlex
import socket
import stat
import threading
import time
from pathlib import Path

from pyramid.exits import DamagedFile
from pyramid.families import DEFAULT_FAMILY

OUTPUT_SUFFIX = ".pt"
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
RUNS_NAME = "runs.jsonl"
STATS_NAME = "stats.pt"
PACK_DIR = "pack"
PACK_RECORD_NAME = "pack.json"
LOCK_NAME = ".pyramid.lock"
FLIP_PREFIX = "flip/"  # the levels of the mirrored image (--flip): "flip/16x16", ..., in files and under pack/
# A level name: "{s}x{s}" or "flip/{s}x{s}", s a positive integer in ASCII digits without leading zeros. The
# only keys that ever become file names (pack/<level>.npy), so nothing else ("../../x", "/tmp/x") does.
LEVEL_NAME = re.compile(rf"(?:{re.escape(FLIP_PREFIX)})?([1-9][0-9]{{0,5}})x\1")
TEMPORARY_MARK = ".tmp."
# The pack is built beside pack/ and swapped in: temporary directories named as temporary files are.
PACK_TEMPORARY_PREFIX = f".{PACK_DIR}{TEMPORARY_MARK}"
PACK_OLD_PREFIX = f".{PACK_DIR}-old{TEMPORARY_MARK}"
# Names at the top of a tree that the tree keeps for itself: no image's file is ever one of them or under one
# (an image `stats.png` or `pack/x.png` is a recorded failure instead, see reserved_output), and no reader
# takes them for pyramids. The lock's own files start with LOCK_NAME.
TOP_NAMES = {MANIFEST_NAME: "the settings that made the files", FAILURES_NAME: "the record of failed images",
             RUNS_NAME: "the record of runs", STATS_NAME: "the statistics (pyramid.stats)",
             PACK_DIR: "the packed copy (pyramid.pack)"}
# The bytes of a file name on Linux's file systems (ext4, xfs, btrfs, tmpfs, NFS): a temporary must fit too.
NAME_MAX = 255
# What is made from the files: a replacement of the files (--overwrite) removes it too.
DERIVED_NAMES = (FAILURES_NAME, STATS_NAME, PACK_DIR)
# A temporary from another machine is taken as abandoned once it is this old.
FOREIGN_TEMPORARY_SECONDS = 600
# --store_dtype: the dtypes the files' tensors may hold, by the names the manifest records, and the bytes a value
# of each takes.
STORE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STORE_DTYPES = tuple(STORE_BYTES)


def flip_twin(level):
    """The key of a level's mirrored twin: '8x8' -> 'flip/8x8'."""
    return FLIP_PREFIX + level


def is_level_name(name):
    """True for '8x8' and 'flip/8x8'; False for '08x08', '8x4', '../8x8', '٨x٨', anything not a str."""
    return isinstance(name, str) and LEVEL_NAME.fullmatch(name) is not None


def level_name_side(name):
    """The grid side of a level name, flip/ twins included: 'flip/8x8' -> 8; None for anything else."""
    match = LEVEL_NAME.fullmatch(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None


def with_twins(levels, flip):
    """The keys a file holds: the levels, then their flip/ twins when the run had --flip."""
    return list(levels) + [flip_twin(level) for level in levels] if flip else list(levels)


def readable_text(text):
    r"""`text` as valid UTF-8 for people and JSON: the bytes of a file name that are not UTF-8 (which Python
    holds as lone surrogates, and no UTF-8 encoder takes) written as \xNN, 'bad\udcfe.png' -> r'bad\xfe.png'.
    Any other text is returned as it is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name gives: its code point, escaped
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _readable(value):
    """`value` (JSON-like) with every string, keys included, made readable_text."""
    if isinstance(value, str):
        return readable_text(value)
    if isinstance(value, dict):
        return {_readable(key): _readable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_readable(item) for item in value]
    return value


def append_json_line(path, record):
    """Append `record` to the JSON-lines file at `path` as one line: a single write with O_APPEND, so lines
    of several processes or runs never interleave and a line is never torn by another.

    The line is valid UTF-8 whatever the strings hold (readable_text); a link or a FIFO at `path` is refused
    (OSError), never followed outside the tree or waited on."""
    line = json.dumps(_readable(record), ensure_ascii=False, default=lambda value: readable_text(str(value))) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENXIO, errno.EINVAL):  # a link, a FIFO, a socket or a device
            raise OSError(error.errno, f"{readable_text(os.fspath(path))} is not a regular file; remove it") \
                from error
        raise
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def failure_line(relative_path, message):
    """The failures.jsonl record of an image: {"path": its relative path, "error": message}. A path whose
    bytes are not UTF-8 is written readable (readable_text), and "path_bytes" then holds its exact bytes in
    base64, so a script can still find the file."""
    record = {"path": readable_text(relative_path), "error": message}
    if record["path"] != relative_path:
        try:
            record["path_bytes"] = base64.b64encode(os.fsencode(relative_path)).decode("ascii")
        except UnicodeEncodeError:  # not a name from a file system: there are no exact bytes to give
            pass
    return record


def failed_image(record):
    """The relative image path (as find_images gives it) of a failures.jsonl record; None for a line
    that is not one."""
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    exact = record.get("path_bytes")
    if exact is None:
        return record["path"]
    try:
        return os.fsdecode(base64.b64decode(exact, validate=True))
    except (ValueError, TypeError):
        return None


# ----------------------------------------------------------------------------- temporaries


def temporary_name(final_path, tag):
    """The hidden temporary beside `final_path` that a writer renames into place: 'd/a.pt' -> 'd/.a.pt.tmp.<tag>'.

    Hidden and without the .pt suffix, so no reader that globs '*.pt' ever sees a half file. Where the final
    name is too long for that (a 250-byte image name), its end is cut, at a character, so the temporary fits
    NAME_MAX bytes: the tag alone tells one writer's temporary from another's, each writing one file at a time.
    """
    final_path = Path(final_path)
    ending = f"{TEMPORARY_MARK}{tag}"
    room = NAME_MAX - 1 - len(os.fsencode(ending))
    name = final_path.name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return final_path.with_name(f".{name}{ending}")


def is_temporary_name(name):
    """True for a writer's temporary file name (see `temporary_name`)."""
    return name.startswith(".") and TEMPORARY_MARK in name


def writer_tag():
    """Who writes a temporary: 'host@pid.thread', so a later run can tell a live writer from a dead one."""
    return f"{socket.gethostname()}@{os.getpid()}.{threading.get_ident()}"


def pid_alive(pid):
    """True while process `pid` runs on this host (also when another user owns it); a zombie is dead.

    A killed run's processes can stay zombies for a while, or for good: orphans go to PID 1, and a container's
    PID 1 that is not an init reaps them late or never. Its lock and temporaries are still a dead run's.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except FileNotFoundError:  # ended just now; where there is no /proc at all (macOS), kill's answer stands
        return not os.path.isdir("/proc/self")
    except OSError:
        return True


def is_abandoned_temporary(path, now=None):
    """True for a temporary whose writer is gone: a dead pid on this host, or older than
    FOREIGN_TEMPORARY_SECONDS when written elsewhere (another node of a cluster, an unknown tag)."""
    path = Path(path)
    host, _, rest = path.name.rpartition(TEMPORARY_MARK)[2].partition("@")
    pid = rest.split(".")[0]
    if host == socket.gethostname() and pid.isdigit():
        return not pid_alive(int(pid))
    return (now or time.time()) - path.stat().st_mtime > FOREIGN_TEMPORARY_SECONDS


def remove_abandoned_temporaries(temporaries):
    """Delete the temporaries (paths) whose writers are gone; those of live writers are left alone."""
    for temporary in temporaries:
        if is_abandoned_temporary(temporary):
            Path(temporary).unlink(missing_ok=True)


def reserved_output(relative_output):
    """Why no image's file may be `relative_output` (a relative POSIX path), or None when it may: a name the tree
    keeps for itself at its top (stats.pt, under pack/, ...), the lock's, one named like a temporary, which a
    later run would take for a writer's leftover and delete, or a path that leaves the tree ('..', absolute)."""
    parts = relative_output.split("/")
    top = parts[0]
    if relative_output.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return f"its file {relative_output} would not be a path inside the output directory"  # never from find_images
    if top in TOP_NAMES:
        where = top if len(parts) == 1 else f"under {top}/"
        return (f"its file {relative_output} would be {where}, which the output tree keeps for {TOP_NAMES[top]}; "
                f"rename the image or move it into a folder")
    if top.startswith(LOCK_NAME):
        return (f"its file {relative_output} would be under {top}, named like the output tree's lock "
                f"({LOCK_NAME}); rename the image's folder")
    if any(is_temporary_name(part) for part in parts):
        return (f"its file {relative_output} would be named like a writer's temporary (a name that starts with "
                f"'.' and holds '{TEMPORARY_MARK}'), which a later run deletes; rename the image or its folder")
    return None


def scan_outputs(output_dir):
    """(finished, temporaries): relative POSIX paths of the pyramids under `output_dir`, and the paths of
    leftover temporaries from interrupted writers.

    A pyramid is a regular file ending in .pt in a real folder of the tree (links are not followed: the
    extractor writes through none, see writer.make_folders), whose name is not one the tree keeps for itself
    (reserved_output: stats.pt, pack/, ...). Anything else named *.pt (a FIFO, a socket, a folder, a link)
    is not one; a run writes the image's file over it where it can.
    """
    root = os.fspath(output_dir)
    finished, temporaries = set(), []
    if not os.path.isdir(root):
        return finished, temporaries
    waiting = [("", root)]
    while waiting:
        relative_dir, directory = waiting.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:  # unreadable: its files are not seen, so a run tries to write them again
            continue
        for entry in entries:
            relative = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
                is_file = entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if is_folder:
                if reserved_output(f"{relative}/x{OUTPUT_SUFFIX}") is None:  # pack/ and the like hold no pyramids
                    waiting.append((relative, entry.path))
            elif is_temporary_name(entry.name):
                temporaries.append(entry.path)
            elif is_file and entry.name.endswith(OUTPUT_SUFFIX) and reserved_output(relative) is None:
                finished.add(relative)
    return finished, temporaries


def item_name(relative_path):
    """The item name of a file: 'a/b/c.pt' -> 'a/b/c'."""
    return relative_path.removesuffix(OUTPUT_SUFFIX)


# ----------------------------------------------------------------------------- manifest.json, read and compared

# Set while --overwrite removes the files of other settings: the manifest already names the new
# settings, but old files may remain until the removal is finished (by this run or the next).
REPLACING_KEY = "replacing"
# Versions are recorded for the record; a different library version does not make a file different.
UNCOMPARED_KEYS = frozenset({"versions", REPLACING_KEY})
# The pixel pipeline (pyramid.decode.pixel_pipeline): compared like the settings, the decoders by name; their
# versions, like the packages', are said and recorded, not refused.
PIXEL_KEYS = ("image_processor", "decoders")
# Settings a manifest written before they existed lacks, and what its silence means: such a tree is
# compared, and its stats.pt and pack stay current, as if the manifest said so.
IMPLIED_SETTINGS = {"store_dtype": "fp32", "model_family": DEFAULT_FAMILY}
IMPLIED_KEYS = (*IMPLIED_SETTINGS, "resolution")  # a manifest's resolution is implied by its crop size


def read_manifest(output_dir):
    """The manifest in `output_dir`, or None where there is none. DamagedFile, naming it, where it is not a
    regular file, not a JSON object, or its levels, hidden size, flip or stored dtype are not what a run writes."""
    from pyramid.validate import MANIFEST_ADVICE, MANIFEST_MAX_BYTES, check_manifest, read_json_object

    path = Path(output_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    manifest = read_json_object(path, MANIFEST_MAX_BYTES, MANIFEST_ADVICE)
    manifest.setdefault("flip", False)  # written before --flip existed: no flip/ levels
    check_manifest(manifest, path)
    return manifest


def stored_dtype(manifest):
    """The dtype the files of a tree hold, by its manifest: "fp32", "bf16" or "fp16" (--store_dtype); "fp32"
    for a manifest from before --store_dtype; None without a manifest (then each file says its own)."""
    if manifest is None:
        return None
    return manifest.get("store_dtype", IMPLIED_SETTINGS["store_dtype"])


def implied_setting(manifest, key):
    """What a manifest's silence on `key` means: IMPLIED_SETTINGS, and the resolution of a manifest from before
    --resolution is its crop size. None where silence implies nothing."""
    if key == "resolution":
        return manifest.get("crop_size")
    return IMPLIED_SETTINGS.get(key)


def with_defaults(manifest):
    """A copy of `manifest` with the settings of the keys it was written without (implied_setting)."""
    return {**{key: implied_setting(manifest, key) for key in IMPLIED_KEYS}, **manifest}


def model_family(manifest):
    """The model family that made a tree: 'dinov2' or 'dinov3'; 'dinov2' for a manifest from before DINOv3."""
    return manifest.get("model_family", implied_setting(manifest, "model_family"))


def manifest_resolution(manifest):
    """The side of the square the model saw (--resolution); the crop size for a manifest from before it."""
    return manifest.get("resolution", implied_setting(manifest, "resolution"))


def _compared(key, value):
    """The part of a manifest value that a run must match: the decoders by name, not version."""
    return sorted(value) if key == "decoders" and isinstance(value, dict) else value


def manifest_differences(existing, wanted):
    """Human-readable differences in the compared settings: ["dtype: fp16 -> fp32", ...].

    A manifest written before the pixel pipeline was recorded differs in it: nothing says whether its
    files were made by the same processor and decoders (the torchvision backend's pixels, say).
    """
    differences = []
    for key in sorted((set(existing) | set(wanted)) - UNCOMPARED_KEYS):
        old = _compared(key, existing.get(key, implied_setting(existing, key)))
        new = _compared(key, wanted.get(key, implied_setting(wanted, key)))
        if old == new:
            continue
        if old is None and key in PIXEL_KEYS:
            differences.append(f"{key}: not recorded (a manifest from before it was) -> {new!r}")
        else:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def available_levels(root, manifest, first_file=None):
    """Every level the files hold, finest first: the manifest's, and their flip/ twins when it says flip;
    without a manifest, the first file's keys."""
    if manifest is not None:
        return with_twins(manifest["levels"], manifest.get("flip"))
    if first_file is not None:
        from pyramid.reader import read_pyramid  # loads torch: only for a tree without a manifest
        from pyramid.validate import check_level_names

        path = Path(root) / first_file
        _, keys = read_pyramid(path, levels=[])
        check_level_names(keys, path)  # without a manifest, the first file's keys name the levels (and pack files)
        return keys
    return []


# ----------------------------------------------------------------------------- what is current


def file_records(root, relative_paths):
    """[[relative path, size, mtime_ns], ...] for the files, in the given order: what tells one version
    of a file from another without reading it. Not the inode: a copy that keeps mtimes (cp -a, rsync -a)
    of the tree with its pack to a training machine keeps the pack current."""
    from pyramid.validate import regular_status  # validate imports tree

    records = []
    for relative in relative_paths:
        status = regular_status(os.path.join(root, relative))  # a FIFO named a.pt would hang its reader
        records.append([relative, status.st_size, status.st_mtime_ns])
    return records


def tree_state(root):
    """(manifest or None, file records in sorted-name order) of the output tree at `root` now."""
    from pyramid.validate import check_manifest_complete  # validate imports tree

    finished, _ = scan_outputs(root)
    manifest = read_manifest(root)
    if manifest is not None:  # what the files are read by
        check_manifest_complete(manifest, Path(root) / MANIFEST_NAME)
    return manifest, file_records(root, sorted(finished))


def tree_digest(manifest, records):
    """A short fingerprint of (compared manifest settings, file records): equal exactly when both are. A
    setting equal to what its absence implies is left out, so stats.pt of a tree from before it stays current."""
    settings = None if manifest is None else {key: value for key, value in sorted(manifest.items())
                                              if key not in UNCOMPARED_KEYS
                                              and not (key in IMPLIED_KEYS
                                                       and value == implied_setting(manifest, key))}
    return hashlib.sha256(json.dumps([settings, records], sort_keys=True).encode()).hexdigest()


def stats_source(manifest, records, read_from):
    """The "source" entry of stats.pt: the digest of the tree it was computed from, and what was read."""
    return {"digest": tree_digest(manifest, records), "read_from": read_from}


def stats_current(stats, manifest, records):
    """True when the loaded stats.pt was computed from exactly this tree (manifest and file records)."""
    source = stats.get("source")
    return isinstance(source, dict) and source.get("digest") == tree_digest(manifest, records)


PACK_FORMAT = 1


def pack_dir(root):
    return Path(root) / PACK_DIR


def pack_level_path(directory, level):
    """The array of a level in a pack: '8x8' -> pack/8x8.npy, 'flip/8x8' -> pack/flip/8x8.npy. A key that is
    not a level name ('../../x', '/tmp/x') is refused (ValueError) before it becomes a path."""
    if not is_level_name(level):
        raise ValueError(f"{level!r} is not a level name ('{{s}}x{{s}}' or 'flip/{{s}}x{{s}}'), so it names no "
                         f"file of a pack")
    return Path(directory) / f"{level}.npy"


def read_pack_record(root, file_count=None):
    """The pack.json of the pack under `root`, or None where there is no (complete) pack; DamagedFile, naming
    it, where it is not one the pack tool writes (for a tree of `file_count` files, where given)."""
    from pyramid.validate import MANIFEST_MAX_BYTES, PACK_RECORD_BYTES_PER_FILE, check_pack_record, read_json_object

    path = pack_dir(root) / PACK_RECORD_NAME
    if not os.path.lexists(path):
        return None
    limit = MANIFEST_MAX_BYTES + PACK_RECORD_BYTES_PER_FILE * (file_count if file_count is not None else 1 << 20)
    record = read_json_object(path, limit, "rerun python -m pyramid.pack to rebuild the pack")
    if type(record.get("format")) is int and record["format"] != PACK_FORMAT:
        return record  # another format: pack_staleness says so
    check_pack_record(record, path)
    return record


def pack_stored_dtype(record):
    """The dtype name ("fp32", "bf16", "fp16") of a pack's arrays, by its pack.json: fp32 for a pack from before
    --store_dtype. bf16 arrays are numpy uint16, the values' raw bits (numpy has no bfloat16)."""
    return record.get("dtype", IMPLIED_SETTINGS["store_dtype"])


def pack_staleness(record, manifest, records):
    """Why a pack record no longer matches the tree, as sentences; [] when it is current."""
    reasons = []
    if record.get("format") != PACK_FORMAT:
        return [f"pack format {record.get('format')!r}, this reader knows {PACK_FORMAT}"]
    if (record.get("manifest") is None) != (manifest is None) or (
            manifest is not None and manifest_differences(record["manifest"], manifest)):
        reasons.append(f"{MANIFEST_NAME} differs from the one packed")
    packed = {entry[0]: entry[1:] for entry in record.get("files", [])}
    now = {entry[0]: entry[1:] for entry in records}
    added = len(now.keys() - packed.keys())
    removed = len(packed.keys() - now.keys())
    rewritten = sum(1 for name in now.keys() & packed.keys() if now[name] != packed[name])
    for count, what in ((added, "added"), (removed, "removed"), (rewritten, "rewritten")):
        if count:
            reasons.append(f"{count} file(s) {what} since it was packed")
    return reasons


def current_pack(root, manifest, records, levels):
    """(record, reasons): the pack's record when it is current and holds `levels`, each array as pack.json and
    the manifest say (pack_arrays), else None and why not."""
    try:
        record = read_pack_record(root, len(records))
    except DamagedFile as error:
        return None, [str(error)]
    if record is None:
        return None, ["no pack"]
    reasons = pack_staleness(record, manifest, records)
    missing = [level for level in levels if level not in record.get("levels", [])]
    if missing:
        reasons.append(f"level(s) {missing} not packed")
    if not reasons:
        from pyramid.validate import pack_arrays  # validate imports tree

        try:
            pack_arrays(root, record, manifest, levels)
        except DamagedFile as error:
            reasons.append(str(error))
    return (None if reasons else record), reasons


def pack_command(root, also=()):
    """The command that rebuilds the pack under `root` with the levels it holds, and `also` these: plain
    `python -m pyramid.pack ROOT` when that is every level, else with --levels, so advice to rebuild a pack of
    4x4 and 1x1 does not pack the 16x16 level that is 3/4 of the bytes. `ROOT` is quoted for a shell."""
    try:
        record = read_pack_record(root) or {}
    except DamagedFile:
        record = {}
    wanted = set(record.get("levels", [])) | set(also)
    command = f"python -m pyramid.pack {shlex.quote(str(root))}"
    try:
        available = available_levels(root, read_manifest(root))
    except (OSError, ValueError):  # an unreadable manifest: name the levels themselves
        available = []
    if not wanted or available and wanted >= set(available):
        return command
    ordered = [level for level in available if level in wanted] + sorted(wanted - set(available))
    return f"{command} --levels {' '.join(ordered)}"
