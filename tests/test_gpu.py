"""The job on a CUDA GPU: the CLI in every dtype, the asynchronous device-to-host path at scale against a
synchronous reference, two processes on one GPU, --compile, the pinned buffers, a batch too large for the
card (halved until it fits).

Most tests need CUDA and are skipped with the reason "needs CUDA" without it. The tests of the async path
and of two processes are parametrised over the device: their CPU variant runs in the normal suite, on
fewer images, so that their own code is checked on every machine and a GPU's few minutes are not spent
on a typo (`.ci/gpu-report` skips the CPU variants: GPU_REPORT=1). `GPU_REPORT_QUICK=1` (`.ci/gpu-report
--quick`) keeps only the async path, at 256 images, and the buffer tests. On a GPU node `.ci/gpu-report`
runs these and then the GPU table (docs/gpu.md); the whole file is sized to take about 2.5 minutes on one
H100 with 16 cores (tiny model where the test is about the pipeline, small images).

Thresholds. fp32 on CUDA against fp32 on CPU: cos >= 0.9999 per level (the contract's figure; TF32
is switched off for fp32). fp16 and bf16 against fp32, per level, min cosine over every patch
vector: >= 0.999 for fp16 and >= 0.998 for bf16. Measured on CPU (no GPU was lent while these were
written), random-weight base model, 8 face images: fp16 0.999999, bf16 0.999922 (16x16, the lowest
level). fp16 keeps 11 significant bits and bf16 8, so bf16's error is about 8x fp16's; both
thresholds leave 1 - cos at least 10x above what was measured, for the GPU's other kernels (SDPA
flash attention, cuBLAS accumulation order). --compile against eager in fp16: the same thresholds.
"""

import functools
import gc
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import warm
from conftest import REPO, accelerate_launch, run_cli, write_images
from pyramid.encoder import HostCopies
from pyramid.synthetic import save_random_dinov2, write_synthetic_faces
from pyramid.writer import Writer

CUDA = torch.cuda.is_available()
QUICK = os.environ.get("GPU_REPORT_QUICK") == "1"
IN_REPORT = os.environ.get("GPU_REPORT") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
not_quick = pytest.mark.skipif(QUICK, reason="left out of the quick report (GPU_REPORT_QUICK=1)")
# The device of a parametrised test: its CPU variant runs in the normal suite (code check, fewer images).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]

FP32_ON_CUDA_VS_CPU = 0.9999
THRESHOLD_VS_FP32 = {"fp16": 0.999, "bf16": 0.998}
LEVELS = ["16x16", "8x8", "4x4", "2x2", "1x1"]
ON_CPU = {"CUDA_VISIBLE_DEVICES": ""}


def load_tree(directory):
    """{relative name: pyramid dict} of every .pt under `directory`."""
    return {str(path.relative_to(directory)): torch.load(path, weights_only=True)
            for path in sorted(directory.rglob("*.pt"))}


def min_cosine_per_level(tree_a, tree_b):
    """{level: smallest cosine over images and patch vectors} between two trees of the same names."""
    assert sorted(tree_a) == sorted(tree_b)
    return {level: min(torch.nn.functional.cosine_similarity(tree_a[name][level], tree_b[name][level],
                                                             dim=-1).min().item() for name in tree_a)
            for level in next(iter(tree_a.values()))}


def summary(stderr):
    return [line for line in stderr.splitlines() if line.startswith("done: ")][-1]


