"""The run loop: plan once, split the work, decode in workers, encode, pool, write, report."""

import _thread
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyramid import exits
from pyramid.decode import DecoderMissing, Preprocess, decoders, image_loader, pixel_pipeline
from pyramid.encoder import DTYPES, Encoder, HostCopies, ModelError, load_model_info, resolve_dtype
from pyramid.exits import UsageError
from pyramid.lock import OutputLock
from pyramid.manifest import MANIFEST_NAME, adopt_output_tree, build_manifest, read_manifest, version_changes
from pyramid.paths import (IMAGE_SUFFIXES, find_clashes, find_damaged_outputs, find_images, images_to_do,
                           output_path_for, remove_abandoned_temporaries, scan_outputs)
from pyramid.levels import build_pyramid, finite_images, level_key, pyramid_sizes, split_twins
from pyramid.progress import Progress, format_bytes, format_duration, log
from pyramid.runs import append_run, new_run_id, now_iso
from pyramid.chunks import CLAIM_KEY, ChunkSampler, chunk_size_for
from pyramid.team import Team, cpus_per_process, usable_cpus
from pyramid.writer import FAILURES_NAME, Writer, default_writer_threads, estimated_file_bytes, record_failure


@dataclass
class Plan:
    """What the main process decided for the whole team, before anyone writes."""

    todo: list = field(default_factory=list)
    found: int = 0
    skipped: int = 0
    error: str | None = None
    needed_bytes: int = 0  # the estimated size of the files to write, and the free space of their disk
    free_bytes: int = 0
    model_info: object = None  # ModelInfo, read once (the weights digest reads every weight file)
    processor: object = None  # the model's image processor
    version_changes: dict = field(default_factory=dict)  # {package: [old, new]} of the files kept
    new_manifest: bool = False  # this run wrote the directory's first manifest.json


def default_num_workers(device):
    """Decode workers per process: the CPUs this process may use, shared among the node's processes.

    On a GPU one core stays with the main process, which feeds the GPU. On a CPU the workers take
    every core too: they sleep once their prefetched batches wait, so a heavy model gets the cores
    back, and a light one is not starved of decoding.
    """
    per_process = cpus_per_process()
    if torch.device(device).type == "cuda":
        return max(1, min(16, per_process - 1))
    return per_process


def _cpu_processes_warning(processes):
    """One line for several processes on a machine without a GPU (an accelerate config made for GPUs)."""
    return (f"warning: no GPU: {processes} processes share {usable_cpus()} CPU core(s) on this machine; one process "
            f"(python extract_distributed.py, without accelerate launch) is as fast and loads the model once")


def default_batch_size(device):
    return 64 if torch.device(device).type == "cuda" else 16


# Batches each decode worker keeps ready (the DataLoader's prefetch_factor), and those the main process
# holds besides (the one being pinned, the one being encoded).
PREFETCHED_PER_WORKER = 2
HELD_BY_MAIN = 2


def shared_memory_needed(batch_size, num_workers, crop_size, flip=False):
    """Bytes of /dev/shm the decode workers fill at most: each batch of uint8 crops (B, 3, crop, crop),
    doubled with --flip, crosses from a worker to the main process through shared memory."""
    if num_workers == 0:
        return 0
    batch_bytes = batch_size * 3 * crop_size * crop_size * (2 if flip else 1)
    return (num_workers * PREFETCHED_PER_WORKER + HELD_BY_MAIN) * batch_bytes


def shared_memory_warning(batch_size, num_workers, crop_size, flip=False, shm="/dev/shm"):
    """One line when `shm` has less room than the decode workers need (a container's 64 MB default), else None."""
    needed = shared_memory_needed(batch_size, num_workers, crop_size, flip)
    try:
        stats = os.statvfs(shm)
    except OSError:  # no /dev/shm (not Linux): torch shares memory another way
        return None
    free = stats.f_bavail * stats.f_frsize
    if needed <= free:
        return None
    return (f"warning: {shm} has {free / 2**20:.0f} MB free, but {num_workers} decode workers at batch {batch_size} "
            f"hold up to {needed / 2**20:.0f} MB there; workers may die with 'Bus error': give it more (docker run "
            f"--shm-size={_round_up_gb(needed)}g) or pass a smaller --num_workers or --batch_size")


