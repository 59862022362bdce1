"""The seeded fault plan: which fault, at which training step, in which variant.

The plan is a pure function of its arguments (``random.Random(seed)``), so a failing chaos run
is replayed exactly with the same ``--seed``. Faults are placed at strictly increasing steps with
a random gap (plus the previous kind's ``span``), which keeps them sequential: each one is
recovered from before the next is injected, and two failures never land on the same step (the
supervisor would take that for a deterministic bug and give up). ``max_steps`` follows from the
plan (the last fault's ``span`` included), so the training is just long enough for all of it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from foldhpc.chaos.kinds import DEFAULT_KINDS, KINDS, MULTI_RANK_KINDS, kinds_for


class PlanError(ValueError):
    """A bad ``--kinds``/``--weights``/``--faults``: a usage error."""


@dataclass(frozen=True)
class PlannedFault:
    index: int
    kind: str
    at_step: int
    variant: str = ""


@dataclass
class Plan:
    seed: int
    faults: list[PlannedFault]
    max_steps: int
    every_steps: int
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def nan_steps(self) -> list[int]:
        """Steps made non-finite: set for every process of both runs (the reference included)."""
        return [f.at_step for f in self.faults if f.kind == "nan"]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "max_steps": self.max_steps, "every_steps": self.every_steps,
                "weights": self.weights, "faults": [asdict(f) for f in self.faults]}


def parse_kinds(text: str | None, backend: str = "local") -> list[str]:
    """``"sigkill,hang"`` -> ["sigkill", "hang"]; None/empty -> every kind of the backend."""
    if not text:
        return list(kinds_for(backend))
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PlanError(f"--kinds: unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    usable = set(kinds_for(backend)) | (set(MULTI_RANK_KINDS) if backend == "local" else set())
    other = [k for k in kinds if k not in usable]
    if other:
        raise PlanError(f"--kinds: {', '.join(other)} cannot be injected with --backend {backend} "
                        f"(it can: {', '.join(sorted(usable))})")
    return list(dict.fromkeys(kinds))


def parse_weights(text: str | None) -> dict[str, float]:
    """``"sigkill=3,nan=0.5"`` -> {"sigkill": 3.0, "nan": 0.5}."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise PlanError(f"--weights: {item!r} is not KIND=WEIGHT with a known kind ({', '.join(KINDS)})")
        try:
            w = float(value)
        except ValueError:
            raise PlanError(f"--weights: {item!r}: {value!r} is not a number") from None
        if w < 0:
            raise PlanError(f"--weights: {item!r}: a weight must be >= 0")
        out[name] = w
    return out


def make_plan(n_faults: int, seed: int, kinds: list[str] | None = None, weights: dict[str, float] | None = None,
              every_steps: int = 10, first_step: int = 15, min_gap: int = 12, max_gap: int = 30,
              tail: int = 20) -> Plan:
    """Draw ``n_faults`` faults among ``kinds`` (weighted; default weight 1) at increasing steps.

    ``first_step`` leaves room for the first checkpoint (``every_steps``), so that every fault
    has something to resume from; ``tail`` steps after the last fault let its recovery finish
    before the run completes.
    """
    if n_faults < 0:
        raise PlanError("--faults must be >= 0")
    if not 1 <= min_gap <= max_gap:
        raise PlanError("the gap between faults must satisfy 1 <= min_gap <= max_gap")
    chosen = list(kinds) if kinds is not None else list(DEFAULT_KINDS)
    w = {k: 1.0 for k in chosen}
    for k, v in (weights or {}).items():
        if k not in w:
            raise PlanError(f"--weights names {k}, which is not among the selected kinds ({', '.join(chosen)})")
        w[k] = v
    pool = [k for k in chosen if w[k] > 0]
    if n_faults and not pool:
        raise PlanError("no fault kind left to draw from (all weights are 0)")
    rng = random.Random(seed)
    faults: list[PlannedFault] = []
    step = max(first_step, every_steps + 3)
    for i in range(n_faults):
        kind = rng.choices(pool, weights=[w[k] for k in pool])[0]
        spec = KINDS[kind]
        variant = rng.choice(spec.variants)
        faults.append(PlannedFault(i, kind, step, variant))
        step += spec.span + rng.randint(min_gap, max_gap)
    # the last fault's handling (its span) and recovery (tail) must end before the training does
    last = faults[-1].at_step + KINDS[faults[-1].kind].span if faults else step
    return Plan(seed=seed, faults=faults, max_steps=last + tail + every_steps, every_steps=every_steps,
                weights={k: w[k] for k in chosen})
