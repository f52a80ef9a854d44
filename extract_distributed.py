"""Extract DINOv2 feature pyramids for every image of a folder, on 1..N processes, resumable.

    python extract_distributed.py [options]                  # one process
    accelerate launch extract_distributed.py [options]       # one process per GPU
"""

import argparse
import sys

from pyramid.run import EXIT_USAGE, UsageError, check_args, run

DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input_dir", default="data/raw_images",
                        help="searched recursively for .png .jpg .jpeg .webp .bmp (any letter case)")
    parser.add_argument("--output_dir", default="data/feature_pyramids",
                        help="one .pt per image, at the image's relative path with the suffix .pt")
    parser.add_argument("--model", default="facebook/dinov2-base",
                        help="hub id or save_pretrained directory of a DINOv2 (with or without registers)")
    parser.add_argument("--batch_size", type=int, default=None, help="images per forward pass [64 on GPU, 16 on CPU]")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decode workers per process [the cores this process may use, less one on GPU, "
                             "half on CPU]")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images in sorted order")
    parser.add_argument("--dtype", default="auto",
                        help="the dtype the model computes in: auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, "
                             "fp32; files hold fp32 whatever it is")
    parser.add_argument("--overwrite", action="store_true", help="recompute and replace existing files")
    return parser


def main(args):
    if args.dtype not in DTYPE_CHOICES:
        print(f"error: unknown --dtype {args.dtype!r}; use one of {', '.join(DTYPE_CHOICES)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_args(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
