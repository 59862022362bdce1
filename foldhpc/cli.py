"""``foldhpc`` command line: ``train``, ``supervise``, ``data``, ``checkpoints``, ``init``, ``submit``, ``status``.

Exit codes: 0 success; 1 the command failed (during training: the reason is in status.json and the
log; an unexpected error prints a traceback); 2 a user error, printed as one line without a
traceback: bad usage or config, a missing or empty dataset, an unusable checkpoint directory or no
usable checkpoint to resume, or run.dir in use by another trainer (nothing was started; a
supervisor never retries it); 75 training stopped on a preemption signal after a durable
checkpoint (requeue it); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldhpc.config import Config, ConfigError, load_config
from foldhpc.records.exitcodes import ExitCode

if TYPE_CHECKING:
    from foldhpc.cluster.env import SlurmEnv
    from foldhpc.distributed.env import DistEnv
    from foldhpc.resilience.supervisor import Supervisor
    from foldhpc.slurm.job import JobOutcome

log = logging.getLogger("foldhpc.cli")



def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config (see configs/); defaults apply without it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set train.max_steps=200 (repeatable)")


def check_run_dir(cfg: Any) -> None:
    """run.dir must be creatable before anything starts: a ConfigError (exit 2), not a traceback."""
    from foldhpc.records.fsio import make_private_dir  # 0750, files not group-writable (issue 19 item 4)

    try:
        make_private_dir(cfg.run_dir)
    except OSError as e:
        raise ConfigError(f"run.dir = '{cfg.run_dir}' cannot be created ({e.strerror or e}); "
                          "set run.dir to a writable folder, e.g. --set run.dir=runs/try1") from None


def _load_checked(config: str | None, overrides: list[str]) -> Config:
    """The config, with its ``task.factory`` importable (a TaskError, exit 2, before anything runs)."""
    from foldhpc.task import check_task

    cfg = load_config(config, overrides)
    check_task(cfg)
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_checked(args.config, args.overrides)
    check_run_dir(cfg)
    from foldhpc.records.envvars import SUPERVISED_ENV

    supervised = os.environ.get(SUPERVISED_ENV) == "1"
    if not supervised and _wants_supervisor(args, cfg):
        return _supervise(args, cfg)
    # Before the heavy imports: a preemption signal from here on is recorded (and acted on at the first
    # step boundary), not fatal; once training returns, further ones are ignored until exit, so a late
    # signal cannot kill a finished or checkpointed trainer (exit 138) after its work is safe.
    from foldhpc.checkpoint.signals import hold_early_signals, ignore_after_training
    from foldhpc.resilience.heartbeat import heartbeat

    hold_early_signals(cfg.checkpoint.signal_numbers())
    ignore_after_training()
    heartbeat().beat(-1, "startup")  # tells a supervisor that signals may be forwarded now
    from foldhpc.cluster.env import slurm_env
    from foldhpc.task import train

    slurm = slurm_env()
    resume = _resume_mode(args, slurm)
    if slurm.job_id and not supervised and _first_task():  # the story of the job for `foldhpc status` (submitit jobs record
        _record_started(cfg, slurm)         # it in foldhpc.slurm.job, supervised ones in _supervise)
    with _publishing(cfg, supervised):
        result = train(cfg, resume=resume, force_resume=_force_resume(args, slurm))
    if not supervised:  # a supervised trainer's end is its supervisor's to tell (it may restart it)
        _notify_end(cfg, result.exit_code)
    _debug_hold_after_train()
    return result.exit_code


def _publishing(cfg: Config, supervised: bool = False) -> contextlib.AbstractContextManager[object]:
    """The run's metrics for node_exporter's textfile collector (``monitor.textfile_dir``), written
    by the process that runs the training or supervises it, on rank 0 only: never by a supervised
    trainer (its supervisor does, and goes on publishing while the trainer hangs or restarts)."""
    if not cfg.monitor.textfile_dir or supervised or not _first_task():
        return contextlib.nullcontext()
    from foldhpc.cluster.env import slurm_env
    from foldhpc.monitor.metrics import TextfilePublisher

    return TextfilePublisher(cfg, current_job=slurm_env().job_id)


def _notify_end(cfg: Config, rc: int) -> None:
    """``monitor.on_state_change`` for a training or supervision that ended here, outside a submitit
    job (:mod:`foldhpc.slurm.job` tells its own): completed or failed; exit 75 is the requeue
    decision's to tell (requeued, handed over or stopped)."""
    if rc not in (ExitCode.OK, ExitCode.FAILED) or not cfg.monitor.on_state_change or not _first_task():
        return
    from foldhpc.cluster.env import slurm_env
    from foldhpc.records.status import read_status
    from foldhpc.records.notify import COMPLETED, FAILED, notify

    try:
        st = read_status(cfg.run_dir) or {}
    except (OSError, ValueError):
        st = {}
    step = st.get("step") if isinstance(st.get("step"), int) else None
    notify(cfg.run_dir, COMPLETED if rc == ExitCode.OK else FAILED, command=cfg.monitor.on_state_change, step=step,
           job_id=slurm_env().job_id, reason=None if rc == ExitCode.OK else str(st.get("error") or ""))


