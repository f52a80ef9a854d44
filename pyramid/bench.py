"""Throughput side by side on the same images: decode bound, model bound, the real job end to end,
and (with --baseline) the straightforward version that the peers ship.

    python -m pyramid.bench --model facebook/dinov2-base --input_dir data/raw_images --limit 256
    python -m pyramid.bench --random base --synthetic 64 --baseline     # no weights, no data needed
    python -m pyramid.bench --reader --synthetic_tree 2000              # the training-side readers
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

# Loaded by the first measurement, so --help and bad arguments answer at once.
np = LazyModule("numpy")
torch = LazyModule("torch")

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "data" / "astronaut.png"

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
        levels = build_pyramid(encoder(pixels), encoder.info.grid_size)
        next(iter(levels.values())).sum().item()  # waits for the device

    step()  # warm-up: allocator, kernels, lazy initialisation
    batches = max(2, math.ceil(count / batch_size))
    started = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch_size / (time.perf_counter() - started)


def measure_end_to_end(model, input_dir, limit, batch_size, num_workers, dtype, extra_args=()):
    """The real job, `python extract_distributed.py`, into a temporary directory.

    Returns (images/s while encoding, as its summary line reports, peak RSS of its main process in MiB,
    the output directory). The caller removes the directory.
    """
    output_dir = tempfile.mkdtemp(prefix="pyramid-bench-")
    command = [sys.executable, str(REPO / "extract_distributed.py"), "--input_dir", str(input_dir),
               "--output_dir", output_dir, "--model", str(model), "--batch_size", str(batch_size),
               "--num_workers", str(num_workers), "--dtype", dtype, "--limit", str(limit), *extra_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
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
    rate, _, output_dir = measure_end_to_end(model, input_dir, limit, batch_size, num_workers, dtype, ("--flip",))
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
    return parser


def ideal_rate(model_rate, decode_rate, device):
    """What a perfect pipeline would reach: on a GPU decoding and the model overlap, so the slower
    one sets the pace; on a CPU they share the same cores, so their times add up."""
    if device.type == "cuda":
        return min(model_rate, decode_rate)
    return 1 / (1 / model_rate + 1 / decode_rate)


def main(args):
    if args.reader:
        from pyramid.readbench import reader_main

        return reader_main(args)
    if (args.model, args.random) == (None, None) or (args.input_dir, args.synthetic) == (None, None):
        print("error: one of --model/--random and one of --input_dir/--synthetic are required", file=sys.stderr)
        return exits.USAGE
    if args.input_dir is not None and not Path(args.input_dir).is_dir():
        print(f"error: --input_dir {args.input_dir} does not exist", file=sys.stderr)
        return exits.USAGE
    from pyramid.decode import Preprocess
    from pyramid.encoder import Encoder, load_model_info, resolve_dtype
    from pyramid.paths import find_images
    from pyramid.run import default_batch_size, default_num_workers

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
        figures = {"images": len(names), "device": str(device), "device_name": device_name(device),
                   "dtype": dtype, "batch_size": batch_size, "num_workers": num_workers,
                   "model": str(args.model or f"random {args.random}")}

        figures["decode_bound"] = measure_decode(input_dir, names, preprocess, batch_size, num_workers)
        encoder = Encoder(info, preprocess.normaliser(device), device, dtype)
        figures["model_bound"] = measure_model(encoder, batch_size, len(names))
        del encoder
        end_to_end, peak_rss, output_dir = measure_end_to_end(model, input_dir, len(names), batch_size,
                                                              num_workers, dtype)
        figures["end_to_end"], figures["peak_rss_mib"] = end_to_end, peak_rss
        figures["ideal"] = ideal_rate(figures["model_bound"], figures["decode_bound"], device)
        if args.flip:
            figures.update(flip_figures(model, input_dir, len(names), batch_size, num_workers, dtype, end_to_end))
        for name in ("decode_bound", "model_bound", "ideal"):
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


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


def format_table(figures):
    """The figures as a small table for people."""
    rows = [("decode bound", f"{figures['decode_bound']:.1f} images/s", "read + preprocess, no model"),
            ("model bound", f"{figures['model_bound']:.1f} images/s", "forward + pooling on ready batches"),
            ("end to end", f"{figures['end_to_end']:.1f} images/s", "python extract_distributed.py"),
            ("ideal", f"{figures['ideal']:.1f} images/s",
             "min(model, decode)" if figures["device"].startswith("cuda") else "1 / (1/model + 1/decode)"),
            ("end to end / decode", f"{figures['end_to_end_over_decode_bound']:.2f}", ""),
            ("end to end / model", f"{figures['end_to_end_over_model_bound']:.2f}", ""),
            ("end to end / ideal", f"{figures['end_to_end_over_ideal']:.2f}", ""),
            ("peak RSS", f"{figures['peak_rss_mib']:.0f} MiB", "main process of the end-to-end run")]
    if "end_to_end_flip" in figures:
        rows += [("end to end --flip", f"{figures['end_to_end_flip']:.1f} images/s", "the image and its mirror, one file"),
                 ("--flip / plain", f"{figures['flip_over_plain']:.2f}", "decode shared, model on the doubled batch")]
    if "baseline" in figures:
        rows += [("baseline", f"{figures['baseline']:.1f} images/s", "processor in the loop, inline save"),
                 ("end to end / baseline", f"{figures['end_to_end_over_baseline']:.2f}", ""),
                 ("min cosine vs baseline", f"{figures['min_cosine_vs_baseline']:.6f}", "per patch, all levels")]
    header = (f"{figures['images']} images, {figures['model']} in {figures['dtype']} on {figures['device_name']}, "
              f"batch {figures['batch_size']}, {figures['num_workers']} workers")
    return header + "\n" + "\n".join(f"  {name:<24}{value:>18}  {note}" for name, value, note in rows)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
