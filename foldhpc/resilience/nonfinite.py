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
:meth:`NonFiniteGuard.rollback` decides whether to roll back and records it; the trainer's
``restore`` callback (the guard never touches the trainer) reloads the newest good checkpoint in
the same process on every rank (rank 0 picks it, as at a resume), and the trainer then purges the
TensorBoard events after its step (as a restart does) and records the rollback (``status.json``,
``fault/rollbacks``); the guard logs it and writes the ``rollback`` event. Replay is
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
from typing import Any, Callable, NamedTuple

import torch

from foldhpc.records.events import EventSink, NullEventLog


log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Non-finite steps the guard cannot cure: again at a place already rolled back from, or no
    checkpoint to roll back to. The trainer fails with it (state ``failed``, this message)."""


class RollbackUnavailable(Exception):
    """Raised by a rollback's ``restore`` callback: there is nothing it can roll back to (the
    message says why: no checkpoint, one that cannot be loaded)."""


class Restored(NamedTuple):
    """What a rollback's ``restore`` callback loaded: the step it is back at, and the file."""

    step: int
    path: str


#: reloads the newest good checkpoint into the training state (on every rank), or raises
#: :class:`RollbackUnavailable`
Restore = Callable[[], Restored]


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

    def check(self, step: int, loss_bad: torch.Tensor, grad_norm: torch.Tensor, writer: Any, status: Any,
              events: EventSink | None = None) -> bool:
        """True: apply the update of step ``step`` (the number it completes as). False: skip it.

        ``loss_bad``: :meth:`loss_flag`, summed over the ranks with several; ``grad_norm``: what
        ``clip_grad_norm_`` returned. One host sync (the verdict must be known to skip). A skip is
        a ``nonfinite_skip`` event in ``events``.
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
        (events or NullEventLog()).emit("nonfinite_skip", step=step, what=what, grad_norm=norm, skipped=self.skipped,
                                        streak=self.streak, rollback_after=self.rollback_after)
        writer.scalar("fault/nonfinite_skipped", self.skipped, step)
        status.update(nonfinite=self.summary())
        return False

    # ------------------------------------------------------------------ rollback
    def rollback(self, at: int, restore: Restore, events: EventSink | None = None) -> Restored:
        """Roll back after the streak that step ``at`` completed: ``restore()`` reloads the newest
        good checkpoint on every rank (its training state, this guard's included: see
        :meth:`load_state_dict`). Raises :class:`NonFiniteError` if the streak ended where one
        already rolled back, or there is nothing to roll back to. Returns what was restored; the
        caller then purges its curves after ``Restored.step`` and records :meth:`summary`."""
        first, k = self.streak_start, self.streak
        steps = f"steps {first}-{at}" if at > first else f"step {at}"
        before = [r for r in self.rollbacks if r["at"] == at]
        if before:
            raise NonFiniteError(
                f"{k} consecutive non-finite steps ({steps}) again after rolling back from step {at} to step "
                f"{before[0]['to']}: the replay hit them at the same place, so they are deterministic (weights, "
                f"data or a bug), not a transient fault; not rolled back again "
                f"(fault.nonfinite_rollback = {self.rollback_after})")
        t0 = time.monotonic()
        # Recorded before the state is loaded, as it happened (the merge in load_state_dict keeps
        # it: the checkpoint predates it); its step "to" is known once the file is read.
        record = {"first": first, "at": at, "to": -1}
        self.rollbacks.append(record)
        try:
            restored = restore()
        except RollbackUnavailable as e:
            self.rollbacks.remove(record)
            raise NonFiniteError(f"{k} consecutive non-finite steps ({steps}) and {e}") from None
        except BaseException:
            self.rollbacks.remove(record)
            raise
        record["to"] = restored.step
        log.warning("%d consecutive non-finite steps (%s): rolled back to the checkpoint at step %d (%s) in %.2fs; "
                    "rollback #%d, a second streak ending at step %d fails the run",
                    k, steps, restored.step, restored.path, time.monotonic() - t0, len(self.rollbacks), at)
        (events or NullEventLog()).emit("rollback", first=first, at=at, to=restored.step, path=restored.path,
                                        seconds=round(time.monotonic() - t0, 4), rollbacks=len(self.rollbacks))
        return restored
