"""A model nobody here wrote, run as a ``[task]``: fair-esm's ESM-2 with its contact head
(examples/esm_contacts.py), trained on the contact maps of examples/data, through the real CLI.

Every interrupted run must end bit-identical with an uninterrupted one: after SIGUSR1 (exit 75,
then a resume), after a SIGKILL (resumed from the last checkpoint), after a SIGSEGV under the
supervisor. A changed ``task.params`` value and a checkpoint whose tensors do not fit the model are
refused in one line naming the key, with nothing written. (``foldhpc chaos`` on this task:
tests/test_chaos.py, and docs/measurements/esm_chaos.md for 40 faults.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, assert_same_state, latest_checkpoint, wait_for
from foldhpc.records.envvars import FAIL_AT_STEP, FAIL_KIND, FAIL_ONCE, FAULT_PREFIXES, STEP_DELAY

CONFIG = ROOT / "examples" / "esm_contacts.toml"
STEPS, EVERY = 60, 20
SLOW = {STEP_DELAY: "0.02"}  # interrupted runs: a step lasts long enough to be hit where planned


def _cmd(run: Path, *extra: str) -> list[str]:
    sets = [f"run.dir={run}", f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "run.log_every=1",
            "fault.restart_backoff=0s"]
    return [sys.executable, "-m", "foldhpc", "train", "--config", str(CONFIG),
            *[a for s in sets for a in ("--set", s)], *extra]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FAULT_PREFIXES)}
    return dict(env, OMP_NUM_THREADS="1", **(extra or {}))


def _train(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(run, *extra), cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=120)


def _start(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(_cmd(run, *extra), cwd=ROOT, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _events(run: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = run / "events.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a record being written
            continue
    return [e for e in out if kind is None or e["kind"] == kind]


def _at_step(run: Path, step: int, committed: int = 0) -> bool:
    """Training has passed ``step`` and (if given) the checkpoint of step ``committed`` is durable."""
    done = any(e["step"] >= step for e in _events(run, "progress"))
    return done and (not committed or any(e["step"] == committed for e in _events(run, "checkpoint_committed")))


def _files(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "checkpoints").glob("*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the bits every interrupted one must end with."""
    run = tmp_path_factory.mktemp("esm") / "reference"
    r = _train(run, "--no-supervise")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def _assert_same_as(run: Path, ref: Path) -> None:
    got, want = latest_checkpoint(run), latest_checkpoint(ref)
    assert got.entry.step == want.entry.step == STEPS
    assert got.entry.digest == want.entry.digest
    for key in ("model", "optimizer"):
        assert_same_state(got.state[key], want.state[key], key)
    # torch's generator draws the crops. (Python's and numpy's are not seeded by foldhpc.task, so they
    # differ between any two processes, interrupted or not; the task draws nothing from them.)
    assert_same_state(got.state["foldhpc"]["rng"]["torch"], want.state["foldhpc"]["rng"]["torch"], "rng/torch")
    assert json.loads((run / "status.json").read_text())["metrics"] == \
        json.loads((ref / "status.json").read_text())["metrics"]


