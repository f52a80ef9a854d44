"""DINOv2 feature pyramids for a folder of images.

Module map, one stage a module:

    paths.py     find images, map each to its output file, refuse clashes, list the work still to do (files
                 a crash cut short included)
    decode.py    open an image by the input rules (EXIF, RGB, 16-bit) and preprocess it in DataLoader workers
    encoder.py   the DINOv2 model and its image processor: uint8 batch in, patch grid out
    levels.py    strip CLS/register tokens, 2x2-average the 16x16 grid down to 1x1
    writer.py    atomic .pt writes (torch.save's bytes, the GIL mostly free) on background threads, failures.jsonl
    manifest.py  what made the files (manifest.json), the refusal to mix settings, --overwrite's replacement
    runs.py      runs.jsonl: one line per run (status, counts, times, settings) for scripts
    chunks.py    share the to-do list: each process claims the next small chunk when it is ready for more
    lock.py      one run at a time per output directory: a lock file naming its run, kept fresh by a heartbeat
    team.py      the processes of a run: shared plan, counters, stop requests, an end wait that never hangs
    exits.py     exit statuses and the usage error
    progress.py  a tqdm bar on a terminal, plain lines in logs
    extract.py   the extractor's command line (extract_distributed.py, python -m pyramid.extract): parse, check, run
    loop.py      the run loop: accelerate state, DataLoader, encode, pool, write, summary
    prepare.py   download / copy an FFHQ or CelebA-HQ subset into data/raw_images/
    verify.py    check a finished output tree
    dataset.py   PyramidDataset, the reader for the training phase (files, pack or preload, normalised, flipped)
    loader.py    dataset.loader(): batches read ahead on a thread into reused buffers, epochs, ranks, devices
    reader.py    read the levels of one pyramid file fast, by its own bytes (no torch.load)
    pack.py      the packed copy for fast training reads: one [N, s*s, D] array per level, kept current
    stats.py     exact float64 per-channel and per-position statistics for normalising (stats.pt)
    show.py      PCA->RGB pictures of a pyramid
    bench.py     decode bound, model bound and end-to-end throughput side by side
    readbench.py the reader figures of bench.py (--reader): raw read, torch.load, files, pack side by side
    cli.py       what the tools' command lines share: help layout, command names, console commands
"""

__all__ = ["PyramidDataset"]


def __getattr__(name):
    # PyramidDataset imports torch; loading it on first use keeps `from pyramid import exits` light,
    # so extract_distributed.py can refuse bad arguments before torch loads.
    if name == "PyramidDataset":
        from pyramid.dataset import PyramidDataset

        return PyramidDataset
    raise AttributeError(f"module 'pyramid' has no attribute {name!r}")
