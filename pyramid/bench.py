"""Throughput side by side: decode, model and write bounds, and the real job end to end.

On the same images, device, dtype and batch size; with --baseline also the straightforward version
that the peers ship; with --table the whole GPU table (docs/gpu.md).

    python -m pyramid.bench --model facebook/dinov2-base --input_dir data/raw_images --limit 256
    python -m pyramid.bench --random base --synthetic 64 --baseline     # no weights, no data needed
    python -m pyramid.bench --reader --synthetic_tree 2000              # the training-side readers
    python -m pyramid.bench --table                                      # the GPU table (docs/gpu.md)
    python -m pyramid.bench --models                                     # the model bound of each encoder
    python -m pyramid.bench --save_random_model models/random-base       # a --model for offline trials
"""

import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pyramid import exits, random_models
from pyramid.cli import LazyModule, argument_parser, command_name, refusals_exit_2
from pyramid.exits import UsageError
from pyramid.levels import build_pyramid, pyramid_sizes, split_pyramids, strip_special_tokens
from pyramid.paths import find_images
from pyramid.plan import default_batch_size, default_num_workers, shared_memory_needed, shared_memory_warning
from pyramid.prepare import to_png
from pyramid.random_models import RANDOM_SIZES
from pyramid.team import usable_cpus, usable_memory
from pyramid.writer import SERIALISERS, Writer, checked_layout, default_writer_threads

# Loaded by the first measurement, so --help and bad arguments answer at once.
np = LazyModule("numpy")
torch = LazyModule("torch")

# The end-to-end child: a run that has not ended after this long is killed (the extractor's own
# --stall_timeout ends a stuck one long before), and its pipes read for this long once it has ended.
CHILD_TIMEOUT = 6 * 3600
PIPE_DRAIN_SECONDS = 10.0

# Shipped in the package (pyproject's package-data), so the bench runs from an installed wheel too.
PHOTO = Path(__file__).resolve().parent / "data" / "astronaut.png"

def write_synthetic_faces(directory, count, side=1024, seed=0):
    """`count` real-looking side x side PNGs: the bundled face photograph, resized, flipped, rotated
    and recoloured at random. Real photographs compress (and decode) unlike noise does."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    photo = Image.open(PHOTO).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else photo
        image = ImageEnhance.Color(image).enhance(0.5 + rng.random())
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = image.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BICUBIC, fillcolor=fill)
        image.save(directory / f"{i:05d}.png")
    return directory


def measure_decode(input_dir, names, preprocess, batch_size, num_workers):
    """Images/s of reading + preprocessing alone, through the run's own Dataset and DataLoader."""
    from pyramid.decode import image_loader

    loader = image_loader(input_dir, names, preprocess, batch_size, num_workers)
    started = time.perf_counter()
    count = sum(len(indices) for indices, _, _ in loader)
    return count / (time.perf_counter() - started)


def measure_model(encoder, batch_size, count):
    """Images/s of the forward pass and pooling alone, on ready uint8 batches already on the device."""

    side = encoder.info.crop_size
    shape = (batch_size, 3, side, side)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, device=encoder.device) if encoder.info.pixel_bytes == 1 \
        else torch.rand(shape, device=encoder.device)  # DINOv3's pixels: floats in [0, 1]

    def step():
        return build_pyramid(encoder(pixels), encoder.info.grid_size)

    next(iter(step().values())).sum().item()  # warm-up: allocator, kernels, lazy initialisation
    batches = max(2, math.ceil(count / batch_size))
    started = time.perf_counter()
    for _ in range(batches):
        levels = step()
    # One wait at the end: the device runs the batches back to back, as in the run, with no host
    # round trip between them.
    next(iter(levels.values())).sum().item()
    return batches * batch_size / (time.perf_counter() - started)


def measure_write(output_dir, hidden_size, grid_size, batch_size, count, threads, serialise="layout", sync=False):
    """Files/s and MB/s of the run's Writer alone: ready CPU fp32 batches split into files on the disk
    of `output_dir` (in a temporary directory inside it, removed after). With `sync` the clock stops
    only once the files are on the disk (os.sync): the disk's pace, not the page cache's. Returns
    (files/s, MB/s, the serialiser the files were made by: "layout" or "torch.save")."""

    levels = build_pyramid(torch.randn(batch_size, grid_size * grid_size, hidden_size), grid_size)
    directory = Path(tempfile.mkdtemp(prefix="pyramid-write-bound-", dir=output_dir))
    try:
        writer = Writer(directory, threads=threads, serialise=serialise)
        batches = max(1, math.ceil(count / batch_size))
        started = time.perf_counter()
        for batch in range(batches):
            writer.submit_batch([f"{batch * batch_size + i:06d}.pt" for i in range(batch_size)], levels)
        writer.close()
        if sync:
            os.sync()
        seconds = time.perf_counter() - started
        file_bytes = (directory / "000000.pt").stat().st_size
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    files = batches * batch_size
    by_layout = writer.layouts and all(layout is not None for layout in writer.layouts.values())
    used = "layout" if by_layout else "torch.save"
    return files / seconds, files * file_bytes / seconds / 1e6, used


