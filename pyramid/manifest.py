"""What made the files: manifest.json, the refusal to mix settings in one output tree, and --overwrite."""

import json
import os
import platform
import shutil
from pathlib import Path

from pyramid.exits import UsageError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Set while --overwrite removes the files of other settings: the manifest already names the new
# settings, but old files may remain until the removal is finished (by this run or the next).
REPLACING_KEY = "replacing"
# Versions are recorded for the record; a different library version does not make a file different.
UNCOMPARED_KEYS = frozenset({"versions", REPLACING_KEY})
# The pixel pipeline (pyramid.decode.pixel_pipeline): compared like the settings, the decoders by name; their
# versions, like the packages', are said and recorded, not refused.
PIXEL_KEYS = ("image_processor", "decoders")
# What a replacement removes besides the .pt files: data derived from the old files (the failures
# record, the statistics, the packed copy), so nothing is left that claims to match the new settings.
DERIVED_NAMES = ("failures.jsonl", "stats.pt", "pack")


def package_versions():
    """Versions of the packages that decide the numbers in the files."""
    import accelerate
    import PIL
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "pillow": PIL.__version__}


def build_manifest(model, revision, dtype, crop_size, patch_size, levels, hidden_size, num_register_tokens,
                   flip=False, pixels=None):
    """The manifest of a run: the settings that decide every value in its files. `pixels`: the pixel
    pipeline, {"image_processor": {"class", "backend"}, "decoders": {name: version}}."""
    return {"format": FORMAT_VERSION, "model": model, "revision": revision, "dtype": dtype,
            "crop_size": crop_size, "patch_size": patch_size, "grid_size": crop_size // patch_size,
            "levels": list(levels), "hidden_size": hidden_size,
            "num_register_tokens": num_register_tokens, "flip": flip, **(pixels or {}),
            "versions": package_versions()}


def read_manifest(output_dir):
    """The manifest in `output_dir`, or None where there is none."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if isinstance(manifest, dict):
        manifest.setdefault("flip", False)  # written before --flip existed: no flip/ levels
    return manifest


def _compared(key, value):
    """The part of a manifest value that a run must match: the decoders by name, not version."""
    return sorted(value) if key == "decoders" and isinstance(value, dict) else value


def manifest_differences(existing, wanted):
    """Human-readable differences in the compared settings: ["dtype: fp16 -> fp32", ...].

    A manifest written before the pixel pipeline was recorded differs in it: nothing says whether its
    files were made by the same processor and decoders (the torchvision backend's pixels, say).
    """
    differences = []
    for key in sorted((set(existing) | set(wanted)) - UNCOMPARED_KEYS):
        old, new = _compared(key, existing.get(key)), _compared(key, wanted.get(key))
        if old == new:
            continue
        if old is None and key in PIXEL_KEYS:
            differences.append(f"{key}: not recorded (a manifest from before it was) -> {new!r}")
        else:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def version_changes(existing, wanted):
    """{package: [old version, new version]} for the packages and decoders whose versions differ between two
    manifests (packages recorded in only one are left out)."""
    def versions(manifest):
        decoders = manifest.get("decoders")
        return {**(manifest.get("versions") or {}), **(decoders if isinstance(decoders, dict) else {})}

    old, new = versions(existing), versions(wanted)
    return {name: [old[name], new[name]] for name in sorted(old.keys() & new.keys()) if old[name] != new[name]}


def write_manifest(output_dir, manifest):
    """Write manifest.json atomically (temporary file, then rename)."""
    path = Path(output_dir) / MANIFEST_NAME
    temporary = path.with_name(f".{MANIFEST_NAME}.tmp.{os.getpid()}")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, path)


def adopt_output_tree(output_dir, wanted, finished, overwrite):
    """Make `wanted` the manifest of `output_dir`; return the existing .pt files that may be kept.

    `finished` are the relative paths of the .pt files there. Files of other settings are refused
    (UsageError) or, with `overwrite`, removed; so are files without any manifest. A replacement is
    crash-safe: the new manifest is first written with a "replacing" mark, then the old files go,
    then the mark is cleared. A run with the new settings that finds the mark finishes the removal;
    a run with the old settings finds the new manifest and is refused.
    """
    output_dir = Path(output_dir)
    existing = read_manifest(output_dir)
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