def test_the_esm_task_trains_esm2_and_evaluates_contacts(reference: Path) -> None:
    ckpt = latest_checkpoint(reference)
    assert "contact_head.regression.weight" in ckpt.state["model"]  # fair-esm's ESM-2, with its contact head
    assert ckpt.state["model"]["embed_tokens.weight"].shape == (33, 32)  # ESM-1b alphabet, embed_dim 32
    assert ckpt.meta["config"]["task"]["params"]["layers"] == 2
    status = json.loads((reference / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == STEPS
    assert 0.0 <= status["metrics"]["top_l5_long_range_precision"] <= 1.0
    assert status["metrics"]["val_chains"] > 0 and 0.0 < status["metrics"]["val_loss"] < 1.0


def _interrupt(run: Path, sig: signal.Signals, step: int, committed: int = 0) -> int:
    """Start the run (resuming it), send ``sig`` once it has passed ``step`` (and the checkpoint of
    step ``committed`` is durable), return its exit status."""
    p = _start(run, "--no-supervise", env=SLOW)
    try:
        wait_for(lambda: _at_step(run, step, committed) or p.poll() is not None, f"step {step}", timeout=60, poll=0.01)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode in (75, -signal.SIGKILL), out[-3000:]
    return p.returncode


def test_sigusr1_then_sigkill_each_resume_and_the_run_ends_bit_exact(reference: Path, tmp_path: Path) -> None:
    """One run, three processes: SIGUSR1 (save at the next step, exit 75), then a SIGKILL (resume
    from the newest checkpoint), then to the end."""
    run = tmp_path / "run"
    assert _interrupt(run, signal.SIGUSR1, 15) == 75
    saved = _events(run, "signal")[-1]["step"]
    assert 15 <= saved < 2 * EVERY and latest_checkpoint(run).entry.step == saved  # saved where it stopped: 0 lost
    assert _interrupt(run, signal.SIGKILL, 45, committed=2 * EVERY) == -signal.SIGKILL
    assert _events(run, "resumed")[-1]["step"] == saved
    last = latest_checkpoint(run).entry.step
    assert last >= 2 * EVERY and last < STEPS
    r = _train(run, "--no-supervise")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _events(run, "resumed")[-1]["step"] == last
    assert json.loads((run / "status.json").read_text())["restarts"] == 2
    _assert_same_as(run, reference)


def test_a_segfault_is_restarted_by_the_supervisor_bit_exact(reference: Path, tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "segfaulted"
    r = _train(run, "--supervise", env={FAIL_AT_STEP: "33", FAIL_KIND: "segfault", FAIL_ONCE: str(marker)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.read_text().split()[1:3] == ["step", "33"]
    failure = _events(run, "supervisor_failure")
    assert len(failure) == 1 and "SIGSEGV" in failure[0]["reason"], failure
    assert len(_events(run, "supervisor_restart")) == 1
    assert _events(run, "resumed")[-1]["step"] == EVERY  # the newest checkpoint before step 33
    _assert_same_as(run, reference)


def _checkpoints(run: Path) -> dict[str, str]:
    """The checkpoint files and their manifest, by content (OWNER.json is rewritten for a copied run
    directory: the claim names the run directory's path)."""
    return {name: digest for name, digest in _files(run).items() if name.endswith(".ckpt") or name == "manifest.json"}


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``foldhpc.cli.main`` in this process, from the repository root (the config's paths are
    relative to it): a refusal needs no process of its own (a process start is ~3 s of imports here).
    The torch settings the task's config applies (train.deterministic, threads) are put back, and so
    are the ``foldhpc`` logger's handlers: its console handler writes to the stderr it was made with
    (this test's capture, closed after it)."""
    import torch

    from foldhpc.cli import main

    monkeypatch.chdir(ROOT)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    logger = logging.getLogger("foldhpc")
    saved, level, propagate = list(logger.handlers), logger.level, logger.propagate
    for h in saved:
        logger.removeHandler(h)
    yield main
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    for h in saved:
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = propagate
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("args, needles", [
    (["--set", "task.params.crop=40"], ("task.params.crop: 48 -> 40", "--force-resume")),
    # --force-resume: the config check lets the new sizes through; the model's tensors do not fit
    (["--force-resume", "--set", "task.params.embed_dim=64"],
     ("size mismatch for embed_tokens.weight", "torch.Size([33, 32])")),  # mis-shaped tensors
    (["--force-resume", "--set", "task.params.layers=1"], ("Unexpected key(s)", '"layers.1.')),  # tensors it lacks
    (["--force-resume", "--set", "task.params.layers=3"], ("Missing key(s)", '"layers.2.')),  # and the other way
], ids=["changed-param", "mis-shaped", "extra-tensors", "missing-tensors"])
def test_a_changed_param_or_a_checkpoint_that_does_not_fit_the_model_is_refused_naming_the_key(
        reference: Path, tmp_path: Path, in_process: Any, capsys: pytest.CaptureFixture[str], args: list[str],
        needles: tuple[str, ...]) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _checkpoints(run)
    capsys.readouterr()
    rc = in_process(_cmd(run, "--no-supervise", "--set", f"train.max_steps={STEPS + 20}", *args)[3:])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    for n in needles:
        assert n in line, line
    if "--force-resume" in args:
        assert f"checkpoint {run / 'checkpoints' / f'step_{STEPS:08d}.ckpt'}" in line, line
        assert "states['model'].load_state_dict() refused it" in line and "Nothing was written" in line, line
    assert _checkpoints(run) == before  # nothing overwritten, nothing added
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