def measure_writer_gil(output_dir, hidden_size, grid_size, batch_size, serialise, rounds=5):
    """Milliseconds per file for which one writer thread keeps the other Python threads (the run loop) from
    running: a thread beside it wants the GIL all the time, and the time it spends blocked (neither running
    nor waiting for a core: /proc's schedstat tells those apart, so other jobs on the machine do not count)
    while the writer writes `batch_size` files, less what it spends blocked while the writer idles, is the
    writer's GIL. The median of `rounds`; None where /proc has no schedstat."""

    levels = build_pyramid(torch.randn(batch_size, grid_size * grid_size, hidden_size), grid_size)
    directory = Path(tempfile.mkdtemp(prefix="pyramid-write-gil-", dir=output_dir))
    stop, ident = threading.Event(), []

    def want_the_gil():
        ident.append(threading.get_native_id())
        while not stop.is_set():
            pass

    def blocked_during(work):
        """Seconds the GIL-wanting thread was blocked while `work()` ran, and the seconds it ran."""
        schedstat = Path(f"/proc/self/task/{ident[0]}/schedstat")
        on_cpu, waiting = map(int, schedstat.read_text().split()[:2])
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        on_cpu_after, waiting_after = map(int, schedstat.read_text().split()[:2])
        return seconds - (on_cpu_after - on_cpu + waiting_after - waiting) / 1e9, seconds

    wanting = threading.Thread(target=want_the_gil, daemon=True)
    wanting.start()
    held = []
    try:
        while not ident:
            time.sleep(0.001)
        if not Path(f"/proc/self/task/{ident[0]}/schedstat").exists():
            return None
        for number in range(rounds + 1):  # the first round makes the layout and warms the page cache
            idle_blocked, idle_seconds = blocked_during(lambda: time.sleep(0.05))
            writer = Writer(directory / str(number), threads=1, serialise=serialise)

            def write(writer=writer):
                writer.submit_batch([f"{i:06d}.pt" for i in range(batch_size)], levels)
                writer.close()

            blocked, seconds = blocked_during(write)
            if number:
                held.append(max(0.0, blocked - idle_blocked / idle_seconds * seconds) / batch_size * 1e3)
    finally:
        stop.set()
        wanting.join()
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    return statistics.median(held)


def write_levers(output_dir, hidden_size, grid_size, batch_size, count, thread_counts, rounds=1):
    """The write bound per serialiser (the run's ArchiveLayout, and torch.save as before it) and writer thread
    count, and the GIL each serialiser holds per file, in `rounds` interleaved rounds (medians)::

        {"files_per_second": {"layout": {"1": ..., "2": ...}, "torch.save": {...}},
         "gil_ms_per_file": {"layout": ..., "torch.save": ...}, "serialiser": "layout", "regime": "page cache"}
    """

    rates = {serialise: {str(threads): [] for threads in thread_counts} for serialise in SERIALISERS}
    gil = {serialise: [] for serialise in SERIALISERS}
    used = set()
    for _ in range(rounds):
        for serialise in SERIALISERS:
            for threads in thread_counts:
                rate, megabytes, made_by = measure_write(output_dir, hidden_size, grid_size, batch_size, count,
                                                         threads, serialise)
                rates[serialise][str(threads)].append(rate)
                if serialise == "layout":
                    used.add(made_by)
            gil[serialise].append(measure_writer_gil(output_dir, hidden_size, grid_size, batch_size, serialise,
                                                     rounds=3))
    file_bytes = megabytes / rate * 1e6
    return {"files_per_second": {serialise: {threads: statistics.median(values) for threads, values in per.items()}
                                 for serialise, per in rates.items()},
            "gil_ms_per_file": {serialise: None if None in values else statistics.median(values)
                                for serialise, values in gil.items()},
            "serialiser": "layout" if used == {"layout"} else "torch.save",
            "regime": write_regime(output_dir, count * file_bytes), "files": count, "rounds": rounds}


def write_regime(directory, written_bytes):
    """Where `written_bytes` written into `directory` went: "memory (tmpfs)"; "page cache" while they
    stay under the kernel's dirty limits (no writer waited for the disk); else "disk" (past them the
    kernel holds writers to the disk's pace)."""
    if _filesystem_type(directory) in ("tmpfs", "ramfs"):
        return "memory (tmpfs)"
    limit = dirty_limit_bytes()
    return "page cache" if limit is None or written_bytes < limit else "disk"


def dirty_limit_bytes():
    """The dirty page cache (bytes) a writer may fill before Linux slows it to the disk's pace: halfway
    between the background and the hard dirty thresholds, of the memory available to this process (within
    its cgroups' limits, as the kernel counts them per cgroup); None off Linux."""
    try:
        settings = {name: int(Path(f"/proc/sys/vm/{name}").read_text()) for name in
                    ("dirty_bytes", "dirty_ratio", "dirty_background_bytes", "dirty_background_ratio")}
    except (OSError, ValueError):
        return None
    available = usable_memory()
    if available is None:
        return None
    hard = settings["dirty_bytes"] or available * settings["dirty_ratio"] // 100
    background = settings["dirty_background_bytes"] or available * settings["dirty_background_ratio"] // 100
    return (hard + background) // 2


def _filesystem_type(directory):
    """The type of the filesystem `directory` is on, from /proc/mounts ("ext4", "tmpfs", ...); None if unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = os.path.realpath(directory)
    best = max((point for point in mounts if path == point[0] or path.startswith(point[0].rstrip("/") + "/")),
               key=lambda point: len(point[0]), default=None)
    return best[1] if best else None


def measure_end_to_end(model, input_dir, limit, batch_size, num_workers, dtype, output_parent=None,
                       extra_args=()):
    """The real job, `python -m pyramid.extract` of this very package, into a temporary directory (inside
    `output_parent` where given).

    Returns (images/s while encoding, as its summary line reports, peak RSS of its main process in MiB,
    the output directory). The caller removes the directory.
    """
    output_dir = tempfile.mkdtemp(prefix="pyramid-bench-", dir=output_parent)
    command = [sys.executable, "-m", "pyramid.extract", "--input_dir", str(input_dir),
               "--output_dir", output_dir, "--model", str(model), "--batch_size", str(batch_size),
               "--num_workers", str(num_workers), "--dtype", dtype, "--limit", str(limit), *extra_args]
    # The folder this package was imported from comes first on the child's path: an installed wheel, or a
    # checkout run from anywhere, measures its own extractor.
    package_parent = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    status, usage, _, stderr = run_child(command, dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=python_path))
    match = re.search(r"^done: .*?([\d.]+) images/s while encoding", stderr, re.MULTILINE)
    if status != 0 or match is None:
        raise RuntimeError(f"the end-to-end run failed (exit {status}):\n{stderr}")
    return float(match.group(1)), usage.ru_maxrss / 1024, Path(output_dir)


def run_child(command, env=None, timeout=CHILD_TIMEOUT):
    """Run `command` to its end: (exit status, its resource usage from wait4, stdout, stderr).

    Both pipes are read while it runs, on threads: a child that writes more than a pipe holds (64 KiB:
    one `failed:` line per broken image) would otherwise wait for ever for a reader. One that runs past
    `timeout` seconds is killed and raised as a RuntimeError with the end of its stderr.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    outputs = {process.stdout: [], process.stderr: []}
    readers = [threading.Thread(target=_drain, args=(pipe, chunks), daemon=True) for pipe, chunks in outputs.items()]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    while pid == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid == 0:
        process.kill()
        _, status, usage = os.wait4(process.pid, 0)  # SIGKILL: it ends at once
    process.returncode = os.waitstatus_to_exitcode(status)
    # The pipes end with the child, unless a process it started (a DataLoader worker) still holds them.
    deadline = time.monotonic() + PIPE_DRAIN_SECONDS
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
    stdout, stderr = (b"".join(list(chunks)).decode(errors="replace") for chunks in outputs.values())
    if pid == 0:
        raise RuntimeError(f"{command[0]} {' '.join(command[1:3])} ran past {timeout:g} s and was killed; the end of "
                           f"its stderr:\n{stderr[-4000:]}")
    return process.returncode, usage, stdout, stderr


