"""Throughput side by side: decode, model and write bounds, and the real job end to end.

On the same images, device, dtype and batch size; with --baseline also the straightforward version
that the peers ship; with --table the whole GPU table (docs/gpu.md).

    python -m pyramid.bench --model facebook/dinov2-base --input_dir data/raw_images --limit 256
    python -m pyramid.bench --random base --synthetic 64 --baseline     # no weights, no data needed
    python -m pyramid.bench --reader --synthetic_tree 2000              # the training-side readers
    python -m pyramid.bench --table                                      # the GPU table (docs/gpu.md)
    python -m pyramid.bench --save_random_model models/random-base       # a --model for offline trials
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyramid import exits
from pyramid.cli import LazyModule, argument_parser, command_name
from pyramid.team import usable_cpus

# Loaded by the first measurement, so --help and bad arguments answer at once.
np = LazyModule("numpy")
torch = LazyModule("torch")

# Shipped in the package (pyproject's package-data), so the bench runs from an installed wheel too.
PHOTO = Path(__file__).resolve().parent / "data" / "astronaut.png"

# The preprocessor_config.json that facebook/dinov2-base ships, verbatim.
DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}
# (hidden size, layers, heads) of the DINOv2 sizes, and a tiny one for tests.
RANDOM_SIZES = {"tiny": (32, 2, 2), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def save_random_dinov2(directory, size="base", registers=0, seed=0):
    """Save a random-weight DINOv2 of a real size (patch 14, image_size 518) with the real
    dinov2 preprocessor config, in save_pretrained layout. Returns the directory."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    hidden_size, layers, heads = RANDOM_SIZES[size]
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden_size * 4, patch_size=14, image_size=518)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    directory = Path(directory)
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2))
    return directory


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
    from pyramid.pool import build_pyramid

    side = encoder.info.crop_size
    pixels = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, device=encoder.device)

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


def measure_write(output_dir, hidden_size, grid_size, batch_size, count, threads):
    """Files/s and MB/s of the run's Writer alone: ready CPU fp32 batches split into files on the disk
    of `output_dir` (in a temporary directory inside it, removed after). Returns (files/s, MB/s)."""
    from pyramid.pool import build_pyramid
    from pyramid.writer import Writer

    levels = build_pyramid(torch.randn(batch_size, grid_size * grid_size, hidden_size), grid_size)
    directory = Path(tempfile.mkdtemp(prefix="pyramid-write-bound-", dir=output_dir))
    try:
        writer = Writer(directory, threads=threads)
        batches = max(1, math.ceil(count / batch_size))
        started = time.perf_counter()
        for batch in range(batches):
            writer.submit_batch([f"{batch * batch_size + i:06d}.pt" for i in range(batch_size)], levels)
        writer.close()
        seconds = time.perf_counter() - started
        file_bytes = (directory / "000000.pt").stat().st_size
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)
    files = batches * batch_size
    return files / seconds, files * file_bytes / seconds / 1e6


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
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=python_path))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read()
    match = re.search(r"^done: .*?([\d.]+) images/s while encoding", stderr, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"the end-to-end run failed (exit {process.returncode}):\n{stderr}")
    return float(match.group(1)), usage.ru_maxrss / 1024, Path(output_dir)


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
    from pyramid.pool import build_pyramid, split_pyramids, strip_special_tokens

    processor = AutoImageProcessor.from_pretrained(model_name)
    model = AutoModel.from_pretrained(model_name, dtype=DTYPES[dtype]).to(device).eval()
    registers = getattr(model.config, "num_register_tokens", 0)
    grid_size = processor.crop_size["height"] // model.config.patch_size
    started = time.perf_counter()
    for start in range(0, len(names), batch_size):
        batch = names[start:start + batch_size]
        images = [Image.open(Path(input_dir) / name).convert("RGB") for name in batch]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, DTYPES[dtype])
        with torch.no_grad():
            hidden = model(pixel_values=pixels).last_hidden_state
        patches = strip_special_tokens(hidden, registers).float()
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
                        help="a random-weight DINOv2 of this size (no download): the speed is the same")
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
                             "run write there (in temporary directories they remove); none: the system's temp directory")
    parser.add_argument("--write_threads", type=int, nargs="+", default=None, metavar="N",
                        help="also measure the write bound with each of these writer thread counts")
    table = parser.add_argument_group("the GPU table (--table): no data and no weights needed")
    table.add_argument("--table", action="store_true",
                       help="decode, model, write and end-to-end images/s and fp16-vs-fp32 fidelity for 1024x1024 "
                            "and 256x256 PNG inputs at several batch sizes, as a markdown table (--random base "
                            "unless --model or --random says otherwise)")
    table.add_argument("--batch_sizes", type=int, nargs="+", default=None, metavar="B",
                       help="batch sizes of the table [64 128 256 on GPU, 16 on CPU]")
    table.add_argument("--quick", action="store_true", help="a few images only: a check that the table runs")
    table.add_argument("--save", default=None, metavar="FILE.json", help="also write the table's figures here")
    parser.add_argument("--save_random_model", type=Path, default=None, metavar="DIR",
                        help="measure nothing: save a random-weight DINOv2 of --random's size (default base) to DIR "
                             "in save_pretrained layout, with the real dinov2 preprocessor config, for trying the "
                             "tools without the hub (--model DIR)")
    return parser


