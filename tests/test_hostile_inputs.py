"""Hostile and broken inputs to the config and the Slurm side (issue 19 items 5, 9, 11, 20, 21).

Each test starts from the review's reproduction: a config value that injects a shell command
into submitit's job script, huge TOML integers, a non-UTF-8 byte in jobs.jsonl, a follow-up job
that copies its predecessor's resources wrongly, a chain that never makes progress.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY, run_foldhpc, set_args, tiny_overrides
from foldhpc.config import ConfigError, load_config


# ------------------------------------------------------------------ item 5: job-script injection
@pytest.mark.parametrize("key", ["slurm.account", "slurm.partition", "slurm.qos", "slurm.constraint",
                                 "run.dir", "slurm.logs_dir", "slurm.job_name"])
def test_a_newline_in_a_config_value_is_refused_naming_the_key(tmp_path, key):
    """The review's injection: ``"x\\ntouch FILE"`` became a shell line after a ``#SBATCH`` comment."""
    cfg_file = tmp_path / "evil.toml"
    section, name = key.split(".")
    cfg_file.write_text(f'[{section}]\n{name} = "x\\ntouch {tmp_path}/pwned"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(cfg_file)
    msg = str(exc.value)
    assert key in msg and "control character" in msg and "U+000A" in msg, msg
    assert "\n" not in msg  # one line: the value is shown escaped


@pytest.mark.parametrize("table, words", [
    ('{ "x\\ntouch /tmp/pwned\\n#" = "v" }', ["slurm.extra_sbatch key", "U+000A"]),
    ('{ comment = "a\\ntouch /tmp/pwned" }', ["slurm.extra_sbatch ['comment']", "U+000A"]),
    ('{ "mail-type; touch /tmp/pwned" = "END" }', ["slurm.extra_sbatch key", "not an sbatch option name"]),
    ('{ "--mail-type" = "END" }', ["slurm.extra_sbatch key", "without its dashes"]),
])
def test_extra_sbatch_keys_are_option_names_and_values_one_line(table, words):
    with pytest.raises(ConfigError) as exc:
        load_config(TINY, [f"slurm.extra_sbatch={table}"])
    for w in words:
        assert w in str(exc.value), str(exc.value)


@pytest.mark.parametrize("value", ["a\tb", "a\rb", "a\x00b", "a\x1bb", "a\u2028b", "a\x85b"])
def test_every_control_character_is_refused(value):
    with pytest.raises(ConfigError, match="control character"):
        load_config(TINY, [f"slurm.account={value}"])


def test_list_items_are_checked_too():
    with pytest.raises(ConfigError, match=r"checkpoint.signals item 1 .*control character"):
        load_config(TINY, ['checkpoint.signals=["SIGUSR1", "SIGTERM\\nid"]'])


def test_the_injection_through_the_cli_is_a_one_line_user_error(tmp_path):
    run = tmp_path / "run"
    p = run_foldhpc("submit", "--config", str(TINY), *set_args(tiny_overrides(run)),
                    "--set", f'slurm.account="x\\ntouch {tmp_path}/pwned"')
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("foldhpc")]
    assert len(lines) == 1 and "slurm.account" in lines[0], p.stderr
    assert not run.exists() and not (tmp_path / "pwned").exists()


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="submitit's Slurm executor needs sbatch on PATH")
def test_the_job_script_of_a_legit_config_has_only_directives_where_values_go(tmp_path):
    """Values with spaces, quotes and shell characters stay inside their ``#SBATCH`` line."""
    from foldhpc.slurm.submit import executor_for

    run = tmp_path / "my run $(id) 'x'"
    cfg = load_config(TINY, tiny_overrides(run) + [
        "slurm.account=proj-1; id", "slurm.partition=gpu", "slurm.qos=high`id`", "slurm.constraint=a100&nvlink",
        'slurm.extra_sbatch={ mail-type = "END", comment = "a b; c $(d)" }'])
    text = executor_for(cfg)._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")
    lines = text.splitlines()
    params = lines[lines.index("# Parameters") + 1:lines.index("# setup")]
    setup = [ln for ln in lines[lines.index("# setup") + 1:lines.index("# command")] if ln]
    assert len(setup) == 1 and setup[0].startswith("trap 'true' "), setup  # foldhpc's own line only
    assert all(ln.startswith("#SBATCH --") or not ln for ln in params), params
    assert sum(ln.startswith("#SBATCH --account=") for ln in params) == 1
    assert any("mail-type=END" in ln for ln in params) and any("comment=" in ln for ln in params)
    body = [ln for ln in lines[lines.index("# command") + 1:] if ln]
    assert len(body) == 2 and body[0] == "export SUBMITIT_EXECUTOR=slurm" and body[1].startswith("srun "), body


