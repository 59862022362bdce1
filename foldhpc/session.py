"""``foldhpc.Session``: foldhpc's guarantees around a training loop the user wrote.

::

    import foldhpc
    with foldhpc.Session("runs/mine", states={"model": model, "optimizer": opt, "scheduler": sched}) as run:
        batches = run.batches(my_dataset, batch_size=64)   # batches[step]: the same after a resume
        for step in run.steps(10_000):     # starts at the resumed step
            loss = my_step(model, batches[step])
            run.wait_staged()               # before anything mutates tracked state
            opt.step(); sched.step()
    raise SystemExit(run.exit_code)         # 0 done, 75 "requeue me"

The session is the built-in trainer's (:mod:`foldhpc.train.loop`) runtime without its model: the
same run lock, records, checkpoint manager, signal handling and exit codes, composed here, not
re-implemented. See :class:`Session` for what it guarantees and what it does not yet.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
from torch import nn
from torch.utils.data import default_collate

import foldhpc
from foldhpc import faults
from foldhpc.checkpoint import CheckpointError, CheckpointManager, PreemptionSignals
from foldhpc.checkpoint.manager import CheckpointEntry, LoadedCheckpoint
from foldhpc.cluster.env import slurm_env
from foldhpc.config import Config, ConfigError, config_to_toml, load_config
from foldhpc.data.dataset import TrainBatches
from foldhpc.distributed.env import DistEnv, from_environ
from foldhpc.distributed import ranks
from foldhpc.distributed.group import PeerFailure, SoloGroup, open_group
from foldhpc.records.envvars import RESTART_INFO_ENV, SUPERVISED_ENV
from foldhpc.records.events import EventLog, EventSink, NullEventLog
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.history import read_history
from foldhpc.records.fsio import atomic_write_text, make_private_dir, process_age_s
from foldhpc.records.layout import CONFIG_FILE, LOG_FILE, STACKS_FILE, TENSORBOARD_DIR
from foldhpc.records.logs import setup_logging
from foldhpc.records.status import CHECKPOINTED, COMPLETED, FAILED, RUNNING, NullStatus, StatusFile, StatusSink
from foldhpc.resilience import heartbeat as hb
from foldhpc.resilience import runlock
from foldhpc.resilience.nonfinite import NonFiniteGuard, Restored, RollbackUnavailable
from foldhpc.train.compat import API_REMEDY, check_resume
from foldhpc.train.rng import capture_rng_state, restore_rng_state

if TYPE_CHECKING:  # imported by the first log_scalars(): TensorBoard costs a third of a second to import
    from foldhpc.data.structure import ProteinChain
    from foldhpc.records.tensorboard import RunWriter, ScalarSink

log = logging.getLogger(__name__)

#: the checkpoint key under which the session keeps its own state (step, restarts, RNG states);
#: no entry of ``states`` may use it
SESSION_KEY = "foldhpc"

#: run directories (resolved) of the sessions entered in this process and not yet left
_LIVE: set[Path] = set()

#: ``resume=``: the newest checkpoint that verifies (the default), or none (start afresh)
RESUME_AUTO, RESUME_NEVER = "auto", "never"


@runtime_checkable
class Stateful(Protocol):
    """What every value of ``states`` must be: torch.distributed.checkpoint's ``Stateful`` protocol
    (torch modules, optimizers, LR schedulers and GradScalers already are).

    Optional, not part of the protocol: ``capture_state_dict()``, the capture-at-the-boundary hook
    (see :class:`Session`, "Background saves"). When a value has it, a background save calls it at
    the step boundary instead of ``state_dict()``; it returns a state dict that later changes of
    the object do not reach (copied tensors, not views of the live ones)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class MapDataset(Protocol):
    """A map-style dataset: ``len(ds)`` and ``ds[i]`` for ``0 <= i < len(ds)`` (a
    ``torch.utils.data.Dataset`` with ``__len__``, a list, a ``TensorDataset``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class StepBatches:
    """The batches of a map-style dataset as a pure function of the step: ``batches[step]``.

    Nothing to checkpoint and nothing to fast-forward: the batch of step ``s`` on rank ``r`` is a
    function of ``(seed, s, r, world_size)`` alone, so a resumed loop that asks for
    ``batches[step]`` sees exactly the batches it would have seen without the interruption, in
    any process, with any number of DataLoader workers. The index stream is the built-in
    trainer's (:meth:`foldhpc.data.dataset.TrainBatches.indices`, used here, not re-implemented):
    the concatenation of one random permutation of ``range(len(dataset))`` per epoch (epoch ``e``
    drawn from ``(seed, e)``), step ``s`` taking samples ``s*B .. s*B+B-1`` of it, so every index
    is drawn once per epoch (an epoch ends mid-batch when ``B`` does not divide the length).

    ``batch_size`` (``B``) is the *global* batch: rank ``r`` of ``world_size`` gets samples
    ``r*b .. r*b+b-1`` (``b = B / world_size``) of the step's global batch. ``collate_fn`` turns
    the list of ``dataset[i]`` into the batch (default: ``torch.utils.data.default_collate``, as a
    ``DataLoader``'s). :meth:`Session.batches` makes one seeded from the run's ``train.seed``.

    It is itself a map-style dataset of steps, so a ``DataLoader`` can prefetch the batches in
    worker processes: ``DataLoader(batches, sampler=StepSampler(run.step, total), batch_size=None,
    num_workers=k)`` (:class:`foldhpc.data.dataset.StepSampler`, as the built-in trainer does).

    The dataset's length is read once: a dataset that grows or shrinks changes every later batch.
    The stream keeps one pointer per sample (8 bytes) for the length it was made with.
    """

    def __init__(self, dataset: MapDataset, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        n = len(dataset)
        if n < 1:
            raise ValueError("StepBatches(dataset): the dataset is empty (len() == 0)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"StepBatches(batch_size={batch_size!r}): a positive int")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"StepBatches: batch_size {batch_size} cannot be split over world_size {world_size} "
                             f"(rank {rank}): batch_size is the global batch, a multiple of world_size")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.collate_fn: Callable[[list[Any]], Any] = collate_fn if collate_fn is not None else default_collate
        # TrainBatches.indices reads only len(records): a list of n placeholders stands for the dataset
        # (no sample is loaded); crop_size is unused by indices()
        self._stream = TrainBatches(cast("Sequence[ProteinChain]", [None] * n), batch_size, 1, self.seed)

    @property
    def num_samples(self) -> int:
        """The dataset's length, as read when this was made."""
        return len(self._stream.records)

    def epoch_of(self, step: int) -> int:
        """The epoch that the first sample of ``step`` belongs to."""
        return self._stream.epoch_of(step)

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the global batch of ``step`` (every rank's samples, rank 0 first)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise IndexError(f"StepBatches: step must be an int >= 0, not {step!r}")
        return self._stream.indices(step)

    def indices(self, step: int) -> list[int]:
        """Dataset indices of this rank's part of the batch of ``step``."""
        b = self.batch_size // self.world_size
        return self.global_indices(step)[self.rank * b:(self.rank + 1) * b]

    def __getitem__(self, step: int) -> Any:
        """This rank's batch of ``step``: ``collate_fn([dataset[i] for i in indices(step)])``."""
        return self.collate_fn([self.dataset[i] for i in self.indices(step)])


class StatesMismatch(CheckpointError):
    """A checkpoint whose entries are not the session's ``states`` (missing or extra keys), or one
    a state refused to load. A user error (exit 2): nothing was loaded from it, nothing written."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message, damaged=False)


def _check_resume(resume: object) -> str | Path:
    """``resume=``: "auto", "never" or a checkpoint file's path (checked when the session starts)."""
    if isinstance(resume, os.PathLike):
        return Path(resume)
    if not isinstance(resume, str) or not resume:
        raise TypeError(f"resume={resume!r}: expected \"auto\", \"never\" or the path of a checkpoint file")
    return resume if resume in (RESUME_AUTO, RESUME_NEVER) else Path(resume)


def _usage(e: CheckpointError) -> CheckpointError:
    """``e`` marked as the user's to fix (exit code 2, never retried), as the built-in trainer marks
    a checkpoint error before the first step."""
    e.exit_code = ExitCode.USAGE  # type: ignore[attr-defined]
    return e


def _peer_failure(e: BaseException) -> bool:
    """Whether ``e`` says a collective failed because of another rank: the group's own
    :class:`PeerFailure`, or torch's ``DistBackendError`` from a collective the loop ran itself
    (DDP's gradient all-reduce in ``backward()``)."""
    backend_error = getattr(torch.distributed, "DistBackendError", None)
    return isinstance(e, PeerFailure) or (backend_error is not None and isinstance(e, backend_error))


def _check_states(states: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(states, Mapping) or not states:
        raise TypeError("states must be a non-empty dict of name -> object with state_dict()/load_state_dict(), "
                        f"not {type(states).__name__}")
    out: dict[str, Any] = {}
    for key, value in states.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"states: key {key!r} must be a non-empty str")
        if key == SESSION_KEY:
            raise ValueError(f"states[{key!r}]: the name {SESSION_KEY!r} is the session's own; use another one")
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(value, m, None))]
        if missing:
            raise TypeError(f"states[{key!r}] ({type(value).__name__}) has no {' / '.join(f'{m}()' for m in missing)}: "
                            "every value must follow the Stateful protocol (state_dict() and load_state_dict(), "
                            "as torch modules, optimizers and schedulers do)")
        out[key] = value
    return out