def _record_started(cfg: Config, slurm: SlurmEnv, **extra: Any) -> None:
    """The "started" event of a batch script's job run (``backend`` "sbatch"); a failure to write it
    is logged: training goes on without its story."""
    from foldhpc.records.history import record_started

    try:
        record_started(cfg.run_dir, slurm, backend="sbatch", **extra)
    except OSError as e:
        log.warning("cannot record the job in %s: %s", cfg.run_dir, e)


def _first_task() -> bool:
    """Whether this process is rank 0 (or the only one): under srun every task runs ``foldhpc
    train``, and only one of them tells the job's story in jobs.jsonl."""
    return os.environ.get("SLURM_PROCID", "0") == "0" and os.environ.get("RANK", "0") == "0"


def _resume_mode(args: argparse.Namespace, slurm: SlurmEnv) -> str:
    """"never", "auto" or a checkpoint path; a requeued Slurm job always resumes ("auto")."""
    resume = "never" if args.no_resume else (args.resume or "auto")
    if slurm.restart_count > 0 and resume != "auto":
        # sbatch replays the job's arguments on every requeue: --no-resume would throw away the
        # checkpoint the previous run just saved, --resume PATH would go back to an old one.
        given = "--no-resume" if args.no_resume else f"--resume {args.resume}"
        log.warning("%s is ignored: this is restart %d of Slurm job %s (a requeue), so training resumes from the "
                    "newest checkpoint in run.dir; %s applied to the job's first run only", given,
                    slurm.restart_count, slurm.job_id, given)
        resume = "auto"
    return resume


def _force_resume(args: argparse.Namespace, slurm: SlurmEnv) -> bool:
    """``--force-resume`` applies to a Slurm job's first run only: sbatch replays the job's arguments
    on every requeue, and the checkpoint a requeued run resumes from was written by this run with
    the config it trains with, so forcing again could only let a config file edited since then move
    the run silently (a follow-up job of a chain is never given it: foldhpc.slurm.requeue)."""
    if args.force_resume and slurm.restart_count > 0:
        log.warning("--force-resume is ignored: this is restart %d of Slurm job %s (a requeue); it applied to the "
                    "job's first run only", slurm.restart_count, slurm.job_id)
        return False
    return bool(args.force_resume)


def _wants_supervisor(args: argparse.Namespace, cfg: Any) -> bool:
    """Several local ranks always need one; otherwise ``--supervise``/``--no-supervise``, and by
    default inside a Slurm job (where a restart saves a trip through the queue) when
    ``fault.max_restarts`` > 0."""
    if args.nproc > 1:
        return True
    if args.supervise is not None:
        return bool(args.supervise)
    return bool(os.environ.get("SLURM_JOB_ID")) and cfg.fault.max_restarts > 0