def _round_up_gb(size):
    return max(1, -(-size // 2**30))


def _recorded_path(line):
    """The image path of a failures.jsonl line, or None for a blank or torn line."""
    try:
        return json.loads(line).get("path")
    except (ValueError, AttributeError):
        return None


def prune_failures(output_dir, retried):
    """Drop the failures.jsonl lines of images this run tries again (they are recorded again if still
    broken), and any torn line a killed writer left."""
    path = Path(output_dir) / FAILURES_NAME
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if (recorded := _recorded_path(line)) is not None and recorded not in retried]
    if kept:
        path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    else:
        path.unlink()


def plan_run(args, info, dtype, lock=None, pixels=None):
    """Find the images, refuse clashes and foreign manifests, take the directory's `lock` (an OutputLock),
    and list the work left. `pixels`: the pixel pipeline (decode.pixel_pipeline). Main process only."""
    images = find_images(args.input_dir, skip=[args.output_dir])  # an output tree inside it is no input
    if args.limit:
        images = images[:args.limit]
    if not images:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise UsageError(f"no images ({suffixes}, any letter case) under {args.input_dir}")
    clashes = find_clashes(images)
    if clashes:
        named = "; ".join(" and ".join(group) + f" -> {output_path_for(group[0])}" for group in clashes)
        raise UsageError(f"these images would write the same file: {named}; rename or remove one of each")

    output_dir = Path(args.output_dir)
    needed, free = check_free_space(args, info, images, output_dir)  # before anything is written
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output_dir {output_dir}: {error.strerror}") from error
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir} is not writable")
    if lock is not None:
        lock.acquire()
        if lock.taken_over:
            log(lock.taken_over)

    levels = [level_key(size) for size in pyramid_sizes(info.grid_size)]
    manifest = build_manifest(info.name, info.revision, dtype, info.crop_size, info.patch_size, levels,
                              info.hidden_size, info.num_register_tokens, flip=args.flip, pixels=pixels)
    finished, temporaries = scan_outputs(output_dir)
    previous = read_manifest(output_dir)
    finished = adopt_output_tree(output_dir, manifest, finished, args.overwrite)  # refuses, or removes old files
    changes = version_changes(previous, manifest) if previous and finished else {}
    if changes:
        said = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
        log(f"note: the {len(finished)} file(s) already in {output_dir} were made with other versions ({said}); "
            f"they are kept, and runs.jsonl records it; `python -m pyramid.verify {output_dir} --input_dir "
            f"{args.input_dir} --recompute 64` compares a sample")
    remove_abandoned_temporaries(temporaries)
    damaged = find_damaged_outputs(output_dir, finished & {output_path_for(image) for image in images})
    if damaged:
        log(f"{len(damaged)} file(s) cut short by a crash (empty or truncated) will be written again, "
            f"e.g. {min(damaged)}")
    todo = images_to_do(images, finished - damaged)
    prune_failures(output_dir, set(todo))
    return Plan(todo=todo, found=len(images), skipped=len(images) - len(todo), model_info=info,
                version_changes=changes, new_manifest=previous is None, needed_bytes=needed, free_bytes=free)


