"""Send a training run to Slurm via submitit (``foldhpc submit``, whose arguments are parsed in
:mod:`foldhpc.cli`; ``python -m foldhpc.submit`` is the same command).

The job runs :class:`~foldhpc.slurm.job.SlurmJob` around the caller's payload with ``--requeue`` and
``--signal=<slurm.signal>@<slurm.signal_lead>`` on ``slurm.nodes`` nodes with ``slurm.gpus`` GPUs
each and one task (rank) per GPU (``slurm.tasks_per_node`` overrides that), which submitit starts
with ``srun``; the default is one node, one GPU, one process. ``--local`` runs the same job in a
local subprocess (submitit's local executor) without Slurm, one rank only (``foldhpc train
--nproc N`` is the local multi-rank run).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldhpc.cluster.nodes import merge_exclude
from foldhpc.config import Config, ConfigError, parse_duration
from foldhpc.records.fsio import make_private_dir
from foldhpc.records.history import Submitted, write_event
from foldhpc.records.layout import SLURM_DIR
from foldhpc.slurm.followup import successor_environ
from foldhpc.slurm.job import Payload, SlurmJob

if TYPE_CHECKING:
    from submitit.core.core import PicklingExecutor

log = logging.getLogger(__name__)


def slurm_signal_name(cfg: Config) -> str:
    return cfg.slurm.signal.upper().removeprefix("SIG")


def check_submittable(cfg: Config) -> None:
    """Cross-section checks that only matter for a Slurm job."""
    sig = "SIG" + slurm_signal_name(cfg)
    if sig not in [s.upper() for s in cfg.checkpoint.signals]:
        raise ConfigError(f"slurm.signal = {cfg.slurm.signal!r} is not in checkpoint.signals = "
                          f"{cfg.checkpoint.signals}: the job would be killed by its own preemption signal. "
                          f"Add \"{sig}\" to checkpoint.signals.")
    world = cfg.slurm.world_size
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is the global batch and must be a multiple of "
                          f"the job's {world} ranks (slurm.nodes = {cfg.slurm.nodes} x {cfg.slurm.ntasks_per_node} "
                          "tasks per node)")
    if parse_duration(cfg.slurm.signal_lead) >= parse_duration(cfg.slurm.time):
        raise ConfigError(f"slurm.signal_lead = {cfg.slurm.signal_lead!r} must be shorter than "
                          f"slurm.time = {cfg.slurm.time!r}")


def batch_shell_traps(cfg: Config) -> str:
    """The line of submitit's batch script that keeps its shell alive on a preemption signal.

    A signal sent to the whole job (``scancel --full --signal=USR1``, what ``--signal=B:...`` plus
    the steps amounts to) reaches the batch shell too, and bash dies of SIGUSR1 by default: the job
    ends FAILED (0:10) while the trainer is still saving, and the requeue decision sees it
    COMPLETING and stops -- the run never comes back (issue 23 item 4). A trap that does nothing
    (not ``trap ''``: an ignored signal stays ignored in the programs the shell starts) holds the
    signal until ``srun`` returns, which it does when the trainer has saved and exited. SIGTERM and
    SIGINT keep their default: a plain ``scancel`` still ends the job."""
    names = {n.upper().removeprefix("SIG") for n in cfg.checkpoint.signals} | {slurm_signal_name(cfg), "USR2"}
    names -= {"TERM", "INT", "KILL"}
    return f"trap 'true' {' '.join(sorted(names))}  # foldhpc: a whole-job signal is the trainer's, not the shell's"


def executor_for(cfg: Config, local: bool = False) -> PicklingExecutor:
    """A configured submitit executor writing its files under <run.dir>/slurm."""
    import submitit

    folder = Path(cfg.slurm.logs_dir) if cfg.slurm.logs_dir else cfg.run_dir / SLURM_DIR
    make_private_dir(next(p for p in (folder, *folder.parents) if "%" not in str(p)))  # the pickles a job unpickles
    sig = slurm_signal_name(cfg)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = sig  # exported to the job: submitit's handler listens on it
    timeout_min = max(1, math.ceil(parse_duration(cfg.slurm.time) / 60))
    if local:
        if cfg.slurm.world_size > 1:
            raise ConfigError(f"--local runs one rank; this config asks for {cfg.slurm.world_size} "
                              f"(slurm.nodes x tasks per node). Use `foldhpc train --nproc {cfg.slurm.world_size}` "
                              "to train with several ranks on this machine.")
        ex: PicklingExecutor = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=timeout_min)
        return ex
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: this machine is not a Slurm submit host (use --local to run here)")
    s = cfg.slurm
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=s.max_requeues)
    lead = int(parse_duration(s.signal_lead))
    extra: dict[str, str | bool] = {"requeue": True, "signal": f"{sig}@{lead}"}
    extra.update(s.extra_sbatch)
    params: dict[str, object] = dict(job_name=s.job_name, time=timeout_min, cpus_per_task=s.cpus_per_task,
                                     mem=s.mem, signal_delay_s=lead, additional_parameters=extra,
                                     nodes=s.nodes, ntasks_per_node=s.ntasks_per_node)
    params["setup"] = [batch_shell_traps(cfg)]
    if s.gpus:
        params["gpus_per_node"] = s.gpus
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                       ("constraint", s.constraint)):
        if value:
            params[key] = value
    ex.update_parameters(**params)
    return ex


class SubmititFollowUp:
    """The successor of a submitit job (:mod:`foldhpc.slurm.followup`): :func:`submit` with the same
    config and payload, from an environment without this job's Slurm variables. Pickled with the job."""

    def __init__(self, cfg: Config, payload: Payload) -> None:
        self.cfg = cfg
        self.payload = payload
        self.run_dir = cfg.run_dir

    def submit(self, after: str, exclude: tuple[str, ...] = (), **record: Any) -> str:
        with successor_environ():
            return submit(self.cfg, self.payload, dependency=f"afterany:{after}", exclude=exclude, **record)