def _drain(pipe, chunks):
    """Read `pipe` into `chunks` until every writer has closed it, then close it (here: never while
    this thread may still read its descriptor, which could by then name another file)."""
    with pipe:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            chunks.append(chunk)


def flip_figures(model, input_dir, limit, batch_size, num_workers, dtype, end_to_end):
    """End to end with --flip on the same images: images/s, and its ratio to the plain run. The decode is
    shared and the model runs on the doubled batch, so on a GPU the ratio is the model's share of the time."""
    rate, _, output_dir = measure_end_to_end(model, input_dir, limit, batch_size, num_workers, dtype,
                                             extra_args=("--flip",))
    subprocess.run(["rm", "-rf", str(output_dir)], check=False)
    return {"end_to_end_flip": rate, "flip_over_plain": rate / end_to_end}


def straightforward_extract(model_name, input_dir, names, output_dir, batch_size, device, dtype):
    """The version most extraction scripts ship: one process, Pillow decode and the image processor
    in the main loop, torch.save inline. Returns images/s (model loading excluded)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from pyramid.encoder import DTYPES

    processor = AutoImageProcessor.from_pretrained(model_name)
    model = AutoModel.from_pretrained(model_name, dtype=DTYPES[dtype]).to(device).eval()
    registers = getattr(model.config, "num_register_tokens", 0)
    started = time.perf_counter()
    for start in range(0, len(names), batch_size):
        batch = names[start:start + batch_size]
        images = [Image.open(Path(input_dir) / name).convert("RGB") for name in batch]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, DTYPES[dtype])
        with torch.no_grad():
            hidden = model(pixel_values=pixels).last_hidden_state
        patches = strip_special_tokens(hidden, registers).float()
        grid_size = pixels.shape[-1] // model.config.patch_size  # DINOv2's crop, DINOv3's resize
        for name, pyramid in zip(batch, split_pyramids({k: v.cpu() for k, v in
                                                        build_pyramid(patches, grid_size).items()})):
            torch.save(pyramid, Path(output_dir) / Path(name).with_suffix(".pt"))
    return len(names) / (time.perf_counter() - started)


def min_cosine(dir_a, dir_b, names):
    """The smallest cosine similarity, over images, levels and patch vectors, between two output trees."""
    lowest = 1.0
    for name in names:
        a = torch.load(Path(dir_a) / Path(name).with_suffix(".pt"), weights_only=True)
        b = torch.load(Path(dir_b) / Path(name).with_suffix(".pt"), weights_only=True)
        for key in a:
            lowest = min(lowest, torch.nn.functional.cosine_similarity(a[key], b[key], dim=-1).min().item())
    return lowest


def add_reader_arguments(parser):
    group = parser.add_argument_group("reader figures (--reader): how fast training reads an output tree")
    group.add_argument("--reader", action="store_true", help="measure the readers instead of the extraction")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--tree", type=Path, help="an output tree to read (a pack is built in it if it has none)")
    source.add_argument("--synthetic_tree", type=int, metavar="N", help="make N base-size pyramids (D=768) to read")
    group.add_argument("--reader_items", type=int, default=1000, help="items read per row and round")
    group.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")


def get_args_parser():
    parser = argument_parser(command_name("pyramid.bench"), __doc__)
    source = parser.add_mutually_exclusive_group()  # one of them is required, unless --reader
    source.add_argument("--model", help="hub id or save_pretrained directory, as for extract_distributed.py")
    source.add_argument("--random", choices=sorted(RANDOM_SIZES),
                        help="a random-weight model of this size (no download): the speed is the same")
    parser.add_argument("--family", choices=("dinov2", "dinov3"), default="dinov2",
                        help="the family of --random and --save_random_model (dinov3 needs torchvision to run)")
    images = parser.add_mutually_exclusive_group()  # one of them is required, unless --reader
    images.add_argument("--input_dir", help="images to measure on")
    images.add_argument("--synthetic", type=int, metavar="N", help="make N real-looking 1024x1024 PNGs")
    parser.add_argument("--limit", type=int, default=256, help="measure on the first N images")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per forward pass (default: as extract_distributed.py, 64 on GPU, 16 on CPU)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decode workers (default: as extract_distributed.py, the cores this process may use; "
                             "on GPU one less, at most 16)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="the dtype the model computes in, as extract_distributed.py")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the straightforward version and compare speed and values")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--flip", action="store_true", help="also run end to end with --flip: what the twins cost")
    add_reader_arguments(parser)
    parser.add_argument("--output_dir", default=None,
                        help="a directory on the disk the run will write to: the write bound and the end-to-end "
                             "run write there (in temporary directories they remove); none: the system's temp "
                             "directory")
    parser.add_argument("--write_threads", type=int, nargs="+", default=None, metavar="N",
                        help="also measure the write bound with each of these writer thread counts")
    table = parser.add_argument_group("the GPU table (--table): no data and no weights needed")
    table.add_argument("--table", action="store_true",
                       help="decode, model, write and end-to-end images/s and fp16-vs-fp32 fidelity for 1024x1024 "
                            "and 256x256 PNG inputs at several batch sizes, as a markdown table (--random base "
                            "unless --model or --random says otherwise)")
    table.add_argument("--batch_sizes", type=int, nargs="+", default=None, metavar="B",
                       help="batch sizes of the table [64 256 on GPU, 16 on CPU]")
    table.add_argument("--quick", action="store_true", help="a few images only: a check that the table runs")
    table.add_argument("--save", default=None, metavar="FILE.json", help="also write the table's figures here")
    table.add_argument("--preflight", action="store_true",
                       help="only say what a run here would use (device, driver, libraries, processor, PNG decoder, "
                            "attention kernel, how files are made, compiler, /dev/shm, disk), in a few lines")
    table.add_argument("--models", action="store_true",
                       help="only the model bound of each encoder and resolution (random weights at real sizes: "
                            "dinov2-small, -base, -large and dinov3-base at 224, dinov2-base at 448), as a markdown "
                            "table [batch 64 on GPU, 4 on CPU]")
    table.add_argument("--compile", action="store_true",
                       help="also measure the model bound with --compile (torch.compile; a minute of compiling)")
    parser.add_argument("--save_random_model", type=Path, default=None, metavar="DIR",
                        help="measure nothing: save a random-weight DINOv2 of --random's size (default base) to DIR "
                             "in save_pretrained layout, with the real dinov2 preprocessor config, for trying the "
                             "tools without the hub (--model DIR)")
    return parser


def check_args(args):
    """The checks that need nothing heavy; raises UsageError in one sentence."""
    if args.output_dir is not None and not Path(args.output_dir).is_dir():
        raise UsageError(f"--output_dir {args.output_dir} does not exist")
    if args.models and (args.model or args.random or args.input_dir or args.synthetic is not None):
        raise UsageError("--models measures random models of each real size on ready batches; drop --model, "
                         "--random, --input_dir and --synthetic")
    if args.table or args.preflight or args.models:
        if args.input_dir is not None or args.synthetic is not None:
            raise UsageError("--table makes its own 1024x1024 and 256x256 inputs; drop --input_dir / --synthetic")
        return
    if args.model is None and args.random is None:
        raise UsageError("one of --model or --random is required")
    if args.input_dir is None and args.synthetic is None:
        raise UsageError("one of --input_dir or --synthetic is required")
    if args.input_dir is not None and not Path(args.input_dir).is_dir():
        raise UsageError(f"--input_dir {args.input_dir} does not exist")


def ideal_rate(model_rate, decode_rate, device, write_rate=None):
    """What a perfect pipeline would reach: on a GPU decoding, the model and writing overlap, so the
    slowest sets the pace; on a CPU the model and decoding share the same cores, so their times add
    up (writing, a small share there, is left out: the ideal stays the stricter one)."""
    if device.type == "cuda":
        return min(model_rate, decode_rate, write_rate or math.inf)
    return 1 / (1 / model_rate + 1 / decode_rate)


def save_random_model(args):
    """--save_random_model DIR: the model, a line saying what it is, exit 0; or a refusal, exit 2."""
    directory = args.save_random_model
    if args.model is not None:
        raise UsageError("--save_random_model makes a random model; give its size with --random, not --model")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"--save_random_model {directory} exists and is not an empty directory; name a new one")
    size = args.random or "base"
    hidden_size, layers, heads = RANDOM_SIZES[size]
    random_models.save_random_model(directory, args.family, size)
    print(f"saved a random-weight {FAMILY_NAMES[args.family]} ({size}: hidden size {hidden_size}, {layers} layers, "
          f"{heads} heads) to {directory}; pass --model {directory} to the tools (its features are noise: for "
          f"trials, not training)")
    return exits.OK


@refusals_exit_2
def main(args):
    if args.save_random_model is not None:
        return save_random_model(args)
    if args.reader:
        from pyramid.readbench import reader_main

        return reader_main(args)
    check_args(args)
    if args.preflight:
        return run_preflight(args)
    if args.models:
        return run_models(args)
    if args.table:
        return run_table(args)
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, load_model_info

    with tempfile.TemporaryDirectory(prefix="pyramid-bench-") as scratch:
        model = args.model or random_models.save_random_model(Path(scratch) / f"random-{args.random}", args.family,
                                                              args.random)
        input_dir = args.input_dir or write_synthetic_faces(Path(scratch) / "images", args.synthetic)
        names = find_images(input_dir)[:args.limit]
        if not names:
            raise UsageError(f"no images under {input_dir}")
        device, dtype, batch_size, num_workers = run_settings(args)
        info, processor = load_model_info(model)
        preprocess = Preprocess(processor)
        threads = default_writer_threads()
        figures = {"images": len(names), "device": str(device), "device_name": device_name(device),
                   "dtype": dtype, "batch_size": batch_size, "num_workers": num_workers, "write_threads": threads,
                   "model": str(args.model or f"random {args.random}")}

        figures["decode_bound"] = measure_decode(input_dir, names, preprocess, batch_size, num_workers)
        encoder = Encoder(info, preprocess.normaliser(device), device, dtype)
        figures["model_bound"] = measure_model(encoder, batch_size, len(names))
        del encoder
        write_dir = args.output_dir or scratch
        write_count = max(len(names), 4 * batch_size)
        figures["write_bound"], figures["write_bound_mb"], figures["serialiser"] = measure_write(
            write_dir, info.hidden_size, info.grid_size, batch_size, write_count, threads)
        figures["write_regime"] = write_regime(write_dir, write_count * figures["write_bound_mb"] * 1e6
                                               / figures["write_bound"])
        if args.write_threads:
            figures["write_levers"] = write_levers(write_dir, info.hidden_size, info.grid_size, batch_size,
                                                   write_count, args.write_threads, args.rounds)
        end_to_end, peak_rss, output_dir = measure_end_to_end(model, input_dir, len(names), batch_size,
                                                              num_workers, dtype, args.output_dir)
        figures["end_to_end"], figures["peak_rss_mib"] = end_to_end, peak_rss
        figures["ideal"] = ideal_rate(figures["model_bound"], figures["decode_bound"], device, figures["write_bound"])
        if args.flip:
            figures.update(flip_figures(model, input_dir, len(names), batch_size, num_workers, dtype, end_to_end))
        for name in ("decode_bound", "model_bound", "write_bound", "ideal"):
            figures[f"end_to_end_over_{name}"] = end_to_end / figures[name]
        if args.baseline:
            baseline_dir = Path(scratch) / "baseline"
            baseline_dir.mkdir()
            figures["baseline"] = straightforward_extract(model, input_dir, names, baseline_dir, batch_size,
                                                          device, dtype)
            figures["end_to_end_over_baseline"] = end_to_end / figures["baseline"]
            figures["min_cosine_vs_baseline"] = min_cosine(output_dir, baseline_dir, names)
        subprocess.run(["rm", "-rf", str(output_dir)], check=False)

    print(json.dumps(figures, indent=2) if args.json else format_table(figures))
    return exits.OK


# The table's inputs: (label, side); 256 is what `prepare --resolution 256` makes of a 1024x1024 image.
TABLE_INPUTS = (("1024x1024 PNG", 1024), ("256x256 PNG", 256))
# Images per input in the table: seconds of steady state on one GPU (1024x1024 decodes at ~500/s on 16 cores,
# 256x256 at several thousand), within the report's time (docs/gpu.md) and ~14 GB of disk at the most
# (the 256x256 run's 1 MB files, removed after each row); --quick: a check that it runs.
TABLE_IMAGES = {"cuda": {1024: 3072, 256: 12288}, "cpu": {1024: 64, 256: 128}, "quick": {1024: 8, 256: 16}}
TABLE_UNIQUE = {"full": 32, "quick": 2}
# The write figures of the table: files per write bound, and those written then synced for the disk's pace.
TABLE_WRITES = {"cuda": (3072, 1024), "cpu": (256, 128), "quick": (64, 32)}
TABLE_WRITE_THREADS = (1, 2, 4)


def write_table_inputs(directory, side, count, unique, seed=0):
    """`count` PNGs in `directory`: `unique` synthetic faces at 1024x1024, brought to `side` by
    prepare's own resize (shortest edge, bicubic), then hard-linked (copied where links fail)
    under new names up to `count`. Decoding a link costs what decoding a distinct file costs."""

    sources = write_synthetic_faces(Path(directory).with_name(Path(directory).name + "-unique"), unique, seed=seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    originals = []
    for i, source in enumerate(sorted(sources.iterdir())):
        target = directory / f"{i:05d}.png"
        data = source.read_bytes()
        target.write_bytes(data if side == 1024 else to_png(data, side))
        originals.append(target)
    for i in range(unique, count):
        target = directory / f"{i:05d}.png"
        try:
            os.link(originals[i % unique], target)
        except OSError:
            target.write_bytes(originals[i % unique].read_bytes())
    return directory


def measure_fidelity(info, preprocess, input_dir, names, device, dtypes=("fp16", "bf16")):
    """Per dtype and level, the smallest cosine similarity over images and patch vectors between the
    pyramid computed in that dtype and the one computed in fp32, on the same pixels, on `device`.

    {"fp16": {"16x16": 0.99999, ...}, ...}; a dtype the device cannot compute in is left out."""
    from pyramid.decode import load_rgb
    from pyramid.encoder import Encoder

    pixels = torch.stack([preprocess(load_rgb(Path(input_dir) / name)) for name in names])  # (N, 3, H, W) uint8
    pyramids = {}
    for dtype in ("fp32", *dtypes):
        try:
            encoder = Encoder(info, preprocess.normaliser(device), device, dtype)
            pyramids[dtype] = {key: value.cpu() for key, value in
                               build_pyramid(encoder(pixels), info.grid_size).items()}  # {"16x16": (N, 256, D)}
        except RuntimeError:  # e.g. bf16 on a GPU without it
            continue
        finally:
            encoder = None
    return {dtype: {key: torch.nn.functional.cosine_similarity(pyramid[key], pyramids["fp32"][key],
                                                               dim=-1).min().item()
                    for key in pyramid}
            for dtype, pyramid in pyramids.items() if dtype != "fp32"}


def run_settings(args):
    """(device, dtype, batch size, decode workers) of a run here with `args`: the extractor's own choices
    (pyramid.plan, pyramid.encoder) where the command line leaves them out."""
    from pyramid.encoder import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return (device, resolve_dtype(args.dtype, device), args.batch_size or default_batch_size(device),
            default_num_workers(device) if args.num_workers is None else args.num_workers)


def bound_name(rates):
    """The name of the smallest of {"decode": ..., "model": ..., "write": ...}."""
    return min(rates, key=rates.get)


def run_table(args):
    """The GPU table: every bound and the end-to-end run per input size and batch size, the write levers
    (serialiser, threads, page cache or disk) and, with --compile, the compiled model bound; one command."""
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, attention_kernel, load_model_info

    device, dtype, _, num_workers = run_settings(args)  # the table's batch sizes: --batch_sizes
    size = "quick" if args.quick else device.type if device.type in TABLE_IMAGES else "cpu"
    counts = TABLE_IMAGES[size]
    write_count, sync_count = TABLE_WRITES[size]
    batch_sizes = args.batch_sizes or ([64, 256] if device.type == "cuda" else [16])
    threads = default_writer_threads()
    with tempfile.TemporaryDirectory(prefix="pyramid-table-") as scratch:
        scratch = Path(scratch)
        random_size = args.random or ("base" if args.model is None else None)
        model = args.model or random_models.save_random_model(scratch / f"random-{random_size}", args.family,
                                                              random_size)
        info, processor = load_model_info(model)
        preprocess = Preprocess(processor)
        write_dir = args.output_dir or scratch
        problem = disk_shortfall(write_dir, counts[256] * pyramid_file_bytes(info))
        if problem:
            raise UsageError(problem)
        figures = {"device": str(device), "device_name": device_name(device), "cpus": usable_cpus(),
                   "model": str(args.model or f"random {random_size}"), "dtype": dtype,
                   "num_workers": num_workers, "write_threads": threads, "write_dir": str(write_dir),
                   "dirty_limit_gb": (dirty_limit_bytes() or 0) / 1e9, "rows": []}

        encoder = Encoder(info, preprocess.normaliser(device), device, dtype)
        figures["attention"] = attention_kernel(encoder, batch_sizes[0])
        model_bounds = {batch: measure_model(encoder, batch, max(counts.values()) // 2) for batch in batch_sizes}
        encoder = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the end-to-end runs are other processes: leave them the GPU's memory
        write_bounds = {batch: measure_write(write_dir, info.hidden_size, info.grid_size, batch,
                                             max(write_count, 2 * batch), threads) for batch in batch_sizes}
        figures["serialiser"] = write_bounds[batch_sizes[0]][2]
        figures["write"] = write_levers(write_dir, info.hidden_size, info.grid_size, batch_sizes[0], write_count,
                                        TABLE_WRITE_THREADS)
        disk_rate, disk_mb, _ = measure_write(write_dir, info.hidden_size, info.grid_size, batch_sizes[0],
                                              sync_count, threads, sync=True)
        figures["write"].update(disk_files_per_second=disk_rate, disk_mb_per_second=disk_mb, disk_files=sync_count)
        inputs = {side: write_table_inputs(scratch / f"in{side}", side, counts[side],
                                           TABLE_UNIQUE["quick" if args.quick else "full"])
                  for _, side in TABLE_INPUTS}
        for label, side in TABLE_INPUTS:
            names = find_images(inputs[side])
            for batch in batch_sizes:
                decode = measure_decode(inputs[side], names, preprocess, batch, num_workers)
                end_to_end, peak_rss, output_dir = measure_end_to_end(model, inputs[side], len(names), batch,
                                                                      num_workers, dtype, args.output_dir)
                written = sum(path.stat().st_size for path in output_dir.rglob("*.pt"))
                subprocess.run(["rm", "-rf", str(output_dir)], check=False)
                rates = {"decode": decode, "model": model_bounds[batch], "write": write_bounds[batch][0]}
                ideal = ideal_rate(rates["model"], rates["decode"], device, rates["write"])
                figures["rows"].append({
                    "input": label, "batch_size": batch, "images": len(names), "decode_bound": decode,
                    "model_bound": rates["model"], "write_bound": rates["write"],
                    "write_bound_mb": write_bounds[batch][1], "ideal": ideal, "end_to_end": end_to_end,
                    "end_to_end_over_ideal": end_to_end / ideal, "bound": bound_name(rates),
                    "peak_rss_mib": peak_rss, "files_went_to": write_regime(output_dir.parent, written)})
                # Each row as it comes: a run cut short by a time limit still leaves what it measured.
                print(f"measured: {label}, batch {batch}: end to end {end_to_end:.1f} images/s, "
                      f"{end_to_end / ideal:.2f} of ideal, {bound_name(rates)}-bound", file=sys.stderr, flush=True)
                if args.save:
                    Path(args.save).write_text(json.dumps(figures, indent=2) + "\n")
        # 64 images on a GPU; a few on a CPU, where fp16 is slow.
        fidelity_count = 4 if args.quick else 64 if device.type == "cuda" else 8
        fidelity_names = find_images(inputs[256])[:fidelity_count]
        figures["fidelity"] = measure_fidelity(info, preprocess, inputs[256], fidelity_names, device)
        figures["fidelity_images"] = len(fidelity_names)
        if args.save:
            Path(args.save).write_text(json.dumps(figures, indent=2) + "\n")
        if not args.json:  # the table now: compiling (last, a minute or more) may run past a time limit
            print(format_markdown_table(figures), flush=True)
        if args.compile:
            figures["compiled"] = measure_compiled(info, preprocess, device, dtype, batch_sizes[0],
                                                   max(counts.values()) // 2, model_bounds[batch_sizes[0]])
            if not args.json:
                print("\n" + compiled_line(figures["compiled"]))

    if args.save:
        Path(args.save).write_text(json.dumps(figures, indent=2) + "\n")
    if args.json:
        print(json.dumps(figures, indent=2))
    return exits.OK


FAMILY_NAMES = {"dinov2": "DINOv2", "dinov3": "DINOv3"}
# The model-bound rows (--models): (family, size, resolution), random weights at the real sizes.
MODEL_ROWS = (("dinov2", "small", 224), ("dinov2", "base", 224), ("dinov2", "large", 224), ("dinov3", "base", 224),
              ("dinov2", "base", 448))


def measure_model_rows(device, dtype, batch_size, count, scratch, rows=MODEL_ROWS):
    """Images/s of the forward pass and pooling on ready batches, for each (family, size, resolution) of `rows`:
    [{"model": "dinov2-base", "resolution": 224, "grid": 16, "model_bound": ...}, ...]. A row whose model
    cannot load here (DINOv3 without torchvision) says why instead."""
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, ModelError, load_model_info

    figures = []
    for family, size, resolution in rows:
        row = {"model": f"{family}-{size}", "resolution": resolution}
        directory = Path(scratch) / row["model"]
        if not directory.exists():
            random_models.save_random_model(directory, family, size)
        try:
            info, processor = load_model_info(directory, resolution)
        except ModelError as error:
            figures.append({**row, "skipped": str(error)})
            continue
        encoder = Encoder(info, Preprocess(processor).normaliser(device), device, dtype)
        row.update(grid=info.grid_size, levels=len(pyramid_sizes(info.grid_size)),
                   model_bound=measure_model(encoder, batch_size, count))
        figures.append(row)
        encoder = None
        print(f"measured: {row['model']} at {resolution}: {row['model_bound']:.1f} images/s", file=sys.stderr,
              flush=True)
    return figures


def run_models(args):
    """--models: the model bound of each encoder and resolution here, as a markdown table (and --save/--json)."""
    device, dtype, batch_size, _ = run_settings(args)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 4)  # per image, a CPU is as fast at 4
    batches = 2 if args.quick or device.type != "cuda" else 8
    with tempfile.TemporaryDirectory(prefix="pyramid-models-") as scratch:
        figures = {"device": str(device), "device_name": device_name(device), "dtype": dtype,
                   "batch_size": batch_size, "images": batches * batch_size,
                   "rows": measure_model_rows(device, dtype, batch_size, batches * batch_size, scratch)}
    if args.save:
        Path(args.save).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2) if args.json else format_models_table(figures))
    return exits.OK


def format_models_table(figures):
    """--models' figures as markdown: one row per encoder and resolution."""
    lines = [f"Model bound: random weights at real sizes in {figures['dtype']} on {figures['device_name']}, batch "
             f"{figures['batch_size']}, {figures['images']} images a row; images/s of the forward pass and pooling "
             f"on ready batches", "", "| model | resolution | levels | model bound |", "|---|---|---|---|"]
    for row in figures["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['resolution']} | | not measured: {row['skipped']} |")
            continue
        sizes = pyramid_sizes(row["grid"])
        lines.append(f"| {row['model']} | {row['resolution']} | {sizes[0]}x{sizes[0]} .. {sizes[-1]}x{sizes[-1]} "
                     f"({row['levels']}) | {row['model_bound']:.3g} |")
    return "\n".join(lines)


