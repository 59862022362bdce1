"""``python -m foldhpc.submit`` / ``foldhpc submit``: send a training run to Slurm via submitit.

The job runs :class:`~foldhpc.slurm.job.SlurmTrainer` with ``--requeue`` and
``--signal=<slurm.signal>@<slurm.signal_lead>`` on ``slurm.nodes`` nodes with ``slurm.gpus`` GPUs
each and one task (rank) per GPU (``slurm.tasks_per_node`` overrides that), which submitit starts
with ``srun``; the default is one node, one GPU, one process. ``--local`` runs the same job in a
local subprocess (submitit's local executor) without Slurm, one rank only (``foldhpc train
--nproc N`` is the local multi-rank run).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from pathlib import Path

from foldhpc.config import Config, ConfigError, load_config, parse_duration
from foldhpc.records.fsio import make_private_dir
from foldhpc.records.history import record_event
from foldhpc.records.layout import SLURM_DIR

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


def executor_for(cfg: Config, local: bool = False):
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
        ex = submitit.LocalExecutor(folder=folder)
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
    if s.gpus:
        params["gpus_per_node"] = s.gpus
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                       ("constraint", s.constraint)):
        if value:
            params[key] = value
    ex.update_parameters(**params)
    return ex


def submit(cfg: Config, local: bool = False, dependency: str | None = None, **record: object) -> str:
    """Submit the run; returns the job id. The run directory gets the job in jobs.jsonl.

    ``dependency`` (e.g. ``"afterany:123"``) and the extra ``record`` fields of the "submitted"
    event are for follow-up jobs (:mod:`foldhpc.slurm.followup`).
    """
    from foldhpc.slurm.job import SlurmTrainer

    check_submittable(cfg)
    make_private_dir(cfg.run_dir)
    ex = executor_for(cfg, local=local)
    if dependency:
        ex.update_parameters(additional_parameters={**ex.parameters.get("additional_parameters", {}),
                                                    "dependency": dependency})
    job = ex.submit(SlurmTrainer(cfg))
    record_event(cfg.run_dir, "submitted", job_id=str(job.job_id), backend="local" if local else "slurm",
                 partition=cfg.slurm.partition, **record)
    return str(job.job_id)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--local", action="store_true", help="run the job locally (no Slurm), in the background")
    p.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="sweep: one Slurm job array over the cartesian product of all --sweep values, each task "
                        "in its own run directory <run.dir>/<key=value,...> (repeatable; foldhpc.slurm.sweep)")
    p.add_argument("--max-parallel", type=int, default=0, metavar="N",
                   help="with --sweep: at most N tasks run at once (sbatch --array=...%%N; default: all)")


def run(args: argparse.Namespace) -> int:
    if args.sweep:
        from foldhpc.slurm import sweep

        array_id, sweep_dir, tasks = sweep.submit_sweep(args.config, args.overrides, args.sweep, args.max_parallel,
                                                        local=args.local)
        sweep.print_submitted(array_id, sweep_dir, tasks, args.max_parallel)
        return 0
    if args.max_parallel:
        raise ConfigError("--max-parallel limits the tasks of a sweep: it needs --sweep")
    cfg = load_config(args.config, args.overrides)
    job_id = submit(cfg, local=args.local)
    print(f"submitted job {job_id}\nrun directory {cfg.run_dir.resolve()}")
    return 0

