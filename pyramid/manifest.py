"""What made the files: manifest.json, and the refusal to mix settings in one output tree."""

import json
import os
import platform
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Versions are recorded for the record; a different library version does not make a file different.
UNCOMPARED_KEYS = frozenset({"versions"})


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
                   flip=False):
    """The manifest of a run: the settings that decide every value in its files."""
    return {"format": FORMAT_VERSION, "model": model, "revision": revision, "dtype": dtype,
            "crop_size": crop_size, "patch_size": patch_size, "grid_size": crop_size // patch_size,
            "levels": list(levels), "hidden_size": hidden_size,
            "num_register_tokens": num_register_tokens, "flip": flip, "versions": package_versions()}


def read_manifest(output_dir):
    """The manifest in `output_dir`, or None where there is none."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if isinstance(manifest, dict):
        manifest.setdefault("flip", False)  # written before --flip existed: no flip/ levels
    return manifest


def manifest_differences(existing, wanted):
    """Human-readable differences in the compared settings: ["dtype: fp16 -> fp32", ...]."""
    keys = sorted((set(existing) | set(wanted)) - UNCOMPARED_KEYS)
    return [f"{key}: {existing.get(key)!r} -> {wanted.get(key)!r}"
            for key in keys if existing.get(key) != wanted.get(key)]


def write_manifest(output_dir, manifest):
    """Write manifest.json atomically (temporary file, then rename)."""
    path = Path(output_dir) / MANIFEST_NAME
    temporary = path.with_name(f".{MANIFEST_NAME}.tmp.{os.getpid()}")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, path)
