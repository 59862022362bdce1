"""The command line as a user meets it: help texts, data prepare/info, exit codes."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import GOOD_DATA, ROOT, TINY, run_foldhpc


@pytest.mark.parametrize("cmd", [[], ["train"], ["data"], ["data", "prepare"], ["checkpoints"], ["submit"]])
def test_help_is_useful(cmd):
    p = run_foldhpc(*cmd, "--help")
    assert p.returncode == 0
    assert "usage: foldhpc" in p.stdout
    if cmd == ["train"]:
        assert "--no-resume" in p.stdout and "--set" in p.stdout and "75" in p.stdout


def test_data_prepare_and_info_report_counts_and_skipped_files(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(GOOD_DATA, data, ignore=shutil.ignore_patterns(".foldhpc-cache"))
    for f in (ROOT / "tests" / "data" / "bad").iterdir():
        shutil.copy(f, data / f.name)
    p = run_foldhpc("data", "prepare", "--config", str(TINY), "--set", f"data.path={data}")
    assert p.returncode == 0, p.stderr
    assert "23 files -> 9 chains" in p.stdout and "skipped 14" in p.stdout, p.stdout
    for name in ("empty.pdb", "truncated.pdb.gz", "garbage.pdb.gz", "structure.txt", "dna_only.pdb"):
        assert name in p.stdout  # every skipped file is listed with its reason
    p = run_foldhpc("data", "info", "--config", str(TINY), "--set", f"data.path={data}", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["n_files"] == 23 and info["n_parsed"] == 0  # second call: nothing re-parsed
    assert info["n_cached"] == 22  # all but the .txt file, which is never parsed
    assert info["n_records"] == 9 and len(info["skipped"]) == 14
    assert {s["file"]: s["reason"] for s in info["skipped"]}["empty.pdb"] == "empty file"


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_foldhpc("data", "info", "--config", str(TINY), "--set", f"data.path={tmp_path / 'empty'}")
    assert p.returncode == 2
    assert "data error" in p.stderr and "empty" in p.stderr


def test_submit_local_runs_the_same_job_without_slurm(tmp_path):
    import time

    from conftest import read_json, set_args, tiny_overrides

    run = tmp_path / "run"
    p = run_foldhpc("submit", "--local", "--config", str(TINY), *set_args(tiny_overrides(run, **{"train.max_steps": 8})))
    assert p.returncode == 0, p.stderr
    assert "submitted job" in p.stdout and str(run) in p.stdout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = (run / "status.json").exists() and read_json(run / "status.json")
        if st and st.get("state") in ("completed", "failed"):
            break
        time.sleep(0.2)
    assert st["state"] == "completed" and st["step"] == 8
    events = [json.loads(line)["event"] for line in (run / "jobs.jsonl").read_text().splitlines()]
    assert events == ["submitted", "started", "completed"]
