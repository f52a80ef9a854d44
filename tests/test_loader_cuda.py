"""pyramid/loader.py on a GPU: pinned buffers and side-stream copies, a CUDA preload gathered on the device."""

import pytest
import torch

import pyramid.dataset
from pyramid import PyramidDataset
from pyramid.pack import build_pack
from pyramid.stats import compute_stats
from pyramid.synthetic import numbered_names, write_tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

COUNT = 37
LEVELS = ["4x4", "1x1"]
TWINS = [f"flip/{level}" for level in LEVELS]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("loader_cuda") / "tree", numbered_names(COUNT), flip=True)
    torch.save(compute_stats(root, workers=1), root / "stats.pt")
    build_pack(root, LEVELS + TWINS, workers=1)
    return root


def items_by_name(tree, levels):
    plain = PyramidDataset(tree, levels=levels, normalize=True, pack=False)
    return {item["name"]: item for item in (plain[index] for index in range(len(plain)))}


def assert_batches_are_the_items(tree, loader, data):
    items, twins = items_by_name(tree, LEVELS), items_by_name(tree, TWINS)
    indices, flipped = loader.plan(loader.epoch)
    start = 0
    for batch in loader:
        for level in LEVELS:
            assert batch[level].device.type == "cuda"
        for row, name in enumerate(batch["name"]):
            assert name == data.names[indices[start + row]]
            mirrored = bool(flipped[start + row])
            for level in LEVELS:
                expected = (twins[name][f"flip/{level}"] if mirrored else items[name][level])
                # The same float32 operations on the GPU as on the CPU: equal, not just close.
                assert torch.equal(batch[level][row].cpu(), expected), (name, level)
        start += len(batch["name"])
    assert start == COUNT


@pytest.mark.parametrize("pack", [False, True])
def test_batches_copied_to_the_gpu_are_the_items(tree, pack):
    data = PyramidDataset(tree, levels=LEVELS, normalize=True, flip="random", pack=pack)
    loader = data.loader(6, shuffle=True, seed=1, device="cuda")
    assert_batches_are_the_items(tree, loader, data)
    assert all(tensor.is_pinned() for buffer in loader._buffers.buffers for tensor in buffer.tensors.values())
    kept = list(loader)  # batches held: the pinned buffers are reused only after their copies are done
    assert len(kept) == 7 and all(batch["4x4"].shape[1:] == (16, 8) for batch in kept)


def test_a_cuda_preload_is_gathered_on_the_device_with_no_reads(tree, monkeypatch):
    data = PyramidDataset(tree, levels=LEVELS, normalize=True, flip="random", preload="cuda")
    assert data.source == "preload" and all(tensor.is_cuda for tensor in data.preloaded.values())
    monkeypatch.setattr(data, "_read_rows", lambda *args: pytest.fail("a host read after the preload"))
    assert_batches_are_the_items(tree, data.loader(6, shuffle=True, seed=1), data)
    item = data[3]
    assert item["4x4"].is_cuda and item["4x4"].shape == (16, 8)


def test_a_cuda_preload_that_does_not_fit_is_refused(tree, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80 * 10**9))
    assert pyramid.dataset.free_memory(torch.device("cuda")) == 10_000
    with pytest.raises(MemoryError, match=r"preload='cuda' needs 40.3 kB .* but cuda has 10 kB free"):
        PyramidDataset(tree, levels=LEVELS, flip="random", preload="cuda")