def check_args(args):
    """One sentence on what is wrong with the arguments, or None."""
    if args.output_dir is not None and not Path(args.output_dir).is_dir():
        return f"--output_dir {args.output_dir} does not exist"
    if args.table:
        if args.input_dir is not None or args.synthetic is not None:
            return "--table makes its own 1024x1024 and 256x256 inputs; drop --input_dir / --synthetic"
        return None
    if args.model is None and args.random is None:
        return "one of --model or --random is required"
    if args.input_dir is None and args.synthetic is None:
        return "one of --input_dir or --synthetic is required"
    if args.input_dir is not None and not Path(args.input_dir).is_dir():
        return f"--input_dir {args.input_dir} does not exist"
    return None


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
        print("error: --save_random_model makes a random model; give its size with --random, not --model",
              file=sys.stderr)
        return exits.USAGE
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        print(f"error: --save_random_model {directory} exists and is not an empty directory; name a new one",
              file=sys.stderr)
        return exits.USAGE
    size = args.random or "base"
    hidden_size, layers, heads = RANDOM_SIZES[size]
    save_random_dinov2(directory, size)
    print(f"saved a random-weight DINOv2 ({size}: hidden size {hidden_size}, {layers} layers, {heads} heads) to "
          f"{directory}; pass --model {directory} to the tools (its features are noise: for trials, not training)")
    return exits.OK


def main(args):
    if args.save_random_model is not None:
        return save_random_model(args)
    if args.reader:
        from pyramid.readbench import reader_main

        return reader_main(args)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return exits.USAGE
    if args.table:
        return run_table(args)
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, load_model_info, resolve_dtype
    from pyramid.paths import find_images
    from pyramid.run import default_batch_size, default_num_workers
    from pyramid.writer import default_writer_threads

    with tempfile.TemporaryDirectory(prefix="pyramid-bench-") as scratch:
        model = args.model or save_random_dinov2(Path(scratch) / f"random-{args.random}", args.random)
        input_dir = args.input_dir or write_synthetic_faces(Path(scratch) / "images", args.synthetic)
        names = find_images(input_dir)[:args.limit]
        if not names:
            print(f"error: no images under {input_dir}", file=sys.stderr)
            return exits.USAGE
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(args.dtype, device)
        batch_size = args.batch_size or default_batch_size(device)
        num_workers = default_num_workers(device) if args.num_workers is None else args.num_workers
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
        figures["write_bound"], figures["write_bound_mb"] = measure_write(
            write_dir, info.hidden_size, info.grid_size, batch_size, max(len(names), 4 * batch_size), threads)
        if args.write_threads:
            figures["write_bound_by_threads"] = {
                str(count): measure_write(write_dir, info.hidden_size, info.grid_size, batch_size,
                                          max(len(names), 4 * batch_size), count)[0]
                for count in args.write_threads}
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
# Images per input in the table: enough for seconds of steady state on one GPU; --quick: a check that it runs.
TABLE_IMAGES = {"cuda": {1024: 3072, 256: 16384}, "cpu": {1024: 64, 256: 128}, "quick": {1024: 8, 256: 16}}
TABLE_UNIQUE = {"full": 32, "quick": 2}