def _resolve_config(config: Config | str | os.PathLike[str] | None, run_dir: Path) -> Config:
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    else:
        raise TypeError(f"config must be a foldhpc Config, a TOML path or None, not {type(config).__name__}")
    cfg.run.dir = str(run_dir)  # the session's run directory wins over the config's run.dir
    cfg.validate()
    return cfg


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _capture(obj: Any) -> dict[str, Any]:
    """``obj``'s state dict at the step boundary, safe from what runs before :meth:`Session.wait_staged`.

    ``capture_state_dict()`` when the object has it (the user's hook). For a ``torch.nn.Module``,
    its buffers in the state dict are cloned: forward passes update buffers in place (BatchNorm's
    running statistics and ``num_batches_tracked``) while a background save still reads them;
    parameters are left as references (only ``optimizer.step()`` changes them, after
    ``wait_staged()``). Anything else: ``state_dict()``.
    """
    hook = getattr(obj, "capture_state_dict", None)
    if callable(hook) and not isinstance(hook, nn.Module):
        captured = hook()
        if not isinstance(captured, dict):
            raise TypeError(f"capture_state_dict() of {type(obj).__name__} returned {type(captured).__name__}, "
                            "not a state dict")
        return captured
    sd: dict[str, Any] = obj.state_dict()
    if isinstance(obj, nn.Module):
        for name, _ in obj.named_buffers():
            value = sd.get(name)
            if isinstance(value, torch.Tensor):
                sd[name] = value.clone()
    return sd


class _NullScalars:
    """What ranks other than 0 draw: nothing (the ScalarSink protocol without TensorBoard's import)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        return None

    def restart_marker(self, step: int, restarts: int, job_id: str | None, slurm_restarts: int,
                       note: str = "") -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


_NULL_SCALARS = _NullScalars()


class _LazyScalars:
    """The guard's scalar sink: opens the session's TensorBoard writer only when a step is skipped."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._session._tb().scalar(tag, value, step)