def _supervise(args: argparse.Namespace, cfg: Any) -> int:
    """This process becomes the supervisor of the trainer (``--nproc N``: of N local ranks)."""
    from foldhpc.cluster.env import slurm_env
    from foldhpc.resilience.supervisor import Supervisor

    if args.nproc > 1:
        if "RANK" in os.environ or os.environ.get("SLURM_STEP_NUM_TASKS", "1") != "1":
            raise ConfigError("--nproc: this process is already one rank of a multi-process launch "
                              "(RANK or a multi-task Slurm step); drop --nproc")
        if cfg.train.batch_size % args.nproc:
            raise ConfigError(f"--nproc {args.nproc}: train.batch_size = {cfg.train.batch_size} is the global batch "
                              f"and must be a multiple of the number of ranks")
    slurm = slurm_env()
    resume = _resume_mode(args, slurm)
    if slurm.job_id and _first_task():
        _record_started(cfg, slurm, supervised=True)
    common: list[str] = ["--config", args.config] if args.config else []
    for o in args.overrides:
        common += ["--set", o]
    first = list(common)
    if resume == "never":
        first.append("--no-resume")
    elif resume != "auto":
        first += ["--resume", resume]
    if _force_resume(args, slurm):
        first.append("--force-resume")
    with _publishing(cfg):
        rc = Supervisor(cfg, first, common, nproc=args.nproc).run()
    _notify_end(cfg, rc)
    _debug_hold_after_train()
    return rc


#: how ``foldhpc supervise`` is called, for its one-line usage error
SUPERVISE_USAGE = "foldhpc supervise [--config FILE] [--set K=V ...] [--max-restarts N] -- CMD [ARG ...]"


def _cmd_supervise(args: argparse.Namespace) -> int:
    """``foldhpc supervise -- CMD``: run a command foldhpc did not write under the supervisor
    (restarts after a crash, signals forwarded, exit 75 honoured, status.json and jobs.jsonl);
    ``main`` has split ``CMD`` off at the first ``--``."""
    command: list[str] = list(getattr(args, "child_command", None) or [])
    if args.stray or not command:
        raise ConfigError(f"supervise needs the command after '--': {SUPERVISE_USAGE}")
    check_command(command, Path.cwd())
    overrides = list(args.overrides)
    if args.max_restarts is not None:
        overrides.append(f"fault.max_restarts={args.max_restarts}")
    cfg = load_config(args.config, overrides)
    check_run_dir(cfg)
    from foldhpc.cluster.env import slurm_env
    from foldhpc.records.envvars import SUPERVISED_ENV
    from foldhpc.resilience.supervisor import Supervisor

    if os.environ.get(SUPERVISED_ENV) == "1":
        raise ConfigError("foldhpc supervise runs under a supervisor already (FOLDHPC_SUPERVISED=1): run the "
                          "command directly")
    slurm = slurm_env()
    if slurm.job_id and _first_task():
        _record_started(cfg, slurm, supervised=True)
    with _publishing(cfg):
        rc = Supervisor(cfg, [], [], command=command).run()
    _notify_end(cfg, rc)
    return rc


def check_command(command: list[str], cwd: Path) -> None:
    """A command that cannot be started is a usage error (exit 2) before anything is submitted or
    started, not a traceback in the job: its program must be on PATH or an executable file."""
    import shutil

    prog = command[0]
    if "/" in prog:
        path = Path(prog) if Path(prog).is_absolute() else cwd / prog
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"the command after '--' cannot be run: {prog} is not an executable file "
                              f"(relative to {cwd}); give the program's path, e.g. -- python script.py")
    elif shutil.which(prog) is None:
        raise ConfigError(f"the command after '--' cannot be run: {prog!r} is not on PATH; give the program's "
                          "path, e.g. -- python script.py")


class CommandPayload:
    """The payload of a ``foldhpc submit -- CMD`` job (:class:`foldhpc.slurm.job.Payload`): ``command``,
    a program foldhpc did not write, run in ``cwd`` (where it was submitted) under the supervisor.

    Pickled with the job, so a requeued job and a follow-up job (which pickles the same payload:
    :class:`foldhpc.slurm.submit.SubmititFollowUp`) run the very same command again. What the
    supervisor gives a command without its cooperation: restarts after a crash
    (``fault.max_restarts``), the preemption signals forwarded to it, its exit 75 read as
    "checkpointed, hand over" (the job then requeues or submits its follow-up, ``slurm.resume``),
    the run lock held for it, status.json and jobs.jsonl.
    """

    def __init__(self, command: list[str], cwd: str) -> None:
        self.command = list(command)
        self.cwd = cwd

    def __call__(self, cfg: Config, env: DistEnv, job_id: str | None) -> JobOutcome:  # noqa: ARG002
        from foldhpc.resilience.supervisor import Supervisor
        from foldhpc.slurm.job import preemption_signals

        sup = Supervisor(cfg, [], [], command=self.command, cwd=Path(self.cwd),
                         extra_signals=tuple(preemption_signals(cfg)))
        with _publishing(cfg):
            rc = sup.run()
        return _job_outcome(cfg, sup, rc, known_step=False)


