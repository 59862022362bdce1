"""The batch shell of a submitit job survives a whole-job preemption signal (issue 23 item 4).

``scancel --full --signal=USR1`` reaches the batch shell as well as the trainer; bash dies of
SIGUSR1 by default, the job ends FAILED (0:10) and the run never comes back. foldhpc's line in the
job script (:func:`foldhpc.slurm.submit.batch_shell_traps`) traps it. Here the real bash runs that
line with a child in the foreground that signals the shell, as slurmd would, and exits 75 (saved,
requeue me): the shell must live on, end with the child's status, and the child's programs must not
inherit an ignored signal. The real cluster's version: tests/slurm/test_chain.py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from conftest import TINY, tiny_overrides
from foldhpc.config import load_config
from foldhpc.slurm.submit import batch_shell_traps

CHILD = ("import os, signal; os.kill(os.getppid(), signal.SIGUSR1); os.kill(os.getppid(), signal.SIGUSR2); "
         "print(int(signal.getsignal(signal.SIGUSR1)), int(signal.getsignal(signal.SIGUSR2))); raise SystemExit(75)")


def shell(trap: str) -> subprocess.CompletedProcess[str]:
    # a command after the child, as in submitit's script: bash must not exec the child in its place
    script = f"{trap}\n{sys.executable} -c '{CHILD}'\nexit $?\n"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_the_trap_keeps_the_shell_alive_and_leaves_the_signals_to_the_trainer(tmp_path):
    cfg = load_config(TINY, tiny_overrides(tmp_path / "run"))
    line = batch_shell_traps(cfg)
    assert line.startswith("trap 'true' ") and "USR1" in line and "USR2" in line and "TERM" not in line.split("#")[0]
    p = shell(line)
    assert p.returncode == 75, (p.returncode, p.stderr)  # the child's status, not 128 + SIGUSR1
    assert p.stdout.split() == [str(int(signal.SIG_DFL))] * 2, p.stdout  # nothing inherited ignored
    bare = shell("")
    assert bare.returncode == -signal.SIGUSR1, bare  # without it bash dies of SIGUSR1 (what the issue saw)


def test_a_configured_signal_is_trapped_too(tmp_path):
    cfg = load_config(TINY, tiny_overrides(tmp_path / "run", **{"checkpoint.signals": ["SIGUSR1", "SIGTERM", "SIGHUP"]}))
    line = batch_shell_traps(cfg).split("#")[0]
    assert line.split()[2:] == ["HUP", "USR1", "USR2"], line


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="submitit's Slurm executor needs sbatch on PATH")
def test_the_job_script_traps_before_srun(tmp_path):
    from foldhpc.slurm.submit import executor_for

    cfg = load_config(TINY, tiny_overrides(tmp_path / "run"))
    lines = executor_for(cfg)._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid").splitlines()
    trap = lines.index(batch_shell_traps(cfg))
    assert trap < next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
