"""The run loop: plan once, share the work, decode in workers, encode, pool, write, report.

`run(settings)` is the whole job in one process, as one of a team of 1..N (one per GPU under a launcher):
the main process plans and every process claims chunks of the to-do list until none is left. A batch's way
from pixels to the writer is batches.py's; the counts, this process's and the team's, are tally.py's.
"""

import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers.image_processing_utils  # noqa: F401 - the shared plan holds the image processor: unpickled by it
from accelerate import PartialState

from pyramid import exits
from pyramid.batches import Batches
from pyramid.chunks import CLAIM_KEY, ChunkSampler, chunk_size_for
from pyramid.decode import DecoderMissing, Preprocess, decoders, image_loader, pixel_pipeline
from pyramid.encoder import Encoder, HostCopies, ModelError, first_line, load_model_info, resolve_dtype
from pyramid.exits import UsageError
from pyramid.lock import OutputLock
from pyramid.plan import (
    Plan,
    cpu_processes_warning,
    default_batch_size,
    default_num_workers,
    plan_run,
    shared_memory_warning,
)
from pyramid.progress import Progress, format_bytes, log, print_summary
from pyramid.runs import append_run, new_run_id, now_iso
from pyramid.stopping import StopNow, StopSignals, stop_with_launcher
from pyramid.tally import Tally
from pyramid.team import Team, start_process_group
from pyramid.tree import FAILURES_NAME, MANIFEST_NAME, RUNS_NAME
from pyramid.watchdog import BACKSTOP_SECONDS, Watchdog
from pyramid.writer import Writer, default_writer_threads, record_failure

RECORD_WAIT_SECONDS = 10.0  # how long a process exiting non-zero waits for the main one's runs.jsonl line


@dataclass(frozen=True)
class Stages:
    """The run's stateful stages, as classes: tests pass their own (a slowed writer, synchronous copies)."""

    writer: type = Writer  # Writer(output_dir, threads=..., fsync=...)
    copies: type = HostCopies  # HostCopies(device, batch_size)


