"""The DINOv2 or DINOv3 model and its image processor: pixels in, the patch grid out."""

import hashlib
import os
import queue
from dataclasses import dataclass
from pathlib import Path

import torch

from pyramid.decode import is_pillow_processor, rescales_before_resizing
from pyramid.families import (
    PROCESSOR_BACKEND,
    family_of,
    processor_overrides,
    resolution_error,
    torchvision_installed,
    torchvision_missing,
)
from pyramid.levels import strip_special_tokens

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    family: str = "dinov2"  # "dinov2" (with or without registers) or "dinov3"

    @property
    def grid_size(self):
        return self.crop_size // self.patch_size

    @property
    def resolution(self):
        """The side of the square the model sees (--resolution): the processor's crop, or its fixed resize."""
        return self.crop_size

    @property
    def pixel_bytes(self):
        """Bytes per value of the pixels the decode workers hand over: DINOv2's uint8 crops; DINOv3's processor
        resizes floats, so its pixels cross as float32."""
        return 4 if self.family == "dinov3" else 1


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


def is_out_of_memory(error):
    """True for an error a smaller batch may avoid: torch's OutOfMemoryError, or what accelerate takes
    for one (the allocators' messages, cuDNN's CUDNN_STATUS_NOT_SUPPORTED for too large an input)."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def first_line(error):
    """The first line of an error's message, or its type's name when it has none."""
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
        return ModelError(f"the hub has no model {name!r} that you may read ({first_line(error)}); check the id, "
                          f"or log in (hf auth login) for a private or gated one")
    except Exception as error:  # DNS, refused, timeout, proxy: all mean "not reachable from here"
        return ModelError(f"model {name!r} is not in the HF cache ({cache}) and the hub "
                          f"({constants.ENDPOINT}) could not be reached ({first_line(error)}); check the id and "
                          f"the network, or pass a local save_pretrained directory (HF_HUB_OFFLINE=1 uses the "
                          f"cache alone)")
    return None


def _load_from_directory_or_hub(name, load):
    """`load(source, **kwargs)` (a from_pretrained) of `name`: a directory; or a hub id, from the HF cache when it
    is there, else from the hub once it answers."""
    directory = os.path.expanduser(str(name))
    if not os.path.isdir(directory) and looks_local(name):  # before transformers loads: fail in a moment
        raise ModelError(f"--model {name}: no such directory (a local model is a directory saved with "
                         f"save_pretrained: config.json, preprocessor_config.json and the weights)")
    if os.path.isdir(directory):
        return load(directory)
    try:
        return load(name, local_files_only=True)
    except Exception:  # not (wholly) in the cache: ask the hub
        pass
    error = _hub_model_error(name)
    if error is not None:
        if "/" in str(name):  # 'models/x' reads as a hub id, but was perhaps meant as a directory
            raise ModelError(f"{error}; nor is there a directory {name} in {os.getcwd()}")
        raise error
    return load(name)


def _load_processor(name, family, resolution):
    """The model's own image processor, of its family's backend (PROCESSOR_BACKEND), set to make `resolution` x
    `resolution` pixels (its own size where None). The Pillow backend for DINOv2 whatever is installed:
    AutoImageProcessor's default is the torchvision backend wherever torchvision is, and its pixels differ from
    Pillow's on non-square images."""
    from transformers import AutoImageProcessor

    backend = PROCESSOR_BACKEND[family]

    def load(source, **kwargs):
        return AutoImageProcessor.from_pretrained(source, backend=backend, **kwargs)

    processor = _load_from_directory_or_hub(name, load)
    size = processor.size
    shortest_edge = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    overrides = processor_overrides(family, _crop_size(processor), shortest_edge, resolution)
    if not overrides:
        return processor
    if family == "dinov2" and not (shortest_edge and getattr(processor, "do_center_crop", False)):
        raise ModelError(f"--resolution: the image processor of {name!r} does not resize the shortest edge and "
                         f"centre-crop, as DINOv2's does; run without --resolution")
    return _load_from_directory_or_hub(name, lambda source, **kwargs: load(source, **overrides, **kwargs))


