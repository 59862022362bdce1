"""Fault injection for recovery tests and ``foldhpc chaos``: one module, off by default.

Every hook is an environment variable, read when it is used; none is set in a normal run, and
each logs a warning when it fires so that an injected fault is never mistaken for a real one.
Tests set them on the trainer's process (locally or through Slurm's environment propagation).

==================================  ==========================================================
``FOLDHPC_FAIL_AT_STEP=N``          fail right after optimizer step N (see ``FOLDHPC_FAIL_KIND``)
``FOLDHPC_FAIL_KIND=K``             ``exception`` (default), ``segfault`` (SIGSEGV to itself),
                                    ``kill`` (SIGKILL to itself, as the OOM killer does),
                                    ``exit`` (``os._exit(3)``), ``hang`` (sleeps forever, with
                                    no heartbeat), ``stop`` (SIGSTOP to itself)
``FOLDHPC_FAIL_ON_RANK=R``          only rank R fails (default: every rank)
``FOLDHPC_FAIL_ONCE=PATH``          fire only if PATH does not exist, and create it: the
                                    restarted trainer then passes step N (a transient fault)
``FOLDHPC_DEBUG_STEP_DELAY_S=S``    sleep S seconds in every step (slow but alive)
``FOLDHPC_DEBUG_WRITE_DELAY_S=S``   every checkpoint write sleeps S before its rename
``FOLDHPC_DEBUG_VAL_BATCH_DELAY_S`` sleep before each validation batch
``FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S`` stay alive S seconds after training returned
==================================  ==========================================================
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

FAIL_AT_STEP = "FOLDHPC_FAIL_AT_STEP"
FAIL_KIND = "FOLDHPC_FAIL_KIND"
FAIL_ON_RANK = "FOLDHPC_FAIL_ON_RANK"
FAIL_ONCE = "FOLDHPC_FAIL_ONCE"
STEP_DELAY = "FOLDHPC_DEBUG_STEP_DELAY_S"
WRITE_DELAY = "FOLDHPC_DEBUG_WRITE_DELAY_S"
VAL_BATCH_DELAY = "FOLDHPC_DEBUG_VAL_BATCH_DELAY_S"
HOLD_AFTER_TRAIN = "FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S"

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


def after_step(step: int, rank: int = 0) -> None:
    """Called by the training loop after optimizer step ``step``: inject what is configured."""
    delay = seconds(STEP_DELAY)
    if delay:
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
        marker.write_text(f"{os.getpid()} step {step}\n")
    kind = os.environ.get(FAIL_KIND, "exception") or "exception"
    log.warning("%s=%d %s=%s: injecting a fault on rank %d (debug hook)", FAIL_AT_STEP, at, FAIL_KIND, kind, rank)
    for h in logging.getLogger("foldhpc").handlers:
        h.flush()
    if kind == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(3)
    elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind != "exception":
        log.warning("unknown %s=%r; raising an exception instead (kinds: %s)", FAIL_KIND, kind, ", ".join(KINDS))
    raise InjectedFailure(f"injected failure at step {step} ({FAIL_AT_STEP})")
