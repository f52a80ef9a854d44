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
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyramid import exits, synthetic
from pyramid.cli import LazyModule, argument_parser, command_name, refusals_exit_2
from pyramid.exits import UsageError
from pyramid.levels import build_pyramid, split_pyramids, strip_special_tokens
from pyramid.paths import find_images
from pyramid.plan import default_batch_size, default_num_workers
from pyramid.synthetic import RANDOM_SIZES, write_synthetic_faces
from pyramid.team import usable_cpus
from pyramid.writebench import measure_write, write_levers, write_regime
from pyramid.writer import default_writer_threads

# Loaded by the first measurement, so --help and bad arguments answer at once.
torch = LazyModule("torch")

# The end-to-end child: a run that has not ended after this long is killed (the extractor's own
# --stall_timeout ends a stuck one long before), and its pipes read for this long once it has ended.
CHILD_TIMEOUT = 6 * 3600
PIPE_DRAIN_SECONDS = 10.0


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


FAMILY_NAMES = {"dinov2": "DINOv2", "dinov3": "DINOv3"}


def save_random_model(args):
    """--save_random_model DIR: the model, a line saying what it is, exit 0; or a refusal, exit 2."""
    directory = args.save_random_model
    if args.model is not None:
        raise UsageError("--save_random_model makes a random model; give its size with --random, not --model")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UsageError(f"--save_random_model {directory} exists and is not an empty directory; name a new one")
    size = args.random or "base"
    hidden_size, layers, heads = RANDOM_SIZES[size]
    synthetic.save_random_model(directory, args.family, size)
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
        from pyramid.preflight import run_preflight

        return run_preflight(args)
    if args.models:
        from pyramid.gputable import run_models

        return run_models(args)
    if args.table:
        from pyramid.gputable import run_table

        return run_table(args)
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, load_model_info

    with tempfile.TemporaryDirectory(prefix="pyramid-bench-") as scratch:
        model = args.model or synthetic.save_random_model(Path(scratch) / f"random-{args.random}", args.family,
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


def run_settings(args):
    """(device, dtype, batch size, decode workers) of a run here with `args`: the extractor's own choices
    (pyramid.plan, pyramid.encoder) where the command line leaves them out."""
    from pyramid.encoder import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return (device, resolve_dtype(args.dtype, device), args.batch_size or default_batch_size(device),
            default_num_workers(device) if args.num_workers is None else args.num_workers)


def device_name(device):
    """The device as the figures name it: the GPU's name, or the CPU cores and torch threads."""
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
