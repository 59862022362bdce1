"""Typed run configuration: TOML files + ``--set section.key=value`` overrides.

Every key is declared in a dataclass below, so an unknown key, a wrong type or an
out-of-range value is rejected by :func:`load_config` *before* any data is read or any
job is submitted.  The key names (``data.path``, ``train.max_steps``, ``train.seed``,
``train.batch_size``, ``checkpoint.interval``, ``run.dir`` ...) are a public interface.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import signal
import sys
import unicodedata
from foldhpc.records.layout import CHECKPOINT_DIR
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


# ---- bounds of the numeric keys (issue 19 item 11): a value beyond them is a typo or an attack, and
# would pass the lower-bound checks only to crash (OverflowError, "Maximum allowed dimension
# exceeded") or allocate without end after the run directory was written.
#: every integer key: fits the int64 that torch, numpy and the checkpoint's tensors hold
MAX_INT = 2**63 - 1
#: seeds: torch.manual_seed takes < 2**64, numpy's SeedSequence any size; int64 for both
MAX_SEED = MAX_INT
#: step counts (max_steps, warmup, intervals in steps): 10^12 steps is beyond any training run
MAX_STEPS = 10**12
#: residues per chain (data.min_length/max_length): the longest chains in the PDB have ~35,000
MAX_RESIDUES = 100_000
#: data.crop_size and model.max_relpos: arrays of crop x crop x d_pair per sample are allocated up
#: front (AlphaFold crops at 256-384); 4096 already needs ~2 GiB per sample and channel group
MAX_CROP = 4096
#: train.batch_size (global, all ranks)
MAX_BATCH = 65_536
#: model widths (d_single, d_pair) and depth (n_blocks, n_heads, n_bins)
MAX_WIDTH = 65_536
MAX_DEPTH = 4096
#: threads and processes of one kind on one machine (train.threads, data.*_workers, slurm.cpus_per_task)
MAX_PROCESSES = 1024
#: Slurm resources of one job
MAX_NODES = 100_000
MAX_GPUS_PER_NODE = 64
#: restarts and requeues (slurm.max_requeues, fault.max_restarts, fault.nonfinite_rollback, keep_last)
MAX_RETRIES = 100_000
#: every duration key ("15m", "4h", ...): a year; longer is a typo (and overflows timedelta/minutes)
MAX_DURATION_S = 366 * 86400.0


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``"15m"``, ``"30s"``, ``"1h30m"``, ``"0"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _DURATION_RE.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"{value!r} is not a duration; use e.g. \"30s\", \"15m\", \"1h\", \"1h30m\" or seconds"
                )
    if seconds < 0:
        raise ValueError(f"duration {value!r} is negative")
    if not seconds <= MAX_DURATION_S:  # also inf and nan
        raise ValueError(f"duration {value!r} is longer than {MAX_DURATION_S / 86400:.0f} days")
    return seconds


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _at_most(obj: Any, hi: int, *names: str, why: str = "") -> None:
    """Upper bounds of integer keys (their lower bounds have their own messages)."""
    for name in names:
        _check(getattr(obj, name) <= hi, f"{name} must be <= {hi:,}{why}")


@dataclass
class RunConfig:
    """Where a run lives and how chatty it is."""

    dir: str = "runs/default"
    name: str = ""
    log_every: int = 10  # steps between progress lines / TensorBoard scalars
    log_level: str = "INFO"

    def validate(self) -> None:
        _check(bool(self.dir.strip()), "dir must not be empty")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _at_most(self, MAX_STEPS, "log_every")
        _check(self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
               "log_level must be one of DEBUG, INFO, WARNING, ERROR")


@dataclass
class DataConfig:
    """Which structures to train on and how to crop them."""

    path: str = "examples/data"
    cache_dir: str = ""  # default: <data.path>/.foldhpc-cache (falls back to <run.dir>/cache if unwritable)
    min_length: int = 40
    max_length: int = 1000
    min_completeness: float = 0.9  # share of residues with N, CA and C
    crop_size: int = 64
    val_fraction: float = 0.1
    split_seed: int = 0
    # DataLoader workers; 0 = build batches in the training process. Batches come from the
    # in-memory feature cache (~0.1 ms each), so a worker's IPC costs more than it hides
    # (benchmarks/bench_data.py: data wait 1.7% of step time with 1 worker, 0.3% with 0).
    num_workers: int = 0
    prepare_workers: int = 0  # processes that parse structures; 0 = one per CPU

    def validate(self) -> None:
        _check(bool(self.path.strip()), "path must not be empty")
        _check(self.min_length >= 2, "min_length must be >= 2")
        _check(self.max_length >= self.min_length, "max_length must be >= min_length")
        _check(0.0 < self.min_completeness <= 1.0, "min_completeness must be in (0, 1]")
        _check(self.crop_size >= 8, "crop_size must be >= 8")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction must be in (0, 1)")
        _check(self.num_workers >= 0, "num_workers must be >= 0")
        _check(self.prepare_workers >= 0, "prepare_workers must be >= 0")
        _at_most(self, MAX_RESIDUES, "min_length", "max_length", why=" residues")
        _at_most(self, MAX_CROP, "crop_size", why=" (the batch arrays are crop_size x crop_size per sample)")
        _at_most(self, MAX_PROCESSES, "num_workers", "prepare_workers")
        _check(0 <= self.split_seed <= MAX_SEED, f"split_seed must be in 0..{MAX_SEED}")


@dataclass
class ModelConfig:
    """Size of the structure model (an Evoformer-style single + pair trunk)."""

    d_single: int = 64
    d_pair: int = 32
    n_blocks: int = 2
    n_heads: int = 4
    n_bins: int = 64  # distogram bins, 2-22 Angstrom
    max_relpos: int = 32
    dropout: float = 0.0

    def validate(self) -> None:
        for name in ("d_single", "d_pair", "n_blocks", "n_heads"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1")
        _check(self.d_single % self.n_heads == 0, "d_single must be divisible by n_heads")
        _check(self.n_bins >= 2, "n_bins must be >= 2")
        _check(self.max_relpos >= 1, "max_relpos must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        _at_most(self, MAX_WIDTH, "d_single", "d_pair")
        _at_most(self, MAX_DEPTH, "n_blocks", "n_heads", "n_bins")
        _at_most(self, MAX_CROP, "max_relpos", why=" (the pair features are one-hot over 2 x max_relpos + 1)")


@dataclass
class TrainConfig:
    """Optimisation, validation and reproducibility."""

    max_steps: int = 1000
    seed: int = 0
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    val_every: int = 100  # steps between validations; 0 = only at the end
    val_max_samples: int = 0  # 0 = whole validation split
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast, CUDA only
    compile: bool = False  # torch.compile, CUDA only
    threads: int = 0  # torch intra-op threads; 0 = torch default

    def validate(self) -> None:
        _check(self.max_steps >= 1, "max_steps must be >= 1")
        _check(self.seed >= 0, "seed must be >= 0")
        _check(self.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED} (2**63-1: torch and numpy take it)")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")
        _check(self.val_every >= 0, "val_every must be >= 0")
        _check(self.val_max_samples >= 0, "val_max_samples must be >= 0")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               "device must be auto, cpu, cuda or cuda:N")
        _check(self.threads >= 0, "threads must be >= 0")
        _at_most(self, MAX_STEPS, "max_steps", "warmup_steps", "val_every")
        _at_most(self, MAX_BATCH, "batch_size")
        _at_most(self, MAX_INT, "val_max_samples")
        _at_most(self, MAX_PROCESSES, "threads")


_KNOWN_SIGNALS = {"SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP", "SIGXCPU"}


@dataclass
class CheckpointConfig:
    """When and where training state is saved."""

    interval: str = "15m"  # wall-clock time between saves; "0" disables timed saves
    every_steps: int = 0  # also save every N steps; 0 = off
    keep_last: int = 3
    dir: str = ""  # default: <run.dir>/checkpoints
    async_save: bool = True
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    min_free_mb: int = 0  # preflight: required free space; 0 = 3x the estimated checkpoint size

    @property
    def interval_s(self) -> float:
        return parse_duration(self.interval)

    def validate(self) -> None:
        try:
            parse_duration(self.interval)
        except ValueError as e:
            raise ValueError(f"interval: {e}") from None
        _check(self.every_steps >= 0, "every_steps must be >= 0")
        _check(self.keep_last >= 1, "keep_last must be >= 1 (the newest good checkpoint is always kept)")
        _check(self.min_free_mb >= 0, "min_free_mb must be >= 0")
        _at_most(self, MAX_STEPS, "every_steps")
        _at_most(self, MAX_RETRIES, "keep_last")
        for s in self.signals:
            _check(s.upper() in _KNOWN_SIGNALS,
                   f"signals: {s!r} is not one of {sorted(_KNOWN_SIGNALS)}")

    def signal_numbers(self) -> list[signal.Signals]:
        return [signal.Signals[s.upper()] for s in self.signals]


#: ``slurm.resume``: how a job that checkpointed on a signal continues (foldhpc.slurm.requeue)
RESUME_MODES = ("chain", "requeue")


@dataclass
class SlurmConfig:
    """Resources and behaviour of the Slurm job (``foldhpc submit``)."""

    partition: str = ""
    nodes: int = 1
    gpus: int = 1  # GPUs per node; one training process (task, rank) per GPU
    tasks_per_node: int = 0  # ranks per node; 0 = one per GPU (one if gpus = 0)
    cpus_per_task: int = 2
    mem: str = "8G"
    time: str = "4h"  # job time limit
    account: str = ""
    qos: str = ""
    constraint: str = ""
    job_name: str = "foldhpc"
    signal: str = "USR1"  # sent before the time limit / on preemption
    signal_lead: str = "120s"  # how long before the time limit the signal arrives
    max_requeues: int = 20  # time-limit/preemption requeues before giving up (counted across a chain)
    #: how a signalled job continues: "chain" submits a follow-up job (afterany on this one) and exits,
    #: resuming seconds after it ends on any Slurm; "requeue" = scontrol requeue (one job id, but
    #: Slurm holds a requeued job ~2 minutes with its default settings). See README "Resume modes".
    resume: str = "chain"
    extra_sbatch: dict[str, str] = field(default_factory=dict)
    logs_dir: str = ""  # default: <run.dir>/slurm

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def validate(self) -> None:
        _check(self.nodes >= 1, "nodes must be >= 1")
        _check(self.gpus >= 0, "gpus must be >= 0")
        _check(self.tasks_per_node >= 0, "tasks_per_node must be >= 0 (0 = one per GPU)")
        _check(self.cpus_per_task >= 1, "cpus_per_task must be >= 1")
        _check(re.fullmatch(r"\d+[KMGT]?", self.mem) is not None, "mem must look like 8G, 16000M or 4096")
        for key in ("time", "signal_lead"):
            try:
                parse_duration(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        _check(("SIG" + self.signal.upper().removeprefix("SIG")) in _KNOWN_SIGNALS,
               f"signal must be one of {sorted(s[3:] for s in _KNOWN_SIGNALS)}")
        _check(self.max_requeues >= 0, "max_requeues must be >= 0")
        _at_most(self, MAX_NODES, "nodes")
        _at_most(self, MAX_GPUS_PER_NODE, "gpus", why=" per node")
        _at_most(self, MAX_PROCESSES, "tasks_per_node", "cpus_per_task")
        _at_most(self, MAX_RETRIES, "max_requeues")
        _check(self.resume in RESUME_MODES, f"resume must be one of {', '.join(RESUME_MODES)}")
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.job_name) is not None,
               "job_name may contain only letters, digits, '_', '.', '-'")


@dataclass
class DistributedConfig:
    """More than one training process (``torch.distributed``; see foldhpc.distributed)."""

    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # Longest a rank waits for the others in a collective (rendezvous, stop agreement, DDP's
    # gradient exchange, rank 0 writing the signal checkpoint) before the run fails. A rank that
    # dies is noticed at once on gloo; this bounds a rank that hangs. Keep it above a blocking
    # checkpoint write and a validation pass (rank 0 validates while the others wait).
    timeout: str = "10m"

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)

    def validate(self) -> None:
        _check(self.backend in {"auto", "nccl", "gloo"}, "backend must be auto, nccl or gloo")
        try:
            t = parse_duration(self.timeout)
        except ValueError as e:
            raise ValueError(f"timeout: {e}") from None
        _check(t >= 1, "timeout must be at least 1s")


@dataclass
class FaultConfig:
    """What happens when training fails in a way that is not a preemption (foldhpc.resilience)."""

    # In-allocation restarts: a trainer that crashes (exception, SIGSEGV, SIGKILL by the OOM
    # killer, a hang) is restarted from the newest good checkpoint at once, up to this many
    # times per job; 0 runs the trainer without a supervisor. The same step failing twice in a
    # row is deterministic: no more restarts.
    max_restarts: int = 3
    restart_backoff: str = "2s"  # wait before a restart (doubles each time)
    # Hang watchdog: no heartbeat (steps, validation batches, checkpoint writes) for this long
    # kills the trainer (after dumping its stacks) and restarts it. "auto" = the larger of
    # hang_floor and 20 x the median step time; "0" = off.
    hang_timeout: str = "auto"
    hang_floor: str = "2m"
    startup_timeout: str = "30m"  # before the first step: imports, data, checkpoint load
    # Non-finite guard: a step whose loss or gradient norm is not finite is skipped; after this
    # many in a row, training rolls back to the newest good checkpoint.
    nonfinite_rollback: int = 3
    # Silent data corruption (foldhpc.train.sdc, docs/sdc.md): every sdc_check_every steps the
    # data-parallel replicas compare a digest of their weights and optimizer state (0 = off); a
    # mismatch, a loss above loss_spike_factor x the maximum of the previous 50 steps' losses
    # (0 = off) or, with sdc_on_nonfinite, a skipped non-finite step is attributed by a bit-exact
    # replay from the newest checkpoint before it (transient / deterministic / a rank and its node).
    sdc_check_every: int = 50
    loss_spike_factor: float = 0.0
    sdc_on_nonfinite: bool = False
    # Stragglers: a rank whose compute time per step (its step time less the time it waits in
    # collectives) is above straggler_factor x the other ranks' median, in 2 consecutive windows of
    # straggler_window steps, is named with its node (status, events, TensorBoard).
    straggler_factor: float = 1.5
    straggler_window: int = 20
    # One writer per run directory (foldhpc.resilience.runlock): a lock whose holder shows no sign
    # of life for this long (heartbeat) is taken over; "0" = never by age alone (a dead pid on the
    # same host, an ended Slurm job or a requeue of the same job still are). Keep it at minutes
    # on NFS (attribute caching can age a heartbeat by up to a minute).
    lock_stale_after: str = "5m"
    # Where crashes come from (foldhpc.resilience.supervisor; docs/nodes.md has the whole rule set).
    # Checked at each failure, in this order, after "deterministic" (the same step and cause twice:
    # a bug, exit 1) and never for a preemption:
    # node_crash_limit: this many trainer failures on one node since the run's newest checkpoint
    # (no checkpoint progress) blame the node: the job hands over to a job that excludes it, as
    # after a failed health check (exit 75, then --exclude); 0 = never blame a node for crashes.
    node_crash_limit: int = 2
    # crash_loop_restarts: this many in-job restarts without a new checkpoint end the run as a crash
    # loop (exit 93, state "crash_loop", never requeued); 0 = off (fault.max_restarts still bounds
    # restarts with or without progress, exit 1).
    crash_loop_restarts: int = 3
    # crash_loop_jobs: this many jobs in a row of the chain without a new checkpoint (whatever ended
    # them: a signal before the first step, a bad node, crashes) stop the chain as a crash loop
    # (exit 93, never requeued); this is the chain's "no_progress" stop, now configurable (it was 3).
    crash_loop_jobs: int = 3

    def validate(self) -> None:
        _check(self.max_restarts >= 0, "max_restarts must be >= 0 (0 disables in-job restarts)")
        _check(self.nonfinite_rollback >= 1, "nonfinite_rollback must be >= 1")
        _check(self.sdc_check_every >= 0, "sdc_check_every must be >= 0 (0 turns the replica check off)")
        _check(self.loss_spike_factor == 0 or self.loss_spike_factor > 1,
               "loss_spike_factor must be 0 (off) or > 1 (a factor of the recent maximum loss)")
        _check(self.straggler_factor > 1, "straggler_factor must be > 1 (a factor of the median compute time)")
        _check(self.straggler_window >= 2, "straggler_window must be >= 2 steps")
        _check(self.node_crash_limit >= 0, "node_crash_limit must be >= 0 (0: crashes never blame a node)")
        _check(self.crash_loop_restarts >= 0, "crash_loop_restarts must be >= 0 (0 = off)")
        _check(self.crash_loop_jobs >= 1, "crash_loop_jobs must be >= 1")
        _at_most(self, MAX_RETRIES, "max_restarts", "nonfinite_rollback", "node_crash_limit", "crash_loop_restarts",
                 "crash_loop_jobs")
        for key in ("restart_backoff", "hang_floor", "startup_timeout", "lock_stale_after"):
            try:
                parse_duration(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        if self.hang_timeout != "auto":
            try:
                parse_duration(self.hang_timeout)
            except ValueError as e:
                raise ValueError(f"hang_timeout: {e} (or \"auto\")") from None

    def hang_timeout_s(self, median_step_s: float | None) -> float:
        """Seconds without a heartbeat that count as a hang; 0 = never."""
        if self.hang_timeout != "auto":
            return parse_duration(self.hang_timeout)
        floor = parse_duration(self.hang_floor)
        return max(floor, 20 * median_step_s) if median_step_s else floor


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes from ``"512M"``, ``"1G"``, ``"1.5T"``, ``"0"`` or a bare number of bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"{value!r} is not a size; use e.g. \"512M\", \"2G\" or bytes")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if not 0 <= n <= MAX_INT:
        raise ValueError(f"size {value!r} is out of range")
    return n


@dataclass
class HealthConfig:
    """The node health check (foldhpc.resilience.health) that the supervisor runs before it starts
    the trainer on a node and before each restart: a node that fails it is not trained on; in a
    Slurm job the run hands over to a job that excludes it (``--exclude``; docs/nodes.md).

    Built-in checks (1.8 ms median on a CPU node; not yet measured with GPUs: docs/measurements/health-2026-12-03.md):
    the job's GPUs initialise and run a small kernel (a subprocess, so the supervisor holds no CUDA
    context; skipped, with a note, where no GPU is visible or ``train.device = "cpu"``), the run and
    checkpoint directories are writable from this node (create + fsync + remove a probe file),
    ``min_free_mem`` available memory (MemAvailable, and the job's cgroup limit where there is one),
    ``min_free_disk`` free in both directories' file systems, and the clock: the probe file's mtime
    is set by the file server on a shared file system, so a node whose clock is more than
    ``max_clock_skew`` off the server's (hence the other nodes') shows; on a local file system it
    is the node's own clock and the check cannot see a skew (noted). ``command``: a site's own check
    (a shell command, run with ``FOLDHPC_HEALTH_NODE`` set, killed after ``command_timeout``);
    a non-zero exit or a timeout fails the node, with the tail of its stderr as the detail. Its
    time counts towards the check's: keep it short.
    """

    enabled: bool = True
    min_free_mem: str = "256M"
    min_free_disk: str = "256M"
    max_clock_skew: str = "30s"
    command: str = ""
    command_timeout: str = "1s"

    def validate(self) -> None:
        for key in ("min_free_mem", "min_free_disk"):
            try:
                parse_size(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        for key in ("max_clock_skew", "command_timeout"):
            try:
                t = parse_duration(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
            _check(t > 0, f"{key} must be > 0")


#: ``task.factory`` spellings: ``package.module:function`` or ``path/to/file.py:function``
TASK_FACTORY_RE = re.compile(r"(?:[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*|[^:]+\.py):[A-Za-z_]\w*")
#: nesting of ``task.params`` tables and lists (a deeper one is a generated file gone wrong)
MAX_PARAMS_DEPTH = 8


def _check_params(value: Any, where: str, depth: int = 0) -> None:
    """``task.params`` holds what TOML holds, within the bounds every other key has."""
    _check(depth <= MAX_PARAMS_DEPTH, f"params: {where} is nested deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            _check(isinstance(k, str) and bool(k), f"params: {where} has a key {k!r}; keys are non-empty strings")
            _check(_control_char(k) is None, f"params: key {where}.{k!r} contains a control character")
            _check_params(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_params(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        _check(-MAX_INT - 1 <= value <= MAX_INT, f"params: {where} = {value}: out of range (64-bit integers only)")
    elif isinstance(value, float):
        _check(math.isfinite(value), f"params: {where} = {value}: must be a finite number")
    elif isinstance(value, str):
        bad = _control_char(value)
        _check(bad is None, f"params: {where} = {value!r}: contains a control character ({bad})")
    else:
        raise ValueError(f"params: {where} = {value!r}: a {type(value).__name__}; use what TOML has "
                         "(strings, numbers, booleans, lists, tables)")


@dataclass
class TaskConfig:
    """What is trained: a model and its loop. See :mod:`foldhpc.task`.

    ``factory`` names an importable function that builds a :class:`foldhpc.task.Task` from the
    run's Config: ``"my_pkg.tasks:build"`` (imported as a module; the working directory is on the
    path) or ``"path/to/tasks.py:build"`` (a file, relative to the working directory). Empty: the
    built-in distogram model (:mod:`foldhpc.train.loop`). ``params`` is the task's own free-form
    table (``[task.params]``), given to the factory as ``cfg.task.params`` and fingerprinted into
    every checkpoint: a changed value is refused at resume like a changed ``model.*`` key.
    """

    factory: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check(not self.factory or TASK_FACTORY_RE.fullmatch(self.factory) is not None,
               "factory must be \"package.module:function\" or \"path/to/file.py:function\"")
        _check_params(self.params, "task.params")
        if self.params and not self.factory:
            raise ValueError("params: [task.params] is set but task.factory is empty: the built-in model takes "
                             "its settings from [model] and [train]; name your factory in task.factory")


@dataclass
class MonitorConfig:
    """Publishing the run to a site's monitoring (foldhpc.monitor.metrics): Prometheus metrics, notifications."""

    # node_exporter's --collector.textfile.directory: the process that runs the training (the
    # supervisor where there is one, else rank 0's trainer) rewrites <dir>/foldhpc-<run>-<hash>.prom
    # there every textfile_every; "" = off (foldhpc metrics RUN_DIR prints the same at any time)
    textfile_dir: str = ""
    textfile_every: str = "15s"
    # no step for this long counts as hung in the metrics (foldhpc_run_hang_bound_seconds, the
    # FoldhpcRunHung alert), whether or not foldhpc's own watchdog is on; "auto" = fault.hang_timeout
    # where it is a duration, else the larger of fault.hang_floor, 20 steps and 3 log windows
    hang_after: str = "auto"
    # a shell command run when the run completes, fails, hangs, is requeued or handed over, with
    # FOLDHPC_STATE, FOLDHPC_RUN_DIR, FOLDHPC_STEP, FOLDHPC_JOB_ID, FOLDHPC_REASON in its environment
    # (mail, a chat webhook); it runs detached, and its failure never affects training
    on_state_change: str = ""

    def validate(self) -> None:
        for key in ("textfile_every",):
            try:
                every = parse_duration(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
            _check(every > 0, f"{key} must be > 0 (set textfile_dir = \"\" to publish nothing)")
        if self.hang_after != "auto":
            try:
                _check(parse_duration(self.hang_after) > 0, "hang_after must be > 0 (or \"auto\")")
            except ValueError as e:
                raise ValueError(f"hang_after: {e} (or \"auto\")") from None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        _check_text(self)
        _check_numbers(self)
        for f in fields(self):
            section = getattr(self, f.name)
            try:
                section.validate()
            except ValueError as e:
                # messages start with the key name: name the full key, the value and the rule
                m = re.match(r"(\w+):?\s+(.*)", str(e))
                if m and hasattr(section, m.group(1)):
                    key, rule = m.groups()
                    raise ConfigError(
                        f"{f.name}.{key} = {getattr(section, key)!r}: {rule}") from None
                raise ConfigError(f"[{f.name}] {e}") from None

    # ---- paths derived from the config
    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / CHECKPOINT_DIR

    def fingerprint(self, sections: tuple[str, ...] = ("model", "data")) -> str:
        """Hash of the sections that make a checkpoint (in)compatible with this config."""
        d = self.to_dict()
        keep = {s: d[s] for s in sections}
        for volatile in ("num_workers", "prepare_workers", "cache_dir"):
            keep.get("data", {}).pop(volatile, None)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _control_char(text: str) -> str | None:
    """The first control character in ``text`` (as ``U+000A``), or None.

    Every string value may end up on a ``#SBATCH`` line of submitit's job script (``run.dir`` and
    ``slurm.logs_dir`` through the output paths, ``slurm.*`` directly): a newline there ends the
    comment, and the rest of the value runs as a shell command in the job. No path, account or
    partition name needs one, so none is allowed anywhere (Unicode categories Cc, Zl, Zp: also the
    line separators that ``str.splitlines`` and some tools take for a newline).
    """
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None


#: ``slurm.extra_sbatch`` keys: sbatch long option names (submitit writes them unquoted into the
#: job script as ``#SBATCH --<key>=<value>``; ``_`` is written as ``-``)
EXTRA_SBATCH_KEY_RE = re.compile(r"[a-z][a-z0-9_-]*")


def _check_text(cfg: Config) -> None:
    """ConfigError for a control character in any string value (or table key) of ``cfg``, and for an
    ``slurm.extra_sbatch`` key that is not an sbatch option name: the job-script injection of
    issue 19 item 5 (see :func:`_control_char`)."""
    for sf in fields(cfg):
        section = getattr(cfg, sf.name)
        for kf in fields(section):
            where, value = f"{sf.name}.{kf.name}", getattr(section, kf.name)
            if where == "task.params":
                continue  # free-form: TaskConfig.validate checks every value, nested ones too
            items: list[tuple[str, str]] = []
            if isinstance(value, str):
                items = [("", value)]
            elif isinstance(value, list):
                items = [(f" item {i}", v) for i, v in enumerate(value) if isinstance(v, str)]
            elif isinstance(value, dict):
                for k, v in value.items():
                    items += [(" key", str(k)), (f" [{str(k)!r}]", str(v))]
            for what, text in items:
                bad = _control_char(text)
                if bad:
                    raise ConfigError(f"{where}{what} = {text!r}: contains a control character ({bad}); "
                                      "config values must be plain text on one line")
        if sf.name == "slurm":
            for k in section.extra_sbatch:
                if not EXTRA_SBATCH_KEY_RE.fullmatch(k):
                    raise ConfigError(f"slurm.extra_sbatch key {k!r}: not an sbatch option name; use the long "
                                      "option without its dashes, e.g. { mail-type = \"END\" } for --mail-type=END "
                                      "(lower-case letters, digits, '-', '_')")


def _check_numbers(cfg: Config) -> None:
    """ConfigError for an integer outside int64 or a float that is not finite (``inf``, ``nan``:
    TOML has both), in any key: the net under the per-key bounds of the sections' ``validate``."""
    for sf in fields(cfg):
        section = getattr(cfg, sf.name)
        for kf in fields(section):
            v = getattr(section, kf.name)
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and not -MAX_INT - 1 <= v <= MAX_INT:
                raise ConfigError(f"{sf.name}.{kf.name} = {v}: out of range (64-bit integers only)")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{sf.name}.{kf.name} = {v}: must be a finite number")


#: section name -> its dataclass, in the order of Config
SECTIONS: dict[str, type] = {name: type(section) for name, section in vars(Config()).items()}


def _coerce(section: str, key: str, value: Any, typ: Any) -> Any:
    where = f"{section}.{key}"
    origin = get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} = {value!r}: expected a number")
    if typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in {"interval", "time", "signal_lead", "timeout", "restart_backoff", "hang_timeout",
                                                                   "hang_floor", "startup_timeout", "lock_stale_after",
                                                                   "max_clock_skew", "command_timeout"}:
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} = {value!r}: expected a string")
    if origin is list:
        (item,) = get_args(typ)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        return [_coerce(section, key, v, item) for v in value]
    if origin is dict and section == "task":  # task.params: free-form, TOML's own types kept
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table, e.g. [task.params] or {{ layers = 2 }}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table, e.g. {{ key = \"value\" }}")
        return {str(k): str(v) for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported type {typ}")  # pragma: no cover


def _unknown(name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    prefix = where.rsplit(".", 1)[0] + "." if "." in where else ""
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{where}'{hint} Known: {', '.join(sorted(known))}")


def _apply(cfg: Config, data: dict[str, Any], source: str) -> None:
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {_unknown(section, list(SECTIONS), section)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{section}' must be a table ([{section}])")
        obj = getattr(cfg, section)
        hints = get_type_hints(type(obj))
        known = [f.name for f in fields(obj)]
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{source}: {_unknown(key, known, f'{section}.{key}')}")
            try:
                setattr(obj, key, _coerce(section, key, value, hints[key]))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def _parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    lhs, rhs = item.split("=", 1)
    lhs = lhs.strip()
    if lhs.startswith("task.params.") and lhs.count(".") == 2 and lhs.split(".")[2]:
        # --set task.params.layers=4: one entry of the free-form table
        try:
            value = tomllib.loads(f"v = {rhs}")["v"]
        except tomllib.TOMLDecodeError:
            value = rhs
        return "task", "params", {lhs.split(".")[2]: value}
    if lhs.count(".") != 1:
        raise ConfigError(f"--set {item!r}: key must be section.key, e.g. train.max_steps=100")
    section, key = lhs.split(".")
    try:  # TOML literal (number, bool, quoted string, list, inline table) ...
        value = tomllib.loads(f"v = {rhs}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs  # ... or a bare string such as a path or "15m"
    return section, key, value


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (TOML), apply ``section.key=value`` overrides, validate everything."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; `foldhpc init {p}` writes a commented "
                              "starter config (presets: tiny, default, gpu, large)")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        _apply(cfg, data, str(p))
    for item in overrides:
        section, key, value = _parse_override(item)
        if (section, key) == ("task", "params") and item.strip().startswith("task.params."):
            value = {**cfg.task.params, **value}  # one entry: merged into the table, the others kept
        _apply(cfg, {section: {key: value}}, "--set")
    cfg.validate()
    return cfg


def config_to_toml(cfg: Config) -> str:
    """Serialise a config to TOML (written into the run directory as ``config.toml``)."""
    out: list[str] = []
    for section, table in cfg.to_dict().items():
        out.append(f"[{section}]")
        for key, value in table.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)  # pragma: no cover
