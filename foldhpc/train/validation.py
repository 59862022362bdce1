"""When the trainer validates, and how a validation cut short by a signal is made up for.

Validation runs at step 0 (the untrained baseline), every ``train.val_every`` steps and at the
end. A preemption signal stops it between batches (see ``foldhpc.model.metrics.evaluate``), so
the save is not delayed by a whole validation pass, which the ``slurm.signal_lead`` rule (one
training step + one checkpoint write) does not budget for. The training state records the last
step whose validation *completed* (``val_step``); a run resumed at a step whose validation is
due but missing validates first, so the curves equal those of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from foldhpc import faults
from foldhpc.records.envvars import VAL_BATCH_DELAY

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Debug hook for tests (foldhpc.faults): sleep this long before each validation batch, so a
#: signal can be delivered while a validation is demonstrably in progress.
DELAY_ENV = VAL_BATCH_DELAY


def validation_due(step: int, val_every: int, max_steps: int) -> bool:
    """Whether the loop validates after reaching ``step`` (the final validation is separate)."""
    if val_every <= 0 or step >= max_steps:
        return False
    return step == 0 or step % val_every == 0


def debug_delayed(batches: Iterable[T]) -> Iterable[T]:
    """``batches``, slowed by ``$FOLDHPC_DEBUG_VAL_BATCH_DELAY_S`` per batch when that is set."""
    delay = faults.seconds(DELAY_ENV)
    if delay <= 0:
        return batches
    log.warning("%s=%s: validation batches are slowed down (debug hook)", DELAY_ENV, delay)
    return _slowed(batches, delay)


def _slowed(batches: Iterable[T], delay: float) -> Iterator[T]:
    for b in batches:
        time.sleep(delay)
        yield b
