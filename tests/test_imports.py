"""Commands that do not train must not import torch (about 2 s per process on a small node).

The supervisor (``foldhpc train --supervise`` up to spawning its trainer), ``status``, ``goodput``,
``plot``, ``init``, ``submit --help`` and ``python -m foldhpc.slurm.requeue`` (on the critical path
of a requeue) only read files, parse arguments or spawn processes. Each check runs in a fresh
interpreter, since this test process may have imported torch already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

HEAVY = ("torch",)


def _run(code: str, timeout: float = 60) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; return which HEAVY modules were imported by its end."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json as _json, sys as _sys
        print("\\nIMPORTED=" + _json.dumps({{m: m in _sys.modules for m in {HEAVY!r}}}))
    """)
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("IMPORTED=")][-1]
    return json.loads(line.removeprefix("IMPORTED="))


@pytest.mark.parametrize("module", ["foldhpc.cli", "foldhpc.slurm.requeue", "foldhpc.resilience.supervisor",
                                    "foldhpc.checkpoint.errors", "foldhpc.checkpoint.signals",
                                    "foldhpc.monitor.report", "foldhpc.monitor.goodput", "foldhpc.monitor.plot"])
def test_import_without_torch(module):
    assert _run(f"import {module}") == {"torch": False}


def _main(argv: list[str], entry: str = "foldhpc.cli") -> str:
    """Call ``entry``'s main(argv) the way ``python -m`` would, swallowing its SystemExit."""
    return f"""
        import sys
        from {entry} import main
        try:
            rc = main({argv!r})
        except SystemExit as e:
            rc = e.code
        print("rc", rc, file=sys.stderr)
    """


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["status", "/nonexistent"],
                                  ["goodput", "/nonexistent"], ["plot", "/nonexistent"], ["init", "--help"],
                                  ["submit", "--help"], ["train", "--help"], ["checkpoints", "--help"]])
def test_cli_commands_without_torch(argv):
    assert _run(_main(argv)) == {"torch": False}


def test_status_and_checkpoints_of_a_run_dir_without_torch(tmp_path):
    """Listing checkpoints reads the manifest and file headers only; ``--verify`` loads them (torch)."""
    import torch

    from foldhpc.checkpoint.manager import CheckpointManager

    (tmp_path / "checkpoints").mkdir()
    CheckpointManager(tmp_path / "checkpoints", async_save=False).save(
        5, {"model": {"w": torch.ones(3)}}, {"note": "test"}, blocking=True)
    (tmp_path / "checkpoints" / "manifest.json").unlink()  # indexed from the file's own header instead
    assert _run(_main(["status", str(tmp_path)])) == {"torch": False}
    assert _run(_main(["checkpoints", str(tmp_path)])) == {"torch": False}
    assert _run(_main(["checkpoints", "--verify", str(tmp_path)])) == {"torch": True}


def test_requeue_without_torch():
    assert _run(_main(["--help"], entry="foldhpc.slurm.requeue")) == {"torch": False}


def test_supervisor_reaches_spawn_without_torch(tmp_path):
    """``train --supervise`` up to the point where the supervisor would start its trainer."""
    run_dir = tmp_path / "run"
    code = f"""
        import sys
        from foldhpc.resilience import supervisor

        def fake_run(self):
            print("TORCH_AT_SPAWN", "torch" in sys.modules)
            return 0

        supervisor.Supervisor.run = fake_run
        from foldhpc.cli import main
        rc = main(["train", "--supervise", "--set", "run.dir={run_dir}"])
        assert rc == 0, rc
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "TORCH_AT_SPAWN False" in p.stdout, p.stdout + p.stderr


def test_checkpoint_error_is_one_class():
    """The light home and the old import paths name the same class (``except`` works either way)."""
    from foldhpc import checkpoint
    from foldhpc.checkpoint import errors, manager

    assert manager.CheckpointError is errors.CheckpointError is checkpoint.CheckpointError
