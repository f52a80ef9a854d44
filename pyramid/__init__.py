"""DINOv2 feature pyramids for a folder of images, and the reader that trains on them.

The code map, one line per module grouped by phase (extraction, the output tree, tools, the training
reader), is docs/code-map.md; tests/test_docs.py checks that it names every module here.
"""

__all__ = ["PyramidDataset"]


def __getattr__(name):
    # PyramidDataset imports torch; loading it on first use keeps `from pyramid import exits` light,
    # so extract_distributed.py can refuse bad arguments before torch loads.
    if name == "PyramidDataset":
        from pyramid.dataset import PyramidDataset

        return PyramidDataset
    raise AttributeError(f"module 'pyramid' has no attribute {name!r}")
