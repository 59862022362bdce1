"""Every exit status a foldhpc process ends with: the contract with Slurm, sbatch scripts and the supervisor.

One enum, so that ``75`` means "state saved on a signal, requeue me" in the trainer, the
supervisor, the Slurm job, the chaos harness and ``foldhpc status`` alike. Aliases name the same
number where a command gives it its own meaning (``LOCKED`` is a usage error; ``NOT_REQUEUED`` is
``python -m foldhpc.slurm.requeue``'s 3 and ``STOPPED`` is ``foldhpc status``'s).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: ``python -m foldhpc.slurm.requeue``: requeued, or a follow-up job was submitted
    REQUEUED = 0
    #: an error during training: the supervisor may restart it, Slurm sees FAILED
    FAILED = 1
    #: a user error before training started (config, data, checkpoint directory): never retried
    USAGE = 2
    #: ``foldhpc train``: the run directory is held by another live trainer
    LOCKED = 2
    #: ``python -m foldhpc.slurm.requeue``: the job was not requeued (limit reached, Slurm refused)
    NOT_REQUEUED = 3
    #: ``foldhpc status``: a run that is over, or not going on by itself, without having failed
    STOPPED = 3
    #: EX_TEMPFAIL: the state was saved on a preemption signal; requeue me (or hand over)
    CHECKPOINTED = 75
    #: the crash-loop breaker: fault.crash_loop_restarts restarts or fault.crash_loop_jobs jobs without a
    #: new checkpoint; do not requeue (93, as NVIDIA's NVRx uses for "restarts without progress")
    CRASH_LOOP = 93
