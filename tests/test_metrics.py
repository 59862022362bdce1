"""foldhpc metrics (issue 25): the metric set from a real run's records, the textfile the running
trainer or its supervisor publishes, ``--serve``, and ``monitor.on_state_change``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, TINY, foldhpc_cmd, run_foldhpc, set_args, tiny_overrides, wait_for
from foldhpc.config import load_config
from foldhpc.monitor import metrics
from foldhpc.records.events import EventLog

NOTE_ENV = 'env | grep "^FOLDHPC_" | sort > "$FOLDHPC_RUN_DIR/note-$FOLDHPC_STATE"'


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(name, labels without run): value} of an exposition text (parsed by prometheus_client)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))
            out[(s.name, labels)] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def notes(run_dir: Path) -> dict[str, dict[str, str]]:
    out = {}
    for f in run_dir.glob("note-*"):
        out[f.name[5:]] = dict(ln.split("=", 1) for ln in f.read_text().splitlines() if "=" in ln)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run of 12 steps with a textfile and a notification command."""
    base = tmp_path_factory.mktemp("metrics")
    run = base / "run"
    tf = base / "textfile"
    r = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(
        run, **{"train.max_steps": 12, "checkpoint.every_steps": 5, "monitor.textfile_dir": str(tf),
                "monitor.textfile_every": "1s", "monitor.on_state_change": NOTE_ENV})))
    assert r.returncode == 0, r.stderr[-3000:]
    return run, tf


def test_a_finished_run_has_every_figure_its_records_give(finished):
    run, tf = finished
    (prom,) = tf.glob("*.prom")
    assert prom.name.startswith("foldhpc-run-")
    text = prom.read_text()
    assert f'run="{run.absolute()}"' in text
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert names <= set(metrics.METRICS), names - set(metrics.METRICS)
    assert value(text, "foldhpc_run_state", state="completed") == 1
    assert value(text, "foldhpc_run_state", state="running") == 0
    assert value(text, "foldhpc_run_step") == 12
    assert value(text, "foldhpc_run_max_steps") == 12
    assert value(text, "foldhpc_run_last_checkpoint_step") == 12
    assert value(text, "foldhpc_run_checkpoint_write_seconds") > 0
    assert value(text, "foldhpc_run_checkpoint_interval_seconds") == 900
    assert value(text, "foldhpc_run_failures_total") == 0
    assert value(text, "foldhpc_run_lock_held") == 0  # released at the end
    assert value(text, "foldhpc_run_nonfinite_skipped_total") == 0
    assert value(text, "foldhpc_run_rollbacks_total") == 0
    assert 0 < value(text, "foldhpc_run_goodput_ratio", scope="run") <= 1
    assert value(text, "foldhpc_run_step_seconds") > 0
    last = value(text, "foldhpc_run_last_step_timestamp_seconds")
    assert abs(last - json.loads((run / "status.json").read_text())["updated_at"]) < 5
    # the command prints the same figures from the records (up to the collection times)
    r = run_foldhpc("metrics", "--no-sacct", str(run))
    assert r.returncode == 0, r.stderr
    again = samples(r.stdout)
    for key, v in samples(text).items():
        if "seconds_since" in key[0] or key[0] == "foldhpc_run_metrics_timestamp_seconds":
            continue
        assert again.get(key) == pytest.approx(v), key


def test_state_change_command_gets_the_state_in_its_environment(finished):
    run, _ = finished
    got = wait_for(lambda: notes(run).get("completed"), "the completed notification")
    assert got["FOLDHPC_STATE"] == "completed"
    assert got["FOLDHPC_STEP"] == "12"
    assert got["FOLDHPC_RUN_DIR"] == str(run.absolute())
    assert set(notes(run)) == {"completed"}


def test_a_failing_or_hanging_notification_never_touches_training(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    r = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(
        run, **{"train.max_steps": 3, "monitor.on_state_change": "echo boom; sleep 300; exit 3",
                "monitor.textfile_dir": str(tmp_path / "tf")})))
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.monotonic() - t0 < 120  # the 300 s sleep was not waited for
    assert wait_for(lambda: "boom" in (run / "notify.log").read_text() if (run / "notify.log").exists() else None,
                    "the command's output in notify.log")
    r = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(
        tmp_path / "run2", **{"train.max_steps": 3, "monitor.on_state_change": "exit 7"})))
    assert r.returncode == 0
    # a textfile directory that cannot be written: a warning, training goes on
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(
        tmp_path / "run3", **{"train.max_steps": 3, "monitor.textfile_dir": str(blocker / "sub")})))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cannot publish the run's metrics" in r.stderr


def test_a_hang_is_told_then_the_failure_with_the_node(tmp_path):
    """Under the supervisor: a hung trainer (no restarts left) -> "hung", then "failed"; the
    metrics count the failure against this node."""
    run = tmp_path / "run"
    r = run_foldhpc("train", "--supervise", "--config", str(TINY), *set_args(tiny_overrides(
        run, **{"train.max_steps": 20, "fault.max_restarts": 0, "fault.hang_timeout": "2s", "fault.hang_floor": "1s",
                "monitor.on_state_change": NOTE_ENV})),
        # at step 15, 50 ms a step: the supervisor (polling every 0.1 s) has seen training beats come and
        # go, so the hang timeout applies (a trainer seen beating once only is still judged by
        # fault.startup_timeout; under CI load a hang at step 4 of 20 ms steps hit exactly that)
        env={"FOLDHPC_FAIL_AT_STEP": "15", "FOLDHPC_FAIL_KIND": "hang", "FOLDHPC_DEBUG_STEP_DELAY_S": "0.05"})
    assert r.returncode == 1, r.stderr[-3000:]
    got = wait_for(lambda: (n := notes(run)) and {"hung", "failed"} <= set(n) and n, "hung and failed notes")
    assert got["hung"]["FOLDHPC_STEP"] == "15"
    assert "hung at step 15" in got["hung"]["FOLDHPC_REASON"]
    assert "hung at step 15" in got["failed"]["FOLDHPC_REASON"]
    text = run_foldhpc("metrics", "--no-sacct", str(run)).stdout
    assert value(text, "foldhpc_run_failures_total") == 1
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    assert value(text, "foldhpc_run_node_failures_total", node=node) == 1
    assert value(text, "foldhpc_run_state", state="failed") == 1


