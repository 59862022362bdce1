"""The object submitit runs on the compute node: a Checkpointable job around a payload.

:class:`SlurmJob` is the executor: it tells the job's story in jobs.jsonl, runs its
:class:`Payload` (what trains: ``foldhpc.cli.train_in_job``, the trainer or its supervisor,
given by whoever submits) and, after a checkpoint on a signal, decides the requeue. It knows no
trainer, so ``foldhpc.slurm`` imports nothing of ``foldhpc.train`` or the supervisor; the
payload is pickled with the job (a module-level function or a small class of a layer above).

submitit's own signal handler would call ``checkpoint()`` from inside the signal handler, i.e.
in the middle of whatever the training step was doing, and it decides "timeout or preemption" by
elapsed time alone. So while training runs, foldhpc's own handlers (installed by the trainer for
``checkpoint.signals``) take over: the signal is recorded, the state is saved at the next step
boundary, and only then does :meth:`SlurmJob.__call__` decide whether to requeue
(:mod:`foldhpc.slurm.requeue`) and exit. ``checkpoint()`` is kept for signals that arrive before
the trainer is listening: it returns a fresh job that finds its state in the run directory, never
in a pickle. Once training has returned (completed or checkpointed) the signals are ignored until
the process exits: submitit's handler, active again, would otherwise requeue a finished job on a
late signal.

With several ranks (``slurm.nodes`` x one task per GPU, started by submitit's ``srun``) every
task runs this object. Rank 0 alone records the job's story and decides the requeue; the other
ranks return normally once the checkpoint is committed (exit 0, so that a non-zero exit of theirs
cannot make Slurm kill rank 0 while it requeues).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

import submitit

from foldhpc import faults
from foldhpc.checkpoint.signals import ignore_after_training, ignore_signals, last_signal_time
from foldhpc.cluster.env import slurm_env
from foldhpc.config import Config, parse_duration
from foldhpc.distributed.env import DistEnv, from_environ
from foldhpc.records.envvars import HOLD_AFTER_TRAIN
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.history import Completed, Failed, or_absent, record_started, write_event
from foldhpc.records.status import COMPLETED
from foldhpc.records import notify as state_change
from foldhpc.slurm.followup import FollowUp
from foldhpc.slurm.requeue import Decision, decision_event, mark_crash_loop, maybe_requeue

log = logging.getLogger(__name__)


#: debug hook for tests (foldhpc.faults): seconds to stay alive after training completed (a late
#: signal can then be sent to a finished job)
HOLD_AFTER_TRAIN_ENV = HOLD_AFTER_TRAIN


class _Where(TypedDict, total=False):
    """The ``failed`` event's fields that name the rank of a multi-rank job (none for one rank)."""

    rank: int
    node: str


class _StartedFields(TypedDict, total=False):
    """The ``started`` event's optional field that a multi-rank job sets."""

    world_size: int


def preemption_signals(cfg: Config) -> set[signal.Signals]:
    """The trainer's signals plus the one submitit's handler listens on."""
    sigs = set(cfg.checkpoint.signal_numbers())
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "")
    try:
        sigs.add(signal.Signals["SIG" + name.upper().removeprefix("SIG")])
    except KeyError:
        pass
    return sigs


@dataclass(frozen=True)
class JobOutcome:
    """How the payload's training ended, when it did not raise: ``state`` "completed" (exit 0) or
    "checkpointed" (a durable checkpoint after a preemption signal: exit 75, requeue or follow-up)."""

    state: str
    step: int | None  # None: unknown (a command foldhpc did not write, without a Session, reports none)
    signal: str | None = None  # the preemption signal's name, where known
    metrics: dict[str, float] = field(default_factory=dict)
    signal_at: float | None = None  # time.time() of the signal, where the payload knows it (a supervisor)


class CrashLoop(RuntimeError):
    """Raised by a payload whose training the crash-loop breaker ended (the supervisor's exit 93:
    ``fault.crash_loop_restarts`` restarts without a new checkpoint). :class:`SlurmJob` then ends
    the job with exit 93 (``ExitCode.CRASH_LOOP``) rather than re-raising: submitit would exit 1
    for any exception, and sacct's ``93:0`` is what tells a person (and ``foldhpc status``,
    state ``crash_loop``) that this job must not be requeued or resubmitted as is."""