def check_local_model(name):
    """A ModelError naming what a local model directory lacks, before transformers reads it: its messages
    for a missing file speak of the hub, and a directory without weights would pass this far and have its
    digest of no weights recorded in the manifest, refusing the run made once they are copied in."""
    directory = Path(os.path.expanduser(str(name)))
    if not directory.is_dir():
        return
    missing = [file for file in ("config.json", "preprocessor_config.json") if not (directory / file).is_file()]
    if not any(path.name.endswith(WEIGHT_SUFFIXES) for path in directory.iterdir()):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        raise ModelError(f"--model {name}: this directory has no {' and no '.join(missing)}; a local model is a "
                         f"directory saved with save_pretrained: config.json, preprocessor_config.json and the weights")


def load_model_info(name, resolution=None):
    """Config and image processor of `name` (hub id or save_pretrained dir), checked, without weights. The
    processor makes `resolution` x `resolution` pixels (--resolution; None: its own size): DINOv2's Pillow
    backend, DINOv3's torchvision one (refused in one line where torchvision is missing).

    Returns (ModelInfo, processor). Raises ModelError with one clear line.
    """
    from transformers import AutoConfig

    check_local_model(name)
    try:
        config = _load_from_directory_or_hub(name, AutoConfig.from_pretrained)
    except ModelError:
        raise
    except Exception as error:  # hub, network, missing file and JSON errors all mean "cannot load"
        raise ModelError(f"cannot load model {name!r}: {first_line(error)}") from error
    family = family_of(config.model_type)
    if family is None:
        raise ModelError(f"model {name!r} is a {config.model_type!r}; this tool extracts DINOv2 (with or without "
                         f"registers) and DINOv3 ViT")
    if resolution is not None and resolution % config.patch_size:
        raise ModelError(resolution_error(resolution, config.patch_size, name))
    if family == "dinov3":
        try:
            import torchvision  # noqa: F401 - DINOv3's processor: installed, and importable with this torch
        except ImportError as error:
            raise ModelError(torchvision_missing(name) if not torchvision_installed() else
                             f"{name} is a DINOv3, whose image processor needs torchvision, which cannot be "
                             f"imported here ({first_line(error)}): install the build for your torch") from error
    try:
        processor = _load_processor(name, family, resolution)
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"cannot load the image processor of {name!r}: {first_line(error)}") from error
    if family == "dinov2" and not is_pillow_processor(processor):
        raise ModelError(f"the image processor of {name!r} ({type(processor).__name__}) has no Pillow backend, "
                         f"whose pixels the files are made of")
    if family == "dinov3" and not rescales_before_resizing(processor):
        raise ModelError(f"the image processor of {name!r} is a {type(processor).__name__}, not DINOv3's "
                         f"DINOv3ViTImageProcessor")
    crop_size = _crop_size(processor)
    if crop_size % config.patch_size:
        raise ModelError(f"crop size {crop_size} is not a multiple of patch size {config.patch_size}")
    directory = Path(os.path.expanduser(str(name)))
    revision = local_weights_digest(directory) if directory.is_dir() else getattr(config, "_commit_hash", None)
    info = ModelInfo(name=str(name), revision=revision, crop_size=crop_size,
                     patch_size=config.patch_size, hidden_size=config.hidden_size,
                     num_register_tokens=getattr(config, "num_register_tokens", 0) or 0, family=family)
    return info, processor


# The attention kernels SDPA dispatches to, by their aten op, as `attention_kernel` names them.
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention": "sdpa: flash",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa: flash (CPU)",
    "_scaled_dot_product_efficient_attention": "sdpa: mem-efficient",
    "_scaled_dot_product_cudnn_attention": "sdpa: cuDNN",
    "_scaled_dot_product_attention_math": "sdpa: math",
    "_scaled_dot_product_fused_attention_overrideable": "sdpa: device's own",
}


