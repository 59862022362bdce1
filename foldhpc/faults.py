"""Fault injection for recovery tests and ``foldhpc chaos``: one module, off by default.

Every hook is an environment variable, read when it is used; none is set in a normal run, and
each logs a warning when it fires so that an injected fault is never mistaken for a real one.
Tests set them on the trainer's process (locally or through Slurm's environment propagation).

==================================  ==========================================================
``FOLDHPC_FAIL_AT_STEP=N``          fail right after optimizer step N (see ``FOLDHPC_FAIL_KIND``)
``FOLDHPC_FAIL_KIND=K``             ``exception`` (default), ``segfault`` (SIGSEGV to itself),
                                    ``kill`` (SIGKILL to itself, as the OOM killer does),
                                    ``exit`` (``os._exit(3)``), ``hang`` (sleeps forever, with
                                    no heartbeat), ``stop`` (SIGSTOP to itself; hangs if
                                    continued)
``FOLDHPC_FAIL_ON_RANK=R``          only rank R fails (default: every rank)
``FOLDHPC_FAIL_ONCE=PATH``          fire only if PATH does not exist, and create it: the
                                    restarted trainer then passes step N (a transient fault)
``FOLDHPC_DEBUG_STEP_DELAY_S=S``    sleep S seconds in every step (slow but alive)
``FOLDHPC_DEBUG_STEP_DELAY_ON_RANK`` only rank R sleeps (default: every rank): a straggler
``FOLDHPC_DEBUG_FIRST_STEP_DELAY_S`` the first step of each process sleeps S seconds more,
                                    before its post-backward beat (cold CUDA kernels,
                                    ``torch.compile``)
``FOLDHPC_DEBUG_WRITE_DELAY_S=S``   every checkpoint write sleeps S before its rename
``FOLDHPC_DEBUG_VAL_BATCH_DELAY_S`` sleep before each validation batch
``FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S`` stay alive S seconds after training returned
``FOLDHPC_NAN_AT_STEPS=LIST``       make optimizer step N non-finite for each N in LIST
                                    (``12``, ``12-14``, ``5,20-22``; see ``FOLDHPC_NAN_KIND``)
``FOLDHPC_NAN_KIND=K``              ``loss`` (default: the loss and so every gradient is NaN),
                                    ``value`` (only the loss value is NaN, the gradients stay
                                    finite), ``weights`` (a weight becomes NaN during the
                                    step and stays NaN: later steps and saves see it)
``FOLDHPC_NAN_ON_RANK=R``           only rank R (default: every rank)
``FOLDHPC_NAN_ONCE=PATH``           each listed step fires once: PATH records the steps that
                                    fired, so a rolled-back or restarted run passes them
``FOLDHPC_BITFLIP_AT_STEP=N``       after optimizer step N, flip one bit (bit 22, the top
                                    mantissa bit of a float32: the value changes by up to 1.5x
                                    and stays finite) of one weight element: silent corruption
``FOLDHPC_BITFLIP_ON_RANK=R``       the rank whose copy is flipped (default 1)
``FOLDHPC_BITFLIP_ONCE=PATH``       fire only if PATH does not exist, and create it (a transient
                                    fault); without it every pass through step N flips again
                                    (a replay too: a persistent fault of that rank)
``FOLDHPC_LOSS_SPIKE_AT_STEP=N``    the loss *value* of step N is multiplied by
                                    ``FOLDHPC_LOSS_SPIKE_FACTOR`` (default 1000) on every rank,
                                    each time step N runs; the gradients are untouched
``FOLDHPC_FAIL_HEALTH_ON_NODE=N``   the node health check fails (check ``fault_hook``) on the
                                    nodes of the comma-separated list N (Slurm node names):
                                    a bad node; the supervisor never trains there and the job
                                    hands over excluding it (foldhpc.resilience.health)
==================================  ==========================================================
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any
from foldhpc.records.events import EventSink
from foldhpc.records.envvars import (BITFLIP_AT_STEP, BITFLIP_ON_RANK, BITFLIP_ONCE,  # noqa: F401
                                     FAIL_AT_STEP, FAIL_KIND, FAIL_ON_RANK, FAIL_ONCE, FIRST_STEP_DELAY,
                                     HOLD_AFTER_TRAIN, LOSS_SPIKE_AT_STEP, LOSS_SPIKE_FACTOR, NAN_AT_STEPS,
                                     NAN_KIND, NAN_ON_RANK, NAN_ONCE, STEP_DELAY, STEP_DELAY_ON_RANK,
                                     VAL_BATCH_DELAY, WRITE_DELAY)

log = logging.getLogger(__name__)

NAN_KINDS = ("loss", "value", "weights")

KINDS = ("exception", "segfault", "kill", "exit", "hang", "stop")


class InjectedFailure(RuntimeError):
    """The ``exception`` kind of injected fault."""


def seconds(name: str) -> float:
    """The float value of env var ``name`` (0 if unset or not a number, with a warning)."""
    raw = os.environ.get(name, "")
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds", name, raw)
        return 0.0


def _int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", name, os.environ.get(name))
        return 0


_cold = True


def cold_first_step() -> None:
    """Called by the training loop after each step's backward: the first call in a process sleeps
    ``FOLDHPC_DEBUG_FIRST_STEP_DELAY_S`` (a first step as slow as compiling or loading kernels)."""
    global _cold
    if not _cold:
        return
    _cold = False
    delay = seconds(FIRST_STEP_DELAY)
    if delay:
        log.warning("%s=%g: a slow first step (debug hook)", FIRST_STEP_DELAY, delay)
        time.sleep(delay)


def after_step(step: int, rank: int = 0, events: EventSink | None = None) -> None:
    """Called by the training loop after optimizer step ``step``: inject what is configured
    (recorded in ``events`` first, so that a timeline marks where the fault was injected)."""
    delay = seconds(STEP_DELAY)
    if delay and os.environ.get(STEP_DELAY_ON_RANK, "") in ("", str(rank)):
        time.sleep(delay)
    at = _int(FAIL_AT_STEP)
    if not at or step != at:
        return
    only = os.environ.get(FAIL_ON_RANK, "")
    if only and only != str(rank):
        return
    once = os.environ.get(FAIL_ONCE, "")
    if once:
        marker = Path(once)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.getpid()} step {step} at {time.time():.6f}\n")  # read by bench_restart.py
    kind = os.environ.get(FAIL_KIND, "exception") or "exception"
    log.warning("%s=%d %s=%s: injecting a fault on rank %d (debug hook)", FAIL_AT_STEP, at, FAIL_KIND, kind, rank)
    if events is not None:
        events.emit("fault_injected", what=f"{FAIL_AT_STEP}={at} {FAIL_KIND}={kind}", step=step)
    for h in logging.getLogger("foldhpc").handlers:
        h.flush()
    if kind == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(3)
    elif kind in ("stop", "hang"):
        if kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        # hung (and, after a SIGCONT, still hung): the stacks a watchdog dumps show this line
        while True:
            time.sleep(3600)
    elif kind != "exception":
        log.warning("unknown %s=%r; raising an exception instead (kinds: %s)", FAIL_KIND, kind, ", ".join(KINDS))
    raise InjectedFailure(f"injected failure at step {step} ({FAIL_AT_STEP})")


def _steps(spec: str) -> set[int]:
    """``"5,12-14"`` -> {5, 12, 13, 14}; a malformed item is ignored with a warning."""
    out: set[int] = set()
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        lo, _, hi = item.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            log.warning("ignoring %r in %s=%r: not N or N-M", item, NAN_AT_STEPS, spec)
    return out


def nan_loss(loss: Any, step: int, rank: int = 0, model: Any = None, events: EventSink | None = None) -> Any:
    """Called by the training loop with the loss of optimizer step ``step`` (numbered like
    ``after_step``: the step that completes as ``step``): the loss, or a non-finite one where
    ``FOLDHPC_NAN_AT_STEPS`` says so (see the table above). ``model``: for ``weights``."""
    spec = os.environ.get(NAN_AT_STEPS, "")
    if not spec or step not in _steps(spec):
        return loss
    only = os.environ.get(NAN_ON_RANK, "")
    if only and only != str(rank):
        return loss
    once = os.environ.get(NAN_ONCE, "")
    if once:
        marker = Path(once)
        fired = marker.read_text().split() if marker.exists() else []
        if str(step) in fired:
            return loss
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "a") as f:
            f.write(f"{step}\n")
    kind = os.environ.get(NAN_KIND, "loss") or "loss"
    if kind not in NAN_KINDS:
        log.warning("unknown %s=%r; using 'loss' (kinds: %s)", NAN_KIND, kind, ", ".join(NAN_KINDS))
        kind = "loss"
    log.warning("%s=%s %s=%s: making step %d non-finite on rank %d (debug hook)", NAN_AT_STEPS, spec, NAN_KIND,
                kind, step, rank)
    if events is not None:
        events.emit("fault_injected", what=f"{NAN_AT_STEPS}={spec} {NAN_KIND}={kind}", step=step)
    if kind == "value":  # the value is NaN, the gradient is the loss's own (finite)
        return loss + (loss.new_tensor(float("nan")) - loss).detach()
    if kind == "weights" and model is not None:
        # .data: no autograd version bump, so this step's backward runs (through the NaN weight)
        next(iter(model.parameters())).data.view(-1)[0] = float("nan")
        return loss
    return loss * float("nan")


#: the bit :func:`bitflip` flips: the top mantissa bit of a float32 (bit 15 of a 16-bit float's
#: pattern would be its sign, so those use their top mantissa bit too)
BITFLIP_BIT = {4: 22, 2: 9, 8: 51}


def bitflip(step: int, rank: int, model: Any, events: EventSink | None = None) -> bool:
    """Called by the training loop after optimizer step ``step``: flip one bit of one weight
    element on rank ``FOLDHPC_BITFLIP_ON_RANK`` (default 1) if ``FOLDHPC_BITFLIP_AT_STEP`` is
    ``step``; True if it did. The element is the middle one of the largest parameter (the same
    every time, so a persistent fault replays identically); the bit is a high mantissa bit, so
    the value changes without becoming non-finite, which no NaN guard can see."""
    at = _int(BITFLIP_AT_STEP)
    if not at or step != at:
        return False
    only = os.environ.get(BITFLIP_ON_RANK, "") or "1"
    if only != str(rank):
        return False
    once = os.environ.get(BITFLIP_ONCE, "")
    if once:
        marker = Path(once)
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.getpid()} rank {rank} step {step} at {time.time():.6f}\n")
    import torch  # here: foldhpc.faults is imported by processes that never train

    params = [p for p in model.parameters() if p.dtype.is_floating_point and p.numel()]
    name_of = {id(p): n for n, p in model.named_parameters()}
    target = max(params, key=lambda p: p.numel())
    flat = target.data.view(-1)
    i = flat.numel() // 2
    size = flat.element_size()
    bit = BITFLIP_BIT.get(size, 8 * size - 2)
    ints = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    before = float(flat[i])
    with torch.no_grad():
        ints[i] ^= 1 << bit
    what = f"{BITFLIP_AT_STEP}={at} rank {rank}: {name_of.get(id(target), '?')}[{i}] bit {bit}"
    log.warning("%s=%d: flipping bit %d of %s[%d] on rank %d after step %d (%g -> %g; debug hook)",
                BITFLIP_AT_STEP, at, bit, name_of.get(id(target), "?"), i, rank, step, before, float(flat[i]))
    if events is not None:
        events.emit("fault_injected", what=what, step=step)
    return True


def loss_spike(loss: Any, step: int, rank: int = 0, events: EventSink | None = None) -> Any:
    """Called by the training loop with the loss of step ``step``: its value times
    ``FOLDHPC_LOSS_SPIKE_FACTOR`` (default 1000) where ``FOLDHPC_LOSS_SPIKE_AT_STEP`` is ``step``,
    the gradient unchanged (a spike in what is measured, deterministic: every replay sees it)."""
    at = _int(LOSS_SPIKE_AT_STEP)
    if not at or step != at:
        return loss
    factor = seconds(LOSS_SPIKE_FACTOR) or 1000.0
    log.warning("%s=%d: the loss of step %d is %gx its value on rank %d (debug hook)", LOSS_SPIKE_AT_STEP, at, step,
                factor, rank)
    if events is not None:
        events.emit("fault_injected", what=f"{LOSS_SPIKE_AT_STEP}={at} {LOSS_SPIKE_FACTOR}={factor:g}", step=step)
    return loss + (loss * (factor - 1.0)).detach()
