"""What the tools' command lines share: the help layout, the name a user types, refusals (exit 2), the commands."""

import argparse
import codecs
import functools
import importlib
import io
import os
import sys
from pathlib import Path

from pyramid import exits
from pyramid.exits import DamagedFile, UsageError
from pyramid.lock import live_run
from pyramid.team import usable_cpus
from pyramid.tree import readable_text

# Console command -> the module it runs; pyproject.toml's [project.scripts] points each at a function below.
COMMANDS = {
    "pyramid-extract": "pyramid.extract",
    "pyramid-prepare": "pyramid.prepare",
    "pyramid-verify": "pyramid.verify",
    "pyramid-show": "pyramid.show",
    "pyramid-bench": "pyramid.bench",
    "pyramid-stats": "pyramid.stats",
    "pyramid-pack": "pyramid.pack",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's real default after its help, and the description as written (its example lines kept).

    A default of None or a flag's False says nothing, so none is shown: options whose default depends
    on the machine say in their help what it is.
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def command_name(module):
    """The command that runs `module` as the user typed it: its console command, else `python -m module`."""
    typed = Path(sys.argv[0]).stem
    if COMMANDS.get(typed) == module:
        return typed
    return f"python -m {module}"


def argument_parser(prog, description):
    """An ArgumentParser with the shared help layout: `prog` is what the user types."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def default_threads():
    """A tool's threads by default: up to 8, within the CPUs this process may use (`team.usable_cpus`: a SLURM
    job holding 8 of a node's 128 cores gets 8, not 128)."""
    return min(8, usable_cpus())


def output_tree_parser(module, description, output_help, workers_help):
    """The parser of a tool that reads an output tree (verify, stats, pack): the tree, and --workers."""
    parser = argument_parser(command_name(module), description)
    parser.add_argument("output_dir", type=Path, help=output_help)
    parser.add_argument("--workers", type=int, default=default_threads(),
                        help=f"{workers_help} (default: %(default)s = min(8, the CPUs this process may use))")
    return parser


def check_output_tree_args(args):
    """The checks of `output_tree_parser`'s arguments; raises UsageError. A tree that a live run is still
    writing is refused: half its files would be checked, counted or packed as if they were all."""
    if not args.output_dir.is_dir():
        raise UsageError(f"{args.output_dir} is not a directory; pass the extractor's --output_dir")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    writer = live_run(args.output_dir)
    if writer is not None:
        raise UsageError(f"{args.output_dir} is being written by a live run ({writer}); wait for it to end "
                         f"(or stop it and rerun it to finish), then run this again")


def is_main_process():
    """False in the processes of a launch (torchrun, accelerate launch) other than rank 0, which say nothing."""
    return os.environ.get("RANK", "0") == "0"


def _odd_bytes_as_hex(error):
    """Encoding error handler: a file name's byte that is not UTF-8 (held as a lone surrogate) printed \\xNN,
    as tree.readable_text and failures.jsonl write it; any other character the stream cannot take escaped."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return "".join(f"\\x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF
                   else char.encode("ascii", "backslashreplace").decode("ascii") for char in text), error.end


ODD_BYTES = "pyramid-odd-bytes"
codecs.register_error(ODD_BYTES, _odd_bytes_as_hex)


def print_names_safely():
    """Make stdout and stderr print any file name: Python's stdout raises UnicodeEncodeError on a name that
    is not UTF-8 (`bad\\xfe.pt` from the tree), which would end a tool in a traceback halfway through."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=ODD_BYTES)


def refusals_exit_2(main=None, *, after=None):
    """A tool's main(args), wrapped: stdout and stderr print any name (print_names_safely); a UsageError it
    raises, or a DamagedFile (a file of the tree it cannot use, met before its work: manifest.json, pack.json,
    the lock), is said in one line on stderr, "error: <message>" (by the main process of a launch alone), then
    `after(args, error)` runs where given, and main returns exits.USAGE (2). `@refusals_exit_2` or
    `@refusals_exit_2(after=...)`."""
    if main is None:
        return functools.partial(refusals_exit_2, after=after)

    @functools.wraps(main)
    def wrapped(args):
        print_names_safely()
        try:
            return main(args)
        except (UsageError, DamagedFile) as error:
            if is_main_process():  # under a launcher every process finds it: one says it
                print(readable_text(f"error: {error}"), file=sys.stderr)  # a name's odd bytes as \xNN
                if after is not None:
                    after(args, error)
            return exits.USAGE

    return wrapped


def run_tool(module):
    """Parse the command line with the tool's own parser and exit with what its main() returns.

    The tool module is imported here, so a console command is as fast to answer --help as `python -m`.
    """
    tool = importlib.import_module(module)
    sys.exit(tool.main(tool.get_args_parser().parse_args()))


def extract():
    run_tool("pyramid.extract")


def prepare():
    run_tool("pyramid.prepare")


def verify():
    run_tool("pyramid.verify")


def show():
    run_tool("pyramid.show")


def bench():
    run_tool("pyramid.bench")


def stats():
    run_tool("pyramid.stats")


def pack():
    run_tool("pyramid.pack")


class LazyModule:
    """A module imported on its first attribute access: `torch = LazyModule("torch")` at the top of a tool
    lets its --help and argument checks answer in a fraction of a second, and torch load only for work.

    Each attribute is looked up once and then kept, so a hot loop pays no more than a plain module.
    """

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        value = getattr(importlib.import_module(self._name), attribute)
        setattr(self, attribute, value)
        return value

    def __repr__(self):
        return f"<module {self._name!r}, imported on first use>"
