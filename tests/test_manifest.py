"""pyramid/manifest.py: --overwrite replaces files of other settings, crash-safely, and never mixes trees."""

import json
import shutil
from pathlib import Path

import pytest

import pyramid.manifest as manifest_module
from conftest import run_cli, write_images
from pyramid.exits import UsageError
from pyramid.manifest import adopt_output_tree, version_changes
from pyramid.tree import MANIFEST_NAME, REPLACING_KEY, read_manifest

A = {"format": 1, "model": "model-a", "dtype": "fp32", "flip": False, "versions": {"torch": "1"}}
B = {"format": 1, "model": "model-b", "dtype": "fp32", "flip": False, "versions": {"torch": "2"}}
NAMES = ["x/0.pt", "x/1.pt", "2.pt", "3.pt"]


def pt_files(root):
    return {str(p.relative_to(root)) for p in Path(root).rglob("*.pt") if p.name != "stats.pt"}


def make_tree(root, settings):
    """A tree made with `settings`: each .pt holds the model name, plus the derived data a replacement removes."""
    root.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(settings["model"])
    (root / MANIFEST_NAME).write_text(json.dumps(settings))
    (root / "failures.jsonl").write_text('{"path": "5.png", "error": "x"}\n')
    (root / "stats.pt").write_text(settings["model"])
    (root / "pack").mkdir()
    (root / "pack" / "16x16.npy").write_text(settings["model"])


def adopt(root, settings, overwrite):
    return adopt_output_tree(root, settings, pt_files(root), overwrite)


class Crash(BaseException):
    """A SIGKILL at this moment: nothing after it runs."""


def crash_at(monkeypatch, moment):
    """Make the `moment`-th file-system change of adopt_output_tree (0-based) never happen, nor any after it."""
    count = [0]

    def counted(real):
        def change(*args, **kwargs):
            if count[0] == moment:
                raise Crash
            count[0] += 1
            return real(*args, **kwargs)
        return change

    monkeypatch.setattr(manifest_module, "write_manifest", counted(manifest_module.write_manifest))
    monkeypatch.setattr(Path, "unlink", counted(Path.unlink))
    monkeypatch.setattr(shutil, "rmtree", counted(shutil.rmtree))
    return count


def test_matching_manifest_keeps_every_file_with_or_without_overwrite(tmp_path):
    make_tree(tmp_path, A)
    for overwrite in (False, True):  # a requeued --overwrite job resumes
        assert adopt(tmp_path, {**A, "versions": {"torch": "9"}}, overwrite) == set(NAMES)
    assert pt_files(tmp_path) == set(NAMES) and (tmp_path / "stats.pt").exists()


def test_other_settings_refused_then_replaced_with_derived_data(tmp_path):
    make_tree(tmp_path, A)
    with pytest.raises(UsageError, match="model: 'model-a' -> 'model-b'.*--overwrite"):
        adopt(tmp_path, B, overwrite=False)
    assert pt_files(tmp_path) == set(NAMES) and read_manifest(tmp_path) == A
    assert adopt(tmp_path, B, overwrite=True) == set()
    assert pt_files(tmp_path) == set()
    assert not any((tmp_path / name).exists() for name in ("failures.jsonl", "stats.pt", "pack"))
    assert read_manifest(tmp_path) == B  # the mark is cleared


def test_files_without_a_manifest_are_refused_unless_overwrite(tmp_path):
    make_tree(tmp_path, A)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(UsageError, match=r"4 \.pt file\(s\) but no manifest.json.*--overwrite"):
        adopt(tmp_path, A, overwrite=False)
    assert pt_files(tmp_path) == set(NAMES)
    assert adopt(tmp_path, A, overwrite=True) == set() and pt_files(tmp_path) == set()
    (tmp_path / "new").mkdir()
    assert adopt(tmp_path / "new", A, overwrite=False) == set()  # an empty directory needs no --overwrite
    assert read_manifest(tmp_path / "new") == A


