"""In-allocation restarts and the hang watchdog: the trainer runs as a child of a supervisor.

A trainer that dies of something that is not a preemption (an exception, SIGSEGV in a library,
SIGKILL from the OOM killer, a non-zero exit) or stops beating (:mod:`.heartbeat`) is restarted
at once from the newest good checkpoint, without going back to the queue, up to
``fault.max_restarts`` times per job, after ``fault.restart_backoff`` (doubling). Two failures in
a row at the same step with the same cause are deterministic (a bug, bad data): no more restarts,
the run fails with the reason. A failure of the environment rather than of the training -- an
I/O error (EIO, ESTALE, a timed-out mount), or a user error (exit 2: a missing data path, an
unreadable checkpoint directory) in a *restart*, which the first start has shown not to be the
config's -- is never "deterministic" (an outage repeats until it ends) and waits
``TRANSIENT_BACKOFF_FACTOR`` times longer (10, 20, 40 s with the default 2 s); the restart budget
still bounds it. With ``--nproc N`` the supervisor starts N ranks and restarts all of them together
when one fails (a fresh rendezvous port each time); under ``srun`` every task has its own
supervisor, and the other ranks' supervisors restart theirs when their collectives fail.

Signals: the supervisor takes the preemption signals (``checkpoint.signals`` and submitit's)
from its first instant and forwards each to the trainer as soon as the trainer has installed its
own handlers (its first heartbeat), so none is lost during a start or a restart. A signal that
arrives while no trainer runs, or just before one dies, ends the supervision with exit 75: the
newest checkpoint is durable, the job is requeued and resumes from it. ``$FOLDHPC_READY_FILE``
(the sbatch template's hand-shake) is the supervisor's: it exists while the supervisor listens.

Hangs: no heartbeat for ``fault.hang_timeout`` (``auto``: the larger of ``fault.hang_floor`` and
20 x the median step time) dumps the trainer's Python stacks (faulthandler, SIGQUIT) to
``<run.dir>/stacks.log``, kills it and restarts it. Until the forward and backward of its first
step are done (the trainer beats then) a started trainer is allowed ``fault.startup_timeout``
instead: imports, data, the checkpoint load, and the cold CUDA kernels or ``torch.compile`` of
the first step (58 s measured on an H200, more than many a hang timeout); the same once training
has returned (phase ``done``: the interpreter's teardown). A slow trainer that
beats is never killed; one that does not exit after SIGKILL (uninterruptible sleep in a hung
file system) is logged and left behind after ``KILL_WAIT_S``, never waited for forever.
Heartbeat files live on ``/dev/shm``; where it is full (or missing), in the node's temporary
directory, else the run directory.

Any command (``foldhpc supervise -- CMD``): ``command`` replaces ``python -m foldhpc train``. A
command foldhpc did not write cannot say when it listens, so preemption signals are not ignored in
it before its start and are forwarded to it at once; it is not watched for hangs until it beats
(a :class:`foldhpc.Session` inside it does, through ``$FOLDHPC_HEARTBEAT_FILE``, and then gets the
whole watchdog). The supervisor holds the run lock itself (rank 0's; ``supervises: true`` in its
record) from before the first start to after the last exit, so that no other trainer takes the run
directory between two restarts of a command that locks nothing; a Session or ``foldhpc train``
inside the command uses that lock instead of taking its own (it finds its supervisor among its
ancestors: :class:`foldhpc.resilience.runlock.InheritedLock`). A run directory another live writer
holds is refused before anything starts (exit 2); a lock taken over while the command runs (a
stale heartbeat on a shared file system) ends it with SIGKILL, so that it writes nothing more, and
the supervision with exit 2. Its exit codes are read like the trainer's: 0 done, 75 checkpointed
(hand over / requeue), anything else a crash. ``cwd``: where the command runs (a job runs it where
it was submitted). The command leads a process group of its own: a forwarded signal, a hang's
SIGQUIT and a kill go to the whole group (a shell and the programs it started, as Slurm signals
every process of a step), and what is left of the group once the command's own process has exited
is SIGKILLed -- after up to ``KILL_WAIT_S`` where it may still be saving (a normal end, a
preemption), at once after a crash -- so that no process of one start outlives it into the next.
Being its own group, it does not get a terminal's Ctrl-C: the supervisor does, and kills it.

Bad nodes and crash loops (docs/nodes.md has the rule set): before the first start and before
each restart the supervisor checks its node (:mod:`foldhpc.resilience.health`, ``[health]``); a node
that fails is not trained on: each failing check is recorded (events.jsonl ``node_unhealthy``,
status.json ``bad_nodes``) and the supervision ends with exit 75, so that a Slurm job hands the run
over to a job that excludes the node (:func:`foldhpc.slurm.requeue.maybe_requeue`). After a failure,
in this order, once "no retry" and "deterministic" have not ended it: in a Slurm job,
``fault.node_crash_limit`` failures on this node since the run's newest checkpoint (no checkpoint
progress: ``last_checkpoint`` of status.json unchanged) blame the node (check ``crashes``) and hand
over the same way; ``fault.crash_loop_restarts`` restarts in a row without a new checkpoint end the
run as a crash loop (exit 93, state ``crash_loop``, never requeued); then ``fault.max_restarts``.

Exit status: the trainer's 0 or 75 (75 also: this node failed its health check or was blamed for
the crashes); 2 for a config/usage error of the first start (never restarted, unless its cause is
an I/O error); 1 when the restarts are used up or the failure is deterministic; 93 for a crash loop
(``status.json`` says why).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
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
from typing import cast

from foldhpc.config import Config, parse_duration
from foldhpc.records.status import CHECKPOINTED, COMPLETED, CRASH_LOOP, RUNNING, StatusFile
from foldhpc.resilience import health
from foldhpc.resilience import heartbeat as hb
from foldhpc.cluster.env import slurm_env
from foldhpc.records.history import GaveUp, JobEvent, Restarted, write_event
from foldhpc.records.events import EventLog, EventSink, NullEventLog
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import LOG_FILE, STACKS_FILE
from foldhpc.records.envvars import HEARTBEAT_ENV, SUPERVISED_ENV, RESTART_INFO_ENV, READY_FILE_ENV
from foldhpc.records.notify import HUNG, notify
from foldhpc.resilience.runlock import RunLock

log = logging.getLogger(__name__)

POLL_S = 0.1
GRACE_S = 10.0  # after one rank failed, how long the others get to notice and record it
KILL_WAIT_S = 30.0  # how long a killed trainer may take to exit before it is left behind (D state)
# Failures a restart cannot cure: the non-finite guard has already rolled back and replayed.
NO_RETRY_ERRORS = ("NonFiniteError",)
# I/O errors that a file system outage, a failover or a remount ends: worth a retry, later.
TRANSIENT_ERRNOS = (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EREMOTEIO, errno.EHOSTDOWN,
                    errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNREFUSED)
TRANSIENT_BACKOFF_FACTOR = 5  # a transient failure waits this many times fault.restart_backoff (doubling)
_PID = re.compile(r"\(pid \d+\)")


def _same_cause(cause: str) -> str:
    """A failure's cause without its process id: a restarted rank has another pid, the same failure."""
    return _PID.sub("(pid)", cause)


