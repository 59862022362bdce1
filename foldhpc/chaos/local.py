"""The local backend of ``foldhpc chaos``: real ``foldhpc train`` processes on this machine.

The runner plays both the cluster and the adversary. It starts ``foldhpc train --supervise``
(a launch: what one Slurm job allocation would run) in its own process group, watches
``train.log`` (:mod:`.logtail`), injects the planned faults one after another, and starts the
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
from typing import Any, Callable, TypeVar

from foldhpc import faults
from foldhpc.chaos.kinds import KINDS, uses_hook
from foldhpc.chaos.logtail import LogEvent, LogTail
from foldhpc.chaos.schedule import Plan, PlannedFault

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.01
START_TIMEOUT_S = 180.0  # process start to first step, on a loaded 2-core machine
EXIT_CHECKPOINTED = 75
MAX_UNPLANNED_RELAUNCHES = 3
# chaos settings that make every fault cheap; the user's --set items override them
CHAOS_DEFAULTS: dict[str, str] = {
    "run.log_every": "1",  # the runner reads each completed step from the log
    "train.deterministic": "true",  # bit-exact on CPU
    "checkpoint.every_steps": "10",
    "checkpoint.keep_last": "3",  # a damaged newest file still leaves good ones
    "fault.max_restarts": "100000",  # in-job restarts are the point here, not a budget
    "fault.restart_backoff": "0s",
    "fault.hang_timeout": "3s",
}


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
    in_job_restarts: int = 0  # the supervisors' restarts of a trainer, as logged
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
    from foldhpc.checkpoint.manager import CheckpointError, CheckpointManager

    try:
        state = json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        state = None
    try:
        loaded = CheckpointManager(ckpt_dir).load_latest()
    except CheckpointError as e:
        return state == "completed", None, None, str(e)
    if loaded is None:
        return state == "completed", None, None, "no checkpoint"
    return state == "completed", loaded.entry.step, loaded.entry.digest, ""


class LocalRunner:
    """Runs the reference and the chaos training of one plan under ``out/runs/``."""

    def __init__(self, config: str | None, overrides: list[str], plan: Plan, out: Path, *,
                 unwritable: str | None = None, mirror_nan_in_reference: bool = True,
                 write_delay_s: float = 0.4, python: str = sys.executable, settings: dict[str, str] | None = None,
                 ckpt_subdir: str = "checkpoints", nproc: int = 1) -> None:
        self.config = config
        self.user_overrides = list(overrides)
        self.plan = plan
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.ref_dir = self.runs / "reference"
        self.run_dir = self.runs / "chaos"
        self.ckpt_dir = self.run_dir / ckpt_subdir
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
        self.tail = LogTail(self.run_dir / "train.log")
        self._immutable: Path | None = None
        self._console: Any = None

    # ------------------------------------------------------------------ commands
    def overrides(self, run_dir: Path) -> list[str]:
        items = [f"{k}={v}" for k, v in self.settings.items()] + self.user_overrides
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
               if not (k.startswith("FOLDHPC_FAIL_") or k.startswith("FOLDHPC_NAN_") or k.startswith("FOLDHPC_DEBUG_"))}
        if nan and self.plan.nan_steps:
            env[faults.NAN_AT_STEPS] = ",".join(str(s) for s in self.plan.nan_steps)
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
        completed, step, digest, err = final_state(self.ref_dir, self.ref_dir / self.ckpt_dir.name)
        out = RunOutcome(str(self.ref_dir), rc, completed and rc == 0, step, digest, time.monotonic() - t0, err)
        log.info("chaos: reference %s in %.1fs: step %s, digest %s", "completed" if out.completed else
                 f"FAILED (exit {rc})", out.wall_s, step, (digest or "-")[:16])
        return out

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
        if hook is not None:
            extra.update({faults.FAIL_AT_STEP: str(hook.at_step), faults.FAIL_ONCE: str(self._marker(hook)),
                          faults.FAIL_KIND: "exception" if hook.kind == "exception" else hook.variant})
        if window and window[-1].kind == "kill_during_write":
            extra[faults.WRITE_DELAY] = str(self.write_delay_s)
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
        """Poll the log until ``pred`` holds; LaunchEnded if the process tree ends first (unless
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

    def _wait_first_step(self, index: int, what: str) -> LogEvent:
        return self._wait(lambda: next(iter(self.tail.since(index, "first_step")), None), START_TIMEOUT_S, what)

    def _wait_exit(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:  # keep reading the log: its events get their real times
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
        """Step of the newest good checkpoint according to the log: the latest save, or the
        checkpoint a later start verified and resumed from, whichever came last."""
        evs = self.tail.events[:before] if before is not None else self.tail.events
        for e in reversed(evs):
            if e.kind in ("saved", "resumed"):
                return e.step
        return None  # (a scan from the end: a save or a resume is never far back)

    def _trainer_pid(self, check_parent: bool = True) -> int:
        """The running trainer (rank 0): the process that logged the newest "first step"."""
        ev = self.tail.last("first_step")
        if ev is None or self.proc is None:
            raise RuntimeError("no trainer has started yet")
        if check_parent and _ppid(ev.pid) != self.proc.pid:
            raise RuntimeError(f"pid {ev.pid} (from the log) is not a child of the launch {self.proc.pid}")
        return ev.pid

    def _last_progress(self, pid: int, before: int | None = None) -> int | None:
        ev = self.tail.last("progress", before, pid)
        return ev.step if ev else None

    # ------------------------------------------------------------------ recovery checks
    def _resumed(self, rec: FaultRecord, index: int, first: LogEvent) -> LogEvent | None:
        """Fill the record from the events of the start that completed ``first``."""
        rec.time_to_resume_s = round(first.seen - (rec.injected_at or first.seen), 3)
        resumed = [e for e in self.tail.since(index, "resumed") if e.pid == first.pid]
        rec.rejected = [e.groups[0] for e in self.tail.since(index, "rejected") if e.pid == first.pid]
        if not resumed:
            rec.problems.append("the new trainer did not resume from a checkpoint (started from step 0)")
            return None
        ev = resumed[-1]
        rec.checkpoint_used, rec.resumed_step = Path(ev.groups[0]).name, ev.step
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
        if rec.launch_exit != EXIT_CHECKPOINTED:
            rec.problems.append(f"exit {rec.launch_exit} after {sig.name}, not {EXIT_CHECKPOINTED}")
        saves = self.tail.since(index, "signal_save")
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
            def in_write() -> Path | None:
                return next(iter(sorted(self.ckpt_dir.glob(".step_*.ckpt.tmp-*"))), None)
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
            written = any(e.kind == "saved" and f"step_{e.step:08d}.ckpt" == rec.checkpoint_used
                          for e in self.tail.events[:index])
            if not written:
                rec.problems.append(f"resumed from {rec.checkpoint_used}, the file whose write was killed")
        rec.resume_measure = "SIGKILL -> first step of the restarted trainer"

    def _restart_of(self, old_pid: int, timeout: float, after: float = 0.0) -> tuple[int, LogEvent]:
        """Wait for the supervisor's new trainer after ``old_pid`` (rank 0) died: (position of the
        new trainer's first event in the log, its "first step" event), seen after ``after``. The
        old trainer's lines all come before the new one's: it was dead when the supervisor
        started the next."""
        def found() -> tuple[int, LogEvent] | None:
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
        if not any(e.kind == "hung" and rec.step is not None and rec.step <= e.step <= rec.step + 1
                   for e in self.tail.events[:start]):
            rec.problems.append("the supervisor did not report the hang")

    def _dead_rank(self, f: PlannedFault, rec: FaultRecord) -> None:
        """SIGKILL of a rank other than 0; the supervisor restarts every rank."""
        self._wait_step(f.at_step)
        trainer = self._trainer_pid()
        rank = self.rng.randrange(1, self.nproc)
        pid = int(json.loads((self.run_dir / "ranks" / f"rank-{rank}.json").read_text())["pid"])
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
        if not any(e.seen >= rec.injected_at for e in self.tail.of_kind("restarting")):
            rec.problems.append("no restart by the supervisor was logged")
        rec.resume_measure = "SIGKILL of rank >= 1 -> first step of the restarted rank 0"

    def _hook(self, f: PlannedFault, rec: FaultRecord) -> None:
        """exception / hang: the trainer injects it itself at step ``at_step`` (FOLDHPC_FAIL_*)."""
        if self.launch_hook != f.index:  # one hook per process environment: this one needs a new launch
            self._relaunch_for_hook(f)
        marker = self._marker(f)

        def fired() -> list[str] | None:  # "<pid> step <N> at <time>", once completely written
            try:
                text = marker.read_text().split()
            except FileNotFoundError:
                return None
            return text if len(text) == 5 else None
        text = self._wait(fired, self._step_timeout(f.at_step - self._current_step()) + START_TIMEOUT_S,
                          f"the {f.kind} hook at step {f.at_step}")
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

    def _relaunch_for_hook(self, f: PlannedFault) -> None:
        """End the launch with SIGUSR1 (0 steps lost, checked) so the next one carries ``f``'s hook."""
        self.relaunches_for_hooks += 1
        assert self.proc is not None
        if self.proc.poll() is None:
            self._wait(lambda: self.tail.last("first_step") is not None, START_TIMEOUT_S, "a trainer")
            os.kill(self.proc.pid, signal.SIGUSR1)
            rc = self._wait_exit()
            if rc != EXIT_CHECKPOINTED:
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
            failed = self._wait(lambda: next(iter(self.tail.since(index, "save_failed")), None),
                                self._step_timeout(3 * self.plan.every_steps), "a save to fail")
        finally:
            self._set_writable(True)
        restored, index2 = time.time(), len(self.tail.events)
        rec.notes.append(f"{self.unwritable}: save of step {failed.step} failed, "
                         f"{failed.seen - rec.injected_at:.2f}s unwritable")
        saved = self._wait(lambda: next(iter(self.tail.since(index2, "saved")), None),
                           self._step_timeout(3 * self.plan.every_steps), "the next save to succeed")
        rec.steps_lost = 0
        rec.time_to_resume_s = round(saved.seen - restored, 3)
        rec.resume_measure = "directory writable again -> next durable checkpoint"
        rec.newest_durable_step = saved.step

    def _nan(self, f: PlannedFault, rec: FaultRecord) -> None:
        ev = self._wait(lambda: next((e for e in self.tail.of_kind("nonfinite") if e.step == f.at_step), None), self._step_timeout(f.at_step - self._current_step()) + START_TIMEOUT_S,
                        f"the non-finite step {f.at_step}")
        rec.step, rec.injected_at, rec.steps_lost = f.at_step, ev.seen, 0
        self._wait(lambda: any(e.kind == "progress" and e.step > f.at_step and e.seen >= ev.seen
                               for e in self.tail.events[-50:]) or None,
                   self._step_timeout(10) + START_TIMEOUT_S, f"a step after the non-finite step {f.at_step}")
        rec.resume_measure = "in-step: the update is skipped, nothing restarts"

    # ------------------------------------------------------------------ the run
    def run_chaos(self) -> tuple[RunOutcome, list[FaultRecord]]:
        handlers: dict[str, Callable[[PlannedFault, FaultRecord], None]] = {
            "sigusr1": self._signal, "sigterm": self._signal, "sigkill": self._sigkill,
            "kill_during_write": lambda f, r: self._sigkill(f, r, during_write=True),
            "exception": self._hook, "hang": self._hook, "crash": self._crash, "corrupt_checkpoint": self._corrupt,
            "unwritable_dir": self._unwritable, "nan": self._nan, "dead_rank": self._dead_rank}
        t0 = time.monotonic()
        records: list[FaultRecord] = []
        self.markers.mkdir(parents=True, exist_ok=True)
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
        self._wait_first_step(index, "the first step after an unplanned restart")

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
    if runs.exists():
        for p in runs.rglob("*"):  # an interrupted run may have left the directory immutable
            if p.is_dir() and kwargs.get("unwritable") == "chattr":
                subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        shutil.rmtree(runs)
    runner = LocalRunner(config, overrides, plan, out, **kwargs)
    reference = runner.run_reference()
    started = time.time()  # the chaos run's clock: the timeline and the fault marks count from here
    chaos, records = runner.run_chaos()
    return ChaosOutcome(reference, chaos, records, runner.launches, runner.relaunches_for_hooks, runner.unplanned,
                        list(runner.tail.timeline), started, runner.unwritable, runner.settings,
                        len(runner.tail.of_kind("restarting")))


def outcome_to_dict(o: ChaosOutcome) -> dict[str, Any]:
    return {"reference": asdict(o.reference), "chaos": asdict(o.chaos), "faults": [asdict(r) for r in o.records],
            "launches": [asdict(la) for la in o.launches], "relaunches_for_hooks": o.relaunches_for_hooks,
            "unplanned_relaunches": o.unplanned_relaunches, "started_at": o.started_at,
            "unwritable_method": o.unwritable_method, "settings": o.settings, "in_job_restarts": o.in_job_restarts,
            "slurm_jobs": o.slurm_jobs, "max_jobs_running": o.max_jobs_running}