def test_non_finite_steps_are_counted(tmp_path):
    run = tmp_path / "run"
    r = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(run, **{"train.max_steps": 8})),
                    env={"FOLDHPC_NAN_AT_STEPS": "3,5"})
    assert r.returncode == 0, r.stderr[-2000:]
    text = run_foldhpc("metrics", "--no-sacct", str(run)).stdout
    assert value(text, "foldhpc_run_nonfinite_skipped_total") == 2
    assert value(text, "foldhpc_run_rollbacks_total") == 0


def test_events_are_read_on_from_where_the_last_collection_stopped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ev = EventLog(run)
    c = metrics.RunCollector(run, use_sacct=False)
    ev.emit("progress", step=10, max_steps=100, loss=1.0, lr=0.1, grad_norm=1.0, samples_per_s=4.0,
            data_wait_frac=0.0, steps=10, t=1000.0)
    ev.emit("progress", step=20, max_steps=100, loss=1.0, lr=0.1, grad_norm=1.0, samples_per_s=4.0,
            data_wait_frac=0.0, steps=10, t=1005.0)
    f = c.collect()
    assert (f.step, f.last_step_at, f.step_s) == (20, 1005.0, 0.5)
    offset = c.tally.offset
    with open(run / "events.jsonl", "a") as fh:  # a record being written: not read yet
        fh.write('{"v": 1, "t": 1010.0, "pid": 1, "rank": null, "kind": "supervisor_failure", "failed_r')
    f = c.collect()
    assert c.tally.offset == offset and f.failures == 0
    with open(run / "events.jsonl", "a") as fh:
        fh.write('ank": null, "node": "n7", "step": 20, "reason": "x", "cause": "x"}\n')
    f = c.collect()
    assert f.failures == 1 and f.node_failures == {"n7": 1}
    (run / "events.jsonl").write_text("")  # replaced by a shorter file: read afresh
    f = c.collect()
    assert f.failures == 0 and f.last_step_at is None


def test_hang_bound_follows_the_run_unless_set():
    cfg = load_config(None, [])
    assert metrics.hang_bound_s(cfg, None) == 120  # fault.hang_floor
    assert metrics.hang_bound_s(cfg, 10.0) == 300  # 3 log windows of 10 steps
    assert metrics.hang_bound_s(load_config(None, ["run.log_every=1"]), 10.0) == 200  # 20 steps
    assert metrics.hang_bound_s(load_config(None, ["fault.hang_timeout=45s"]), 10.0) == 45
    assert metrics.hang_bound_s(load_config(None, ["monitor.hang_after=7s", "fault.hang_timeout=0"]), 10.0) == 7
    assert metrics.hang_bound_s(load_config(None, ["fault.hang_timeout=0"]), None) == 120


def test_bad_arguments_are_one_line_errors(tmp_path):
    r = run_foldhpc("metrics", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run directory" in r.stderr
    r = run_foldhpc("metrics", "--serve", "localhost:http", str(tmp_path))
    assert r.returncode == 2 and "--serve 'localhost:http'" in r.stderr
    r = run_foldhpc("train", "--config", str(TINY), "--set", "monitor.textfile_every=0s")
    assert r.returncode == 2 and "monitor.textfile_every" in r.stderr


def test_serve_answers_scrapes_with_runs_that_appear(finished, tmp_path):
    run, _ = finished
    root = tmp_path / "root"
    root.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(foldhpc_cmd("metrics", "--no-sacct", "--serve", f"127.0.0.1:{port}", str(root)), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    return resp.read().decode()
            except OSError:
                return None
        first = wait_for(scrape, "the metrics endpoint", timeout=60)
        assert "foldhpc_run_step{" not in first
        os.symlink(run, root / "run")  # a run that appears under the served folder
        text = wait_for(lambda: (t := scrape()) and "foldhpc_run_step{" in t and t, "the new run", timeout=30)
        assert re.search(r'foldhpc_run_step\{run="[^"]*root/run"\} 12\.0', text)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0


def test_the_readme_lists_the_metric_set():
    """The README's table of the metric set has every metric, by the name a query uses, and no other."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Monitoring"):text.index("## Tests")]
    listed = re.findall(r"^\| `(foldhpc_[a-z_]+)` \|", section, re.M)
    assert sorted(listed) == sorted(d.exposed for d in metrics.METRICS.values())
    for d in metrics.METRICS.values():  # the labels column
        row = next(ln for ln in section.splitlines() if ln.startswith(f"| `{d.exposed}` |"))
        labels = row.strip("|").split("|")[1]
        assert re.findall(r"`(\w+)`", labels) == list(d.labels), d.name
