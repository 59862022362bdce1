"""The fault kinds of ``foldhpc chaos``: what each injects and how foldhpc must recover.

Each kind says how the runner treats it, because that decides the cost per fault:

- ``ends_launch``: the whole ``foldhpc train --supervise`` process tree ends (a preemption
  signal, a SIGKILL of the job, a damaged checkpoint found at the next start) and the runner
  starts it again, as Slurm would after a requeue.
- ``hook``: injected through the ``FOLDHPC_FAIL_*`` environment (:mod:`foldhpc.faults`), which
  a process reads once: one such fault per launch, so a second one needs a fresh launch. A hang
  is a hook, not a SIGSTOP from outside, on purpose: the watchdog sends SIGCONT with its stack
  dump request and gives the trainer 3 s to exit, and a trainer stopped from outside resumes
  training meanwhile (here: ~100 steps, past the next planned faults) before it is killed.
- ``restarts``: a trainer process restarts (inside the supervisor or by the runner); its
  time to resume is measured to the first step the new trainer completes.

``STORAGE_SETUP_KINDS`` need something of the machine (a tmpfs mount) that is not everywhere:
where it is missing, ``foldhpc chaos`` leaves the kind out and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindSpec:
    name: str
    summary: str
    ends_launch: bool
    hook: bool
    restarts: bool
    variants: tuple[str, ...] = ("",)
    span: int = 0  # extra steps the handling may take, kept free of the next fault


KINDS: dict[str, KindSpec] = {k.name: k for k in (
    KindSpec("sigusr1", "SIGUSR1 (Slurm's preemption signal): checkpoint at the next step, exit 75, started again "
             "like a requeue; 0 steps lost", ends_launch=True, hook=False, restarts=True),
    KindSpec("sigterm", "SIGTERM (scancel, node shutdown, preemption without a user signal): as SIGUSR1",
             ends_launch=True, hook=False, restarts=True),
    KindSpec("sigkill", "SIGKILL of the whole job at a random moment: started again, resumes from the newest "
             "durable checkpoint (steps lost <= steps since it)", ends_launch=True, hook=False, restarts=True),
    KindSpec("kill_during_write", "SIGKILL of the job while a checkpoint is being written (its temporary file "
             "exists; writes slowed by FOLDHPC_DEBUG_WRITE_DELAY_S): the half-written file is never used and is "
             "removed at the next start", ends_launch=True, hook=False, restarts=True),
    KindSpec("exception", "an exception inside a training step (FOLDHPC_FAIL_KIND=exception): the supervisor "
             "restarts the trainer inside the allocation", ends_launch=False, hook=True, restarts=True),
    KindSpec("crash", "the trainer dies of SIGSEGV or SIGKILL (a library crash, the OOM killer) at a random "
             "moment: the supervisor restarts it inside the allocation", ends_launch=False, hook=False,
             restarts=True, variants=("SIGSEGV", "SIGKILL")),
    KindSpec("hang", "the trainer stops beating after a step (FOLDHPC_FAIL_KIND=stop: SIGSTOP to itself; =hang: "
             "sleeps forever): the supervisor's watchdog dumps its stacks, kills and restarts it", ends_launch=False,
             hook=True, restarts=True, variants=("stop", "hang")),
    KindSpec("corrupt_checkpoint", "the newest checkpoint is damaged while the job is down (bytes flipped, or "
             "truncated): the next start rejects it and resumes from the previous one", ends_launch=True,
             hook=False, restarts=True, variants=("flip", "truncate")),
    KindSpec("unwritable_dir", "the checkpoint directory is unwritable for a while (chmod; chattr +i as root): "
             "saves fail and are logged, training goes on, the next save after it is writable again succeeds",
             ends_launch=False, hook=False, restarts=False, span=40),
    # storage that lies (issue 19): a network file system's lookup cache, a forged file, a stray
    # special file, a full home directory next to free scratch
    KindSpec("missing_file", "the newest checkpoint vanishes for a moment around a restart (an NFS/Lustre lookup "
             "cache miss: renamed away while the job is down, back within 0.3 s of the new trainer choosing what to "
             "resume, before its next save): the restart resumes from the previous good checkpoint (or the newest, "
             "if it saw it back), and the file, once back, is never deleted as bad (only pruned by keep_last later)",
             ends_launch=True, hook=False, restarts=True, span=15),
    KindSpec("crafted_header", "the newest checkpoint's header is replaced, while the job is down, by a crafted "
             "one with a valid crc32 (a negative tensor size, JSON nested 100,000 deep, values of the wrong types): "
             "the next start rejects it without crashing and resumes from the previous good checkpoint",
             ends_launch=True, hook=False, restarts=True,
             variants=("negative_nbytes", "deep_nesting", "wrong_types")),
    KindSpec("fifo", "a FIFO named like a checkpoint, with a step above any real one, appears in the checkpoint "
             "directory of the running job: the next save commits, foldhpc checkpoints --verify and foldhpc status "
             "finish and do not list it, and the next start resumes from the newest real checkpoint (0 steps "
             "lost after its SIGUSR1); nothing ever blocks opening it", ends_launch=True, hook=False,
             restarts=True, span=15),
    KindSpec("full_status_fs", "the file system of the run directory (events.jsonl, train.log, status.json, "
             "TensorBoard; a small tmpfs) is full while the checkpoint directory (checkpoint.dir, elsewhere) has "
             "space: the "
             "trainer goes on without a restart, at least two checkpoints commit while it is full, and once "
             "space is back events.jsonl and status.json are written again; 0 steps lost", ends_launch=False,
             hook=False, restarts=False, span=60),
    KindSpec("dead_rank", "one rank other than 0 of a multi-rank run (--nproc N) is SIGKILLed at a random moment: "
             "the others' next collective fails, the supervisor restarts all ranks together", ends_launch=False,
             hook=False, restarts=True, variants=("SIGKILL",)),
    KindSpec("bitflip", "one bit of a weight flips on rank 1 after a step (FOLDHPC_BITFLIP_AT_STEP, once; --nproc > 1): "
             "the replica check (fault.sdc_check_every) finds the replicas differ, the replay from the checkpoint "
             "before attributes it to rank 1 as transient and the run goes on from the uninterrupted state; nothing "
             "restarts, 0 steps lost", ends_launch=False, hook=True, restarts=False, span=30),
    KindSpec("nan", "a non-finite loss at one step (FOLDHPC_NAN_AT_STEPS): the update is skipped; the reference "
             "run gets the same step, so the end state must still match", ends_launch=False, hook=False,
             restarts=False),
    # --backend slurm: the job is a real Slurm job on the cluster; Slurm and foldhpc's resume mode
    # (slurm.resume) continue it, never the chaos runner (except after a user's scancel, below)
    KindSpec("scancel_signal", "scancel --signal=USR1 (a user's copy of the time-limit/preemption signal): "
             "checkpoint, the job continues in its follow-up job (chain) or is requeued; 0 steps lost",
             ends_launch=True, hook=False, restarts=True),
    KindSpec("whole_job_signal", "scancel --full --signal=USR1 (the signal to the whole job, the batch shell "
             "included, as --signal=B:... plus the steps): the shell lives on, the trainer checkpoints, the job "
             "continues in its follow-up (chain) or is requeued; 0 steps lost", ends_launch=True, hook=False,
             restarts=True),
    KindSpec("preempt", "a real partition preemption (a high-priority job that needs the node): USR1 during "
             "GraceTime, checkpoint, follow-up/requeue once the node is free; 0 steps lost", ends_launch=True,
             hook=False, restarts=True),
    KindSpec("requeue", "scontrol requeue of the running job (an admin): SIGTERM, checkpoint, Slurm runs the same "
             "job again; 0 steps lost", ends_launch=True, hook=False, restarts=True),
    KindSpec("bad_node", "the job's node goes bad and the trainer crashes (SIGKILL): the supervisor's health check "
             "before its restart fails there (health.command, which the runner points at a marker file per node), "
             "the job hands over excluding that node and the run resumes on another one from the newest durable "
             "checkpoint (steps lost <= steps since it)", ends_launch=True, hook=False, restarts=True),
    KindSpec("node_down", "the job's node dies: its processes stop and are SIGKILLed, the node is set DOWN (then "
             "DRAINed to keep it out, RESUMEd once the run trains elsewhere or after 30 s); Slurm requeues the job "
             "(NODE_FAIL, --requeue) and the run resumes by itself from the newest durable checkpoint (steps lost "
             "<= steps since it)", ends_launch=True, hook=False, restarts=True),
    KindSpec("scancel", "plain scancel (the user stops the run): checkpoint on SIGTERM, and NO follow-up or requeue "
             "may start; the runner then resubmits (foldhpc submit) like the user would: 0 steps lost",
             ends_launch=True, hook=False, restarts=True),
)}

MULTI_RANK_KINDS: tuple[str, ...] = ("dead_rank", "bitflip")  # only with --nproc > 1
STORAGE_SETUP_KINDS: tuple[str, ...] = ("full_status_fs",)  # a tmpfs for the run directory: root only
FALLBACK_KINDS: tuple[str, ...] = ("corrupt_checkpoint", "crafted_header", "missing_file")  # keep_last >= 2
SLURM_KINDS: tuple[str, ...] = ("scancel_signal", "whole_job_signal", "preempt", "requeue", "scancel",
                                 "crash", "bad_node", "node_down")  # --backend slurm
DEFAULT_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k not in MULTI_RANK_KINDS and
                                       (k == "crash" or k not in SLURM_KINDS))


def kinds_for(backend: str) -> tuple[str, ...]:
    """The kinds a backend can inject (the default set of ``--kinds``)."""
    return SLURM_KINDS if backend == "slurm" else DEFAULT_KINDS


def uses_hook(kind: str) -> bool:
    """Whether this fault is injected through the launch's ``FOLDHPC_FAIL_*`` environment."""
    return KINDS[kind].hook