def check_free_space(args, info, images, output_dir):
    """(bytes the files still to write need, bytes free on the disk of `output_dir`, or of its nearest existing
    parent); a UsageError when they do not fit, unless --ignore_free_space. A run that learns it lacks space
    hours later has wasted those hours."""
    finished, _ = scan_outputs(output_dir)
    per_file = estimated_file_bytes(pyramid_sizes(info.grid_size), info.hidden_size, args.flip)
    count = len(images_to_do(images, finished))
    existing = next(parent for parent in [output_dir, *output_dir.absolute().parents] if parent.exists())
    free = shutil.disk_usage(existing).free
    if count * per_file > free and not args.ignore_free_space:
        raise UsageError(f"the {count} images to do need about {format_bytes(count * per_file)} in {output_dir} "
                         f"({format_bytes(per_file)} a file) and its disk has {format_bytes(free)} free; free some "
                         f"space or use another --output_dir (--ignore_free_space starts anyway)")
    return count * per_file, free


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, finishing only the files already handed to the writer."""


class StopSignals:
    """SIGINT/SIGTERM ask for a clean stop after the files in flight; a second SIGINT stops at once."""

    def __init__(self):
        self.signum = None
        self.at_once = False
        self._previous = {}

    def __enter__(self):
        for signum in exits.BY_SIGNAL:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.signum is not None:
            # Stopping already: a Ctrl-C during the last clean-up (workers, atexit hooks) ends the
            # process at once instead of printing a KeyboardInterrupt traceback from wherever it lands.
            signal.signal(signal.SIGINT, lambda *_: os._exit(exits.BY_SIGNAL[signal.SIGINT]))

    def _handle(self, signum, frame):
        if self.at_once:  # already stopping at once: more Ctrl-C would only interrupt the last writes
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            if _in_finaliser(frame):
                # Raised in a __del__ or a weakref callback it would only print "Exception ignored":
                # the same signal again in a moment, once that code has returned.
                threading.Timer(0.05, _thread.interrupt_main, args=(signal.SIGINT,)).start()
                return
            self.at_once = True
            raise StopNow
        self.signum = signum


# Code run by the garbage collector, where an exception is printed and dropped instead of raised.
FINALISER_FILES = ("weakref.py", "_weakrefset.py")


def _in_finaliser(frame):
    """True when `frame` runs inside a __del__ (a DataLoader shutting its workers down, say) or a
    weakref callback."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or os.path.basename(frame.f_code.co_filename) in FINALISER_FILES:
            return True
        frame = frame.f_back
    return False


def stop_with_launcher():
    """Under a launcher (torchrun / accelerate launch), ask the kernel for SIGTERM when it dies.

    torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL would leave
    its ranks running as orphans that clash with the next launch; with this they stop cleanly after
    the batch in flight instead. Linux only; elsewhere a no-op.
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True)
class Stages:
    """The run's stateful stages, as classes: tests pass their own (a slowed writer, synchronous copies)."""

    writer: type = Writer  # Writer(output_dir, threads=..., fsync=...)
    copies: type = HostCopies  # HostCopies(device, batch_size)


def run(args, stages=Stages()):
    """The whole job in this process, as one of a team of 1..N. Returns the exit status."""
    from accelerate import PartialState

    started = time.monotonic()
    record = {"run_id": new_run_id(), "status": None, "started": now_iso()}  # the runs.jsonl line, filled in
    state = PartialState(cpu=not torch.cuda.is_available())
    team = Team.from_state(state)
    lock = OutputLock(args.output_dir)
    try:
        with StopSignals() as signals:
            stop_with_launcher()
            try:
                record["status"] = _run(args, state, team, signals, started, record, lock, stages)
            except StopNow:
                if team.is_main:
                    log("stopped at once by a second Ctrl-C; every file handed to the writer is complete, "
                        "rerun the same command to finish")
                record["status"] = exits.BY_SIGNAL[signal.SIGINT]
        return record["status"]
    finally:
        lock.release()
        if team.is_main and record["status"] is not None:
            _append_run_record(args, team, record)
            _say_recorded(team)
        elif record["status"]:
            _wait_for_record(team)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


RECORD_WAIT_SECONDS = 10.0


def _say_recorded(team):
    try:
        team.add("recorded")
    except Exception:  # a team whose store is gone has nobody left waiting
        pass


