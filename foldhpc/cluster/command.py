"""Running a Slurm client command (sacct, squeue, scontrol, sbatch, scancel): one runner, one error.

A missing binary, a non-zero exit and a timeout all become :class:`SlurmCommandError` with the
command's own message, so callers decide in one ``except`` whether Slurm could answer.
"""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 30.0  # seconds a Slurm client command may take before it counts as not answering
#: per command of a decision taken inside a job within its signal lead (requeue, follow-up's last look);
#: a healthy slurmctld/slurmdbd answers in milliseconds
CALL_TIMEOUT_S = 10.0


class SlurmCommandError(RuntimeError):
    """A Slurm client command is missing, failed or timed out."""


def run_command(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """stdout of ``cmd``; SlurmCommandError (with stderr) if it cannot run or exits non-zero."""
    log.debug("running %s", " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmCommandError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(f"{cmd[0]} did not answer within {timeout:.0f}s") from None
    except OSError as e:
        raise SlurmCommandError(f"{cmd[0]}: {e}") from None
    if p.returncode != 0:
        msg = " ".join((p.stderr or p.stdout).split())[:300] or "no message"
        raise SlurmCommandError(f"{cmd[0]} exited with {p.returncode}: {msg}")
    return p.stdout
