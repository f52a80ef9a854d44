"""Open an image by the contract's input rules and preprocess it with the model's own processor.

The input rules: the orientation applied wherever Pillow's getexif() finds it (EXIF, eXIf, EXIF in PNG
text chunks, XMP); converted to RGB (alpha dropped; grey, palette, CMYK converted); 16-bit images scaled
to 8 bits by value / 257 (rounded), not clipped.

Accepted: every valid PNG (each colour type at each bit depth, interlaced or not; 1, 2 and 4-bit
samples expanded as Pillow does, value * 255 / (2**depth - 1); tRNS, gAMA and sBIT ignored), JPEG
(grey, RGB, CMYK with Adobe's inverted ink, progressive), WebP (lossy, lossless, alpha) and
uncompressed BMP (1, 8, 24, 32-bit; rows bottom-up or top-down; 32-bit with or without bitfields).
tests/test_decode.py checks each against a decoder that shares no code with pyspng or Pillow.

One decoder per format, whatever else is installed: PNG by pyspng (libspng), the others by Pillow. Without
pyspng a PNG is refused, never handed to Pillow, which truncates 16-bit colour to its high byte.
"""

import io
import os
import signal
import struct
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

try:
    import pyspng  # libspng: the same pixels as Pillow for PNG up to 8 bits, the 16 bits Pillow drops, twice as fast
except ImportError:
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION = 0x0112
PYSPNG_MISSING = ("pyspng is not installed, and PNGs are decoded by pyspng alone (Pillow would truncate 16-bit "
                  "colour): pip install pyspng (it is in requirements.txt)")


class DecoderMissing(ImportError):
    """The decoder a format needs is not installed; the message says how to install it."""


class ImageTooLarge(ValueError):
    """An image with more pixels than --max_pixels, found from its header before any decoding."""


def decoders():
    """{decoder: version} of the decoders load_rgb uses (the manifest records them); raises DecoderMissing
    where one is not installed."""
    if pyspng is None:
        raise DecoderMissing(PYSPNG_MISSING)
    return {"pyspng": pyspng.__version__, "pillow": PIL.__version__}


def pillow_pixel_limit():
    """Pillow's own refusal limit (Image.open raises DecompressionBombError above it): 2 x
    Image.MAX_IMAGE_PIXELS, the default of --max_pixels."""
    return 2 * Image.MAX_IMAGE_PIXELS


def check_pixels(width, height, max_pixels):
    """Raise ImageTooLarge for a `width` x `height` image of more than `max_pixels` pixels."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} is {width * height} pixels, more than --max_pixels {max_pixels} "
                            f"(read from its header; not decoded); raise --max_pixels to decode it")


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
# The PNG chunks Pillow reads EXIF or XMP from: eXIf, and text chunks (tEXt, zTXt, iTXt) under these keywords.
# "Raw profile type exif" is ImageMagick's: EXIF as hexadecimal text.
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
ORIENTATION_KEYWORDS = (b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp")


def _png_may_hold_orientation(data):
    """True when PNG bytes have a chunk that Pillow's getexif() can read an orientation from.

    Walks the chunk headers only (a few hundred at most, whatever the image size): for a PNG without
    such a chunk, the common case, Pillow's getexif() would decode the whole image looking for one.
    """
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"eXIf":
            return True
        if kind in PNG_TEXT_CHUNKS:  # the keyword comes first, at most 79 bytes, then a zero byte
            start = position + 8
            if data[start:start + min(length, 80)].split(b"\0", 1)[0] in ORIENTATION_KEYWORDS:
                return True
        if kind == b"IEND":
            return False
        position += 12 + length  # length, type, data, CRC
    return False


def _open_with_pillow(data):
    """Image.open of image bytes (lazy: header only) with Pillow's own pixel limit off.

    load_rgb applies --max_pixels itself, from the header; Pillow's limit, a second one at another
    number, would turn images that --max_pixels allows into errors. Decoding runs in one thread per
    process (the DataLoader workers), so the module-wide setting is restored before anyone else opens.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def exif_orientation(data, opened=None):
    """The EXIF orientation (1 to 8; 1 when none) of image bytes, as Pillow's getexif() reads it for any
    format: EXIF (JPEG APP1, WebP EXIF, PNG eXIf, PNG text chunks "exif" or "Raw profile type exif"),
    else XMP's tiff:Orientation. `opened`: the bytes already opened by Pillow (_open_with_pillow).

    Every decoder's orientation comes from here. A PNG without a chunk that can hold one is 1 at once.
    """
    if data.startswith(PNG_SIGNATURE) and not _png_may_hold_orientation(data):
        return 1
    if opened is None:
        with _open_with_pillow(data) as image:
            return exif_orientation(data, image)
    value = opened.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) else 1  # a malformed tag is no turn


