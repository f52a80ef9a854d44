"""The GPU table of pyramid.bench (--table) and the model bound of each encoder (--models), as docs/gpu.md shows.

--table: every bound and the real job end to end for 1024x1024 and 256x256 PNG inputs at several batch sizes,
the write levers, the fidelity of fp16 and bf16 against fp32 and, with --compile, the compiled model bound;
--models: the model bound of each encoder and resolution, random weights at the real sizes. Both make their own
inputs (pyramid.synthetic), so a fresh GPU node runs them without data or weights.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyramid import exits, synthetic
from pyramid.bench import device_name, ideal_rate, measure_decode, measure_end_to_end, measure_model, run_settings
from pyramid.cli import LazyModule
from pyramid.exits import UsageError
from pyramid.levels import build_pyramid, pyramid_sizes
from pyramid.paths import find_images
from pyramid.prepare import to_png
from pyramid.synthetic import write_synthetic_faces
from pyramid.team import usable_cpus
from pyramid.writebench import dirty_limit_bytes, measure_write, write_levers, write_regime
from pyramid.writer import default_writer_threads

torch = LazyModule("torch")

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


def bound_name(rates):
    """The name of the smallest of {"decode": ..., "model": ..., "write": ...}."""
    return min(rates, key=rates.get)


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
        model = args.model or synthetic.save_random_model(scratch / f"random-{random_size}", args.family,
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
            synthetic.save_random_model(directory, family, size)
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
