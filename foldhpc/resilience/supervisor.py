"""In-allocation restarts and the hang watchdog: the trainer runs as a child of a supervisor.

A trainer that dies of something that is not a preemption (an exception, SIGSEGV in a library,
SIGKILL from the OOM killer, a non-zero exit) or stops beating (:mod:`.heartbeat`) is restarted
at once from the newest good checkpoint, without going back to the queue, up to
``fault.max_restarts`` times per job, after ``fault.restart_backoff`` (doubling). Two failures in
a row at the same step are deterministic (a bug, bad data): no more restarts, the run fails with
both reasons. With ``--nproc N`` the supervisor starts N ranks and restarts all of them together
when one fails (a fresh rendezvous port each time); under ``srun`` every task has its own
supervisor, and the other ranks' supervisors restart theirs when their collectives fail.

Signals: the supervisor takes the preemption signals (``checkpoint.signals`` and submitit's)
from its first instant and forwards each to the trainer as soon as the trainer has installed its
own handlers (its first heartbeat), so none is lost during a start or a restart. A signal that
arrives while no trainer runs, or just before one dies, ends the supervision with exit 75: the
newest checkpoint is durable, the job is requeued and resumes from it. ``$FOLDHPC_READY_FILE``
(the sbatch template's hand-shake) is the supervisor's: it exists while the supervisor listens.

Hangs: no heartbeat for ``fault.hang_timeout`` (``auto``: the larger of ``fault.hang_floor`` and
20 x the median step time; ``fault.startup_timeout`` before the first step) dumps the trainer's
Python stacks (faulthandler, SIGQUIT) to ``<run.dir>/stacks.log``, kills it and restarts it.
A slow trainer that beats is never killed.

Exit status: the trainer's 0 or 75; 2 for a config/usage error (never restarted); 1 when the
restarts are used up or the failure is deterministic (``status.json`` says why).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from foldhpc.config import Config, parse_duration
from foldhpc.monitor.status import StatusFile
from foldhpc.resilience import heartbeat as hb
from foldhpc.slurm.env import slurm_info
from foldhpc.slurm.history import record_event

log = logging.getLogger(__name__)

SUPERVISED_ENV = "FOLDHPC_SUPERVISED"  # set in the trainer: it is supervised, it must not supervise
RESTART_INFO_ENV = "FOLDHPC_RESTART_INFO"  # JSON for the restarted trainer: count and why
READY_FILE_ENV = "FOLDHPC_READY_FILE"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CHECKPOINTED = 0, 1, 2, 75
POLL_S = 0.1
GRACE_S = 10.0  # after one rank failed, how long the others get to notice and record it
# Failures a restart cannot cure: the non-finite guard has already rolled back and replayed.
NO_RETRY_ERRORS = ("NonFiniteError",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup(signals: list[signal.Signals]) -> None:  # pragma: no cover - in the child, before exec
    """A trainer must not outlive its supervisor (a kill -9 of the supervisor, e.g. by a test or
    an admin, would otherwise leave an orphan training on). And until the trainer installs its
    own handlers, preemption signals are ignored, not fatal: Slurm signals every process of a
    step, the starting trainer included, and the supervisor, which got the same signal, forwards
    it once the trainer listens (its first heartbeat)."""
    for s in signals:
        signal.signal(s, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


@dataclass
class Failure:
    rank: int
    step: int
    phase: str
    reason: str

    def where(self) -> str:
        return f"step {self.step}" if self.step >= 0 else "startup"


class Supervisor:
    """Runs ``python -m foldhpc train`` (``nproc`` ranks) under the policy of ``cfg.fault``.

    ``first_args`` are the trainer's arguments for the first start (they may hold ``--no-resume``
    or ``--resume PATH``), ``restart_args`` those of a restart (always "resume from the newest").
    """

    def __init__(self, cfg: Config, first_args: list[str], restart_args: list[str], nproc: int = 1,
                 extra_signals: tuple[signal.Signals, ...] = ()) -> None:
        self.cfg = cfg
        self.first_args = first_args
        self.restart_args = restart_args
        self.nproc = nproc
        self.signals = sorted(set(cfg.checkpoint.signal_numbers()) | set(extra_signals))
        self.run_dir = cfg.run_dir
        self.pending: signal.Signals | None = None  # newest preemption signal not yet forwarded
        self.preempted: signal.Signals | None = None
        self.preempted_at: float | None = None  # time.time() of the first preemption signal
        self.procs: list[subprocess.Popen[bytes]] = []
        self._forwarded: list[bool] = []
        self._hb_dir = Path(tempfile.mkdtemp(prefix=f"foldhpc-hb-{os.getpid()}-",
                                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.restarts = 0
        self.failures: list[Failure] = []
        self.step_intervals: deque[float] = deque(maxlen=64)  # seconds per step, from heartbeats

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        sig = signal.Signals(signum)
        if self.preempted is None:
            self.preempted, self.preempted_at = sig, time.time()
        self.pending = sig
        self._forward()

    def _forward(self) -> None:
        """Forward the pending signal to every trainer that listens (has beaten once)."""
        if self.pending is None:
            return
        for i, p in enumerate(self.procs):
            if self._forwarded[i] or p.poll() is not None:
                continue
            if hb.read(self._hb_path(i)).count > 0:
                try:
                    p.send_signal(self.pending)
                    self._forwarded[i] = True
                    log.warning("supervisor: forwarded %s to the trainer (pid %d)", self.pending.name, p.pid)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ children
    def _hb_path(self, rank: int) -> Path:
        return self._hb_dir / f"rank-{rank}"

    def _spawn(self, args: list[str]) -> None:
        info = {"in_job_restarts": self.restarts,
                "last_failure": self.failures[-1].__dict__ if self.failures else None}
        base = {k: v for k, v in os.environ.items() if k != READY_FILE_ENV}
        base.update({SUPERVISED_ENV: "1", RESTART_INFO_ENV: json.dumps(info)})
        port = str(free_port()) if self.nproc > 1 else ""
        self.procs, self._forwarded = [], []
        for rank in range(self.nproc):
            path = self._hb_path(rank)
            path.write_bytes(b"")
            env = dict(base, **{hb.HEARTBEAT_ENV: str(path)})
            if self.nproc > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.nproc),
                           LOCAL_WORLD_SIZE=str(self.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                           FOLDHPC_NODE=socket.gethostname())
            self.procs.append(subprocess.Popen([sys.executable, "-m", "foldhpc", "train", *args], env=env,
                                               preexec_fn=functools.partial(_child_setup, self.signals)))
            self._forwarded.append(False)
        log.info("supervisor: started the trainer%s (pid %s)%s", f" as {self.nproc} ranks" if self.nproc > 1 else "",
                 " ".join(str(p.pid) for p in self.procs),
                 f", restart {self.restarts} of at most {self.cfg.fault.max_restarts}" if self.restarts else "")

    def _kill_all(self, first: signal.Signals = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(first)
                    if first == signal.SIGKILL:
                        continue
                    p.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _timeout(self, beat: hb.Beat) -> float:
        f = self.cfg.fault
        if beat.count == 0 or beat.phase == "startup":
            return parse_duration(f.startup_timeout)
        median = statistics.median(self.step_intervals) if self.step_intervals else None
        return f.hang_timeout_s(median)

    def _watch(self) -> int | Failure:
        """Wait for the ranks of one attempt: their common exit status, or the failure."""
        n = len(self.procs)
        last = [hb.read(self._hb_path(i)) for i in range(n)]
        changed = [time.monotonic()] * n
        failed_at: float | None = None
        failure: Failure | None = None
        while True:
            self._forward()
            now = time.monotonic()
            codes = [p.poll() for p in self.procs]
            for i, p in enumerate(self.procs):
                beat = hb.read(self._hb_path(i))
                if beat.count != last[i].count:
                    if beat.phase == "train" and last[i].phase == "train" and beat.step > last[i].step >= 0:
                        self.step_intervals.append((now - changed[i]) / (beat.step - last[i].step))
                    last[i], changed[i] = beat, now
                rc = codes[i]
                if failure is None and rc is not None and rc not in (EXIT_OK, EXIT_CHECKPOINTED):
                    if rc == EXIT_USAGE:
                        self._kill_all(signal.SIGTERM)
                        return EXIT_USAGE
                    failure = Failure(i, last[i].step, last[i].phase, f"trainer {_describe_exit(rc)}")
                    failed_at = now
                    log.error("supervisor: %s%s at %s (%s)", f"rank {i} " if n > 1 else "", failure.reason,
                              failure.where(), last[i].phase)
                if failure is None and rc is None:
                    timeout = self._timeout(last[i])
                    if timeout > 0 and now - changed[i] > timeout:
                        failure = self._hung(i, last[i], now - changed[i], timeout)
                        failed_at = now
            if failure is not None:
                if all(c is not None for c in (p.poll() for p in self.procs)) or now - (failed_at or now) > GRACE_S:
                    self._kill_all()
                    return failure
            elif all(c is not None for c in codes):
                return EXIT_CHECKPOINTED if EXIT_CHECKPOINTED in codes else EXIT_OK
            time.sleep(POLL_S)

    def _hung(self, rank: int, beat: hb.Beat, silent_s: float, timeout: float) -> Failure:
        where = f"step {beat.step}" if beat.step >= 0 else "startup"
        reason = (f"hung at {where} in {beat.phase}: no heartbeat for {silent_s:.0f}s (timeout {timeout:.0f}s); "
                  f"Python stacks in {self.run_dir / 'stacks.log'}")
        log.error("supervisor: %s%s", f"rank {rank} " if self.nproc > 1 else "", reason)
        p = self.procs[rank]
        try:
            p.send_signal(signal.SIGQUIT)  # faulthandler in the trainer dumps every thread's stack
            p.send_signal(signal.SIGCONT)  # a stopped process handles it once continued
            p.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self._kill_all()
        return Failure(rank, beat.step, beat.phase, reason)

    # ------------------------------------------------------------------ policy
    def _record(self, event: str, **fields: object) -> None:
        try:
            job = slurm_info()["job_id"]
            record_event(self.run_dir, event, job_id=job, **fields)
        except OSError as e:
            log.warning("cannot record %s in %s: %s", event, self.run_dir, e)

    def _status(self, **fields: object) -> None:
        try:
            StatusFile(self.run_dir).update(**fields)
        except (OSError, ValueError) as e:
            log.warning("cannot update %s/status.json: %s", self.run_dir, e)

    def _child_error(self) -> str:
        """The error the (dead) trainer wrote into status.json, if any."""
        try:
            return str(StatusFile(self.run_dir).data.get("error") or "")
        except (OSError, ValueError):
            return ""

    def _give_up(self, why: str, failure: Failure) -> int:
        error = f"{self._child_error() or failure.reason} ({why})"
        log.error("supervisor: giving up: %s", error)
        self._status(state="failed", error=error, step=failure.step, in_job_restarts=self.restarts,
                     last_failure=failure.__dict__)
        self._record("gave_up", reason=error, step=failure.step, in_job_restarts=self.restarts)
        return EXIT_FAILED

    def run(self) -> int:
        from foldhpc.distributed.env import from_environ
        from foldhpc.monitor.logs import setup_logging

        previous = {s: signal.signal(s, self._on_signal) for s in self.signals}
        try:
            rank = from_environ().rank if self.nproc == 1 else None  # an srun task's rank
        except Exception:  # noqa: BLE001 - the trainer reports a bad environment itself
            rank = None
        # the supervisor's story (restarts, hangs) and the requeue decision after it belong in train.log
        setup_logging(self.cfg.run.log_level, self.run_dir / "train.log", rank or None)
        ready = os.environ.get(READY_FILE_ENV)
        if ready:
            try:
                Path(ready).touch()
            except OSError as e:
                log.warning("cannot create the ready file %s: %s", ready, e)
        try:
            return self._run()
        finally:
            if ready:
                Path(ready).unlink(missing_ok=True)
            for s in previous:  # the trainers are done: a late signal must not kill the supervisor
                signal.signal(s, signal.SIG_IGN)
            for p in self._hb_dir.glob("*"):
                p.unlink(missing_ok=True)
            self._hb_dir.rmdir()

    def _run(self) -> int:
        f = self.cfg.fault
        backoff = parse_duration(f.restart_backoff)
        args = self.first_args
        while True:
            self._spawn(args)
            outcome = self._watch()
            if isinstance(outcome, int):
                return outcome
            failure = outcome
            self.failures.append(failure)
            if self.preempted is not None:
                log.warning("supervisor: %s arrived and the trainer then failed (%s): not restarting; exit %d so that "
                            "the job is requeued and resumes from the newest checkpoint", self.preempted.name,
                            failure.reason, EXIT_CHECKPOINTED)
                return EXIT_CHECKPOINTED
            child_error = self._child_error()
            if child_error.startswith(NO_RETRY_ERRORS):
                return self._give_up("a restart replays the same steps and cannot cure it", failure)
            if len(self.failures) >= 2 and self.failures[-2].step == failure.step:
                return self._give_up(f"failed twice in a row at {failure.where()}: deterministic, not restarted "
                                     "again", failure)
            if self.restarts >= f.max_restarts:
                return self._give_up(f"in-job restarts used up: {self.restarts} of fault.max_restarts = "
                                     f"{f.max_restarts}", failure)
            wait = backoff * 2 ** self.restarts
            self.restarts += 1
            self._status(state="restarting", in_job_restarts=self.restarts, last_failure=failure.__dict__)
            self._record("restarted", attempt=self.restarts, step=failure.step, reason=failure.reason,
                         **({"rank": failure.rank} if self.nproc > 1 else {}))
            log.warning("supervisor: restarting the trainer from the newest checkpoint in %.1fs (restart %d of %d)",
                        wait, self.restarts, f.max_restarts)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.preempted is not None:
                    log.warning("supervisor: %s during the restart back-off: exit %d for requeue",
                                self.preempted.name, EXIT_CHECKPOINTED)
                    return EXIT_CHECKPOINTED
                time.sleep(POLL_S)
            args = self.restart_args