def run(settings, stages=Stages()):
    """The whole job in this process, as one of a team of 1..N, by `settings` (settings.Settings). Returns
    the exit status; the main process appends the run's line to runs.jsonl, also when stopped by a signal."""
    extraction = Extraction(settings, stages)
    try:
        with extraction.watchdog, extraction.signals:
            try:
                stop_with_launcher()
                extraction.record["status"] = extraction.run()
            except StopNow:
                if extraction.team.is_main:
                    log("stopped at once by a second Ctrl-C; every file handed to the writer is complete, "
                        "rerun the same command to finish")
                extraction.record["status"] = exits.BY_SIGNAL[signal.SIGINT]
            except Exception as error:  # anything unforeseen, in planning or at the end: said and recorded
                extraction.record["status"] = extraction.fail(error)
            finally:
                # Still under the stop signals: the launcher SIGTERMs every process the moment one fails, and
                # by default that SIGTERM would end this one before its line is in runs.jsonl.
                extraction.end()
        return extraction.record["status"]
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Extraction:
    """This process's part of a run. The fixed parts are taken once: the settings, the accelerate state
    (device, team), the dtype, batch size and decode workers, the output directory's lock, the stop
    signals, the stages; then a method per step. `record` is the run's runs.jsonl line, filled in as it goes."""

    def __init__(self, settings, stages):
        self.started = time.monotonic()
        self.record = {"run_id": new_run_id(), "status": None, "started": now_iso()}
        self.settings, self.stages = settings, stages
        start_process_group()  # on a store prefix of this attempt: torchrun's restarts keep the store
        state = PartialState(cpu=not torch.cuda.is_available())
        self.device, self.team = state.device, Team.from_state(state)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.batch_size = settings.batch_size or default_batch_size(self.device)
        self.num_workers = default_num_workers(self.device) if settings.num_workers is None else settings.num_workers
        self.lock = OutputLock(settings.output_dir)
        self.signals = StopSignals()
        self.plan = Plan()
        self.progress = None  # the bar, on the main process
        self.tally = Tally(self.team)
        self.preprocess = self.encoder = self.copies = self.batches = None
        self.where = f"process {self.team.rank} on {socket.gethostname()}: " if self.team.world_size > 1 else ""
        self.watchdog = Watchdog(settings.stall_timeout, self.give_up, where=self.where,
                                 reacted=lambda: self.signals.signum is not None)
        self._once = threading.Lock()  # the main thread and the watchdog's: the record goes once
        self._recorded = False
        self.gone = []  # the peers the end wait gave up on

    # ----------------------------------------------------------------------------- the steps, in order

    def run(self):
        """Plan, encode and write this process's share, wait for the team, report. Returns the exit status."""
        if not self.share_plan():
            return exits.USAGE
        self.say_plan()
        self.progress = Progress(len(self.plan.todo)) if self.team.is_main else None
        status = exits.OK
        self.team.start_heartbeat(on_beat=lambda: self.tally.publish(self.progress))
        try:
            if self.plan.todo:
                self.load_stages()
                self.encode_share()
        except ModelError as error:
            status = self.refuse_model(error)
        except OSError as error:
            log(f"error: {error}", self.progress)
            status = exits.WRITE_ERROR
        except Exception as error:  # leave at once: the launcher then stops (or restarts) the team
            return self.fail(error)
        except BaseException:  # StopNow: a second Ctrl-C; the files handed over and the counts still count
            self.finish(status)
            raise
        return self.conclude(self.finish(status))

    def share_plan(self):
        """The main process plans (takes the lock, loads the model's config, lists the work); every process
        gets its plan. False, said once, when the plan is a refusal."""
        team, settings = self.team, self.settings
        if team.is_main:
            try:
                decoders()  # refuses at once where pyspng is missing
                if Path(settings.output_dir).is_dir():
                    self.lock.acquire()  # before the model loads: a second launch is refused at once
                info, processor = load_model_info(settings.model, settings.resolution)
                plan = plan_run(settings, info, self.dtype, self.lock, pixels=pixel_pipeline(processor))
                plan.processor = processor
            except (UsageError, ModelError, DecoderMissing) as error:
                plan = Plan(error=str(error))
        else:
            plan = Plan()  # the others read the main process's; its image processor's module is imported above
        self.plan = plan = team.share("plan", plan)
        self.tally.todo = len(plan.todo)
        if plan.error:
            if team.is_main:
                log(f"error: {plan.error}")
                self.record.update(written=0, skipped=0, failed=0, per_process=[0] * team.world_size,
                                   error=plan.error)
            return False
        if team.is_main and plan.version_changes:
            self.record["version_changes"] = plan.version_changes
        return True

    def say_plan(self):
        """The plan in one line on the main process, and any warning about this machine."""
        if not self.team.is_main:
            return
        plan, settings, team, device = self.plan, self.settings, self.team, self.device
        log(f"{plan.found} images in {settings.input_dir}: {plan.skipped} done already, {len(plan.todo)} to do "
            f"on {team.world_size} process(es), about {format_bytes(plan.needed_bytes)} to write "
            f"({format_bytes(plan.free_bytes)} free there); {settings.model} in {self.dtype} on {device.type}, "
            f"batch {self.batch_size}, {self.num_workers} decode workers per process, "
            f"chunks of {chunk_size_for(len(plan.todo), team.world_size)}")
        if device.type == "cpu" and team.world_size > 1:
            log(cpu_processes_warning(int(os.environ.get("LOCAL_WORLD_SIZE", team.world_size))))
        if plan.todo and (warning := shared_memory_warning(self.batch_size, self.num_workers, plan.model_info.crop_size,
                                                           settings.flip, plan.model_info.pixel_bytes)):
            log(warning)

    def load_stages(self):
        """The processor, the model on the device, the writer's threads, the device-to-host copies and the
        batches' way from pixels to the writer."""
        settings, progress = self.settings, self.progress
        self.preprocess = Preprocess(self.plan.processor, flip=settings.flip)
        self.encoder = Encoder(self.plan.model_info, self.preprocess.normaliser(self.device), self.device,
                               self.dtype, compile=settings.compile,
                               warn=(lambda line: log(line, progress)) if self.team.is_main else None)
        self.tally.writer = self.stages.writer(settings.output_dir, threads=default_writer_threads(),
                                               fsync=settings.fsync)
        self.copies = self.stages.copies(self.encoder.device, self.batch_size)
        self.copies.holder_alive = self.tally.writer.check_alive  # a wait for a buffer ends with the writer
        self.batches = Batches(self.encoder, self.copies, self.tally, settings, self.batch_size, self.signals,
                               self.record_failure, self.note)
        self.tally.encoding_started = time.monotonic()

    def encode_share(self):
        """Decode, encode and pool the chunks of the to-do list this process claims, handing the pyramids
        to the writer. Claims go through the team's store as the loader asks for more: no collectives."""
        todo, team, tally = self.plan.todo, self.team, self.tally
        sampler = ChunkSampler(len(todo), chunk_size_for(len(todo), team.world_size),
                               lambda: team.add(CLAIM_KEY) - 1)
        loader = image_loader(self.settings.input_dir, todo, self.preprocess, self.batch_size, self.num_workers,
                              pin_memory=self.device.type == "cuda", sampler=sampler,
                              max_pixels=self.settings.max_pixels)
        if not self.settings.compile:  # compiling happens in the first batch: the clock starts after it
            self.watchdog.arm()
        for indices, pixels, failures in loader:
            for index, message in failures:
                self.record_failure(todo[index], message)
                tally.unreadable += 1
            if pixels is not None:
                self.batches.encode([todo[i] for i in indices.tolist()], pixels)
            self.watchdog.beat()
            if self.signals.signum is not None:
                team.request_stop()
                return
            if tally.peer_stopped:
                return

    def finish(self, status):
        """Wait for the writer's last files, add this process's counts to the team's, wait (a while) for
        the other processes; returns the status, a write error included."""
        team = self.team
        status = self.close_writer(status)
        self.watchdog.pause()  # waiting for the others has bounds of its own
        team.stop_heartbeat()
        self.tally.add_to_team(write_error=status == exits.WRITE_ERROR)
        self.tally.into_record(self.record, self.plan.skipped)
        # A second Ctrl-C waits for nobody: the launcher, or the user, is ending the run now. A peer that
        # finishes no batch for longer than its own --stall_timeout would have allowed it is stuck.
        gone = [] if self.signals.at_once else team.finish(
            on_wait=self.update_bar, stopping=lambda: self.signals.signum is not None,
            idle_after=self.settings.stall_timeout + BACKSTOP_SECONDS)
        self.tally.into_record(self.record, self.plan.skipped)  # now with every process's counts
        if gone and team.is_main:
            self.gone = gone
            log(f"warning: process(es) {gone} stopped answering; their share may be unfinished, "
                f"rerun to complete it")
        if self.progress is not None:
            self.update_bar()
            self.progress.close()
        return status

    def conclude(self, status):
        """The run's exit status, from this process's and the team's: stopped, write errors, failed images;
        the main process says the summary."""
        team, tally = self.team, self.tally
        stopped = self.signals.signum is not None or tally.peer_stopped or team.stop_requested()
        # A stop that came after the last image was done stopped nothing: the run is complete.
        stopped = stopped and not tally.all_done()
        if stopped and status == exits.OK:
            status = exits.BY_SIGNAL.get(self.signals.signum, exits.BY_SIGNAL[signal.SIGTERM])
        if not team.is_main:
            return exits.IMAGES_FAILED if tally.failed and status == exits.OK else status
        if status == exits.OK and team.add("write_errors", 0):
            status = exits.WRITE_ERROR  # another process said which file it could not write
        errors = team.posts("errors")
        undone = tally.undone()
        if errors and status not in (exits.USAGE, exits.WRITE_ERROR):
            status = exits.INCOMPLETE  # a process failed: the launcher's SIGTERM to this one is its echo
            self.record["error"] = errors[0]
        elif undone and (status == exits.OK or self.gone and status in exits.BY_SIGNAL.values()):
            # A peer gone silent is a fault, not a stop, also when the launcher then SIGTERMed this process.
            status = exits.INCOMPLETE
            self.record["error"] = (f"process(es) {self.gone} stopped answering (killed?)" if self.gone
                                    else "a process ended without finishing its share (killed?)")
        if status == exits.OK and team.add("failed", 0):
            status = exits.IMAGES_FAILED
        self.say_summary(status)
        return status

    def say_summary(self, status):
        """The summary on the main process: `done:` only when every image of the to-do list is written or a
        recorded failure; else how many are not, why, and that a rerun finishes them."""
        team, tally = self.team, self.tally
        finished = time.monotonic()
        encoding_seconds = finished - (tally.encoding_started or finished)
        undone = tally.undone()
        print_summary(team.add("written", 0), self.plan.skipped, team.add("failed", 0), finished - self.started,
                       encoding_seconds, Path(self.settings.output_dir) / FAILURES_NAME, undone,
                       self.record["per_process"])
        if undone or status in exits.BY_SIGNAL.values():
            why = "stopped before the end" if status in exits.BY_SIGNAL.values() and "error" not in self.record \
                else f"ended early: {self.record.get('error', 'a process ended without finishing its share')}"
            log(f"{why}; rerun the same command to finish" + (f" the {undone} images not done" if undone else ""))

    def fail(self, error):
        """Any error but a model's or a write's: said at once in one line naming this process, its traceback
        in the log; this process's counts go to the team and it leaves without waiting for the others, so
        the launcher can act. Returns exits.INCOMPLETE."""
        line = f"{self.where}{type(error).__name__}: {first_line(error)}"
        log(f"error: {line}", self.progress)
        traceback.print_exception(error)
        try:  # the stall clock still runs: a writer that hangs here is a stuck process
            self.close_writer(exits.OK)  # the files handed over are finished; a write error is said there
        except Exception:
            pass
        self.watchdog.pause()
        self.team.stop_heartbeat()
        self.leave(line)
        if self.progress is not None:
            self.progress.close()
        if self.team.is_main and self.tally.encoding_started is not None:
            self.say_summary(exits.INCOMPLETE)
        return exits.INCOMPLETE

    def give_up(self, message, status):
        """The watchdog's end of this process (on its thread): the main thread is stuck or has not stopped.
        Records what it can; the watchdog then ends the process with `status`. A stop that took too long
        is still a stop (its status is the signal's); a stuck process is the run's error."""
        self.leave(message, error=status == exits.INCOMPLETE)
        self.record["status"] = status
        if self.team.is_main:
            if self.tally.encoding_started is not None:
                self.say_summary(status)
            self.lock.release()
            self.record_run()

    def leave(self, line, error=True):
        """Post this process's counts and `line` (an error, or else a note) to the team, and say it is
        finished: nobody waits for it."""
        try:
            self.tally.publish()
            self.tally.add_to_team()
            self.team.post("errors" if error else "notes", line)
        except Exception:  # the store is gone with the main process: nobody is left to read it
            pass
        self.team.leave()
        if error:
            self.record.setdefault("error", line)
        else:  # kept where the store is gone; else the notes read back from the team include it
            self.record["notes"] = [*self.record.get("notes", []), line]
        self.tally.into_record(self.record, self.plan.skipped)

    def note(self, text):
        """A change the run made to go on (a smaller batch): said by this process, recorded by the main one."""
        log(f"note: {self.where}{text}", self.progress)
        try:
            self.team.post("notes", f"{self.where}{text}")
        except Exception:
            pass

    def end(self):
        """Release the lock and record the run, whatever signals come meanwhile (a second Ctrl-C included)."""
        try:
            with self.signals.deferred():
                self.lock.release()
                self.record_run()
        except StopNow:
            pass

    def record_run(self):
        """The main process appends the run's line to runs.jsonl, once; a process refused with the others
        waits (a while) for that line first: a launcher that sees a process fail SIGTERMs the others, the
        main one too. A process that failed on its own leaves at once."""
        if self.team.is_main and self.record["status"] is not None:
            with self._once:
                if self._recorded:
                    return
                self._recorded = True
            self.append_record()
            try:
                self.team.add("recorded")
            except Exception:  # a team whose store is gone has nobody left waiting
                pass
        elif self.record["status"] and self.record["status"] != exits.INCOMPLETE:
            deadline = time.monotonic() + RECORD_WAIT_SECONDS
            try:
                while self.team.add("recorded", 0) == 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
            except Exception:
                pass

    # ----------------------------------------------------------------------------- the steps' parts

    def refuse_model(self, error):
        """Weights that cannot be loaded: one line (every process loads the same), exits.USAGE."""
        if self.team.is_main:
            log(f"error: {error}", self.progress)
            if self.plan.new_manifest and self.tally.written == 0:
                # A refused run writes no manifest: one naming these weights would refuse the next run,
                # made once they are fixed, as "other settings".
                (Path(self.settings.output_dir) / MANIFEST_NAME).unlink(missing_ok=True)
        return exits.USAGE

    def record_failure(self, image, message):
        """An image that gets no file: its failures.jsonl line, and a line in the log."""
        record_failure(self.settings.output_dir, image, message)
        log(f"failed: {image}: {message}", self.progress)

    def close_writer(self, status):
        """Wait for the writer's last files; a write error turns a clean status into exits.WRITE_ERROR."""
        writer = self.tally.writer
        if writer is None:
            return status
        try:
            try:
                with self.signals.deferred():  # a second Ctrl-C while waiting still waits: no file left half
                    writer.close()  # written; what is left after it is quick (no waiting for peers: at_once)
            except StopNow:
                pass
        except OSError as error:
            if status == exits.OK:
                log(f"error: {error}", self.progress)
                return exits.WRITE_ERROR
        return status

    def update_bar(self):
        if self.progress is not None:
            self.progress.update(self.team.add("done", 0))

    def append_record(self):
        """Append this run's line to runs.jsonl where the output directory exists; a warning if it cannot."""
        output_dir = self.settings.output_dir
        if not Path(output_dir).is_dir():
            return
        self.record.update(finished=now_iso(), processes=self.team.world_size, settings=self.settings.record())
        try:
            append_run(output_dir, self.record)
        except OSError as error:
            if self.record["status"] != exits.USAGE:  # a refusal (an unwritable directory, say) has said its line
                log(f"warning: cannot append this run to {Path(output_dir) / RUNS_NAME}: {error}")
