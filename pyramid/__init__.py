"""DINOv2 feature pyramids for a folder of images.

Module map, one stage a module:

    paths.py     find images, map each to its output file, refuse clashes, list the work still to do (files
                 a crash cut short included)
    decode.py    open an image by the input rules (EXIF, RGB, 16-bit) and preprocess it in DataLoader workers
    encoder.py   the DINOv2 model and its image processor: uint8 batch in, patch grid out
    pool.py      strip CLS/register tokens, 2x2-average the 16x16 grid down to 1x1
    writer.py    atomic .pt writes on a background thread, failures.jsonl
    manifest.py  what made the files (manifest.json) and the refusal to mix settings
    shard.py     share the to-do list: each process claims the next small chunk when it is ready for more
    lock.py      one run at a time per output directory: a lock file naming its run, kept fresh by a heartbeat
    team.py      the processes of a run: shared plan, counters, stop requests, an end wait that never hangs
    exits.py     exit statuses and the usage error
    progress.py  a tqdm bar on a terminal, plain lines in logs
    run.py       the run loop: accelerate state, DataLoader, encode, pool, write, summary
    prepare.py   download / copy an FFHQ or CelebA-HQ subset into data/raw_images/
    verify.py    check a finished output tree
    dataset.py   PyramidDataset, the reader for the training phase
    show.py      PCA->RGB pictures of a pyramid
    bench.py     decode bound, model bound and end-to-end throughput side by side
"""

__all__ = ["PyramidDataset"]


def __getattr__(name):
    # PyramidDataset imports torch; loading it on first use keeps `from pyramid import exits` light,
    # so extract_distributed.py can refuse bad arguments before torch loads.
    if name == "PyramidDataset":
        from pyramid.dataset import PyramidDataset

        return PyramidDataset
    raise AttributeError(f"module 'pyramid' has no attribute {name!r}")
