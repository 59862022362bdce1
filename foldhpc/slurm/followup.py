"""Follow-up jobs: when Slurm will not requeue a job, the run continues in a new job.

``scontrol requeue`` is refused where the job may not be requeued: ``Requeue=0`` (a cluster with
``JobRequeue=0`` and a job submitted without ``--requeue``, a job submitted with ``--no-requeue``,
or changed with ``scontrol update JobId=N Requeue=0``), or where users may not requeue. Then the
job that has just saved its checkpoint submits its successor -- same run directory, same
resources, ``--dependency=afterany:<this job>`` -- and exits; the successor starts as soon as this
job has ended (measured on the local cluster: within a second; no requeue hold) and resumes from
the newest checkpoint. The jobs of one run form a *chain*:

* ``jobs.jsonl`` gets ``{"event": "followup", "job_id": <this>, "followup_job_id": <next>,
  "chain_restarts": N}`` and the successor's own ``"submitted"`` event with ``followup_of``;
  ``foldhpc status`` shows the chain as one run (the newest job, restarts over the whole chain);
* ``slurm.max_requeues`` counts across the chain: a job's restarts are its own Slurm restarts
  plus ``chain_restarts`` of the ``followup`` event that created it (:func:`chain_restarts`);
* a job that is being cancelled (``scancel``) never gets a successor: the requeue decision sees
  ``COMPLETING``/``CANCELLED`` first, and a cancel that lands while the successor is being
  submitted is caught by a last look at the job after the submission, which cancels the successor
  (``afterany`` would otherwise start it: Slurm treats a cancelled predecessor as "ended");
* two ways to submit, like the first submission: the submitit path goes through
  :func:`foldhpc.slurm.submit.submit` (:class:`foldhpc.slurm.submit.SubmititFollowUp`: the same
  executor and job payload, resources from the config), the sbatch
  path re-submits the batch script itself with the job's own resources read from
  ``scontrol show job`` and the trainer's arguments without ``--no-resume``/``--resume PATH``
  (those were for the first job only).

The successor is submitted from inside the job, so the job's own Slurm variables are removed from
its environment (``SLURM_RESTART_COUNT`` of a requeued job would otherwise leak into the new job),
and so are foldhpc's per-process ones (supervisor, heartbeat, ready file).

:class:`FollowUp` is what :func:`foldhpc.slurm.requeue.maybe_requeue` needs: ``submit(after)``.
This module is the bottom of ``foldhpc.slurm`` (requeue, job, submit and sweep import it, it
imports none of them); what slurmctld says of a job comes from :mod:`foldhpc.cluster.sacct`.
The "chain" resume mode (``slurm.resume = "chain"``: a follow-up at every signal instead of a
requeue, :func:`foldhpc.slurm.requeue.maybe_requeue`) uses the same object, and so does a job
that a preemption cancels (PreemptMode=CANCEL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from foldhpc.cluster.command import CALL_TIMEOUT_S, SlurmCommandError, run_command
from foldhpc.cluster.nodes import merge_exclude
from foldhpc.cluster.sacct import ctl_state as _scontrol_state, scontrol_job
from foldhpc.records.envvars import PROCESS_VARS
from foldhpc.records.layout import CONFIG_FILE
from foldhpc.records.history import FollowedUp, FollowupCancelled, Submitted, or_absent, read_history, write_event
from foldhpc.records.notify import HANDED_OVER, notify

log = logging.getLogger(__name__)

FOLLOWUP_EVENT = FollowedUp.EVENT
#: states of the predecessor, seen after the successor was submitted, that mean "no successor":
#: it is being cancelled, or Slurm requeued it after all (a late answer to a failed requeue)
_NO_SUCCESSOR_STATES = frozenset({"COMPLETING", "CANCELLED", "PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
SUBMIT_TIMEOUT_S = 30.0
#: the job's own variables, not to be passed to its successor (SLURM_CONF is the cluster's, kept)
_KEEP_SLURM = frozenset({"SLURM_CONF"})
#: trainer arguments that apply to a run's first job only
_FIRST_JOB_ONLY = ("--no-resume",)
_FIRST_JOB_ONLY_WITH_VALUE = ("--resume",)


class FollowUp(Protocol):
    run_dir: Path

    def submit(self, after: str, **record: Any) -> str:
        """Submit the successor of job ``after`` (dependency ``afterany:after``); its job id.
        ``record``: fields for its "submitted" event in jobs.jsonl; ``exclude`` (a tuple of node
        names, passed only where there are bad nodes) the nodes the successor must not run on."""
        ...


# ------------------------------------------------------------------ the chain in jobs.jsonl
def chain_restarts(run_dir: Path, job_id: str | None) -> int:
    """Restarts the chain had used when ``job_id`` was submitted as a follow-up (0 for a job that
    is not one, e.g. the chain's first).

    Two lines say it: the predecessor's ``followup`` event and the successor's own ``submitted``
    event (``followup_of``, ``chain_restarts``); either is enough, so one damaged line of
    jobs.jsonl cannot reset the count to 0 and let ``slurm.max_requeues`` no longer bound the chain.
    """
    if not job_id:
        return 0
    try:
        events = read_history(run_dir)[0]
    except OSError:
        return 0
    for e in reversed(events):
        link = (e.get("event") == FOLLOWUP_EVENT and str(e.get("followup_job_id")) == str(job_id)) or (
            e.get("event") == "submitted" and str(e.get("job_id")) == str(job_id) and e.get("followup_of"))
        if link and e.get("chain_restarts") is not None:
            try:
                return int(e["chain_restarts"])
            except (TypeError, ValueError, OverflowError):
                continue
    return 0


def chain_of(events: list[dict[str, Any]], job_id: str) -> list[str]:
    """The job ids of ``job_id``'s chain up to it, oldest first (``[job_id]`` if it is no follow-up)."""
    parent = {str(e["followup_job_id"]): str(e.get("job_id")) for e in events
              if e.get("event") == FOLLOWUP_EVENT and e.get("followup_job_id") and e.get("job_id")}
    chain = [str(job_id)]
    while chain[0] in parent and parent[chain[0]] not in chain:
        chain.insert(0, parent[chain[0]])
    return chain


# ------------------------------------------------------------------ environment
def successor_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to submit a successor from inside a job: without the job's SLURM_* variables
    and foldhpc's per-process ones."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items()
            if not (k.startswith("SLURM_") and k not in _KEEP_SLURM) and k not in PROCESS_VARS}


