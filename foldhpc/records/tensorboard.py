"""TensorBoard scalars under ``<run.dir>/tensorboard``: one continuous set of curves per run.

Scalars at step ``s`` describe the state after optimizer step ``s``. After a restart from a
checkpoint at step ``k`` the writer purges events *after* ``k`` (``purge_step=k+1``): those were
logged by steps that a crash lost and the resumed run replays, so they are not drawn twice. A
restart marker is recorded at ``k``.

The trainer calls :meth:`RunWriter.flush` before every checkpoint write and when a checkpoint is
committed, so the curves up to any durable checkpoint are on disk whatever kills the process; the
30 s timer only bounds the loss of events after the newest checkpoint, which a resume replays.
(With TensorBoard's own local writer, used when TensorFlow is not installed, each event is appended
by a background thread as it is dequeued; TensorFlow's gfile and object-store paths buffer until a
flush, which is where the timer alone left a gap.)
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

#: After a failed write, the seconds until a new event file is tried (each try creates one) ...
RETRY_S = 30.0
#: ... if the file system has this much room again (a try on a full one only fails once more,
#: with a traceback from TensorBoard's writer thread)
RETRY_FREE_BYTES = 1 << 20


@runtime_checkable
class ScalarSink(Protocol):
    """Where the trainer draws the run's curves: a :class:`RunWriter` (rank 0) or a
    :class:`NullWriter` (the other ranks). None of its methods raises for a failed write."""

    def scalar(self, tag: str, value: float, step: int) -> None: ...

    def restart_marker(self, step: int, restarts: int, job_id: str | None, slurm_restarts: int,
                       note: str = "") -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class RunWriter:
    """The run's curves. A failed write (``run.dir`` full, its mount gone) never ends training: the
    curves are for people, the run's state is in its checkpoints. It is logged once per outage;
    the broken writer is dropped, events meanwhile are lost, and after :data:`RETRY_S` a new event
    file is started in the same folder (TensorBoard merges a folder's files by step)."""

    def __init__(self, log_dir: Path, start_step: int = 0) -> None:
        self.log_dir = Path(log_dir)
        self._w: SummaryWriter | None = None
        self._retry_at = 0.0
        self.failed_since: float | None = None  # wall time of the first failure of the current outage
        self.lost = 0  # events dropped in the current outage
        self._open(purge_step=start_step + 1 if start_step > 0 else None)

    def _open(self, purge_step: int | None = None) -> None:
        try:
            self._w = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=30)
        except Exception as e:  # noqa: BLE001 - OSError, or whatever TensorBoard's file layer raises
            self._failed(e)

    def _do(self, what: Callable[[SummaryWriter], object]) -> None:
        if self._w is None:
            if time.monotonic() < self._retry_at or not self._room():
                self.lost += 1
                return
            self._open()
            if self._w is None:
                self.lost += 1
                return
        try:
            what(self._w)
        except Exception as e:  # noqa: BLE001 - the writer thread's error surfaces on the next call
            self._failed(e)
            self.lost += 1
            return
        if self.failed_since is not None:
            log.info("TensorBoard events are written to %s again (%d lost)", self.log_dir, self.lost)
            self.failed_since, self.lost = None, 0

    def _room(self) -> bool:
        try:
            return shutil.disk_usage(self.log_dir).free >= RETRY_FREE_BYTES
        except OSError:
            return True  # cannot tell: try
        finally:
            self._retry_at = time.monotonic() + RETRY_S

    def _failed(self, e: BaseException) -> None:
        w, self._w = self._w, None
        if w is not None:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - the same broken file
                pass
        self._retry_at = time.monotonic() + RETRY_S
        if self.failed_since is None:
            self.failed_since = time.time()
            log.warning("cannot write TensorBoard events to %s (%s: %s): training goes on; a new event file is "
                        "tried every %.0f s", self.log_dir, type(e).__name__, e, RETRY_S)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._do(lambda w: w.add_scalar(tag, value, step))

    def restart_marker(self, step: int, restarts: int, job_id: str | None, slurm_restarts: int, note: str = "") -> None:
        """A visible event at each resume: a scalar step-change and a text note (``note``: why,
        for a restart inside the job after a crash or hang)."""
        job = job_id or "-"
        text = (f"resumed at step {step} (restart #{restarts}, slurm job {job}, "
                f"SLURM_RESTART_COUNT={slurm_restarts}){note}")

        def mark(w: SummaryWriter) -> None:
            w.add_scalar("run/restarts", restarts, step)
            w.add_text("run/events", text, step)
        self._do(mark)

    def flush(self) -> None:
        if self._w is not None:  # nothing to retry for: a flush writes nothing new
            self._do(lambda w: w.flush())

    def close(self) -> None:
        w, self._w = self._w, None
        if w is not None:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001
                log.warning("cannot write the last TensorBoard events to %s: %s", self.log_dir, e)


class NullWriter:
    """What ranks other than 0 write to TensorBoard: nothing (rank 0 logs the run's curves)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def restart_marker(self, step: int, restarts: int, job_id: str | None, slurm_restarts: int, note: str = "") -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
