"""tests/warm.py: a forked run is what a new interpreter is, as far as the tests look; only its imports differ."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import warm

PROBE = textwrap.dedent("""
    import json, os, sys
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                      "env": os.environ.get("PROBE"), "stdin": sys.stdin.read(),
                      "line_buffered": sys.stderr.line_buffering}))
    print("to stderr", file=sys.stderr)
    if os.environ.get("PROBE_RAISE"):
        raise ValueError("probe raised")
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
""")


def both(argv, **kwargs):
    """The same command through a new interpreter and through the zygote: (cold, warm) CompletedProcesses."""
    return (subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs),
            warm.run(argv, capture_output=True, text=True, timeout=60, **kwargs))


@pytest.mark.parametrize("how", ["-c", "script", "-m"])
@pytest.mark.parametrize("ending", [{"PROBE_EXIT": "3"}, {"PROBE_RAISE": "1"}, {}])
def test_a_forked_run_sees_and_says_what_a_new_interpreter_does(tmp_path, how, ending):
    (tmp_path / "probe_module.py").write_text(PROBE)
    program = {"-c": ["-c", PROBE], "script": [str(tmp_path / "probe_module.py")], "-m": ["-m", "probe_module"]}[how]
    env = dict(os.environ, PROBE="value", **ending)
    cold, forked = both([sys.executable, *program, "an argument", "-x"], cwd=tmp_path, env=env, input="on stdin")
    # A traceback under -m starts with two frames of runpy's own in a new interpreter; the fork leaves them out.
    def without_runpy(stderr):
        lines = stderr.splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith('  File "<frozen runpy>"'))

    assert (forked.returncode, forked.stdout, without_runpy(forked.stderr)) \
        == (cold.returncode, cold.stdout, without_runpy(cold.stderr))
    assert cold.returncode == (1 if ending.get("PROBE_RAISE") else int(ending.get("PROBE_EXIT", 0)))
    said = json.loads(cold.stdout)
    assert said["argv"][1:] == ["an argument", "-x"] and said["stdin"] == "on stdin" and said["env"] == "value"


@pytest.mark.skipif(warm.cold(), reason="every process starts cold here (PYRAMID_TESTS_COLD=1, or no pidfd_open)")
def test_a_forked_run_has_the_imports_done_and_a_pid_of_its_own():
    code = "import os, sys; print('torch' in sys.modules, os.getpid())"
    cold, forked = both([sys.executable, "-c", code])
    assert cold.stdout.split()[0] == "False" and forked.stdout.split()[0] == "True"  # the warm path was taken
    assert int(forked.stdout.split()[1]) not in (os.getpid(), warm._ZYGOTE.process.pid)


def test_signals_waits_and_timeouts_are_subprocess_own():
    process = warm.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline() == "up\n"
    assert os.getsid(process.pid) == process.pid  # start_new_session: a session of its own, as os.killpg needs
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.2)
    assert process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stdout.close()


def test_what_a_fork_cannot_give_starts_cold():
    hidden = warm.run([sys.executable, "-c", "import sys; print('torch' in sys.modules)"], capture_output=True,
                      text=True, env=dict(os.environ, PYTHONPATH="/nonexistent"), timeout=60)
    assert hidden.stdout.strip() == "False"  # an environment that changes what an import does: a new interpreter
    other = warm.run(["sh", "-c", "echo $0", "from sh"], capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "from sh"
