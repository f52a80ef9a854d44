"""Download or copy an FFHQ / CelebA-HQ subset into data/raw_images/ as lossless PNGs."""

import argparse
import hashlib
import io
import itertools
import json
import os
import re
import sys
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pyramid.cli import argument_parser, command_name, default_threads, refusals_exit_2
from pyramid.exits import UsageError
from pyramid.paths import IMAGE_SUFFIXES
from pyramid.progress import Progress, log
from pyramid.tree import is_temporary_name, remove_abandoned_temporaries, temporary_name, writer_tag

# Public parquet mirrors in the hub's image-dataset layout (an `image` column of {bytes, path}).
DATASETS = {
    "ffhq": "merkol/ffhq-256",        # 70,000 PNG, 256x256, 15 shards of ~4,700 rows
    "celebahq": "bitmind/celeb-a-hq",  # 30,000 JPEG, 1024x1024, one train split
}
RECORD = "prepare.json"
SPLIT = "train"
# Modes a PNG can hold as they are; anything else (CMYK, YCbCr, ...) is converted to RGB.
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Entry:
    """One source image: its row in source order, its output name, how to report it, and its bytes."""

    row: int
    name: str
    label: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Shard:
    """One parquet file of a source; `fetch()` gives its local path, downloading it if it must."""

    label: str
    fetch: Callable[[], str]


def output_name(relative: str) -> str:
    """The output name for a source file's relative path: the same path with the suffix .png."""
    return Path(relative).with_suffix(".png").as_posix()


def refuse_clashes(relatives: list[str]) -> None:
    """Raise UsageError naming every group of source files that would write the same PNG (`a.png`, `a.jpg`),
    all in one message, so one rename pass fixes them all."""
    by_name = {}
    for relative in relatives:
        by_name.setdefault(output_name(relative), []).append(relative)
    clashes = [f"{' and '.join(group)} would all become {name}" for name, group in by_name.items() if len(group) > 1]
    if clashes:
        raise UsageError(f"{len(clashes)} name clash{'es' if len(clashes) > 1 else ''}: {'; '.join(clashes)}; "
                         f"rename all but one of each in the source")


class FileSource:
    """Image files of a folder or image members of a .zip, sorted by relative name; each keeps its own name as .png."""

    complete = True

    def __init__(self, relatives: list[str], read: Callable[[str], bytes], identity: dict):
        refuse_clashes(relatives)
        self.relatives = relatives
        self.read = read
        self.identity = identity

    def count(self) -> int:
        return len(self.relatives)

    def entries(self) -> Iterator[Entry]:
        for row, relative in enumerate(self.relatives):
            yield Entry(row, output_name(relative), relative, lambda relative=relative: self.read(relative))


def folder_source(root: Path) -> FileSource:
    """The image files below a folder, at any depth."""
    relatives = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return FileSource(relatives, lambda relative: (root / relative).read_bytes(),
                      {"kind": "folder", "path": str(root.resolve())})


