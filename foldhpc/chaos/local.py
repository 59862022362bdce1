"""The local backend of ``foldhpc chaos``: real ``foldhpc train`` processes on this machine.

The runner plays both the cluster and the adversary. It starts ``foldhpc train --supervise``
(a launch: what one Slurm job allocation would run) in its own process group, watches
``events.jsonl`` (:mod:`.eventtail`), injects the planned faults one after another, and starts the
training again whenever a fault ended the launch -- exactly what a requeue does. Each fault is
recovered from before the next one is injected, so every record says what that fault cost: the
step it hit, the checkpoint the next start resumed from (and any it rejected), the steps lost and
the time from the fault to the first step the new trainer completed.

Everything foldhpc itself must do (save on the signal, pick the newest good checkpoint, restart
the crashed trainer, detect the hang) is left to foldhpc; the runner only checks the outcome
against what the kind promises (:mod:`.kinds`). A run whose recovery is wrong cannot pass: the
final state digest must equal the uninterrupted reference's.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from foldhpc.records.envvars import (BITFLIP_AT_STEP, BITFLIP_ON_RANK, BITFLIP_ONCE, FAIL_AT_STEP, FAIL_KIND, FAIL_ONCE,
                                     FAULT_PREFIXES, NAN_AT_STEPS, WRITE_DELAY)
from foldhpc.chaos import storage
from foldhpc.chaos.kinds import KINDS, uses_hook
from foldhpc.chaos.eventtail import EventTail, SeenEvent
from foldhpc.chaos.schedule import Plan, PlannedFault
from foldhpc.config import ConfigError
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import CHECKPOINT_DIR, EVENTS_FILE, RANKS_DIR, STATUS_FILE

if TYPE_CHECKING:
    from foldhpc.checkpoint.manager import CheckpointEntry

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.01
START_TIMEOUT_S = 180.0  # process start to first step, on a loaded 2-core machine
MAX_UNPLANNED_RELAUNCHES = 3
CLI_TIMEOUT_S = 60.0  # foldhpc status / checkpoints (no torch import): seconds on a loaded machine
MISSING_BACK_S = (0.0, 0.3)  # missing_file: back this soon after the trainer's choice, before its next save
FULL_FS_CHECKPOINTS = 2  # full_status_fs: checkpoints that must commit while the run directory is full
# chaos settings that make every fault cheap; the user's --set items override them
CHAOS_DEFAULTS: dict[str, str] = {
    "run.log_every": "1",  # a progress record (events.jsonl) for each completed step: the runner reads them
    "train.deterministic": "true",  # bit-exact on CPU
    "checkpoint.every_steps": "10",
    "checkpoint.keep_last": "3",  # a damaged newest file still leaves good ones
    "fault.max_restarts": "100000",  # in-job restarts are the point here, not a budget
    "fault.restart_backoff": "0s",
    "fault.hang_timeout": "3s",
    "fault.sdc_check_every": "10",  # bitflip (--nproc > 1): found within 10 steps, replayed from the save before
}


class NoNonFiniteGuard(ConfigError):
    """The training has no non-finite guard for the ``nan`` kind to test (a ``[task]`` whose step
    does not call ``run.check_finite``): found in the reference run, before the chaos run starts."""


class LaunchEnded(RuntimeError):
    """The training process tree ended while the runner waited for something else."""

    def __init__(self, rc: int, what: str) -> None:
        super().__init__(f"the launch ended (exit {rc}) while waiting for {what}")
        self.rc = rc


class WaitTimeout(RuntimeError):
    pass


@dataclass
class FaultRecord:
    """What one fault did, and whether foldhpc recovered as the kind promises."""

    index: int
    kind: str
    variant: str
    planned_step: int
    step: int | None = None  # the last step done when the fault hit (for signals: the step saved)
    injected_at: float | None = None  # time.time()
    recovered: bool = False
    steps_lost: int | None = None
    time_to_resume_s: float | None = None
    resume_measure: str = ""  # what time_to_resume_s is measured between
    checkpoint_used: str | None = None
    resumed_step: int | None = None
    rejected: list[str] = field(default_factory=list)
    newest_durable_step: int | None = None  # the newest good checkpoint when the fault hit
    launch_exit: int | None = None  # exit status of the launch the fault ended
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Launch:
    started_at: float
    pid: int
    first_fault: int
    env: dict[str, str]
    ended_at: float | None = None
    rc: int | None = None
    why: str = ""


@dataclass
class RunOutcome:
    run_dir: str
    rc: int | None
    completed: bool
    final_step: int | None
    digest: str | None
    wall_s: float
    error: str = ""


@dataclass
class ChaosOutcome:
    reference: RunOutcome
    chaos: RunOutcome
    records: list[FaultRecord]
    launches: list[Launch]
    relaunches_for_hooks: int
    unplanned_relaunches: int
    timeline: list[tuple[float, int]]
    started_at: float  # time.time() when the chaos run (after the reference) started
    unwritable_method: str | None
    settings: dict[str, str]
    in_job_restarts: int = 0  # the supervisors' restarts of a trainer, as recorded (supervisor_restart)
    slurm_jobs: list[str] = field(default_factory=list)  # --backend slurm: every job id the run had
    max_jobs_running: int = 0  # --backend slurm: the most jobs of the run seen RUNNING at once


def unwritable_method(scratch: Path) -> tuple[str | None, str]:
    """How to make a directory unwritable for this user: ``chmod`` (not root), ``chattr`` (root,
    where the file system supports the immutable flag), or None with the reason."""
    if os.geteuid() != 0:
        return "chmod", "chmod a-w on the checkpoint directory"
    if not shutil.which("chattr"):
        return None, "running as root (chmod does not stop root) and chattr is not installed"
    probe = scratch / ".chaos-immutable-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return None, "running as root (chmod does not stop root) and chattr +i is refused on this file system"
        try:
            (probe / "x").touch()
            (probe / "x").unlink()
            return None, "running as root and even chattr +i does not stop writes here"
        except OSError:
            return "chattr", "chattr +i on the checkpoint directory (running as root: chmod does not stop root)"
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def final_state(run_dir: Path, ckpt_dir: Path) -> tuple[bool, int | None, str | None, str]:
    """(completed according to status.json, final step, state digest of the newest good checkpoint, error)."""
    from foldhpc.checkpoint.errors import CheckpointError
    from foldhpc.checkpoint.manager import CheckpointManager

    try:
        state = json.loads((run_dir / STATUS_FILE).read_text()).get("state")
    except (OSError, ValueError):
        state = None
    try:
        loaded = CheckpointManager(ckpt_dir).load_latest()
    except CheckpointError as e:
        return state == "completed", None, None, str(e)
    except Exception as e:  # noqa: BLE001 - a hostile file left behind must fail the verdict, not the runner
        return state == "completed", None, None, f"loading the newest checkpoint crashed: {type(e).__name__}: {e}"
    if loaded is None:
        return state == "completed", None, None, "no checkpoint"
    return state == "completed", loaded.entry.step, loaded.entry.digest, ""


class LocalRunner:
    """Runs the reference and the chaos training of one plan under ``out/runs/``."""

    def __init__(self, config: str | None, overrides: list[str], plan: Plan, out: Path, *,
                 unwritable: str | None = None, mirror_nan_in_reference: bool = True,
                 write_delay_s: float = 0.4, python: str = sys.executable, settings: dict[str, str] | None = None,
                 ckpt_subdir: str = CHECKPOINT_DIR, nproc: int = 1, run_fs: str | None = None) -> None:
        self.config = config
        self.user_overrides = list(overrides)
        self.plan = plan
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.ref_dir = self.runs / "reference"
        self.run_dir = self.runs / "chaos"
        self.ckpt_subdir = ckpt_subdir
        # full_status_fs: the run directory on a small tmpfs of its own (``run_fs``), the checkpoints
        # outside it (checkpoint.dir), as a home directory over quota next to free scratch space
        self.run_fs = run_fs if any(f.kind == "full_status_fs" for f in plan.faults) else None
        self.ckpt_dir = (self.runs / "chaos-checkpoints").absolute() if self.run_fs else self.run_dir / ckpt_subdir
        self.markers = self.runs / "markers"
        self.unwritable = unwritable
        self.mirror_nan = mirror_nan_in_reference
        self.write_delay_s = write_delay_s
        self.python = python
        self.settings = dict(CHAOS_DEFAULTS, **(settings or {}))
        self.nproc = nproc  # both runs: a digest is bit-exact only for the same world size
        self.rng = random.Random(plan.seed * 7919 + 1)  # damage offsets: replayable too
        self.proc: subprocess.Popen[bytes] | None = None
        self.launches: list[Launch] = []
        self.launch_hook: int | None = None  # the fault whose FOLDHPC_FAIL_* this launch carries
        self.relaunches_for_hooks = 0
        self.unplanned = 0
        self.tail = EventTail(self.run_dir / EVENTS_FILE)
        self._immutable: Path | None = None
        self._console: Any = None

    # ------------------------------------------------------------------ commands
    def overrides(self, run_dir: Path) -> list[str]:
        items = [f"{k}={v}" for k, v in self.settings.items()] + self.user_overrides
        if run_dir == self.run_dir and self.run_fs:
            items.append(f"checkpoint.dir={self.ckpt_dir}")
            # the run directory is a deliberately small tmpfs (storage.RUN_FS_SIZE_MB), smaller than
            # the node health check's default health.min_free_disk: the layout, not a bad node
            items.append("health.min_free_disk=1M")
        return items + [f"run.dir={run_dir}", f"train.max_steps={self.plan.max_steps}"]

    def command(self, run_dir: Path, supervise: bool) -> list[str]:
        cmd = [self.python, "-m", "foldhpc", "train"]
        if self.config:
            cmd += ["--config", self.config]
        for o in self.overrides(run_dir):
            cmd += ["--set", o]
        if self.nproc > 1:
            return cmd + ["--nproc", str(self.nproc)]  # always supervised
        return cmd + (["--supervise"] if supervise else [])

    def _env(self, extra: dict[str, str], nan: bool = True) -> dict[str, str]:
        """The environment of a launch: no fault hook from the caller's environment leaks in."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(FAULT_PREFIXES)}
        if nan and self.plan.nan_steps:
            env[NAN_AT_STEPS] = ",".join(str(s) for s in self.plan.nan_steps)
        env.update(extra)
        return env

    # ------------------------------------------------------------------ reference
    def run_reference(self) -> RunOutcome:
        """The same training, uninterrupted (same non-finite steps when mirrored)."""
        self.ref_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        log.info("chaos: reference run (%d steps, no faults%s) in %s", self.plan.max_steps,
                 f", non-finite steps {self.plan.nan_steps}" if self.plan.nan_steps and self.mirror_nan else "",
                 self.ref_dir)
        with open(self.ref_dir / "console.log", "ab") as console:
            rc = subprocess.run(self.command(self.ref_dir, supervise=False), stdout=console, stderr=subprocess.STDOUT,
                                env=self._env({}, nan=self.mirror_nan)).returncode
        completed, step, digest, err = final_state(self.ref_dir, self.ref_dir / self.ckpt_subdir)
        out = RunOutcome(str(self.ref_dir), rc, completed and rc == 0, step, digest, time.monotonic() - t0, err)
        log.info("chaos: reference %s in %.1fs: step %s, digest %s", "completed" if out.completed else
                 f"FAILED (exit {rc})", out.wall_s, step, (digest or "-")[:16])
        return out

    def check_nan_guard(self, reference: RunOutcome) -> None:
        """``nan`` needs a training that skips the update of a non-finite step (the built-in loop
        does; a ``[task]`` does when its step calls ``run.check_finite(loss)``). The reference run got
        the same non-finite steps: if it completed without a ``nonfinite_skip`` at each of them, the
        chaos run could only time out waiting for them. Raises :class:`NoNonFiniteGuard` (exit 2)."""
        if not (self.plan.nan_steps and self.mirror_nan and reference.completed):
            return
        tail = EventTail(self.ref_dir / EVENTS_FILE)
        tail.poll()
        skipped = {e.step for e in tail.of_kind("nonfinite_skip")}
        missing = [s for s in self.plan.nan_steps if s not in skipped]
        if missing:
            raise NoNonFiniteGuard(
                f"--kinds nan: the reference run ({self.ref_dir}) made step(s) {', '.join(map(str, missing))} "
                f"non-finite ({NAN_AT_STEPS}) and skipped no update (no nonfinite_skip in its {EVENTS_FILE}): "
                "the training has no non-finite guard to test. A [task]'s step guards its update with "
                "`if run.check_finite(loss): optimizer.step()` (foldhpc.Session.check_finite); or leave nan "
                "out of --kinds")

    # ------------------------------------------------------------------ launches
    def _window(self, start: int) -> list[PlannedFault]:
        out: list[PlannedFault] = []
        for f in self.plan.faults[start:]:
            out.append(f)
            if KINDS[f.kind].ends_launch:
                break
        return out

    def _marker(self, f: PlannedFault) -> Path:
        return self.markers / f"fault-{f.index:04d}"

    def _launch(self, start: int, why: str) -> None:
        """Start ``foldhpc train --supervise``, carrying the hook of the next hook fault (if any)."""
        window = self._window(start)
        extra: dict[str, str] = {}
        hook = next((f for f in window if uses_hook(f.kind) and not self._marker(f).exists()), None)
        self.launch_hook = hook.index if hook else None
        if hook is not None and hook.kind == "bitflip":
            extra.update({BITFLIP_AT_STEP: str(hook.at_step), BITFLIP_ONCE: str(self._marker(hook)),
                          BITFLIP_ON_RANK: "1"})
        elif hook is not None:
            extra.update({FAIL_AT_STEP: str(hook.at_step), FAIL_ONCE: str(self._marker(hook)),
                          FAIL_KIND: "exception" if hook.kind == "exception" else hook.variant})
        if window and window[-1].kind == "kill_during_write":
            extra[WRITE_DELAY] = str(self.write_delay_s)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._console is None:
            self._console = open(self.run_dir / "console.log", "ab")
        self.proc = subprocess.Popen(self.command(self.run_dir, supervise=True), stdout=self._console,
                                     stderr=subprocess.STDOUT, env=self._env(extra), start_new_session=True)
        self.launches.append(Launch(time.time(), self.proc.pid, start, extra, why=why))
        log.debug("chaos: launch %d (pid %d, %s) %s", len(self.launches), self.proc.pid, why, extra)

    def _ended(self, rc: int) -> None:
        if self.launches and self.launches[-1].rc is None:
            self.launches[-1].rc, self.launches[-1].ended_at = rc, time.time()

    def _wait(self, pred: Callable[[], T | None], timeout: float, what: str, allow_exit: bool = False) -> T:
        """Poll the events until ``pred`` holds; LaunchEnded if the process tree ends first (unless
        ``allow_exit``), WaitTimeout after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.tail.poll()
            v = pred()
            if v:
                return v
            if not allow_exit and self.proc is not None and self.proc.poll() is not None:
                self.tail.poll()
                v = pred()
                if v:
                    return v
                self._ended(self.proc.returncode)
                raise LaunchEnded(self.proc.returncode, what)
            if time.monotonic() > deadline:
                raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(POLL_S)

    def _step_timeout(self, steps: int) -> float:
        return 60.0 + 0.5 * max(0, steps)

    def _current_step(self) -> int:
        return self.tail.timeline[-1][1] if self.tail.timeline else 0

    def _wait_step(self, target: int) -> int:
        return self._wait(lambda: self._current_step() if self._current_step() >= target else None,
                          self._step_timeout(target - self._current_step()) + START_TIMEOUT_S, f"step {target}")

    def _wait_first_step(self, index: int, what: str) -> SeenEvent:
        return self._wait(lambda: next(iter(self.tail.since(index, "first_step")), None), START_TIMEOUT_S, what)

    def _wait_exit(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:  # keep reading the events: they get their real times
            if time.monotonic() > deadline:
                raise WaitTimeout(f"the launch did not exit within {timeout:.0f}s")
            self.tail.poll()
            time.sleep(POLL_S)
        self._ended(rc)
        self.tail.poll()
        return rc

    def _kill_launch(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self._ended(self.proc.returncode)

    def _newest_good(self, before: int | None = None) -> int | None:
        """Step of the newest good checkpoint according to the events: the latest commit, or the
        checkpoint a later start verified and resumed from, whichever came last."""
        evs = self.tail.events[:before] if before is not None else self.tail.events
        for e in reversed(evs):
            if e.kind in ("checkpoint_committed", "resumed"):
                return e.step
        return None  # (a scan from the end: a save or a resume is never far back)

    def _trainer_pid(self, check_parent: bool = True) -> int:
        """The running trainer (rank 0): the process that recorded the newest ``first_step``."""
        ev = self.tail.last("first_step")
        if ev is None or self.proc is None:
            raise RuntimeError("no trainer has started yet")
        if check_parent and _ppid(ev.pid) != self.proc.pid:
            raise RuntimeError(f"pid {ev.pid} (from its events) is not a child of the launch {self.proc.pid}")
        return ev.pid

    def _last_progress(self, pid: int, before: int | None = None) -> int | None:
        ev = self.tail.last("progress", before, pid)
        return ev.step if ev else None

    # ------------------------------------------------------------------ recovery checks
    def _resumed(self, rec: FaultRecord, index: int, first: SeenEvent) -> SeenEvent | None:
        """Fill the record from the events of the start that completed ``first``."""
        rec.time_to_resume_s = round(first.seen - (rec.injected_at or first.seen), 3)
        resumed = [e for e in self.tail.since(index, "resumed") if e.pid == first.pid]
        rec.rejected = [e.name for e in self.tail.since(index, "checkpoint_rejected") if e.pid == first.pid]
        if not resumed:
            rec.problems.append("the new trainer did not resume from a checkpoint (started from step 0)")
            return None
        ev = resumed[-1]
        rec.checkpoint_used, rec.resumed_step = ev.name, ev.step
        if rec.step is not None:
            rec.steps_lost = rec.step - ev.step
        return ev

    def _check_kill_bounds(self, rec: FaultRecord) -> None:
        """After a kill: resumed from the newest durable checkpoint (or one that committed in the
        instant before the kill), never from anything newer than the last step done."""
        if rec.resumed_step is None:
            return
        if rec.newest_durable_step is not None and rec.resumed_step < rec.newest_durable_step:
            rec.problems.append(f"resumed from step {rec.resumed_step}, older than the newest durable checkpoint "
                                f"(step {rec.newest_durable_step})")
        if rec.step is not None and rec.resumed_step > rec.step:
            rec.problems.append(f"resumed from step {rec.resumed_step}, beyond the last step done ({rec.step})")

    # ------------------------------------------------------------------ fault kinds
    def _signal(self, f: PlannedFault, rec: FaultRecord) -> None:
        sig = signal.SIGUSR1 if f.kind == "sigusr1" else signal.SIGTERM
        self._wait_step(f.at_step)
        assert self.proc is not None
        index = len(self.tail.events)
        rec.injected_at = time.time()
        os.kill(self.proc.pid, sig)  # the supervisor: it forwards the signal to the trainer
        rec.launch_exit = self._wait_exit()
        if rec.launch_exit != ExitCode.CHECKPOINTED:
            rec.problems.append(f"exit {rec.launch_exit} after {sig.name}, not {ExitCode.CHECKPOINTED}")
        saves = self.tail.since(index, "signal")
        rec.step = saves[-1].step if saves else None
        if rec.step is None:
            rec.problems.append(f"no checkpoint on {sig.name}")
        index = len(self.tail.events)
        self._launch(f.index + 1, f"restart after {sig.name} (a requeue)")
        first = self._wait_first_step(index, "the first step after the restart")
        self._resumed(rec, index, first)
        if rec.steps_lost not in (0, None):
            rec.problems.append(f"{rec.steps_lost} steps lost after {sig.name}; a signal must lose none")
        rec.resume_measure = "signal sent -> first step of the restarted trainer"

    def _sigkill(self, f: PlannedFault, rec: FaultRecord, during_write: bool = False) -> None:
        self._wait_step(f.at_step)
        assert self.proc is not None
        tmp: Path | None = None
        if during_write:
            # a write after a committed checkpoint: the restart must have one to resume from. With fast
            # steps (a few ms) the slowed write of the first checkpoint may still be running at the
            # fault's step, and a kill then leaves nothing durable (a start from step 0 is right, but
            # it is not the fault this kind plans)
            self._wait(lambda: self._newest_good() is not None, self._step_timeout(3 * self.plan.every_steps),
                       "a committed checkpoint")

            def in_write() -> Path | None:
                # a write of a step after the newest good checkpoint: not the temporary file that a save
                # failed in an unwritable directory (unwritable_dir) could not remove (the next start does)
                newest = self._newest_good() or 0
                for p in sorted(self.ckpt_dir.glob(".step_*.ckpt.tmp-*")):
                    stem = p.name[len(".step_"):].split(".", 1)[0]
                    if stem.isdigit() and int(stem) > newest:
                        return p
                return None
            tmp = self._wait(in_write, 60.0, "a checkpoint write in progress")
        trainer = self._trainer_pid()
        rec.injected_at = time.time()
        os.killpg(self.proc.pid, signal.SIGKILL)
        rec.launch_exit = self._wait_exit()
        index = len(self.tail.events)
        rec.step = self._last_progress(trainer)
        rec.newest_durable_step = self._newest_good()
        if tmp is not None:
            rec.notes.append(f"killed while writing {tmp.name}")
            if not tmp.exists():
                rec.notes.append("the write had committed in the same instant (the kill landed just after it)")
        self._launch(f.index + 1, "restart after SIGKILL of the job")
        first = self._wait_first_step(index, "the first step after the restart")
        self._resumed(rec, index, first)
        self._check_kill_bounds(rec)
        if tmp is not None and tmp.exists():
            rec.problems.append(f"the half-written {tmp.name} was not removed at the restart")
        if tmp is not None and rec.checkpoint_used == tmp.name.split(".tmp-")[0].lstrip("."):
            written = any(e.kind == "checkpoint_committed" and e.name == rec.checkpoint_used
                          for e in self.tail.events[:index])
            if not written:
                rec.problems.append(f"resumed from {rec.checkpoint_used}, the file whose write was killed")
        rec.resume_measure = "SIGKILL -> first step of the restarted trainer"

    def _restart_of(self, old_pid: int, timeout: float, after: float = 0.0) -> tuple[int, SeenEvent]:
        """Wait for the supervisor's new trainer after ``old_pid`` (rank 0) died: (position of the
        new trainer's first event, its ``first_step`` event), seen after ``after``. The
        old trainer's records all come before the new one's: it was dead when the supervisor
        started the next."""
        def found() -> tuple[int, SeenEvent] | None:
            evs = self.tail.events
            last_old = self.tail.last_position_of(old_pid)
            for j in range(last_old + 1, len(evs)):
                if evs[j].kind == "first_step" and evs[j].pid != old_pid and evs[j].seen >= after:
                    start = next(i for i in range(last_old + 1, j + 1) if evs[i].pid == evs[j].pid)
                    return start, evs[j]
            return None
        return self._wait(found, timeout, "the supervisor's restart of the trainer")

    def _crash(self, f: PlannedFault, rec: FaultRecord) -> None:
        self._wait_step(f.at_step)
        trainer = self._trainer_pid()
        rec.injected_at = time.time()
        os.kill(trainer, getattr(signal, f.variant))
        start, first = self._restart_of(trainer, START_TIMEOUT_S)
        rec.step = self._last_progress(trainer)
        rec.newest_durable_step = self._newest_good(start)
        self._resumed(rec, start, first)
        self._check_kill_bounds(rec)
        rec.resume_measure = "SIGSEGV/SIGKILL to the trainer -> first step of the trainer the supervisor restarted"

    def _check_hung(self, rec: FaultRecord, start: int) -> None:
        if not any(e.kind == "supervisor_hang" and rec.step is not None and rec.step <= e.step <= rec.step + 1
                   for e in self.tail.events[:start]):
            rec.problems.append("the supervisor did not report the hang")

    def _dead_rank(self, f: PlannedFault, rec: FaultRecord) -> None:
        """SIGKILL of a rank other than 0; the supervisor restarts every rank."""
        self._wait_step(f.at_step)
        trainer = self._trainer_pid()
        rank = self.rng.randrange(1, self.nproc)
        pid = int(json.loads((self.run_dir / RANKS_DIR / f"rank-{rank}.json").read_text())["pid"])
        assert self.proc is not None
        if _ppid(pid) != self.proc.pid:
            raise RuntimeError(f"rank {rank} (pid {pid}, from ranks/rank-{rank}.json) is not a child of the launch")
        rec.injected_at = time.time()
        os.kill(pid, signal.SIGKILL)
        rec.notes.append(f"killed rank {rank} (pid {pid})")
        start, first = self._restart_of(trainer, START_TIMEOUT_S + 30, after=rec.injected_at)
        rec.step = self._last_progress(trainer)
        rec.newest_durable_step = self._newest_good(start)
        self._resumed(rec, start, first)
        self._check_kill_bounds(rec)
        if not any(e.seen >= rec.injected_at for e in self.tail.of_kind("supervisor_restart")):
            rec.problems.append("no restart by the supervisor was recorded")
        rec.resume_measure = "SIGKILL of rank >= 1 -> first step of the restarted rank 0"

    def _hook(self, f: PlannedFault, rec: FaultRecord) -> None:
        """exception / hang: the trainer injects it itself at step ``at_step`` (FOLDHPC_FAIL_*)."""
        # "<pid> step <N> at <time>"
        text = self._hook_fired(f, 5, f"the {f.kind} hook at step {f.at_step}")
        rec.step, rec.injected_at = int(text[2]), float(text[4])
        # rank 0 (the one that logs steps); with several ranks the marker may name another
        trainer = int(text[0]) if self.nproc == 1 else self._trainer_pid(check_parent=False)
        start, first = self._restart_of(trainer, START_TIMEOUT_S + 30, after=rec.injected_at)
        rec.newest_durable_step = self._newest_good(start)
        self._resumed(rec, start, first)
        self._check_kill_bounds(rec)
        if f.kind == "hang":
            self._check_hung(rec, start)
            rec.resume_measure = "trainer stopped -> first step of the restarted trainer (incl. fault.hang_timeout)"
        else:
            rec.resume_measure = "exception raised (hook) -> first step of the trainer the supervisor restarted"

    def _hook_fired(self, f: PlannedFault, words: int, what: str) -> list[str]:
        """The words of hook fault ``f``'s marker file, once the trainer has written all ``words``
        of them (a new launch first if this one's environment carries another hook)."""
        if self.launch_hook != f.index:  # one hook per process environment: this one needs a new launch
            self._relaunch_for_hook(f)
        marker = self._marker(f)

        def fired() -> list[str] | None:
            try:
                text = marker.read_text().split()
            except FileNotFoundError:
                return None
            return text if len(text) == words else None
        return self._wait(fired, self._step_timeout(f.at_step - self._current_step()) + START_TIMEOUT_S, what)

    def _relaunch_for_hook(self, f: PlannedFault) -> None:
        """End the launch with SIGUSR1 (0 steps lost, checked) so the next one carries ``f``'s hook."""
        self.relaunches_for_hooks += 1
        assert self.proc is not None
        if self.proc.poll() is None:
            self._wait(lambda: self.tail.last("first_step") is not None, START_TIMEOUT_S, "a trainer")
            os.kill(self.proc.pid, signal.SIGUSR1)
            rc = self._wait_exit()
            if rc != ExitCode.CHECKPOINTED:
                raise RuntimeError(f"relaunch for the {f.kind} hook: exit {rc} after SIGUSR1, not 75")
        index = len(self.tail.events)
        self._launch(f.index, f"new launch for the {f.kind} hook of fault {f.index}")
        self._wait_first_step(index, "the first step of the new launch")

    def _corrupt(self, f: PlannedFault, rec: FaultRecord) -> None:
        self._wait_step(f.at_step)
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGUSR1)  # the job goes down (cleanly); the damage happens meanwhile
        rec.launch_exit = self._wait_exit()
        from foldhpc.checkpoint.manager import CheckpointManager

        entries = [asdict(e) for e in CheckpointManager(self.ckpt_dir).entries()]  # oldest first (commit order)
        if len(entries) < 2:
            rec.problems.append("fewer than two checkpoints: nothing to fall back to")
            return
        newest, previous = entries[-1], entries[-2]
        path = self.ckpt_dir / newest["file"]
        size = path.stat().st_size
        if f.variant == "truncate":
            keep = self.rng.randrange(0, size)
            os.truncate(path, keep)
            rec.notes.append(f"truncated {path.name} from {size} to {keep} bytes")
        else:
            off = self.rng.randrange(0, max(1, size - 16))
            with open(path, "r+b") as fh:
                fh.seek(off)
                chunk = fh.read(16)
                fh.seek(off)
                fh.write(bytes(b ^ 0xFF for b in chunk))
            rec.notes.append(f"inverted {len(chunk)} bytes of {path.name} at offset {off} of {size}")
        rec.step = int(newest["step"])
        rec.newest_durable_step = int(newest["step"])
        index = len(self.tail.events)
        rec.injected_at = time.time()
        self._launch(f.index + 1, "restart after damaging the newest checkpoint")
        first = self._wait_first_step(index, "the first step after the restart")
        self._resumed(rec, index, first)
        if newest["file"] not in rec.rejected:
            rec.problems.append(f"the damaged {newest['file']} was not reported as rejected")
        if rec.resumed_step is not None and rec.checkpoint_used != previous["file"]:
            rec.problems.append(f"resumed from {rec.checkpoint_used}, not the previous good {previous['file']}")
        rec.resume_measure = "damaged file in place -> first step of the restarted trainer"

    def _set_writable(self, writable: bool) -> None:
        d = self.ckpt_dir
        if self.unwritable == "chattr":
            subprocess.run(["chattr", "-i" if writable else "+i", str(d)], check=True, capture_output=True)
        else:
            d.chmod(0o755 if writable else 0o555)
        self._immutable = None if writable else d

    def _unwritable(self, f: PlannedFault, rec: FaultRecord) -> None:
        if self.unwritable is None:
            rec.problems.append("no way to make the directory unwritable here")
            return
        self._wait_step(f.at_step)
        index = len(self.tail.events)
        rec.step = self._current_step()
        rec.injected_at = time.time()
        self._set_writable(False)
        try:
            failed = self._wait(lambda: next(iter(self.tail.since(index, "checkpoint_failed")), None),
                                self._step_timeout(3 * self.plan.every_steps), "a save to fail")
        finally:
            self._set_writable(True)
        restored, index2 = time.time(), len(self.tail.events)
        rec.notes.append(f"{self.unwritable}: save of step {failed.step} failed, "
                         f"{failed.seen - rec.injected_at:.2f}s unwritable")
        saved = self._wait(lambda: next(iter(self.tail.since(index2, "checkpoint_committed")), None),
                           self._step_timeout(3 * self.plan.every_steps), "the next save to succeed")
        rec.steps_lost = 0
        rec.time_to_resume_s = round(saved.seen - restored, 3)
        rec.resume_measure = "directory writable again -> next durable checkpoint"
        rec.newest_durable_step = saved.step

    def _nan(self, f: PlannedFault, rec: FaultRecord) -> None:
        ev = self._wait(lambda: next((e for e in self.tail.of_kind("nonfinite_skip") if e.step == f.at_step), None),
                        self._step_timeout(f.at_step - self._current_step()) + START_TIMEOUT_S,
                        f"the non-finite step {f.at_step}")
        rec.step, rec.injected_at, rec.steps_lost = f.at_step, ev.seen, 0
        self._wait(lambda: any(e.kind == "progress" and e.step > f.at_step and e.seen >= ev.seen
                               for e in self.tail.events[-50:]) or None,
                   self._step_timeout(10) + START_TIMEOUT_S, f"a step after the non-finite step {f.at_step}")
        rec.resume_measure = "in-step: the update is skipped, nothing restarts"

    def _bitflip(self, f: PlannedFault, rec: FaultRecord) -> None:
        """A bit of a weight on rank 1 flips after step ``at_step`` (FOLDHPC_BITFLIP_*): the replica
        check finds it, the replay attributes it to rank 1 and heals it in process; nothing restarts."""
        text = self._hook_fired(f, 7, f"the bit flip at step {f.at_step}")  # "<pid> rank <R> step <N> at <time>"
        step, injected = int(text[4]), float(text[6])
        rec.step, rec.injected_at = step, injected
        ev = self._wait(lambda: next((e for e in self.tail.of_kind("sdc_attribution")
                                      if e.seen >= injected - 1 and e.get("detected", 0) >= step), None),
                        self._step_timeout(3 * self.plan.every_steps + 10) + START_TIMEOUT_S,
                        f"the attribution of the bit flip at step {f.at_step}")
        verdict, ranks = ev.get("verdict"), ev.get("ranks") or []
        rec.notes.append(f"attributed: {verdict}, rank(s) {ranks}, step {ev.get('step')}, replay {ev.get('replay_s')}s")
        if verdict != "transient" or ranks != [1]:
            rec.problems.append(f"the flip on rank 1 was attributed as {verdict}, rank(s) {ranks} (not transient, "
                                "rank 1)")
        rec.steps_lost = 0
        rec.time_to_resume_s = round(ev.seen - injected, 3)
        rec.resume_measure = "bit flip -> the replay's verdict (in process: nothing restarts)"

    # ------------------------------------------------------------------ storage kinds
    def _stop_job(self, f: PlannedFault, rec: FaultRecord) -> None:
        """At the fault's step, take the job down cleanly (SIGUSR1, exit 75): the storage is
        tampered with while nothing runs, as between a preemption and the requeued start."""
        self._wait_step(f.at_step)
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGUSR1)
        rec.launch_exit = self._wait_exit()
        if rec.launch_exit != ExitCode.CHECKPOINTED:
            rec.problems.append(f"exit {rec.launch_exit} after SIGUSR1, not {ExitCode.CHECKPOINTED}")

    def _two_newest(self, rec: FaultRecord) -> tuple[CheckpointEntry, CheckpointEntry] | None:
        """(newest, previous) committed checkpoint entries, or None (with a problem) if there are fewer."""
        from foldhpc.checkpoint.manager import CheckpointManager

        entries = CheckpointManager(self.ckpt_dir).entries()  # oldest first (commit order)
        if len(entries) < 2:
            rec.problems.append("fewer than two checkpoints: nothing to fall back to")
            return None
        return entries[-1], entries[-2]

    def _stopped_with_two(self, f: PlannedFault, rec: FaultRecord) -> tuple[CheckpointEntry, CheckpointEntry] | None:
        """Stop the job (SIGUSR1) for a fault on its newest checkpoint: (newest, previous), or None
        -- after a plain restart, with the problem recorded -- where there are fewer than two."""
        self._stop_job(f, rec)
        two = self._two_newest(rec)
        if two is None:
            self._restart_job(f, f"restart ({f.kind}: fewer than two checkpoints)")
        return two

    def _restart_job(self, f: PlannedFault, why: str) -> tuple[int, SeenEvent]:
        index = len(self.tail.events)
        self._launch(f.index + 1, why)
        return index, self._wait_first_step(index, "the first step after the restart")

    def _no_crash_since(self, rec: FaultRecord, index: int, what: str) -> None:
        if self.tail.since(index, "supervisor_restart"):
            rec.problems.append(f"the trainer crashed on {what} (the supervisor restarted it)")

    def _missing_file(self, f: PlannedFault, rec: FaultRecord) -> None:
        """The newest checkpoint is invisible while the next start looks for it, then back."""
        two = self._stopped_with_two(f, rec)
        if two is None:
            return
        newest, previous = two
        path = self.ckpt_dir / newest.file
        # a sub-directory of the same directory: the same file system (a rename), and neither a
        # checkpoint name nor a temporary one to foldhpc
        away = self.ckpt_dir / ".chaos-away" / newest.file
        away.parent.mkdir(exist_ok=True)
        os.rename(path, away)
        rec.step = rec.newest_durable_step = newest.step
        rec.injected_at = time.time()
        index = len(self.tail.events)
        back_at: float | None = None
        try:
            self._launch(f.index + 1, f"restart while {newest.file} is missing")

            def chose() -> SeenEvent | None:  # the new trainer looked: it rejected the file or resumed
                evs = self.tail.since(index, "checkpoint_rejected") + self.tail.since(index, "resumed")
                return min(evs, key=lambda e: e.seen) if evs else None
            decided = self._wait(chose, START_TIMEOUT_S, "the restarted trainer's choice of a checkpoint")
            delay = self.rng.uniform(*MISSING_BACK_S)
            self._wait(lambda: time.time() >= decided.seen + delay or None, delay + 5.0, "the moment to put it back")
        finally:
            if away.exists():
                os.rename(away, path)
                back_at = time.time()
            try:
                away.parent.rmdir()
            except OSError:
                pass
        index_back = len(self.tail.events)
        if back_at is not None:
            rec.notes.append(f"{newest.file} missing for {back_at - rec.injected_at:.2f}s, back "
                             f"{back_at - decided.seen:.2f}s after the new trainer's '{decided.kind}' record")
        first = self._wait_first_step(index, "the first step after the restart")
        self._resumed(rec, index, first)
        if rec.checkpoint_used not in (None, previous.file, newest.file):
            rec.problems.append(f"resumed from {rec.checkpoint_used}, neither the previous good {previous.file} nor "
                                f"the newest {newest.file}")
        self._no_crash_since(rec, index, "a missing checkpoint")
        # the file is back: the next commit (which prunes and deletes bad files) must keep it
        saved = self._wait(lambda: next(iter(self.tail.since(index_back, "checkpoint_committed")), None),
                           self._step_timeout(3 * self.plan.every_steps), "the next save after the file is back")
        if any(e.name == newest.file for e in self.tail.since(index, "checkpoint_deleted")):
            rec.problems.append(f"{newest.file}, a good checkpoint only missing for a moment, was deleted as bad "
                                f"when step {saved.step} committed")
        elif not path.exists() and not any(e.name == newest.file for e in self.tail.since(index, "checkpoint_pruned")):
            rec.problems.append(f"{newest.file} is gone after the save of step {saved.step} (not pruned by keep_last)")
        rec.resume_measure = "newest file hidden -> first step of the restarted trainer"

    def _crafted(self, f: PlannedFault, rec: FaultRecord) -> None:
        """The newest checkpoint's header is forged (valid crc32); the next start must reject it."""
        two = self._stopped_with_two(f, rec)
        if two is None:
            return
        newest, previous = two
        path = self.ckpt_dir / newest.file
        original = path.read_bytes()
        crafted, what = storage.craft_checkpoint(original, f.variant)
        tmp = self.ckpt_dir / ".chaos-crafted"
        tmp.write_bytes(crafted)
        os.replace(tmp, path)  # it appears whole, as a committed file does
        rec.notes.append(f"{newest.file}: {what}")
        rec.step = rec.newest_durable_step = newest.step
        rec.injected_at = time.time()
        try:
            index, first = self._restart_job(f, f"restart after forging the header of {newest.file}")
        except (LaunchEnded, WaitTimeout):
            rec.notes.append(f"the run's error: {self._status_error() or '-'}")
            if path.read_bytes() == crafted:  # let the recovery restart find the real file again
                path.write_bytes(original)
                rec.notes.append(f"the original {newest.file} was put back for the recovery restart")
            raise
        self._resumed(rec, index, first)
        self._no_crash_since(rec, index, "the crafted header")
        if newest.file not in rec.rejected:
            rec.problems.append(f"the crafted {newest.file} was not reported as rejected")
        if rec.resumed_step is not None and rec.checkpoint_used != previous.file:
            rec.problems.append(f"resumed from {rec.checkpoint_used}, not the previous good {previous.file}")
        rec.resume_measure = "forged header in place -> first step of the restarted trainer"

    def _status_error(self) -> str:
        try:
            return str(json.loads((self.run_dir / STATUS_FILE).read_text()).get("error") or "")[:300]
        except (OSError, ValueError, AttributeError):
            return ""

    def _cli(self, rec: FaultRecord, *args: str) -> subprocess.CompletedProcess[str] | None:
        """Run ``foldhpc ARGS`` as a user would; None (with a problem) if it hangs."""
        cmd = [self.python, "-m", "foldhpc", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                                  env=self._env({}, nan=False))
        except subprocess.TimeoutExpired:
            rec.problems.append(f"foldhpc {' '.join(args)} hung (killed after {CLI_TIMEOUT_S:.0f}s)")
            return None

    def _fifo(self, f: PlannedFault, rec: FaultRecord) -> None:
        """A FIFO named like the newest checkpoint of all: opening it for reading blocks forever."""
        self._wait_step(f.at_step)
        assert self.proc is not None
        fifo = self.ckpt_dir / f"step_{self.plan.max_steps + 10_000:08d}.ckpt"
        index = len(self.tail.events)
        os.mkfifo(fifo)
        rec.injected_at = time.time()
        try:
            saved = self._wait(lambda: next(iter(self.tail.since(index, "checkpoint_committed")), None),
                               self._step_timeout(3 * self.plan.every_steps), "a save to commit next to the FIFO")
            rec.notes.append(f"{fifo.name} is a FIFO; step {saved.step} committed next to it")
            sig_index = len(self.tail.events)
            os.kill(self.proc.pid, signal.SIGUSR1)
            rec.launch_exit = self._wait_exit()
            if rec.launch_exit != ExitCode.CHECKPOINTED:
                rec.problems.append(f"exit {rec.launch_exit} after SIGUSR1, not {ExitCode.CHECKPOINTED}")
            saves = self.tail.since(sig_index, "signal")
            rec.step = rec.newest_durable_step = saves[-1].step if saves else None
            # while the job is down, the user looks at the run
            p = self._cli(rec, "checkpoints", str(self.run_dir), "--verify", "--json")
            if p is not None:
                try:
                    files = [r["file"] for r in json.loads(p.stdout)]
                except (ValueError, TypeError, KeyError):
                    files = []
                    rec.problems.append(f"foldhpc checkpoints --verify --json: exit {p.returncode}, no JSON list: "
                                        f"{(p.stderr or p.stdout).strip()[-300:]}")
                if p.returncode != 0 or fifo.name in files:
                    rec.problems.append(f"foldhpc checkpoints --verify: exit {p.returncode}"
                                        + (f", lists the FIFO {fifo.name}" if fifo.name in files else ""))
            p = self._cli(rec, "status", str(self.run_dir), "--json")
            if p is not None and (p.returncode not in (0, 3) or "Traceback" in p.stderr):
                rec.problems.append(f"foldhpc status: exit {p.returncode}: {p.stderr.strip()[-300:]}")
            restart_at = time.time()
            index2, first = self._restart_job(f, "restart with a FIFO in the checkpoint directory")
            self._resumed(rec, index2, first)
            rec.time_to_resume_s = round(first.seen - restart_at, 3)  # not the save and the commands before
            self._no_crash_since(rec, index, "the FIFO")
            if rec.step is None:
                rec.problems.append("no checkpoint on SIGUSR1")
            elif rec.steps_lost not in (0, None):
                rec.problems.append(f"resumed from {rec.checkpoint_used}, {rec.steps_lost} steps before the "
                                    f"checkpoint saved on SIGUSR1")
        finally:
            if fifo.is_fifo():
                try:  # a reader blocked in open() gets an empty file and goes on (its hang is recorded)
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    rec.problems.append(f"a process was blocked opening the FIFO {fifo.name}")
                except OSError:  # ENXIO: nobody has it open for reading, as it should be
                    pass
                fifo.unlink()
            else:
                rec.notes.append("foldhpc removed the FIFO itself")
        rec.resume_measure = "restart with a FIFO next to the checkpoints -> first step of the restarted trainer"

    def _committed_steps(self) -> set[int]:
        """Steps of the committed checkpoint files, from their names (a rename is the commit)."""
        out: set[int] = set()
        for p in self.ckpt_dir.glob("step_*.ckpt"):
            stem = p.name[len("step_"):-len(".ckpt")]
            if stem.isdigit() and p.is_file():
                out.add(int(stem))
        return out

    def _full_fs(self, f: PlannedFault, rec: FaultRecord) -> None:
        """The run directory's file system is full; the checkpoint directory is not."""
        if self.run_fs is None:
            rec.problems.append("no file system of its own for the run directory here")
            return
        self._wait_step(f.at_step)
        trainer = self._trainer_pid()
        rec.step = self._current_step()
        before = max(self._committed_steps(), default=-1)
        index, bad_before = len(self.tail.events), self.tail.scan.bad_lines
        rec.injected_at = time.time()
        filled = storage.fill(self.run_dir)
        full_s = 0.0
        new: list[int] = []
        try:
            free = shutil.disk_usage(self.run_dir).free
            rec.notes.append(f"run directory full ({filled / 2**20:.1f} MiB filler, {free} bytes free)")

            # Held full until checkpoints commit at steps events.jsonl could not record (the
            # checkpoint directory is elsewhere): the file's last page (tmpfs) takes a few more
            # records after the filler, so a clock would not do
            def committed() -> list[int] | None:
                got = sorted(s for s in self._committed_steps() if s > max(before, self._current_step()))
                return got if len(got) >= FULL_FS_CHECKPOINTS else None
            new = self._wait(committed, self._step_timeout((FULL_FS_CHECKPOINTS + 3) * self.plan.every_steps),
                             f"{FULL_FS_CHECKPOINTS} checkpoints to commit at steps {EVENTS_FILE} could not record "
                             "while the run directory is full")
            full_s = time.time() - rec.injected_at
        finally:
            storage.unfill(self.run_dir)
        restored = time.time()
        rec.notes.append(f"full for {full_s:.2f}s: checkpoints of steps {', '.join(map(str, new))} committed")
        index2 = len(self.tail.events)
        ev = self._wait(lambda: next((e for e in self.tail.since(index2, "progress") if e.step > new[-1]), None),
                        self._step_timeout(2 * self.plan.every_steps), f"{EVENTS_FILE} to be written again")
        if ev.pid != trainer:
            rec.problems.append(f"the trainer was replaced while the run directory was full (pid {trainer} -> "
                                f"{ev.pid})")
        self._no_crash_since(rec, index, "a full run directory")
        recorded = {e.step for e in self.tail.since(index, "progress")}
        lost = [s for s in range(rec.step + 1, ev.step) if s not in recorded]
        if lost:
            rec.notes.append(f"{EVENTS_FILE} lost the records of {len(lost)} steps ({lost[0]}-{lost[-1]}) while full")
        if self.tail.scan.bad_lines > bad_before:  # a record cut short where the space ran out, read as one bad line
            rec.notes.append(f"{EVENTS_FILE}: {self.tail.scan.bad_lines - bad_before} unreadable line(s) skipped "
                             "(a record cut short by the full file system)")

        def status_again() -> dict[str, Any] | None:
            try:
                st = json.loads((self.run_dir / STATUS_FILE).read_text())
            except (OSError, ValueError):
                return None
            return st if float(st.get("updated_at", 0)) >= restored and int(st.get("step", -1)) >= ev.step else None
        try:
            st = self._wait(status_again, self._step_timeout(2 * self.plan.every_steps),
                            "status.json to be written again")
            rec.notes.append(f"status.json written again at step {st.get('step')}")
        except WaitTimeout:
            rec.problems.append("status.json was not written again after space came back")
        rec.steps_lost = 0
        rec.time_to_resume_s = round(ev.seen - restored, 3)
        rec.newest_durable_step = new[-1]
        rec.resume_measure = f"space back -> next step in {EVENTS_FILE} (the trainer never stopped)"

    # ------------------------------------------------------------------ the run
    def run_chaos(self) -> tuple[RunOutcome, list[FaultRecord]]:
        handlers: dict[str, Callable[[PlannedFault, FaultRecord], None]] = {
            "sigusr1": self._signal, "sigterm": self._signal, "sigkill": self._sigkill,
            "kill_during_write": lambda f, r: self._sigkill(f, r, during_write=True),
            "exception": self._hook, "hang": self._hook, "crash": self._crash, "corrupt_checkpoint": self._corrupt,
            "unwritable_dir": self._unwritable, "nan": self._nan, "dead_rank": self._dead_rank,
            "bitflip": self._bitflip,
            "missing_file": self._missing_file, "crafted_header": self._crafted, "fifo": self._fifo,
            "full_status_fs": self._full_fs}
        t0 = time.monotonic()
        records: list[FaultRecord] = []
        self.markers.mkdir(parents=True, exist_ok=True)
        if self.run_fs:
            storage.mount_tmpfs(self.run_dir)
            log.info("chaos: the chaos run directory %s is a %d MiB tmpfs; checkpoints in %s", self.run_dir,
                     storage.RUN_FS_SIZE_MB, self.ckpt_dir)
        try:
            self._launch(0, "first start")
            self._wait_first_step(0, "the first step")
            for f in self.plan.faults:
                rec = FaultRecord(f.index, f.kind, f.variant, f.at_step)
                try:
                    handlers[f.kind](f, rec)
                except (LaunchEnded, WaitTimeout, RuntimeError, OSError) as e:
                    rec.problems.append(f"{type(e).__name__}: {e}")
                    self._recover_launch(f.index + 1)
                rec.recovered = not rec.problems and rec.injected_at is not None
                records.append(rec)
                log.info("chaos: fault %d/%d %s%s at step %s: %s, %s steps lost, resumed in %s", f.index + 1,
                         len(self.plan.faults), f.kind, f"({f.variant})" if f.variant else "", rec.step,
                         "recovered" if rec.recovered else "NOT RECOVERED: " + "; ".join(rec.problems),
                         rec.steps_lost, f"{rec.time_to_resume_s:.2f}s" if rec.time_to_resume_s is not None else "-")
            rc = self._finish()
        finally:
            if self._immutable is not None:
                self._set_writable(True)
            self._kill_launch()
            if self._console is not None:
                self._console.close()
                self._console = None
            if self.run_fs:
                storage.unmount_keeping(self.run_dir)
        completed, step, digest, err = final_state(self.run_dir, self.ckpt_dir)
        out = RunOutcome(str(self.run_dir), rc, completed and rc == 0, step, digest, time.monotonic() - t0, err)
        return out, records

    def _recover_launch(self, next_fault: int) -> None:
        """After an unexpected end or a stuck wait: start again (like a resubmission), a few times."""
        self.unplanned += 1
        if self.unplanned > MAX_UNPLANNED_RELAUNCHES:
            raise RuntimeError(f"{self.unplanned} unplanned relaunches: giving up")
        self._kill_launch()
        index = len(self.tail.events)
        self._launch(next_fault, "unplanned: after a fault that was not recovered as expected")
        try:
            self._wait_first_step(index, "the first step after an unplanned restart")
        except LaunchEnded as e:
            if e.rc != 0:
                raise
            log.info("chaos: the restarted training completed at once (the fault hit its last steps)")

    def _finish(self) -> int:
        """Let the last launch run to its end; start it again if something ended it early."""
        while True:
            assert self.proc is not None
            remaining = self.plan.max_steps - self._current_step()
            try:
                rc = self._wait_exit(timeout=self._step_timeout(remaining) + START_TIMEOUT_S)
            except WaitTimeout:
                self._kill_launch()
                rc = self.proc.returncode
            if rc == 0 or self.unplanned >= MAX_UNPLANNED_RELAUNCHES:
                return rc
            log.error("chaos: the training ended with exit %s before completing; starting it again", rc)
            self.unplanned += 1
            index = len(self.tail.events)
            self._launch(len(self.plan.faults), "unplanned: the last launch did not complete")
            try:
                self._wait_first_step(index, "the first step after an unplanned restart")
            except (LaunchEnded, WaitTimeout):
                pass