def _wait_for_record(team):
    """A process about to exit non-zero waits (a while) for the main process's runs.jsonl line: a launcher
    that sees a process fail SIGTERMs the others, and the main one might not have written it yet."""
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    try:
        while team.add("recorded", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:
        pass


def _append_run_record(args, team, record):
    """Append this run's line to runs.jsonl where the output directory exists; a warning if it cannot."""
    if not Path(args.output_dir).is_dir():
        return
    record.update(finished=now_iso(), processes=team.world_size,
                  settings={key: value for key, value in sorted(vars(args).items())})
    try:
        append_run(args.output_dir, record)
    except OSError as error:
        if record["status"] != exits.USAGE:  # a refusal (an unwritable directory, say) has said its line
            log(f"warning: cannot append this run to {Path(args.output_dir) / 'runs.jsonl'}: {error}")


class Tally:
    """This process's counts, read by the heartbeat thread to publish progress."""

    def __init__(self):
        self.writer = None
        self.unreadable = 0  # images the decoder could not read
        self.published = 0
        self.peer_stopped = False
        self.encoding_started = None  # after the model loaded: the rate in the summary excludes start-up

    @property
    def written(self):
        return self.writer.written if self.writer is not None else 0

    @property
    def failed(self):
        """Recorded failures: unreadable images, and images whose features came out non-finite."""
        return self.unreadable + (self.writer.non_finite if self.writer is not None else 0)

    @property
    def done(self):
        return self.written + self.failed


def _run(args, state, team, signals, started, record, lock, stages):
    device = state.device
    dtype = resolve_dtype(args.dtype, device)
    plan = Plan()
    if team.is_main:
        try:
            decoders()  # refuses at once where pyspng is missing
            if Path(args.output_dir).is_dir():
                lock.acquire()  # before the model loads: a second launch is refused at once
            info, processor = load_model_info(args.model)
            plan = plan_run(args, info, dtype, lock, pixels=pixel_pipeline(processor))
            plan.processor = processor
        except (UsageError, ModelError, DecoderMissing) as error:
            plan = Plan(error=str(error))
    else:
        # Unpickling the plan imports the model's image processor: seconds of transformers imports,
        # done here while the main process plans, so the others start encoding about when it does.
        import transformers.image_processing_utils  # noqa: F401
    plan = team.share("plan", plan)
    if plan.error:
        if team.is_main:
            log(f"error: {plan.error}")
            record.update(written=0, skipped=0, failed=0, per_process=[0] * team.world_size, error=plan.error)
        return exits.USAGE
    if team.is_main and plan.version_changes:
        record["version_changes"] = plan.version_changes

    batch_size = args.batch_size or default_batch_size(device)
    num_workers = default_num_workers(device) if args.num_workers is None else args.num_workers
    if team.is_main:
        log(f"{plan.found} images in {args.input_dir}: {plan.skipped} done already, {len(plan.todo)} to do "
            f"on {team.world_size} process(es), about {format_bytes(plan.needed_bytes)} to write "
            f"({format_bytes(plan.free_bytes)} free there); {args.model} in {dtype} on {device.type}, "
            f"batch {batch_size}, {num_workers} decode workers per process, "
            f"chunks of {chunk_size_for(len(plan.todo), team.world_size)}")
        if device.type == "cpu" and team.world_size > 1:
            log(_cpu_processes_warning(int(os.environ.get("LOCAL_WORLD_SIZE", team.world_size))))
        if plan.todo and (warning := shared_memory_warning(batch_size, num_workers, plan.model_info.crop_size,
                                                          args.flip)):
            log(warning)

    progress = Progress(len(plan.todo)) if team.is_main else None
    tally = Tally()
    status = exits.OK
    team.start_heartbeat(on_beat=lambda: _publish_progress(team, tally, progress))
    try:
        if plan.todo:
            preprocess = Preprocess(plan.processor, flip=args.flip)
            encoder = Encoder(plan.model_info, preprocess.normaliser(device), device, dtype, compile=args.compile,
                              warn=(lambda line: log(line, progress)) if team.is_main else None)
            tally.writer = stages.writer(args.output_dir, threads=default_writer_threads(), fsync=args.fsync)
            tally.encoding_started = time.monotonic()
            _encode_share(args.input_dir, args.output_dir, plan.todo, preprocess, encoder, tally, team, signals,
                          progress, batch_size, num_workers, stages.copies(encoder.device, batch_size),
                          args.max_pixels)
    except ModelError as error:
        if team.is_main:  # every process loads the same weights: one line says it
            log(f"error: {error}", progress)
            if plan.new_manifest and tally.written == 0:
                # A refused run writes no manifest: one naming these weights would refuse the next run,
                # made once they are fixed, as "other settings".
                (Path(args.output_dir) / MANIFEST_NAME).unlink(missing_ok=True)
        status = exits.USAGE
    except OSError as error:
        log(f"error: {error}", progress)
        status = exits.WRITE_ERROR
    finally:
        status = _close_writer(tally.writer, progress, status)
        team.stop_heartbeat()
        _publish_progress(team, tally, None)
        team.add("written", tally.written)
        team.add("failed", tally.failed)
        if status == exits.WRITE_ERROR:
            team.add("write_errors")
        if team.is_main:
            _count_into(record, team, plan)
        # A second Ctrl-C waits for nobody: the launcher, or the user, is ending the run now.
        gone = [] if signals.at_once else team.finish(on_wait=lambda: _update_bar(team, progress),
                                                      stopping=lambda: signals.signum is not None)
        if team.is_main:
            _count_into(record, team, plan)  # now with every process's counts
        if gone and team.is_main:
            log(f"warning: process(es) {gone} stopped answering; their share may be unfinished, "
                f"rerun to complete it")
        if progress is not None:
            _update_bar(team, progress)
            progress.close()

    stopped = signals.signum is not None or tally.peer_stopped or team.stop_requested()
    # A stop that came after the last image was done stopped nothing: the run is complete.
    stopped = stopped and not _all_done(team, len(plan.todo))
    if stopped and status == exits.OK:
        status = exits.BY_SIGNAL.get(signals.signum, exits.BY_SIGNAL[signal.SIGTERM])
    failed = team.add("failed", 0) if team.is_main else tally.failed
    if team.is_main and status == exits.OK and team.add("write_errors", 0):
        status = exits.WRITE_ERROR  # another process said which file it could not write
    if team.is_main:
        finished = time.monotonic()
        encoding_seconds = finished - (tally.encoding_started or finished)
        _print_summary(team.add("written", 0), plan.skipped, failed, finished - started, encoding_seconds,
                       Path(args.output_dir) / FAILURES_NAME, stopped, record["per_process"])
    if failed and status == exits.OK:
        status = exits.IMAGES_FAILED
    return status


def _count_into(record, team, plan):
    record.update(written=team.add("written", 0), skipped=plan.skipped, failed=team.add("failed", 0),
                  per_process=[team.add(f"done/{rank}", 0) for rank in range(team.world_size)])


def _all_done(team, total):
    """True when the processes wrote or recorded as failed all `total` images of the to-do list."""
    try:
        return team.add("written", 0) + team.add("failed", 0) >= total
    except Exception:  # the store is gone with the main process: nothing says the work is complete
        return False


def _close_writer(writer, progress, status):
    """Wait for the writer's last files; a write error turns a clean status into exits.WRITE_ERROR."""
    if writer is None:
        return status
    try:
        try:
            writer.close()
        except StopNow:  # a second Ctrl-C while waiting: still wait, so no file is left half written;
            writer.close()  # what is left to do after it is quick (no waiting for peers: signals.at_once)
    except OSError as error:
        if status == exits.OK:
            log(f"error: {error}", progress)
            return exits.WRITE_ERROR
    return status


def _print_summary(written, skipped, failed, seconds, encoding_seconds, failures_path, stopped, per_process):
    """The run's one summary line; images/s counts the time spent encoding, not loading the model.
    With several processes it ends with the images each did, in rank order."""
    # A rate of nothing ("0.00 images/s") reads as a stalled run: a run with nothing to encode says so.
    pace = f"{written / encoding_seconds:.2f} images/s while encoding" if written and encoding_seconds > 0 \
        else "nothing encoded"
    shares = f"; per process: {', '.join(map(str, per_process))}" if len(per_process) > 1 else ""
    log(f"done: {written} written, {skipped} skipped (already there), {failed} failed "
        f"in {format_duration(seconds)} ({seconds:.1f} s; {pace}){shares}")
    if failed:
        log(f"the failed images are listed in {failures_path}, each with its reason; fix what it says and rerun")
    if stopped:
        log("stopped before the end; rerun the same command to finish")


def _publish_progress(team, tally, progress):
    """Add this process's newly done images to the team's count; redraw the bar on main; see peers' stop."""
    done = tally.done
    if done != tally.published:
        team.add("done", done - tally.published)
        team.add(f"done/{team.rank}", done - tally.published)
        tally.published = done
    _update_bar(team, progress)
    if team.world_size > 1 and team.stop_requested():
        tally.peer_stopped = True


def _update_bar(team, progress):
    if progress is not None:
        progress.update(team.add("done", 0))


FINITE_KEY = "finite"  # the per-image flags, copied to the host with the levels


def non_finite_message(dtype, flags):
    """The failures.jsonl error of an image whose features came out NaN or inf in `dtype`: what happened
    and what to try. `flags` are its parts' finite flags: [image] or, with --flip, [image, mirror]."""
    parts = [name for name, finite in zip(("the image", "its mirror (--flip)"), flags) if not finite]
    what = f"non-finite features (NaN or inf) for {' and '.join(parts)}, computed in {dtype}; no file written: "
    if dtype == "fp16":
        return what + "most likely an fp16 overflow, rerun with --dtype bf16 or --dtype fp32"
    if dtype == "bf16":
        return what + "rerun with --dtype fp32"
    return what + ("a sound checkpoint does not do that in fp32, so the weights of --model are likely broken "
                   "(NaN or inf values, a damaged download): check them or download them again")


def _encode_share(input_dir, output_dir, todo, preprocess, encoder, tally, team, signals, progress,
                  batch_size, num_workers, copies, max_pixels=None):
    """Decode, encode and pool the chunks of the to-do list this process claims, handing the pyramids
    to the writer. Claims go through the team's store as the loader asks for more: no collectives."""
    sampler = ChunkSampler(len(todo), chunk_size_for(len(todo), team.world_size), lambda: team.add(CLAIM_KEY) - 1)
    loader = image_loader(input_dir, todo, preprocess, batch_size, num_workers,
                          pin_memory=encoder.device.type == "cuda", sampler=sampler, max_pixels=max_pixels)
    grid_size = encoder.info.grid_size
    parts = 2 if preprocess.flip else 1
    dtype = {value: name for name, value in DTYPES.items()}[encoder.dtype]

    def report_non_finite(images, position, flags):  # called by a writer thread
        message = non_finite_message(dtype, flags)
        record_failure(output_dir, images[position], message)
        log(f"failed: {images[position]}: {message}", progress)

    for indices, pixels, failures in loader:
        for index, message in failures:
            record_failure(output_dir, todo[index], message)
            tally.unreadable += 1
            log(f"failed: {todo[index]}: {message}", progress)
        if pixels is not None:
            levels = build_pyramid(encoder(pixels), grid_size)  # {"16x16": (B, 256, D), ...} fp32
            # Checked on the device and read by the writer once the copy is there: the loop never waits.
            finite = finite_images(levels).view(parts, -1).T.contiguous()  # (B, parts) bool: the image, its mirror
            if preprocess.flip:  # one forward pass of the 2B images and their mirrors
                levels = split_twins(levels)  # {"16x16": (B, 256, D), ..., "flip/16x16": (B, 256, D), ...}
            # Copied to the host on the side while the next batch computes; the writer waits, not us.
            host, ready, release = copies.start({**levels, FINITE_KEY: finite})
            finite = host.pop(FINITE_KEY)
            images = [todo[i] for i in indices.tolist()]
            tally.writer.submit_batch([output_path_for(image) for image in images], host, ready=ready,
                                      release=release, finite=finite,
                                      on_non_finite=functools.partial(report_non_finite, images))
        if signals.signum is not None:
            team.request_stop()
            return
        if tally.peer_stopped:
            return
