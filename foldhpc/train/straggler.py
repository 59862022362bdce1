"""Stragglers: the rank whose own work per step is slower than the others', named with its node.

In synchronous data parallelism every rank waits for the slowest at each collective, so step times
are equal and say nothing; what differs is how a step's time splits into *compute* (the rank's own
work) and *waiting* (time blocked in the collectives foldhpc times: the stop agreement at each step
boundary and the loss sum). A slow rank computes long and hardly waits; the others wait for it. So
the rule compares compute times: every ``fault.straggler_window`` steps the ranks all-gather their
mean compute and wait per step, and a rank whose compute is above ``fault.straggler_factor`` x the
median of the *other* ranks' in two consecutive windows is named (a one-window blip, such as a
checkpoint staged on rank 0, is not). DDP's gradient all-reduce overlaps the backward pass and is
counted as compute; a rank slowed in its backward shows in the loss sum's wait of the next step.
"""

from __future__ import annotations

import statistics
from typing import Any

#: a rank must be slow in this many consecutive windows to be named
SUSTAINED_WINDOWS = 2


class StragglerMonitor:
    """Per-rank compute/wait accounting and the straggler rule (the loop does the all-gather)."""

    def __init__(self, factor: float, window: int, world_size: int) -> None:
        self.factor = factor
        self.window = window
        self.world_size = world_size
        self._compute = 0.0
        self._wait = 0.0
        self._n = 0
        self._slow: dict[int, int] = {}  # rank -> consecutive slow windows

    def add(self, step_s: float, wait_s: float) -> None:
        """One step: its time from boundary to boundary and the part of it spent waiting."""
        self._compute += max(0.0, step_s - wait_s)
        self._wait += wait_s
        self._n += 1

    def due(self, step: int) -> bool:
        return self.world_size > 1 and self.window > 0 and step % self.window == 0 and self._n > 0

    def mine(self) -> tuple[float, float]:
        """This rank's mean compute and wait per step over the window; starts the next window."""
        n = max(1, self._n)
        out = (self._compute / n, self._wait / n)
        self._compute = self._wait = 0.0
        self._n = 0
        return out

    def judge(self, means: list[tuple[float, float]], layout: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
        """The ranks named as stragglers after this window (same on every rank: ``means`` is
        all-gathered): rank, node, ratio (its compute / the others' median), compute_s, wait_s, step."""
        named: list[dict[str, Any]] = []
        for r, (compute, wait) in enumerate(means):
            others = [c for i, (c, _) in enumerate(means) if i != r]
            median = statistics.median(others) if others else compute
            ratio = compute / median if median > 0 else 1.0
            self._slow[r] = self._slow.get(r, 0) + 1 if ratio > self.factor else 0
            if self._slow[r] >= SUSTAINED_WINDOWS:
                node = str(layout[r].get("node", "?")) if r < len(layout) else "?"
                named.append({"rank": r, "node": node, "ratio": round(ratio, 3), "compute_s": round(compute, 6),
                              "wait_s": round(wait, 6), "step": step})
        return named
