"""Real processes without a cold start each: a zygote that imported torch, transformers and accelerate once forks them.

`warm.run` and `warm.Popen` take what `subprocess.run` and `subprocess.Popen` take. A command line
`[sys.executable, SCRIPT | -m MODULE | -c CODE, ARGS...]` becomes a process forked from this test process's zygote
(started on first use, one per xdist worker) instead of a new interpreter: it is still a real process with its own
pid (signals, /proc, `os.killpg` with `start_new_session`), exit status (negative for a signal), stdin, stdout and
stderr (pipes, files or inherited), cwd and environment, and it sees `sys.argv`, `__main__`, `sys.path`, line
buffering, seeds and exit handling (threads joined, atexit run) as a fresh interpreter would; only the imports are
already done, which is most of a run's CPU time here (about 3 s of a 4 s tiny extraction).

What a fork cannot give starts cold as before, through the real `subprocess.Popen`: another program (`bash`,
`taskset`, a venv's python), interpreter flags other than `-u`, `preexec_fn`, `pass_fds`, users and groups, and an
environment that would change what an import does (PYTHONPATH hiding a module, HF_*, LD_*, CXX, thread-pool settings
other than OMP_NUM_THREADS, which is applied with torch.set_num_threads as torch itself would at start). Code that
checks what a fresh interpreter has imported (`'torch' in sys.modules`) must start cold: use subprocess there.
`PYRAMID_TESTS_COLD=1` starts every process cold, to compare.

How it waits for them: the zygote is the runs' parent (it forks each directly and runs nothing itself); it watches
each run through a pidfd, reaps it and sends its raw wait status back, which `warm.Popen` hands to subprocess's own
status handling, so `wait`, `poll`, `communicate`, `kill` and their timeouts behave as for any child. A run's own
children are the kernel's business as usual (an orphan goes to init, which reaps it).
"""

import atexit
import inspect
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The modules every forked run gets already imported: what the extractor and the tools import, not their data.
PRELOAD = (
    "numpy", "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "PIL.WebPImagePlugin", "PIL.BmpImagePlugin",
    "torch", "torch.distributed", "torch.utils.data", "safetensors.torch", "tqdm",
    "transformers", "transformers.models.dinov2.modeling_dinov2",
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
    "transformers.models.dinov3_vit.modeling_dinov3_vit", "transformers.models.bit.image_processing_bit",
    "transformers.image_processing_utils", "transformers.models.auto.image_processing_auto",
    "transformers.models.auto.modeling_auto",
    "accelerate", "accelerate.commands.launch", "torch.distributed.run",
)
# Environment variables whose value a module reads when it is imported (so a fork would not see a new value).
# OMP_NUM_THREADS is applied in the fork instead; the rest of the environment is read at run time.
IMPORT_TIME_PREFIXES = ("PYTHON", "LD_", "HF_", "HUGGINGFACE", "TRANSFORMERS", "MKL_", "KMP_", "GOMP_", "OMP_",
                        "OPENBLAS", "TORCH_HOME", "TOKENIZERS", "XDG_CACHE_HOME", "HOME")
IMPORT_TIME_NAMES = {"CC", "CXX"}  # torch._inductor reads the compiler when its config module is imported
RUNTIME_ONLY = {"PYTHONUNBUFFERED", "OMP_NUM_THREADS", "PYTHONFAULTHANDLER"}
# Launchers whose ranks are forked too (see _warm_ranks), unless the launch's environment sets COLD_RANKS=1 (a test
# of what happens to ranks whose parent, the launcher itself, dies).
LAUNCHERS = {"accelerate.commands.launch", "torch.distributed.run"}
COLD_RANKS = "PYRAMID_TESTS_COLD_RANKS"
ZYGOTE_NAME = "warm-zygote"
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def cold():
    return os.environ.get("PYRAMID_TESTS_COLD") == "1" or not hasattr(os, "pidfd_open")


# --- In the test process ------------------------------------------------------------------------------------------

