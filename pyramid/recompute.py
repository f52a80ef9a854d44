"""`verify --recompute N`: re-encode a seeded sample of the images with the manifest's model and settings, in
fp32, through the extractor's own decode, encode and pool code, and name each file that differs beyond the
tolerance of the dtype it was made in."""

import math
import random
from pathlib import Path

from pyramid.cli import LazyModule
from pyramid.exits import UsageError
from pyramid.levels import build_pyramid, split_twins
from pyramid.paths import output_path_for
from pyramid.progress import Progress
from pyramid.tree import manifest_resolution, stored_dtype, with_defaults, with_twins

torch = LazyModule("torch")  # loaded by the first comparison, so --help and bad arguments answer at once

# The rounding of the files' dtype (--store_dtype), as the unit roundoff u: rounding to nearest moves a value x by
# at most u * |x| (u * the smallest normal below it, where fp16's subnormals are). bf16 keeps 8 significant bits
# (u = 2**-8), fp16 11 (u = 2**-11), fp32 is what the levels are computed in (u = 0). A file's distance from its
# recomputation leaves it out (relative_error); verify's 2x2 check allows it twice (verify.RTOL).
STORE_ROUNDING = {"fp32": 0.0, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
# --recompute: the largest max|file - recomputed| / RMS(recomputed), per level, that a file made in the
# manifest's dtype may show against its fp32 recomputation. Measured in docs/verify.md (worst seen on CPU:
# fp32 0, fp16 0.0093, bf16 0.085), with room for GPU kernels and trained weights; another model of the
# same architecture shows 5 or more.
RECOMPUTE_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "bf16": 0.75}
RECOMPUTE_BATCH_SIZE = 16
SAMPLE_NAMES_SHOWN = 20


def sample_images(images, count, seed):
    """A seeded random sample of `count` of `images` (all of them when count is at least their number),
    sorted: the same images, seed and count give the same sample on every machine."""
    images = sorted(images)
    if count >= len(images):
        return images
    return sorted(random.Random(seed).sample(images, count))


def relative_error(stored, recomputed, store_dtype="fp32"):
    """max|stored - recomputed| / RMS(recomputed) of one level: scale-free, so one tolerance fits every level
    and model size, and the max sees a single wrong patch or channel that a mean or a cosine would dilute.
    inf when they differ where the recomputation is all zeros, or where a value is not finite.

    Files stored in bf16 or fp16 are first given the store's rounding: each difference less u * |recomputed|
    (u of STORE_ROUNDING; u * fp16's smallest normal below it), which no file rounded once from its fp32 levels
    exceeds, so the error left is the model dtype's alone and one tolerance per model dtype serves every store."""
    from pyramid.reader import STORED_DTYPES

    recomputed = recomputed.double()
    difference = (stored.double() - recomputed).abs()
    unit = STORE_ROUNDING[store_dtype]
    if unit:
        smallest = torch.finfo(STORED_DTYPES[store_dtype]).smallest_normal
        difference = (difference - unit * recomputed.abs().clamp_min(smallest)).clamp_min(0)
    difference = difference.max()
    rms = recomputed.pow(2).mean().sqrt()
    if rms == 0:
        return 0.0 if difference == 0 else math.inf
    error = float(difference / rms)
    return error if math.isfinite(error) else math.inf


def format_errors(errors):
    """{"16x16": 1.2e-06, ...} -> '16x16 1.2e-06, ...'."""
    return ", ".join(f"{level} {error:.3g}" for level, error in errors.items())