def compiled_line(compiled):
    """The table's line on --compile: the compiled model bound against eager, or why it could not compile."""
    return compiled.get("failure") or (
        f"--compile: model bound {compiled['model_bound']:.1f} images/s at batch {compiled['batch_size']}, "
        f"{compiled['over_eager']:.2f}x eager; compiling took {compiled['compile_seconds']:.0f} s.")


def measure_compiled(info, preprocess, device, dtype, batch_size, count, eager_rate):
    """The model bound with --compile at `batch_size`, the seconds compiling took, and the ratio to eager;
    or the one line that says why it could not compile."""
    from pyramid.encoder import Encoder

    failures = []
    started = time.perf_counter()
    encoder = Encoder(info, preprocess.normaliser(device), device, dtype, compile=True, warn=failures.append)
    side = info.crop_size
    encoder(torch.zeros((batch_size, 3, side, side), dtype=torch.uint8, device=device))  # compiles
    compile_seconds = time.perf_counter() - started
    if failures:
        return {"failure": failures[0]}
    rate = measure_model(encoder, batch_size, count)
    return {"batch_size": batch_size, "model_bound": rate, "over_eager": rate / eager_rate,
            "compile_seconds": compile_seconds}


def pyramid_file_bytes(info):
    """About how many bytes one file holds: every level, float32, plus ~2 KB of zip records."""

    return sum(side * side for side in pyramid_sizes(info.grid_size)) * info.hidden_size * 4 + 2048


