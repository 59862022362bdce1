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

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunWriter:
    def __init__(self, log_dir: Path, start_step: int = 0) -> None:
        self._w = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step > 0 else None,
                                flush_secs=30)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._w.add_scalar(tag, value, step)

    def restart_marker(self, step: int, restarts: int, slurm: dict[str, Any], note: str = "") -> None:
        """A visible event at each resume: a scalar step-change and a text note (``note``: why,
        for a restart inside the job after a crash or hang)."""
        self._w.add_scalar("run/restarts", restarts, step)
        job = slurm.get("job_id") or "-"
        self._w.add_text("run/events", f"resumed at step {step} (restart #{restarts}, slurm job {job}, "
                                       f"SLURM_RESTART_COUNT={slurm.get('restart_count', 0)}){note}", step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class NullWriter:
    """What ranks other than 0 write to TensorBoard: nothing (rank 0 logs the run's curves)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def restart_marker(self, step: int, restarts: int, slurm: dict[str, Any], note: str = "") -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