def train_in_job(cfg: Config, env: DistEnv, job_id: str | None) -> JobOutcome:
    """The payload of a submitit job (:class:`foldhpc.slurm.job.Payload`, passed by ``foldhpc
    submit``; pickled with the job by reference, so the compute node imports this module): train
    ``cfg`` as rank ``env``, in this process, or with ``fault.max_restarts`` > 0 in a child
    ``foldhpc train`` under the supervisor (restarted in this allocation after a crash or hang)."""
    from foldhpc.slurm.job import JobOutcome

    if cfg.fault.max_restarts > 0:
        return _supervised_in_job(cfg, job_id)
    from foldhpc.task import train

    with _publishing(cfg):
        r = train(cfg, resume="auto", env=env)
    return JobOutcome(r.state, r.step, r.signal, r.metrics)


def _supervised_in_job(cfg: Config, job_id: str | None) -> JobOutcome:
    """The supervised trainer's outcome, from its exit status and status.json, with the time of the
    preemption signal if one came; raises if it failed."""
    from foldhpc.config import config_to_toml
    from foldhpc.records.fsio import atomic_write_text
    from foldhpc.records.layout import SLURM_DIR
    from foldhpc.resilience.supervisor import Supervisor
    from foldhpc.slurm.job import preemption_signals

    path = cfg.run_dir / SLURM_DIR / f"config-{job_id or 'local'}.toml"  # the child's config: this job's
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_to_toml(cfg), fsync=False)
    child = ["--config", str(path)]
    sup = Supervisor(cfg, child, child, extra_signals=tuple(preemption_signals(cfg)))
    with _publishing(cfg):
        rc = sup.run()
    return _job_outcome(cfg, sup, rc)


def _job_outcome(cfg: Config, sup: Supervisor, rc: int, known_step: bool = True) -> JobOutcome:
    """A supervision's job outcome, from its exit status ``rc`` and status.json; raises if it failed.
    ``known_step=False`` (a foreign command): the step is status.json's only if something there wrote
    one (a Session in the command), else unknown (None)."""
    from foldhpc.records.status import COMPLETED, read_status
    from foldhpc.slurm.job import JobOutcome

    try:
        st = read_status(cfg.run_dir) or {}
    except ValueError:
        st = {}
    raw = st.get("step")
    step: int | None = raw if isinstance(raw, int) and not isinstance(raw, bool) else (0 if known_step else None)
    if rc == ExitCode.OK:
        return JobOutcome(COMPLETED, step, None, st.get("metrics") or {})
    if rc == ExitCode.CHECKPOINTED:
        sig = st.get("signal") or (sup.preempted.name if sup.preempted else None)
        return JobOutcome("checkpointed", step, sig, signal_at=sup.preempted_at)
    what = "the supervised trainer" if known_step else f"the supervised command {' '.join(sup.command)}"
    if rc == ExitCode.CRASH_LOOP:  # the job exits 93 too (never requeued): foldhpc.slurm.job.SlurmJob
        from foldhpc.slurm.job import CrashLoop

        raise CrashLoop(st.get("error") or f"{what}: crash loop (exit status {rc})")
    raise RuntimeError(st.get("error") or f"{what} failed (exit status {rc})")


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--local", action="store_true", help="run the job locally (no Slurm), in the background")
    p.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="sweep: one Slurm job array over the cartesian product of all --sweep values, each task "
                        "in its own run directory <run.dir>/<key=value,...> (repeatable; foldhpc.slurm.sweep)")
    p.add_argument("--max-parallel", type=int, default=0, metavar="N",
                   help="with --sweep: at most N tasks run at once (sbatch --array=...%%N; default: all)")


#: how ``foldhpc submit`` is called, for its one-line usage errors
SUBMIT_USAGE = ("foldhpc submit [--config FILE] [--set K=V ...] [--local] [--sweep K=V1,V2 ...] [--max-parallel N] "
                "[-- CMD [ARG ...]]")


