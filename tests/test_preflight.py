"""pyramid/preflight.py: bench --preflight says in a few lines what a run here would use."""

import torch

from pyramid.bench import get_args_parser, main


def test_preflight_says_what_a_run_here_would_use(capsys):
    assert main(get_args_parser().parse_args(["--preflight", "--random", "tiny", "--num_workers", "1"])) == 0
    lines = capsys.readouterr().out.splitlines()
    said = {line.partition(":")[0]: line for line in lines}
    assert said["device"].startswith("device: cpu (torch sees no CUDA device)")
    assert "torch " + torch.__version__ in said["libraries"]
    assert said["PNG decoder"].startswith("PNG decoder: pyspng ")  # installed here (requirements.txt)
    assert said["attention"].startswith("attention: sdpa: ") and "fp32, batch 16, cpu" in said["attention"]
    assert said["files"].startswith("files: torch.save's bytes made by ArchiveLayout")
    assert "image processor" in said and "/dev/shm" in said and "torch.compile" in said and "disk" in said


def test_preflight_names_the_missing_png_decoder(capsys, monkeypatch):
    import pyramid.decode

    monkeypatch.setattr(pyramid.decode, "pyspng", None)
    assert main(get_args_parser().parse_args(["--preflight", "--random", "tiny", "--num_workers", "0"])) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PNG decoder"))
    assert "pyspng is not installed" in line and "docs/gpu.md" in line
