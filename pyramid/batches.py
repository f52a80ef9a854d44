"""A decoded batch to the writer: forward passes that fit the device's memory, pooled, rounded, handed over.

`Batches.encode(images, pixels)` runs the batch through the model in passes of at most `rows` images
(halved on each out-of-memory error, for the rest of the run), pools each pass into its levels, rounds them
into the files' dtype with a finite flag per image, and queues them for the writer while the copy to the
host runs on the side. An image whose features are not finite, or that does not fit even alone, gets its
failures.jsonl line instead of a file.
"""

import functools

import torch
from accelerate.utils import release_memory

from pyramid.encoder import DTYPES, first_line, is_out_of_memory
from pyramid.levels import (
    build_pyramid,
    finite_images,
    representable_images,
    split_twins,
    stored_levels,
    twin_rows,
)
from pyramid.paths import output_path_for

FINITE_KEY = "finite"  # the per-image flags, copied to the host with the levels
DTYPE_NAMES = {value: name for name, value in DTYPES.items()}  # torch.float16 -> "fp16"
STORE_RANGE = {name: torch.finfo(dtype).max for name, dtype in DTYPES.items()}  # the largest finite value of each


class Batches:
    """This process's batches, from pixels to the writer. The fixed parts are taken once: the encoder, the
    device-to-host copies, the tally (its writer, its count of images too large), --flip and --store_dtype,
    the stop signals (a hand-over is never cut by StopNow), and where a failure and a note go."""

    def __init__(self, encoder, copies, tally, settings, rows, signals, record_failure, note):
        self.encoder, self.copies, self.tally, self.signals = encoder, copies, tally, signals
        self.parts = 2 if settings.flip else 1  # with --flip a pass holds the images, then their mirrors
        self.store_dtype_name = settings.store_dtype
        self.store_dtype = DTYPES[settings.store_dtype]
        self.rows = rows  # images per forward pass: halved on each out-of-memory error
        self.record_failure = record_failure  # (image, message): its failures.jsonl line and a log line
        self.note = note  # (text): a change the run made to go on, said and recorded

    def encode(self, images, pixels):
        """Encode and pool the batch of `images` in forward passes of at most `self.rows` images, handing
        each pass's pyramids to the writer. Out of memory, the pass is retried in halves and the run goes
        on at the smaller size, said once; an image that does not fit alone is a recorded failure.
        (accelerate's find_executable_batch_size reruns a whole function from its start at 0.9 times the
        size: here that would drop the chunks this process has claimed and the batches in flight; its
        release_memory and OOM test are used.)"""
        count, start = len(images), 0
        while start < count:
            rows = min(self.rows, count - start)
            out_of_memory = None
            try:
                levels, finite = self.compute(twin_rows(pixels, self.parts, count, start, rows))
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                out_of_memory = f"{type(error).__name__}: {first_line(error)[:300]}"
            if out_of_memory is None:
                self.hand_over(images[start:start + rows], levels, finite)
                start += rows
                continue
            # Outside the except block: its traceback no longer holds the failed pass's tensors.
            levels = finite = None
            release_memory()  # gc, then the device's cache back to the driver (accelerate)
            if rows == 1:
                self.record_failure(images[start], f"out of {self.memory_name()} even alone (batch 1), computed "
                                                   f"in {DTYPE_NAMES[self.encoder.dtype]}: {out_of_memory}; it needs "
                                                   f"a device with more free memory")
                self.tally.too_large += 1
                start += 1
                continue
            self.rows = rows // 2
            self.encoder.reset_padding()  # --compile pads to the longest batch seen: not past the new size
            self.note(f"out of {self.memory_name()} at batch {rows}; going on at batch {self.rows}")

    def compute(self, pixels):
        """One forward pass: the levels {"16x16": (B, 256, D), ...} on the device, rounded into the files' dtype,
        and the (B, 2 * parts) finite flags (as computed, then as stored)."""
        levels = build_pyramid(self.encoder(pixels), self.encoder.info.grid_size)  # {"16x16": (B, 256, D), ...}
        # Checked on the device and read by the writer once the copy is there: the loop never waits.
        finite = finite_images(levels)  # (parts * B,) bool: the fp32 values
        # Rounded once into the files' dtype on the device: a 2-byte dtype halves the copy to the host.
        levels = stored_levels(levels, self.store_dtype)
        fits = finite if self.store_dtype == torch.float32 else representable_images(levels)
        # (B, 2 * parts) bool: image, mirror computed finite; then image, mirror still finite once stored
        finite = torch.stack([finite, fits]).view(2 * self.parts, -1).T.contiguous()
        if self.parts == 2:  # one forward pass of the B images and their B mirrors
            levels = split_twins(levels)  # {"16x16": (B, 256, D), ..., "flip/16x16": (B, 256, D), ...}
        return levels, finite

    def hand_over(self, images, levels, finite):
        """Copy the pyramids of `images` to the host on the side, while the next pass computes, and queue
        them for the writer, which waits for the copy, not us."""
        host, ready, release = self.copies.start({**levels, FINITE_KEY: finite})
        finite = host.pop(FINITE_KEY)
        outputs = [output_path_for(image) for image in images]
        with self.signals.deferred():  # a queue hand-over: no StopNow inside it (stopping.py)
            self.tally.writer.submit_batch(outputs, host, ready=ready, release=release, finite=finite,
                                           on_non_finite=functools.partial(self.report_non_finite, images),
                                           on_unwritable=functools.partial(self.report_unwritable,
                                                                           dict(zip(outputs, images))))

    def report_non_finite(self, images, position, flags):
        """The writer's call for an image of `images` whose features came out non-finite (on its thread)."""
        self.record_failure(images[position], non_finite_message(DTYPE_NAMES[self.encoder.dtype], flags,
                                                                 self.store_dtype_name))

    def report_unwritable(self, images, relative_output, why):
        """The writer's call for a file it could not write for a reason of its own (on its thread);
        `images`: {relative output: image} of the batch."""
        self.record_failure(images[relative_output], why)

    def memory_name(self):
        return "GPU memory" if self.encoder.device.type == "cuda" else "memory"


