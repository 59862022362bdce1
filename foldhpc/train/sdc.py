"""Silent data corruption: catch it by comparing replicas, attribute it by a bit-exact replay.

A GPU that computes a wrong number without a NaN is invisible to the non-finite guard. Two things
make it visible and attributable here:

* **Data-parallel replicas must be bit-identical.** Every rank applies the same all-reduced
  gradient to the same weights, so every ``fault.sdc_check_every`` steps the ranks all-gather a
  16-hex digest of their weights and optimizer state (:func:`replica_digest`, the same digest
  ``foldhpc checkpoints`` prints). One differing digest is corruption on some rank since the last
  check that agreed (``verified``).
* **Any step can be replayed bit for bit** from a checkpoint (that is what resume guarantees). So
  an anomaly -- a mismatch, a loss spike (``fault.loss_spike_factor`` x the recent maximum), or a
  skipped non-finite step (``fault.sdc_on_nonfinite``) -- rolls back to the newest checkpoint at or
  before the last verified step and replays up to the anomaly on the same ranks, comparing each
  replayed step's *trace* (its loss and a float64 sum of each weight after it, kept for every
  step of the first pass: :func:`trace`) with the first pass's, and the ranks' digests with each
  other:

  ============================  ===================  ==========================================
  what the replay shows         verdict              suspect ranks
  ============================  ===================  ==========================================
  the ranks diverge again       ``rank``             the ranks outvoted (see :func:`vote`)
  the anomaly does not return   ``transient``        the ranks whose first-pass trace deviated
                                                     from the replay's first (the all-reduced
                                                     gradient spreads it to the others a step
                                                     later)
  the anomaly returns on all    ``deterministic``    none: a data or model problem; the record
                                                     names the step's samples
  ============================  ===================  ==========================================

  With two ranks a mismatch has no majority. During a replay each rank therefore also *recomputes*
  the step's update from a snapshot taken before ``optimizer.step()`` (:class:`Snapshot`): a rank
  whose recomputed update differs from its actual state is the faulty one, and the state every
  recomputation agrees on wins. The outvoted ranks take that state by broadcast, so the run goes on
  from a state equal to an uninterrupted run's.

This module keeps the bookkeeping and the pure decisions; the training loop
(:mod:`foldhpc.train.loop`) does the collectives, the rollback and the records. Every decision here
is taken from all-gathered inputs, so it is the same on every rank. Measured costs and the choice of
the default are in docs/sdc.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from foldhpc.checkpoint.digest import state_digest

#: a loss spike is judged against the maximum loss of this many steps before it
SPIKE_WINDOW = 50
#: ... and only once that many of them are known (the first steps' losses fall fast)
SPIKE_MIN_HISTORY = 10
#: first-pass traces kept for a replay to compare with (older ones: the replay compares digests only)
KEEP_TRACES = 10_000

#: the verdicts (status.json ``sdc.last.verdict``, the ``sdc_attribution`` event)
TRANSIENT, DETERMINISTIC, RANK = "transient", "deterministic", "rank"


def trace(loss: torch.Tensor, model: torch.nn.Module | None) -> torch.Tensor:
    """A step's trace on this rank: its loss, then (with ``model``) the float64 sum of each weight
    after the update, as one float64 vector on the device (no host sync; one reduction per
    weight). A replay compares it with the first pass's step by step: the first step whose trace
    differs pins the fault to a rank and a step, even where the change is below the loss's
    resolution or before the next forward pass."""
    with torch.no_grad():
        parts = [loss.detach().reshape(1).to(torch.float64)]
        if model is not None:
            parts.append(torch.stack([p.sum(dtype=torch.float64) for p in model.parameters()]))
        return torch.cat(parts)


def same_trace(a: list[float], b: list[float]) -> bool:
    """Bit-equal traces (NaN equal to NaN: a skipped non-finite step replays as one)."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def replica_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """This rank's weights and optimizer moments as one 16-hex digest (the checkpoint digest)."""
    return state_digest(model.state_dict(), optimizer.state_dict())


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a replica's state is made of, in the same order on every rank: what a repair
    broadcasts. Optimizer tensors on another device than the weights (Adam's ``step`` counters on
    the CPU) are left out: they are equal on every rank and a GPU collective cannot take them."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    out = [t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    for p in params:
        for _, v in sorted(optimizer.state.get(p, {}).items()):
            if isinstance(v, torch.Tensor) and v.device == device:
                out.append(v)
    return [t.data if isinstance(t, torch.nn.Parameter) else t for t in out]


