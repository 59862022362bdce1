"""The object submitit runs on the compute node: a Checkpointable training job.

submitit's own signal handler would call ``checkpoint()`` from inside the signal handler, i.e.
in the middle of whatever the training step was doing, and it decides "timeout or preemption" by
elapsed time alone. So while training runs, foldhpc's own handlers (installed by the trainer for
``checkpoint.signals``) take over: the signal is recorded, the state is saved at the next step
boundary, and only then does :meth:`SlurmTrainer.__call__` decide whether to requeue
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
from typing import Any

import submitit

from foldhpc import faults
from foldhpc.checkpoint.signals import ignore_after_training, ignore_signals, last_signal_time
from foldhpc.config import Config, parse_duration
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.status import COMPLETED
from foldhpc.cluster.env import slurm_env
from foldhpc.records.history import record_event
from foldhpc.slurm.followup import SubmititFollowUp
from foldhpc.slurm.requeue import Decision, maybe_requeue
from foldhpc.records.layout import SLURM_DIR

log = logging.getLogger(__name__)


#: debug hook for tests (foldhpc.faults): seconds to stay alive after training completed (a late
#: signal can then be sent to a finished job)
HOLD_AFTER_TRAIN_ENV = faults.HOLD_AFTER_TRAIN


def _preemption_signals(cfg: Config) -> set[signal.Signals]:
    """The trainer's signals plus the one submitit's handler listens on."""
    sigs = set(cfg.checkpoint.signal_numbers())
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "")
    try:
        sigs.add(signal.Signals["SIG" + name.upper().removeprefix("SIG")])
    except KeyError:
        pass
    return sigs


class SlurmTrainer(submitit.helpers.Checkpointable):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        from foldhpc.train.loop import Trainer

        from foldhpc.distributed.env import from_environ

        cfg = self.cfg
        info = slurm_env()
        job = info.job_id
        env = from_environ()
        where = {"rank": env.rank, "node": env.node} if env.distributed else {}
        if env.is_main:
            record_event(cfg.run_dir, "started", job_id=job, restart_count=info.restart_count,
                         **({"world_size": env.world_size} if env.distributed else {}))
        # When the trainer stops listening, its signals are ignored rather than handed back to
        # submitit's handler, which would requeue a job whose training has already returned.
        ignore_after_training()
        signal_at: float | None = None
        try:
            if cfg.fault.max_restarts > 0:  # in-job restarts: the trainer runs as a supervised child
                result, signal_at = self._supervised(job)
            else:
                result = Trainer(cfg, resume="auto", env=env).run()
        except BaseException as e:
            record_event(cfg.run_dir, "failed", job_id=job, error=f"{type(e).__name__}: {e}", **where)
            raise
        ignore_signals(_preemption_signals(cfg))  # also submitit's own signal, if it is not one of ours
        if not env.is_main:
            return {"step": result.step, "state": result.state, "rank": env.rank}
        if result.state == COMPLETED:
            record_event(cfg.run_dir, "completed", job_id=job, step=result.step)
            hold = faults.seconds(HOLD_AFTER_TRAIN_ENV)
            if hold > 0:
                log.warning("%s: staying alive %.1fs after training", HOLD_AFTER_TRAIN_ENV, hold)
                time.sleep(hold)
            return {"step": result.step, "metrics": result.metrics}

        def record(d: Decision) -> None:  # before scontrol requeue, which may end this process
            record_event(cfg.run_dir, "requeued" if d.requeue else "stopped", job_id=job, step=result.step,
                         signal=result.signal, restart_count=info.restart_count, why=d.kind, reason=d.reason)

        # where Slurm will not requeue, the run continues in a follow-up job (foldhpc.slurm.followup)
        maybe_requeue(cfg.slurm.max_requeues, parse_duration(cfg.slurm.signal_lead), signal_at or last_signal_time(),
                      record, followup=SubmititFollowUp(cfg), mode=cfg.slurm.resume, step=result.step)
        logging.shutdown()
        sys.exit(ExitCode.CHECKPOINTED)

    def _supervised(self, job: str | None) -> tuple[Any, float | None]:
        """Train in a child ``foldhpc train`` under :class:`~foldhpc.resilience.supervisor.Supervisor`
        (restarted in this allocation after a crash or hang); the outcome as a TrainResult and
        the time of the preemption signal, if one came."""
        from foldhpc.config import config_to_toml
        from foldhpc.records.fsio import atomic_write_text
        from foldhpc.records.status import read_status
        from foldhpc.resilience.supervisor import Supervisor
        from foldhpc.train.loop import TrainResult

        cfg = self.cfg
        path = cfg.run_dir / SLURM_DIR / f"config-{job or 'local'}.toml"  # the child's config: this job's
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, config_to_toml(cfg), fsync=False)
        args = ["--config", str(path)]
        sup = Supervisor(cfg, args, args, extra_signals=tuple(_preemption_signals(cfg)))
        rc = sup.run()
        try:
            st = read_status(cfg.run_dir) or {}
        except ValueError:
            st = {}
        from foldhpc.distributed.env import from_environ

        rank = from_environ().rank
        if rc == ExitCode.OK:
            return TrainResult(COMPLETED, int(st.get("step", 0)), None, st.get("metrics") or {}, rank=rank), None
        if rc == ExitCode.CHECKPOINTED:
            sig = st.get("signal") or (sup.preempted.name if sup.preempted else None)
            return TrainResult("checkpointed", int(st.get("step", 0)), sig, rank=rank), sup.preempted_at
        raise RuntimeError(st.get("error") or f"the supervised trainer failed (exit status {rc})")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(SlurmTrainer(self.cfg))