class Recompute:
    """--recompute: the manifest's model and settings, loaded and checked before any file is read."""

    def __init__(self, manifest, model=None):
        """Raises UsageError, in one line, when the files cannot be recomputed as they were made."""
        from pyramid.decode import Preprocess
        from pyramid.encoder import Encoder, ModelError, load_model_info

        self.dtype = manifest.get("dtype")
        if self.dtype not in RECOMPUTE_TOLERANCE:
            raise UsageError(f"--recompute: the manifest's dtype is {self.dtype!r}, not one of "
                             f"{', '.join(RECOMPUTE_TOLERANCE)}")
        name = model if model is not None else manifest.get("model")
        try:
            info, processor = load_model_info(name, manifest_resolution(manifest))
        except ModelError as error:
            raise UsageError(f"--recompute cannot load the model that made the files: {error}") from error
        if info.revision != manifest.get("revision"):
            raise UsageError(f"--recompute: the weights of {name} are {info.revision}, the files were made with "
                             f"{manifest.get('revision')}; give --model the weights that made them")
        wanted = {"model_family": info.family, "resolution": info.resolution, "crop_size": info.crop_size,
                  "patch_size": info.patch_size, "hidden_size": info.hidden_size,
                  "num_register_tokens": info.num_register_tokens}
        recorded = with_defaults(manifest)
        differences = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in wanted.items()
                       if recorded.get(key) != value]
        if differences:
            raise UsageError(f"--recompute: model {name} does not make the manifest's files "
                             f"({'; '.join(differences)})")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.levels = with_twins(manifest["levels"], manifest.get("flip", False))
        self.preprocess = Preprocess(processor, flip=manifest.get("flip", False))
        try:
            self.encoder = Encoder(info, self.preprocess.normaliser(self.device), self.device, "fp32")
        except ModelError as error:
            raise UsageError(f"--recompute: {error}") from error
        self.name = name
        self.tolerance = RECOMPUTE_TOLERANCE[self.dtype]
        self.store_dtype = stored_dtype(manifest)

    def compare(self, input_dir, output_dir, images):
        """Re-encode `images` (relative to input_dir) through the extractor's own decode, encode and pool
        code, and compare each with its file.

        Returns ({relative output path: why it differs}, [(image path, why it cannot be recomputed)],
        the worst error per level of {"all": files compared, "agreeing": those within tolerance}, the number
        compared).
        """
        from pyramid.decode import image_loader

        differing, unreadable, compared = {}, [], 0
        worst = {"all": dict.fromkeys(self.levels, 0.0), "agreeing": dict.fromkeys(self.levels, 0.0)}
        loader = image_loader(input_dir, images, self.preprocess, RECOMPUTE_BATCH_SIZE, num_workers=0)
        progress = Progress(len(images), desc="recomputed")
        for indices, pixels, failures in loader:
            unreadable += [(Path(input_dir) / images[index], f"cannot be recomputed: {message}")
                           for index, message in failures]
            if pixels is not None:
                levels = build_pyramid(self.encoder(pixels), self.encoder.info.grid_size)  # {"16x16": (B, 256, D)}
                if self.preprocess.flip:
                    levels = split_twins(levels)  # the images, then their mirrors under flip/
                levels = {key: value.cpu() for key, value in levels.items()}
                for row, index in enumerate(indices.tolist()):
                    relative = output_path_for(images[index])
                    try:
                        stored = torch.load(Path(output_dir) / relative, map_location="cpu", weights_only=True)
                        errors = {level: relative_error(stored[level], levels[level][row:row + 1],
                                                        self.store_dtype) for level in self.levels}
                    except Exception as error:  # changed since it was checked: gone, torn, rewritten
                        differing[relative] = (f"cannot be compared with its recomputation "
                                               f"({type(error).__name__}: {error})")
                        continue
                    compared += 1
                    beyond = {level: error for level, error in errors.items() if not error <= self.tolerance}
                    for group in ("all", "agreeing") if not beyond else ("all",):
                        worst[group] = {level: max(worst[group][level], errors[level]) for level in self.levels}
                    if beyond:
                        level = max(beyond, key=beyond.get)
                        differing[relative] = (f"differs from its recomputation beyond the {self.dtype} tolerance "
                                               f"{self.tolerance:g} in {len(beyond)} level(s) (worst {level}: "
                                               f"max|diff|/RMS {beyond[level]:.3g}): not what {self.name} makes "
                                               f"of {images[index]} with these settings")
            progress.update(progress.done + len(indices) + len(failures))
        progress.close()
        return differing, unreadable, worst, compared


def recompute_sample(recompute, args, with_files, bad_files):
    """Draw --recompute's sample of `with_files` (images that have a file) and compare it; files in `bad_files`
    are sampled but not compared (their problems are named already).

    Returns (problems as (path, sentence), the relative paths of the files that differ, the report's lines).
    """
    sample = sample_images(with_files, args.recompute, args.seed)
    unchecked = [image for image in sample if output_path_for(image) in bad_files]
    differing, unreadable, worst, compared = recompute.compare(
        args.input_dir, args.output_dir, [image for image in sample if output_path_for(image) not in bad_files])
    problems = [(args.output_dir / relative, problem) for relative, problem in differing.items()] + unreadable
    shown = ", ".join(sample[:SAMPLE_NAMES_SHOWN])
    if len(sample) > SAMPLE_NAMES_SHOWN:
        shown += f", ... ({len(sample) - SAMPLE_NAMES_SHOWN} more)"
    report = [f"recompute: sampled {len(sample)} of {len(with_files)} images with a file (seed {args.seed}): {shown}",
              f"recompute: compared {compared} with {recompute.name} in fp32 on {recompute.device.type}"
              + (f" ({len(unchecked)} with problems above not compared)" if unchecked else ""),
              f"recompute: worst max|file - recomputed|/RMS per level{store_rounding_said(recompute.store_dtype)}: "
              f"{format_errors(worst['all'])}; tolerance for {recompute.dtype} files {recompute.tolerance:g}"]
    if differing and compared > len(differing):
        report.append(f"recompute: of the {compared - len(differing)} files that agree: "
                      f"{format_errors(worst['agreeing'])}")
    return problems, set(differing), report


def store_rounding_said(store_dtype):
    """'' for fp32 files; for bf16 and fp16 files, what relative_error leaves out before comparing."""
    unit = STORE_ROUNDING[store_dtype]
    return f" (beyond the {store_dtype} store's rounding, 2**{int(math.log2(unit))} of each value)" if unit else ""
