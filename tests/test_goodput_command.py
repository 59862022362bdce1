"""``foldhpc goodput`` of a command foldhpc did not write, run by ``foldhpc supervise -- CMD``.

Such a command records nothing itself: the supervisor's records and status.json are all there is.
It used to read 0.00 s wall with 0 steps and no word of why; it reads its wall time, its process
starts and their outcomes, with the step figures unknown and a note saying why.
"""

from __future__ import annotations

import sys
from pathlib import Path

from foldhpc.cli import main
from foldhpc.monitor.goodput import goodput_of
from foldhpc.monitor.timeline import FOREIGN_NOTE

CRASH_ONCE = """
import os, sys, time
marker = sys.argv[1]
time.sleep(0.5)
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(1)  # the first start crashes
"""


def test_goodput_of_a_foreign_command_has_its_wall_time_and_starts_and_says_steps_are_unknown(tmp_path: Path) -> None:
    script = tmp_path / "cmd.py"
    script.write_text(CRASH_ONCE)
    run = tmp_path / "run"
    rc = main(["supervise", "--set", f"run.dir={run}", "--set", "fault.restart_backoff=0s", "--",
               sys.executable, str(script), str(tmp_path / "crashed")])
    assert rc == 0
    g = goodput_of(run, use_sacct=False)
    assert g.wall_s >= 1.0  # two starts of at least 0.5 s each
    outcomes = [r.outcome for r in g.processes]
    assert len(outcomes) == 2 and "exit status 1" in outcomes[0] and outcomes[1] == "completed", outcomes
    assert g.steps["productive"] is None and g.goodput is None  # unknown, not 0 %
    assert FOREIGN_NOTE in g.notes