# ------------------------------------------------------------------ item 11: huge numbers
@pytest.mark.parametrize("override, key", [
    ("train.seed=18446744073709551616", "train.seed"),          # torch.manual_seed: Overflow
    ("train.seed=9223372036854775808", "train.seed"),
    ("train.threads=1099511627776", "train.threads"),           # torch.set_num_threads: Overflow
    ("data.crop_size=100000000000000000000", "data.crop_size"),  # numpy: Maximum allowed dimension
    ("train.batch_size=100000000000000000000", "train.batch_size"),  # allocates without end
    ("train.max_steps=100000000000000000000", "train.max_steps"),
    ("model.max_relpos=100000000", "model.max_relpos"),
    ("data.split_seed=-1", "data.split_seed"),
    ("slurm.nodes=99999999999", "slurm.nodes"),
    ("train.lr=inf", "train.lr"),
    ("train.grad_clip=inf", "train.grad_clip"),
    ("train.weight_decay=nan", "train.weight_decay"),
    ("checkpoint.interval=99999999999999999999h", "checkpoint.interval"),
    ("slurm.time=" + "9" * 400, "slurm.time"),                  # inf seconds: OverflowError in minutes
    ("distributed.timeout=1000d", "distributed.timeout"),
])
def test_huge_numbers_are_a_config_error_before_anything_runs(tmp_path, override, key):
    """The review's values passed validation and crashed with a traceback after run.dir was written."""
    run = tmp_path / "run"
    p = run_foldhpc("train", "--config", str(TINY), *set_args(tiny_overrides(run)), "--set", override, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("foldhpc")]
    assert len(lines) == 1 and lines[0].startswith("foldhpc: config error:") and key in lines[0], p.stderr
    assert not run.exists()


def test_the_bounds_leave_every_sane_value_alone():
    cfg = load_config(TINY, ["train.seed=9223372036854775807", "train.threads=64", "data.crop_size=4096",
                             "train.max_steps=1000000000", "slurm.time=365d", "checkpoint.interval=0",
                             "data.split_seed=4294967296", "model.max_relpos=4096"])
    assert cfg.train.seed == 2**63 - 1 and cfg.data.crop_size == 4096


# ------------------------------------------------------------------ item 9: a bad byte in jobs.jsonl
def _chain_history(run: Path) -> None:
    """Jobs 10 -> 11 -> 12 of one chain (3 restarts when 12 was submitted), as the code writes them."""
    from foldhpc.records.history import record_event

    record_event(run, "submitted", job_id="10", backend="slurm")
    record_event(run, "started", job_id="10", restart_count=0)
    record_event(run, "submitted", job_id="11", followup_of="10", chain_restarts=2, backend="slurm")
    record_event(run, "followup", job_id="10", followup_job_id="11", chain_restarts=2)
    record_event(run, "started", job_id="11", restart_count=0)
    record_event(run, "submitted", job_id="12", followup_of="11", chain_restarts=3, backend="slurm")
    record_event(run, "followup", job_id="11", followup_job_id="12", chain_restarts=3)
    record_event(run, "started", job_id="12", restart_count=0)


def _damage(path: Path, line_no: int, junk: bytes = b"\xff\xfe not utf-8 \x80") -> None:
    lines = path.read_bytes().split(b"\n")
    lines.insert(line_no, junk)
    path.write_bytes(b"\n".join(lines))