def disk_shortfall(directory, needed):
    """One line when `directory`'s disk has less than `needed` bytes (+10%) free, else None."""

    free = shutil.disk_usage(directory).free
    if free >= needed * 1.1:
        return None
    return (f"the table writes up to {needed * 1.1 / 1e9:.1f} GB into {directory} at once, which has "
            f"{free / 1e9:.1f} GB free; pass --output_dir on a larger disk")


def format_markdown_table(figures):
    """The table's figures as markdown: one row per input and batch size, the write levers, the fidelity."""
    ideal = "min(decode, model, write)" if figures["device"].startswith("cuda") else "1/(1/decode + 1/model)"
    cpus = f" with {figures['cpus']} CPUs" if figures["device"].startswith("cuda") else ""
    lines = [f"{figures['model']} DINOv2 in {figures['dtype']} on {figures['device_name']}{cpus}, "
             f"{figures['num_workers']} decode workers, {figures['write_threads']} writer threads, files made by "
             f"{figures['serialiser']}, attention {figures['attention']}; images/s (write: files/s); "
             f"ideal = {ideal}",
             "",
             "| input | batch | images | decode | model | write | ideal | end to end | end to end / ideal | bound "
             "| files went to |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in figures["rows"]:
        lines.append(f"| {row['input']} | {row['batch_size']} | {row['images']} | {row['decode_bound']:.1f} "
                     f"| {row['model_bound']:.1f} | {row['write_bound']:.1f} ({row['write_bound_mb']:.0f} MB/s) "
                     f"| {row['ideal']:.1f} | {row['end_to_end']:.1f} | {row['end_to_end_over_ideal']:.2f} "
                     f"| {row['bound']} | {row['files_went_to']} |")
    write = figures["write"]
    counts = list(next(iter(write["files_per_second"].values())))
    lines += ["", f"Write bound, {write['files']} files of batch {figures['rows'][0]['batch_size']} into "
              f"{figures['write_dir']} ({write['regime']}: the kernel lets ~{figures['dirty_limit_gb']:.1f} GB "
              f"wait in the page cache before writers wait for the disk), files/s; GIL: what one writer thread "
              f"takes from the run loop per file:",
              "", "| serialiser | " + " | ".join(f"{count} thread(s)" for count in counts) + " | GIL per file |",
              "|---|" + "---|" * (len(counts) + 1)]
    for serialise, per_thread in write["files_per_second"].items():
        held = write["gil_ms_per_file"][serialise]
        lines.append(f"| {serialise} | " + " | ".join(f"{rate:.0f}" for rate in per_thread.values())
                     + (f" | {held:.3f} ms |" if held is not None else " | (no schedstat) |"))
    lines += ["", f"Disk-bound: {write['disk_files']} files, then os.sync(): {write['disk_files_per_second']:.0f} "
              f"files/s ({write['disk_mb_per_second']:.0f} MB/s), {figures['write_threads']} writer threads."]
    levels = next(iter(figures["fidelity"].values()), {})
    lines += ["", f"Fidelity against fp32, min cosine per patch vector over {figures['fidelity_images']} images:",
              "", "| dtype | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for dtype, per_level in figures["fidelity"].items():
        lines.append(f"| {dtype} | " + " | ".join(f"{value:.6f}" for value in per_level.values()) + " |")
    return "\n".join(lines)


def run_preflight(args):
    """What a run on this machine will use, in a few lines, before anything is measured: the device and its
    driver, the libraries, the image processor, the PNG decoder, the attention kernel, how files are made,
    torch.compile's compiler, /dev/shm and the disk. Exit 0; the lines go to stdout."""

    import accelerate
    import PIL
    import transformers

    from pyramid import decode
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, attention_kernel, load_model_info

    device, dtype, batch_size, num_workers = run_settings(args)
    lines = [f"device: {cuda_description(device)}",
             f"libraries: Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()}), transformers {transformers.__version__}, "
             f"accelerate {accelerate.__version__}, Pillow {PIL.__version__}",
             f"CPUs: {usable_cpus()} usable; by default {num_workers} decode workers and {default_writer_threads()} "
             f"writer threads per process"]
    lines.append(f"PNG decoder: pyspng {pyspng_version()}" if decode.pyspng is not None else
                 "PNG decoder: none: pyspng is not installed, and the extractor refuses to run without it "
                 "(pip install pyspng; docs/gpu.md says how to carry its wheel to a machine without network)")
    with tempfile.TemporaryDirectory(prefix="pyramid-preflight-") as scratch:
        random_size = args.random or ("base" if args.model is None else None)
        model = args.model or random_models.save_random_model(Path(scratch) / f"random-{random_size}", args.family,
                                                              random_size)
        info, processor = load_model_info(model)
        preprocess = Preprocess(processor)
        needed = shared_memory_needed(batch_size, num_workers, info.crop_size, pixel_bytes=info.pixel_bytes)
        lines.append(shared_memory_warning(batch_size, num_workers, info.crop_size, pixel_bytes=info.pixel_bytes) or
                     f"/dev/shm: room for the {needed / 2**20:.0f} MB the decode workers hold at batch {batch_size}")
        lines.append(f"image processor: {type(processor).__module__}.{type(processor).__name__}; resize and crop "
                     f"{'made directly (checked against it)' if preprocess.direct is not None else 'by it'}")
        encoder = Encoder(info, preprocess.normaliser(device), device, dtype)
        lines.append(f"attention: {attention_kernel(encoder, batch_size)} "
                     f"({args.model or f'random {random_size}'}, {dtype}, batch {batch_size}, {device.type})")
        levels = build_pyramid(torch.randn(2, info.grid_size ** 2, info.hidden_size), info.grid_size)
        lines.append("files: torch.save's bytes made by ArchiveLayout (checked against torch.save on this torch)"
                     if checked_layout(levels) is not None else
                     "files: by torch.save itself (this torch lays its archive out otherwise than ArchiveLayout "
                     "expects: writing holds the GIL)")
    lines.append(f"torch.compile: {compiler_description(device)}")
    free = shutil.disk_usage(args.output_dir or tempfile.gettempdir()).free
    lines.append(f"disk: {free / 1e9:.1f} GB free in {args.output_dir or tempfile.gettempdir()} (the table needs "
                 f"~{TABLE_IMAGES['cuda'][256] * 1.1 / 1e3:.0f} GB for dinov2-base)")
    print("\n".join(lines), flush=True)
    return exits.OK


def cuda_description(device):
    """'NVIDIA H100 80GB HBM3, 79.6 GiB, compute capability 9.0, 132 SMs, driver 550.54.15', or 'cpu (...)'."""
    if device.type != "cuda":
        return f"cpu (torch sees no CUDA device), {usable_cpus()} cores"
    properties = torch.cuda.get_device_properties(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                                 str(device.index or 0)], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        driver = ""
    return (f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB, compute capability "
            f"{properties.major}.{properties.minor}, {properties.multi_processor_count} SMs, "
            f"driver {driver or 'unknown (no nvidia-smi)'}")


def pyspng_version():
    try:
        return version("pyspng")
    except PackageNotFoundError:
        return "(version unknown)"


def compiler_description(device):
    """What torch.compile would compile with here: Triton on CUDA, a C++ compiler on a CPU."""

    if device.type == "cuda":
        try:
            import triton

            return f"Triton {triton.__version__} (--compile compiles on the first batch)"
        except ImportError:
            return "no Triton: --compile says so in one line and runs uncompiled"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    return (f"C++ compiler {compiler} (--compile compiles on the first batch)" if compiler else
            "no C++ compiler: --compile says so in one line and runs uncompiled")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{usable_cpus()} CPU cores, {torch.get_num_threads()} torch threads"


def format_table(figures):
    """The figures as a small table for people."""
    rows = [("decode bound", f"{figures['decode_bound']:.1f} images/s", "read + preprocess, no model"),
            ("model bound", f"{figures['model_bound']:.1f} images/s", "forward + pooling on ready batches"),
            ("write bound", f"{figures['write_bound']:.1f} files/s",
             f"{figures['write_bound_mb']:.0f} MB/s, {figures['write_threads']} writer threads, ready CPU tensors, "
             f"{figures['serialiser']}, {figures['write_regime']}"),
            ("end to end", f"{figures['end_to_end']:.1f} images/s", "the extractor: python -m pyramid.extract"),
            ("ideal", f"{figures['ideal']:.1f} images/s",
             "min(model, decode, write)" if figures["device"].startswith("cuda") else "1 / (1/model + 1/decode)"),
            ("end to end / decode", f"{figures['end_to_end_over_decode_bound']:.2f}", ""),
            ("end to end / model", f"{figures['end_to_end_over_model_bound']:.2f}", ""),
            ("end to end / ideal", f"{figures['end_to_end_over_ideal']:.2f}", ""),
            ("peak RSS", f"{figures['peak_rss_mib']:.0f} MiB", "main process of the end-to-end run")]
    if "end_to_end_flip" in figures:
        rows += [("end to end --flip", f"{figures['end_to_end_flip']:.1f} images/s",
                  "the image and its mirror, one file"),
                 ("--flip / plain", f"{figures['flip_over_plain']:.2f}", "decode shared, model on the doubled batch")]
    levers = figures.get("write_levers")
    if levers:
        for serialise, per_thread in levers["files_per_second"].items():
            for count, rate in per_thread.items():
                rows.append((f"write, {serialise}, {count} thr", f"{rate:.1f} files/s",
                             f"median of {levers['rounds']} round(s), {levers['regime']}"))
        for serialise, held in levers["gil_ms_per_file"].items():
            rows.append((f"GIL per file, {serialise}", "unknown" if held is None else f"{held:.3f} ms",
                         "what the run loop loses per file written"))
    if "baseline" in figures:
        rows += [("baseline", f"{figures['baseline']:.1f} images/s", "processor in the loop, inline save"),
                 ("end to end / baseline", f"{figures['end_to_end_over_baseline']:.2f}", ""),
                 ("min cosine vs baseline", f"{figures['min_cosine_vs_baseline']:.6f}", "per patch, all levels")]
    header = (f"{figures['images']} images, {figures['model']} in {figures['dtype']} on {figures['device_name']}, "
              f"batch {figures['batch_size']}, {figures['num_workers']} workers")
    return header + "\n" + "\n".join(f"  {name:<24}{value:>18}  {note}" for name, value, note in rows)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