def zip_source(path: Path) -> FileSource:
    """The image members of a .zip, named by their paths inside it."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UsageError(f"--source {path} is not a readable zip file ({error})") from None
    # macOS archivers add __MACOSX/ resource forks that look like images but are not.
    members = sorted(m for m in archive.namelist()
                     if not m.endswith("/") and not m.startswith("__MACOSX/")
                     and Path(m).suffix.lower() in IMAGE_SUFFIXES)
    return FileSource(members, archive.read, {"kind": "zip", "path": str(path.resolve())})


class ParquetSource:
    """Rows of parquet shards in the hub's image layout, in shard order; row i becomes f"{i:05d}.png".

    A shard is fetched only when its rows are reached, so the first N rows of a hub dataset
    download only the shards that hold them.
    """

    def __init__(self, shards: list[Shard], identity: dict, complete: bool = True):
        self.shards = shards
        self.identity = identity
        # False when only a cached part of a hub dataset is at hand (offline).
        self.complete = complete

    def count(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(shard.fetch()).metadata.num_rows for shard in self.shards)

    def entries(self) -> Iterator[Entry]:
        import pyarrow.parquet as pq

        row = 0
        for shard in self.shards:
            parquet = pq.ParquetFile(shard.fetch())
            if "image" not in parquet.schema_arrow.names:
                raise UsageError(f"{shard.label} has no 'image' column; --source parquet files need "
                                 f"the hub's image layout (an image column of {{bytes, path}})")
            # Small batches: a batch of 1024x1024 images is tens of MB in memory.
            for batch in parquet.iter_batches(columns=["image"], batch_size=16):
                for image in batch.column(0).to_pylist():
                    data = image.get("bytes") if isinstance(image, dict) else None
                    yield Entry(row, f"{row:05d}.png", f"row {row} ({shard.label})", lambda data=data: data)
                    row += 1


def shard_number(path: str) -> tuple[int | None, int | None]:
    """(index, total) read from a shard's name: `train-00003-of-00015-<hash>.parquet` -> (3, 15),
    `0003.parquet` -> (3, None)."""
    name = Path(path).name
    match = re.search(r"-(\d+)-of-(\d+)", name)
    if match:
        return int(match.group(1)), int(match.group(2))
    if Path(name).stem.isdigit():
        return int(Path(name).stem), None
    return None, None


def split_shards(paths: list[str], split: str = SPLIT) -> list[str]:
    """The parquet files of one split (by a `train-...` file name or a `train/` folder), sorted; all parquet files
    if none is named so."""
    parquet = sorted(p for p in paths if p.endswith(".parquet"))
    named = [p for p in parquet if re.search(rf"(^|/){re.escape(split)}([-_./]|$)", p)]
    return named or parquet


def hub_source(repo_id: str, revision: str | None) -> tuple[ParquetSource, str]:
    """A ParquetSource over a hub dataset's train shards, and the commit it reads; from the HF cache when the hub
    cannot be reached."""
    from huggingface_hub import HfApi, hf_hub_download, scan_cache_dir
    from huggingface_hub.errors import (
        CacheNotFound,
        HTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    identity = {"kind": "hub", "id": repo_id}
    try:
        info = HfApi().dataset_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UsageError(f"there is no public dataset {repo_id}"
                         f"{'@' + revision if revision else ''} on the Hugging Face hub; "
                         f"check the name, or pass --source with a local folder, .zip or .parquet file") from None
    except (OfflineModeIsEnabled, HTTPError):
        info = None
    if info is not None:
        def download(path: str) -> str:
            try:
                return hf_hub_download(repo_id, path, repo_type="dataset", revision=info.sha)
            except (OfflineModeIsEnabled, HTTPError) as error:
                raise UsageError(f"lost the Hugging Face hub while fetching {repo_id}/{path} ({error}); "
                                 f"rerun to resume, or pass --source with a local copy") from None

        paths = split_shards([sibling.rfilename for sibling in info.siblings])
        shards = [Shard(f"{repo_id}/{path}", lambda path=path: download(path)) for path in paths]
        if not shards:
            raise UsageError(f"{repo_id} has no parquet files; pass --source with a local copy of its images")
        return ParquetSource(shards, identity), info.sha

    unreachable = (f"cannot reach the Hugging Face hub for {repo_id} and the local HF cache does not hold it; "
                   f"pass --source with a local folder, .zip or .parquet files of the images")
    try:
        cached = [snapshot for repo in scan_cache_dir().repos
                  if repo.repo_id == repo_id and repo.repo_type == "dataset"
                  for snapshot in repo.revisions if revision in (None, snapshot.commit_hash)]
    except CacheNotFound:
        cached = []
    if not cached:
        raise UsageError(unreachable)
    # Shards are downloaded by commit hash, which leaves no refs/main behind: the newest cached commit is
    # the one the last online run read.
    folder = max(cached, key=lambda snapshot: snapshot.last_modified).snapshot_path
    paths = split_shards([p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")])
    if not paths:
        raise UsageError(unreachable)
    # Offline the cache is all we know: use its shards only while they run 0, 1, 2, ... without a gap,
    # so that row numbers (and so file names) are the same as online.
    numbers = [shard_number(path) for path in paths]
    if all(index is not None for index, _ in numbers):
        gapless = 0
        while gapless < len(paths) and numbers[gapless][0] == gapless:
            gapless += 1
        paths = paths[:gapless]
    if not paths:
        raise UsageError(unreachable)
    complete = numbers[0][1] is not None and len(paths) == numbers[0][1]
    shards = [Shard(f"{repo_id}/{path} (cached)", lambda path=path: str(folder / path)) for path in paths]
    return ParquetSource(shards, identity, complete=complete), folder.name


def open_source(specs: list[str], revision: str | None):
    """The source named by --source (a folder, a .zip, .parquet files or a hub dataset id) and the hub commit,
    if any."""
    paths = [Path(spec) for spec in specs]
    if len(specs) > 1 or specs[0].endswith(".parquet"):
        missing = [spec for spec in specs if not spec.endswith(".parquet") or not Path(spec).is_file()]
        if missing:
            raise UsageError(f"--source takes several paths only as .parquet files, and {missing[0]} is not one")
        resolved = sorted(p.resolve() for p in paths)
        shards = [Shard(p.name, lambda p=p: str(p)) for p in resolved]
        return ParquetSource(shards, {"kind": "parquet", "paths": [str(p) for p in resolved]}), None
    path = paths[0]
    if path.is_dir():
        return folder_source(path), None
    if path.is_file() and path.suffix.lower() == ".zip":
        return zip_source(path), None
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", specs[0]):
        return hub_source(specs[0], revision)
    raise UsageError(f"--source {specs[0]} is neither a folder, a .zip, .parquet files, nor a hub dataset id "
                     f"(owner/name)")


def seeded_rows(total: int, num_images: int, seed: int) -> list[int]:
    """The rows of a seeded random subset, in source order.

    Rows are ranked by sha256(f"{seed}:{row}") and the first `num_images` kept: the same on every
    Python and library version, and a larger N keeps every row of a smaller one.
    """
    ranked = sorted(range(total), key=lambda row: hashlib.sha256(f"{seed}:{row}".encode()).digest())
    return sorted(ranked[:num_images])


def select(source, num_images: int, seed: int | None) -> Iterator[Entry]:
    """The entries to prepare: the first `num_images` in source order, or a seeded random subset."""
    if seed is None:
        return itertools.islice(source.entries(), num_images)
    if not source.complete:
        raise UsageError(f"a seeded subset needs every shard of {source.identity['id']}, and the HF cache holds "
                         f"only some; run once with the hub reachable, drop --seed, or pass --source")
    chosen = set(seeded_rows(source.count(), num_images, seed))
    last = max(chosen, default=-1)
    entries = itertools.takewhile(lambda entry: entry.row <= last, source.entries())
    return (entry for entry in entries if entry.row in chosen)


def to_png(data: bytes | None, resolution: int | None) -> bytes:
    """PNG bytes of one source image with EXIF orientation applied and, if asked, the shortest edge resized to
    `resolution` (bicubic).

    An upright PNG that needs no resize is returned as its own bytes, after a full decode proves it whole.
    """
    if not data:
        raise ValueError("no image bytes")
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object, which tells the user nothing
        raise ValueError(f"not an image in any format Pillow reads (it starts with {data[:8]!r})") from None
    with opened as image:
        image.load()
        upright = image.getexif().get(EXIF_ORIENTATION, 1) == 1
        if image.format == "PNG" and upright and resolution is None:
            return data
        image = ImageOps.exif_transpose(image)
    if image.mode not in PNG_MODES:
        image = image.convert("RGB")
    if resolution is not None:
        # The processor's rule, so --resolution 256 is lossless for DINOv2; imported here, not at the
        # top, because pyramid.decode loads torch and --help should not wait for it.
        from pyramid.decode import shortest_edge_size

        if image.mode in ("1", "P"):
            # Bicubic needs real channels: a palette or 1-bit image is expanded first.
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        size = shortest_edge_size(*image.size, resolution)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name in the same folder, so that a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path, writer_tag())
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_record(output_dir: Path, record: dict) -> None:
    """Refuse an `output_dir` whose record names another source or other options, or that holds files of unknown
    origin."""
    path = output_dir / RECORD
    if path.is_file():
        previous = json.loads(path.read_text())
        keys = ("source", "seed", "resolution")
        if any(previous.get(key) != record[key] for key in keys):
            was = ", ".join(f"{key}={json.dumps(previous.get(key))}" for key in keys)
            raise UsageError(f"{output_dir} already holds images prepared with {was} (see {path}); "
                             f"use another --output_dir, or delete it to start over")
        return
    if output_dir.is_dir() and any(p for p in output_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        raise UsageError(f"{output_dir} already holds files that pyramid.prepare did not write (no {RECORD}); "
                         f"use another --output_dir")


def prepare_entry(entry: Entry, output_dir: Path, resolution: int | None) -> str | None:
    """Decode, convert and write one entry; the error message if its source image is broken, else None."""
    try:
        png = to_png(entry.read(), resolution)
    except Exception as error:  # noqa: BLE001 - any decode failure of one image is that image's failure, not the run's
        return f"{type(error).__name__}: {error}"
    write_atomic(output_dir / entry.name, png)
    return None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        command_name("pyramid.prepare"),
        "Put an FFHQ or CelebA-HQ subset into a folder as lossless PNGs, ready for extract_distributed.py.")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ffhq",
                        help="picks the default hub source: " + ", ".join(f"{k} = {v}" for k, v in DATASETS.items()))
    parser.add_argument("--source", nargs="+", default=None,
                        help="overrides --dataset: a hub dataset id, a folder of images, a .zip of images, "
                             "or .parquet file(s) in the hub's image layout")
    parser.add_argument("--num_images", type=int, default=10000, help="how many images to keep")
    parser.add_argument("--seed", type=int, default=None,
                        help="take a seeded random subset instead of the first N in source order")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize so the shortest edge is this many pixels, bicubic (default: keep the source's)")
    parser.add_argument("--output_dir", default="data/raw_images", help="where the PNGs and prepare.json go")
    parser.add_argument("--num_workers", type=int, default=default_threads(),
                        help="threads that decode and encode images (default: %(default)s = min(8, the CPUs this "
                             "process may use))")
    return parser


@refusals_exit_2
def main(args) -> int:
    for option in ("num_images", "resolution", "num_workers"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option} must be a positive whole number, not {value}")
    output_dir = Path(args.output_dir)
    specs = args.source or [DATASETS[args.dataset]]
    record_path = output_dir / RECORD
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    # A rerun reads the hub commit the folder was started from, even if the dataset changed since.
    same_repo = previous.get("source", {}).get("id") == specs[0]
    source, revision = open_source(specs, previous.get("revision") if same_repo else None)
    if source.identity["kind"] == "folder" and output_dir.resolve().is_relative_to(source.identity["path"]):
        raise UsageError(f"--output_dir {output_dir} lies inside --source {specs[0]}; "
                         f"put the output elsewhere so a rerun sees the same source")
    record = {"source": source.identity, "seed": args.seed, "resolution": args.resolution}
    check_record(output_dir, record)
    record.update(revision=revision, num_images=args.num_images)
    write_atomic(output_dir / RECORD, (json.dumps(record, indent=2) + "\n").encode())
    remove_abandoned_temporaries(p for p in output_dir.rglob(".*") if is_temporary_name(p.name))

    counts = {"written": 0, "skipped": 0, "failed": 0}
    found = 0
    # A bar on a terminal, plain lines in a log (SLURM, nohup), as for the extractor.
    progress = Progress(args.num_images)

    def settle(entry: Entry, error: str | None) -> None:
        if error is None:
            counts["written"] += 1
        else:
            counts["failed"] += 1
            log(f"failed: {entry.label}: {error}", progress)
        progress.update(sum(counts.values()))

    # Bytes are read here, in order (zip and parquet readers are not shared across threads);
    # decoding and PNG encoding, the slow part, run in the pool.
    with ThreadPoolExecutor(args.num_workers) as pool:
        pending = deque()
        for entry in select(source, args.num_images, args.seed):
            found += 1
            if (output_dir / entry.name).exists():
                counts["skipped"] += 1
                progress.update(sum(counts.values()))
                continue
            pending.append((entry, pool.submit(prepare_entry, entry, output_dir, args.resolution)))
            while len(pending) > 2 * args.num_workers:
                done, future = pending.popleft()
                settle(done, future.result())
        for entry, future in pending:
            settle(entry, future.result())
    progress.close()

    where = " ".join(specs) + (f"@{revision[:12]}" if revision else "")
    print(f"prepare: {counts['written']} written, {counts['skipped']} skipped (already there), "
          f"{counts['failed']} failed -> {output_dir} from {where}")
    if found < args.num_images:
        if not source.complete:
            raise UsageError(f"the HF cache holds only {found} images of {specs[0]}, fewer than --num_images "
                             f"{args.num_images}; run once with the hub reachable, or pass --source")
        print(f"note: the source holds only {found} images, fewer than --num_images {args.num_images}")
    return 3 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
