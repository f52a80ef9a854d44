"""Extract DINOv2 feature pyramids for every image of a folder, on 1..N processes, resumable.

    python extract_distributed.py [options]                  # one process
    accelerate launch extract_distributed.py [options]       # one process per GPU

The same job as `python -m pyramid.extract` and the `pyramid-extract` command: the code is pyramid/extract.py.
"""

import sys

from pyramid.extract import get_args_parser, main

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