def non_finite_message(dtype, flags, store_dtype="fp32"):
    """The failures.jsonl error of an image whose features came out NaN or inf, computed in `dtype` or once
    rounded into `store_dtype`: what happened and what to try. `flags` are its parts' finite flags as computed,
    then as stored: [image, image stored] or, with --flip, [image, mirror, image stored, mirror stored]."""
    half = len(flags) // 2
    names = ("the image", "its mirror (--flip)")
    if all(flags[:half]):  # finite in fp32, beyond the range of the files' dtype
        parts = [name for name, finite in zip(names, flags[half:]) if not finite]
        larger = [name for name in ("bf16", "fp32") if STORE_RANGE[name] > STORE_RANGE[store_dtype]]
        return (f"features of {' and '.join(parts)} beyond the range of --store_dtype {store_dtype} (|x| > "
                f"{STORE_RANGE[store_dtype]:.6g}): finite in fp32, inf once stored; no file written: store this "
                f"tree in {' or '.join(larger)} (--store_dtype {larger[0]} with another --output_dir, or with "
                f"--overwrite)")
    parts = [name for name, finite in zip(names, flags[:half]) if not finite]
    what = f"non-finite features (NaN or inf) for {' and '.join(parts)}, computed in {dtype}; no file written: "
    if dtype == "fp16":
        return what + "most likely an fp16 overflow, rerun with --dtype bf16 or --dtype fp32"
    if dtype == "bf16":
        return what + "rerun with --dtype fp32"
    return what + ("a sound checkpoint does not do that in fp32, so the weights of --model are likely broken "
                   "(NaN or inf values, a damaged download): check them or download them again")
