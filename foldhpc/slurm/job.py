"""The object submitit runs on the compute node: a Checkpointable training job.

submitit's own signal handler would call ``checkpoint()`` from inside the signal handler, i.e.
in the middle of whatever the training step was doing, and it decides "timeout or preemption" by
elapsed time alone. So while training runs, foldhpc's own handlers (installed by the trainer for
``checkpoint.signals``) take over: the signal is recorded, the state is saved at the next step
boundary, and only then does :meth:`SlurmTrainer.__call__` decide whether to requeue
(:mod:`foldhpc.slurm.requeue`) and exit. ``checkpoint()`` is kept for signals that arrive before
the trainer is listening: it returns a fresh job that finds its state in the run directory, never
in a pickle.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import submitit

from foldhpc.config import Config
from foldhpc.monitor.status import COMPLETED
from foldhpc.slurm.env import slurm_info
from foldhpc.slurm.history import record_event
from foldhpc.slurm.requeue import maybe_requeue

log = logging.getLogger(__name__)


class SlurmTrainer(submitit.helpers.Checkpointable):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        from foldhpc.train.loop import EXIT_CHECKPOINTED, Trainer

        cfg = self.cfg
        info = slurm_info()
        job = info["job_id"]
        record_event(cfg.run_dir, "started", job_id=job, restart_count=info["restart_count"])
        try:
            result = Trainer(cfg, resume="auto").run()
        except BaseException as e:
            record_event(cfg.run_dir, "failed", job_id=job, error=f"{type(e).__name__}: {e}")
            raise
        if result.state == COMPLETED:
            record_event(cfg.run_dir, "completed", job_id=job, step=result.step)
            return {"step": result.step, "metrics": result.metrics}
        # Saved on a signal. Ignore further copies of it while we requeue and leave.
        for s in cfg.checkpoint.signal_numbers():
            signal.signal(s, signal.SIG_IGN)
        requeued = maybe_requeue(cfg.slurm.max_requeues)
        record_event(cfg.run_dir, "requeued" if requeued else "stopped", job_id=job, step=result.step,
                     signal=result.signal)
        logging.shutdown()
        sys.exit(EXIT_CHECKPOINTED)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(SlurmTrainer(self.cfg))