def verify(directory):
    return warm.run([sys.executable, "-m", "pyramid.verify", str(directory)], cwd=REPO,
                    capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return save_random_dinov2(tmp_path_factory.mktemp("base_dinov2"), "base")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Eight real-looking 256x256 faces and four random-noise 64x48 images: 12 images, 3 batches of 5."""
    directory = write_synthetic_faces(tmp_path_factory.mktemp("faces"), 8, side=256)
    write_images(directory / "noise", 4)
    return directory


@pytest.fixture(scope="module")
def dtype_runs(tmp_path_factory, base_model, faces):
    """The CLI on the base-size model: fp32 on CPU, then on CUDA with --dtype auto, fp32 and bf16, and fp32
    stored as bf16 (rounded on the device, copied to the host in bf16)."""
    root = tmp_path_factory.mktemp("dtype_runs")
    runs = {}
    for name, dtype, env, store in (("cpu-fp32", "fp32", ON_CPU, "fp32"), ("cuda-auto", "auto", None, "fp32"),
                                    ("cuda-fp32", "fp32", None, "fp32"), ("cuda-bf16", "bf16", None, "fp32"),
                                    ("cuda-fp32-store-bf16", "fp32", None, "bf16")):
        result = run_cli("--input_dir", faces, "--output_dir", root / name, "--model", base_model,
                         "--dtype", dtype, "--batch_size", 5, "--num_workers", 2, "--store_dtype", store, env=env)
        runs[name] = (result, root / name)
    return runs


@needs_cuda
@not_quick
@pytest.mark.parametrize("name, manifest_dtype", [("cuda-auto", "fp16"), ("cuda-fp32", "fp32"),
                                                  ("cuda-bf16", "bf16")])
def test_cli_on_cuda_writes_fp32_files_in_every_dtype(dtype_runs, name, manifest_dtype):
    result, directory = dtype_runs[name]
    assert result.returncode == 0, result.stderr
    assert f"in {manifest_dtype} on cuda" in result.stderr
    assert summary(result.stderr).startswith("done: 12 written, 0 skipped") and " 0 failed" in summary(result.stderr)
    assert json.loads((directory / "manifest.json").read_text())["dtype"] == manifest_dtype
    tree = load_tree(directory)
    assert len(tree) == 12
    for pyramid in tree.values():
        assert list(pyramid) == LEVELS
        for level, value in pyramid.items():
            side = int(level.partition("x")[0])
            assert value.dtype == torch.float32 and value.device.type == "cpu"
            assert value.shape == (1, side * side, 768) and value.is_contiguous()
            assert value.untyped_storage().nbytes() == value.numel() * 4
    checked = verify(directory)  # pooling, finiteness, storage, manifest: the same checks as users run
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_cuda
@not_quick
def test_store_dtype_on_cuda_is_the_fp32_files_rounded_once(dtype_runs):
    # Rounded on the device before the copy, into pinned bf16 buffers, written from them: the same bits as the
    # fp32 run's files rounded on the host (the same batches, kernels and GPU compute the same fp32 values).
    result, directory = dtype_runs["cuda-fp32-store-bf16"]
    assert result.returncode == 0 and dtype_runs["cuda-fp32"][0].returncode == 0, result.stderr
    stored, reference = load_tree(directory), load_tree(dtype_runs["cuda-fp32"][1])
    assert sorted(stored) == sorted(reference) and len(stored) == 12
    for name, pyramid in stored.items():
        for level, value in pyramid.items():
            assert value.dtype == torch.bfloat16 and value.untyped_storage().nbytes() == value.numel() * 2
            assert torch.equal(value, reference[name][level].to(torch.bfloat16)), (name, level)
    checked = verify(directory)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_cuda
@not_quick
def test_fp32_on_cuda_matches_fp32_on_cpu(dtype_runs):
    for name in ("cpu-fp32", "cuda-fp32"):
        assert dtype_runs[name][0].returncode == 0, dtype_runs[name][0].stderr
    assert "in fp32 on cpu" in dtype_runs["cpu-fp32"][0].stderr
    cosines = min_cosine_per_level(load_tree(dtype_runs["cuda-fp32"][1]), load_tree(dtype_runs["cpu-fp32"][1]))
    assert list(cosines) == LEVELS
    assert all(value >= FP32_ON_CUDA_VS_CPU for value in cosines.values()), cosines


@needs_cuda
@not_quick
@pytest.mark.parametrize("name, dtype", [("cuda-auto", "fp16"), ("cuda-bf16", "bf16")])
def test_half_precision_files_stay_close_to_fp32(dtype_runs, name, dtype):
    assert dtype_runs[name][0].returncode == 0 and dtype_runs["cuda-fp32"][0].returncode == 0
    cosines = min_cosine_per_level(load_tree(dtype_runs[name][1]), load_tree(dtype_runs["cuda-fp32"][1]))
    print(f"{dtype} vs fp32, min cosine per level: {cosines}")  # shown with -s / in .ci/gpu-report
    assert all(value >= THRESHOLD_VS_FP32[dtype] for value in cosines.values()), cosines
    # Not the same computation: a run that silently computed in fp32 would give the fp32 files exactly.
    half, full = load_tree(dtype_runs[name][1]), load_tree(dtype_runs["cuda-fp32"][1])
    assert any(not torch.equal(half[file][level], full[file][level]) for file in half for level in LEVELS)


@needs_cuda
@not_quick
def test_num_workers_0_on_cuda_gives_the_same_files(tmp_path, tiny_model):
    write_images(tmp_path / "in", 6)
    trees = {}
    for workers in (0, 2):
        result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / f"w{workers}",
                         "--model", tiny_model, "--batch_size", 4, "--num_workers", workers)
        assert result.returncode == 0, result.stderr
        assert f"{workers} decode workers" in result.stderr and "on cuda" in result.stderr
        trees[workers] = load_tree(tmp_path / f"w{workers}")
    assert len(trees[0]) == 6
    cosines = min_cosine_per_level(trees[0], trees[2])
    assert all(value >= 0.99999 for value in cosines.values()), cosines


@needs_cuda
def test_host_copies_carry_each_batch_while_the_next_computes():
    from pyramid.levels import build_pyramid

    copies = HostCopies("cuda", batch_size=8, buffers=2)
    for step in range(5):
        base = torch.randn(8 - step % 2, 16, 32)  # a short batch now and then
        # Levels that are ready only after ~100 ms of GPU work: a copy that did not wait for the
        # default stream would read them unfinished.
        slow = torch.randn(4096, 4096, device="cuda")
        for _ in range(8):
            slow = slow @ slow / 64.0
        zero = (slow.mean() * 0).nan_to_num(0.0)
        levels = build_pyramid(base.cuda() * (step + 1) + zero, 4)
        host, ready, release = copies.start(levels)
        del levels, slow  # freed at once: record_stream keeps the memory until the copy has read it
        torch.randn(64, 1024, 1024, device="cuda")  # fresh allocations that could reuse it
        ready.synchronize()
        assert all(value.is_pinned() for value in host.values())
        expected = build_pyramid(base * (step + 1), 4)
        assert host.keys() == expected.keys()
        for key in expected:
            assert torch.allclose(host[key], expected[key], rtol=1e-5, atol=1e-6), (step, key)
        release()
    assert copies.made == 1 and copies.waits == 0  # each batch released before the next: one buffer, reused


@needs_cuda
def test_host_copies_wait_for_a_free_buffer():
    copies = HostCopies("cuda", batch_size=2, buffers=1)
    levels = {"1x1": torch.ones(2, 1, 4, device="cuda")}
    _, _, release = copies.start(levels)
    second = threading.Thread(target=copies.start, args=(levels,), daemon=True)
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()  # the only buffer is lent out: memory stays flat, the caller waits
    assert copies.waits == 1
    release()
    second.join(timeout=10.0)
    assert not second.is_alive()


# The async path at scale. On CUDA: 2,048 images at batch 64 are 32 batches through 6 pinned buffer sets,
# each reused about five times; the quick report takes 256. On CPU (the code check): 96 at batch 8.
ASYNC_SCALE = {"cuda": (256, 64) if QUICK else (2048, 64), "cpu": (96, 8)}
# Per batch: with 4 writer threads (2 on the 2-core CPU suite) the slowed writer takes about 1,300 files/s
# (CUDA; 8 decode workers make several thousand) or 30 (CPU, where the tiny model makes ~100): far below.
SLOW_WRITER_SECONDS = {"cuda": 0.2, "cpu": 0.5}


def broken_images(count):
    """Positions of the images made unreadable: in the middle of batches, two in one batch, none at the end."""
    return sorted({count // 5, count // 5 + 1, count // 2 + 3, 3 * count // 4})


class SyncCopies:
    """The reference path: each batch's pyramid comes to the host by a plain synchronous .cpu() on the
    default stream; no side stream, no pinned buffers, no event."""

    def __init__(self, device, batch_size):
        pass

    def start(self, levels):
        return {key: value.cpu() for key, value in levels.items()}, None, None


class SlowWriter(Writer):
    """The run's Writer, `seconds` slower per batch, counting the batches it was handed while every queue
    slot was taken (the loop then waited for it)."""

    def __init__(self, *args, seconds, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = seconds
        self.full_on_submit = 0

    def submit_batch(self, *args, **kwargs):
        self.full_on_submit += self.queue.full()
        super().submit_batch(*args, **kwargs)

    def write_batch(self, slot, relative_outputs, levels):
        time.sleep(self.seconds)
        return super().write_batch(slot, relative_outputs, levels)


class Watched:
    """Stage classes that keep the instances the run makes, to look at after it."""

    def __init__(self, cls):
        self.cls, self.made = cls, []

    def __call__(self, *args, **kwargs):
        self.made.append(self.cls(*args, **kwargs))
        return self.made[-1]


def extract_in_process(input_dir, output_dir, model, batch_size, *options, stages=None):
    """The extractor's own run in this process, with `stages` (pyramid.loop.Stages) in place of the run's."""
    from pyramid.extract import get_args_parser
    from pyramid.loop import Stages, run
    from pyramid.settings import Settings

    args = get_args_parser().parse_args(["--input_dir", str(input_dir), "--output_dir", str(output_dir),
                                         "--model", str(model), "--batch_size", str(batch_size),
                                         "--num_workers", "2" if not CUDA else "8", *options])
    return run(Settings.from_args(args), stages or Stages())


def file_bytes(directory):
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*.pt"))}


@pytest.fixture(scope="module")
def async_inputs(tmp_path_factory):
    """{device: (input directory, image count, batch size, broken image names)} made on first use."""
    made = {}

    def inputs(device):
        if device not in made:
            count, batch_size = ASYNC_SCALE[device]
            directory = tmp_path_factory.mktemp(f"async-{device}")
            paths = write_images(directory, count, size=(40, 32))
            broken = broken_images(count)
            for number in broken:  # truncated, empty, not an image
                data = paths[number].read_bytes()
                paths[number].write_bytes((data[:len(data) // 3], b"", b"not a png")[number % 3])
            made[device] = (directory, count, batch_size, [paths[number].name for number in broken])
        return made[device]

    return inputs


@pytest.mark.parametrize("device", DEVICES)
def test_async_copies_and_writers_give_the_synchronous_files_bit_for_bit(device, async_inputs, tiny_model,
                                                                           tmp_path):
    if device == "cpu" and IN_REPORT:
        pytest.skip("the CPU variant runs in the CPU suite")
    from pyramid.loop import Stages

    input_dir, count, batch_size, broken = async_inputs(device)
    runs = {}
    for flip in ([False, True] if device == "cuda" or not QUICK else [False]):
        options = ("--flip",) if flip else ()
        reference = tmp_path / f"reference{'-flip' * flip}"
        assert extract_in_process(input_dir, reference, tiny_model, batch_size, *options,
                                  stages=Stages(copies=SyncCopies)) == 3  # the broken images failed
        plain_copies, slow_copies = Watched(HostCopies), Watched(HostCopies)
        slow_writers = Watched(functools.partial(SlowWriter, seconds=SLOW_WRITER_SECONDS[device]))
        variants = {"async": Stages(copies=plain_copies)}
        if not flip:  # the writer that makes the loop wait, once
            variants["slow writer"] = Stages(writer=slow_writers, copies=slow_copies)
        for name, stages in variants.items():
            output = tmp_path / f"{name.replace(' ', '-')}{'-flip' * flip}"
            assert extract_in_process(input_dir, output, tiny_model, batch_size, *options, stages=stages) == 3, name
            runs[(name, flip)] = (output, reference)
        if device == "cuda":
            plain = plain_copies.made[0]
            assert 1 <= plain.made <= plain.buffers  # the writers give sets back: fewer may do
            batches = -(-count // batch_size)
            assert QUICK or batches >= 5 * plain.buffers  # every set reused ~5 times at least
            if not flip:  # every set made and lent out while the slow writer wrote: the loop waited for one
                slow = slow_copies.made[0]
                assert slow.made == min(slow.buffers, batches), (slow.made, batches)
                assert slow.waits > 0 or batches <= slow.buffers, (slow.waits, batches)
        elif not flip:  # no pinned buffers on CPU: the loop waited for a free slot in the writer's queue
            assert slow_writers.made[0].full_on_submit > 0
    for (name, flip), (output, reference) in runs.items():
        written, expected = file_bytes(output), file_bytes(reference)
        assert len(expected) == count - len(broken), name
        assert sorted(written) == sorted(expected), name
        different = [file for file in expected if written[file] != expected[file]]
        assert not different, (name, flip, different[:5])
        records = [json.loads(line) for line in (output / "failures.jsonl").read_text().splitlines()]
        assert sorted(record["path"] for record in records) == sorted(broken), name
        pyramid = torch.load(next(output.glob("*.pt")), weights_only=True)
        assert any(key.startswith("flip/") for key in pyramid) == flip
    checked = verify(runs[("async", False)][0])
    assert checked.returncode == 0 and f"{count - len(broken)} ok" in checked.stdout, checked.stdout + checked.stderr


TWO_PROCESSES = REPO / "tests" / "accelerate_cpu_2proc.yaml"  # MULTI_GPU, 2 processes: both on GPU 0 here


@not_quick
@pytest.mark.parametrize("device", DEVICES)
def test_two_processes_on_one_gpu_write_each_image_once(device, tiny_model, tmp_path):
    if device == "cpu" and IN_REPORT:
        pytest.skip("the CPU variant runs in the CPU suite")
    count = 600 if device == "cuda" else 6  # CPU: two real processes, a check of this test's code (~20 s)
    write_images(tmp_path / "in", count, size=(40, 32))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = warm.run(
        [*accelerate_launch(TWO_PROCESSES), str(REPO / "extract_distributed.py"),
         "--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
         "--model", str(tiny_model), "--batch_size", "16", "--num_workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on {device}" in result.stderr
    record = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()][-1]
    assert record["processes"] == 2 and record["written"] == count and record["failed"] == 0, record
    assert sum(record["per_process"]) == count, record  # no image done twice
    if device == "cuda":  # 600 images in chunks of a few dozen: both processes claim some
        assert min(record["per_process"]) > 0, record
    assert len(load_tree(tmp_path / "out")) == count
    checked = verify(tmp_path / "out")
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_cuda
@not_quick
def test_compile_on_cuda_gives_the_eager_files_to_fp16_rounding(tiny_model, tmp_path):
    write_images(tmp_path / "in", 70, size=(40, 32))  # batches of 32, 32 and 6: the short one is padded
    runs = {}
    for name, options in (("eager", ()), ("compiled", ("--compile",))):
        result = run_cli("--input_dir", tmp_path / "in", "--output_dir", tmp_path / name, "--model", tiny_model,
                         "--batch_size", 32, "--num_workers", 4, *options)
        assert result.returncode == 0, result.stderr
        assert "--compile" not in result.stderr  # compiled, no fallback line
        runs[name] = load_tree(tmp_path / name)
    cosines = min_cosine_per_level(runs["compiled"], runs["eager"])
    print(f"--compile vs eager, fp16, min cosine per level: {cosines}")
    assert all(value >= THRESHOLD_VS_FP32["fp16"] for value in cosines.values()), cosines


def forward_bytes(model_dir, batch_size, side=224):
    """Bytes of GPU memory one fp16 forward pass of `batch_size` crops takes beyond the weights."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    pixels = torch.zeros((batch_size, 3, side, side), dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(pixel_values=pixels)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - before
    del model, pixels
    torch.cuda.empty_cache()
    return used


@needs_cuda
@not_quick
def test_a_batch_too_large_for_the_card_is_halved_and_the_run_writes_every_file(base_model, tmp_path, capsys):
    """A real out-of-memory error from the CUDA allocator: the process may take the weights and about 2.5
    forward passes of 16 crops (torch.cuda.set_per_process_memory_fraction, as a smaller card would), and
    is asked for batches of 64. The run halves until a pass fits and writes every file, to fp16 rounding
    of a run on the whole card."""
    write_images(tmp_path / "in", 96, size=(40, 32))
    assert extract_in_process(tmp_path / "in", tmp_path / "whole_card", base_model, 64) == 0
    per_16 = forward_bytes(base_model, 16)
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated()  # what this test process holds already (other tests' tensors)
    weights = sum(path.stat().st_size for path in base_model.glob("*.safetensors")) // 2  # fp32 files, fp16 here
    # Room for the weights, 2.5 passes of 16 and 64 MB of the run's own (pixels, levels: ~2 MB an image):
    # a pass of 64 needs about 4 passes of 16 and 128 MB, of 16 one pass and 32 MB.
    allowed = held + weights + 2.5 * per_16 + 64 * 2**20
    capsys.readouterr()
    torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / torch.cuda.get_device_properties(0).total_memory))
    try:
        status = extract_in_process(tmp_path / "in", tmp_path / "small_card", base_model, 64)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    stderr = capsys.readouterr().err
    assert status == 0, stderr[-3000:]
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert notes and notes[0] == "note: out of GPU memory at batch 64; going on at batch 32", stderr[-3000:]
    assert all(line.startswith("note: out of GPU memory at batch ") for line in notes), notes
    record = json.loads((tmp_path / "small_card" / "runs.jsonl").read_text().splitlines()[-1])
    assert record["notes"] == [line[len("note: "):] for line in notes] and record["written"] == 96, record
    cosines = min_cosine_per_level(load_tree(tmp_path / "small_card"), load_tree(tmp_path / "whole_card"))
    print(f"halved batch vs batch 64, fp16, min cosine per level: {cosines}; notes: {notes}")
    assert all(value >= THRESHOLD_VS_FP32["fp16"] for value in cosines.values()), cosines