class _Zygote:
    """The forking process of this test process, started on first use, and what it has said about its runs."""

    def __init__(self):
        self.lock = threading.Lock()  # one request at a time
        self.said = threading.Condition()
        self.started = []  # answers to requests, in order: a pid, or why the fork failed
        self.ended = {}  # pid -> raw wait status
        self.sock = None
        self.process = None
        self.environ = None  # the environment the zygote imported under

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.environ = dict(os.environ)
        self.process = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL, cwd=REPO)
        theirs.close()
        self.attach(ours, self.environ)
        atexit.register(self.stop)

    def attach(self, sock, environ):
        """Use the zygote at the other end of `sock`, which imported under `environ` (a launcher's own)."""
        self.sock, self.environ = sock, environ
        threading.Thread(target=self._listen, args=(sock,), name="warm-zygote", daemon=True).start()

    def _listen(self, sock):
        """Sort the zygote's messages: answers to requests, and runs that ended."""
        try:
            while True:
                kind, *values = pickle.loads(_read_frame(sock))
                with self.said:
                    if kind == "ended":
                        self.ended[values[0]] = values[1]
                    else:
                        self.started.append(values[0])
                    self.said.notify_all()
        except (EOFError, OSError):
            with self.said:
                self.started.append("the zygote ended")
                self.said.notify_all()

    def stop(self):
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)
            self.sock = None
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None

    def fork(self, request, fds):
        """Send one run's request and its three standard fds; the forked run's pid."""
        with self.lock:
            if self.sock is None:
                self._start()
            socket.send_fds(self.sock, [_frame(pickle.dumps(request))], fds)
            with self.said:
                self.said.wait_for(lambda: self.started)
                answer = self.started.pop(0)
        if isinstance(answer, str):
            raise RuntimeError(f"the test zygote could not fork: {answer}")
        return answer

    def status(self, pid, block):
        """The raw wait status of run `pid` once it ended; None while it runs and `block` is False."""
        with self.said:
            if block:
                self.said.wait_for(lambda: pid in self.ended)
            return self.ended.pop(pid, None)

    def differs_at_import(self, env):
        """Whether `env` sets an import-time variable otherwise than the zygote's environment."""
        base = self.environ if self.environ is not None else os.environ
        for key in set(env) | set(base):
            if key in RUNTIME_ONLY or not (key.startswith(IMPORT_TIME_PREFIXES) or key in IMPORT_TIME_NAMES):
                continue
            if env.get(key) != base.get(key):
                return True
        return False


_ZYGOTE = _Zygote()


def _frame(payload):
    return len(payload).to_bytes(8, "little") + payload


def _read_exactly(sock, count):
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise EOFError("the test zygote closed its socket")
        chunks += chunk
    return bytes(chunks)


def _read_frame(sock):
    return _read_exactly(sock, int.from_bytes(_read_exactly(sock, 8), "little"))


def _program(args):
    """(how, what, arguments, unbuffered) for `[sys.executable, ...]` a fork can run; None for anything else."""
    if isinstance(args, (str, bytes, os.PathLike)) or not args or os.fspath(args[0]) != sys.executable:
        return None
    rest = [os.fspath(argument) for argument in args[1:]]
    unbuffered = False
    while rest and rest[0] == "-u":
        unbuffered = True
        rest = rest[1:]
    if not rest or any(isinstance(argument, bytes) for argument in rest):
        return None
    if rest[0] in ("-m", "-c"):
        return (rest[0], rest[1], rest[2:], unbuffered) if len(rest) > 1 else None
    if rest[0].startswith("-"):
        return None
    return "script", rest[0], rest[1:], unbuffered