def job_for(cfg: Config, payload: Payload) -> SlurmJob:
    """The submitit job of ``cfg``'s run: ``payload`` trains; where Slurm will not requeue it, a
    follow-up job of the same payload continues the run."""
    return SlurmJob(cfg, payload, followup=SubmititFollowUp(cfg, payload))


def submit(cfg: Config, payload: Payload, local: bool = False, dependency: str | None = None,
           exclude: tuple[str, ...] = (), **record: Any) -> str:
    """Submit the run; returns the job id. The run directory gets the job in jobs.jsonl.

    ``payload``: what the job runs (:class:`foldhpc.slurm.job.Payload`, e.g.
    ``foldhpc.cli.train_in_job``). ``dependency`` (e.g. ``"afterany:123"``) and the extra
    ``record`` fields of the "submitted" event are for follow-up jobs (:mod:`foldhpc.slurm.followup`);
    so is ``exclude``: the run's bad nodes, added to ``slurm.extra_sbatch``'s ``exclude`` (``--exclude``).
    """
    check_submittable(cfg)
    make_private_dir(cfg.run_dir)
    ex = executor_for(cfg, local=local)
    if dependency:
        ex.update_parameters(additional_parameters={**ex.parameters.get("additional_parameters", {}),
                                                    "dependency": dependency})
    if exclude and not local:
        extra = ex.parameters.get("additional_parameters", {})
        ex.update_parameters(additional_parameters={**extra, "exclude": merge_exclude(
            str(extra.get("exclude") or ""), ",".join(exclude))})
    job = ex.submit(job_for(cfg, payload))
    write_event(cfg.run_dir, Submitted(job_id=str(job.job_id), backend="local" if local else "slurm",
                                       partition=cfg.slurm.partition, **record))
    return str(job.job_id)
