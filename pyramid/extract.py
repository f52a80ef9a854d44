"""The extractor's command line: DINOv2 or DINOv3 feature pyramids of a folder of images, on 1..N processes, resumable.

    python extract_distributed.py [options]                  # one process
    accelerate launch extract_distributed.py [options]       # one process per GPU
    python -m pyramid.extract [options]                      # the same, from an installed package
    pyramid-extract [options]                                # ditto, as a console command
    accelerate launch -m pyramid.extract [options]
"""

import os
import signal
import sys
from pathlib import Path

from PIL import Image

from pyramid import exits
from pyramid.cli import argument_parser, command_name, is_main_process, refusals_exit_2
from pyramid.exits import UsageError
from pyramid.families import check_model_up_front
from pyramid.lock import refuse_a_live_run
from pyramid.runs import record_refusal
from pyramid.settings import DEFAULTS, Settings
from pyramid.tree import STORE_DTYPES

DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")


def get_args_parser():
    typed = Path(sys.argv[0]).name
    prog = f"python {typed}" if typed.endswith(".py") and typed != "extract.py" else command_name("pyramid.extract")
    parser = argument_parser(prog, __doc__)
    parser.add_argument("--input_dir", default=DEFAULTS.input_dir,
                        help="searched recursively for .png .jpg .jpeg .webp .bmp (any letter case)")
    parser.add_argument("--output_dir", default=DEFAULTS.output_dir,
                        help="one .pt per image, at the image's relative path with the suffix .pt")
    parser.add_argument("--model", default=DEFAULTS.model,
                        help="hub id or save_pretrained directory of a DINOv2 (with or without registers) or a "
                             "DINOv3 ViT (its processor needs torchvision: pip install '.[dinov3]')")
    parser.add_argument("--resolution", type=int, default=DEFAULTS.resolution,
                        help="the side of the square the model sees, a multiple of its patch size (default: its "
                             "processor's own, 224): DINOv2 resizes the shortest edge to round(R x 256 / 224) and "
                             "crops R; DINOv3 resizes to R x R")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="images per forward pass, per process (default: 64 on GPU, 16 on CPU)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decode workers per process (default: the cores this process may use, shared among "
                             "the node's processes; on GPU one less, at most 16)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images in sorted order")
    parser.add_argument("--dtype", default=DEFAULTS.dtype,
                        help="the dtype the model computes in: auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, "
                             "fp32; the files hold --store_dtype whatever it is")
    parser.add_argument("--store_dtype", default=DEFAULTS.store_dtype,
                        help="the dtype of the files' tensors: fp32, bf16 or fp16 (half the disk); the levels are "
                             "computed in fp32 and rounded once into it. The manifest records it")
    parser.add_argument("--overwrite", action="store_true",
                        help="accept an output directory made with other settings and replace its files; "
                             "once its manifest matches, a rerun resumes")
    parser.add_argument("--flip", action="store_true",
                        help="also store the pyramid of the image mirrored left-right, as flip/{s}x{s} levels "
                             "in the same file (one forward pass of the doubled batch)")
    parser.add_argument("--max_pixels", type=int, default=None,
                        help="an image with more pixels (read from its header, before decoding) is a recorded "
                             "failure, not a decode (default: Pillow's own limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)")
    parser.add_argument("--ignore_free_space", action="store_true",
                        help="start even when the files to write look larger than the free space on the disk of "
                             "--output_dir (estimated from the model's levels and hidden size and --flip)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model with torch.compile for speed (a minute or so first); the files are "
                             "the same to the dtype's rounding; where it cannot compile, one line says so and the "
                             "run goes on uncompiled")
    parser.add_argument("--fsync", action="store_true",
                        help="flush each file and its directory entry to disk before counting it done, so "
                             "files survive a node crash or power loss too (slower; see docs/scale.md)")
    parser.add_argument("--stall_timeout", type=float, default=DEFAULTS.stall_timeout, metavar="SECONDS",
                        help="a process that finishes no batch for this long (loading and compiling the model not "
                             "counted) writes every thread's stack to its log and exits with status 4; the run "
                             "says so and records it (default: 900, 15 minutes)")
    return parser


def check_args(args):
    """The checks that need nothing heavy, so a typo fails in a second, not after loading torch."""
    if args.dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {args.dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    if args.store_dtype not in STORE_DTYPES:
        raise UsageError(f"unknown --store_dtype {args.store_dtype!r}; use one of {', '.join(STORE_DTYPES)}")
    input_dir = Path(args.input_dir)
    if not input_dir.is_dir():
        raise UsageError(f"input directory {input_dir} does not exist; pass --input_dir with your images "
                         f"(python -m pyramid.prepare puts them in data/raw_images)")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file, not a directory")
    for name in ("batch_size", "limit", "max_pixels", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not args.stall_timeout > 0:
        raise UsageError(f"--stall_timeout must be more than 0 seconds, not {args.stall_timeout:g}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num_workers must be 0 or more, not {args.num_workers}")
    check_model_up_front(args.model, args.resolution)  # a local model's config.json: DINOv3's torchvision, the patch
    if args.max_pixels is None:  # Pillow's own limit (decode.pillow_pixel_limit, which loads torch)
        args.max_pixels = 2 * Image.MAX_IMAGE_PIXELS


def record_refused_run(args, error):
    """The runs.jsonl line of a run refused for its arguments, where its output directory exists; written once
    the error line is said, since a launcher that sees another process exit 2 may SIGTERM this one at once."""
    record_refusal(args.output_dir, dict(sorted(vars(args).items())), str(error), exits.USAGE)


@refusals_exit_2(after=record_refused_run)
def main(args):
    check_args(args)
    # The process that will take the lock looks at it first: a second launch into a live run's directory is
    # refused before torch and accelerate load. Under a launcher only that one may judge: another rank cannot
    # tell its own team's lock (left by a main process killed before a restart, on another node) from another run's.
    if is_main_process():
        refuse_a_live_run(Path(args.output_dir))
    # Idle OpenMP threads of the model then sleep instead of spinning on the cores that the decode
    # workers need: on a 2-core CPU run of a small model that is the difference between 0.8 and 1.0
    # of the decode bound. It must be set before torch loads; an explicit setting is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from pyramid.loop import run  # torch and transformers load only for a run that can start

        return run(Settings.from_args(args))
    except KeyboardInterrupt:  # Ctrl-C before the run could stop cleanly, or a second one
        print("stopped by Ctrl-C; rerun the same command to finish", file=sys.stderr)
        return exits.BY_SIGNAL[signal.SIGINT]


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
