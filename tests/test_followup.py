"""Follow-up jobs without a cluster: the decision when Slurm will not requeue, the sbatch options
copied from real ``scontrol show job`` records (captured on the local cluster), the chain in
jobs.jsonl and the successor's environment. The real thing runs in tests/slurm/test_followup.py."""

from __future__ import annotations

from foldhpc.slurm.followup import chain_of, chain_restarts, first_job_args_removed, sbatch_options, successor_env
from foldhpc.records.history import read_history, record_event
from foldhpc.slurm.requeue import Decision, decide_from, refused
from foldhpc.cluster.sacct import parse_scontrol

# submitit job (--gpus-per-node=1 -> TresPerNode), captured with `scontrol show job -o 308`
SUBMITIT_JOB = (
    "JobId=308 JobName=foldhpc UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901677 Nice=0 Account=root "
    "QOS=normal JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 "
    "ExitCode=0:0 RunTime=00:00:28 TimeLimit=00:02:00 TimeMin=N/A SubmitTime=2026-11-27T07:36:10 "
    "EligibleTime=2026-11-27T07:36:10 AccrueTime=2026-11-27T07:36:10 StartTime=2026-11-27T07:36:11 "
    "EndTime=2026-11-27T07:38:11 Deadline=N/A PreemptEligibleTime=2026-11-27T07:36:11 PreemptTime=None "
    "SuspendTime=None SecsPreSuspend=0 LastSchedEval=2026-11-27T07:36:11 Scheduler=Main Partition=debug "
    "AllocNode:Sid=localhost:17848 ReqNodeList=(null) ExcNodeList=(null) NodeList=n1 BatchHost=n1 NumNodes=1 "
    "NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=2G,node=1,billing=1,gres/gpu=1 "
    "Socks/Node=* NtasksPerN:B:S:C=1:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=2G MinTmpDiskNode=0 "
    "Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) "
    "Command=/tmp/run/slurm/.submission_file_69bc.sh WorkDir=/work/main StdErr=/tmp/run/slurm/308_0_log.err "
    "StdIn=/dev/null StdOut=/tmp/run/slurm/308_0_log.out Power= TresPerNode=gres:gpu:1"
)
# sbatch --no-requeue --gpus=1 --mem=100M --time=10 -o /tmp/x-%j.out --wrap ... (TresPerJob), `scontrol show job 226`
WRAP_JOB = (
    "JobId=226 JobName=wrap UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901758 Nice=0 Account=root "
    "QOS=normal JobState=RUNNING Reason=None Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 "
    "ExitCode=0:0 RunTime=00:00:01 TimeLimit=00:10:00 TimeMin=N/A Partition=debug NodeList=n1 BatchHost=n1 "
    "NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=100M,node=1,billing=1,gres/gpu=1 "
    "Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=100M MinTmpDiskNode=0 "
    "Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) "
    "WorkDir=/tmp StdErr=/tmp/x-226.out StdIn=/dev/null StdOut=/tmp/x-226.out Power= TresPerJob=gres:gpu:1"
)


def test_requeue_zero_is_a_follow_up_decision_unless_the_chain_is_at_its_limit():
    d = decide_from("5", 0, 3, "RUNNING", "RUNNING", requeue_allowed=False)
    assert (d.requeue, d.kind, d.event, d.continues) == (False, "requeue_refused", "stopped", False)
    assert "Requeue=0" in d.reason
    d = decide_from("5", 3, 3, "RUNNING", "RUNNING", requeue_allowed=False, chain_restarts=2)
    assert d.kind == "requeue_limit" and "already restarted 3 times, 2 of them in earlier jobs of its chain" in d.reason
    assert decide_from("5", 0, 3, "COMPLETING", None, requeue_allowed=False).kind == "ending"  # scancel: never
    assert decide_from("5", 0, 3, "RUNNING", "CANCELLED by 0", requeue_allowed=False).kind == "cancelled"
    assert decide_from("5", 1, 3, "RUNNING", None, requeue_allowed=True, chain_restarts=1).kind == "requeue"
    f = Decision(False, "x", "followup", "6")
    assert (f.event, f.continues) == ("followup", True)


