"""The non-finite guard: a NaN or inf never reaches the weights or a checkpoint.

Per step (:meth:`NonFiniteGuard.check`, between ``clip_grad_norm_`` and ``optimizer.step()``):
a step whose loss or gradient norm is not finite is **skipped**: no ``optimizer.step()`` (weights
and AdamW moments stay as they were), but the step is consumed like any other -- ``self.step``
advances and the LR scheduler steps -- because the data and dropout of step ``s`` are functions
of ``(seed, s)``: retrying the same step would only replay the same NaN, and keeping
``lr(s) = schedule(s)`` keeps the skip a pure function of the state and the step, so a run
resumed from any checkpoint replays it exactly (bit for bit, like every other step). A skip is
logged (a warning), counted (``status.json`` ``nonfinite``; TensorBoard ``fault/nonfinite_skipped``,
the running total) and left out of the logged mean loss.

After ``fault.nonfinite_rollback`` (K) consecutive skips the weights themselves are suspect:
:meth:`NonFiniteGuard.rollback` reloads the newest good checkpoint in the same process on every
rank (rank 0 picks it, as at a resume), purges the TensorBoard events after its step (as a
restart does) and records the rollback (log, ``status.json``, ``fault/rollbacks``). Replay is
deterministic, so a rollback cures a transient fault (a flipped bit, a flaky device) and nothing
else: if K consecutive skips end at a step where the run has already rolled back once, the fault
is deterministic (bad weights, bad data, a bug) and the run fails with :class:`NonFiniteError`
(``status.json``: failed, with the steps). No checkpoint to roll back to is a failure too. The
guard's counters and the steps it rolled back from travel in the checkpoint (``train.nonfinite``),
so a resumed run decides exactly as the uninterrupted one would have; a rollback the process did
not live to checkpoint is forgotten (the replay then rolls back once more before failing).

Several ranks: the verdict must be the same on every rank, or one rank would step and another
not and the replicas would silently diverge. What it relies on: (1) the gradient norm is computed
from DDP's all-reduced gradients, identical bit for bit on every rank (DDP's own correctness
rests on that: it never re-synchronises weights), so its finiteness is the same everywhere; a
NaN gradient on any rank makes every rank's norm NaN. (2) A rank's *loss* can be non-finite
while its gradients are not (a NaN in a term that does not reach the gradient), so each rank's
"my loss is not finite" flag rides along in the all-reduce the loop already does per step for
the pair-weighted loss (no extra collective) and the verdict reads the sum. The rollback
decision and the failure follow from the verdicts, so they agree too.

A checkpoint with non-finite weights is never written either: the checkpoint manager runs
:func:`nonfinite_tensors` on the staged state before writing (a refused save is logged and
reported like a failed one; the previous checkpoint stays the newest).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch


log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Non-finite steps the guard cannot cure: again at a place already rolled back from, or no
    checkpoint to roll back to. The trainer fails with it (state ``failed``, this message)."""


