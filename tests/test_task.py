"""``[task]``: a user's model run by the CLI (foldhpc.task), in-process through ``foldhpc.cli.main``.

What a signal or a kill does to a task is the Session's (tests/test_session.py) and the ESM-2
example's (tests/test_esm_task.py) business; here: the config section, the factory's errors, the
fingerprint of ``task.params``, exact resume through the CLI, and that every route trains the task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from foldhpc.cli import main, train_in_job
from foldhpc.config import ConfigError, load_config
from foldhpc.train.compat import diff_configs

from conftest import assert_same_state, latest_checkpoint

TASK = '''
import torch, foldhpc

def build(cfg):
    p = cfg.task.params
    width = p.get("width", 8)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(0.1), torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    batches = foldhpc.StepBatches(data, 8, cfg.train.seed)

    def step(run, s):
        x, y = batches[s]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        run.wait_staged()
        opt.step()
        return {"loss": loss.item()}

    return foldhpc.Task(states={"model": model, "optimizer": opt}, step=step,
                        evaluate=lambda: {"weight_sum": float(model[0].weight.detach().sum())})

def build_ddp(cfg):
    t = build(cfg)
    model, plain_step = t.states["model"], t.step
    box = {}

    def start(run):  # the process group is up: wrap for DDP (gradients averaged over the ranks)
        box["ddp"] = torch.nn.parallel.DistributedDataParallel(model)

    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    opt = t.states["optimizer"]

    def step(run, s):
        batches = box.setdefault("batches", run.batches(data, 8))  # this rank's half of each batch
        x, y = batches[s]
        loss = torch.nn.functional.mse_loss(box["ddp"](x), y)
        opt.zero_grad()
        loss.backward()
        run.wait_staged()
        opt.step()
        return {"loss": loss.item()}

    return foldhpc.Task(states=t.states, step=step, start=start)

def raises(cfg):
    raise ValueError("data folder /nowhere is empty")

def not_a_task(cfg):
    return {"model": None}

def no_state_dict(cfg):
    t = build(cfg)
    return foldhpc.Task(states={"model": t.states["model"], "counter": 3}, step=t.step)
'''


@pytest.fixture
def task_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # "tasks.py:build" is relative to the working directory
    f = tmp_path / "tasks.py"
    f.write_text(TASK)
    return f


def _train(run: Path, *sets: str, factory: str = "tasks.py:build", steps: int = 30) -> int:
    args = ["train", "--no-supervise", "--set", f"run.dir={run}", "--set", f"task.factory={factory}",
            "--set", f"train.max_steps={steps}", "--set", "run.log_every=5", "--set", "train.threads=1",
            "--set", "checkpoint.every_steps=10"]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for n in needles:
        assert n in last, last
    return last


def _files(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "checkpoints").glob("*.ckpt"))}


def test_a_task_trains_through_the_cli_and_resumes_bit_for_bit(task_file: Path, tmp_path: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train(ref, steps=30) == 0
    # the same training in two starts: 0..20, then 20..30 from the checkpoint of step 20
    assert _train(run, steps=20) == 0
    assert _train(run, steps=30) == 0
    a, b = latest_checkpoint(ref), latest_checkpoint(run)
    assert a.entry.step == b.entry.step == 30
    assert set(a.state) == {"model", "optimizer", "foldhpc"}  # the task's states, not the built-in model's
    assert_same_state(a.state["model"], b.state["model"], "model")
    assert_same_state(a.state["optimizer"], b.state["optimizer"], "optimizer")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 30 and status["restarts"] == 1
    assert status["metrics"]["weight_sum"] == pytest.approx(float(a.state["model"]["0.weight"].sum()))
    assert a.meta["config"]["task"] == {"factory": "tasks.py:build", "params": {}}


def test_no_resume_and_resume_path_reach_a_task_as_for_the_built_in_model(task_file: Path, tmp_path: Path) -> None:
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert _train(run, steps=30) == 0  # checkpoints at 10, 20, 30
    at_10 = run / "checkpoints" / "step_00000010.ckpt"
    assert at_10.is_file()
    common = ["--no-supervise", "--set", f"run.dir={run}", "--set", "task.factory=tasks.py:build", "--set",
              "run.log_every=5", "--set", "train.threads=1", "--set", "checkpoint.every_steps=10"]
    # back to step 10, then on to 30: the same bits as the first 30 steps (the state of step 10 is theirs)
    assert main(["train", "--resume", str(at_10), *common, "--set", "train.max_steps=30"]) == 0
    resumed = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
               if '"kind":"resumed"' in line]
    assert resumed[-1]["step"] == 10 and resumed[-1]["path"] == str(at_10)
    assert _train(ref, steps=30) == 0
    assert_same_state(latest_checkpoint(run).state["model"], latest_checkpoint(ref).state["model"], "model")
    # afresh: the old checkpoints moved aside (kept), training from step 0
    assert main(["train", "--no-resume", *common, "--set", "train.max_steps=10"]) == 0
    assert [p.name for p in sorted((run / "checkpoints").glob("*.ckpt"))] == ["step_00000010.ckpt"]
    assert len([d for d in (run / "checkpoints").iterdir() if d.is_dir() and d.name.startswith("old-")]) == 1
    assert json.loads((run / "status.json").read_text())["restarts"] == 0


def test_a_changed_task_param_is_refused_naming_it_and_force_resume_applies_it(
        task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train(run, "task.params.width=8", steps=10) == 0
    before = _files(run)
    assert _train(run, "task.params.width=8", "task.params.depth=2", steps=20) == 2
    _one_line_error(capsys, "task.params.depth: <unset> -> 2", "--force-resume")
    assert _files(run) == before  # nothing written
    assert main(["train", "--no-supervise", "--force-resume", "--set", f"run.dir={run}", "--set",
                 "task.factory=tasks.py:build", "--set", "task.params.width=8", "--set", "task.params.depth=2",
                 "--set", "train.max_steps=20", "--set", "train.threads=1"]) == 0
    assert latest_checkpoint(run).entry.step == 20


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_naming_the_state(
        task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train(run, "task.params.width=8", steps=10) == 0
    before = _files(run)
    rc = main(["train", "--no-supervise", "--force-resume", "--set", f"run.dir={run}", "--set",
               "task.factory=tasks.py:build", "--set", "task.params.width=16", "--set", "train.max_steps=20"])
    assert rc == 2
    line = _one_line_error(capsys, "states['model'].load_state_dict() refused it", "size mismatch")
    assert "step_00000010.ckpt" in line
    assert _files(run) == before
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize("factory, needle", [
    ("no_such_pkg.tasks:build", "no module named 'no_such_pkg'"),
    ("missing.py:build", "'missing.py' is not a file"),
    ("tasks.py:nothing", "has no function 'nothing'"),
    ("tasks.py:raises", "raised ValueError: data folder /nowhere is empty"),
    ("tasks.py:not_a_task", "returned dict, not a foldhpc.Task"),
    ("tasks.py:no_state_dict", "states['counter'] (int) has no state_dict() / load_state_dict()"),
])
def test_a_bad_factory_is_one_line_exit_2_naming_it(task_file: Path, tmp_path: Path, factory: str, needle: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train(run, factory=factory) == 2
    _one_line_error(capsys, f"task.factory = {factory!r}", needle)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("*.ckpt"))


def test_an_unimportable_factory_is_refused_before_a_job_is_submitted(
        task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["submit", "--local", "--set", f"run.dir={tmp_path / 'run'}", "--set", "task.factory=nowhere:build"])
    assert rc == 2
    _one_line_error(capsys, "task.factory = 'nowhere:build'", "no module named 'nowhere'")
    assert not (tmp_path / "run").exists()  # no run directory, no job


def test_a_job_without_a_supervisor_trains_the_task_not_the_built_in_model(task_file: Path, tmp_path: Path) -> None:
    """fault.max_restarts = 0 runs the payload in the job's own process: it used to train foldhpc's
    distogram model whatever [task] said."""
    run = tmp_path / "run"
    cfg = load_config(None, [f"run.dir={run}", "task.factory=tasks.py:build", "train.max_steps=10",
                             "fault.max_restarts=0", "train.threads=1"])
    out = train_in_job(cfg, None, None)  # type: ignore[arg-type]  # env: one process
    assert out.state == "completed" and out.step == 10
    assert set(latest_checkpoint(run).state) == {"model", "optimizer", "foldhpc"}


def test_task_params_take_what_toml_has_and_refuse_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[task]\nfactory = "pkg.tasks:build"\n[task.params]\nlayers = 2\nlr = 1e-3\n'
                    'names = ["a", "b"]\nesm = { heads = 4 }\n')
    cfg = load_config(path, ["task.params.layers=4", "task.params.extra=\"x\""])
    assert cfg.task.params == {"layers": 4, "lr": 0.001, "names": ["a", "b"], "esm": {"heads": 4}, "extra": "x"}
    from foldhpc.config import config_to_toml

    again = tmp_path / "again.toml"
    again.write_text(config_to_toml(cfg))  # what run.dir/config.toml holds: read back the same
    assert load_config(again).task == cfg.task
    for bad, needle in [(["task.factory=not a name"], "task.factory = 'not a name'"),
                        (["task.params.x=inf"], "task.params.x = inf: must be a finite number"),
                        (["task.factory=", "task.params.a=1"], "task.factory is empty"),
                        (["task.params.bad=\"a\nb\""], "control character")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(path if bad[0] != "task.factory=" else None, bad)


def test_task_changes_are_trajectory_and_old_checkpoints_are_the_default_task() -> None:
    from foldhpc.config import Config

    old = Config().to_dict()
    del old["task"]  # a checkpoint written before [task] existed: the built-in model
    assert not diff_configs(old, Config().to_dict())
    new = Config().to_dict()
    new["task"] = {"factory": "a:b", "params": {"layers": 4}}
    d = diff_configs({**old, "task": {"factory": "a:b", "params": {"layers": 2, "gone": 1}}}, new)
    assert d.trajectory == ["task.params.gone: 1 -> <unset>", "task.params.layers: 2 -> 4"]
    assert diff_configs(old, new).trajectory == ["task.factory: '' -> 'a:b'", "task.params.layers: <unset> -> 4"]


def test_the_built_in_model_as_a_task_on_the_public_api_trains_the_same_bits(tmp_path: Path) -> None:
    """examples/distogram_task.py: foldhpc's own model written as a [task]; the same weights and
    optimizer moments as `foldhpc train` after the same steps (one CPU process)."""
    from conftest import ROOT, TINY, tiny_overrides

    builtin, task = tmp_path / "builtin", tmp_path / "task"
    common = ["--no-supervise", "--config", str(TINY)]
    sets = ["train.max_steps=12", "checkpoint.every_steps=5", "train.val_every=0"]

    def args(run: Path, *more: str) -> list[str]:
        out = ["train", *common]
        for s in tiny_overrides(run) + sets + list(more):
            out += ["--set", s]
        return out

    assert main(args(builtin)) == 0
    assert main(args(task, f"task.factory={ROOT / 'examples' / 'distogram_task.py'}:build")) == 0
    a, b = latest_checkpoint(builtin), latest_checkpoint(task)
    assert a.entry.step == b.entry.step == 12
    assert a.entry.digest == b.entry.digest  # model + optimizer, as `foldhpc checkpoints` shows it
    for key in ("model", "optimizer", "lr_scheduler"):
        assert_same_state(a.state[key], b.state[key], key)
    assert set(json.loads((task / "status.json").read_text())["metrics"]) >= {"precision_long", "distogram_loss"}


def test_a_task_runs_on_two_local_ranks(task_file: Path, tmp_path: Path) -> None:
    """`foldhpc train --nproc 2` with a [task]: every rank builds it, start() wraps it in DDP, rank 0
    writes (the two-rank stop agreement and exact resume: tests/test_session.py)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "foldhpc", "train", "--nproc", "2", "--set", f"run.dir={run}",
                        "--set", "task.factory=tasks.py:build_ddp", "--set", "train.max_steps=10",
                        "--set", "train.threads=1", "--set", "fault.max_restarts=0"],
                       cwd=task_file.parent, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = latest_checkpoint(run)
    assert ckpt.entry.step == 10 and ckpt.meta["world_size"] == 2
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert {e["rank"] for e in events if e["kind"] == "process_start"} == {0, 1}
    assert json.loads((run / "status.json").read_text())["world_size"] == 2