def test_refusals_that_no_retry_changes():
    assert refused("scontrol exited with 1: Requested operation is presently disabled for job 224")
    assert refused("scontrol exited with 1: Access/permission denied for job 7")
    assert not refused("scontrol exited with 1: Invalid job id specified")
    assert not refused("scontrol did not answer within 10s")


def test_sbatch_options_ask_for_what_the_job_got():
    info = parse_scontrol(SUBMITIT_JOB)["308"]
    assert sbatch_options(info, "308") == [
        "--partition=debug", "--account=root", "--qos=normal", "--job-name=foldhpc", "--chdir=/work/main",
        "--time=00:02:00", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--mem=2G", "--gres=gpu:1",
        "--output=/tmp/run/slurm/%j_0_log.out", "--error=/tmp/run/slurm/%j_0_log.err", "--requeue"]
    opts = sbatch_options(parse_scontrol(WRAP_JOB)["226"], "226")
    assert "--gpus=1" in opts and "--mem=100M" in opts and "--no-requeue" in opts
    assert "--output=/tmp/x-%j.out" in opts and not any(o.startswith("--error") for o in opts)
    assert not any(o.startswith("--constraint") for o in opts)


def test_first_job_only_arguments_are_not_replayed():
    args = ["c.toml", "--set", "run.dir=/x", "--no-resume", "--force-resume"]
    assert first_job_args_removed(args) == ["c.toml", "--set", "run.dir=/x", "--force-resume"]
    assert first_job_args_removed(["c.toml", "--resume", "/ck/step_1.ckpt", "--set", "a.b=1"]) == \
        ["c.toml", "--set", "a.b=1"]
    assert first_job_args_removed(["c.toml", "--resume=/ck/step_1.ckpt"]) == ["c.toml"]


def test_chain_in_jobs_jsonl(tmp_path):
    record_event(tmp_path, "started", job_id="10")
    record_event(tmp_path, "submitted", job_id="11", followup_of="10", chain_restarts=1)
    record_event(tmp_path, "followup", job_id="10", followup_job_id="11", chain_restarts=1)
    record_event(tmp_path, "submitted", job_id="12", followup_of="11", chain_restarts=3)
    record_event(tmp_path, "followup", job_id="11", followup_job_id="12", chain_restarts=3)
    events = read_history(tmp_path)[0]
    assert chain_of(events, "12") == ["10", "11", "12"] and chain_of(events, "10") == ["10"]
    assert [chain_restarts(tmp_path, j) for j in ("10", "11", "12", None)] == [0, 1, 3, 0]


def test_successor_environment_has_none_of_the_jobs_own_variables():
    env = successor_env({"PATH": "/bin", "SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2", "SLURM_CONF": "/etc/s.conf",
                         "FOLDHPC_SUPERVISED": "1", "FOLDHPC_READY_FILE": "/tmp/r", "FOLDHPC_PYTHON": "/py",
                         "SUBMITIT_PREEMPT_SIGNAL": "USR1"})
    assert env == {"PATH": "/bin", "SLURM_CONF": "/etc/s.conf", "FOLDHPC_PYTHON": "/py",
                   "SUBMITIT_PREEMPT_SIGNAL": "USR1"}


def test_status_follows_the_chain_and_skips_a_refused_job(tmp_path):
    from foldhpc.monitor.report import read_run

    record_event(tmp_path, "submitted", job_id="10")
    record_event(tmp_path, "started", job_id="10")
    record_event(tmp_path, "submitted", job_id="11", followup_of="10", chain_restarts=1)
    record_event(tmp_path, "followup", job_id="10", followup_job_id="11", chain_restarts=1)
    record_event(tmp_path, "started", job_id="11")
    record_event(tmp_path, "started", job_id="12")  # a second job on the same run directory...
    record_event(tmp_path, "refused", job_id="12", reason="run directory x is in use by another trainer: ...")
    view = read_run(tmp_path)
    assert (view.job_id, view.chain, view.chain_restarts) == ("11", ["10", "11"], 1)
    assert "job 12 refused to start: run directory x is in use by another trainer: ..." in view.notes