class Popen(subprocess.Popen):
    """subprocess.Popen whose `[sys.executable, ...]` children are forked from the warm zygote (see the module)."""

    _warm = False

    def _execute_child(self, *args, **kwargs):
        bound = inspect.signature(subprocess.Popen._execute_child).bind(self, *args, **kwargs).arguments
        program = None if cold() else _program(bound["args"])
        env = dict(os.environ if bound["env"] is None else bound["env"])
        env = {os.fsdecode(key): os.fsdecode(value) for key, value in env.items()}
        plain = (bound["preexec_fn"] is None and not bound["pass_fds"] and not bound["shell"]
                 and bound["executable"] is None and all(bound.get(name) in (None, -1, False, ())
                                                         for name in ("gid", "gids", "uid", "umask", "process_group")))
        if program is None or not plain or _ZYGOTE.differs_at_import(env):
            return super()._execute_child(*args, **kwargs)
        how, what, arguments, unbuffered = program
        p2cread, p2cwrite = bound["p2cread"], bound["p2cwrite"]
        c2pread, c2pwrite = bound["c2pread"], bound["c2pwrite"]
        errread, errwrite = bound["errread"], bound["errwrite"]
        cwd = os.fspath(bound["cwd"]) if bound["cwd"] is not None else os.getcwd()
        request = {"how": how, "what": what, "argv": arguments, "cwd": cwd, "env": env,
                   "unbuffered": unbuffered or env.get("PYTHONUNBUFFERED", "") != "",
                   "new_session": bool(bound["start_new_session"])}
        fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1, errwrite if errwrite != -1 else 2]
        try:
            self.pid = _ZYGOTE.fork(request, fds)
            self._child_created = True
            self._warm = True
        finally:
            # What subprocess closes after a fork: the child's ends of the pipes it made.
            if p2cread != -1 and p2cwrite != -1:
                os.close(p2cread)
            if c2pwrite != -1 and c2pread != -1:
                os.close(c2pwrite)
            if errwrite != -1 and errread != -1 and errwrite != c2pwrite:
                os.close(errwrite)
            self._closed_child_pipe_fds = True

    def _try_wait(self, wait_flags):
        """(pid, raw status) from the zygote, which reaps the run; (0, 0) while it runs under WNOHANG."""
        if not self._warm:
            return super()._try_wait(wait_flags)
        status = _ZYGOTE.status(self.pid, block=not wait_flags & os.WNOHANG)
        return (0, 0) if status is None else (self.pid, status)

    def _internal_poll(self, *args, **kwargs):
        if not self._warm:
            return super()._internal_poll(*args, **kwargs)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                status = _ZYGOTE.status(self.pid, block=False)
                if status is not None:
                    self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def run(*popenargs, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run through warm.Popen."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    with Popen(*popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
        returncode = process.poll()
        if check and returncode:
            raise subprocess.CalledProcessError(returncode, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, returncode, stdout, stderr)


# --- In the zygote ------------------------------------------------------------------------------------------------

def serve(fd):
    """Import once, then fork one run per request until the test process closes the socket."""
    sys.path[:] = [entry for entry in sys.path if entry not in ("", os.path.dirname(__file__))]
    base_path = list(sys.path)
    sys.path.insert(0, str(REPO))
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # an optional part (torchvision's processors, a model another transformers lacks)
        for module in sorted(path.stem for path in (REPO / "pyramid").glob("*.py")):
            importlib.import_module(f"pyramid.{module}")
    _serve(socket.socket(fileno=fd), base_path)


def _serve(sock, base_path):
    """Fork one run per request on `sock`, and say when each ends, until the other end closes it."""
    import select
    watched = {}  # pidfd -> pid of a run
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        for ready, _ in poller.poll():
            if ready in watched:
                pid = watched.pop(ready)
                poller.unregister(ready)
                os.close(ready)
                _, status = os.waitpid(pid, 0)
                sock.sendall(_frame(pickle.dumps(("ended", pid, status))))
                continue
            try:
                request, fds = _read_request(sock)
            except (EOFError, ConnectionError):
                return
            try:
                pid = _fork_run(sock, request, fds, base_path)
                pidfd = os.pidfd_open(pid)
                watched[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                answer = pid
            except Exception as error:  # noqa: BLE001 (told to the test process, which raises it)
                answer = f"{type(error).__name__}: {error}"
            for received in fds:
                os.close(received)
            sock.sendall(_frame(pickle.dumps(("started", answer))))


def _read_request(sock):
    """One request and the fds that came with its first bytes (a plain recv would drop them)."""
    payload, fds, _, _ = socket.recv_fds(sock, 1 << 16, 3)
    if not payload:
        raise EOFError("the test process closed its socket")
    while len(payload) < 8:
        payload += _read_exactly(sock, 8 - len(payload))
    length = 8 + int.from_bytes(payload[:8], "little")
    if len(payload) < length:
        payload += _read_exactly(sock, length - len(payload))
    return pickle.loads(payload[8:]), fds


def _fork_run(sock, request, fds, base_path):
    """Fork the run; its pid."""
    pid = os.fork()
    if pid == 0:
        sock.close()
        _become_run(request, fds, base_path)  # never returns
    return pid


def _become_run(request, fds, base_path):
    """In the forked run: the standard fds, session, cwd, environment and interpreter state of a fresh start."""
    import signal
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, received in enumerate(fds):
            if received != target:
                os.dup2(received, target)
        for received in set(fds):
            if received > 2:
                os.close(received)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _name_as_interpreter()
        if request["how"] == "-m" and request["what"] in LAUNCHERS and request["env"].get(COLD_RANKS) != "1":
            _warm_ranks(base_path)
        _fresh_stdio(request["unbuffered"])
        _fresh_state()
        code = _run_main(request, base_path)
    except BaseException:  # noqa: BLE001 (the run's own errors are reported in _run_main; this is set-up failing)
        import traceback
        traceback.print_exc()
    finally:
        _exit(code)


def _name_as_interpreter():
    """/proc/PID/comm as a new interpreter's (the name of its executable), not the zygote's that a fork inherits."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, os.path.basename(sys.executable).encode()[:15])


def _warm_ranks(base_path):
    """In a launcher (accelerate launch, torchrun): its ranks forked too, from a zygote of its own.

    That zygote is forked from the launcher before it runs anything (so it has every import and no thread), and
    torch elastic's Popen becomes warm.Popen talking to it. The ranks are then the launcher's zygote's children, not
    the launcher's: the zygote dies with the launcher (PR_SET_PDEATHSIG), so a rank's own death signal, which the
    extractor asks for against its parent, still comes when the launcher dies.
    """
    import ctypes
    import signal
    global _ZYGOTE
    launcher = os.getpid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    environ = dict(os.environ)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            # The launcher's stdout and stderr must end when it and its ranks end, not when this zygote does.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            libc.prctl(PR_SET_NAME, ZYGOTE_NAME.encode())  # tests tell it from the ranks by /proc/PID/comm
            if os.getppid() == launcher:
                _serve(theirs, base_path)
        finally:
            os._exit(0)
    theirs.close()
    _ZYGOTE = _Zygote()
    _ZYGOTE.attach(ours, environ)
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler
    subprocess_handler.Popen = Popen


def _fresh_stdio(unbuffered):
    """sys.stdin/stdout/stderr as a new interpreter makes them on fds 0, 1 and 2."""
    import io
    encoding, errors = sys.stdout.encoding, sys.stdout.errors

    def writer(fd, line_buffering, errors):
        raw = io.FileIO(fd, "w", closefd=False)
        if unbuffered:
            return io.TextIOWrapper(raw, encoding=encoding, errors=errors, write_through=True)
        return io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, errors=errors,
                                line_buffering=line_buffering)

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding=encoding, errors=errors)
    sys.stdout = sys.__stdout__ = writer(1, os.isatty(1), errors)
    sys.stderr = sys.__stderr__ = writer(2, True, "backslashreplace")


def _fresh_state():
    """Seeds and thread counts a new interpreter would start with (not the zygote's)."""
    import random
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def _run_main(request, base_path):
    """Run the script, module or code as __main__; the exit status a new interpreter would end with."""
    import runpy
    import types
    how, what, argv = request["how"], request["what"], request["argv"]
    try:
        if how == "script":
            script = os.path.abspath(what)
            sys.argv = [what, *argv]
            sys.path[:] = [os.path.dirname(os.path.realpath(script)), *base_path]
            runpy.run_path(script, run_name="__main__")
        elif how == "-m":
            sys.argv = ["-m", *argv]
            sys.path[:] = [os.getcwd(), *base_path]
            sys.modules.pop(what, None)  # imported by the zygote; a new interpreter runs it once, as __main__
            runpy.run_module(what, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *argv]
            sys.path[:] = ["", *base_path]
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(what, "<string>", "exec"), main.__dict__)
        return 0
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if isinstance(stop.code, int):
            return stop.code & 0xFF
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:
        _print_uncaught(error)
        return -2  # a new interpreter ends by SIGINT itself on an uncaught KeyboardInterrupt
    except BaseException as error:  # noqa: BLE001 (the interpreter's last word: print it, exit 1)
        _print_uncaught(error)
        return 1


def _print_uncaught(error):
    """The traceback a new interpreter prints: from the run's own first frame, not this module's or runpy's (`-m`
    shows two frames of runpy's there, which this leaves out)."""
    import runpy
    import traceback
    frames = error.__traceback__
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while frames is not None and frames.tb_frame.f_code.co_filename in ours:
        frames = frames.tb_next
    traceback.print_exception(type(error), error, frames)


def _exit(code):
    """End as an interpreter does: wait for non-daemon threads, run atexit, flush, exit (or die by SIGINT)."""
    import signal
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 (a closed pipe: a new interpreter ignores it too, bar the status)
                code = code or 120
    finally:
        if code == -2:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