def test_a_bad_byte_line_costs_only_that_line(tmp_path):
    from foldhpc.slurm.followup import chain_restarts
    from foldhpc.records.history import job_ids, read_history

    _chain_history(tmp_path)
    _damage(tmp_path / "jobs.jsonl", 3)
    with open(tmp_path / "jobs.jsonl", "ab") as f:  # more hostile lines: JSON but no object, deep nesting
        f.write(b'42\n["a"]\nnull\n' + b"[" * 100_000 + b"\n" + b"1" * 5000 + b'\n{"event": "te')
    events, bad = read_history(tmp_path)
    assert len(events) == 8 and bad == 7
    assert job_ids(tmp_path) == ["10", "11", "12"]
    assert chain_restarts(tmp_path, "12") == 3 and chain_restarts(tmp_path, "11") == 2


def test_a_bad_byte_inside_a_value_keeps_the_event(tmp_path):
    from foldhpc.records.history import read_history, record_event

    record_event(tmp_path, "stopped", job_id="7", reason="x")
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"x"', b'"caf\xe9"'))  # Latin-1, e.g. an editor's save
    events, bad = read_history(tmp_path)
    assert bad == 0 and events[0]["job_id"] == "7" and events[0]["reason"] == "caf\ufffd"


def test_the_chain_count_survives_the_loss_of_its_followup_line(tmp_path):
    """Either record of the link (the predecessor's followup event, the successor's submitted event)
    keeps slurm.max_requeues bounding the chain."""
    from foldhpc.slurm.followup import chain_restarts

    _chain_history(tmp_path)
    path = tmp_path / "jobs.jsonl"
    lines = path.read_bytes().split(b"\n")
    followup_12 = next(i for i, ln in enumerate(lines) if b'"followup_job_id": "12"' in ln)
    lines[followup_12] = lines[followup_12][:20] + b"\xff" + lines[followup_12][21:]  # a bad byte in a key
    path.write_bytes(b"\n".join(lines))
    assert chain_restarts(tmp_path, "12") == 3


def test_status_and_goodput_with_a_bad_byte_line(tmp_path):
    """``foldhpc status`` still lists the jobs and the chain; ``goodput`` and ``plot`` do not crash."""
    import json

    from foldhpc.monitor.report import read_run
    from test_goodput import JOB, write_requeue_fixture

    chain = tmp_path / "chain"
    chain.mkdir()
    _chain_history(chain)
    _damage(chain / "jobs.jsonl", 5)
    view = read_run(chain)
    assert view.job_ids == ["10", "11", "12"] and (view.job_id, view.chain_restarts) == ("12", 3)
    assert view.chain == ["10", "11", "12"]
    assert any("1 unreadable line" in n for n in view.notes), view.notes

    run = tmp_path / "slurm-run"
    write_requeue_fixture(run)
    _damage(run / "jobs.jsonl", 2)
    p = run_foldhpc("goodput", str(run), "--json", "--no-sacct")
    assert p.returncode == 0, p.stderr[-2000:]
    g = json.loads(p.stdout)
    assert g["seconds"]["queue_wait"] == 42 and [j["label"] for j in g["jobs"]] == [f"job {JOB}", f"job {JOB} run 1"]
    p = run_foldhpc("plot", str(run), "-o", str(tmp_path / "t.png"))
    assert p.returncode == 0 and (tmp_path / "t.png").stat().st_size > 0, p.stderr[-2000:]


