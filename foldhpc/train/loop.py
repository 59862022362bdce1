"""The training loop: resumable, checkpointing, signal-aware.

One :class:`Trainer` owns one run directory::

    <run.dir>/config.toml        resolved config of the latest start
    <run.dir>/train.log          console log, appended across restarts
    <run.dir>/status.json        machine-readable state (foldhpc status reads it)
    <run.dir>/events.jsonl       what happened, as typed records (foldhpc.records.events), every rank
    <run.dir>/tensorboard/       TensorBoard event files, one continuous set of curves
    <run.dir>/checkpoints/       step_XXXXXXXX.ckpt + manifest.json (see foldhpc.checkpoint)

Everything a step depends on is a function of (train.seed, step) or lives in the checkpoint, so a
run resumed from step k continues exactly like a run that was never stopped.

Where "exactly" means bit for bit (``torch.equal`` on every weight and optimizer tensor, the same
state digest, the same TensorBoard curves): on CPU with ``train.deterministic = true``, the same
torch build and the same ``train.threads`` (a pinned count, not 0 = "all cores", since the
reduction order of some CPU kernels follows the thread count), and the config keys that shape
the trajectory unchanged (resume refuses those changes unless ``--force-resume``; see
:mod:`foldhpc.train.compat`). Validation, checkpoint timing and saving mode (async or not),
DataLoader workers and preemption signals do not affect it. On CUDA, ``deterministic = true``
selects deterministic kernels, so a resume on the same GPU model, driver and torch build is
expected to be exact as well, but that is not what the test suite checks; across GPU models,
with ``amp`` or ``compile`` the resumed run is the same training run, not the same bits.

The preemption signal is acted on at the next step boundary, and a validation pass in progress
yields to it between batches (see :mod:`foldhpc.train.validation`). TensorBoard is flushed before
each checkpoint is written and when it is committed, so the curves up to every durable
checkpoint survive a SIGKILL.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
from torch.utils.data import DataLoader

import foldhpc
from foldhpc import faults
from foldhpc.checkpoint import CheckpointError, CheckpointManager, PreemptionSignals, ignore_signals
from foldhpc.config import Config, ConfigError, config_to_toml
from foldhpc.data.cache import DataError, load_dataset
from foldhpc.data.dataset import Batch, StepSampler, TrainBatches, ValBatches, split_by_sequence
from foldhpc.distributed import ranks
from foldhpc.distributed.env import DistEnv, from_environ
from foldhpc.distributed.group import PeerFailure, SoloGroup, open_group
from foldhpc.model.loss import distogram_loss
from foldhpc.model.metrics import EvaluationStopped, evaluate
from foldhpc.model.model import StructureModel
from foldhpc.records.events import EventLog, EventSink, NullEventLog
from foldhpc.records.fmt import format_duration
from foldhpc.records.logs import setup_logging
from foldhpc.records.status import CHECKPOINTED, COMPLETED, FAILED, RUNNING, NullStatus, StatusFile, StatusSink
from foldhpc.records.fsio import atomic_write_text, make_private_dir, process_age_s
from foldhpc.records.tensorboard import NullWriter, RunWriter, ScalarSink
from foldhpc.resilience.nonfinite import NonFiniteError, NonFiniteGuard, Restored, RollbackUnavailable
from foldhpc.resilience import heartbeat as hb
from foldhpc.resilience import runlock
from foldhpc.records.envvars import RESTART_INFO_ENV, SUPERVISED_ENV
from foldhpc.cluster.env import slurm_env
from foldhpc.train.compat import check_resume, runtime_differences
from foldhpc.train.result import TrainResult
from foldhpc.train.rng import capture_rng_state, restore_rng_state, step_seed
from foldhpc.train.schedule import lr_factor
from foldhpc.train.sdc import Replay, SdcMonitor, Snapshot, replica_digest, same_trace, state_tensors, vote
from foldhpc.train.straggler import StragglerMonitor
from foldhpc.train.validation import debug_delayed, validation_due
from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.layout import CONFIG_FILE, LOG_FILE, STACKS_FILE, TENSORBOARD_DIR

log = logging.getLogger(__name__)




def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device`` for this process; with several ranks per node, "auto" and "cuda" mean the
    GPU of this rank's local rank (Slurm may show each task all of the node's GPUs, or only its own)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}: CUDA is not available on {socket.gethostname()}; "
                          "use \"auto\" or \"cpu\"")
    # cast: torch's stubs type device.index as int, but it is None for a device named without one
    if dev.type == "cuda" and cast("int | None", dev.index) is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def _worker_init(signals: list[signal.Signals], worker_id: int) -> None:  # noqa: ARG001
    ignore_signals(signals)
    torch.set_num_threads(1)


class Trainer:
    """Trains ``cfg`` into ``cfg.run.dir``; see the module docstring.

    ``resume``: "auto" continues from the newest good checkpoint if there is one, "never"
    starts over (existing checkpoints are moved aside, never deleted), or a checkpoint path.
    """

    def __init__(self, cfg: Config, resume: str = "auto", force_resume: bool = False,
                 env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env if env is not None else from_environ()
        self.main = self.env.is_main  # rank 0 writes checkpoints, status, logs and TensorBoard
        self.group: SoloGroup = SoloGroup(self.env)
        self.resume = resume
        self.force_resume = force_resume
        self.commit_resume_choice = False  # set by _restore: commit the chosen state before training (item 16)
        self.run_dir = cfg.run_dir
        # the run directory's lock, taken by run(); a Trainer set up without run() (benchmarks, tests) holds none
        self.lock: runlock.RunLock | runlock.NoLock = runlock.NoLock()
        self.step = 0
        self.train_time_s = 0.0  # accumulated over all restarts
        self.restarts = 0
        self.val_step = -1  # last step whose validation completed (checkpointed; see foldhpc.train.validation)
        self.guard = NonFiniteGuard(cfg.fault.nonfinite_rollback)  # non-finite steps: foldhpc.resilience.nonfinite
        # <run.dir>/events.jsonl, opened by run() (a Trainer set up without it records nothing); every
        # event is emitted beside the log line that says the same, on the ranks that log it
        self.events: EventSink = NullEventLog()
        f = cfg.fault  # silent data corruption and stragglers: foldhpc.train.sdc, foldhpc.train.straggler
        self.sdc = SdcMonitor(f.sdc_check_every, f.loss_spike_factor, f.sdc_on_nonfinite, self.env.rank,
                              self.env.world_size)
        self.stragglers = StragglerMonitor(f.straggler_factor, f.straggler_window, self.env.world_size)
        self.layout: list[dict[str, Any]] = [{"rank": self.env.rank, "node": self.env.node,
                                              "host": socket.gethostname()}]

    # ------------------------------------------------------------------ state protocol
    def state_dict(self) -> dict[str, Any]:
        return self.state_source()()

    def state_source(self) -> Callable[[], dict[str, Any]]:
        """The training state as of now, for a checkpoint.

        What changes between steps (RNG states, counters) is captured immediately; the function
        returned reads model, optimizer, scheduler and scaler, which stay as they are until the
        next ``optimizer.step()`` (see CheckpointManager.save).
        """
        rng = capture_rng_state()
        train = {"step": self.step, "train_time_s": self.train_time_s, "restarts": self.restarts,
                 "val_step": self.val_step, "tb_step": self.step, "samples_seen": self.step * self.cfg.train.batch_size,
                 "epoch": self.step * self.cfg.train.batch_size // max(1, self.n_train),
                 "nonfinite": self.guard.state_dict(), "sdc": self.sdc.state_dict()}

        def capture() -> dict[str, Any]:
            return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.scheduler.state_dict(), "grad_scaler": self.scaler.state_dict(),
                    "rng": rng, "train": train}

        return capture

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["grad_scaler"])
        restore_rng_state(state["rng"])
        self.step = int(state["train"]["step"])
        self.train_time_s = float(state["train"]["train_time_s"])
        self.restarts = int(state["train"]["restarts"])
        # Checkpoints written before val_step existed were always saved after the validation of
        # their step had completed.
        self.val_step = int(state["train"].get("val_step", self.step))
        self.guard.load_state_dict(state["train"].get("nonfinite"))
        self.sdc.load_state_dict(state["train"].get("sdc"), self.step)

    def checkpoint_meta(self) -> dict[str, Any]:
        slurm = slurm_env()
        return {"config_fingerprint": self.cfg.fingerprint(), "config": self.cfg.to_dict(),
                "foldhpc_version": foldhpc.__version__, "torch_version": str(torch.__version__),
                "device": self.device_kind, "world_size": self.env.world_size,
                "saved_at": time.time(), "host": socket.gethostname(),
                "slurm_job_id": slurm.job_id or "", "slurm_restart_count": slurm.restart_count}

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        self._t_setup = time.monotonic()
        cfg = self.cfg
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device, self.env.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._join()
        self.device_kind = (f"cuda ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                            else self.device.type)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(t.seed)

        t0 = time.monotonic()
        if not self.main:  # rank 0 first: it prepares (and seals) the dataset, the others read it
            self.group.barrier("waiting for rank 0 to load the dataset")
        report = load_dataset(cfg.data, run_dir=self.run_dir)
        if self.main and self.group.world_size > 1:
            self.group.barrier("waiting for the other ranks after loading the dataset")
        train_recs, val_recs = split_by_sequence(report.records, cfg.data.val_fraction, cfg.data.split_seed)
        if t.val_max_samples:
            val_recs = val_recs[: t.val_max_samples]
        log.info("data: %d structures (%d skipped) -> %d train / %d validation, loaded in %.2fs",
                 len(report.records), len(report.skipped), len(train_recs), len(val_recs), time.monotonic() - t0)
        self.n_train = len(train_recs)
        self.train_batches = TrainBatches(train_recs, t.batch_size, cfg.data.crop_size, t.seed,
                                          self.env.rank, self.env.world_size)
        self.val_batches = ValBatches(val_recs, t.batch_size, cfg.data.crop_size)
        self.timings["data_s"] = time.monotonic() - t0

        self.model = StructureModel(cfg.model).to(self.device)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %d parameters on %s", n_params, self.device)
        self.forward: Any = self.model  # what a training step calls: DDP and torch.compile wrap it (_run)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                                              min_lr_ratio=t.min_lr_ratio))
        self.amp = t.amp and self.device.type == "cuda"
        # bf16 autocast needs no loss scaling; the scaler is kept (disabled) so the checkpoint
        # layout is the same for every device and precision.
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)

        self.ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save,
                                      owner_check=self.lock.verify,  # a lost run lock commits and prunes nothing
                                      events=self.events)
        if self.main:  # the writer; preflight also removes dead writers' temporary files
            try:
                make_private_dir(cfg.checkpoint_dir)  # no group member may swap a checkpoint
            except OSError:
                pass  # preflight says what is wrong with it and what to do
            est = 3 * n_params * 4 + (1 << 20)  # params + 2 Adam moments, fp32, + overhead
            self.ckpt.preflight(est, cfg.checkpoint.min_free_mb << 20)

    def _join(self) -> None:
        """Meet the other ranks (nothing to do for one process); see foldhpc.distributed."""
        env, t = self.env, self.cfg.train
        if not env.distributed:
            return
        if t.batch_size % env.world_size:
            raise ConfigError(f"train.batch_size = {t.batch_size} cannot be split over {env.world_size} ranks: "
                              f"use a multiple of {env.world_size} (it is the global batch)")
        self.group = open_group(env, self.cfg.distributed.backend, self.device.type, self.cfg.distributed.timeout_s)
        self.timings["rendezvous_s"] = getattr(self.group, "join_s", 0.0)
        layout: list[dict[str, Any]] = self.group.all_gather({"rank": env.rank, "node": env.node, "host": socket.gethostname(),
                                        "pid": os.getpid(), "device": str(self.device)}, "exchanging rank layout")
        self.layout = layout
        if self.main:
            ranks.remove_stale(self.run_dir, env.world_size)
            nodes = sorted({r["node"] for r in layout})
            log.info("%d ranks on %d node(s) %s, %s backend", env.world_size, len(nodes), ",".join(nodes),
                     getattr(self.group, "backend", "?"))
            self.status.update(world_size=env.world_size, nodes=nodes, ranks=layout)

    def _restore(self) -> None:
        """Resume according to ``self.resume``; leaves step 0 if there is nothing to resume.

        Rank 0 picks the checkpoint (and repairs the index if it must); the others load the
        file it picked, so every rank starts from the same state.
        """
        t0 = time.monotonic()
        self.timings["setup_s"] = t0 - self._t_setup
        picked: tuple[dict[str, Any], dict[str, Any], Path] | None = None
        error: CheckpointError | None = None
        if self.main:
            try:
                picked = self._pick_checkpoint()
            except CheckpointError as e:
                error = e
        if self.group.world_size > 1:
            choice = self.group.broadcast({"path": str(picked[2]) if picked else None,
                                           "error": str(error) if error else None},
                                          "waiting for rank 0 to choose the checkpoint to resume from")
            if choice["error"] and error is None:
                raise CheckpointError(f"rank 0 could not resume: {choice['error']}")
            if not self.main and choice["path"]:
                path = Path(choice["path"])
                payload = self.ckpt.load_file(path)
                picked = (payload["state"], payload["meta"], path)
        if error is not None:
            raise error
        if picked is None:
            return
        state, meta, where = picked
        forced = self._check_compatible(meta, where)
        # A restart (the supervisor's, a requeue) resumes from the newest commit, without this
        # start's arguments: until the next save that would be the line the user turned away from.
        self.commit_resume_choice = forced or self.resume not in ("auto", "never")
        self.load_state_dict(state)
        if self.force_resume:
            self._apply_optimizer_config()
        self.restarts += 1
        self.timings["checkpoint_load_s"] = time.monotonic() - t0
        log.info("resumed from %s at step %d (restart #%d, checkpoint load %.2fs)",
                 where, self.step, self.restarts, self.timings["checkpoint_load_s"])
        self.events.emit("resumed", path=str(where), step=self.step, restarts=self.restarts,
                         load_s=self.timings["checkpoint_load_s"])

    def _pick_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any], Path] | None:
        """(state, meta, file) to resume from according to ``self.resume``, or None."""
        if self.resume == "never":
            self.ckpt.move_aside()  # by rename, inside the checkpoint directory: see CheckpointManager.move_aside
            return None
        if self.resume == "auto":
            loaded = self.ckpt.load_latest()
            if loaded is None:
                return None
            self.ckpt.last_committed = loaded.entry
            if loaded.skipped:
                self.status.update(warning=f"skipped bad checkpoints: {loaded.skipped}")
            return loaded.state, loaded.meta, loaded.path
        path = Path(self.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file")
        payload = self.ckpt.load_file(path)
        return payload["state"], payload["meta"], path

    def _check_compatible(self, meta: dict[str, Any], where: Path) -> bool:
        """Refuse a checkpoint whose config would change the trajectory (see foldhpc.train.compat);
        True if ``--force-resume`` overrode such a refusal."""
        old = meta.get("config")
        forced = False
        if old is None and meta.get("config_fingerprint") not in (None, self.cfg.fingerprint()):
            msg = (f"checkpoint {where} was written with a different model/data config (fingerprint "
                   f"{meta.get('config_fingerprint')} != {self.cfg.fingerprint()}). Resume with the original "
                   "config, use --no-resume to start over, or --force-resume to load anyway.")
            if not self.force_resume:
                raise CheckpointError(msg)
            log.warning("--force-resume: %s", msg)
            forced = True
        forced |= bool(check_resume(old, self.cfg.to_dict(), where, self.force_resume).trajectory)
        changed = runtime_differences(meta, self.device_kind, str(torch.__version__), self.env.world_size)
        if changed:
            log.warning("checkpoint %s was written with %s: training continues, but not bit-identically to an "
                        "uninterrupted run", where, "; ".join(changed))
        return forced

    def _commit_resume_choice(self) -> None:
        """Make the state chosen by ``--resume PATH`` or ``--force-resume`` the newest commit, now.

        A restart after a crash (the supervisor's) or a requeue resumes "from the newest" without
        this start's arguments; before the first save of the new line that is the abandoned line's
        newest checkpoint, refused for its old config or, with a compatible one, silently continued.
        A blocking save of the resumed state (reason ``resume-choice``, with the current config)
        closes that window. If it fails nothing was trained: a user error (exit 2), never retried,
        since a retry would resume the abandoned line.
        """
        error: str | None = None
        if self.main:
            log.info("committing the resumed state (step %d) as the newest checkpoint, so that a restart "
                     "continues from it", self.step)
            self.hb.beat(self.step, "checkpoint")
            try:
                self.ckpt.save(self.step, self.state_source(), self.checkpoint_meta(), reason="resume-choice",
                               blocking=True)
            except CheckpointError as e:
                error = str(e)
        error = self.group.broadcast(error, "waiting for rank 0 to commit the resumed checkpoint")
        if error is not None:
            err = CheckpointError(f"the resumed checkpoint could not be committed ({error}); nothing was trained. "
                                  "Fix the checkpoint directory and run the same command again.")
            err.exit_code = ExitCode.USAGE  # type: ignore[attr-defined]
            raise err
        self.commit_resume_choice = False

    def _apply_optimizer_config(self) -> None:
        """Make ``train.lr`` / ``train.weight_decay`` take effect after loading a checkpoint.

        The optimizer and scheduler state dicts carry the hyperparameters they were created with;
        loading them would silently keep the old values after a ``--force-resume`` that changed
        them. With unchanged values this recomputes exactly what was loaded.
        """
        t = self.cfg.train
        factor = lr_factor(self.scheduler.last_epoch, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                           min_lr_ratio=t.min_lr_ratio)
        self.scheduler.base_lrs = [t.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["initial_lr"] = t.lr
            g["weight_decay"] = t.weight_decay
            g["lr"] = t.lr * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train, holding the run directory's lock (rank 0; foldhpc.resilience.runlock) from before
        anything is written there until training returns or fails: a second trainer on a run
        directory in use raises :class:`~foldhpc.resilience.runlock.RunDirLocked` (exit 2)."""
        make_private_dir(self.run_dir)  # 0750, and nothing written in it group-writable (foldhpc.records.status)
        self.lock = runlock.NoLock()
        if self.main:
            try:
                self.lock = runlock.acquire(self.run_dir, self.cfg.fault.lock_stale_after)
            except runlock.RunDirLocked as e:
                runlock.record_refusal(self.run_dir, e)
                raise
        try:
            if self.main:  # checkpoint.dir is this run's too, or someone else's: refuse before writing there
                note = runlock.claim_checkpoint_dir(self.cfg.checkpoint_dir, self.run_dir)
                if note and isinstance(self.lock, runlock.RunLock):
                    self.lock.notes.append(note)
            result = self._run_locked()
        finally:
            self.lock.release()
        # the work is safe; what follows is the interpreter's teardown (seconds on a loaded node),
        # which the supervisor judges by the startup allowance, not the hang timeout
        hb.heartbeat().beat(result.step, "done")
        return result

    def _run_locked(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(cfg.run.log_level, self.run_dir / LOG_FILE, env.rank if env.distributed else None)
        self.events = EventLog(self.run_dir, env.rank)
        slurm = slurm_env()
        self.events.emit("process_start", process_start_t=time.time() - process_age_s(), max_steps=cfg.train.max_steps,
                         host=socket.gethostname(), world_size=env.world_size, node=env.node,
                         supervised=os.environ.get(SUPERVISED_ENV) == "1", slurm_job_id=slurm.job_id,
                         slurm_restart_count=slurm.restart_count, foldhpc_version=foldhpc.__version__)
        self.lock.log_acquired()
        self._started_at = time.time()
        if self.main:
            try:
                atomic_write_text(self.run_dir / CONFIG_FILE, config_to_toml(cfg))
            except OSError as e:  # run.dir full: every checkpoint holds the config too
                log.warning("cannot write %s (%s): training goes on (each checkpoint records the config)",
                            self.run_dir / CONFIG_FILE, e.strerror or e)
        self.status: StatusSink = StatusFile(self.run_dir) if self.main else NullStatus()
        self.status.update(state=RUNNING, max_steps=cfg.train.max_steps, started_at=self._started_at, error=None,
                           signal=None, slurm_job_id=slurm.job_id, slurm_restart_count=slurm.restart_count,
                           world_size=env.world_size, failed_ranks=None)
        if env.distributed:
            ranks.write_record(self.run_dir, env, ranks.RUNNING)
        self.hb = hb.heartbeat()
        self.restart_info: dict[str, Any] = json.loads(os.environ.get(RESTART_INFO_ENV) or "{}")
        if os.environ.get(SUPERVISED_ENV) == "1":
            hb.enable_stack_dump(self.run_dir / STACKS_FILE)
            self.status.update(in_job_restarts=self.restart_info.get("in_job_restarts", 0))
        self.timings: dict[str, float] = {"imports_s": process_age_s()}
        try:
            result = self._run()
        except BaseException as e:
            if isinstance(e, SystemExit) and e.code in (0, None) or isinstance(e, runlock.RunDirLocked):
                raise  # RunDirLocked: the run directory is someone else's now; write nothing more
            self._record_failure(e)
            raise
        if env.distributed:
            ranks.write_record(self.run_dir, env, ranks.DONE, result=result.state, step=result.step)
            self.group.close()
        return result

    def _record_failure(self, e: BaseException) -> None:
        """Log the failure and put it in status.json; with several ranks, name the rank to blame
        (see foldhpc.distributed.ranks): every failing rank writes it, they agree on the culprit."""
        msg = f"{type(e).__name__}: {e}"
        # A user error (exit 2: config, data, checkpoint directory) is in train.log, not a second
        # time on the console, where `foldhpc` prints it as one line; tracebacks are for bugs.
        user_error = isinstance(e, ConfigError) or getattr(e, "exit_code", None) == ExitCode.USAGE
        log.error("run failed at step %d: %s", self.step, msg,
                  exc_info=not isinstance(e, (CheckpointError, ConfigError, DataError, PeerFailure, NonFiniteError)),
                  extra={"console": False} if user_error else None)
        self.events.emit("failed", step=self.step, error=msg, error_type=type(e).__name__, user_error=user_error)
        if not self.env.distributed:
            self.status.update(state=FAILED, step=self.step, error=msg)
            return
        ranks.record_failure(self.run_dir, self.env, msg, self.step, self._started_at, isinstance(e, PeerFailure),
                             self.events, self.status)

    def _run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        sigs = cfg.checkpoint.signal_numbers()
        with PreemptionSignals(sigs) as preempt:
            try:
                self._setup()
                self._restore()
            except CheckpointError as e:
                # Before the first step (checkpoint directory unusable, no usable checkpoint, a
                # resume refused): nothing is lost and a restart cannot fix it -- the user must act.
                e.exit_code = ExitCode.USAGE  # type: ignore[attr-defined]
                raise
            if self.env.distributed:  # after the restore: DDP broadcasts rank 0's weights (identical anyway)
                self.forward = torch.nn.parallel.DistributedDataParallel(
                    self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if t.compile and self.device.type == "cuda":
                self.forward = torch.compile(self.forward)
            self.writer: ScalarSink = (RunWriter(self.run_dir / TENSORBOARD_DIR, start_step=self.step)
                                                   if self.main else NullWriter())
            if self.restarts:
                failure = self.restart_info.get("last_failure")
                note = (f"; restarted inside the job after: {failure['reason']} at step {failure['step']}"
                        if failure else "")
                job = slurm_env()
                self.writer.restart_marker(self.step, self.restarts, job.job_id, job.restart_count, note)
                if failure:
                    self.writer.scalar("run/in_job_restarts", self.restart_info.get("in_job_restarts", 0), self.step)
            self.status.update(step=self.step, restarts=self.restarts)
            if self.commit_resume_choice:
                self._commit_resume_choice()
            log.info("training steps %d..%d, batch %d, crop %d, checkpoint every %s%s, signals %s",
                     self.step, t.max_steps, t.batch_size, cfg.data.crop_size, cfg.checkpoint.interval,
                     f" and {cfg.checkpoint.every_steps} steps" if cfg.checkpoint.every_steps else "",
                     ",".join(s.name for s in sigs))
            self.events.emit("training", first=self.step, last=t.max_steps, batch=t.batch_size,
                             crop=cfg.data.crop_size, restarts=self.restarts)
            try:
                result = self._loop(preempt)
            finally:
                self.ckpt.wait()
                self.writer.close()
        return result

    def _make_loader(self) -> DataLoader[Batch]:
        nw = self.cfg.data.num_workers
        return DataLoader(
            self.train_batches, batch_size=None,
            sampler=StepSampler(self.step, self.cfg.train.max_steps),
            num_workers=nw, prefetch_factor=4 if nw else None,
            worker_init_fn=functools.partial(_worker_init, self.cfg.checkpoint.signal_numbers()) if nw else None,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # keep DataLoader from drawing on the global torch RNG
        )

    def _save(self, reason: str, blocking: bool) -> bool:
        if blocking:
            self.hb.beat(self.step, "checkpoint")
            self.ckpt.wait()
        last = self.ckpt.last_committed
        if last is not None and last.step == self.step and not self.ckpt.in_flight:
            return True  # this exact state is already durable
        # Every scalar up to this step reaches the event file before the checkpoint can exist, so a
        # run killed after the commit resumes onto curves without a gap (a resume purges only the
        # events after the checkpoint's step). Cheap: at most one flush per save.
        self.writer.flush()
        return self.ckpt.save(self.step, self.state_source(), self.checkpoint_meta(), reason=reason,
                              blocking=blocking)

    def _note_checkpoint(self, seen: list[Any]) -> None:
        """Surface background-save results on the training thread (status, TensorBoard)."""
        err = self.ckpt.poll_error()
        if err is not None:
            self.status.update(last_save_error=f"{type(err).__name__}: {err}")
            self.writer.scalar("checkpoint/failed", 1, self.step)
        last = self.ckpt.last_committed
        if last is not None and (not seen or seen[-1] is not last):
            seen.append(last)
            self.status.update(last_checkpoint={"step": last.step, "file": last.file, "saved_at": last.saved_at},
                               last_save_error=None)
            self.writer.scalar("checkpoint/write_s", last.write_s, last.step)
            self.writer.scalar("checkpoint/step", last.step, last.step)
            self.writer.flush()  # durable checkpoint, durable curves (incl. the scalars just above)

    def _save_for_exit(self, reason: str, seen: list[Any]) -> None:
        """A blocking save that every rank waits for (rank 0 writes; the state is replicated).

        No rank may exit on a checkpoint that is not durable yet: the job would be requeued onto
        an older one. A failure on rank 0 is raised on every rank.
        """
        error: str | None = None
        if self.main:
            try:
                self._save(reason, blocking=True)
                self._note_checkpoint(seen)
            except CheckpointError as e:
                if self.group.world_size == 1:
                    raise
                error = str(e)
                self.group.broadcast(error, "telling the other ranks that the checkpoint failed")
                raise
        error = self.group.broadcast(error, "waiting for rank 0 to commit the checkpoint")
        if error is not None:
            raise CheckpointError(f"rank 0 could not write the checkpoint: {error}")

    def _wait_staged(self) -> None:
        """Wait for the save in flight to have read the state :meth:`optimizer.step` changes, beating.

        One beat always, after this step's forward and backward (the slow part of a first step:
        cold kernels, ``torch.compile``): the supervisor then judges the rest of the first step by
        the hang timeout, not the startup allowance. While waiting (a large CPU state is read
        by the write itself, which can take minutes on a slow file system) a beat every
        :data:`~foldhpc.resilience.heartbeat.WAIT_BEAT_S`: the trainer is waiting, not hung.
        """
        self.hb.beat(self.step + 1, "train")
        while not self.ckpt.wait_staged(timeout=hb.WAIT_BEAT_S):
            self.hb.beat(self.step + 1, "checkpoint")

    def _loop(self, preempt: PreemptionSignals) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        interval = cfg.checkpoint.interval_s
        every = cfg.checkpoint.every_steps
        dev = self.device
        world = self.group.world_size
        seen: list[Any] = []
        it: Iterator[Batch] = iter(self._make_loader()) if self.step < t.max_steps else iter(())
        last_save_t = time.monotonic()
        steps_due = False  # a checkpoint.every_steps save not taken yet: a background save was in flight
        win: dict[str, Any] = {"t0": time.monotonic(), "data": 0.0, "steps": 0, "loss": 0.0}
        metrics: dict[str, float] = {}
        loss_val: float | None = None  # mean loss of the latest log window
        first_step_logged = False
        start_step = self.step

        def stop() -> bool:
            return preempt.received is not None

        if validation_due(self.step, t.val_every, t.max_steps) and self.val_step != self.step:
            # step 0: the untrained baseline, so the curves show what training bought; later: a
            # validation that a signal cut short before this checkpoint was saved
            self._validate(stop)
        while True:
            # The step boundary. With several ranks they agree here, every step, on whether to
            # stop (a signal may have reached only some of them) and whether the save timer has
            # run out (their clocks differ): all stop, or save, at the same step.
            # working on step self.step + 1 (the trainer's numbering); "first": start-up until its backward
            self.hb.beat(self.step + 1, "train" if self.step != start_step else "first")
            self.lock.check()  # taken over by another trainer (foldhpc.resilience.runlock): stop, write nothing
            received = int(preempt.received) if preempt.received is not None else 0
            timer_due = interval > 0 and time.monotonic() - last_save_t >= interval
            t_boundary = time.monotonic()
            signum, timer_due = self.group.agree(received, timer_due)
            t_agree = time.monotonic()
            if signum:
                sig = signal.Signals(signum).name
                if not received:
                    log.warning("another rank received %s: stopping at step %d with it", sig, self.step)
                in_flight = self.ckpt.in_flight
                log.warning("received %s: saving a checkpoint at step %d, then exiting for requeue%s", sig, self.step,
                            " (waiting for the background save in flight first)" if in_flight else "")
                self.events.emit("signal", signal=sig, step=self.step, in_flight=in_flight, from_peer=not received)
                t0 = time.monotonic()
                self._save_for_exit(f"signal:{sig}", seen)
                durable_s = time.monotonic() - t0
                log.warning("checkpoint at step %d durable %.2fs after the step boundary; exit %d",
                            self.step, durable_s, ExitCode.CHECKPOINTED)
                self.events.emit("checkpoint_durable", step=self.step, after_boundary_s=round(durable_s, 4))
                self.status.update(state=CHECKPOINTED, step=self.step, signal=sig)
                self.events.emit("checkpointed", step=self.step, signal=sig, during="training")
                return TrainResult(CHECKPOINTED, self.step, sig, rank=self.env.rank)
            if self.step >= t.max_steps:
                break
            at_multiple = bool(every) and self.step > start_step and self.step % every == 0
            steps_due = steps_due or at_multiple
            if steps_due or timer_due:
                if not self.main or self._save("steps" if steps_due else "timer", blocking=False):
                    last_save_t = time.monotonic()
                    steps_due = False
                elif at_multiple:  # one save in flight at most: this one is taken at the first free boundary
                    log.warning("checkpoint.every_steps = %d: the save at step %d is deferred, a background save is "
                                "still being written; it is taken at the first step boundary where the writer is "
                                "free", every, self.step)
            t_start = time.monotonic()
            wait_s = t_agree - t_boundary  # the stop agreement: waiting for the slowest rank
            batch = next(it)
            t_data = time.monotonic() - t_start
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            torch.manual_seed(step_seed(t.seed, self.step, self.env.rank))  # dropout etc.: (seed, step, rank)
            self.model.train()
            with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext():
                out = self.forward(batch)
                loss, stats = distogram_loss(out["distogram_logits"].float(), batch)
            loss = faults.nan_loss(loss, self.step + 1, self.env.rank, self.model, self.events)  # test hook, off unless set
            loss = faults.loss_spike(loss, self.step + 1, self.env.rank, self.events)  # test hook, off unless set
            own = loss.detach()  # this rank's own loss (a replay compares it with the first time's)
            share = loss.detach()  # this rank's part of the global batch's loss
            global_loss: torch.Tensor | None = own  # the global batch's loss, for the spike trigger
            bad = self.guard.loss_flag(loss)  # 1 where this rank's loss is not finite (no host sync)
            if world > 1:
                # The loss is a mean over the residue pairs of the *global* batch: weigh this
                # rank's mean by its share of the pairs, so that DDP's average of the ranks'
                # gradients is the gradient of the global mean whatever the world size.
                pairs = stats["per_example_pairs"].sum().detach().float()
                spike = self.sdc.spike_factor > 0  # the global loss rides along (pairs and flags sum exactly)
                t_sum = time.monotonic()
                summed = self.group.sum_(torch.stack([pairs, bad] + ([own.float() * pairs] if spike else [])))
                wait_s += time.monotonic() - t_sum
                total, bad = summed[0], summed[1]  # bad: any rank's loss
                global_loss = summed[2] / total.clamp(min=1.0) if spike else None
                weight = pairs * world / total.clamp(min=1.0)
                loss = loss * weight
                share = loss.detach() / world
            self.optimizer.zero_grad(set_to_none=True)
            # with DDP the backward all-reduces the gradients: a dead peer fails it (a PeerFailure,
            # so the culprit is named, not this rank)
            self.group.collective("the gradient all-reduce (backward)", loss.backward)
            max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            faults.cold_first_step()  # test hook, off unless set
            self._wait_staged()  # a background save still copying the last step's weights
            # a non-finite loss or gradient norm: the update is skipped, the step consumed (same verdict on every rank)
            applied = self.guard.check(self.step + 1, bad, gnorm, self.writer, self.status, self.events)
            # a replay with several ranks: the state before the update, to recompute it if the ranks diverge
            snap = Snapshot(self.model, self.optimizer) if self.sdc.replay is not None and world > 1 else None
            if applied:
                self.optimizer.step()
            lr = cast(float, self.scheduler.get_last_lr()[0])  # a float lr (torch: float | Tensor)
            self.scheduler.step()
            self.step += 1
            faults.bitflip(self.step, self.env.rank, self.model, self.events)  # test hook, off unless set
            faults.after_step(self.step, self.env.rank, self.events)  # test hooks; nothing unless set (foldhpc.faults)
            step_s = time.monotonic() - t_start
            self.train_time_s += step_s
            self.stragglers.add(time.monotonic() - t_boundary, wait_s)
            self.sdc.note_step(self.step, own, self.model if world > 1 and self.sdc.check_every > 0 else None)
            if self._sdc_step(global_loss, applied, snap):  # an attribution rolled back: replay from there
                it = iter(self._make_loader())
                win = {"t0": time.monotonic(), "data": 0.0, "steps": 0, "loss": 0.0}
                continue
            if self.stragglers.due(self.step):
                self._judge_stragglers()
            if self.guard.rollback_due:  # K non-finite steps in a row: back to the newest good checkpoint
                self._after_rollback(self.guard.rollback(self.step, self._restore_for_rollback, self.events))
                it = iter(self._make_loader())
                win = {"t0": time.monotonic(), "data": 0.0, "steps": 0, "loss": 0.0}
                continue
            if not first_step_logged:
                first_step_logged = True
                self.timings["first_step_s"] = step_s
                self.timings["process_to_first_step_s"] = process_age_s()
                log.info("first step (%d) done in %.3fs; %.2fs after process start (%s)", self.step, step_s,
                         self.timings["process_to_first_step_s"],
                         ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
                self.events.emit("first_step", step=self.step, step_s=step_s,
                                 after_start_s=self.timings["process_to_first_step_s"], timings=dict(self.timings))
                self.status.update(startup=self.timings)
            win["data"] += t_data
            win["steps"] += 1
            if applied:
                win["loss"] += share  # no host sync per step; read at log time
            else:
                win["skipped"] = win.get("skipped", 0) + 1  # not finite: left out of the mean loss
            if self.step % cfg.run.log_every == 0 or self.step == t.max_steps:
                if world > 1:
                    win["loss"] = self.group.sum_(torch.as_tensor(win["loss"], device=dev).clone())
                loss_val = self._log_progress(win, lr, float(gnorm))
                win = {"t0": time.monotonic(), "data": 0.0, "steps": 0, "loss": 0.0}
            if validation_due(self.step, t.val_every, t.max_steps):
                metrics = self._validate(stop) or metrics
                win["t0"] = time.monotonic()  # validation is not training throughput
            self._note_checkpoint(seen)
        # end of training
        self._save_for_exit("final", seen)
        final = self._validate(stop)
        final_state = self.group.broadcast(CHECKPOINTED if final is None else COMPLETED,
                                           "waiting for rank 0's final validation")
        if final_state == CHECKPOINTED:
            # The final checkpoint is durable; exit for requeue, the resumed run (at max_steps)
            # only validates.
            sig = preempt.received.name if preempt.received is not None else "?"
            log.warning("received %s during the final validation: the final checkpoint (step %d) is durable; "
                        "exiting for requeue, the next start validates and completes", sig, self.step)
            self.events.emit("checkpointed", step=self.step, signal=sig, during="final_validation")
            self.status.update(state=CHECKPOINTED, step=self.step, signal=sig)
            return TrainResult(CHECKPOINTED, self.step, sig, rank=self.env.rank)
        metrics = final or {}
        if loss_val is not None and math.isfinite(loss_val):
            self.status.update(loss=loss_val)
        self.status.update(state=COMPLETED, step=self.step, metrics=metrics, finished_at=time.time(),
                           **({"sdc": self.sdc.summary()} if self.env.world_size > 1 else {}))
        log.info("training completed at step %d: %s", self.step, json.dumps(metrics))
        self.events.emit("completed", step=self.step, metrics=metrics)
        return TrainResult(COMPLETED, self.step, None, metrics, rank=self.env.rank)

    def _restore_for_rollback(self, max_step: int | None = None) -> Restored:
        """The non-finite guard's ``restore`` (foldhpc.resilience.nonfinite): reload the newest good
        checkpoint on every rank, rank 0 choosing it as at a resume. The time spent and the restart
        count are what happened, not what the file says. Raises RollbackUnavailable if there is none.

        ``max_step`` (an attribution's replay, foldhpc.train.sdc): the newest good checkpoint at or
        before that step -- a newer one may hold the state the replay is to judge."""
        self.hb.beat(self.step, "checkpoint")  # loading one
        self.ckpt.wait()  # a save in flight is committed (or failed) first
        path: str | None = None
        error: str | None = None
        state: dict[str, Any] | None = None
        if self.main and max_step is not None:
            for entry in reversed([e for e in self.ckpt.entries() if e.step <= max_step]):
                try:
                    state, path = self.ckpt.load_file(self.ckpt.dir / entry.file)["state"], str(self.ckpt.dir / entry.file)
                    break
                except CheckpointError as e:
                    log.error("checkpoint %s (step %d) cannot be replayed from: %s", entry.file, entry.step, e)
            if path is None:
                error = f"there is no checkpoint at or before step {max_step} to replay from"
        elif self.main:
            try:
                loaded = self.ckpt.load_latest() if self.ckpt.last_committed is not None else None
                if loaded is None and self.resume not in ("auto", "never"):
                    payload = self.ckpt.load_file(Path(self.resume))  # resumed from it, nothing newer since
                    state, path = payload["state"], str(self.resume)
                elif loaded is not None:
                    state, path = loaded.state, str(loaded.path)
                    self.ckpt.last_committed = loaded.entry
            except CheckpointError as e:
                error = f"the checkpoint to roll back to cannot be loaded: {e}"
            if path is None and error is None:
                error = "there is no checkpoint to roll back to"
        if self.group.world_size > 1:
            choice = self.group.broadcast({"path": path, "error": error},
                                          "waiting for rank 0 to choose the checkpoint to roll back to")
            path, error = choice["path"], choice["error"]
            if error is None and not self.main:
                try:
                    # rank 0 sends a path whenever it sends no error
                    state = self.ckpt.load_file(Path(cast(str, path)))["state"]
                except CheckpointError as e:
                    error = f"rank {self.env.rank} cannot load {path}: {e}"
        if error is not None:
            raise RollbackUnavailable(error)
        assert state is not None and path is not None
        spent, restarts = self.train_time_s, self.restarts
        self.load_state_dict(state)  # the guard's own state is merged, see NonFiniteGuard.load_state_dict
        self.train_time_s, self.restarts = spent, restarts
        return Restored(self.step, path)

    # ------------------------------------------------------------------ silent data corruption
    def _sdc_step(self, global_loss: torch.Tensor | None, applied: bool, snap: Snapshot | None) -> bool:
        """After each step: the replica check when due, the triggers, a replay's comparisons (see
        foldhpc.train.sdc). True when an attribution has just rolled the state back (the loop then
        replays from there). Every decision here is the same on every rank: its inputs are
        all-gathered or all-reduced."""
        sdc = self.sdc
        replay = sdc.replay
        if replay is not None:
            self._replay_step(replay, snap, applied, global_loss)
            if self.step >= replay.last:
                self._finish_replay(replay)
            return False
        trigger: str | None = None
        digests: list[str] | None = None
        if sdc.check_due(self.step):
            t0 = time.monotonic()
            mine = replica_digest(self.model, self.optimizer)
            sdc.digest_s += time.monotonic() - t0
            digests = self.group.all_gather(mine, "the replica consistency check (fault.sdc_check_every)")
            sdc.checks += 1
            sdc.check_s += time.monotonic() - t0
            if len(set(digests)) == 1:
                sdc.verified = self.step
            else:
                trigger = "mismatch"
                odd = [r for r, d in enumerate(digests) if digests.count(d) < max(map(digests.count, digests))]
                sdc.mismatches.append(self.step)
                log.error("step %d: the replicas' weights and optimizer state DIFFER (digests %s; last agreed at "
                          "step %d): silent data corruption; attributing it by a replay", self.step,
                          ", ".join(f"rank {r} {d}" for r, d in enumerate(digests)), sdc.verified)
                self.events.emit("sdc_mismatch", step=self.step, digests=digests, ranks=odd, verified=sdc.verified)
                self.writer.scalar("sdc/mismatch", 1, self.step)
        if trigger is None and global_loss is not None and sdc.spike_factor > 0 \
                and sdc.spike(self.step, float(global_loss)):
            trigger = "loss_spike"
        if trigger is None and sdc.on_nonfinite and not applied and not self.guard.rollback_due:
            trigger = "nonfinite"
        if trigger is None:
            return False
        self._start_replay(trigger, digests, global_loss)
        return True

    def _start_replay(self, trigger: str, digests: list[str] | None, global_loss: torch.Tensor | None) -> None:
        """Roll back to the newest checkpoint before the suspect window and arm the replay."""
        sdc, at = self.sdc, self.step
        if digests is None:
            digests = self.group.all_gather(replica_digest(self.model, self.optimizer), "the replicas' digests")
        first_global = float(global_loss) if global_loss is not None else None
        checked = self.env.world_size > 1 and sdc.check_every > 0
        limit = min(sdc.verified, at - 1) if checked else at - 1
        traces = sdc.traces_since(0)
        t0 = time.monotonic()
        try:
            restored = self._restore_for_rollback(max_step=limit)
        except RollbackUnavailable as e:
            if trigger == "mismatch":  # the replicas differ and nothing can tell or heal it
                raise RuntimeError(f"silent data corruption: the replicas differ at step {at} and {e}; resume the "
                                   "run from an older checkpoint (--resume PATH) or start over") from None
            log.warning("step %d: %s; no attribution (%s)", at, trigger, e)
            return
        sdc.replay = Replay(trigger=trigger, first=restored.step + 1, last=at, path=restored.path, digests=digests,
                            traces=traces, global_loss=first_global, t0=t0)
        log.warning("step %d: %s: replaying steps %d-%d from %s to attribute it", at, trigger, restored.step + 1, at,
                    restored.path)
        self.events.emit("sdc_replay", step=at, trigger=trigger, first=restored.step + 1, last=at, path=restored.path)
        if self.main:  # the curves after the checkpoint are replayed: drop them, as a rollback does
            self.writer.close()
            self.writer = RunWriter(self.run_dir / TENSORBOARD_DIR, start_step=restored.step)
        self.status.update(step=restored.step, sdc=sdc.summary())

    def _replay_step(self, replay: Replay, snap: Snapshot | None, applied: bool,
                     global_loss: torch.Tensor | None) -> None:
        """One replayed step: its trace against the first time's, the ranks' digests against each
        other; a divergence is voted on and repaired at once (see foldhpc.train.sdc)."""
        first = replay.traces.get(self.step)
        if first is not None and replay.deviation is None and not same_trace(self.sdc.traces[self.step].tolist(), first):
            replay.deviation = self.step
        if self.group.world_size > 1:
            actual = self.group.all_gather(replica_digest(self.model, self.optimizer), "the replay's digests")
            if len(set(actual)) > 1:
                redo = snap.recompute_digest(self.model, self.optimizer) if snap is not None else actual[self.env.rank]
                recomputed = self.group.all_gather(redo, "the replay's recomputed digests")
                majority, outvoted = vote(actual, recomputed)
                if replay.diverged is None:
                    replay.diverged, replay.suspects = self.step, outvoted
                log.error("replay step %d: the replicas differ again (digests %s; recomputed %s): rank(s) %s "
                          "outvoted; they take rank %s's state", self.step, actual, recomputed, outvoted,
                          next((r for r, d in enumerate(actual) if d == majority), "?"))
                self._repair(actual, majority)
        if self.step == replay.last:
            if replay.trigger == "loss_spike":
                replay.reproduced = global_loss is not None and float(global_loss) == replay.global_loss
            elif replay.trigger == "nonfinite":
                replay.reproduced = not applied
            else:
                replay.reproduced = replay.diverged is not None

    def _repair(self, actual: list[str], majority: str) -> None:
        """The ranks whose state is not ``majority`` take it from the lowest rank that has it."""
        src = next((r for r, d in enumerate(actual) if d == majority), None)
        if src is None:
            log.error("no rank holds the majority state; the replicas stay as they are")
            return
        import torch.distributed as dist

        for t in state_tensors(self.model, self.optimizer):
            self.group.collective("the repair broadcast", dist.broadcast, t, src)

    def _finish_replay(self, replay: Replay) -> None:
        """The verdict, recorded everywhere: events, status.json, TensorBoard, train.log."""
        sdc = self.sdc
        mine: dict[str, Any] = {"digest": replica_digest(self.model, self.optimizer), "deviation": replay.deviation,
                "reproduced": replay.reproduced}
        every = self.group.all_gather(mine, "the replay's verdict")
        samples = [self.train_batches.records[i].id for i in self.train_batches.indices(replay.last - 1)]
        seconds = time.monotonic() - replay.t0
        known = dict(sdc.suspect_nodes)
        result = sdc.conclude(replay, [e["digest"] for e in every], [e["deviation"] for e in every],
                              [bool(e["reproduced"]) for e in every], self.layout, samples, seconds)
        where = (f"rank(s) {', '.join(map(str, result['ranks']))} on {', '.join(result['nodes'])}"
                 if result["ranks"] else "no rank")
        log.warning("attribution of the %s at step %d: %s%s, step %d, suspect: %s (replay of steps %d-%d from %s "
                    "in %.2fs)%s", replay.trigger, replay.last, result["verdict"],
                    " (reproducible)" if result["reproducible"] else "", result["step"], where, replay.first,
                    replay.last, replay.path, seconds,
                    f"; its batch: {', '.join(samples)}" if result["verdict"] == "deterministic" else "")
        self.events.emit("sdc_attribution", **result)
        for node in result["nodes"]:
            if sdc.suspect_nodes.get(node, 0) >= 2 > known.get(node, 0):
                steps = [a["step"] for a in sdc.attributions if node in a.get("nodes", [])]
                log.error("node %s is suspect for the second time (steps %s): recorded for exclusion at the next "
                          "hand-over", node, steps)
                self.events.emit("sdc_suspect_node", node=node, suspected=sdc.suspect_nodes[node], steps=steps)
        self.writer.scalar("sdc/attributions", len(sdc.attributions), self.step)
        self.writer.scalar("sdc/replay_s", seconds, self.step)
        self.writer.scalar("sdc/suspect_ranks", len(result["ranks"]), self.step)
        self.status.update(sdc=sdc.summary())

    def _judge_stragglers(self) -> None:
        """Every fault.straggler_window steps: every rank's mean compute/wait; name the slow ones."""
        means = self.group.all_gather(self.stragglers.mine(), "the straggler window")
        named = self.stragglers.judge([(float(c), float(w)) for c, w in means], self.layout, self.step)
        for r, (c, w) in enumerate(means):
            self.writer.scalar(f"perf/compute_s/rank{r}", c, self.step)
            self.writer.scalar(f"perf/wait_s/rank{r}", w, self.step)
        self.writer.scalar("straggler/count", len(named), self.step)
        self.writer.scalar("straggler/ratio_max", max((n["ratio"] for n in named), default=0.0), self.step)
        for n in named:
            log.warning("rank %d on %s is a straggler: %.4fs of compute per step, %.2fx the median over the last %d "
                        "steps (fault.straggler_factor = %g)", n["rank"], n["node"], n["compute_s"], n["ratio"],
                        self.stragglers.window, self.stragglers.factor)
            self.events.emit("straggler", straggler_rank=n["rank"], **{k: v for k, v in n.items() if k != "rank"})
        self.status.update(stragglers=named)

    def _after_rollback(self, restored: Restored) -> None:
        """The curves after the checkpoint rolled back to are replayed: drop them, as a restart does."""
        if self.main:
            self.writer.close()
            self.writer = RunWriter(self.run_dir / TENSORBOARD_DIR, start_step=restored.step)
            self.writer.scalar("fault/rollbacks", len(self.guard.rollbacks), restored.step)
            self.writer.scalar("fault/nonfinite_skipped", self.guard.skipped, restored.step)
            self.writer.flush()
        self.status.update(step=restored.step, nonfinite=self.guard.summary())

    def _log_progress(self, win: dict[str, Any], lr: float, gnorm: float) -> float:
        """One progress line + scalars for the steps since the last one; returns their mean loss."""
        t = self.cfg.train
        dt = max(1e-9, time.monotonic() - win["t0"])
        n = max(1, int(win["steps"]))
        finite = n - int(win.get("skipped", 0))  # skipped (non-finite) steps are not in the mean
        loss = float(win["loss"]) / finite if finite > 0 else math.nan
        sps = n * t.batch_size / dt
        wait = win["data"] / dt
        eta = (t.max_steps - self.step) * dt / n
        log.info("step %d/%d loss %.4f lr %.2e gnorm %.3f | %.1f samples/s, data wait %.1f%% | ETA %s",
                 self.step, t.max_steps, loss, lr, gnorm, sps, 100 * wait, format_duration(eta))
        self.events.emit("progress", step=self.step, max_steps=t.max_steps, loss=loss, lr=lr, grad_norm=gnorm,
                         samples_per_s=sps, data_wait_frac=wait, steps=n, skipped=n - finite, eta_s=eta)
        w = self.writer
        if finite > 0:  # a window of skipped steps only has no loss to draw
            w.scalar("train/loss", loss, self.step)
        w.scalar("train/lr", lr, self.step)
        w.scalar("train/grad_norm", gnorm, self.step)
        w.scalar("perf/samples_per_s", sps, self.step)
        w.scalar("perf/data_wait_frac", wait, self.step)
        self.status.update(step=self.step, samples_per_s=sps, data_wait_frac=wait, eta_s=eta,
                           train_time_s=self.train_time_s, **({"loss": loss} if finite > 0 else {}),
                           **({"sdc": self.sdc.summary()} if self.env.world_size > 1 else {}))
        return loss

    def _beating(self, batches: Any) -> Any:
        """``batches``, with a heartbeat before each is fetched (validation can outlast many steps)."""
        it = iter(batches)
        while True:
            self.hb.beat(self.step, "validation")
            try:
                b = next(it)
            except StopIteration:
                return
            yield b

    def _validate(self, should_stop: Callable[[], bool]) -> dict[str, float] | None:
        """Validate at the current step; None if ``should_stop`` (a preemption signal) cut it short.

        Nothing of a cut-short validation is logged to TensorBoard or status, and ``val_step`` is
        not advanced, so the resumed run redoes it (see foldhpc.train.validation).
        """
        if not self.main:  # rank 0 validates (the weights are the same on every rank)
            return {}
        if len(self.val_batches) == 0:
            self.val_step = self.step
            return {}
        t0 = time.monotonic()
        log.info("validating at step %d (%d batches)", self.step, len(self.val_batches))
        self.events.emit("validation_start", step=self.step, batches=len(self.val_batches))
        try:
            metrics = evaluate(self.model, self._beating(debug_delayed(self.val_batches)), device=self.device,
                               should_stop=should_stop)
        except EvaluationStopped as e:
            seconds = time.monotonic() - t0
            log.warning("validation at step %d stopped by a preemption signal after %d of %d batches (%.2fs); "
                        "it is redone after the resume", self.step, e.batches_done, len(self.val_batches), seconds)
            self.events.emit("validation_end", step=self.step, seconds=seconds, stopped=True, metrics={},
                             batches_done=e.batches_done)
            return None
        self.val_step = self.step
        for k, v in metrics.items():
            self.writer.scalar(f"val/{k}", v, self.step)
        seconds = time.monotonic() - t0
        log.info("validation at step %d (%.1fs): %s", self.step, seconds,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.events.emit("validation_end", step=self.step, seconds=seconds, stopped=False, metrics=dict(metrics),
                         batches_done=len(self.val_batches))
        self.status.update(val=metrics, val_step=self.step)
        return metrics