class Encoder:
    """A frozen DINOv2 on `device` computing in `dtype`: uint8 pixels (B, 3, H, W) -> patches (B, G*G, D) fp32.

    `normalise` turns the uint8 crops into the processor's float pixels on the device, so the
    host-to-device copy is uint8 and the model sees exactly the processor's values. Attention is
    PyTorch's scaled_dot_product_attention (SDPA), asked for by name: it picks flash or memory-efficient
    kernels where the device and dtype have them (`attention_kernel` says which runs).

    `compile=True` runs the model through torch.compile. A batch shorter than the longest one seen
    (a batch with failures, the last one) is padded with zero images to that length and the padding's
    output dropped: one shape, so one compilation. Where compiling fails (no compiler, no Triton), the
    first call says so in one line through `warn` and the model runs uncompiled from then on.
    """

    def __init__(self, info, normalise, device, dtype, compile=False, warn=None):
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one bar per run is ours; N loading bars are noise
        try:
            model = AutoModel.from_pretrained(info.name, dtype=DTYPES[dtype], attn_implementation="sdpa")
        except Exception as error:
            raise ModelError(f"cannot load the weights of {info.name!r}: {error}") from error
        if torch.device(device).type == "cuda" and dtype == "fp32":
            # cuDNN runs fp32 convolutions (the patch embedding) in TF32 by default: fp32 means fp32 here.
            torch.backends.cudnn.allow_tf32 = False
        self.model = model.to(device).eval().requires_grad_(False)
        self.info = info
        self.normalise = normalise
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.compiled = torch.compile(self.model) if compile else None
        self.compile_failure = None  # the one line said when compiling failed
        self._warn = warn
        self._rows = 0  # the longest batch the compiled model has seen

    @torch.inference_mode()
    def __call__(self, pixels):
        pixels = self.normalise(pixels.to(self.device, non_blocking=True))  # (B, 3, H, W) fp32
        hidden = self._forward(pixels.to(self.dtype))  # (B, 1+R+G*G, D)
        return strip_special_tokens(hidden, self.info.num_register_tokens).to(torch.float32)  # (B, G*G, D)

    def reset_padding(self):
        """Pad no batch past the next one's length: after an out-of-memory error the batch is smaller."""
        self._rows = 0

    def _forward(self, pixels):
        if self.compiled is None:
            return self.model(pixel_values=pixels).last_hidden_state
        rows = pixels.shape[0]
        self._rows = max(self._rows, rows)
        padded = torch.cat([pixels, pixels.new_zeros((self._rows - rows, *pixels.shape[1:]))]) \
            if rows < self._rows else pixels  # (rows seen, 3, H, W)
        try:
            return self.compiled(pixel_values=padded).last_hidden_state[:rows]
        except Exception as error:  # the compiler's own errors: no C++ compiler, no Triton, an unsupported op
            if is_out_of_memory(error):  # the batch's, not the compiler's: the run halves it
                raise
            self.compiled = None
            self.compile_failure = (f"warning: --compile: the model cannot be compiled here "
                                    f"({type(error).__name__}: {first_line(error)[:200]}); it runs uncompiled")
            if self._warn is not None:
                self._warn(self.compile_failure)
            return self.model(pixel_values=pixels).last_hidden_state


