"""The extractor's settings: one typed, frozen object, built once from the checked command line.

The run (pyramid.loop.run) takes it and reads nothing else of the command line.
"""

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Settings:
    """What a run is asked to do; the defaults are the command line's (pyramid.extract). None where the
    value depends on the machine: the run decides it (pyramid.plan)."""

    input_dir: str = "data/raw_images"
    output_dir: str = "data/feature_pyramids"
    model: str = "facebook/dinov2-base"  # a hub id or a save_pretrained directory
    batch_size: int | None = None  # images per forward pass, per process; None: 64 on GPU, 16 on CPU
    num_workers: int | None = None  # decode workers per process; None: the cores this process may use
    limit: int | None = None  # only the first N images in sorted order
    dtype: str = "auto"  # the dtype the model computes in: auto, fp16, bf16, fp32
    store_dtype: str = "fp32"  # the dtype of the files' tensors: fp32, bf16, fp16 (levels rounded once into it)
    overwrite: bool = False
    flip: bool = False
    max_pixels: int | None = None  # None: Pillow's own limit
    ignore_free_space: bool = False
    compile: bool = False
    fsync: bool = False
    stall_timeout: float = 900.0  # seconds without a finished batch before a process is taken for stuck
    resolution: int | None = None  # the side of the square the model sees; None: its processor's own size

    @classmethod
    def from_args(cls, args):
        """The settings of a parsed command line (an argparse.Namespace with every field)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def record(self):
        """{name: value} in name order: the settings as runs.jsonl records them."""
        return dict(sorted(asdict(self).items()))


DEFAULTS = Settings()