class Payload(Protocol):
    """What the job runs: training of ``cfg`` as this rank (``env``) of Slurm job ``job_id``.
    Picklable (submitit pickles the job with it); raises on a failure."""

    def __call__(self, cfg: Config, env: DistEnv, job_id: str | None) -> JobOutcome: ...


class SlurmJob(submitit.helpers.Checkpointable):
    """The submitit job of one run: ``payload`` trains ``cfg``; ``followup`` submits the successor
    where Slurm will not requeue (:class:`foldhpc.slurm.submit.SubmititFollowUp`), None: requeue only."""

    def __init__(self, cfg: Config, payload: Payload, followup: FollowUp | None = None) -> None:
        self.cfg = cfg
        self.payload = payload
        self.followup = followup

    def __call__(self) -> dict[str, Any]:
        cfg = self.cfg
        info = slurm_env()
        job = info.job_id
        env = from_environ()
        where: _Where = {"rank": env.rank, "node": env.node} if env.distributed else {}
        if env.is_main:
            started: _StartedFields = {"world_size": env.world_size} if env.distributed else {}
            record_started(cfg.run_dir, info, **started)
        # When the trainer stops listening, its signals are ignored rather than handed back to
        # submitit's handler, which would requeue a job whose training has already returned.
        ignore_after_training()
        try:
            result = self.payload(cfg, env, job)
        except CrashLoop as e:
            # the supervisor has recorded it (status.json state crash_loop, jobs.jsonl gave_up); the
            # failed event says the job ended; no requeue, no follow-up: exit 93 is the whole answer
            write_event(cfg.run_dir, Failed(job_id=job, error=f"{type(e).__name__}: {e}", **where))
            if env.is_main:
                state_change.notify(cfg.run_dir, state_change.FAILED, command=cfg.monitor.on_state_change, job_id=job,
                                    reason=f"crash loop: {e}")
            log.error("job %s: %s; exit %d (crash loop, never requeued)", job, e, ExitCode.CRASH_LOOP)
            logging.shutdown()
            sys.exit(ExitCode.CRASH_LOOP)
        except BaseException as e:
            write_event(cfg.run_dir, Failed(job_id=job, error=f"{type(e).__name__}: {e}", **where))
            if env.is_main:
                state_change.notify(cfg.run_dir, state_change.FAILED, command=cfg.monitor.on_state_change, job_id=job,
                       reason=f"{type(e).__name__}: {e}")
            raise
        ignore_signals(preemption_signals(cfg))  # also submitit's own signal, if it is not one of ours
        if not env.is_main:
            return {"step": result.step, "state": result.state, "rank": env.rank}
        if result.state == COMPLETED:
            write_event(cfg.run_dir, Completed(job_id=job, step=result.step or 0))
            state_change.notify(cfg.run_dir, state_change.COMPLETED, command=cfg.monitor.on_state_change, step=result.step, job_id=job)
            hold = faults.seconds(HOLD_AFTER_TRAIN_ENV)
            if hold > 0:
                log.warning("%s: staying alive %.1fs after training", HOLD_AFTER_TRAIN_ENV, hold)
                time.sleep(hold)
            return {"step": result.step, "metrics": result.metrics}

        def record(d: Decision) -> None:  # before scontrol requeue, which may end this process
            write_event(cfg.run_dir, decision_event(d, job, info.restart_count, or_absent(result.step),
                                                    signal=result.signal))
            state_change.notify(cfg.run_dir, state_change.REQUEUED if d.requeue else state_change.STOPPED,
                                command=cfg.monitor.on_state_change, step=result.step, job_id=job, reason=d.reason)

        # where Slurm will not requeue, the run continues in a follow-up job (foldhpc.slurm.followup)
        d = maybe_requeue(cfg.slurm.max_requeues, parse_duration(cfg.slurm.signal_lead),
                          result.signal_at or last_signal_time(), record, followup=self.followup,
                          mode=cfg.slurm.resume, step=result.step, run_dir=cfg.run_dir,
                          no_progress_jobs=cfg.fault.crash_loop_jobs)
        if d.kind == "no_progress":  # the chain's crash-loop breaker: its own exit code, never requeued
            mark_crash_loop(cfg.run_dir, d.reason)
            logging.shutdown()
            sys.exit(ExitCode.CRASH_LOOP)
        logging.shutdown()
        sys.exit(ExitCode.CHECKPOINTED)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """A fresh job of the same run: it finds its state in the run directory, never in a pickle."""
        return submitit.helpers.DelayedSubmission(SlurmJob(self.cfg, self.payload, self.followup))