def _cmd_submit(args: argparse.Namespace) -> int:
    """``foldhpc submit`` (also ``python -m foldhpc.submit``): the job runs :func:`train_in_job`, or
    with ``-- CMD`` (split off by ``main`` at the first ``--``) that command (:class:`CommandPayload`)."""
    if getattr(args, "child_command", None) is not None:
        return _submit_command(args, list(args.child_command))
    if args.sweep:
        from foldhpc.slurm import sweep

        _load_checked(args.config, args.overrides)
        array_id, sweep_dir, tasks = sweep.submit_sweep(args.config, args.overrides, args.sweep, train_in_job,
                                                        args.max_parallel, local=args.local)
        sweep.print_submitted(array_id, sweep_dir, tasks, args.max_parallel)
        return 0
    if args.max_parallel:
        raise ConfigError("--max-parallel limits the tasks of a sweep: it needs --sweep")
    from foldhpc.slurm.submit import submit

    cfg = _load_checked(args.config, args.overrides)
    job_id = submit(cfg, train_in_job, local=args.local)
    print(f"submitted job {job_id}\nrun directory {cfg.run_dir.resolve()}")
    return 0


def _submit_command(args: argparse.Namespace, command: list[str]) -> int:
    """``foldhpc submit [...] -- CMD``: one job that runs CMD under the supervisor (:class:`CommandPayload`)."""
    if not command:
        raise ConfigError("submit needs the command after '--': foldhpc submit [--config FILE] [--set K=V ...] "
                          "[--local] -- CMD [ARG ...]")
    if args.sweep or args.max_parallel:
        raise ConfigError("--sweep cannot submit a command given after '--' (each task would need its own "
                          "arguments): submit one job per value, e.g. in a shell loop over "
                          "foldhpc submit --set run.dir=runs/v1 -- CMD")
    cwd = Path.cwd()
    check_command(command, cwd)
    cfg = load_config(args.config, args.overrides)
    if cfg.slurm.world_size > 1:
        raise ConfigError(f"submit -- CMD runs the command once, in one task; this config asks for "
                          f"{cfg.slurm.world_size} (slurm.nodes = {cfg.slurm.nodes} x {cfg.slurm.ntasks_per_node} tasks "
                          "per node): set slurm.tasks_per_node = 1 (and slurm.nodes = 1) and let CMD start its "
                          "ranks itself (torchrun, Lightning)")
    check_run_dir(cfg)
    from foldhpc.records.fsio import atomic_write_text, make_private_dir
    from foldhpc.records.layout import COMMAND_FILE, SLURM_DIR
    from foldhpc.slurm.submit import submit

    job_id = submit(cfg, CommandPayload(command, str(cwd)), local=args.local)
    record = cfg.run_dir / SLURM_DIR / COMMAND_FILE  # for people: the job runs the command in its pickle
    try:
        make_private_dir(record.parent)
        atomic_write_text(record, json.dumps({"command": command, "cwd": str(cwd), "job_id": job_id}, indent=1) + "\n",
                          fsync=False)
    except OSError as e:
        log.warning("cannot write %s: %s", record, e.strerror or e)
    print(f"submitted job {job_id}\nrun directory {cfg.run_dir.resolve()}\ncommand {shlex.join(command)}")
    return 0


def _debug_hold_after_train() -> None:
    """Test hook: stay alive ``$FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S`` seconds after training returned,
    so a test can send a late signal to a finished trainer (it must be ignored)."""
    from foldhpc import faults
    from foldhpc.records.envvars import HOLD_AFTER_TRAIN

    hold = faults.seconds(HOLD_AFTER_TRAIN)
    if hold > 0:
        log.warning("FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S: staying alive %.1fs after training", hold)
        time.sleep(hold)