# ------------------------------------------------------------------ item 20: follow-up resources
# `scontrol show job 4` (22.05.8, the default multi-line format) of
#   cd "/tmp/h2 My Project" && sbatch --hold --job-name="fold hpc" --gpus=1 --mem=100M --time=2 \
#     -o "/tmp/h2 My Project/run7/slurm-7-%j.out" -e "/tmp/h2 My Project/100%%/err-%j.err" --wrap "sleep 1"
SPACED_JOB = """JobId=4 JobName=fold hpc
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   Priority=0 Nice=0 Account=root QOS=normal
   JobState=PENDING Reason=JobHeldUser Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0
   RunTime=00:00:00 TimeLimit=00:02:00 TimeMin=N/A
   SubmitTime=2026-12-01T22:25:40 EligibleTime=Unknown
   AccrueTime=Unknown
   StartTime=Unknown EndTime=Unknown Deadline=N/A
   SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-12-01T22:25:40 Scheduler=Main
   Partition=debug AllocNode:Sid=localhost:2994
   ReqNodeList=(null) ExcNodeList=(null)
   NodeList=
   NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:*
   TRES=cpu=1,mem=100M,node=1,billing=1,gres/gpu=1
   Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=*
   MinCPUsNode=1 MinMemoryNode=100M MinTmpDiskNode=0
   Features=(null) DelayBoot=00:00:00
   OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null)
   Command=(null)
   WorkDir=/tmp/h2 My Project
   StdErr=/tmp/h2 My Project/100%%/err-4.err
   StdIn=/dev/null
   StdOut=/tmp/h2 My Project/run7/slurm-7-4.out
   Power=
   TresPerJob=gres:gpu:1
   

"""
# the same job, `scontrol show job -o 4`
SPACED_JOB_ONELINE = " ".join(line.strip() for line in SPACED_JOB.splitlines() if line.strip()) + " \n"


@pytest.mark.parametrize("text", [SPACED_JOB, SPACED_JOB_ONELINE], ids=["multi-line", "oneliner"])
def test_scontrol_values_with_spaces_are_kept_whole(text):
    from foldhpc.cluster.sacct import parse_scontrol

    info = parse_scontrol(text)["4"]
    assert info["WorkDir"] == "/tmp/h2 My Project"
    assert info["StdOut"] == "/tmp/h2 My Project/run7/slurm-7-4.out"
    assert info["StdErr"] == "/tmp/h2 My Project/100%%/err-4.err"
    assert info["JobName"] == "fold hpc" and info["UserId"] == "root(0)"
    assert (info["JobState"], info["Requeue"], info["TresPerJob"], info["Power"]) == ("PENDING", "1", "gres:gpu:1", "")


def test_follow_up_options_copy_paths_with_spaces_and_replace_only_the_job_id():
    from foldhpc.slurm.followup import sbatch_options
    from foldhpc.cluster.sacct import parse_scontrol

    opts = sbatch_options(parse_scontrol(SPACED_JOB)["4"], "4")
    assert "--chdir=/tmp/h2 My Project" in opts and "--job-name=fold hpc" in opts
    assert "--output=/tmp/h2 My Project/run7/slurm-7-%j.out" in opts
    assert "--error=/tmp/h2 My Project/100%%/err-%j.err" in opts  # scontrol left %% as given: kept


@pytest.mark.parametrize("path, ids, pattern", [
    ("/scratch/run7/slurm-7.out", {"7"}, "/scratch/run7/slurm-%j.out"),  # the review's example
    ("/scratch/7/out-7.log", {"7"}, "/scratch/7/out-%j.log"),  # a directory keeps its name
    ("/x/7-17.out", {"17"}, "/x/7-%j.out"),
    ("/x/170.out", {"17"}, "/x/170.out"),  # not inside a longer number
    ("/x/foldhpc_17.out", {"17"}, "/x/foldhpc_%j.out"),  # %x_%j
    ("/r/slurm/308_0_log.out", {"308"}, "/r/slurm/%j_0_log.out"),  # submitit
    ("/r/slurm-5_1.out", {"5_1", "6"}, "/r/slurm-%j.out"),  # array task 5_1 (JobId 6): %A_%a
    ("/r/slurm-6.out", {"5_1", "6"}, "/r/slurm-%j.out"),  # ... or its own %j
    ("/r/x-%N-root-%%-%5j-wrap.out", {"9"}, "/r/x-%N-root-%%-%5j-wrap.out"),  # what scontrol left unexpanded
    ("out.txt", {"7"}, "out.txt"),
])
def test_output_pattern(path, ids, pattern):
    from foldhpc.slurm.followup import output_pattern

    assert output_pattern(path, ids) == pattern