class NonFiniteGuard:
    """Skips non-finite steps, rolls back after ``rollback_after`` in a row; see the module doc."""

    def __init__(self, rollback_after: int) -> None:
        self.rollback_after = max(1, int(rollback_after))
        self.skipped = 0  # skipped steps over the run's history (rolled-back ones included)
        self.streak = 0  # consecutive skipped steps up to the current step
        self.streak_start = 0  # first step of the current streak
        self.rollbacks: list[dict[str, int]] = []  # {"first", "at", "to"}: streak first..at, back to step "to"
        self.rollback_due = False

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "streak": self.streak, "streak_start": self.streak_start,
                "rollbacks": [dict(r) for r in self.rollbacks]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """From a checkpoint (None: written before the guard existed). Merges what this process
        already knows: a rollback reloads an older state but must remember that it happened."""
        state = state or {}
        self.streak = int(state.get("streak", 0))
        self.streak_start = int(state.get("streak_start", 0))
        self.skipped = max(self.skipped, int(state.get("skipped", 0)))
        known = {r["at"] for r in self.rollbacks}
        self.rollbacks += [dict(r) for r in state.get("rollbacks", []) if r.get("at") not in known]
        self.rollback_due = False

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "streak": self.streak, "rollbacks": [dict(r) for r in self.rollbacks],
                "rollback_after": self.rollback_after}

    # ------------------------------------------------------------------ per step
    @staticmethod
    def loss_flag(loss: torch.Tensor) -> torch.Tensor:
        """1.0 where this rank's loss is not finite, else 0.0: a device tensor, no host sync."""
        return (~torch.isfinite(loss.detach())).float()

    def check(self, step: int, loss_bad: torch.Tensor, grad_norm: torch.Tensor, writer: Any, status: Any) -> bool:
        """True: apply the update of step ``step`` (the number it completes as). False: skip it.

        ``loss_bad``: :meth:`loss_flag`, summed over the ranks with several; ``grad_norm``: what
        ``clip_grad_norm_`` returned. One host sync (the verdict must be known to skip).
        """
        gn = torch.as_tensor(grad_norm).detach().float().to(loss_bad.device)
        loss_nonfinite, norm = torch.stack([loss_bad.float().reshape(()), gn.reshape(())]).tolist()
        if loss_nonfinite == 0 and math.isfinite(norm):
            if self.streak:  # a streak ended without a rollback
                self.streak = 0
                status.update(nonfinite=self.summary())
            return True
        self.skipped += 1
        self.streak += 1
        if self.streak == 1:
            self.streak_start = step
        self.rollback_due = self.streak >= self.rollback_after
        what = "loss" if loss_nonfinite else "gradient norm"
        log.warning("step %d: non-finite %s (gradient norm %s): update skipped (%d skipped in all, %d in a row; "
                    "rollback after %d)", step, what, norm, self.skipped, self.streak, self.rollback_after)
        writer.scalar("fault/nonfinite_skipped", self.skipped, step)
        status.update(nonfinite=self.summary())
        return False

    # ------------------------------------------------------------------ rollback
    def rollback(self, trainer: Any) -> None:
        """Reload the newest good checkpoint on every rank (``trainer``: a foldhpc Trainer after
        the step that completed the streak). Raises :class:`NonFiniteError` if the streak ended
        where one already rolled back, or there is nothing to roll back to."""
        from foldhpc.checkpoint import CheckpointError
        from foldhpc.records.tensorboard import RunWriter

        at, first, k = trainer.step, self.streak_start, self.streak
        steps = f"steps {first}-{at}" if at > first else f"step {at}"
        before = [r for r in self.rollbacks if r["at"] == at]
        if before:
            raise NonFiniteError(
                f"{k} consecutive non-finite steps ({steps}) again after rolling back from step {at} to step "
                f"{before[0]['to']}: the replay hit them at the same place, so they are deterministic (weights, "
                f"data or a bug), not a transient fault; not rolled back again "
                f"(fault.nonfinite_rollback = {self.rollback_after})")
        if hasattr(trainer, "hb"):
            trainer.hb.beat(at, "checkpoint")  # loading one
        t0 = time.monotonic()
        trainer.ckpt.wait()  # a save in flight is committed (or failed) first
        path: str | None = None
        error: str | None = None
        state: dict[str, Any] | None = None
        if trainer.main:
            try:
                loaded = trainer.ckpt.load_latest() if trainer.ckpt.last_committed is not None else None
                if loaded is None and trainer.resume not in ("auto", "never"):
                    payload = trainer.ckpt.load_file(trainer.resume)  # resumed from it, nothing newer since
                    state, path = payload["state"], str(trainer.resume)
                elif loaded is not None:
                    state, path = loaded.state, str(loaded.path)
                    trainer.ckpt.last_committed = loaded.entry
            except CheckpointError as e:
                error = f"the checkpoint to roll back to cannot be loaded: {e}"
            if path is None and error is None:
                error = "there is no checkpoint to roll back to"
        if trainer.group.world_size > 1:
            choice = trainer.group.broadcast({"path": path, "error": error},
                                             "waiting for rank 0 to choose the checkpoint to roll back to")
            path, error = choice["path"], choice["error"]
            if error is None and not trainer.main:
                try:
                    state = trainer.ckpt.load_file(path)["state"]
                except CheckpointError as e:
                    error = f"rank {trainer.env.rank} cannot load {path}: {e}"
        if error is not None:
            raise NonFiniteError(f"{k} consecutive non-finite steps ({steps}) and {error}")
        assert state is not None
        spent, restarts = trainer.train_time_s, trainer.restarts  # what happened, not what the file says
        self.rollbacks.append({"first": first, "at": at, "to": int(state["train"]["step"])})
        trainer.load_state_dict(state)  # the guard's own state is merged, see load_state_dict
        trainer.train_time_s, trainer.restarts = spent, restarts
        to = trainer.step
        log.warning("%d consecutive non-finite steps (%s): rolled back to the checkpoint at step %d (%s) in %.2fs; "
                    "rollback #%d, a second streak ending at step %d fails the run",
                    k, steps, to, path, time.monotonic() - t0, len(self.rollbacks), at)
        if trainer.main:
            # the curves after the checkpoint are replayed: drop them, as a restart does
            trainer.writer.close()
            trainer.writer = RunWriter(trainer.run_dir / "tensorboard", start_step=to)
            trainer.writer.scalar("fault/rollbacks", len(self.rollbacks), to)
            trainer.writer.scalar("fault/nonfinite_skipped", self.skipped, to)
            trainer.writer.flush()
        trainer.status.update(step=to, nonfinite=self.summary())