@contextlib.contextmanager
def successor_environ() -> Iterator[None]:
    """``os.environ`` is :func:`successor_env` for the duration: submitit runs ``sbatch`` with the
    process environment (the submitit path's successor, :class:`foldhpc.slurm.submit.SubmititFollowUp`)."""
    with _environ(successor_env()):
        yield


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` replaced for the duration (submitit runs ``sbatch`` with the process environment)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------ sbatch path
def first_job_args_removed(args: list[str]) -> list[str]:
    """The trainer's arguments without ``--no-resume`` / ``--resume PATH`` (first job only)."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in _FIRST_JOB_ONLY:
            continue
        if a in _FIRST_JOB_ONLY_WITH_VALUE:
            skip = True
            continue
        if any(a.startswith(f"{o}=") for o in _FIRST_JOB_ONLY_WITH_VALUE):
            continue
        out.append(a)
    return out


def _gres_options(value: str, per: str) -> list[str]:
    """``TresPerJob=gres:gpu:1`` -> ``--gpus=1``; ``TresPerNode=gres:gpu:2`` -> ``--gres=gpu:2``."""
    opts: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item.startswith("gres:") and not item.startswith("gres/"):
            continue
        spec = item[5:]
        name, _, count = spec.partition(":")
        if per == "node":
            opts.append(f"--gres={spec}")
        elif name == "gpu" and count:
            opts.append(f"--gpus-per-task={count}" if per == "task" else f"--gpus={count}")
    return opts


def output_pattern(path: str, job_ids: set[str]) -> str:
    """sbatch's ``--output``/``--error`` pattern for a successor, from its predecessor's file name
    as ``scontrol`` shows it (``StdOut=/scratch/run7/slurm-7.out`` for ``slurm-%j.out``).

    The job id becomes ``%j`` only in the file name (the last path component), and only where it
    stands alone, not inside a longer number: ``/scratch/run7/slurm-7.out`` -> ``/scratch/run7/
    slurm-%j.out``, ``/x/7-17.out`` of job 17 -> ``/x/7-%j.out``, ``308_0_log.out`` (submitit)
    -> ``%j_0_log.out``. A directory keeps its name even if it was made from a pattern: it
    exists (the predecessor wrote there), a new one per job might not, and Slurm fails a job
    whose output file cannot be opened. ``job_ids``: the ids the job is known by (``123``, and
    for an array task also ``ARRAY_TASK``: the successor is a plain job whose ``%j`` is its own).

    Measured on 22.05.8: scontrol expands ``%j``, ``%x``, ``%u`` and leaves ``%N``, ``%5j`` and
    ``%%`` as they were given, so a ``%`` still in the path is a pattern and is kept as it is.
    """
    head, sep, name = path.rpartition("/")
    for jid in sorted((j for j in job_ids if j), key=len, reverse=True):
        name = re.sub(rf"(?<![0-9]){re.escape(jid)}(?![0-9])", "%j", name)
    return head + sep + name


def sbatch_options(info: dict[str, str], job_id: str) -> list[str]:
    """sbatch options that ask for what job ``job_id`` (its ``scontrol show job`` record) got.

    The batch script's own ``#SBATCH`` lines are read again by sbatch; these repeat what the
    command line may have changed: partition, time, nodes, tasks, CPUs, memory, GPUs/GRES,
    account, QOS, constraint, reservation, name, output files (the job id in their file names
    becomes ``%j`` again: :func:`output_pattern`), working directory, requeue flag. ``info`` is
    best read from scontrol's multi-line format, where paths with spaces are whole
    (:func:`foldhpc.cluster.sacct.parse_scontrol`); each option is one argument, never split.
    """
    def val(key: str) -> str | None:
        v = info.get(key)
        return None if v in (None, "", "(null)", "N/A", "None") else v

    opts: list[str] = []
    for key, opt in (("Partition", "partition"), ("Account", "account"), ("QOS", "qos"),
                     ("Reservation", "reservation"), ("JobName", "job-name"), ("WorkDir", "chdir")):
        if val(key):
            opts.append(f"--{opt}={val(key)}")
    if val("TimeLimit") and val("TimeLimit") != "UNLIMITED":
        opts.append(f"--time={val('TimeLimit')}")
    nodes = val("NumNodes")
    if nodes and re.fullmatch(r"\d+(-\d+)?", nodes):
        opts.append(f"--nodes={nodes}")
    tasks = val("NumTasks")
    if tasks and tasks.isdigit():
        opts.append(f"--ntasks={tasks}")
    cpt = val("CPUs/Task")
    if cpt and cpt.isdigit():
        opts.append(f"--cpus-per-task={cpt}")
    if val("MinMemoryNode") and val("MinMemoryNode") != "0":
        opts.append(f"--mem={val('MinMemoryNode')}")
    elif val("MinMemoryCPU"):
        opts.append(f"--mem-per-cpu={val('MinMemoryCPU')}")
    for key, per in (("TresPerJob", "job"), ("TresPerNode", "node"), ("TresPerTask", "task")):
        if val(key):
            opts += _gres_options(val(key) or "", per)
    if val("Features"):
        opts.append(f"--constraint={val('Features')}")
    ids = {job_id, info.get("JobId", "")}
    if info.get("ArrayJobId") and info.get("ArrayTaskId"):
        ids.add(f"{info['ArrayJobId']}_{info['ArrayTaskId']}")
    out, err = val("StdOut"), val("StdErr")
    if out:
        opts.append(f"--output={output_pattern(out, ids)}")
    if err and err != out:
        opts.append(f"--error={output_pattern(err, ids)}")
    if info.get("Requeue") in ("0", "1"):
        opts.append("--requeue" if info["Requeue"] == "1" else "--no-requeue")
    return opts


class SbatchFollowUp:
    """The successor of a batch-script job: the same script (``script``, e.g. the template's ``$0``,
    the job's spooled copy) with ``script_args`` (minus first-job-only trainer options) and the job's
    own resources."""

    def __init__(self, run_dir: Path, script: str | Path, script_args: list[str]) -> None:
        self.run_dir = Path(run_dir)
        self.script = str(script)
        self.script_args = first_job_args_removed(list(script_args))

    def command(self, after: str, info: dict[str, str], exclude: tuple[str, ...] = ()) -> list[str]:
        """``exclude``: bad nodes the successor must avoid, added to the job's own ``ExcNodeList``."""
        value = merge_exclude(info.get("ExcNodeList"), ",".join(exclude))
        return ["sbatch", "--parsable", f"--dependency=afterany:{after}", *sbatch_options(info, after),
                *([f"--exclude={value}"] if value else []), self.script, *self.script_args]

    def submit(self, after: str, exclude: tuple[str, ...] = (), **record: Any) -> str:
        try:
            # the multi-line record: each path (WorkDir, StdOut, ...) ends with its line
            info = scontrol_job(after, SUBMIT_TIMEOUT_S, oneliner=False)
        except SlurmCommandError as e:
            raise SlurmCommandError(f"cannot read job {after}'s resources: {e}") from None
        if not info:
            raise SlurmCommandError(f"scontrol does not know job {after}: cannot copy its resources")
        cmd = self.command(after, info, exclude)
        log.info("submitting the follow-up job: %s", " ".join(cmd))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S,
                               stdin=subprocess.DEVNULL, env=successor_env())
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlurmCommandError(f"sbatch: {e}") from None
        if p.returncode != 0:
            raise SlurmCommandError(f"sbatch exited with {p.returncode}: {' '.join((p.stderr or p.stdout).split())}")
        new = p.stdout.strip().split(";")[0]
        if not new:
            raise SlurmCommandError(f"sbatch printed no job id: {p.stdout!r}")
        write_event(self.run_dir, Submitted(job_id=new, backend="slurm", partition=info.get("Partition", ""),
                                            **record))
        return new


# ------------------------------------------------------------------ the hand-over
def hand_over(followup: FollowUp, job_id: str, chain_restarts_now: int, why: str,
              ctl_state: Any = None, last_look: bool = True, step: int | None = None,
              exclude: tuple[str, ...] = ()) -> str:
    """Submit ``job_id``'s successor, record the link, and cancel the successor again if
    ``job_id`` is being cancelled meanwhile. Returns the successor's id; raises SlurmCommandError
    (or OSError) if it could not be submitted.

    ``chain_restarts_now``: restarts the chain has used before this one (the successor's
    ``chain_restarts`` is one more). ``ctl_state(job_id)`` -> JobState or None (slurmctld's view;
    default: :func:`foldhpc.cluster.sacct.ctl_state` asks ``scontrol``). SIGTERM is held off meanwhile: an
    ``scancel`` must not kill this process between "submitted" and "recorded" (Slurm's SIGKILL
    after KillWait still ends it). ``last_look=False`` skips that look: for a job that a preemption
    is cancelling (PreemptMode=CANCEL), COMPLETING is expected and the successor is the point.
    ``step``: the step ``job_id`` checkpointed at, recorded in the "followup" event (how
    :func:`foldhpc.slurm.requeue.no_progress` sees a chain that makes none). ``exclude``: the bad
    nodes the successor must avoid (``--exclude``; :mod:`foldhpc.cluster.nodes`).
    """
    if ctl_state is None:
        def ctl_state(j: str) -> str | None:
            return _scontrol_state(j, CALL_TIMEOUT_S)

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        total = chain_restarts_now + 1
        new = followup.submit(job_id, followup_of=job_id, chain_restarts=total,
                              **({"exclude": tuple(exclude)} if exclude else {}))
        write_event(followup.run_dir, FollowedUp(
            job_id=job_id, followup_job_id=new, chain_restarts=total,
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), reason=why, step=or_absent(step)))
        log.warning("submitted follow-up job %s (afterany:%s) for run directory %s: %s", new, job_id,
                    followup.run_dir, why)
        notify(followup.run_dir, HANDED_OVER, command=_on_state_change(followup.run_dir), step=step, job_id=job_id,
               reason=f"follow-up job {new}: {why}")
        state = (ctl_state(job_id) or "").split(" ")[0].upper() if last_look else ""
        if state in _NO_SUCCESSOR_STATES:
            log.warning("job %s is %s (cancelled, or requeued after all, while its follow-up was submitted): "
                        "cancelling follow-up job %s", job_id, state, new)
            try:
                run_command(["scancel", new], timeout=SUBMIT_TIMEOUT_S)
            except SlurmCommandError as e:
                log.error("could not cancel follow-up job %s: %s (scancel it)", new, e)
            write_event(followup.run_dir, FollowupCancelled(
                job_id=new, followup_of=job_id, reason=f"job {job_id} was {state} once its follow-up had been submitted"))
        return new
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _on_state_change(run_dir: Path) -> str:
    """``monitor.on_state_change`` of the run's config.toml (the resolved config of its latest start:
    a follow-up is handed over by a process that may hold no config), "" if there is none."""
    from foldhpc.config import ConfigError, load_config

    path = Path(run_dir) / CONFIG_FILE
    try:
        return load_config(path).monitor.on_state_change if path.is_file() else ""
    except (ConfigError, OSError, ValueError):
        return ""