def test_a_sweep_over_task_params_gives_each_array_task_its_own_entry(tmp_path: Path) -> None:
    from foldhpc.slurm.sweep import plan

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\ndir = "{tmp_path / "sweep"}"\n[task]\nfactory = "pkg.tasks:build"\n'
                   '[task.params]\nwidth = 4\ndepth = 2\n')
    _, tasks = plan(str(cfg), [], ["task.params.width=8,16"])
    assert [(t.name, c.task.params) for t, c in tasks] == [("width=8", {"width": 8, "depth": 2}),
                                                           ("width=16", {"width": 16, "depth": 2})]


def test_the_factory_sees_every_global_generator_seeded_from_train_seed(tmp_path: Path) -> None:
    import random

    import numpy as np

    from foldhpc.task import build_task

    f = tmp_path / "draws.py"
    f.write_text("import random, numpy as np, torch, foldhpc\nDRAWS = []\n"
                 "def build(cfg):\n    DRAWS.append((random.random(), float(np.random.rand()), float(torch.rand(1))))\n"
                 "    m = torch.nn.Linear(1, 1)\n"
                 "    return foldhpc.Task(states={'m': m}, step=lambda run, s: None)\n")
    random.seed(1), np.random.seed(2)  # what came before must not matter
    cfg = load_config(None, [f"task.factory={f}:build", "train.seed=7"])
    build_task(cfg)
    random.seed(3), np.random.seed(4)
    build_task(cfg)
    import sys

    draws = next(m for n, m in sys.modules.items() if n.startswith("foldhpc_task_") and hasattr(m, "DRAWS")).DRAWS
    assert len(draws) == 2 and draws[0] == draws[1]