def report_env(tmp_path, python, **variables):
    """The environment of a report started with PYTHON=`python` where the python first on PATH is not the one
    meant (a venv's python, not activated): a `python3` and a `python` that fail, saying so."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("python3", "python"):
        (stubs / name).write_text("#!/bin/sh\necho 'the python first on PATH ran' >&2\nexit 97\n")
        (stubs / name).chmod(0o755)
    return dict(os.environ, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", PYTHON=python, **variables)


@pytest.mark.skipif(CUDA, reason="checks the report where there is no GPU")
@pytest.mark.parametrize("options, relative", [((), False), (("--quick", "--part", "table"), True)])
def test_report_stops_at_once_in_one_line_without_cuda(tmp_path, options, relative):
    # PYTHON as typed from the directory the report is started in (relative: the report then moves to the
    # checkout) runs every step, whatever python is first on PATH.
    python = os.path.relpath(sys.executable, tmp_path) if relative else sys.executable
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / ".ci" / "gpu-report"), *options, str(tmp_path / "report")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=report_env(tmp_path, python))
    assert result.returncode == 1
    assert time.monotonic() - started < 60  # seconds (importing torch), not the report's minutes
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpu-report: torch {torch.__version__} sees no CUDA device"), lines
    assert not (tmp_path / "report").exists()  # nothing written: no report that could pass for one


def test_report_stops_at_once_in_one_line_without_pyspng(tmp_path):
    # pyspng made unimportable for the report's python (it is installed here): a finder put first that refuses it.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class HidePyspng:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pyspng':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, HidePyspng())\n")
    env = report_env(tmp_path, sys.executable,
                     PYTHONPATH=os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(["bash", str(REPO / ".ci" / "gpu-report"), str(tmp_path / "report")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-report: pyspng is not installed here"), lines
    assert "docs/gpu.md" in lines[0] and not (tmp_path / "report").exists()


def test_report_refuses_a_part_it_does_not_have():
    result = subprocess.run(["bash", str(REPO / ".ci" / "gpu-report"), "--part", "everything"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == (
        "gpu-report: --part takes tests or table, not 'everything'")


def test_report_refuses_a_python_that_is_not_there(tmp_path):
    result = subprocess.run(["bash", str(REPO / ".ci" / "gpu-report"), str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHON=str(tmp_path / "venv" / "bin" / "python")))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"gpu-report: no python at '{tmp_path / 'venv' / 'bin' / 'python'}'; set PYTHON to the interpreter that "
        f"has requirements.txt") and not (tmp_path / "report").exists()