def attention_kernel(encoder, batch_size):
    """The attention kernel `encoder`'s model runs for a batch of `batch_size` crops, in its dtype on
    its device: 'sdpa: flash', 'sdpa: mem-efficient', 'sdpa: cuDNN', 'sdpa: math', ... (several joined
    by ', ' if layers differ), or 'eager: matmul + softmax' where the model never calls SDPA.

    Read off the aten ops one real forward pass dispatches (SDPA picks its kernel per call, from the
    device, dtype and shapes).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    side = encoder.info.crop_size
    pixels = torch.zeros((batch_size, 3, side, side), dtype=torch.uint8, device=encoder.device)
    # no_grad, not inference_mode: under inference_mode the dispatch mode sees SDPA before it picks a kernel.
    with torch.no_grad(), Seen() as seen:
        encoder.model(pixel_values=encoder.normalise(pixels).to(encoder.dtype))
    kernels = sorted(name for op, name in SDPA_KERNELS.items() if op in seen.names)
    return ", ".join(kernels) if kernels else "eager: matmul + softmax"


class CopyDone:
    """The CUDA event of one batch's device-to-host copy, to wait on from any thread.

    The wait runs with the copy's device current: a fresh thread's current device is GPU 0, and a CUDA
    call there would open a second context on GPU 0 in every process of a multi-GPU node.
    """

    def __init__(self, event, device_index):
        self.event = event
        self.device_index = device_index

    def synchronize(self):
        with torch.cuda.device(self.device_index):
            self.event.synchronize()  # releases the GIL while it waits


HOLDER_CHECK_SECONDS = 1.0  # how often a wait for a free buffer looks whether its holder is alive


class HostCopies:
    """Device-to-host copies of batched pyramids that keep the GPU computing.

    On CUDA, `start` queues the copy of a batch's levels on a side stream, into pinned host buffers
    with non_blocking copies, and returns at once: the GPU runs batch k+1's forward pass while batch
    k's pyramid crosses to the host, and the host never waits for the GPU. It returns the host
    tensors, a CUDA event that completes once they hold their values (the writer waits on it, on its
    own thread), and a `release` that gives the buffers back. A fixed number of pinned buffer sets
    is reused: `start` blocks while all are lent out (`waits` counts how often), so memory stays flat
    and a GPU that outruns the writer waits for it instead of queueing without end. Six sets: each
    of up to four writer threads holds one while it writes its files from it, and two more let the
    GPU run ahead.

    Elsewhere the levels are already on the host: they are returned as they are, with no event.

    `holder_alive`, where set, is called while `start` waits for a buffer: it raises once whoever holds
    the buffers (the writer's threads: Writer.check_alive) is gone, so that wait never lasts for ever.
    """

    def __init__(self, device, batch_size, buffers=6):
        self.device = torch.device(device)
        self.batch_size = batch_size  # the rows of a buffer: a batch with failures is shorter, never longer
        self.buffers = buffers
        self.waits = 0  # batches that found every buffer set lent out and waited for one
        self.made = 0  # buffer sets allocated so far, at most `buffers`
        self._free = queue.Queue()  # pinned buffer sets the writer has released
        self.holder_alive = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._device_index = None
        if self._stream is not None:
            self._device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()

    def start(self, levels):
        """Begin copying {"16x16": (B, 256, D) on the device, ...}; returns (host levels, ready, release)."""
        if self._stream is None:
            return {key: value.cpu() for key, value in levels.items()}, None, None
        buffer = self._take_buffer(levels)
        # The copy may read the levels only once the default stream has computed them.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self._stream):
            for key, value in levels.items():
                host[key] = buffer[key][:value.shape[0]]  # (B, S*S, D) view of the pinned buffer
                host[key].copy_(value, non_blocking=True)
                # The caching allocator must not hand this memory to batch k+1 while the copy reads it.
                value.record_stream(self._stream)
            event = torch.cuda.Event(blocking=True)  # a writer waiting on it sleeps instead of spinning a core
            event.record(self._stream)
        return host, CopyDone(event, self._device_index), lambda: self._free.put(buffer)

    def _take_buffer(self, levels):
        """A free pinned buffer set that fits `levels`; a new one while fewer than `buffers` exist."""
        if self._free.empty() and self.made < self.buffers:
            self.made += 1
            return self._allocate(levels)
        if self._free.empty():
            self.waits += 1
        buffer = self._next_free()  # waits while the writer still holds every buffer
        fits = buffer.keys() == levels.keys() and all(
            buffer[key].shape[1:] == value.shape[1:] and buffer[key].shape[0] >= value.shape[0]
            and buffer[key].dtype == value.dtype for key, value in levels.items())
        return buffer if fits else self._allocate(levels)

    def _next_free(self):
        """The next released buffer set, waiting while its holder is alive."""
        while True:
            try:
                return self._free.get(timeout=HOLDER_CHECK_SECONDS)
            except queue.Empty:
                if self.holder_alive is not None:
                    self.holder_alive()

    def _allocate(self, levels):
        return {key: torch.empty((max(self.batch_size, value.shape[0]), *value.shape[1:]), dtype=value.dtype,
                                 pin_memory=True)
                for key, value in levels.items()}