def apply_orientation(image, orientation):
    """The Pillow image as shown by EXIF `orientation` (ImageOps.exif_transpose's turns and mirrors)."""
    transpose = ORIENTATION_TRANSPOSE.get(orientation)
    return image if transpose is None else image.transpose(transpose)


def _decode_png(data):
    """RGB Image from PNG bytes via pyspng (the 16 bits of 16-bit PNGs kept, then scaled by the rules)."""
    # IHDR is always the first chunk: signature(8) + length(4) + type(4) + w(4) + h(4), then the depth;
    # a file too short to hold it is left to pyspng, whose error names the problem.
    bit_depth = data[24] if len(data) > 24 else 0
    if bit_depth == 16:
        return Image.fromarray(_rgb_from_16bit_png(data))
    return Image.fromarray(pyspng.load(data, format="RGB"))


def _to_rgb(image):
    """A new RGB image from an opened Pillow image, by the input rules (before orientation)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = scale_16_to_8(np.clip(np.asarray(image), 0, 65535))
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")  # a copy even when already RGB: the opened file is closed below


def load_rgb(path, max_pixels=None):
    """Read the image at `path` as an RGB Pillow image by the input rules. Raises on a broken file, on an
    image of more than `max_pixels` pixels (default: Pillow's own limit) before decoding it, and on a
    PNG where pyspng is not installed (DecoderMissing)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        if os.path.islink(path):  # listed by paths.find_images: say why the name leads nowhere
            raise FileNotFoundError(f"dangling symbolic link to {os.readlink(path)!r}") from None
        raise
    if not data:
        raise ValueError("empty file")
    max_pixels = pillow_pixel_limit() if max_pixels is None else max_pixels
    if data.startswith(PNG_SIGNATURE):
        if pyspng is None:
            raise DecoderMissing(PYSPNG_MISSING)
        if len(data) >= 24 and data[12:16] == b"IHDR":  # else pyspng's error names the problem
            check_pixels(*struct.unpack_from(">II", data, 16), max_pixels)
        return apply_orientation(_decode_png(data), exif_orientation(data))
    with _open_with_pillow(data) as opened:
        check_pixels(*opened.size, max_pixels)
        return apply_orientation(_to_rgb(opened), exif_orientation(data, opened))


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


def is_pillow_processor(processor):
    """True for an image processor of transformers' Pillow backend, the one whose pixels the contract
    promises (the torchvision backend's differ for non-square images)."""
    from transformers.image_processing_backends import PilBackend

    return isinstance(processor, PilBackend)


def rescales_before_resizing(processor):
    """True for DINOv3's image processor (DINOv3ViTImageProcessor, torchvision alone): it rescales to [0, 1]
    first and resizes the floats (bilinear, antialiased), so its pixels before normalising are floats."""
    return any(cls.__name__ == "DINOv3ViTImageProcessor" for cls in type(processor).__mro__)


def pixel_pipeline(processor):
    """What decides the pixels, for the manifest: the image processor (class, backend) and the decoders
    with their versions."""
    return {"image_processor": {"class": type(processor).__name__, "backend": processor.backend},
            "decoders": decoders()}


class Preprocess:
    """The model's own image processor, up to (not including) normalising.

    DINOv2: the processor's Pillow backend, up to rescale and normalise. Returns the resized, centre-cropped
    pixels as uint8 (3, H, W): four times less to move from the workers to the model than float32.
    `normaliser` applies the processor's rescale and mean/std on the model's device, so the pixels reaching
    the model are the processor's own. Only a Pillow-backed processor is taken there (encoder.load_model_info
    loads one whatever is installed): the torchvision backend's pixels differ from it on non-square images.
    For processors that resize the shortest edge and centre-crop (every DINOv2's), the same two Pillow calls
    are made directly, skipping the processor's three array conversions (about a tenth of a worker's time per
    1024x1024 image). That path is used only after it has given the processor's exact pixels on PROBE_SIZES;
    otherwise it is the processor.

    DINOv3: its processor (torchvision) rescales, then resizes the floats, so no uint8 stage exists: the
    processor itself runs in the workers, without its normalising, and returns float32 (3, H, W) in [0, 1];
    `normaliser` applies the mean/std on the device with the processor's own arithmetic ((x - mean) / std in
    float32), so the pixels reaching the model are the processor's bit for bit.

    With `flip`, a call returns (2, 3, H, W): the image and the image mirrored left-right, each through
    the whole processor. The mirror is taken of the decoded image, before the resize and crop: a centre
    crop with an odd margin (offset rounded down) is not the mirror of the mirrored image's crop, so
    mirroring the crop would not be the pixels the processor makes of a mirrored file. The file is
    decoded once either way.
    """

    def __init__(self, processor, flip=False):
        self.floats = rescales_before_resizing(processor)
        if not self.floats and not is_pillow_processor(processor):
            raise ValueError(f"{type(processor).__name__} is not a Pillow-backed image processor; load it with "
                             f"AutoImageProcessor.from_pretrained(..., backend=\"pil\")")
        self.processor = processor
        self.flip = flip
        self.direct = None if self.floats else self._direct_plan(processor)
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
        if self.floats:  # rescaled and resized by the processor: (3, H, W) float32 in [0, 1]
            return self.processor(images=image, do_normalize=False, return_tensors="pt")["pixel_values"][0]
        pixels = self.processor(images=image, do_rescale=False, do_normalize=False,
                                return_tensors="pt")["pixel_values"][0]  # (3, H, W)
        return pixels if pixels.dtype == torch.uint8 else pixels.to(torch.float32)

    @staticmethod
    def _direct_plan(processor):
        """(shortest edge, crop height, crop width, resample) where the direct path applies, else None."""
        size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
        if (not processor.do_resize or not processor.do_center_crop or getattr(processor, "do_pad", False)
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
        """A function (B, 3, H, W) pixels on `device` -> float32, rescaled (uint8 pixels; DINOv3's floats are
        rescaled already) and normalised as the processor does."""
        scale = float(self.processor.rescale_factor) if self.processor.do_rescale and not self.floats else 1.0
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
    a broken image is a record for the run loop, never an exception that kills a worker. So is an image
    of more than `max_pixels` pixels (default: Pillow's own limit), found from its header.
    """

    def __init__(self, input_dir, relative_paths, preprocess, max_pixels=None):
        self.input_dir = Path(input_dir)
        self.relative_paths = list(relative_paths)
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.relative_paths)

    def __getitem__(self, index):
        try:
            image = load_rgb(self.input_dir / self.relative_paths[index], self.max_pixels)
            return index, self.preprocess(image), None
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


def image_loader(input_dir, relative_paths, preprocess, batch_size, num_workers, pin_memory=False, sampler=None,
                 max_pixels=None):
    """The DataLoader of the run: decoding in `num_workers` processes, batches as `collate` makes them.

    Each worker keeps up to two batches ready (torch's default prefetch): enough to hide the jitter of
    decoding, and the memory held stays a fixed few batches however many images there are.
    `sampler` picks which of `relative_paths` this process does (chunks.ChunkSampler); all of them in
    order without one. Images of more than `max_pixels` pixels are failures (ImageDataset).
    """
    return torch.utils.data.DataLoader(
        ImageDataset(input_dir, relative_paths, preprocess, max_pixels), batch_size=batch_size, num_workers=num_workers,
        collate_fn=collate, worker_init_fn=worker_init if num_workers else None, pin_memory=pin_memory,
        sampler=sampler)