def vote(actual: list[str], recomputed: list[str]) -> tuple[str, list[int]]:
    """The state the replicas should hold and the ranks that do not hold it.

    ``actual``: each rank's digest after its update; ``recomputed``: each rank's digest of the same
    update redone from the snapshot before it. A healthy rank's two agree; a rank whose hardware
    corrupted the first computation (or its result afterwards) disagrees with itself. The majority is
    the digest most recomputations give (ties: the one more ranks actually hold, then the lowest
    rank's); the ranks whose actual state differs from it are outvoted."""
    counts = Counter(recomputed)
    held = Counter(actual)
    best = max(counts.values())
    tied = [d for d in dict.fromkeys(recomputed) if counts[d] == best]
    majority = max(tied, key=lambda d: held[d]) if len(tied) > 1 else tied[0]
    return majority, [r for r, d in enumerate(actual) if d != majority]


class Snapshot:
    """The weights and optimizer state just before ``optimizer.step()``, taken during a replay
    with several ranks, so the update can be redone if the replicas diverge (see :func:`vote`).
    The gradients are not copied: ``optimizer.step()`` does not change them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p.detach().clone() for p in model.parameters()]
        self.optimizer = copy.deepcopy(optimizer.state_dict())

    def recompute_digest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
        """The digest of the update redone from the snapshot; the current state is put back after,
        so this changes nothing (a repair, if any, is the caller's)."""
        params = list(model.parameters())
        now_params = [p.detach().clone() for p in params]
        now_opt = copy.deepcopy(optimizer.state_dict())
        with torch.no_grad():
            for p, s in zip(params, self.params):
                p.copy_(s)
        # the snapshot's param_groups carry the learning rate the update used (the scheduler has
        # stepped since); load_state_dict takes them, and the current ones come back below
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        optimizer.step()
        digest = replica_digest(model, optimizer)
        with torch.no_grad():
            for p, s in zip(params, now_params):
                p.copy_(s)
        optimizer.load_state_dict(now_opt)
        return digest


@dataclass
class Replay:
    """An attribution in progress: replaying steps ``first``..``last`` (``last``: the anomaly's)."""

    trigger: str  # mismatch / loss_spike / nonfinite
    first: int
    last: int
    path: str | None  # the checkpoint replayed from
    digests: list[str]  # the ranks' digests when the anomaly was seen (rank order)
    traces: dict[int, list[float]]  # this rank's first-pass trace of each step
    global_loss: float | None  # the global batch's loss at ``last`` on the first pass
    t0: float = field(default_factory=time.monotonic)
    deviation: int | None = None  # the first replayed step whose trace differs on this rank
    diverged: int | None = None  # the first replayed step where the replicas differed again
    suspects: list[int] = field(default_factory=list)  # the ranks outvoted there
    reproduced: bool = False  # the anomaly came back at ``last`` (this rank's view)


class SdcMonitor:
    """The replica check's schedule, the triggers' history, the replay in progress and the
    attributions made so far (checkpointed: suspect counts survive restarts)."""

    def __init__(self, check_every: int, spike_factor: float, on_nonfinite: bool, rank: int, world_size: int) -> None:
        self.check_every = check_every
        self.spike_factor = spike_factor
        self.on_nonfinite = on_nonfinite
        self.rank = rank
        self.world_size = world_size
        self.replay: Replay | None = None
        self.checks = 0
        self.check_s = 0.0  # time spent in the checks (digest + all-gather), this process
        self.digest_s = 0.0  # ... of it in the digest (the all-gather also waits for the slowest rank)
        self.verified = 0  # the newest step at which the replicas agreed (or the run started from)
        self.mismatches: list[int] = []
        self.attributions: list[dict[str, Any]] = []
        self.suspect_nodes: dict[str, int] = {}
        self.traces: dict[int, torch.Tensor] = {}  # this rank's trace by step (device tensors: no sync)
        self.trace_s = 0.0  # time spent taking them, this process
        self._global: dict[int, float] = {}  # the global batch's loss by step, for the spike trigger

    # ------------------------------------------------------------------ triggers
    def check_due(self, step: int) -> bool:
        return self.world_size > 1 and self.check_every > 0 and step % self.check_every == 0

    def note_step(self, step: int, loss: torch.Tensor, model: torch.nn.Module | None) -> None:
        """Step ``step``'s trace (``model``: with the weights' sums; None where no replica check
        runs and only the loss can tell a replay from its first pass)."""
        t0 = time.monotonic()
        self.traces[step] = trace(loss, model)
        self.trace_s += time.monotonic() - t0
        old = step - KEEP_TRACES
        if old in self.traces:
            del self.traces[old]

    def traces_since(self, step: int) -> dict[int, list[float]]:
        return {s: v.tolist() for s, v in self.traces.items() if s > step}

    def loss_of(self, step: int) -> float:
        return float(self.traces[step][0])

    def spike(self, step: int, value: float) -> bool:
        """Is ``value`` (step ``step``'s global loss) above ``spike_factor`` x the maximum of the
        previous :data:`SPIKE_WINDOW` steps? Records it either way (a replayed step overwrites)."""
        recent = [v for s, v in self._global.items() if step - SPIKE_WINDOW <= s < step and math.isfinite(v)]
        self._global[step] = value
        for s in [s for s in self._global if s < step - SPIKE_WINDOW]:
            del self._global[s]
        return (self.spike_factor > 0 and len(recent) >= SPIKE_MIN_HISTORY and math.isfinite(value)
                and value > self.spike_factor * max(recent))

    # ------------------------------------------------------------------ verdict
    def conclude(self, replay: Replay, digests: list[str], deviations: list[int | None], reproduced: list[bool],
                 layout: list[dict[str, Any]], samples: list[str], seconds: float) -> dict[str, Any]:
        """The verdict of a finished replay from every rank's view (all-gathered, rank order):
        its digest now, the first step its loss deviated from the first pass, whether the anomaly
        came back. Records it (``attributions``, ``suspect_nodes``) and ends the replay.
        ``deviations``: each rank's first replayed step whose trace differed from the first pass's."""
        devs = {r: d for r, d in enumerate(deviations) if d is not None}
        if replay.suspects:
            verdict, ranks, step = RANK, list(replay.suspects), replay.diverged or replay.last
        elif all(reproduced):
            verdict, ranks, step = DETERMINISTIC, [], replay.last
        elif devs:
            # the first pass's trace differed from the replay's first on these ranks: the fault is
            # in that step (its forward pass, its update, or right after). Later deviations on the
            # other ranks are the corruption spreading through the all-reduced gradient.
            first = min(devs.values())
            ranks = [r for r, d in devs.items() if d == first]
            verdict, step = TRANSIENT, first
        else:
            # no trace saw it (older than the traces kept): the ranks whose first-pass state
            # differs from the replay's
            verdict, step = TRANSIENT, replay.last
            ranks = [r for r, d in enumerate(replay.digests) if r < len(digests) and d != digests[r]]
        nodes = sorted({str(layout[r].get("node", "?")) for r in ranks if r < len(layout)})
        record: dict[str, Any] = {
            "step": step, "trigger": replay.trigger, "verdict": verdict, "reproducible": verdict != TRANSIENT,
            "ranks": ranks, "nodes": nodes, "samples": samples if verdict == DETERMINISTIC else [],
            "first": replay.first, "last": replay.last, "path": replay.path,
            "detected": replay.last, "first_deviation": min(devs.values()) if devs else None,
            "replay_s": round(seconds, 3)}
        self.attributions.append(record)
        for n in nodes:
            self.suspect_nodes[n] = self.suspect_nodes.get(n, 0) + 1
        if len(set(digests)) == 1:
            self.verified = replay.last
        self.replay = None
        return record

    def summary(self) -> dict[str, Any]:
        """status.json's ``sdc`` field."""
        return {"check_every": self.check_every, "checks": self.checks, "check_s": round(self.check_s, 6),
                "digest_s": round(self.digest_s, 6),
                "verified": self.verified,
                "mismatches": list(self.mismatches), "attributions": list(self.attributions),
                "suspect_nodes": dict(self.suspect_nodes),
                "last": self.attributions[-1] if self.attributions else None,
                "replaying": None if self.replay is None else {"trigger": self.replay.trigger,
                                                               "first": self.replay.first, "last": self.replay.last}}

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, "checks": self.checks, "mismatches": list(self.mismatches),
                "attributions": copy.deepcopy(self.attributions), "suspect_nodes": dict(self.suspect_nodes)}

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        """A resume or a rollback to step ``step``. The history (checks, mismatches, attributions,
        suspect counts) only grows: a rollback in this process keeps what it knows, a new process
        takes the checkpoint's. ``verified`` is the checkpoint's (a state saved before a later
        check is only as verified as that check)."""
        state = state or {}
        self.verified = min(int(state.get("verified", step)), step)
        if not self.attributions and not self.mismatches and not self.checks:
            self.checks = int(state.get("checks", 0))
            self.mismatches = [int(s) for s in state.get("mismatches", [])]
            self.attributions = list(state.get("attributions", []))
            self.suspect_nodes = {str(k): int(v) for k, v in dict(state.get("suspect_nodes", {})).items()}