def _cmd_data(args: argparse.Namespace) -> int:
    """``prepare`` re-validates every file and re-seals the dataset manifest (``--shard I/N``:
    one part of a split preparation, merged by a plain ``prepare``); ``info`` reads the sealed
    manifest like a training start does."""
    from foldhpc.data.cache import load_dataset, parse_shard

    cfg = load_config(args.config, args.overrides)
    prepare = args.data_command == "prepare"
    shard = parse_shard(args.shard) if prepare and args.shard else None
    report = load_dataset(cfg.data, run_dir=cfg.run_dir, progress=True, rescan=prepare, shard=shard)
    if args.json:
        print(report.to_json())
    else:
        print(report.format())
    return 0


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    from foldhpc.checkpoint.errors import CheckpointError
    from foldhpc.checkpoint.listing import checkpoint_dir_of, format_table, list_checkpoints

    try:
        rows = list_checkpoints(Path(args.run_dir), verify=args.verify)
    except CheckpointError as e:  # no such run directory, unreadable config: a usage error
        e.exit_code = ExitCode.USAGE  # type: ignore[attr-defined]
        raise
    print(json.dumps(rows, indent=1) if args.json else format_table(rows, checkpoint_dir_of(Path(args.run_dir))))
    return 1 if args.verify and any(r["verified"] is False for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldhpc", description="Train a protein structure model on Slurm without losing work.",
        epilog="Exit codes: 0 ok; 1 failed (a traceback means a bug); 2 user error, one line, nothing started "
               "(usage, config, data path, checkpoint directory, no usable checkpoint, run.dir in use); "
               "75 checkpointed on a preemption signal (requeue); 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('foldhpc').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train in the foreground into run.dir (resumes automatically)",
                       description="Train in the foreground. If run.dir has checkpoints, continue from the newest "
                                   "good one. Exit 75 after saving on a preemption signal.")
    _add_config_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-resume", action="store_true",
                   help="start from step 0 (existing checkpoints are moved aside, not deleted)")
    g.add_argument("--resume", metavar="PATH", help="resume from this checkpoint file")
    p.add_argument("--force-resume", action="store_true",
                   help="resume even if the checkpoint was written with a model, data or train config that "
                        "changes the training trajectory (the differences are listed)")
    p.add_argument("--supervise", action=argparse.BooleanOptionalAction, default=None,
                   help="run the trainer under a supervisor that restarts it after a crash or hang "
                        "(fault.max_restarts times); default: on inside a Slurm job, off otherwise")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N ranks on this machine (torch.distributed, gloo on CPU), for development "
                        "without Slurm; train.batch_size is the global batch. On Slurm, ranks come from srun "
                        "(slurm.nodes, slurm.gpus): see foldhpc submit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("supervise", help="run any command under the supervisor: restarts, signals, exit 75, records",
                       usage=SUPERVISE_USAGE,
                       description="Run CMD (a script foldhpc did not write) under the supervisor: restarted after "
                                   "a crash (fault.max_restarts times, fault.restart_backoff doubling), preemption "
                                   "signals forwarded to it, its exit 75 (checkpointed: hand over / requeue) "
                                   "returned, restarts in jobs.jsonl and events.jsonl, state in status.json of "
                                   "run.dir. Hangs are watched only if CMD beats (a foldhpc.Session does).")
    _add_config_args(p)
    p.add_argument("--max-restarts", type=int, metavar="N", help="same as --set fault.max_restarts=N")
    p.add_argument("stray", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_supervise)

    p = sub.add_parser("data", help="prepare and inspect the structure dataset")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    for name, helptext in (("prepare", "parse structures into the feature cache (parallel)"),
                           ("info", "show counts, length histogram and skipped files")):
        dp = dsub.add_parser(name, help=helptext, description=helptext)
        _add_config_args(dp)
        dp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "prepare":
            dp.add_argument("--shard", metavar="I/N",
                            help="parse only every N-th file starting at I (0 <= I < N), e.g. "
                                 "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT in a Slurm array; "
                                 "then run prepare once without --shard to merge")
        dp.set_defaults(func=_cmd_data)

    from foldhpc import starter

    p = sub.add_parser("init", help="write a commented starter config (presets: tiny, default, gpu, large)",
                       description="Write a starter config with comments (how to get going, every section's "
                                   "keys). The presets are the configs/ of the repository, shipped in the "
                                   "package. An existing FILE is not overwritten without --force.")
    starter.add_arguments(p)
    p.set_defaults(func=starter.run)

    p = sub.add_parser("submit", help="submit the training run (or -- CMD, any command) to Slurm, or run it locally",
                       usage=SUBMIT_USAGE,
                       description="Submit a single-GPU Slurm job that trains, checkpoints on its preemption "
                                   "signal and requeues itself. With -- CMD the job runs that command (a script "
                                   "foldhpc did not write) under the supervisor instead: restarts after a crash "
                                   "(fault.max_restarts), preemption signals forwarded to it, its exit 75 "
                                   "(checkpointed) continued by a requeue or a follow-up job running the same "
                                   "command (slurm.resume), the run lock, jobs.jsonl and status.json of run.dir. "
                                   "Same as python -m foldhpc.submit.")
    _add_submit_args(p)
    p.set_defaults(func=_cmd_submit)

    from foldhpc.monitor import report as status_mod

    p = sub.add_parser("status", help="state of runs and Slurm jobs (sacct + run directories)")
    status_mod.add_arguments(p)
    p.set_defaults(func=status_mod.run)

    from foldhpc.monitor import goodput as goodput_mod, plot as plot_mod  # light: matplotlib/torch load lazily

    p = sub.add_parser("goodput", help="where a run's wall time went: training, recomputed steps, queue, startup, ...",
                       description="Split a run's wall time (first submission or start to now/its end) into "
                                   "productive steps, recomputed steps, queue wait, startup, checkpoint, "
                                   "validation, data wait and idle, from its records; goodput = productive / "
                                   "(wall - queue wait), also per process start and per Slurm job run.")
    goodput_mod.add_arguments(p)
    p.set_defaults(func=goodput_mod.run)

    from foldhpc.monitor import metrics as metrics_mod  # light: prometheus_client, no torch

    p = sub.add_parser("metrics", help="runs' figures in the Prometheus text format (print, --serve, --textfile-dir)",
                       description="The figures of runs (state, step, seconds since the last step and checkpoint, "
                                   "restarts, queue wait, goodput, ...) in the Prometheus text format, from their "
                                   "records: printed, served over HTTP (--serve) or written for node_exporter's "
                                   "textfile collector (--textfile-dir). The metric set is in the README.")
    metrics_mod.add_arguments(p)
    p.set_defaults(func=metrics_mod.run)

    p = sub.add_parser("plot", help="draw a run's timeline (rows per job/restart, step over time) as a PNG",
                       description="Draw the run's timeline: one row per process start or Slurm job run, bars "
                                   "for queue, startup, training, checkpoints, markers for signals, crashes, "
                                   "restarts and requeues, the step over wall time. Needs matplotlib "
                                   "(pip install 'foldhpc[plot]').")
    plot_mod.add_arguments(p)
    p.set_defaults(func=plot_mod.run)

    from foldhpc.chaos import command as chaos_mod  # light: torch and matplotlib load lazily

    p = sub.add_parser("chaos", help="prove recovery: a training under N random faults vs an uninterrupted one",
                       description="Train the config once without faults (the reference), then again under a "
                                   "seeded random schedule of N faults (signals, SIGKILL, exceptions, crashes, "
                                   "hangs, damaged checkpoints, an unwritable checkpoint directory, non-finite "
                                   "steps), restarting it like a requeue; report recovery, steps lost and time "
                                   "to resume per kind. Exit 0 only if every fault was recovered and the final "
                                   "state is bit-exact with the reference.")
    chaos_mod.add_arguments(p)
    p.set_defaults(func=chaos_mod.run)

    p = sub.add_parser("checkpoints", help="list a run's checkpoints (step, age, size, digest)",
                       description="List a run's checkpoints with their state digest; --verify checks every file.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--verify", action="store_true", help="check size, sha256 and loadability of every file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_checkpoints)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Light modules only: every foldhpc process comes through here, and the supervisor, status,
    # goodput, init, submit, ... never need torch (2 s to import); tests/test_imports.py checks it.
    from foldhpc.checkpoint.errors import CheckpointError
    from foldhpc.data.cache import DataError
    from foldhpc.records.logs import setup_logging
    from foldhpc.resilience.runlock import RunDirLocked

    argv = sys.argv[1:] if argv is None else list(argv)
    child: list[str] | None = None  # None: no '--' at all; [] an empty command (a usage error)
    if argv[:1] in (["supervise"], ["submit"]) and "--" in argv:  # the command is the supervised child's, unparsed
        i = argv.index("--")
        argv, child = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.child_command = child
    setup_logging("INFO")
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"foldhpc: config error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except CheckpointError as e:  # exit 2 when raised before training started (see Trainer._run)
        print(f"foldhpc: checkpoint error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))
    except DataError as e:
        print(f"foldhpc: data error: {e}", file=sys.stderr)
        return e.exit_code
    except RunDirLocked as e:  # another trainer holds run.dir: nothing was started or written
        print(f"foldhpc: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("foldhpc: interrupted", file=sys.stderr)
        return 130