def test_a_directory_where_the_manifest_goes_is_refused_with_or_without_overwrite(tmp_path):
    """No rename replaces a directory, and the extractor never made it: both runs refuse in one line, the files kept."""
    make_tree(tmp_path, A)
    (tmp_path / MANIFEST_NAME).unlink()
    (tmp_path / MANIFEST_NAME).mkdir()
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"manifest.json: is a directory.*move it away"):
            adopt(tmp_path, A, overwrite=overwrite)
    assert pt_files(tmp_path) == set(NAMES) and (tmp_path / MANIFEST_NAME).is_dir()


def test_old_manifests_without_the_mark_are_read_as_settled(tmp_path):
    make_tree(tmp_path, A)
    assert REPLACING_KEY not in json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert adopt(tmp_path, A, overwrite=False) == set(NAMES)


def test_a_replacement_killed_at_any_moment_never_lets_an_old_file_count_as_done(tmp_path, monkeypatch):
    """Kill --overwrite (B over A) before each of its file-system changes; then every rerun, with
    either settings, with or without --overwrite, keeps only files of its own settings or refuses,
    and a plain rerun with the new settings always finishes the replacement."""
    moments = 0
    while True:
        root = tmp_path / f"kill{moments}"
        make_tree(root, A)
        with monkeypatch.context() as patch:
            done = crash_at(patch, moments)
            try:
                adopt(root, B, overwrite=True)
                break  # no change left to kill before: every moment was tried
            except Crash:
                pass
        assert done[0] == moments
        for settings in (A, B):
            for overwrite in (False, True):
                tree = tmp_path / f"kill{moments}-{settings['model']}-{overwrite}"
                shutil.copytree(root, tree)
                try:
                    kept = adopt(tree, settings, overwrite)
                except UsageError as error:
                    assert not overwrite and "--overwrite" in str(error)
                    continue
                assert {(tree / name).read_text() for name in kept} <= {settings["model"]}, (moments, settings)
                assert read_manifest(tree) == settings
                if settings is B and moments > 0:  # once the replacement began, a plain B rerun completes it
                    assert kept == set() and pt_files(tree) == set()
                    assert not (tree / "stats.pt").exists() and not (tree / "pack").exists()
        moments += 1
    # The manifest with the mark, every .pt, failures.jsonl, stats.pt, pack/, and the manifest again.
    assert moments == 1 + len(NAMES) + 3 + 1


def test_verify_does_not_pass_a_tree_whose_replacement_is_unfinished():
    from pyramid.synthetic import tree_manifest
    from pyramid.verify import check_manifest

    assert check_manifest(tree_manifest()) == []
    problems = check_manifest({**tree_manifest(), REPLACING_KEY: True})
    assert len(problems) == 1 and "replacement is unfinished" in problems[0]


# --- The pixel pipeline: the processor and the decoders ----------------------------------------------------

PIXELS = {"image_processor": {"class": "BitImageProcessorPil", "backend": "pil"},
          "decoders": {"pyspng": "0.1.4", "pillow": "13.0.0"}}
TORCHVISION_PROCESSOR = {"class": "BitImageProcessor", "backend": "torchvision"}


def test_another_processor_or_decoder_is_other_settings(tmp_path):
    made = {**A, **PIXELS}
    make_tree(tmp_path, {**made, "image_processor": TORCHVISION_PROCESSOR})
    with pytest.raises(UsageError, match=r"image_processor: \{'class': 'BitImageProcessor', 'backend': 'torchvision'\} "
                                         r"-> \{'class': 'BitImageProcessorPil', 'backend': 'pil'\}.*--overwrite"):
        adopt(tmp_path, made, overwrite=False)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**made, "decoders": {"pillow": "13.0.0"}}))
    with pytest.raises(UsageError, match=r"decoders: \['pillow'\] -> \['pillow', 'pyspng'\]"):
        adopt(tmp_path, made, overwrite=False)
    assert pt_files(tmp_path) == set(NAMES)