def test_the_reviews_follow_up_example():
    """WorkDir ``/home/alice/My Project`` became ``--chdir=/home/alice/My``, run7 became ``run%j``."""
    from foldhpc.slurm.followup import sbatch_options
    from foldhpc.cluster.sacct import parse_scontrol

    text = (SPACED_JOB.replace("JobId=4 ", "JobId=7 ").replace("WorkDir=/tmp/h2 My Project", "WorkDir=/home/alice/My Project")
            .replace("/tmp/h2 My Project/run7/slurm-7-4.out", "/scratch/run7/slurm-7.out"))
    for t in (text, " ".join(line.strip() for line in text.splitlines() if line.strip())):
        opts = sbatch_options(parse_scontrol(t)["7"], "7")
        assert "--chdir=/home/alice/My Project" in opts and "--output=/scratch/run7/slurm-%j.out" in opts, opts


# ------------------------------------------------------------------ item 21: what a chain's next job gets
def test_a_follow_up_of_the_sbatch_path_trains_with_the_run_dirs_config_and_never_forces(tmp_path):
    """It re-read CONFIG (edited meanwhile: the chain moved silently) and replayed --force-resume."""
    from foldhpc.config import config_to_toml
    from foldhpc.slurm.requeue import build_parser, followup_script_args

    run = tmp_path / "run"
    args = build_parser().parse_args(["--followup-script", "x.sbatch", "--config", str(TINY),
                                      "--set", f"run.dir={run}", "--force-resume", "--no-resume"])
    cfg = load_config(args.config, args.overrides)
    assert followup_script_args(cfg, args) == [str(TINY), "--set", f"run.dir={run}"]  # no config.toml yet
    run.mkdir()
    (run / "config.toml").write_text(config_to_toml(cfg))  # what the trainer writes at its start
    assert followup_script_args(cfg, args) == [str((run / "config.toml").resolve())]
    assert load_config((run / "config.toml")) == cfg


def test_force_resume_applies_to_a_jobs_first_run_only():
    from foldhpc.cli import _force_resume, build_parser
    from foldhpc.cluster.env import SlurmEnv

    args = build_parser().parse_args(["train", "--force-resume"])
    assert _force_resume(args, SlurmEnv("5", 0)) is True
    assert _force_resume(args, SlurmEnv("5", 1)) is False  # sbatch replayed it on a requeue


def test_a_chain_without_progress_is_counted_per_job_in_a_row():
    from foldhpc.slurm.requeue import NO_PROGRESS_JOBS, jobs_without_progress

    def ev(kind: str, step: int | None = None) -> dict:
        return {"event": kind, **({"step": step} if step is not None else {})}

    chain = [ev("started"), ev("followup", 0), ev("started"), ev("followup", 0), ev("started"), ev("followup", 0)]
    assert jobs_without_progress(chain, 0) == 3 == NO_PROGRESS_JOBS
    assert jobs_without_progress(chain, 5) == 0  # this job got from step 0 to 5
    assert jobs_without_progress([ev("followup", 0), ev("followup", 7), ev("requeued", 7)], 7) == 2
    # an earlier chain that ended, then the user resubmitted: its jobs do not count
    assert jobs_without_progress([ev("followup", 7), ev("followup", 7), ev("stopped", 7), ev("followup", 7)], 7) == 1
    assert jobs_without_progress([ev("followup"), ev("refused"), ev("followup", 3)], 3) == 1  # no step: not counted


def test_no_progress_stop_is_recorded_with_its_reason(tmp_path):
    from foldhpc.records.history import record_event
    from foldhpc.slurm.requeue import no_progress

    for j in ("10", "11", "12"):
        record_event(tmp_path, "followup", job_id=j, followup_job_id=str(int(j) + 1), step=0)
    d = no_progress(tmp_path, 0, "13")
    assert d is not None and d.kind == "no_progress" and not d.continues and d.event == "stopped"
    assert "3 jobs in a row made no progress" in d.reason and "resubmit" in d.reason
    assert no_progress(tmp_path, 4, "13") is None and no_progress(tmp_path, None, "13") is None
