"""What a run on this machine will use, before anything is measured (pyramid.bench --preflight).

The device and its driver, the libraries, the image processor, the PNG decoder, the attention kernel, how files
are made, torch.compile's compiler, /dev/shm and the disk: a few lines, in seconds, so a lent GPU node's report
says first what it ran on.
"""

import os
import platform
import shutil
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pyramid import exits, synthetic
from pyramid.bench import run_settings
from pyramid.cli import LazyModule
from pyramid.gputable import TABLE_IMAGES
from pyramid.levels import build_pyramid
from pyramid.plan import shared_memory_needed, shared_memory_warning
from pyramid.team import usable_cpus
from pyramid.writer import checked_layout, default_writer_threads

torch = LazyModule("torch")


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
        model = args.model or synthetic.save_random_model(Path(scratch) / f"random-{random_size}", args.family,
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