def test_other_versions_of_the_same_pipeline_are_kept_and_listed(tmp_path):
    made = {**A, **PIXELS}
    make_tree(tmp_path, made)
    newer = {**made, "decoders": {"pyspng": "0.2.0", "pillow": "13.0.0"}, "versions": {"torch": "2"}}
    assert adopt(tmp_path, newer, overwrite=False) == set(NAMES)
    assert version_changes(made, newer) == {"pyspng": ["0.1.4", "0.2.0"], "torch": ["1", "2"]}
    assert version_changes(made, made) == {}


def test_a_manifest_from_before_the_pixel_pipeline_was_recorded_is_refused_unless_overwrite(tmp_path):
    """Nothing says which processor made its files: where torchvision was installed, the torchvision
    backend's, whose pixels differ on non-square images."""
    make_tree(tmp_path, A)
    with pytest.raises(UsageError, match=r"image_processor: not recorded \(a manifest from before it was\) -> "):
        adopt(tmp_path, {**A, **PIXELS}, overwrite=False)
    assert pt_files(tmp_path) == set(NAMES)
    assert adopt(tmp_path, {**A, **PIXELS}, overwrite=True) == set() and read_manifest(tmp_path) == {**A, **PIXELS}


def test_the_run_records_its_pipeline_and_notes_other_versions(tmp_path, tiny_model):
    import pyspng
    import torch

    from pyramid.runs import read_runs

    write_images(tmp_path / "in", 1)
    command = ("--input_dir", tmp_path / "in", "--output_dir", tmp_path / "out", "--model", tiny_model)
    assert run_cli(*command).returncode == 0
    made = read_manifest(tmp_path / "out")
    assert made["image_processor"] == PIXELS["image_processor"]  # with torchvision installed too
    assert sorted(made["decoders"]) == ["pillow", "pyspng"] and made["decoders"]["pyspng"] == pyspng.__version__

    older = {**made, "decoders": {**made["decoders"], "pyspng": "0.0.1"}, "versions": {**made["versions"],
                                                                                        "torch": "2.0.0"}}
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(older))
    kept = run_cli(*command)
    assert kept.returncode == 0, kept.stderr
    note = [line for line in kept.stderr.splitlines() if line.startswith("note: ")]
    assert note == [f"note: the 1 file(s) already in {tmp_path / 'out'} were made with other versions (pyspng 0.0.1 "
                    f"-> {pyspng.__version__}, torch 2.0.0 -> {torch.__version__}); they are kept, and runs.jsonl "
                    f"records it; `python -m pyramid.verify {tmp_path / 'out'} --input_dir {tmp_path / 'in'} "
                    f"--recompute 64` compares a sample"]
    assert read_runs(tmp_path / "out")[-1]["version_changes"] == {"pyspng": ["0.0.1", pyspng.__version__],
                                                                   "torch": ["2.0.0", torch.__version__]}
    assert read_manifest(tmp_path / "out") == {**made, "versions": read_manifest(tmp_path / "out")["versions"]}


def test_a_refused_model_leaves_no_manifest_so_the_fixed_model_runs(tmp_path, tiny_model):
    """A model folder without its weights, then with broken ones: each run exits 2 and writes no manifest,
    so once the real weights are copied in, the same command runs instead of refusing "other settings"."""
    from conftest import run_cli, write_images

    write_images(tmp_path / "in", 2)
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_model / name, model / name)
    command = ["--input_dir", tmp_path / "in", "--output_dir", out, "--model", model]

    result = run_cli(*command)
    assert result.returncode == 2, result.stderr
    assert f"--model {model}: this directory has no weights" in result.stderr
    assert not (out / MANIFEST_NAME).exists()

    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    result = run_cli(*command)
    assert result.returncode == 2, result.stderr
    assert "cannot load the weights" in result.stderr
    assert not (out / MANIFEST_NAME).exists()

    shutil.copy(tiny_model / "model.safetensors", model / "model.safetensors")
    result = run_cli(*command)
    assert result.returncode == 0, result.stderr
    assert "done: 2 written" in result.stderr
    assert read_manifest(out)["revision"].startswith("sha256:")
