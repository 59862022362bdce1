"""``foldhpc plot``: a real run with a restart and a hand-written Slurm history with a requeue (its
jobs.jsonl and events.jsonl), drawn into PNG files that matplotlib reads back; without matplotlib,
one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_foldhpc
from test_goodput import killed_run, write_requeue_fixture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plot_of_a_run_with_a_restart(tmp_path):
    run = killed_run(tmp_path)
    p = run_foldhpc("plot", str(run))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(run / "timeline.png")
    assert_png(run / "timeline.png")
    # the function foldhpc chaos calls, with faults marked from outside
    from foldhpc.monitor.plot import plot_timeline
    from foldhpc.monitor.timeline import build_timeline

    tl = build_timeline(run)
    assert len(tl.lanes) == 2 and {m.kind for m in tl.marks} >= {"crash", "restart", "fault"}
    out = plot_timeline(run, tmp_path / "chaos" / "t.png", fault_marks=[(tl.start + 1.0, "SIGKILL trainer")])
    assert out == tmp_path / "chaos" / "t.png"
    assert_png(out)


def test_plot_of_a_requeued_slurm_run(tmp_path):
    run = tmp_path / "slurm-run"
    write_requeue_fixture(run)
    out = tmp_path / "requeue.png"
    p = run_foldhpc("plot", str(run), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert_png(out)


def test_without_matplotlib_one_line_and_exit_2(tmp_path):
    run = tmp_path / "slurm-run"
    write_requeue_fixture(run)
    code = ("import sys; sys.modules['matplotlib'] = None  # as if it were not installed\n"
            "from foldhpc.cli import main; sys.exit(main(['plot', sys.argv[1]]))")
    p = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "foldhpc plot: matplotlib is not installed: pip install 'foldhpc[plot]'"
    assert not (run / "timeline.png").exists()
