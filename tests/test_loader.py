"""pyramid/loader.py: PyramidDataset.loader() and preload= give the items' values, in the promised orders."""

import gc
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import pyramid.dataset
import pyramid.loader
import pyramid.team
import warm
from conftest import REPO
from pyramid import PyramidDataset
from pyramid.pack import build_pack
from pyramid.stats import compute_stats
from pyramid.synthetic import numbered_names, write_tree

COUNT = 37  # batches of 5: seven full ones and one of 2
LEVELS = ["16x16", "8x8", "4x4", "2x2", "1x1"]
SOURCES = ["files", "pack", "preload"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """37 pyramids (D=8) with flip/ twins, their stats.pt and a pack of every level."""
    root = write_tree(tmp_path_factory.mktemp("loader") / "tree", numbered_names(COUNT), flip=True)
    torch.save(compute_stats(root, workers=1), root / "stats.pt")
    build_pack(root, LEVELS + [f"flip/{level}" for level in LEVELS], workers=1)
    return root


def dataset(tree, source, **options):
    if source == "preload":
        return PyramidDataset(tree, preload="cpu", **options)
    return PyramidDataset(tree, pack=source == "pack", **options)


def reference(tree, levels, normalize=False):
    """Items of the files without flips: `levels` may be flip/ levels, read under their own names."""
    plain = PyramidDataset(tree, levels=levels, normalize=normalize, pack=False)
    return [plain[index] for index in range(len(plain))]


def assert_batch_is_items(batch, items_by_name, levels, twins_by_name=None, flipped=None):
    """Each row of `batch` equals the item of its name (its twins' where flipped)."""
    assert list(batch) == ["name", *levels]
    for row, name in enumerate(batch["name"]):
        mirrored = flipped is not None and flipped[row]
        item = (twins_by_name if mirrored else items_by_name)[name]
        for level in levels:
            assert batch[level].shape == (len(batch["name"]), *item[("flip/" if mirrored else "") + level].shape)
            assert torch.equal(batch[level][row], item[("flip/" if mirrored else "") + level]), (name, level)


@pytest.mark.parametrize("source", SOURCES)
def test_batches_are_the_items_in_order(tree, source):
    data = dataset(tree, source)
    assert data.source == source
    items = {item["name"]: item for item in reference(tree, LEVELS)}
    loader = data.loader(5)
    assert len(loader) == 8
    batches = list(loader)
    assert [len(batch["name"]) for batch in batches] == [5] * 7 + [2]
    assert [name for batch in batches for name in batch["name"]] == sorted(items)
    for batch in batches:
        assert_batch_is_items(batch, items, LEVELS)
        assert batch["16x16"].shape == (len(batch["name"]), 256, 8) and batch["16x16"].dtype == torch.float32
    dropped = data.loader(5, drop_last=True)
    assert len(dropped) == 7 and [len(batch["name"]) for batch in dropped] == [5] * 7


def test_each_pass_is_a_new_epoch_whose_order_is_fixed_by_seed_and_epoch(tree):
    data = PyramidDataset(tree, levels=["1x1"])
    loader = data.loader(8, shuffle=True, seed=3)
    epochs = [[name for batch in loader for name in batch["name"]] for _ in range(3)]
    assert all(sorted(epoch) == sorted(data.names) for epoch in epochs)  # each a permutation of all items
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(data.names)
    assert loader.epoch == 3
    again = data.loader(8, shuffle=True, seed=3)
    assert [name for batch in again for name in batch["name"]] == epochs[0]  # another run, same order
    again.set_epoch(2)  # resuming: epoch 2 directly
    assert [name for batch in again for name in batch["name"]] == epochs[2]
    for epoch in range(3):
        assert [data.names[index] for index in loader.plan(epoch)[0]] == epochs[epoch]
    other_seed = data.loader(8, shuffle=True, seed=4)
    assert [name for batch in other_seed for name in batch["name"]] != epochs[0]


def test_ranks_share_each_epoch_without_duplicates(tree):
    data = PyramidDataset(tree, levels=["1x1"])
    whole = [data.names[index] for index in data.loader(5, shuffle=True, seed=1).plan(0)[0]]
    loaders = [data.loader(5, shuffle=True, seed=1, rank=rank, world_size=3) for rank in range(3)]
    assert [len(loader) for loader in loaders] == [3, 3, 3]  # 37 // 3 = 12 items: batches of 5, 5, 2 on every rank
    epochs = [[[name for batch in loader for name in batch["name"]] for loader in loaders] for _ in range(2)]
    parts = epochs[0]
    assert [len(part) for part in parts] == [12, 12, 12]
    assert parts[0] + parts[1] + parts[2] == whole[:36]  # contiguous parts; the last item of the order waits
    left_out = [set(data.names) - set(sum(parts, [])) for parts in epochs]
    assert all(len(set(sum(parts, []))) == 36 for parts in epochs)  # nothing twice, in every epoch
    assert left_out[0] != left_out[1]  # another item waits in the next epoch
    dropped = data.loader(5, shuffle=True, seed=1, drop_last=True, rank=2, world_size=3)
    assert [len(batch["name"]) for batch in dropped] == [5, 5]


def test_torch_distributed_gives_each_rank_its_part(tree, tmp_path):
    script = (
        "import sys, torch.distributed as dist\n"
        "from pyramid import PyramidDataset\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=int(sys.argv[1]), world_size=2)\n"
        f"loader = PyramidDataset({str(tree)!r}, levels=['1x1']).loader(4, shuffle=True, seed=5)\n"
        "print(len(loader), ' '.join(name for batch in loader for name in batch['name']))\n"
        "dist.destroy_process_group()\n")
    ranks = [warm.Popen([sys.executable, "-c", script, str(rank)], cwd=REPO, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [error for _, error in outputs]
    lengths, parts = zip(*(output.split(" ", 1) for output, _ in outputs))
    data = PyramidDataset(tree, levels=["1x1"])
    whole = [data.names[index] for index in data.loader(4, shuffle=True, seed=5).plan(0)[0]]
    assert lengths == ("5", "5")  # 18 items each: 4 x 4 + 2
    assert parts[0].split() + parts[1].split() == whole[:36]


def test_a_batch_is_never_overwritten_while_held(tree):
    data = PyramidDataset(tree, pack=True)
    items = {item["name"]: item for item in reference(tree, LEVELS)}
    loader = data.loader(5, shuffle=True, prefetch=1)
    kept = list(loader)  # every batch held at once: each must keep its values
    views = [batch["8x8"][:, :3] for batch in loader]  # only a view of one level held
    arrays = [batch["1x1"].numpy() for batch in loader]  # only a numpy array over it
    for batch in kept:
        assert_batch_is_items(batch, items, LEVELS)
    plan = loader.plan(1)[0]
    for start, view in zip(range(0, COUNT, 5), views):
        assert torch.equal(view, torch.stack([items[data.names[i]]["8x8"][:3] for i in plan[start:start + 5]]))
    plan = loader.plan(2)[0]
    for start, array in zip(range(0, COUNT, 5), arrays):
        assert np.array_equal(array, torch.stack([items[data.names[i]]["1x1"] for i in plan[start:start + 5]]).numpy())
    # A loop that drops each batch gets the same few buffers again, epoch after epoch.
    del kept, views, arrays, batch, view, array  # the loops above keep their last items in these names
    addresses = {batch["16x16"].data_ptr() for _ in range(2) for batch in loader}
    assert len(addresses) <= 1 + 3


def buffer_addresses(loader):
    """Where the 16x16 rows of the loader's kept buffers are."""
    return {buffer.arrays["16x16"].ctypes.data for buffer in loader._buffers.buffers}


def test_a_loop_that_holds_nothing_past_its_step_reads_into_the_same_buffers(tree):
    loader = PyramidDataset(tree, pack=True).loader(5, prefetch=1)
    kept = list(loader)  # 8 batches held at once: the loader's 1 + 3 buffers, then new memory
    assert len(loader._buffers.buffers) == 1 + 3
    buffers = buffer_addresses(loader)
    del kept  # every buffer free: the next 24 batches need no new memory
    addresses = [batch["16x16"].data_ptr() for _ in range(3) for batch in loader]
    assert len(addresses) == 24 and set(addresses) <= buffers and buffer_addresses(loader) == buffers


def test_a_batch_held_through_its_storage_alone_is_never_read_into(tree):
    data = PyramidDataset(tree, pack=True)
    items = {item["name"]: item for item in reference(tree, LEVELS)}
    loader = data.loader(5, prefetch=1)
    batches = iter(loader)
    first = next(batches)
    names, shape, address = first["name"], first["16x16"].shape, first["16x16"].data_ptr()
    storage = first["16x16"].untyped_storage()  # no tensor, view or array of the batch is left: only this
    del first
    addresses = {batch["16x16"].data_ptr() for batch in batches}
    addresses |= {batch["16x16"].data_ptr() for _ in range(2) for batch in loader}
    assert address not in addresses
    held = torch.empty(0).set_(storage, 0, shape)  # (5, 256, 8)
    assert torch.equal(held, torch.stack([items[name]["16x16"] for name in names]))


def test_a_pass_left_early_gives_back_the_buffers_it_read_ahead(tree):
    loader = PyramidDataset(tree, pack=True).loader(5, prefetch=2)
    for _ in range(3):
        first = next(iter(loader))  # the pass ends there: the batches it read ahead are never handed out
    del first
    addresses = {batch["16x16"].data_ptr() for batch in loader}
    assert addresses <= buffer_addresses(loader) and len(loader._buffers.buffers) <= 2 + 3


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("device", [None, "cpu"])
def test_normalize_and_flips_through_the_loader_are_the_items(tree, source, device):
    levels = ["4x4", "1x1"]
    data = dataset(tree, source, levels=levels, normalize=True, flip="random")
    items = {item["name"]: item for item in reference(tree, levels, normalize=True)}
    twins = {item["name"]: item for item in reference(tree, [f"flip/{level}" for level in levels], normalize=True)}
    loader = data.loader(6, shuffle=True, seed=1, device=device)
    flips = []
    for epoch in range(2):
        indices, flipped = loader.plan(epoch)
        start = 0
        for batch in loader:
            rows = slice(start, start + len(batch["name"]))
            assert batch["name"] == [data.names[index] for index in indices[rows]]
            assert_batch_is_items(batch, items, levels, twins, flipped[rows])
            start = rows.stop
        flips.append(flipped)
    assert 8 <= flips[0].sum() <= 29  # both twins, in about equal numbers
    assert not np.array_equal(flips[0], flips[1])  # drawn anew each epoch
    # The same seed, the same flips: the whole epoch is reproducible.
    another = dataset(tree, source, levels=levels, normalize=True, flip="random")
    again = next(iter(another.loader(6, shuffle=True, seed=1)))
    first = next(iter(data.loader(6, shuffle=True, seed=1)))
    assert first["name"] == again["name"] and all(torch.equal(first[level], again[level]) for level in levels)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("torch_threads", [1, 2])
def test_batches_read_in_parts_are_the_items(tree, source, torch_threads, monkeypatch):
    # Each batch's rows in three parts on three threads, normalised in the parts (torch on one thread)
    # or once on the reading thread: the same values either way.
    levels = ["16x16", "2x2"]
    data = dataset(tree, source, levels=levels, normalize=True, flip="random")
    items = {item["name"]: item for item in reference(tree, levels, normalize=True)}
    twins = {item["name"]: item for item in reference(tree, [f"flip/{level}" for level in levels], normalize=True)}
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        monkeypatch.setattr(pyramid.loader, "MIN_GATHER_PART_BYTES", 1)  # the small rows split too
        loader = data.loader(7, shuffle=True, seed=4).set_reading(workers=3)
        assert loader._parts(data._shapes) == 3
        flipped = loader.plan(0)[1]
        start = 0
        for batch in loader:
            assert_batch_is_items(batch, items, levels, twins, flipped[start:start + len(batch["name"])])
            start += len(batch["name"])
        assert start == COUNT
    finally:
        torch.set_num_threads(threads)


def test_reading_threads_follow_this_processs_share_of_its_cpus(tree, monkeypatch):
    """Two ranks on a node whose job holds 6 of its 128 cores: 3 threads each, for the loader and the preload."""
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40, 46)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert PyramidDataset(tree, levels=["1x1"]).loader(4).workers == 3
    threads = []
    real = pyramid.dataset.read_ahead

    def read_ahead(function, items, workers, window, **options):
        threads.append(workers)
        return real(function, items, workers, window, **options)

    monkeypatch.setattr(pyramid.dataset, "read_ahead", read_ahead)
    PyramidDataset(tree, levels=["1x1"], preload="cpu")
    assert threads == [3]


def test_preload_holds_only_the_levels_asked_for_and_serves_from_memory(tree, tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    data = PyramidDataset(copy, levels=["4x4", "1x1"], normalize=True, flip="random", preload="cpu")
    assert data.source == "preload" and data.preload_device == torch.device("cpu")
    assert list(data.preloaded) == ["4x4", "1x1", "flip/4x4", "flip/1x1"]
    assert data.preloaded["4x4"].shape == (COUNT, 16, 8) and data.preloaded["flip/1x1"].shape == (COUNT, 1, 8)
    items = reference(tree, ["4x4", "1x1"], normalize=True)
    twins = reference(tree, ["flip/4x4", "flip/1x1"], normalize=True)
    shutil.rmtree(copy)  # read once: nothing is read after this
    torch.manual_seed(0)
    for index in range(COUNT):
        item = data[index]
        mirrored = torch.equal(item["4x4"], twins[index]["flip/4x4"])
        expected = twins[index] if mirrored else items[index]
        assert item["name"] == items[index]["name"]
        for level in ("4x4", "1x1"):
            assert torch.equal(item[level], expected[("flip/" if mirrored else "") + level])
    assert sum(len(batch["name"]) for batch in data.loader(8, shuffle=True)) == COUNT
    batch = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=PyramidDataset.collate).__iter__().__next__()
    assert batch["4x4"].shape == (4, 16, 8)


def test_preload_refused_in_one_line_when_it_does_not_fit(tree, monkeypatch):
    free = pyramid.dataset.free_memory(torch.device("cpu"))
    with open("/proc/meminfo") as meminfo:
        total = int(meminfo.readline().split()[1]) * 1024  # MemTotal
    assert 0 < free <= total
    monkeypatch.setattr(pyramid.dataset, "free_memory", lambda device: 30_000)
    with pytest.raises(MemoryError) as refused:
        PyramidDataset(tree, levels=["4x4", "1x1"], flip="random", preload="cpu")
    # 37 items x (16 + 1 vectors of 8 float32) x 2 twins = 40,256 bytes
    assert str(refused.value) == ("preload='cpu' needs 40.3 kB (37 items, levels ['4x4', '1x1'] and their flip/ "
                                  "twins) but cpu has 30 kB free; preload fewer levels, or preload=None to read the "
                                  "pack each step")
    PyramidDataset(tree, levels=["1x1"], preload="cpu")  # 1,184 bytes: fits
    with pytest.raises(ValueError, match="only CPU and CUDA"):
        PyramidDataset(tree, preload="meta")
    with pytest.raises(ValueError, match="must be None, 'cpu', 'cuda' or a torch.device"):
        PyramidDataset(tree, preload="memory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_refused(tree):
    with pytest.raises(ValueError, match="torch sees no CUDA device here"):
        PyramidDataset(tree, preload="cuda")
    with pytest.raises(ValueError, match="torch sees no CUDA device here"):
        PyramidDataset(tree, levels=["1x1"]).loader(4, device="cuda")


def test_the_device_gather_of_a_cuda_preload_runs_on_cpu_too(tree):
    # The code that serves a CUDA preload, run on a CPU preload: the same batches as the read-ahead path.
    data = PyramidDataset(tree, levels=["4x4", "1x1"], normalize=True, flip="random", preload="cpu")
    loader = data.loader(6, shuffle=True, seed=2)
    gathered = list(loader._gathered_on_device(loader._batches(*loader.plan(0)), torch.device("cpu")))
    read = list(loader)
    assert len(gathered) == len(read) == 7
    for a, b in zip(gathered, read):
        assert a["name"] == b["name"] and all(torch.equal(a[level], b[level]) for level in ("4x4", "1x1"))


def test_a_failed_read_is_raised_where_the_batches_are_used(tree, tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    data = PyramidDataset(copy, levels=["1x1"], pack=False)
    (copy / f"{data.names[7]}.pt").unlink()
    threads = threading.active_count()
    with pytest.raises(FileNotFoundError, match=data.names[7]):
        for _ in data.loader(5):
            pass
    assert threading.active_count() == threads  # the reading thread is gone


def test_leaving_a_pass_early_ends_its_reading_thread(tree):
    data = PyramidDataset(tree, levels=["1x1"])
    threads = threading.active_count()
    for _ in data.loader(2):
        assert threading.active_count() == threads + 1
        break
    gc.collect()
    assert threading.active_count() == threads


def test_a_damaged_file_is_raised_naming_it_and_the_threads_end(tree, tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    data = PyramidDataset(copy, pack=False)
    path = copy / f"{data.names[11]}.pt"
    path.write_bytes(path.read_bytes()[:500])  # torch.load's error for it does not name the file; the reader's does
    threads = threading.active_count()
    loader = data.loader(8, shuffle=True).set_reading(workers=3)
    with pytest.raises(Exception) as raised:  # whichever error the reader finds, it names the file
        for _ in loader:
            pass
    assert str(path) in str(raised.value)
    assert threading.active_count() == threads  # the reading thread and its helpers are gone


@pytest.mark.parametrize("stuck_item", [28, 31])  # in the reading thread's own part of the batch, in a helper's
def test_a_read_that_raises_or_never_returns_is_raised_within_the_timeout(tree, monkeypatch, stuck_item):
    data = PyramidDataset(tree, levels=["4x4"], pack=False)
    broken, stuck = data._paths[20], data._paths[stuck_item]
    failing, release = [True], threading.Event()
    read_pyramid = pyramid.dataset.read_pyramid

    def failing_read(path, levels=None, out=None, expect=None):  # the user's file system, failing from outside
        if path == broken and failing[0]:
            raise OSError("Input/output error")
        if path == stuck:
            release.wait(60)
        return read_pyramid(path, levels, out, expect)

    monkeypatch.setattr(pyramid.dataset, "read_pyramid", failing_read)
    threads = threading.active_count()
    with pytest.raises(OSError, match=f"reading {broken}: Input/output error"):
        list(data.loader(4).set_reading(workers=2))
    assert threading.active_count() == threads
    failing[0] = False
    loader = data.loader(4).set_reading(workers=2, timeout=0.5)
    started = time.monotonic()
    served = []
    with pytest.raises(TimeoutError, match=f"no batch in 0.5 s: reading {stuck} has not returned"):
        for batch in loader.__iter__():
            served += batch["name"]
    assert time.monotonic() - started < 5
    assert served == data.names[:28]  # up to the batch of the stuck file, each batch whole
    assert threading.active_count() > threads  # the stuck read holds its thread ...
    release.set()  # ... until it returns, and then its thread ends, and the reading thread with it
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads


def test_a_pass_left_early_ends_every_thread_it_started(tree):
    data = PyramidDataset(tree, pack=False)
    threads = threading.active_count()
    for _ in data.loader(4).set_reading(workers=3):
        assert threading.active_count() == threads + 3  # the reading thread and two helpers
        break
    gc.collect()
    deadline = time.monotonic() + 10  # the helpers end once they see the reading thread gone
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads


def test_arguments_are_checked(tree):
    data = PyramidDataset(tree, levels=["1x1"])
    for wrong, message in (({"batch_size": 0}, "batch_size must be a positive integer"),
                           ({"batch_size": 4, "seed": -1}, "seed must be a non-negative integer"),
                           ({"batch_size": 4, "rank": 1}, "pass both rank and world_size"),
                           ({"batch_size": 4, "rank": 2, "world_size": 2}, r"rank must be in \[0, world_size\)")):
        with pytest.raises(ValueError, match=message):
            data.loader(**wrong)
    with pytest.raises(ValueError, match="epoch must be"):
        data.loader(4).set_epoch(-1)
    for wrong, message in (({"workers": 0}, "workers must be a positive integer or None"),
                           ({"timeout": 0}, "timeout must be a positive number of seconds")):
        with pytest.raises(ValueError, match=message):
            data.loader(4).set_reading(**wrong)


@pytest.mark.parametrize("source", SOURCES)
def test_dataloader_batches_mixing_twins_are_the_items(tree, source):
    # A DataLoader batch draws the twin per item in sampler order: the rows of the levels and of the
    # twins interleave (loader batches put them in two groups).
    levels = ["8x8", "2x2"]
    data = dataset(tree, source, levels=levels, normalize=True, flip="random")
    items = reference(tree, levels, normalize=True)
    twins = reference(tree, [f"flip/{level}" for level in levels], normalize=True)
    torch.manual_seed(0)
    batches = list(torch.utils.data.DataLoader(data, batch_size=9, collate_fn=PyramidDataset.collate))
    mirrored = []
    for start, batch in zip(range(0, COUNT, 9), batches):
        for row, name in enumerate(batch["name"]):
            index = start + row
            mirrored.append(torch.equal(batch["8x8"][row], twins[index]["flip/8x8"]))
            expected, prefix = (twins[index], "flip/") if mirrored[-1] else (items[index], "")
            for level in levels:
                assert torch.equal(batch[level][row], expected[prefix + level]), (name, level)
    assert any(mirrored[i] != mirrored[i + 1] for i in range(8))  # twins and levels mixed within a batch
    torch.manual_seed(0)
    one_by_one = [data[index] for index in range(9)]
    torch.manual_seed(0)
    together = data.__getitems__(list(range(9)))
    for a, b in zip(one_by_one, together):  # one draw per item, in order: the same twins either way
        assert all(torch.equal(a[level], b[level]) for level in levels)


def test_the_readmes_training_example_runs(tree):
    readme = (REPO / "README.md").read_text()
    example = readme.split("A training script reads", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "dataset.loader(" in example and "DataLoader" not in example
    code = example.replace('"data/feature_pyramids"', repr(str(tree))).replace("range(10)", "range(2)")
    namespace = {}
    exec(code, namespace)  # noqa: S102 - the README's own lines
    assert namespace["loader"].epoch == 2
    assert namespace["coarse"].shape[1:] == (16, 8) and namespace["fine"].shape[1:] == (64, 8)


def test_the_memory_a_cgroup_still_allows(tmp_path):
    hierarchy, membership = tmp_path / "cgroup", tmp_path / "membership"
    job = hierarchy / "slurm" / "job_7" / "step_0"  # v2: the limit is the job's, a group above the process's
    job.mkdir(parents=True)
    for directory, limit, used in ((job, "max", 10), (job.parent, "8000", 3000), (job.parent.parent, "max", 9)):
        (directory / "memory.max").write_text(f"{limit}\n")
        (directory / "memory.current").write_text(f"{used}\n")
    membership.write_text("0::/slurm/job_7/step_0\n")
    assert pyramid.team._cgroup_memory_left(membership, hierarchy) == 5000
    v1 = hierarchy / "memory" / "docker" / "abc"  # v1's memory controller, next to others
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("4096\n")
    (v1 / "memory.usage_in_bytes").write_text("1024\n")
    (v1.parent / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    membership.write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert pyramid.team._cgroup_memory_left(membership, hierarchy) == 3072
    membership.write_text("0::/\n")
    assert pyramid.team._cgroup_memory_left(membership, tmp_path / "nothing") is None
