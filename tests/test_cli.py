"""Every tool's command line: --help as the user types it, fast (no torch), and the installed package."""

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyramid.cli import COMMANDS, HelpFormatter, refusals_exit_2
from pyramid.exits import UsageError

REPO = Path(__file__).resolve().parent.parent

# How the user starts each tool (README), and arguments that parse but name nothing that exists,
# so main() refuses them: the path a typo takes.
TOOLS = {
    "python extract_distributed.py": ["--input_dir", "/no/such/dir"],
    "python -m pyramid.prepare": ["--num_images", "0"],
    "python -m pyramid.verify": ["/no/such/dir"],
    "python -m pyramid.show": ["/no/such/file.pt"],
    "python -m pyramid.bench": ["--random", "tiny", "--input_dir", "/no/such/dir"],
    "python -m pyramid.stats": ["/no/such/dir"],
    "python -m pyramid.pack": ["/no/such/dir"],
    "python -m pyramid.runs": ["status", "/no/such/dir", "some-run"],
}


def run_help(command):
    argv = [sys.executable, *command.split()[1:], "--help"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", list(TOOLS))
def test_help_names_the_command_and_only_real_defaults(command):
    result = run_help(command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command} "), result.stdout.splitlines()[0]
    assert "(default: None)" not in result.stdout
    assert "(default: False)" not in result.stdout
    # The description's first paragraph is whole sentences, not a docstring cut at its first line.
    description = result.stdout.split("\n\n")[1]
    assert description.rstrip().endswith("."), description


def option_help(help_text, option):
    """The help of one option, joined onto one line."""
    lines = help_text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if line.strip().startswith("-") or not line.startswith("      "):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("command", ["python extract_distributed.py", "python -m pyramid.bench"])
def test_num_workers_help_says_what_the_code_does(command, monkeypatch):
    from pyramid.plan import default_num_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    # The code: every core on CPU, one less on GPU (at most 16); never half.
    assert default_num_workers("cpu") == cores
    assert default_num_workers("cuda") == max(1, min(16, cores - 1))
    text = option_help(run_help(command).stdout, "--num_workers")
    assert "half" not in text
    assert "cores this process may use" in text and "on GPU one less, at most 16" in text, text


@pytest.mark.parametrize("affinity, threads", [({0, 1, 2}, 3), (set(range(0, 128, 2)), 8)])
def test_tools_threads_follow_the_cpus_this_process_may_use(affinity, threads, monkeypatch):
    """A SLURM job (or taskset) holding 3 of a node's 128 cores gets 3 threads, not 8 or 128."""
    from pyramid import pack, prepare, stats, verify

    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    for tool in (verify, stats, pack):
        assert tool.get_args_parser().parse_args(["/some/tree"]).workers == threads, tool.__name__
    assert prepare.get_args_parser().parse_args([]).num_workers == threads


def test_help_formatter_shows_real_defaults_only():
    parser = argparse.ArgumentParser(prog="tool", formatter_class=HelpFormatter)
    parser.add_argument("--computed", type=int, default=None, help="computed at run time")
    parser.add_argument("--zero", type=int, default=0, help="a real default of 0")
    parser.add_argument("--name", default="x", help="a real default")
    parser.add_argument("--flag", action="store_true", help="a flag")
    text = " ".join(parser.format_help().split())
    assert "computed at run time --zero" in text
    assert "a real default of 0 (default: 0)" in text
    assert "a real default (default: x)" in text
    assert "a flag" in text and "(default: False)" not in text


def test_parsing_and_refusing_arguments_load_no_torch():
    """Importing a tool, parsing its arguments and refusing a bad one must not import torch (~2 s)."""
    probe = f"""
import contextlib, io, json, sys
sys.path.insert(0, {str(REPO)!r})
loaded = {{}}
for command, argv in {json.dumps(TOOLS)}.items():
    name = command.split()[-1].removesuffix(".py")
    module = __import__(name, fromlist=["main"])
    args = module.get_args_parser().parse_args(argv)
    loaded[command] = ["parse"] if "torch" in sys.modules else []
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        status = module.main(args)
    loaded[command] += [f"main returned {{status}}"] if status != 2 else []
    loaded[command] += ["main"] if "torch" in sys.modules else []
print(json.dumps(loaded))
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded == {command: [] for command in TOOLS}, "torch loaded (or no refusal) at: " + str(loaded)


def test_console_commands_match_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    for command in COMMANDS:
        assert f'{command} = "pyramid.cli:{command.removeprefix("pyramid-")}"' in text


def make_venv(root):
    """A throwaway virtual environment, nothing installed in it, that sees the packages (torch, pip, setuptools,
    ...) of the interpreter running the tests, wherever they are: the system's, or those of the venv that the
    README's test command made (inside the checkout, say). A .pth file lists that interpreter's import path,
    less the checkout itself and its tests/ (which the tests put there), so `import pyramid` finds only what
    the test installs. (`--system-site-packages` would show the packages of the base interpreter the venvs
    were made from, which a fresh venv's own installs are not.)"""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site_packages, = (root / "lib").glob("python3*/site-packages")
    inherited = [entry for entry in sys.path
                 if entry and Path(entry).is_dir() and Path(entry).resolve() not in (REPO, REPO / "tests")]
    (site_packages / "running_interpreter.pth").write_text("\n".join(inherited) + "\n")
    return root


def copy_project(destination):
    """What a build needs, copied, so building leaves the checkout as it was."""
    destination.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, destination / name)
    shutil.copytree(REPO / "pyramid", destination / "pyramid", ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def pip(venv, *args):
    # The system's pip, run by the venv's interpreter, installs into the venv.
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check",
                             "install", "--no-deps", "--no-build-isolation", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def check_installed(venv, elsewhere, package_root):
    """From a directory outside the project: the README's training import, and every console command."""
    result = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import pyramid; print(pyramid.__file__); print(pyramid.PyramidDataset.__name__)"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(package_root / "pyramid" / "__init__.py"), "PyramidDataset"]
    for command in COMMANDS:
        result = subprocess.run([str(venv / "bin" / command), "--help"], cwd=elsewhere, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {command} "), result.stdout.splitlines()[:1]
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pyramid.extract", "--help"], cwd=elsewhere,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m pyramid.extract "), result.stdout.splitlines()[:1]


def test_editable_install_serves_imports_and_commands_outside_the_checkout(tmp_path):
    venv = make_venv(tmp_path / "venv")
    project = copy_project(tmp_path / "project")
    pip(venv, "-e", str(project))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check_installed(venv, elsewhere, project)


def test_wheel_install_serves_imports_and_commands(tmp_path):
    venv = make_venv(tmp_path / "venv")
    project = copy_project(tmp_path / "project")
    wheels = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps",
                             "--no-build-isolation", "-w", str(wheels), str(project)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    wheel, = wheels.glob("*.whl")
    pip(venv, str(wheel))
    shutil.rmtree(project)  # the installed copy must stand alone
    site_packages, = (venv / "lib").glob("python3*/site-packages")
    elsewhere = tmp_path / "wheels"
    check_installed(venv, elsewhere, site_packages)

    # What the wheel says it needs to run: the runtime dependencies, no test tool.
    metadata = next(site_packages.glob("dinov2_feature_pyramids-*.dist-info")) / "METADATA"
    required = {requirement_name(line.split(":", 1)[1]) for line in metadata.read_text().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert required == {requirement_name(line) for line in pyproject()["project"]["dependencies"]}
    assert not required & {"pytest", "pytest-xdist", "pypng", "opencv-python-headless", "setuptools"}, required

    # A real bench run of the installed package: its photograph and its extractor come from the wheel.
    result = subprocess.run([str(venv / "bin" / "pyramid-bench"), "--random", "tiny", "--synthetic", "2",
                             "--limit", "2", "--batch_size", "2", "--num_workers", "0", "--json"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["images"] == 2 and figures["end_to_end"] > 0, figures


def requirement_name(line):
    """The distribution a requirement line names, normalised: 'Pillow>=10.0' -> 'pillow'."""
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_lines(path):
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_txt_is_the_dependencies_and_the_test_tools():
    """The README's set-up installs what the package needs and what the tests need; the package asks for the
    first alone (a training machine does not need pytest)."""
    project = pyproject()["project"]
    test_extra = project["optional-dependencies"]["test"]
    assert requirement_lines(REPO / "requirements.txt") == project["dependencies"] + test_extra


def test_the_dependencies_are_what_the_package_imports():
    """Every third-party module that pyramid/ imports is a dependency, and every dependency is imported."""
    import ast
    import importlib.metadata

    # torchvision: DINOv3's processor alone (the dinov3 extra); triton: reported by the GPU preflight
    optional = {"torchvision", "triton"}
    assert [requirement_name(line) for line in pyproject()["project"]["optional-dependencies"]["dinov3"]] \
        == ["torchvision"]
    imported = set()
    for path in (REPO / "pyramid").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"pyramid"} - optional
    distributions = importlib.metadata.packages_distributions()
    needed = {requirement_name(distributions[module][0]) for module in third_party}
    assert needed == {requirement_name(line) for line in pyproject()["project"]["dependencies"]}


def test_a_tool_prints_a_name_that_is_not_utf8_as_failures_jsonl_has_it(monkeypatch):
    out, err = io.BytesIO(), io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", errors="strict"))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(err, encoding="ascii", errors="strict"))
    name = os.fsdecode(b"bad\xfe.pt")

    @refusals_exit_2
    def main(args):
        print(f"{name}: no image for this file")
        raise UsageError(f"é {name} is odd")

    assert main(None) == 2
    sys.stdout.flush()
    sys.stderr.flush()
    assert out.getvalue() == b"bad\\xfe.pt: no image for this file\n"
    assert err.getvalue() == b"error: \\xe9 bad\\xfe.pt is odd\n"
