"""Open an image by the contract's input rules and preprocess it with the model's own processor.

The input rules: EXIF orientation applied; converted to RGB (alpha dropped; grey, palette, CMYK
converted); 16-bit images scaled to 8 bits by value / 257 (rounded), not clipped.

Accepted: every valid PNG (each colour type at each bit depth, interlaced or not; 1, 2 and 4-bit
samples expanded as Pillow does, value * 255 / (2**depth - 1); tRNS, gAMA and sBIT ignored), JPEG
(grey, RGB, CMYK with Adobe's inverted ink, progressive), WebP (lossy, lossless, alpha) and
uncompressed BMP (1, 8, 24, 32-bit; rows bottom-up or top-down; 32-bit with or without bitfields).
tests/test_decode.py checks each against a decoder that shares no code with pyspng or Pillow.
"""

import io
import os
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

try:
    import pyspng  # libspng: the same pixels as Pillow for PNG, at about twice the speed
except ImportError:
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION = 0x0112


def scale_16_to_8(values):
    """round(value / 257) for 16-bit values, as uint8: 0 -> 0, 65535 -> 255, 257 * k -> k."""
    values = np.asarray(values, dtype=np.int64)
    return ((2 * values + 257) // 514).astype(np.uint8)


def _rgb_from_16bit_png(data):
    """RGB uint8 (H, W, 3) from a 16-bit PNG of any colour type; pyspng keeps the 16 bits that Pillow
    would truncate.

    libspng's RGBA16 is the one 16-bit output it gives for every colour type (its GA16, which
    pyspng.load picks for grey+alpha, refuses grey+alpha input: "invalid format"), so it is asked
    for by name through pyspng's binding: grey is expanded into R, G and B, alpha is then dropped.
    """
    pixels = pyspng.c.spng_decode_image_bytes(data, pyspng.c.SPNG_FMT_RGBA16)  # (H, W, 4) uint16
    return scale_16_to_8(pixels[..., :3])


# How to turn stored pixels for display, by EXIF orientation (the mapping of ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _png_orientation(data):
    """The EXIF orientation of PNG bytes (1 when none), read by Pillow from the eXIf chunk."""
    with Image.open(io.BytesIO(data)) as opened:
        return opened.getexif().get(EXIF_ORIENTATION, 1)


def _decode_png(data):
    """RGB Image from PNG bytes via pyspng, turned by its EXIF orientation where it has an eXIf chunk.

    The pixels always come from pyspng, even with EXIF: Pillow truncates 16-bit colour to its high byte.
    """
    # IHDR is always the first chunk: signature(8) + length(4) + type(4) + w(4) + h(4), then the depth;
    # a file too short to hold it is left to pyspng, whose error names the problem.
    bit_depth = data[24] if len(data) > 24 else 0
    if bit_depth == 16:
        image = Image.fromarray(_rgb_from_16bit_png(data))
    else:
        image = Image.fromarray(pyspng.load(data, format="RGB"))
    if b"eXIf" in data:  # rare; the bytes may also occur by chance in compressed data: then orientation 1
        transpose = ORIENTATION_TRANSPOSE.get(_png_orientation(data))
        if transpose is not None:
            image = image.transpose(transpose)
    return image


def _to_rgb(image):
    """A new RGB image from an opened Pillow image, by the input rules (after EXIF orientation)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = scale_16_to_8(np.clip(np.asarray(image), 0, 65535))
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")  # a copy even when already RGB: the opened file is closed below


def load_rgb(path):
    """Read the image at `path` as an RGB Pillow image by the input rules. Raises on a broken file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        if os.path.islink(path):  # listed by paths.find_images: say why the name leads nowhere
            raise FileNotFoundError(f"dangling symbolic link to {os.readlink(path)!r}") from None
        raise
    if not data:
        raise ValueError("empty file")
    if pyspng is not None and data.startswith(PNG_SIGNATURE):
        return _decode_png(data)
    with Image.open(path) as opened:
        image = opened
        if opened.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(opened)
        return _to_rgb(image)


# Shapes the fast path is checked on against the processor: odd margins, both orientations, upscaling.
PROBE_SIZES = ((300, 257), (257, 300), (1023, 769), (333, 1001), (8, 8), (1000, 200))


def shortest_edge_size(width, height, shortest_edge):
    """(width, height) with the shortest edge at `shortest_edge` and the long one truncated, as the
    image processors compute it: 1024x768 at 256 -> (341, 256)."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def resize_and_crop(image, shortest_edge, crop_height, crop_width, resample=Image.Resampling.BICUBIC):
    """The Pillow image the dinov2 processor resizes and crops to: shortest edge to `shortest_edge`
    (long edge truncated), then the centre `crop_width` x `crop_height`, offsets rounded down."""
    size = shortest_edge_size(*image.size, shortest_edge)
    if size != image.size:
        image = image.resize(size, resample=resample)
    left, top = (size[0] - crop_width) // 2, (size[1] - crop_height) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))


class Preprocess:
    """The model's own image processor up to (not including) rescale and normalise.

    Returns the resized, centre-cropped pixels as uint8 (3, H, W): four times less to move from the
    workers to the model than float32. `normaliser` applies the processor's rescale and mean/std on
    the model's device, so the pixels reaching the model are the processor's own.

    For Pillow-backed processors that resize the shortest edge and centre-crop (every DINOv2's), the
    same two Pillow calls are made directly, skipping the processor's three array conversions (about
    a tenth of a worker's time per 1024x1024 image). That path is used only after it has given the
    processor's exact pixels on PROBE_SIZES; otherwise, and for any other processor, it is the processor.

    With `flip`, a call returns (2, 3, H, W): the image and the image mirrored left-right, each through
    the whole processor. The mirror is taken of the decoded image, before the resize and crop: a centre
    crop with an odd margin (offset rounded down) is not the mirror of the mirrored image's crop, so
    mirroring the crop would not be the pixels the processor makes of a mirrored file. The file is
    decoded once either way.
    """

    def __init__(self, processor, flip=False):
        self.processor = processor
        self.flip = flip
        self.direct = self._direct_plan(processor)
        if self.direct is not None and not self._direct_agrees():
            self.direct = None

    def __call__(self, image):
        if self.flip:
            mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return torch.stack([self._one(image), self._one(mirrored)])  # (2, 3, H, W)
        return self._one(image)

    def _one(self, image):
        if self.direct is not None:
            return self._resize_and_crop(image)
        pixels = self.processor(images=image, do_rescale=False, do_normalize=False,
                                return_tensors="pt")["pixel_values"][0]  # (3, H, W)
        return pixels if pixels.dtype == torch.uint8 else pixels.to(torch.float32)

    @staticmethod
    def _direct_plan(processor):
        """(shortest edge, crop height, crop width, resample) where the direct path applies, else None."""
        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        if (not type(processor).__name__.endswith("Pil") or not processor.do_resize
                or not processor.do_center_crop or getattr(processor, "do_pad", False)
                or size is None or not size.shortest_edge or size.longest_edge or crop is None):
            return None
        return size.shortest_edge, crop.height, crop.width, processor.resample

    def _resize_and_crop(self, image):
        image = resize_and_crop(image, *self.direct)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8

    def _direct_agrees(self):
        rng = np.random.default_rng(0)
        for width, height in PROBE_SIZES:
            image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
            expected = self.processor(images=image, do_rescale=False, do_normalize=False,
                                      return_tensors="pt")["pixel_values"][0]
            got = self._resize_and_crop(image)
            if expected.shape != got.shape or not torch.equal(expected.to(got.dtype), got):
                return False
        return True

    def normaliser(self, device):
        """A function (B, 3, H, W) uint8 on `device` -> float32, rescaled and normalised as the processor does."""
        scale = float(self.processor.rescale_factor) if self.processor.do_rescale else 1.0
        mean = torch.tensor(self.processor.image_mean if self.processor.do_normalize else [0.0] * 3,
                            dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.processor.image_std if self.processor.do_normalize else [1.0] * 3,
                           dtype=torch.float32, device=device).view(1, 3, 1, 1)

        def normalise(pixels):
            return (pixels.to(torch.float32) * scale - mean) / std

        return normalise


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed images for a list of relative paths under `input_dir`.

    An item is (index, pixels, None) or, for an image that cannot be read, (index, None, message):
    a broken image is a record for the run loop, never an exception that kills a worker.
    """

    def __init__(self, input_dir, relative_paths, preprocess):
        self.input_dir = Path(input_dir)
        self.relative_paths = list(relative_paths)
        self.preprocess = preprocess

    def __len__(self):
        return len(self.relative_paths)

    def __getitem__(self, index):
        try:
            return index, self.preprocess(load_rgb(self.input_dir / self.relative_paths[index])), None
        except Exception as error:  # any decoder error is this image's failure, not the run's
            return index, None, f"{type(error).__name__}: {error}"


def collate(items):
    """Stack the good images of a batch; pass the failures through.

    Returns (indices (N,), pixels (N, 3, H, W) or None, [(index, message), ...]). With flipped twins
    (items of (2, 3, H, W)) pixels are (2N, 3, H, W): the N images, then their N mirrors in the same order.
    """
    good = [(index, pixels) for index, pixels, error in items if error is None]
    failures = [(index, error) for index, _, error in items if error is not None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, failures
    indices = torch.tensor([index for index, _ in good], dtype=torch.long)
    pixels = torch.stack([pixels for _, pixels in good])  # (N, 3, H, W) or (N, 2, 3, H, W)
    if pixels.dim() == 5:
        pixels = pixels.transpose(0, 1).reshape(-1, *pixels.shape[2:])  # (2N, 3, H, W)
    return indices, pixels, failures


def worker_init(_worker_id):
    """DataLoader worker set-up: one torch thread, and leave SIGINT/SIGTERM to the main process.

    The main process finishes the batch in flight and shuts the workers down itself; a worker
    killed by the same Ctrl-C would turn a clean stop into a DataLoader error.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def image_loader(input_dir, relative_paths, preprocess, batch_size, num_workers, pin_memory=False, sampler=None):
    """The DataLoader of the run: decoding in `num_workers` processes, batches as `collate` makes them.

    Each worker keeps up to two batches ready (torch's default prefetch): enough to hide the jitter of
    decoding, and the memory held stays a fixed few batches however many images there are.
    `sampler` picks which of `relative_paths` this process does (shard.ChunkSampler); all of them in
    order without one.
    """
    return torch.utils.data.DataLoader(
        ImageDataset(input_dir, relative_paths, preprocess), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate, worker_init_fn=worker_init if num_workers else None, pin_memory=pin_memory,
        sampler=sampler)
