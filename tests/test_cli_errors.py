"""User errors read like user errors: one line, no traceback, exit 2 (nothing was started).

Configuration, data and checkpoint-directory mistakes are the user's to fix; a restart cannot fix
them, so exit 2 also means "never retry" to the supervisor (foldhpc.resilience.supervisor).
Tracebacks are for bugs: an unexpected exception still shows one (exit 1).
"""

from __future__ import annotations

import pytest

from conftest import TINY, read_json, run_foldhpc, set_args, tiny_overrides


def assert_user_error(p, prefix: str, *words: str) -> str:
    """Exit 2, no traceback, and exactly one ``foldhpc: ...`` line holding ``words``."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("foldhpc")]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(prefix), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    # the message is not repeated by the logger on the console (it is in train.log)
    body = lines[0].split(" error: ", 1)[-1]
    assert sum(body in ln for ln in p.stderr.splitlines()) == 1, p.stderr
    return lines[0]


def test_missing_data_path(tmp_path):
    run = tmp_path / "run"
    p = run_foldhpc("train", "--config", str(TINY), "--set", f"data.path={tmp_path / 'nope'}",
                    "--set", f"run.dir={run}")
    assert_user_error(p, "foldhpc: data error:", str(tmp_path / "nope"), "does not exist", "data.path")
    st = read_json(run / "status.json")  # still recorded for `foldhpc status`, and in the log file
    assert st["state"] == "failed" and "does not exist" in st["error"]
    assert "does not exist" in (run / "train.log").read_text()


def test_missing_data_path_under_the_supervisor_is_not_retried(tmp_path):
    run = tmp_path / "run"
    p = run_foldhpc("train", "--supervise", "--config", str(TINY), "--set", f"data.path={tmp_path / 'nope'}",
                    "--set", f"run.dir={run}")
    assert_user_error(p, "foldhpc: data error:", "does not exist")
    assert "restart" not in p.stderr


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_foldhpc("data", "info", "--config", str(TINY), "--set", f"data.path={tmp_path / 'empty'}")
    assert_user_error(p, "foldhpc: data error:", "contains no files")


def test_unusable_checkpoint_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_foldhpc("train", "--config", str(TINY),
                    *set_args(tiny_overrides(tmp_path / "run", **{"checkpoint.dir": str(blocker / "ckpt")})))
    assert_user_error(p, "foldhpc: checkpoint error:", "cannot create checkpoint directory", "checkpoint.dir")


def test_uncreatable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(blocker / "run")))
    assert_user_error(p, "foldhpc: config error:", "run.dir", "cannot be created")


def test_resume_from_missing_file(tmp_path):
    p = run_foldhpc("train", "--config", str(TINY), "--resume", str(tmp_path / "x.ckpt"),
                    *set_args(tiny_overrides(tmp_path / "run")))
    assert_user_error(p, "foldhpc: checkpoint error:", "no such checkpoint file")


@pytest.mark.parametrize("args, words", [
    (["train", "--config", "/no/such.toml"], ["config error", "does not exist"]),
    (["train", "--config", str(TINY), "--set", "train.max_step=5"], ["unknown key", "train.max_steps"]),
    (["checkpoints", "/no/such/run"], ["checkpoint error", "no such run directory"]),
    (["data", "prepare", "--config", str(TINY), "--shard", "x"], ["data error", "--shard"]),
])
def test_other_user_errors(args, words):
    p = run_foldhpc(*args)
    assert_user_error(p, "foldhpc:", *words)


def test_a_bug_still_shows_its_traceback(tmp_path):
    """An unexpected exception (here an injected one mid-run) is not dressed up as a user error."""
    run = tmp_path / "run"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{"train.max_steps": 4})),
                    env={"FOLDHPC_FAIL_AT_STEP": "2"})
    assert p.returncode == 1
    assert "Traceback" in p.stderr


def test_exit_codes_are_documented():
    p = run_foldhpc("--help")
    assert p.returncode == 0
    for code in ("0 ok", "1 failed", "2 user error", "75 checkpointed"):
        assert code in " ".join(p.stdout.split()), p.stdout
