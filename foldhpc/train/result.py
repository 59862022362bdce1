"""What a training run returns to the command that started it (the CLI, a Slurm job, a test)."""

from __future__ import annotations

from dataclasses import dataclass, field

from foldhpc.records.exitcodes import ExitCode
from foldhpc.records.status import COMPLETED


@dataclass
class TrainResult:
    state: str  # "completed" or "checkpointed"
    step: int
    signal: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    rank: int = 0  # in a multi-rank run only rank 0 records the job's story and requeues it

    @property
    def exit_code(self) -> int:
        return ExitCode.OK if self.state == COMPLETED else ExitCode.CHECKPOINTED
