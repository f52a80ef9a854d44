"""Build docs/show_example.png from the test fixtures: the tiny random-weight DINOv2 on pyramid/data/astronaut.png.

    python docs/make_show_example.py

Random weights, so the colours are noise: the picture shows the layout, not what DINOv2 sees.
The pyramid is made here with transformers directly (CLS token stripped, 2x2 means down to 1x1),
so the example does not depend on the extractor.
"""

import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pyramid import show  # noqa: E402
from tests.conftest import KNOWN_IMAGE, save_tiny_dinov2  # noqa: E402

OUTPUT = REPO / "docs" / "show_example.png"
CELL = 128  # small cells keep the PNG well under 200 KB


def tiny_pyramid(model_dir, image_path):
    """The pyramid dict of one image, in the file format of the contract."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        pixels = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]
        tokens = model(pixel_values=pixels).last_hidden_state[:, 1:]  # (1, G*G, D) without CLS
    side = int(tokens.shape[1] ** 0.5)
    pyramid = {f"{side}x{side}": tokens.contiguous()}
    while side % 2 == 0:
        grid = tokens.reshape(1, side // 2, 2, side // 2, 2, -1)      # (1, s/2, 2, s/2, 2, D)
        side //= 2
        tokens = grid.mean((2, 4)).reshape(1, side * side, -1)        # (1, s/2 * s/2, D)
        pyramid[f"{side}x{side}"] = tokens.contiguous()
    return pyramid


def main():
    if not KNOWN_IMAGE.is_file():
        print(f"error: {KNOWN_IMAGE} is missing; it ships with the package (pyramid/data/)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_dinov2(Path(tmp) / "tiny_dinov2")
        pyramid_path = Path(tmp) / "astronaut.pt"
        torch.save(tiny_pyramid(model_dir, KNOWN_IMAGE), pyramid_path)
        args = show.get_args_parser().parse_args(
            [str(pyramid_path), "--image", str(KNOWN_IMAGE), "--cell", str(CELL), "-o", str(OUTPUT)])
        return show.main(args)


if __name__ == "__main__":
    sys.exit(main())
