"""What made the files: manifest.json, the refusal to mix settings in one output tree, and --overwrite."""

import json
import os
import platform
import shutil
from pathlib import Path

from pyramid.exits import DamagedFile, UsageError
from pyramid.families import DEFAULT_FAMILY
from pyramid.levels import level_key, pyramid_sizes
from pyramid.tree import (
    DERIVED_NAMES,
    MANIFEST_NAME,
    REPLACING_KEY,
    manifest_differences,
    read_manifest,
)
from pyramid.writer import write_atomic

FORMAT_VERSION = 1


def package_versions(family=DEFAULT_FAMILY):
    """Versions of the packages that decide the numbers in the files: DINOv3's pixels are torchvision's too."""
    import accelerate
    import PIL
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                "pillow": PIL.__version__}
    if family == "dinov3":
        import torchvision

        versions["torchvision"] = torchvision.__version__
    return versions


def build_manifest(info, dtype, flip=False, pixels=None, store_dtype="fp32"):
    """The manifest of a run: the settings that decide every value in its files. `info`: the model's
    encoder.ModelInfo; `dtype`: the one the model computes in; `store_dtype`: the files' ("fp32", "bf16",
    "fp16"); `pixels`: the pixel pipeline, {"image_processor": {"class", "backend"}, "decoders": {name: version}}."""
    return {"format": FORMAT_VERSION, "model": info.name, "model_family": info.family, "revision": info.revision,
            "dtype": dtype, "store_dtype": store_dtype, "resolution": info.resolution, "crop_size": info.crop_size,
            "patch_size": info.patch_size, "grid_size": info.grid_size,
            "levels": [level_key(size) for size in pyramid_sizes(info.grid_size)], "hidden_size": info.hidden_size,
            "num_register_tokens": info.num_register_tokens, "flip": flip, **(pixels or {}),
            "versions": package_versions(info.family)}


def version_changes(existing, wanted):
    """{package: [old version, new version]} for the packages and decoders whose versions differ between two
    manifests (packages recorded in only one are left out)."""
    def versions(manifest):
        decoders = manifest.get("decoders")
        return {**(manifest.get("versions") or {}), **(decoders if isinstance(decoders, dict) else {})}

    old, new = versions(existing), versions(wanted)
    return {name: [old[name], new[name]] for name in sorted(old.keys() & new.keys()) if old[name] != new[name]}


def write_manifest(output_dir, manifest):
    """Write manifest.json atomically (writer.write_atomic: a temporary file never followed through a link,
    then a rename)."""
    write_atomic([(json.dumps(manifest, indent=2) + "\n").encode()], Path(output_dir) / MANIFEST_NAME)


def adopt_output_tree(output_dir, wanted, finished, overwrite):
    """Make `wanted` the manifest of `output_dir`; return the existing .pt files that may be kept.

    `finished` are the relative paths of the .pt files there. Files of other settings are refused
    (UsageError) or, with `overwrite`, removed; so are files without any manifest. A replacement is
    crash-safe: the new manifest is first written with a "replacing" mark, then the old files go,
    then the mark is cleared. A run with the new settings that finds the mark finishes the removal;
    a run with the old settings finds the new manifest and is refused.
    """
    output_dir = Path(output_dir)
    try:
        existing = read_manifest(output_dir)
    except DamagedFile as error:
        if os.path.isdir(error.path) and not os.path.islink(error.path):  # no rename can replace a directory
            raise UsageError(f"{error.path}: is a directory, where the tree's manifest goes; the extractor never "
                             f"makes one, so move it away (or use another --output_dir) and rerun") from None
        if not overwrite:
            raise UsageError(f"{error.path}: {error.problem.partition('; ')[0]}, so nothing says which "
                             f"settings made the files; use another --output_dir, or --overwrite to recompute "
                             f"them all") from None
        existing = {}  # unreadable: every setting differs, and --overwrite replaces the files
    if existing is None:
        if finished and not overwrite:
            raise UsageError(f"{output_dir} holds {len(finished)} .pt file(s) but no {MANIFEST_NAME}, so nothing "
                             f"says which settings made them; use another --output_dir, or --overwrite to "
                             f"recompute them all")
        replace = bool(finished)
    else:
        differences = manifest_differences(existing, wanted)
        if differences and not overwrite:
            raise UsageError(f"{output_dir} holds files made with other settings ({'; '.join(differences)}); "
                             f"use another --output_dir, or --overwrite to recompute them all")
        replace = bool(differences) or bool(existing.get(REPLACING_KEY))
    if not replace:
        write_manifest(output_dir, wanted)
        return set(finished)
    write_manifest(output_dir, {**wanted, REPLACING_KEY: True})
    doomed = [output_dir / relative for relative in sorted(finished)] + [output_dir / name for name in DERIVED_NAMES]
    for path in doomed:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:  # the mark stays: the next run with these settings tries again
            raise UsageError(f"--overwrite cannot remove {path}: {error.strerror or error}; fix that and "
                             f"rerun the same command") from error
    write_manifest(output_dir, wanted)
    return set()