class Session:
    """foldhpc's runtime for a loop the user wrote; use it as a context manager (see the module docstring).

    ``run_dir``: the run directory (``run.dir`` of the config is replaced by it). ``states``: name ->
    object with ``state_dict()`` / ``load_state_dict()``; together with the RNG states (python,
    numpy, torch, CUDA) they are the checkpoint. ``config``: a :class:`foldhpc.config.Config`, the
    path of a TOML file, or None (defaults); the ``[checkpoint]``, ``[run]`` (log level) and
    ``fault.lock_stale_after`` keys apply.

    Entering takes the run lock (a second session or trainer on a live run directory is refused:
    :class:`~foldhpc.resilience.runlock.RunDirLocked`), writes ``config.toml``, ``status.json``,
    ``events.jsonl`` and ``train.log``, installs the preemption signal handlers
    (``checkpoint.signals``) and resumes from the newest checkpoint that verifies (falling back
    to older ones). A checkpoint whose keys are not those of ``states`` is refused
    (:class:`StatesMismatch`, naming the keys) before anything is loaded or written.

    :meth:`steps` yields the step numbers from the resumed one; a step is done when the loop comes
    back for the next one, and the checkpoint of step ``s`` holds the states after ``s`` steps.
    Saves: every ``checkpoint.interval`` (wall clock) and every ``checkpoint.every_steps`` in
    the background (``checkpoint.async_save``, the default; in place when it is false), at the end
    (blocking), and at once at the next step boundary after a preemption signal (blocking; then
    :meth:`steps` ends and :attr:`exit_code` is 75). A loop that leaves :meth:`steps` early
    without an error is saved too (exit code 0).

    Background saves: the states are captured at the step boundary and written while the next
    step runs. Call :meth:`wait_staged` before anything changes a tracked tensor
    (``optimizer.step()``): until then the save may still read the live tensors. What the
    forward pass itself changes is captured at the boundary, so it needs no care: the buffers of
    every ``torch.nn.Module`` value (BatchNorm's running statistics) are cloned then, and plain
    values (a scheduler's counters) are taken then. Any other state that the loop changes in
    place before :meth:`wait_staged` opts in with the capture hook: a ``capture_state_dict()``
    method returning a copied state dict, called instead of ``state_dict()`` for background
    saves (:class:`Stateful`). Blocking and in-place saves run with nothing else running and
    capture nothing.

    Exact resume: bit-exact when the loop's batches are a function of the step (:meth:`batches`
    gives a map-style dataset's, :class:`StepBatches`) or come from a tracked state, and every
    random draw goes through the generators the session saves (python, numpy, torch, CUDA), on
    the same torch build and thread count (see :mod:`foldhpc.train.loop`).

    Config at resume: a checkpoint written with other ``task.*`` values (``[task.params]``, the
    hyperparameters of a :mod:`foldhpc.task`) or another ``train.seed`` is refused
    (:class:`~foldhpc.train.compat.IncompatibleResume`, naming every changed key, old -> new;
    nothing loaded or written) unless ``force_resume=True``.

    Errors: a ``states`` value without ``state_dict()`` / ``load_state_dict()`` (``TypeError``,
    naming its key); a checkpoint that is not the states' (:class:`StatesMismatch`, exit code 2,
    naming the keys; nothing loaded or written); a live run directory
    (:class:`~foldhpc.resilience.runlock.RunDirLocked`); a config that does not validate
    (:class:`~foldhpc.config.ConfigError`, naming the key). A failure inside the ``with`` block is recorded in
    ``status.json`` (``failed``) and :attr:`exit_code` (1, or 2 for a user error), then raised.

    Several ranks (launched by torchrun, ``srun`` or any launcher that sets ``RANK`` /
    ``WORLD_SIZE`` / ``MASTER_PORT``; ``env`` overrides what the environment says): entering opens
    the process group (``distributed.backend``; wrap the model in DDP after entering); rank 0
    holds the run lock and writes checkpoints, ``status.json``, ``config.toml`` and TensorBoard,
    every rank writes its own ``events.jsonl`` records; rank 0 picks the checkpoint to resume from
    and every rank loads that file. At every step boundary the ranks agree on a signal any of
    them received and on a due timer, so all stop (or save) at the same step; each waits for rank
    0's exit save before it leaves. :meth:`batches` gives rank ``r`` its part of the global batch.
    The process group stays up after the block (a DDP wrapper made inside it would hang in its
    destructor without it) and ends with the process; drop the wrapper first, then call
    ``torch.distributed.destroy_process_group()``, to end it earlier.
    :meth:`check_finite` takes the same verdict on every rank (any rank's non-finite loss; the
    gradient norm is DDP's, the same everywhere). A failure names the rank to blame, as the
    built-in trainer does (:func:`foldhpc.distributed.ranks.blame`): the rank that raised records
    ``failed``; a rank whose collective failed (a dead or hung peer: the group's
    :class:`~foldhpc.distributed.group.PeerFailure`, or torch's ``DistBackendError`` from a DDP
    backward) records ``aborted`` and names the culprits, with their node, in ``status.json``
    (``failed_ranks``) and a ``failed_ranks`` event.

    Choosing the start (``resume=``, the CLI's ``--resume PATH`` / ``--no-resume``): ``"auto"``
    (the default) resumes from the newest checkpoint that verifies, falling back to older ones;
    ``"never"`` starts afresh, moving the existing checkpoints aside into
    ``<checkpoint dir>/old-<time>-<n>/`` (kept, never deleted); a path resumes from that checkpoint
    file (its config checked as above), and a blocking save of the loaded state at once makes it
    the newest checkpoint, so that anything that resumes later continues from it. Both are a
    choice for the run's *first* start: a process that continues the run -- a restart by
    ``foldhpc supervise`` (which replays the same command), a requeued Slurm job, a follow-up job
    of a chain -- resumes from the newest checkpoint instead, with a warning, since starting afresh
    or going back to the old file again would throw away what the run did since.

    Not yet: iterable-style datasets (:class:`StepBatches` needs ``len()`` and ``dataset[i]``).
    """

    def __init__(self, run_dir: str | os.PathLike[str], states: Mapping[str, Any],
                 config: Config | str | os.PathLike[str] | None = None, *, force_resume: bool = False,
                 resume: str | os.PathLike[str] = RESUME_AUTO, env: DistEnv | None = None) -> None:
        self.states = _check_states(states)
        #: "auto", "never" or the checkpoint file to resume from (see the class docstring)
        self.resume: str | Path = _check_resume(resume)
        #: which rank this process is (torchrun's or srun's environment, see foldhpc.distributed.env)
        self.env = env if env is not None else from_environ()
        self.main = self.env.is_main  # rank 0 writes checkpoints, status.json, config.toml and TensorBoard
        self.group: SoloGroup = SoloGroup(self.env)
        self.force_resume = bool(force_resume)
        self.run_dir = Path(run_dir)
        self.cfg = _resolve_config(config, self.run_dir)
        self.step = 0  #: steps done (the resumed step before the first)
        self.restarts = 0  #: resumes from a checkpoint over the run's life
        self.exit_code: int = ExitCode.FAILED  #: 0 done, 75 checkpointed on a signal (requeue me)
        self.resumed_from: Path | None = None
        self.signal: str | None = None  #: the preemption signal that ended steps(), by name
        #: the non-finite guard (see :meth:`check_finite`)
        self.guard = NonFiniteGuard(self.cfg.fault.nonfinite_rollback)
        self.events: EventSink = NullEventLog()
        self.status: StatusSink = NullStatus()
        self.lock: runlock.RunLock | runlock.NoLock = runlock.NoLock()
        self.hb: hb.Heartbeat | hb.NoHeartbeat = hb.NoHeartbeat()  # the supervisor's, once entered
        self.ckpt: CheckpointManager | None = None
        self._preempt: PreemptionSignals | None = None
        self._writer: RunWriter | None = None
        self._seen: CheckpointEntry | None = None
        self._entered = False
        self._finished = False
        self._resumed_step = 0
        self._scalars: dict[str, float] = {}  # what log_scalars() last drew, for the progress records
        self._live: Path | None = None
        self._started_at = time.time()

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> Session:
        if self._entered:
            raise RuntimeError("a Session is entered once")
        self._entered = True
        cfg = self.cfg
        here = self.run_dir.resolve()
        if here in _LIVE:  # the run lock takes over its own process's leftovers: it cannot tell this apart
            raise runlock.RunDirLocked(f"run directory {self.run_dir} is held by another Session of this process "
                                       f"(pid {os.getpid()}): one writer per run directory")
        make_private_dir(self.run_dir)
        if self.main:  # rank 0 holds the lock for the run; the other ranks do not look at it (runlock)
            try:
                self.lock = runlock.acquire(self.run_dir, cfg.fault.lock_stale_after)
            except runlock.RunDirLocked as e:
                runlock.record_refusal(self.run_dir, e)
                raise
        try:
            if self.env.distributed:  # the process group (gloo on CPU, NCCL on CUDA): DDP can wrap a model now
                self.group = open_group(self.env, cfg.distributed.backend,
                                        "cuda" if torch.cuda.is_available() else "cpu", cfg.distributed.timeout_s)
            self._start()
        except BaseException as e:
            if isinstance(e, CheckpointError):
                # before the first step (checkpoint directory unusable, no usable checkpoint, a resume
                # refused or a chosen file that is not one): nothing is lost and a restart cannot fix it
                _usage(e)
            self._fail(e)
            self._teardown()
            raise
        _LIVE.add(here)
        self._live = here
        return self

    def _start(self) -> None:
        cfg, env = self.cfg, self.env
        if self.main:
            note = runlock.claim_checkpoint_dir(cfg.checkpoint_dir, self.run_dir)
            if note and isinstance(self.lock, runlock.RunLock):
                self.lock.notes.append(note)
        setup_logging(cfg.run.log_level, self.run_dir / LOG_FILE, env.rank if env.distributed else None)
        self.events = EventLog(self.run_dir, env.rank)
        slurm = slurm_env()
        supervised = os.environ.get(SUPERVISED_ENV) == "1"
        self.events.emit("process_start", process_start_t=time.time() - process_age_s(), max_steps=None, host=socket.gethostname(),
                         world_size=env.world_size, supervised=supervised, slurm_job_id=slurm.job_id,
                         slurm_restart_count=slurm.restart_count, foldhpc_version=foldhpc.__version__,
                         session=True)
        self.lock.log_acquired()
        if self.main:
            try:
                atomic_write_text(self.run_dir / CONFIG_FILE, config_to_toml(cfg))
            except OSError as e:
                log.warning("cannot write %s (%s): the run goes on (each checkpoint records the config)",
                            self.run_dir / CONFIG_FILE, e.strerror or e)
            self.status = StatusFile(self.run_dir)
        self._started_at = time.time()
        self.status.update(state=RUNNING, started_at=self._started_at, error=None, signal=None,
                           slurm_job_id=slurm.job_id, slurm_restart_count=slurm.restart_count,
                           world_size=env.world_size, failed_ranks=None)
        if env.distributed:
            if self.main:
                ranks.remove_stale(self.run_dir, env.world_size)
            ranks.write_record(self.run_dir, env, ranks.RUNNING)
        self.hb = hb.heartbeat()
        if supervised:
            hb.enable_stack_dump(self.run_dir / STACKS_FILE)
        self.hb.beat(0, "startup")
        self._preempt = PreemptionSignals(cfg.checkpoint.signal_numbers())
        self._preempt.__enter__()
        self.ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save,
                                      owner_check=self.lock.verify, events=self.events)
        if self.main:  # the writer; preflight also removes dead writers' temporary files
            try:
                make_private_dir(cfg.checkpoint_dir)
            except OSError:
                pass  # preflight says what is wrong with it
            est = sum(_tensor_bytes(s.state_dict()) for s in self.states.values()) + (1 << 20)
            self.ckpt.preflight(est, cfg.checkpoint.min_free_mb << 20)
        self._restore()
        self.status.update(step=self.step, restarts=self.restarts)

    def _restore(self) -> None:
        assert self.ckpt is not None
        t0 = time.monotonic()
        choice = self.resume
        if choice != RESUME_AUTO:
            why = self._continuing()
            if why is not None:
                log.warning("resume=%s is ignored: this process continues the run (%s), so it resumes from the "
                            "newest checkpoint; the choice applied to the run's first start only", choice, why)
                choice = RESUME_AUTO
        loaded = self._load_chosen("waiting for rank 0 to choose the checkpoint to resume from", choice)
        if loaded is None:
            return
        where = loaded.path
        self._check_config(loaded.meta, where)
        if choice == RESUME_AUTO:
            self.ckpt.last_committed = loaded.entry
        if loaded.skipped:
            self.status.update(warning=f"skipped bad checkpoints: {loaded.skipped}")
        own = self._load_states(loaded.state, where)
        self.step = self._resumed_step = int(own["step"])
        self.restarts = int(own.get("restarts", 0)) + 1
        self.resumed_from = where
        self._seen = loaded.entry
        load_s = time.monotonic() - t0
        log.info("resumed from %s at step %d (restart #%d, checkpoint load %.2fs)", where, self.step, self.restarts,
                 load_s)
        self.events.emit("resumed", path=str(where), step=self.step, restarts=self.restarts, load_s=load_s)
        if choice != RESUME_AUTO:
            self._commit_resume_choice()

    def _continuing(self) -> str | None:
        """Why this process continues a run an earlier process started (a restart by the
        supervisor, a requeue, a follow-up job of a chain), or None for the run's first start."""
        try:
            info = json.loads(os.environ.get(RESTART_INFO_ENV) or "{}")
        except ValueError:
            info = {}
        restarts = int(info.get("in_job_restarts") or 0) if isinstance(info, dict) else 0
        if restarts:
            return f"restart {restarts} by the supervisor"
        slurm = slurm_env()
        if slurm.restart_count > 0:
            return f"restart {slurm.restart_count} of Slurm job {slurm.job_id}, a requeue"
        if slurm.job_id and any(e.get("event") == "followup" and str(e.get("followup_job_id")) == slurm.job_id
                                for e in read_history(self.run_dir)[0]):
            return f"Slurm job {slurm.job_id} is a follow-up job of the run's chain"
        return None

    def _commit_resume_choice(self) -> None:
        """``resume=PATH``: make the loaded state the newest checkpoint now (a blocking save), so
        that a restart or a requeue, which resumes from the newest, continues the chosen line and
        not the one the user turned away from. If it fails nothing was trained: a user error."""
        assert self.ckpt is not None
        error: str | None = None
        if self.main:
            log.info("committing the resumed state (step %d) as the newest checkpoint, so that a restart "
                     "continues from it", self.step)
            self.hb.beat(self.step, "checkpoint")
            try:
                self.ckpt.save(self.step, self._state_source(False), self._meta(), reason="resume-choice",
                               blocking=True)
            except CheckpointError as e:
                error = str(e)
        if self.env.distributed:
            error = self.group.broadcast(error, "waiting for rank 0 to commit the resumed state")
        if error is not None:
            raise CheckpointError(f"resume={str(self.resume)!r}: the loaded state could not be saved as the newest "
                                  f"checkpoint, so nothing was trained: {error}", damaged=False)

    def _load_chosen(self, what: str, choice: str | Path = RESUME_AUTO) -> LoadedCheckpoint | None:
        """The checkpoint to start from (the newest good one for ``"auto"``; none for ``"never"``,
        the old ones moved aside; the file ``choice`` names), chosen by rank 0 (which repairs the
        index if it must) and loaded by every rank from the file rank 0 names; None if there is
        none. An error on rank 0 is raised on every rank."""
        assert self.ckpt is not None
        loaded: LoadedCheckpoint | None = None
        error: str | None = None
        if self.main:
            try:
                loaded = self._pick(choice)
            except CheckpointError as e:
                if not self.env.distributed:
                    raise
                error = str(e)
        if not self.env.distributed:
            return loaded
        picked = self.group.broadcast({"path": str(loaded.path) if loaded else None, "error": error}, what)
        if picked["error"] is not None:
            raise CheckpointError(f"rank 0: {picked['error']}", damaged=False)
        if self.main or picked["path"] is None:
            return loaded
        path = Path(picked["path"])
        payload = self.ckpt.load_file(path)
        meta = payload.get("meta") or {}
        entry = CheckpointEntry(path.name, int(meta.get("step", 0)))  # this rank never saves: the name is enough
        return LoadedCheckpoint(entry, path, payload["state"], meta)

    def _pick(self, choice: str | Path) -> LoadedCheckpoint | None:
        """Rank 0's part of :meth:`_load_chosen`."""
        assert self.ckpt is not None
        if choice == RESUME_AUTO:
            return self.ckpt.load_latest()
        if choice == RESUME_NEVER:
            aside = self.ckpt.move_aside()
            if aside is not None:
                log.info("resume=never: the existing checkpoints were moved to %s (kept); starting at step 0", aside)
            return None
        path = Path(choice)
        if not path.is_file():
            raise CheckpointError(f"resume={str(path)!r}: no such checkpoint file", damaged=False)
        payload = self.ckpt.load_file(path)
        meta = payload.get("meta") or {}
        return LoadedCheckpoint(CheckpointEntry(path.name, int(meta.get("step", 0))), path, payload["state"], meta)

    def _load_states(self, state: dict[str, Any], where: Path) -> dict[str, Any]:
        """Load a checkpoint's entries into ``states`` and the RNG states (the keys checked first:
        :class:`StatesMismatch` before anything is loaded); returns the session's own entry."""
        want, have = set(self.states), set(state) - {SESSION_KEY}
        if SESSION_KEY not in state or want != have:
            parts = []
            if want - have:
                parts.append(f"missing from the checkpoint: {', '.join(repr(k) for k in sorted(want - have))}")
            if have - want:
                parts.append(f"in the checkpoint but not in states: {', '.join(repr(k) for k in sorted(have - want))}")
            if SESSION_KEY not in state:
                parts.append(f"no {SESSION_KEY!r} entry (not written by foldhpc.Session)")
            raise StatesMismatch(
                f"checkpoint {where} does not match the session's states ({'; '.join(parts)}): it holds "
                f"{sorted(have)}, the session tracks {sorted(want)}. Nothing was loaded or written. Pass the same "
                f"states as the run that wrote it, or use another run directory.")
        for key, obj in self.states.items():
            try:
                obj.load_state_dict(state[key])
            except Exception as e:  # noqa: BLE001 - any state's own complaint, named by its key
                said = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line
                raise StatesMismatch(f"checkpoint {where}: states[{key!r}].load_state_dict() refused it: "
                                     f"{type(e).__name__}: {said}. Nothing was written; build {key!r} as the run "
                                     "that wrote the checkpoint did, or use another run directory.") from e
        own: dict[str, Any] = state[SESSION_KEY]
        restore_rng_state(own["rng"])
        self.guard.load_state_dict(own.get("nonfinite"))
        return own

    def _check_config(self, meta: Mapping[str, Any], where: Path) -> None:
        """Refuse a checkpoint written with other ``task.*`` values or another ``train.seed`` (the
        keys that decide what a session's run computes: the task's hyperparameters and the batch
        order of :meth:`batches`), unless ``force_resume``; see :mod:`foldhpc.train.compat`."""
        old = meta.get("config")
        if not isinstance(old, dict):
            log.warning("checkpoint %s records no config; cannot check that it matches this one", where)
            return
        new = self.cfg.to_dict()

        def keys(d: Mapping[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {"train": {"seed": (d.get("train") or {}).get("seed")}}
            if "task" in d:
                out["task"] = d["task"]
            return out

        check_resume(keys(old), keys(new), where, self.force_resume, remedy=API_REMEDY)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None:
                if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
                    self._fail(exc)
            elif not self._finished:
                # left the loop early without an error: the user's decision to stop; keep the work
                self._save_for_exit("exit")
                self.status.update(state=CHECKPOINTED, step=self.step)
                self.events.emit("checkpointed", step=self.step, signal=None, during="exit")
                self.exit_code = ExitCode.OK
            if exc is None and self.env.distributed:
                ranks.write_record(self.run_dir, self.env, ranks.DONE, step=self.step)
        finally:
            self._teardown()

    def _fail(self, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        user_error = isinstance(e, (ConfigError, StatesMismatch)) or getattr(e, "exit_code", None) == ExitCode.USAGE
        log.error("run failed at step %d: %s", self.step, msg, exc_info=not user_error,
                  extra={"console": False} if user_error else None)
        self.events.emit("failed", step=self.step, error=msg, error_type=type(e).__name__, user_error=user_error)
        self.exit_code = ExitCode.USAGE if user_error else ExitCode.FAILED
        if not self.env.distributed:
            self.status.update(state=FAILED, step=self.step, error=msg)
            return
        # name the rank to blame, as the built-in trainer does
        ranks.record_failure(self.run_dir, self.env, msg, self.step, self._started_at, _peer_failure(e), self.events,
                             self.status)

    def _teardown(self) -> None:
        try:
            if self.ckpt is not None:
                self.ckpt.wait()
            if self._writer is not None:
                self._writer.close()
            if self._preempt is not None:
                self._preempt.__exit__(None, None, None)
        finally:
            self.lock.release()
            # the process group stays up: a DDP wrapper the loop made outlives the block, and destroying
            # the group under it hangs its destructor (gloo); it ends with the process
            if self._live is not None:
                _LIVE.discard(self._live)
        hb.heartbeat().beat(self.step, "done")

    # ------------------------------------------------------------------ the loop
    def steps(self, total: int) -> Iterator[int]:
        """Yield ``step`` for each step from the resumed one up to ``total`` (exclusive), saving at
        the step boundaries as the class docstring says; ends early, after a durable save, on a
        preemption signal."""
        if not self._entered or self.ckpt is None or self._preempt is None:
            raise RuntimeError("Session.steps() is called inside `with Session(...) as run:`")
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise TypeError(f"steps(total): total must be a non-negative int, not {total!r}")
        cfg, preempt, ckpt = self.cfg, self._preempt, self.ckpt
        interval, every = cfg.checkpoint.interval_s, cfg.checkpoint.every_steps
        self.status.update(max_steps=total, step=self.step)
        log.info("steps %d..%d, checkpoint every %s%s, signals %s", self.step, total, cfg.checkpoint.interval,
                 f" and {every} steps" if every else "", ",".join(s.name for s in preempt.signals))
        self.events.emit("training", first=self.step, last=total, batch=1, restarts=self.restarts)  # batch 1: a step
        start, last_save_t, due = self.step, time.monotonic(), False
        # progress windows for goodput (foldhpc.monitor.timeline): timed here, at the step boundaries,
        # every run.log_every steps; the first step ends the start-up
        step_t0 = win_t0 = time.monotonic()
        win_start, first_done = self.step, False
        while True:  # the step boundary: self.step steps are done
            self.hb.beat(self.step + 1, "train" if self.step != start else "first")  # heartbeat.PHASES
            self.lock.check()  # taken over by another writer: stop, write nothing
            self._note_checkpoint()
            # the step boundary: with several ranks they agree here, every step, on a signal any of
            # them received and on a due timer, so that all stop (or save) at the same step
            received = int(preempt.received) if preempt.received is not None else 0
            timer_due = interval > 0 and time.monotonic() - last_save_t >= interval
            if self.env.distributed:
                received, timer_due = self.group.agree(received, timer_due)
            if received:
                sig = signal.Signals(received).name
                in_flight = ckpt.in_flight
                log.warning("received %s%s: saving a checkpoint at step %d, then exiting for requeue%s", sig,
                            "" if preempt.received is not None else " (on another rank)", self.step,
                            " (waiting for the background save in flight first)" if in_flight else "")
                self.events.emit("signal", signal=sig, step=self.step, in_flight=in_flight,
                                 from_peer=preempt.received is None)
                t0 = time.monotonic()
                self._save_for_exit(f"signal:{sig}")
                durable_s = time.monotonic() - t0
                log.warning("checkpoint at step %d durable %.2fs after the step boundary; exit %d", self.step,
                            durable_s, ExitCode.CHECKPOINTED)
                self.events.emit("checkpoint_durable", step=self.step, after_boundary_s=round(durable_s, 4))
                self.status.update(state=CHECKPOINTED, step=self.step, signal=sig)
                self.events.emit("checkpointed", step=self.step, signal=sig, during="training")
                self.exit_code = ExitCode.CHECKPOINTED
                self.signal = sig
                self._finished = True
                return
            if self.step >= total:
                break
            at_multiple = bool(every) and self.step > start and self.step % every == 0
            due = due or at_multiple
            if due or timer_due:
                if not self.main or self._save("steps" if due else "timer", blocking=False):
                    last_save_t, due = time.monotonic(), False
            yield self.step
            self.step += 1
            faults.after_step(self.step, self.env.rank, self.events)  # test hooks (foldhpc chaos); nothing unless set
            if self.guard.rollback_due:  # K non-finite steps in a row: back to the newest good checkpoint
                self._after_rollback(self.guard.rollback(self.step, self._restore_for_rollback, self.events))
                step_t0 = win_t0 = time.monotonic()
                win_start = self.step
                continue
            now = time.monotonic()
            if not first_done:
                first_done, win_t0, win_start = True, now, self.step
                age = process_age_s()
                self.events.emit("first_step", step=self.step, step_s=round(now - step_t0, 6), after_start_s=age,
                                 timings={"process_to_first_step_s": age})
            elif self.step - win_start >= cfg.run.log_every or self.step >= total:
                self._progress(total, self.step - win_start, now - win_t0)
                win_t0, win_start = now, self.step
        self._save_for_exit("final")
        self.status.update(state=COMPLETED, step=self.step, finished_at=time.time())
        log.info("completed at step %d", self.step)
        self.events.emit("completed", step=self.step, metrics={})
        self.exit_code = ExitCode.OK
        self._finished = True

    def wait_staged(self) -> None:
        """Block until a background save no longer reads the live tensors; call it before anything
        changes a tracked state (``optimizer.step()``). Beats the heartbeat while it waits."""
        if self.ckpt is None:
            return
        faults.cold_first_step()  # test hook, off unless set
        self.hb.beat(self.step + 1, "train")
        while not self.ckpt.wait_staged(timeout=hb.WAIT_BEAT_S):
            self.hb.beat(self.step + 1, "checkpoint")

    def check_finite(self, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None) -> bool:
        """The non-finite guard, for the step in progress: True, apply the update
        (``optimizer.step()``); False, skip it, the loss or gradient norm is NaN or inf. Call it
        after the backward pass (and ``clip_grad_norm_``, whose result is ``grad_norm``)::

            run.wait_staged()
            if run.check_finite(loss, gnorm):
                opt.step()

        A skipped step is still a step (the loop goes on to the next batch; retrying the same one
        would replay the same NaN). After ``fault.nonfinite_rollback`` skips in a row the session
        rolls every state back to the newest good checkpoint at the next step boundary and
        :meth:`steps` goes on from that checkpoint's step (a transient fault does not come back
        in the replay); a streak that comes back where one was rolled back from is deterministic
        and fails the run (:class:`~foldhpc.resilience.nonfinite.NonFiniteError`). Counters and
        rollbacks are in ``status.json`` (``nonfinite``), the checkpoint and ``events.jsonl``; see
        :mod:`foldhpc.resilience.nonfinite`. One host sync per call."""
        loss_t = torch.as_tensor(loss).detach().float().reshape(())
        gn = torch.as_tensor(0.0 if grad_norm is None else grad_norm).detach().float().to(loss_t.device)
        loss_t = faults.nan_loss(loss_t, self.step + 1, self.env.rank, None, self.events)  # test hook, off unless set
        bad = NonFiniteGuard.loss_flag(loss_t)
        if self.env.distributed:  # the same verdict on every rank (the gradient norm is DDP's, the same everywhere)
            bad = self.group.sum_(bad.reshape(1)).reshape(())
        return self.guard.check(self.step + 1, bad, gn, _LazyScalars(self), self.status, self.events)

    def _restore_for_rollback(self) -> Restored:
        """The guard's ``restore``: the newest good checkpoint back into ``states`` (the restart
        count and the guard's record of this rollback are kept: what happened, not what the file says)."""
        assert self.ckpt is not None
        self.hb.beat(self.step, "checkpoint")
        self.ckpt.wait()  # a save in flight is committed (or failed) first
        try:
            loaded = self._load_chosen("waiting for rank 0 to choose the checkpoint to roll back to")
        except CheckpointError as e:
            raise RollbackUnavailable(f"the checkpoint to roll back to cannot be loaded: {e}") from None
        if loaded is None:
            raise RollbackUnavailable("there is no checkpoint to roll back to")
        self.ckpt.last_committed = loaded.entry
        own = self._load_states(loaded.state, loaded.path)
        self.step = int(own["step"])
        return Restored(self.step, str(loaded.path))

    def _after_rollback(self, restored: Restored) -> None:
        """The curves after the step rolled back to are replayed: drop them, as a restart does."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._resumed_step = restored.step
        tb = self._tb()
        tb.scalar("fault/rollbacks", len(self.guard.rollbacks), restored.step)
        tb.flush()
        self.status.update(step=restored.step, nonfinite=self.guard.summary())

    def batches(self, dataset: MapDataset, batch_size: int,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> StepBatches:
        """``dataset``'s batches as a pure function of the step (:class:`StepBatches`): use
        ``batches[step]`` inside ``for step in run.steps(...)`` and a resumed run continues with
        exactly the batches it would have seen. Seeded from the config's ``train.seed``; this
        process is rank 0 of 1 (``batch_size`` is the global batch)."""
        return StepBatches(dataset, batch_size, self.cfg.train.seed, rank=self.env.rank,
                           world_size=self.env.world_size, collate_fn=collate_fn)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Draw ``scalars`` at ``step`` in the run's TensorBoard curves (one continuous set across
        restarts); a ``loss`` entry also goes to status.json and a ``progress`` event."""
        tb = self._tb()
        values = {k: float(v) for k, v in scalars.items()}
        for tag, v in values.items():
            tb.scalar(tag, v, step)
        self._scalars = values
        loss = values.get("loss", values.get("train/loss"))
        self.status.update(step=self.step, **({"loss": loss} if loss is not None and loss == loss else {}))

    def _tb(self) -> ScalarSink:
        """The run's TensorBoard writer, opened on first use (curves after the resumed step are
        dropped: they are replayed)."""
        if not self.main:
            return _NULL_SCALARS  # rank 0 draws the curves
        if self._writer is None:
            from foldhpc.records.tensorboard import RunWriter

            self._writer = RunWriter(self.run_dir / TENSORBOARD_DIR, start_step=self._resumed_step)
            if self.restarts:
                job = slurm_env()
                self._writer.restart_marker(self._resumed_step, self.restarts, job.job_id, job.restart_count)
        return self._writer

    def _progress(self, total: int, steps: int, seconds: float) -> None:
        """A ``progress`` record for the window of ``steps`` steps just done (a step counts as one
        sample: the session does not know the batch), with the scalars last logged."""
        v = self._scalars
        self.events.emit("progress", step=self.step, max_steps=total, loss=v.get("loss", v.get("train/loss")),
                         lr=v.get("lr", v.get("train/lr")), grad_norm=v.get("grad_norm", v.get("train/grad_norm")),
                         samples_per_s=steps / max(seconds, 1e-9), data_wait_frac=0.0, steps=steps, scalars=v)
        self.status.update(step=self.step)  # status.json follows the loop even where nothing is logged

    # ------------------------------------------------------------------ saving
    def _state_source(self, background: bool) -> dict[str, Any]:
        """The checkpoint's state as of this step boundary: every ``state_dict()`` is called now
        (references to the live tensors; the manager stages them), the RNG states copied now. For a
        background save, what the next forward pass may change is captured now too
        (:func:`_capture`)."""
        state: dict[str, Any] = {k: _capture(obj) if background else obj.state_dict()
                                 for k, obj in self.states.items()}
        state[SESSION_KEY] = {"step": self.step, "restarts": self.restarts, "rng": capture_rng_state(),
                              "nonfinite": self.guard.state_dict()}
        return state

    def _meta(self) -> dict[str, Any]:
        slurm = slurm_env()
        return {"config_fingerprint": self.cfg.fingerprint(), "config": self.cfg.to_dict(),
                "foldhpc_version": foldhpc.__version__, "torch_version": str(torch.__version__), "world_size": self.env.world_size,
                "saved_at": time.time(), "host": socket.gethostname(), "slurm_job_id": slurm.job_id or "",
                "slurm_restart_count": slurm.restart_count, "session": True, "states": sorted(self.states)}

    def _save(self, reason: str, blocking: bool) -> bool:
        assert self.ckpt is not None
        if blocking:
            self.hb.beat(self.step, "checkpoint")
            self.ckpt.wait()
        last = self.ckpt.last_committed
        if last is not None and last.step == self.step and not self.ckpt.in_flight:
            return True  # this exact state is already durable
        if self._writer is not None:
            self._writer.flush()  # the curves up to a durable checkpoint survive a SIGKILL
        if not blocking and self.ckpt.in_flight:
            return False  # the manager would refuse it: capture nothing; tried again at a later boundary
        background = not blocking and self.ckpt.async_save
        return self.ckpt.save(self.step, self._state_source(background), self._meta(), reason=reason,
                              blocking=blocking)

    def _save_for_exit(self, reason: str) -> None:
        """A blocking save (rank 0); every rank waits until it is durable, so that none exits
        first (a launcher such as torchrun ends the others when one rank exits)."""
        if self.main:
            self._save(reason, blocking=True)
            self._note_checkpoint()
        self.group.barrier(f"waiting for rank 0's {reason} checkpoint")

    def _note_checkpoint(self) -> None:
        """Surface background-save results (status, TensorBoard) on the loop's thread."""
        assert self.ckpt is not None
        err = self.ckpt.poll_error()
        if err is not None:
            self.status.update(last_save_error=f"{type(err).__name__}: {err}")
        last = self.ckpt.last_committed
        if last is not None and last is not self._seen:
            self._seen = last
            self.status.update(last_checkpoint={"step": last.step, "file": last.file, "saved_at": last.saved_at},
                               last_save_error=None)
            if self._writer is not None:
                self._writer.scalar("checkpoint/write_s", last.write_s, last.step)
                self._writer.flush()


__all__ = ["SESSION_KEY", "MapDataset", "Session", "StepBatches", "Stateful", "StatesMismatch"]