def _node() -> str:
    """Where this supervisor and its trainers run (Slurm's node name, else the host name): a failure
    record names it, so that a node that keeps failing runs shows (foldhpc_run_node_failures_total)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def transient_io(error: str) -> bool:
    """Whether a trainer's error message names an I/O error of :data:`TRANSIENT_ERRNOS` (by its
    ``strerror``, which is what foldhpc's messages quote)."""
    return any(os.strerror(n) in error for n in TRANSIENT_ERRNOS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup(signals: list[signal.Signals], own_group: bool = False) -> None:  # pragma: no cover - in the child
    """A trainer must not outlive its supervisor (a kill -9 of the supervisor, e.g. by a test or
    an admin, would otherwise leave an orphan training on). And until the trainer installs its
    own handlers, preemption signals are ignored, not fatal: Slurm signals every process of a
    step, the starting trainer included, and the supervisor, which got the same signal, forwards
    it once the trainer listens (its first heartbeat). ``own_group`` (a foreign command): the
    command leads a process group of its own, which the supervisor signals and kills as a whole
    (a shell's children with it)."""
    if own_group:
        os.setpgid(0, 0)
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
    cause: str = ""  # what two failures must share to be "the same": the trainer's error, else the reason
    transient: bool = False  # the environment's failure (I/O, or exit 2 in a restart): never "deterministic"

    def where(self) -> str:
        return f"step {self.step}" if self.step >= 0 else "startup"


def trainer_command() -> list[str]:
    """The child a supervisor runs by default: foldhpc's own trainer, in this interpreter."""
    return [sys.executable, "-m", "foldhpc", "train"]


class Supervisor:
    """Runs ``python -m foldhpc train`` (``nproc`` ranks) under the policy of ``cfg.fault``.

    ``first_args`` are the trainer's arguments for the first start (they may hold ``--no-resume``
    or ``--resume PATH``), ``restart_args`` those of a restart (always "resume from the newest").
    ``command`` (``foldhpc supervise -- CMD``) runs that command instead, with the arguments
    appended, as a *foreign* child: see the module docstring for what changes.
    """

    def __init__(self, cfg: Config, first_args: list[str], restart_args: list[str], nproc: int = 1,
                 extra_signals: tuple[signal.Signals, ...] = (), command: list[str] | None = None,
                 cwd: Path | None = None) -> None:
        self.cfg = cfg
        self.foreign = command is not None  # not foldhpc's trainer: it may never beat
        self.command = list(command) if command is not None else trainer_command()
        self.cwd = cwd
        self.lock: RunLock | None = None  # a foreign command's: held by the supervisor (see the module docstring)
        self.first_args = first_args
        self.restart_args = restart_args
        self.nproc = nproc
        self.signals = sorted(set(cfg.checkpoint.signal_numbers()) | set(extra_signals))
        self.run_dir = cfg.run_dir
        self.pending: signal.Signals | None = None  # newest preemption signal not yet forwarded
        self.preempted: signal.Signals | None = None
        self.preempted_at: float | None = None  # time.time() of the first preemption signal
        self.procs: list[subprocess.Popen[bytes]] = []
        self._pids: set[int] = set()  # of every trainer started, for "is the lock holder one of ours?"
        self._forwarded: list[bool] = []
        # where beat files may go, best first (see _prepare_beat_files)
        self._hb_parents = [*([Path("/dev/shm")] if os.path.isdir("/dev/shm") else []),
                            Path(tempfile.gettempdir()), self.run_dir]
        self._hb_dir: Path | None = None
        self.kill_wait_s = KILL_WAIT_S
        self.restarts = 0
        self.failures: list[Failure] = []
        self.step_intervals: deque[float] = deque(maxlen=64)  # seconds per step, from heartbeats
        # the rank of this supervisor's lines (an srun task's; None for a one-process run), and its
        # events.jsonl (foldhpc.records.events), opened by run() with the log
        self.rank: int | None = None
        self.events: EventSink = NullEventLog()
        # crash attribution: failures in a row without checkpoint progress (the newest checkpoint's
        # step at the previous failure, or at the start of the supervision)
        self.stalled = 0
        self._ck_step: int | None = None
        self.bad_node: health.Problem | None = None  # this node failed its check or was blamed: handed over

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
            if self.foreign or hb.read(self._hb_path(i)).count > 0:
                try:
                    self._signal(p, self.pending)
                    self._forwarded[i] = True
                    log.warning("supervisor: forwarded %s to the trainer (pid %d)", self.pending.name, p.pid)
                    self.events.emit("supervisor_forwarded", signal=self.pending.name, trainer_pid=p.pid,
                                     local_rank=i)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ children
    def _hb_path(self, rank: int) -> Path:
        assert self._hb_dir is not None
        return self._hb_dir / f"rank-{rank}"

    def _prepare_beat_files(self) -> None:
        """Each rank's beat file, created holding a record (:func:`heartbeat.prepare`), before every start.

        On a full ``/dev/shm`` a trainer's beats would fail unseen and a healthy trainer be
        killed as hung: where the files cannot be written, the next directory of
        ``_hb_parents`` is used from then on (the node's temporary directory, then the run
        directory), with a warning. Checked at every start: a tmpfs that filled up since counts.
        """
        while True:
            try:
                if self._hb_dir is None:
                    self._hb_dir = Path(tempfile.mkdtemp(prefix=f"foldhpc-hb-{os.getpid()}-",
                                                         dir=self._hb_parents[0]))
                for rank in range(self.nproc):
                    hb.prepare(self._hb_path(rank))
                return
            except OSError as e:
                failed = self._hb_parents.pop(0)
                self._remove_beat_files()
                if not self._hb_parents:
                    raise
                log.warning("supervisor: cannot write heartbeat files in %s (%s); using %s instead", failed,
                            e.strerror or e, self._hb_parents[0])

    def _remove_beat_files(self) -> None:
        if self._hb_dir is None:
            return
        for p in self._hb_dir.glob("*"):
            p.unlink(missing_ok=True)
        try:
            self._hb_dir.rmdir()
        except OSError as e:
            log.warning("supervisor: cannot remove %s: %s", self._hb_dir, e.strerror or e)
        self._hb_dir = None

    def _spawn(self, args: list[str]) -> None:
        info = {"in_job_restarts": self.restarts,
                "last_failure": self.failures[-1].__dict__ if self.failures else None}
        base = {k: v for k, v in os.environ.items() if k != READY_FILE_ENV}
        base.update({SUPERVISED_ENV: "1", RESTART_INFO_ENV: json.dumps(info)})
        port = str(free_port()) if self.nproc > 1 else ""
        self.procs, self._forwarded = [], []
        self._prepare_beat_files()
        if self.foreign:  # the command may write no status of its own: the supervisor's is all there is
            self._status(state=RUNNING, in_job_restarts=self.restarts, error=None)
        for rank in range(self.nproc):
            path = self._hb_path(rank)
            env = dict(base, **{HEARTBEAT_ENV: str(path)})
            if self.nproc > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.nproc),
                           LOCAL_WORLD_SIZE=str(self.nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                           FOLDHPC_NODE=socket.gethostname())
            # a foreign command cannot tell when it listens: its signals are not ignored (a shell
            # could not trap them then), they are forwarded at once (see _forward)
            self.procs.append(subprocess.Popen([*self.command, *args], env=env, cwd=self.cwd,
                                               preexec_fn=functools.partial(_child_setup,
                                                                            [] if self.foreign else self.signals,
                                                                            self.foreign)))
            self._pids.add(self.procs[-1].pid)
            self._forwarded.append(False)
        log.info("supervisor: started the trainer%s (pid %s)%s", f" as {self.nproc} ranks" if self.nproc > 1 else "",
                 " ".join(str(p.pid) for p in self.procs),
                 f", restart {self.restarts} of at most {self.cfg.fault.max_restarts}" if self.restarts else "")
        self.events.emit("supervisor_spawn", pids=[p.pid for p in self.procs], nproc=self.nproc,
                         restarts=self.restarts, max_restarts=self.cfg.fault.max_restarts,
                         **({"command": self.command} if self.foreign else {}))

    def _signal(self, p: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal a child: a foreign command's whole process group (as Slurm signals every process of a
        step: a shell's programs get a preemption signal too), else the trainer's process."""
        if self.foreign:
            os.killpg(p.pid, sig)  # ProcessLookupError once the group is empty
        else:
            p.send_signal(sig)

    def _end_groups(self, wait_s: float) -> None:
        """A foreign command's leftovers once its own process has exited (a shell's background job, a
        program the shell ran that is still saving after the shell died of a preemption signal): waited
        for up to ``wait_s``, then SIGKILLed, so that no process of an attempt outlives it."""
        if not self.foreign:
            return
        deadline = time.monotonic() + wait_s
        for p in self.procs:
            try:
                while time.monotonic() < deadline:
                    os.killpg(p.pid, 0)
                    time.sleep(POLL_S)
                os.killpg(p.pid, signal.SIGKILL)
                log.warning("supervisor: killed what was left of the command's process group %d", p.pid)
            except ProcessLookupError:
                continue  # the group is empty
            except PermissionError:
                continue  # the pid is another user's group leader now: not ours

    def _kill_all(self, first: signal.Signals = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    self._signal(p, first)
                    if first == signal.SIGKILL:
                        continue
                    self._signal(p, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=self.kill_wait_s)
                continue
            except subprocess.TimeoutExpired:
                pass
            if first != signal.SIGKILL:
                try:
                    self._signal(p, signal.SIGKILL)
                    p.wait(timeout=self.kill_wait_s)
                    continue
                except ProcessLookupError:
                    continue
                except subprocess.TimeoutExpired:
                    pass
            # SIGKILL takes effect when the process leaves the kernel: one in uninterruptible
            # sleep (a hung NFS or Lustre mount) may never; waiting for it would hang the job.
            from foldhpc.resilience.runlock import proc_start

            proc = proc_start(p.pid)
            state = proc[1] if proc else "?"
            log.error("supervisor: trainer pid %d has not exited %.0fs after SIGKILL (process state %s%s); going "
                      "on without it", p.pid, self.kill_wait_s, state,
                      ": uninterruptible sleep, stuck in the kernel (a hung file system?)" if state == "D" else "")
        # after a preemption signal what is left of the command may still be saving: it gets the wait
        self._end_groups(self.kill_wait_s if self.preempted is not None else 0.0)

    def _timeout(self, beat: hb.Beat, started: bool) -> tuple[float, str]:
        """(seconds without a beat that count as a hang, the setting they come from)."""
        f = self.cfg.fault
        if self.foreign and beat.count == 0:
            return 0.0, "off: the command writes no heartbeat"
        if beat.count == 0 or beat.phase in ("startup", "done") or not started:
            return parse_duration(f.startup_timeout), ("fault.startup_timeout: exiting" if beat.phase == "done" else
                                                       "fault.startup_timeout: before the first step's backward")
        median = statistics.median(self.step_intervals) if self.step_intervals else None
        return f.hang_timeout_s(median), "fault.hang_timeout"

    def _attempt_error(self) -> str:
        """The error a trainer of this attempt wrote into status.json, if any (an older one's is not its)."""
        try:
            data = StatusFile(self.run_dir).data
        except (OSError, ValueError):
            return ""
        pids = {p.pid for p in self.procs}
        return str(data.get("error") or "") if data.get("pid") in pids else ""

    def _lock_held_by_another(self) -> str | None:
        """Who holds the run directory if it is not one of this supervisor's trainers (a refused start)."""
        from foldhpc.resilience import runlock

        try:
            rec = runlock.read_holder(self.run_dir)
        except OSError:
            return None
        if not rec or (rec.get("host") == socket.gethostname() and rec.get("pid") in {*self._pids, os.getpid()}):
            return None  # one of its trainers, or the supervisor itself (a foreign command's lock)
        return runlock.describe(rec)

    def _usage_error_is_final(self, error: str) -> bool:
        """Exit 2 (a user error) ends the supervision on the first start, where it is the config's,
        data's or checkpoint directory's and a restart cannot fix it -- unless its cause is an I/O
        error; and whenever another trainer holds the run directory. In a restart the first start
        has shown them good: something outside changed (a data path missing for a while), so it is
        a failure like any other, restarted within the budget."""
        holder = self._lock_held_by_another()
        if holder:
            log.error("supervisor: the trainer was refused: run directory %s is held by %s", self.run_dir, holder)
            return True
        return self.restarts == 0 and not transient_io(error)

    def _watch(self) -> int | Failure:
        """Wait for the ranks of one attempt: their common exit status, or the failure."""
        n = len(self.procs)
        last = [hb.read(self._hb_path(i)) for i in range(n)]
        changed = [time.monotonic()] * n
        first_train: list[int | None] = [None] * n  # step of a rank's first training beat in this start
        started = [False] * n  # a beat came after it: the first step's forward/backward is done
        mark: list[tuple[int, float] | None] = [None] * n  # (step, when its first beat was seen)
        failed_at: float | None = None
        failure: Failure | None = None
        error_pending = False  # the failed rank left no error: another rank may still record why (a peer died)
        while True:
            self._forward()
            if self.lock is not None and self.lock.lost:
                # the run directory is someone else's now: the command must not write another byte there
                log.error("supervisor: %s; killing the command", self.lock.lost)
                self._kill_all()
                self.lock.check()  # raises RunDirLocked (exit 2)
            now = time.monotonic()
            codes = [p.poll() for p in self.procs]
            for i, p in enumerate(self.procs):
                beat = hb.read(self._hb_path(i))
                if beat.count != last[i].count:
                    # start-up is over once the first step's backward is done: a beat after the first
                    # training beat, or any "train" beat (the first step's boundary beats "first"), so
                    # a trainer that hangs right after a poll first saw it train is judged by
                    # fault.hang_timeout, not fault.startup_timeout, however fast its steps were
                    if first_train[i] is not None or beat.phase == "train":
                        started[i] = True
                    if beat.phase in ("train", "first"):
                        if first_train[i] is None:
                            first_train[i] = beat.step
                        m = mark[i]
                        if m is None or beat.step != m[0]:
                            # a step's time: from its first beat to the next step's (the first step
                            # counts: without it a trainer whose every step outlasts hang_floor
                            # would be judged by the floor at its second step)
                            if m is not None and beat.step > m[0]:
                                self.step_intervals.append((now - m[1]) / (beat.step - m[0]))
                            mark[i] = (beat.step, now)
                    else:
                        mark[i] = None  # validation, a checkpoint wait: not a step's time
                    last[i], changed[i] = beat, now
                rc = codes[i]
                if failure is None and rc is not None and rc not in (ExitCode.OK, ExitCode.CHECKPOINTED):
                    reason = f"trainer {_describe_exit(rc)}"
                    error = self._attempt_error()
                    if rc == ExitCode.USAGE and self._usage_error_is_final(error):
                        self._kill_all(signal.SIGTERM)
                        return ExitCode.USAGE
                    if rc == ExitCode.USAGE:
                        reason += " (a user error at startup, in a restart: retried)"
                    failure = Failure(i, last[i].step, last[i].phase, reason, cause=error or reason,
                                      transient=rc == ExitCode.USAGE or transient_io(error))
                    failed_at = now
                    log.error("supervisor: %s%s at %s (%s)", f"rank {i} " if n > 1 else "", failure.reason,
                              failure.where(), last[i].phase)  # for people; tools read the supervisor_failure event
                    self.events.emit("supervisor_failure", failed_rank=i if n > 1 else self.rank, node=_node(),
                                     step=failure.step,
                                     phase=failure.phase, reason=failure.reason, cause=failure.cause,
                                     exit_code=rc, error=error, transient=failure.transient)
                    if error:
                        log.error("supervisor: the trainer's error: %s", error)
                    error_pending = not error
                if failure is None and rc is None:
                    timeout, source = self._timeout(last[i], started[i])
                    if timeout > 0 and now - changed[i] > timeout:
                        failure = self._hung(i, last[i], now - changed[i], timeout, source)
                        failed_at = now
            if failure is not None:
                if all(c is not None for c in (p.poll() for p in self.procs)) or now - (failed_at or now) > GRACE_S:
                    self._kill_all()
                    error = self._attempt_error() if error_pending else ""
                    if error:  # e.g. rank 0's "rank 1 on <node> died without reporting an error"
                        log.error("supervisor: the trainer's error: %s", error)
                        failure.cause = error
                        failure.transient = failure.transient or transient_io(error)
                    return failure
            elif all(c is not None for c in codes):
                self._end_groups(self.kill_wait_s)
                return ExitCode.CHECKPOINTED if ExitCode.CHECKPOINTED in codes else ExitCode.OK
            time.sleep(POLL_S)

    def _hung(self, rank: int, beat: hb.Beat, silent_s: float, timeout: float, source: str) -> Failure:
        where = f"step {beat.step}" if beat.step >= 0 else "startup"
        reason = (f"hung at {where} in {beat.phase}: no heartbeat for {silent_s:.0f}s (timeout {timeout:.0f}s, "
                  f"{source}); Python stacks in {self.run_dir / STACKS_FILE}")
        log.error("supervisor: %s%s", f"rank {rank} " if self.nproc > 1 else "", reason)
        self.events.emit("supervisor_hang", failed_rank=rank if self.nproc > 1 else self.rank, node=_node(),
                         step=beat.step,
                         phase=beat.phase, silent_s=round(silent_s, 3), timeout_s=timeout, source=source,
                         reason=reason)
        if not self.rank:  # rank 0's supervisor (or the only one) tells the run's state
            notify(self.run_dir, HUNG, command=self.cfg.monitor.on_state_change, step=beat.step,
                   job_id=slurm_env().job_id, reason=reason)
        p = self.procs[rank]
        try:
            self._signal(p, signal.SIGQUIT)  # faulthandler in the trainer dumps every thread's stack
            self._signal(p, signal.SIGCONT)  # a stopped process handles it once continued
            p.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self._kill_all()
        return Failure(rank, beat.step, beat.phase, reason, cause=f"hung at {where} in {beat.phase}")

    # ------------------------------------------------------------------ policy
    def _record(self, event: JobEvent) -> None:
        try:
            write_event(self.run_dir, event)
        except OSError as e:
            log.warning("cannot record %s in %s: %s", event.EVENT, self.run_dir, e)

    def _status(self, **fields: object) -> None:
        try:
            StatusFile(self.run_dir).update(**fields)
        except (OSError, ValueError) as e:
            log.warning("cannot update %s/status.json: %s", self.run_dir, e)

    def _give_up(self, why: str, failure: Failure) -> int:
        error = f"{failure.cause or failure.reason} ({why})"
        log.error("supervisor: giving up: %s", error)
        self.events.emit("supervisor_give_up", reason=error, why=why, step=failure.step, restarts=self.restarts)
        self._status(state="failed", error=error, step=failure.step, in_job_restarts=self.restarts,
                     last_failure=failure.__dict__)
        self._record(GaveUp(job_id=slurm_env().job_id, reason=error, step=failure.step, in_job_restarts=self.restarts))
        return ExitCode.FAILED

    def run(self) -> int:
        from foldhpc.distributed.env import from_environ
        from foldhpc.records.logs import setup_logging

        previous = {s: signal.signal(s, self._on_signal) for s in self.signals}
        try:
            rank = from_environ().rank if self.nproc == 1 else None  # an srun task's rank
        except Exception:  # noqa: BLE001 - the trainer reports a bad environment itself
            rank = None
        # the supervisor's story (restarts, hangs) and the requeue decision after it belong in train.log
        setup_logging(self.cfg.run.log_level, self.run_dir / LOG_FILE, rank or None)
        self.rank = rank or None  # as its log lines are tagged
        self.events = EventLog(self.run_dir, self.rank)
        ready = os.environ.get(READY_FILE_ENV)
        if ready:
            try:
                Path(ready).touch()
            except OSError as e:
                log.warning("cannot create the ready file %s: %s", ready, e)
        try:
            if self.foreign and not rank:  # rank 0 (or the only one) holds a run's lock
                self._take_lock()
            rc = self._run()
            if self.foreign and rc in (ExitCode.OK, ExitCode.CHECKPOINTED):
                self._status(state=COMPLETED if rc == ExitCode.OK else CHECKPOINTED, error=None,
                             in_job_restarts=self.restarts,
                             **({"finished_at": time.time()} if rc == ExitCode.OK else {}))
            return rc
        finally:
            if ready:
                Path(ready).unlink(missing_ok=True)
            for s in previous:  # the trainers are done: a late signal must not kill the supervisor
                signal.signal(s, signal.SIG_IGN)
            self._remove_beat_files()
            if self.foreign and any(p.poll() is None for p in self.procs):  # left by an exception (Ctrl-C)
                self._kill_all()
            self._end_groups(0.0)
            if self.lock is not None:  # after the last child has exited (run() never leaves one behind)
                self.lock.release()

    def _take_lock(self) -> None:
        """Before a foreign command starts: take the run lock and hold it until the supervision ends
        (handed down to the command: see the module docstring); a run directory another live writer
        holds is refused (:class:`~foldhpc.resilience.runlock.RunDirLocked`, exit 2, in jobs.jsonl
        for a Slurm job)."""
        from foldhpc.resilience import runlock

        try:
            self.lock = runlock.acquire(self.run_dir, self.cfg.fault.lock_stale_after, supervises=True)
        except runlock.RunDirLocked as e:
            runlock.record_refusal(self.run_dir, e)
            raise
        self.lock.log_acquired()

    def _deterministic(self, failure: Failure) -> bool:
        """The same failure twice in a row: the same step *and* the same cause (two unrelated
        failures at startup are both at step -1). A transient one never is."""
        if len(self.failures) < 2 or failure.transient:
            return False
        prev = self.failures[-2]
        return prev.step == failure.step and _same_cause(prev.cause) == _same_cause(failure.cause)

    def _checkpoint_step(self) -> int | None:
        """The step of the run's newest committed checkpoint, as its trainer recorded it (status.json)."""
        try:
            ck = StatusFile(self.run_dir).data.get("last_checkpoint")
        except (OSError, ValueError):
            return None
        step = ck.get("step") if isinstance(ck, dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def _healthy(self) -> bool:
        """Run the node health check (``[health]``) before a start; False: this node must not train."""
        if not self.cfg.health.enabled:
            return True
        rep = health.check_node(self.cfg, _node())
        health.record(rep, self.events, StatusFile(self.run_dir) if not self.rank else None, slurm_env().job_id)
        for note in rep.notes:
            log.debug("health check: %s", note)
        if rep.ok:
            log.info("supervisor: %s", rep.summary())
            return True
        self.bad_node = rep.problems[0]
        self._hand_over_bad_node(rep.summary())
        return False

    def _hand_over_bad_node(self, why: str) -> None:
        if slurm_env().job_id:
            log.error("supervisor: %s; not training on this node: exit %d, so that the job hands the run over to a "
                      "job that excludes it", why, ExitCode.CHECKPOINTED)
        else:  # a workstation, a plain `foldhpc train --supervise`: there is no other node to go to
            log.error("supervisor: %s; not training on this node: exit %d (nothing was lost). Outside a Slurm job "
                      "nothing hands the run over to another node: fix what the check names, or change its "
                      "threshold in [health] (health.enabled = false turns the check off)", why,
                      ExitCode.CHECKPOINTED)
        if not self.rank:
            self._status(state=CHECKPOINTED, warning=why, in_job_restarts=self.restarts)

    def _blame_node(self, failure: Failure) -> bool:
        """After a failure: count it against this node unless the run checkpointed since the previous one;
        True where ``fault.node_crash_limit`` is reached in a Slurm job (the node is then blamed)."""
        ck = self._checkpoint_step()
        if ck != self._ck_step:
            self.stalled = 0
            self._ck_step = ck
        self.stalled += 1
        limit = self.cfg.fault.node_crash_limit
        if not limit or self.stalled < limit or not slurm_env().job_id:
            return False
        problem = health.Problem(_node(), "crashes", f"{self.stalled} trainer failures on this node without a new "
                                                     f"checkpoint (fault.node_crash_limit = {limit}); the latest: "
                                                     f"{failure.cause or failure.reason} at {failure.where()}")
        self.events.emit("node_unhealthy", node=problem.node, check=problem.check, detail=problem.detail,
                         job_id=slurm_env().job_id)
        if not self.rank:
            health.add_bad_nodes(StatusFile(self.run_dir), [problem], slurm_env().job_id)
        self.bad_node = problem
        self._hand_over_bad_node(f"node {problem.node} blamed: {problem.detail}")
        return True

    def _crash_loop(self, failure: Failure) -> int:
        n = self.cfg.fault.crash_loop_restarts
        error = (f"crash loop: {self.stalled - 1} restarts in a row without a new checkpoint (fault.crash_loop_restarts"
                 f" = {n}), newest checkpoint at step {self._ck_step if self._ck_step is not None else 'none'}; the "
                 f"latest failure: {failure.cause or failure.reason} at {failure.where()}; not requeued: fix the "
                 "cause and resubmit")
        log.error("supervisor: %s", error)
        self.events.emit("supervisor_give_up", reason=error, why="crash_loop", step=failure.step,
                         restarts=self.restarts)
        self._status(state=CRASH_LOOP, error=error, step=failure.step, in_job_restarts=self.restarts,
                     last_failure=failure.__dict__)
        self._record(GaveUp(job_id=slurm_env().job_id, reason=error, step=failure.step, in_job_restarts=self.restarts))
        return ExitCode.CRASH_LOOP

    def _run(self) -> int:
        f = self.cfg.fault
        backoff = parse_duration(f.restart_backoff)
        args = self.first_args
        self._ck_step = self._checkpoint_step()
        while True:
            if not self._healthy():
                return ExitCode.CHECKPOINTED
            self._spawn(args)
            outcome = self._watch()
            if isinstance(outcome, int):
                return outcome
            failure = outcome
            self.failures.append(failure)
            if self.preempted is not None:
                log.warning("supervisor: %s arrived and the trainer then failed (%s): not restarting; exit %d so that "
                            "the job is requeued and resumes from the newest checkpoint", self.preempted.name,
                            failure.reason, ExitCode.CHECKPOINTED)
                return ExitCode.CHECKPOINTED
            if failure.cause.startswith(NO_RETRY_ERRORS):
                return self._give_up("a restart replays the same steps and cannot cure it", failure)
            if self._deterministic(failure):
                return self._give_up(f"failed twice in a row at {failure.where()}: deterministic, not restarted "
                                     "again", failure)
            if self._blame_node(failure):
                return ExitCode.CHECKPOINTED
            if f.crash_loop_restarts and self.stalled > f.crash_loop_restarts:
                return self._crash_loop(failure)
            if self.restarts >= f.max_restarts:
                return self._give_up(f"in-job restarts used up: {self.restarts} of fault.max_restarts = "
                                     f"{f.max_restarts}", failure)
            wait = backoff * 2 ** self.restarts * (TRANSIENT_BACKOFF_FACTOR if failure.transient else 1)
            self.restarts += 1
            self._status(state="restarting", in_job_restarts=self.restarts, last_failure=failure.__dict__)
            self._record(Restarted(job_id=slurm_env().job_id, attempt=self.restarts, step=failure.step,
                                   reason=failure.reason, **({"rank": failure.rank} if self.nproc > 1 else {})))
            log.warning("supervisor: restarting the trainer from the newest checkpoint in %.1fs (restart %d of %d%s)",
                        wait, self.restarts, f.max_restarts,
                        "; the environment failed, not the training: a longer back-off" if failure.transient else "")
            self.events.emit("supervisor_restart", restarts=self.restarts, delay_s=wait, max_restarts=f.max_restarts,
                             step=failure.step, reason=failure.reason, transient=failure.transient)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                # the signal handler sets it at any time; mypy, having seen it None above, would not
                preempted = cast("signal.Signals | None", self.preempted)
                if preempted is not None:
                    log.warning("supervisor: %s during the restart back-off: exit %d for requeue",
                                preempted.name, ExitCode.CHECKPOINTED)
                    return ExitCode.CHECKPOINTED
                time.sleep(POLL_S)
            args = self.restart_args