def write_table_inputs(directory, side, count, unique, seed=0):
    """`count` PNGs in `directory`: `unique` synthetic faces at 1024x1024, brought to `side` by
    prepare's own resize (shortest edge, bicubic), then hard-linked (copied where links fail)
    under new names up to `count`. Decoding a link costs what decoding a distinct file costs."""
    from pyramid.prepare import to_png

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
    from pyramid.pool import build_pyramid

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


def bound_name(rates):
    """The name of the smallest of {"decode": ..., "model": ..., "write": ...}."""
    return min(rates, key=rates.get)


def run_table(args):
    """The GPU table: every bound and the end-to-end run per input size and batch size, one command."""
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, load_model_info, resolve_dtype
    from pyramid.paths import find_images
    from pyramid.run import default_num_workers
    from pyramid.writer import default_writer_threads

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    size = "quick" if args.quick else device.type if device.type in TABLE_IMAGES else "cpu"
    counts = TABLE_IMAGES[size]
    batch_sizes = args.batch_sizes or ([64, 128, 256] if device.type == "cuda" else [16])
    num_workers = default_num_workers(device) if args.num_workers is None else args.num_workers
    threads = default_writer_threads()
    with tempfile.TemporaryDirectory(prefix="pyramid-table-") as scratch:
        scratch = Path(scratch)
        random_size = args.random or ("base" if args.model is None else None)
        model = args.model or save_random_dinov2(scratch / f"random-{random_size}", random_size)
        info, processor = load_model_info(model)
        preprocess = Preprocess(processor)
        write_dir = args.output_dir or scratch
        figures = {"device": str(device), "device_name": device_name(device), "cpus": usable_cpus(),
                   "model": str(args.model or f"random {random_size}"), "dtype": dtype,
                   "num_workers": num_workers, "write_threads": threads, "rows": []}

        encoder = Encoder(info, preprocess.normaliser(device), device, dtype)
        model_bounds = {batch: measure_model(encoder, batch, max(counts.values()) // 2) for batch in batch_sizes}
        encoder = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the end-to-end runs are other processes: leave them the GPU's memory
        write_bounds = {batch: measure_write(write_dir, info.hidden_size, info.grid_size, batch,
                                             max(counts[1024], 2 * batch), threads) for batch in batch_sizes}
        inputs = {side: write_table_inputs(scratch / f"in{side}", side, counts[side],
                                           TABLE_UNIQUE["quick" if args.quick else "full"])
                  for _, side in TABLE_INPUTS}
        for label, side in TABLE_INPUTS:
            names = find_images(inputs[side])
            for batch in batch_sizes:
                decode = measure_decode(inputs[side], names, preprocess, batch, num_workers)
                end_to_end, peak_rss, output_dir = measure_end_to_end(model, inputs[side], len(names), batch,
                                                                      num_workers, dtype, args.output_dir)
                subprocess.run(["rm", "-rf", str(output_dir)], check=False)
                rates = {"decode": decode, "model": model_bounds[batch], "write": write_bounds[batch][0]}
                ideal = ideal_rate(rates["model"], rates["decode"], device, rates["write"])
                figures["rows"].append({
                    "input": label, "batch_size": batch, "images": len(names), "decode_bound": decode,
                    "model_bound": rates["model"], "write_bound": rates["write"],
                    "write_bound_mb": write_bounds[batch][1], "ideal": ideal, "end_to_end": end_to_end,
                    "end_to_end_over_ideal": end_to_end / ideal, "bound": bound_name(rates),
                    "peak_rss_mib": peak_rss})
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
    print(json.dumps(figures, indent=2) if args.json else format_markdown_table(figures))
    return exits.OK


def format_markdown_table(figures):
    """The table's figures as markdown: one row per input and batch size, then the fidelity."""
    ideal = "min(decode, model, write)" if figures["device"].startswith("cuda") else "1/(1/decode + 1/model)"
    cpus = f" with {figures['cpus']} CPUs" if figures["device"].startswith("cuda") else ""
    lines = [f"{figures['model']} DINOv2 in {figures['dtype']} on {figures['device_name']}{cpus}, "
             f"{figures['num_workers']} decode workers, "
             f"{figures['write_threads']} writer threads; images/s (write: files/s); ideal = {ideal}",
             "",
             "| input | batch | images | decode | model | write | ideal | end to end | end to end / ideal | bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in figures["rows"]:
        lines.append(f"| {row['input']} | {row['batch_size']} | {row['images']} | {row['decode_bound']:.1f} "
                     f"| {row['model_bound']:.1f} | {row['write_bound']:.1f} ({row['write_bound_mb']:.0f} MB/s) "
                     f"| {row['ideal']:.1f} | {row['end_to_end']:.1f} | {row['end_to_end_over_ideal']:.2f} "
                     f"| {row['bound']} |")
    levels = next(iter(figures["fidelity"].values()), {})
    lines += ["", f"Fidelity against fp32, min cosine per patch vector over {figures['fidelity_images']} images:",
              "", "| dtype | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for dtype, per_level in figures["fidelity"].items():
        lines.append(f"| {dtype} | " + " | ".join(f"{value:.6f}" for value in per_level.values()) + " |")
    return "\n".join(lines)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{usable_cpus()} CPU cores, {torch.get_num_threads()} torch threads"


def format_table(figures):
    """The figures as a small table for people."""
    rows = [("decode bound", f"{figures['decode_bound']:.1f} images/s", "read + preprocess, no model"),
            ("model bound", f"{figures['model_bound']:.1f} images/s", "forward + pooling on ready batches"),
            ("write bound", f"{figures['write_bound']:.1f} files/s",
             f"{figures['write_bound_mb']:.0f} MB/s, {figures['write_threads']} writer threads, ready CPU tensors"),
            ("end to end", f"{figures['end_to_end']:.1f} images/s", "the extractor: python -m pyramid.extract"),
            ("ideal", f"{figures['ideal']:.1f} images/s",
             "min(model, decode, write)" if figures["device"].startswith("cuda") else "1 / (1/model + 1/decode)"),
            ("end to end / decode", f"{figures['end_to_end_over_decode_bound']:.2f}", ""),
            ("end to end / model", f"{figures['end_to_end_over_model_bound']:.2f}", ""),
            ("end to end / ideal", f"{figures['end_to_end_over_ideal']:.2f}", ""),
            ("peak RSS", f"{figures['peak_rss_mib']:.0f} MiB", "main process of the end-to-end run")]
    if "end_to_end_flip" in figures:
        rows += [("end to end --flip", f"{figures['end_to_end_flip']:.1f} images/s", "the image and its mirror, one file"),
                 ("--flip / plain", f"{figures['flip_over_plain']:.2f}", "decode shared, model on the doubled batch")]
    for count, rate in figures.get("write_bound_by_threads", {}).items():
        rows.append((f"write, {count} threads", f"{rate:.1f} files/s", ""))
    if "baseline" in figures:
        rows += [("baseline", f"{figures['baseline']:.1f} images/s", "processor in the loop, inline save"),
                 ("end to end / baseline", f"{figures['end_to_end_over_baseline']:.2f}", ""),
                 ("min cosine vs baseline", f"{figures['min_cosine_vs_baseline']:.6f}", "per patch, all levels")]
    header = (f"{figures['images']} images, {figures['model']} in {figures['dtype']} on {figures['device_name']}, "
              f"batch {figures['batch_size']}, {figures['num_workers']} workers")
    return header + "\n" + "\n".join(f"  {name:<24}{value:>18}  {note}" for name, value, note in rows)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
