"""runs.jsonl: one JSON line per run in the output directory, for scripts a launcher hides the exit status from.

    python -m pyramid.runs status OUTPUT_DIR RUN_ID    # prints that run's exit status (its error, if any, on
                                                       # stderr); exit 1 if it has no line
"""

import json
import os
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from pyramid import exits
from pyramid.cli import HelpFormatter, argument_parser, command_name, refusals_exit_2
from pyramid.exits import UsageError
from pyramid.tree import RUNS_NAME, append_json_line

RUN_ID_VARIABLE = "PYRAMID_RUN_ID"


def new_run_id():
    """$PYRAMID_RUN_ID when set (a script names its run, to find its line), else a fresh unique id."""
    return os.environ.get(RUN_ID_VARIABLE) or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def now_iso():
    """The current time in ISO 8601 with its UTC offset: '2026-11-26T08:06:23.123456+00:00'."""
    return datetime.now(timezone.utc).isoformat()


def append_run(output_dir, record):
    """Append `record` as one line of runs.jsonl (tree.append_json_line: one write with O_APPEND, so a line
    is never torn by another run's line)."""
    append_json_line(Path(output_dir) / RUNS_NAME, record)


def record_refusal(output_dir, settings, message, status):
    """The line of a run refused before it started (bad arguments), where its output directory exists."""
    if not Path(output_dir).is_dir():
        return
    moment = now_iso()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        append_run(output_dir, {"run_id": new_run_id(), "status": status, "started": moment, "written": 0,
                                "skipped": 0, "failed": 0, "per_process": [0] * processes, "finished": moment,
                                "processes": processes, "error": message, "settings": settings})
    except OSError:
        pass  # the refusal itself was said on stderr; a directory that takes no line changes nothing


def read_runs(output_dir):
    """Every complete record of runs.jsonl, oldest first; torn or foreign lines are skipped."""
    path = Path(output_dir) / RUNS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def record_of(output_dir, run_id):
    """The last line of run `run_id` that has a status (a launcher's restarts append one line each), or None."""
    for record in reversed(read_runs(output_dir)):
        if record.get("run_id") == run_id and isinstance(record.get("status"), int):
            return record
    return None


def status_of(output_dir, run_id):
    """The exit status the last line of run `run_id` reports, or None when it has no line."""
    record = record_of(output_dir, run_id)
    return None if record is None else record["status"]


def get_args_parser():
    parser = argument_parser(command_name("pyramid.runs"), __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", formatter_class=HelpFormatter,
                                 help="print the exit status that run RUN_ID reported (its last line), and its "
                                      "error on stderr; exit 1 if it has no line")
    status.add_argument("output_dir", type=Path, help="the extractor's --output_dir")
    status.add_argument("run_id", help=f"the run's id, as ${RUN_ID_VARIABLE} named it")
    return parser


@refusals_exit_2
def main(args):
    if not args.output_dir.is_dir():
        raise UsageError(f"{args.output_dir} is not a directory; pass the extractor's --output_dir")
    record = record_of(args.output_dir, args.run_id)
    if record is None:
        print(f"no run {args.run_id!r} in {args.output_dir / RUNS_NAME}", file=sys.stderr)
        return 1
    print(record["status"])
    if record.get("error"):
        print(f"error: {record['error']}", file=sys.stderr)
    return exits.OK


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
