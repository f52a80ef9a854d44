"""The DINOv2 model and its image processor: uint8 pixels in, the patch grid out."""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pyramid.pool import strip_special_tokens

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class ModelError(Exception):
    """The model or its processor cannot be used; the message says why in one line."""


def resolve_dtype(name, device):
    """'auto' -> 'fp16' on CUDA, 'fp32' elsewhere; any other name is returned as it is."""
    if name != "auto":
        return name
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


@dataclass(frozen=True)
class ModelInfo:
    """What the manifest and the pooling need to know of a model, read without loading its weights."""

    name: str
    revision: str | None
    crop_size: int
    patch_size: int
    hidden_size: int
    num_register_tokens: int

    @property
    def grid_size(self):
        return self.crop_size // self.patch_size


def _crop_size(processor):
    """The square side of the processor's output: its centre crop, or its fixed resize."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    height, width = (getattr(size, "height", None), getattr(size, "width", None)) if not isinstance(size, dict) \
        else (size.get("height"), size.get("width"))
    if not height or height != width:
        raise ModelError(f"the image processor makes {height}x{width} images; a square crop is needed "
                         f"for a square patch grid")
    return int(height)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def local_weights_digest(directory):
    """'sha256:...' of the weight files of a save_pretrained directory, in name order.

    A local model has no hub revision; its digest stands in for one in the manifest, so new weights
    saved at the same path are not mixed with files made by the old ones.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(path.name.encode())
        with open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


# How long the one request that asks the hub whether a model exists may take.
HUB_PROBE_SECONDS = 10


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def looks_local(name):
    """True for a --model that can only mean a directory: '/x', './x', '../x', '~/x', 'a/b/c', or 'a/b' where
    'a' exists here. A hub id is 'name' or 'owner/name'."""
    name = str(name)
    if name.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in name:
        return True
    parts = name.split("/")
    return len(parts) > 2 or len(parts) == 2 and os.path.exists(parts[0])


def _hub_model_error(name):
    """The one-line ModelError for a hub id that is not in the HF cache: offline, unreachable, or not there.

    Asked once, without the hub client's retries (about 35 s of them when the hub is unreachable).
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cache = constants.HF_HUB_CACHE
    if constants.is_offline_mode():
        return ModelError(f"model {name!r} is not in the HF cache ({cache}) and HF_HUB_OFFLINE=1 keeps the hub out; "
                          f"download it once with a network, or pass a local save_pretrained directory")
    try:
        HfApi().model_info(name, timeout=HUB_PROBE_SECONDS)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        return ModelError(f"the hub has no model {name!r} that you may read ({_first_line(error)}); check the id, "
                          f"or log in (hf auth login) for a private or gated one")
    except Exception as error:  # DNS, refused, timeout, proxy: all mean "not reachable from here"
        return ModelError(f"model {name!r} is not in the HF cache ({cache}) and the hub "
                          f"({constants.ENDPOINT}) could not be reached ({_first_line(error)}); check the id and "
                          f"the network, or pass a local save_pretrained directory (HF_HUB_OFFLINE=1 uses the "
                          f"cache alone)")
    return None


def _load_config_and_processor(name):
    """AutoConfig and AutoImageProcessor of `name`: a directory; or a hub id, from the HF cache when it is
    there, else from the hub once it answers."""
    directory = os.path.expanduser(str(name))
    if not os.path.isdir(directory) and looks_local(name):  # before transformers loads: fail in a moment
        raise ModelError(f"--model {name}: no such directory (a local model is a directory saved with "
                         f"save_pretrained: config.json, preprocessor_config.json and the weights)")
    from transformers import AutoConfig, AutoImageProcessor

    if os.path.isdir(directory):
        return AutoConfig.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory)
    try:
        return (AutoConfig.from_pretrained(name, local_files_only=True),
                AutoImageProcessor.from_pretrained(name, local_files_only=True))
    except Exception:  # not (wholly) in the cache: ask the hub
        pass
    error = _hub_model_error(name)
    if error is not None:
        raise error
    return AutoConfig.from_pretrained(name), AutoImageProcessor.from_pretrained(name)


def load_model_info(name):
    """Config and image processor of `name` (hub id or save_pretrained dir), checked, without weights.

    Returns (ModelInfo, processor). Raises ModelError with one clear line.
    """
    try:
        config, processor = _load_config_and_processor(name)
    except ModelError:
        raise
    except Exception as error:  # hub, network, missing file and JSON errors all mean "cannot load"
        raise ModelError(f"cannot load model {name!r}: {_first_line(error)}") from error
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model {name!r} is a {config.model_type!r}; this tool extracts DINOv2 "
                         f"(with or without registers)")
    crop_size = _crop_size(processor)
    if crop_size % config.patch_size:
        raise ModelError(f"crop size {crop_size} is not a multiple of patch size {config.patch_size}")
    directory = Path(os.path.expanduser(str(name)))
    revision = local_weights_digest(directory) if directory.is_dir() else getattr(config, "_commit_hash", None)
    info = ModelInfo(name=str(name), revision=revision, crop_size=crop_size,
                     patch_size=config.patch_size, hidden_size=config.hidden_size,
                     num_register_tokens=getattr(config, "num_register_tokens", 0))
    return info, processor


class Encoder:
    """A frozen DINOv2 on `device` computing in `dtype`: uint8 pixels (B, 3, H, W) -> patches (B, G*G, D) fp32.

    `normalise` turns the uint8 crops into the processor's float pixels on the device, so the
    host-to-device copy is uint8 and the model sees exactly the processor's values.
    """

    def __init__(self, info, normalise, device, dtype):
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one bar per run is ours; N loading bars are noise
        try:
            model = AutoModel.from_pretrained(info.name, dtype=DTYPES[dtype])
        except Exception as error:
            raise ModelError(f"cannot load the weights of {info.name!r}: {error}") from error
        self.model = model.to(device).eval().requires_grad_(False)
        self.info = info
        self.normalise = normalise
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]

    @torch.inference_mode()
    def __call__(self, pixels):
        pixels = self.normalise(pixels.to(self.device, non_blocking=True))  # (B, 3, H, W) fp32
        hidden = self.model(pixel_values=pixels.to(self.dtype)).last_hidden_state  # (B, 1+R+G*G, D)
        return strip_special_tokens(hidden, self.info.num_register_tokens).to(torch.float32)  # (B, G*G, D)