def run(config: str | None, overrides: list[str], plan: Plan, out: Path, **kwargs: Any) -> ChaosOutcome:
    """Reference, then chaos; the caller judges (:func:`foldhpc.chaos.report.judge`)."""
    runs = Path(out) / "runs"
    if os.path.ismount(runs / "chaos"):  # the tmpfs of an interrupted full_status_fs run
        subprocess.run(["umount", "-l", str(runs / "chaos")], capture_output=True)
    if runs.exists():
        for p in runs.rglob("*"):  # an interrupted run may have left the directory immutable
            if p.is_dir() and kwargs.get("unwritable") == "chattr":
                subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        shutil.rmtree(runs)
    runner = LocalRunner(config, overrides, plan, out, **kwargs)
    reference = runner.run_reference()
    runner.check_nan_guard(reference)
    started = time.time()  # the chaos run's clock: the timeline and the fault marks count from here
    chaos, records = runner.run_chaos()
    return ChaosOutcome(reference, chaos, records, runner.launches, runner.relaunches_for_hooks, runner.unplanned,
                        list(runner.tail.timeline), started, runner.unwritable, runner.settings,
                        len(runner.tail.of_kind("supervisor_restart")))


def outcome_to_dict(o: ChaosOutcome) -> dict[str, Any]:
    return {"reference": asdict(o.reference), "chaos": asdict(o.chaos), "faults": [asdict(r) for r in o.records],
            "launches": [asdict(la) for la in o.launches], "relaunches_for_hooks": o.relaunches_for_hooks,
            "unplanned_relaunches": o.unplanned_relaunches, "started_at": o.started_at,
            "unwritable_method": o.unwritable_method, "settings": o.settings, "in_job_restarts": o.in_job_restarts,
            "slurm_jobs": o.slurm_jobs, "max_jobs_running": o.max_jobs_running}
