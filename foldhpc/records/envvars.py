"""Every ``FOLDHPC_*`` environment variable, named once.

Two kinds: the process contract between foldhpc's own processes (the supervisor tells its trainer
it is supervised, where to beat and what happened before; a job tells its trainer its node), and
opt-in switches a person sets (a data rescan, the fault-injection hooks of :mod:`foldhpc.faults`,
documented there). Nothing sets a fault hook in a normal run.
"""

from __future__ import annotations

# -- set by foldhpc for its own child processes -------------------------------------------------
#: set in a supervised trainer: it must not supervise in turn
SUPERVISED_ENV = "FOLDHPC_SUPERVISED"
#: JSON for a restarted trainer: restart count and why
RESTART_INFO_ENV = "FOLDHPC_RESTART_INFO"
#: the file a trainer beats into (its heartbeat); the supervisor watches it
HEARTBEAT_ENV = "FOLDHPC_HEARTBEAT_FILE"
#: a file the trainer creates once its preemption handlers are installed
READY_FILE_ENV = "FOLDHPC_READY_FILE"
#: this process's node name, for the rank records (defaults to the host name)
NODE_ENV = "FOLDHPC_NODE"
#: the variables above: a follow-up job or a fresh trainer must not inherit them
PROCESS_VARS = (SUPERVISED_ENV, RESTART_INFO_ENV, HEARTBEAT_ENV, READY_FILE_ENV)

# -- set by foldhpc for a user's monitor.on_state_change command (foldhpc.records.notify) -------
NOTIFY_STATE_ENV = "FOLDHPC_STATE"  #: completed, failed, hung, requeued, handed_over, stopped
NOTIFY_RUN_DIR_ENV = "FOLDHPC_RUN_DIR"  #: the run directory, absolute
NOTIFY_STEP_ENV = "FOLDHPC_STEP"  #: the step (empty if unknown)
NOTIFY_JOB_ENV = "FOLDHPC_JOB_ID"  #: the Slurm job (empty outside Slurm)
NOTIFY_REASON_ENV = "FOLDHPC_REASON"  #: why, in words (empty where there is nothing to say)
#: set for a site's health command (health.command): the node it checks
HEALTH_NODE_ENV = "FOLDHPC_HEALTH_NODE"

# -- set by a person ----------------------------------------------------------------------------
#: ``1``: a warm start rescans the structure folder instead of trusting the sealed manifest
RESCAN_ENV = "FOLDHPC_DATA_RESCAN"

# -- fault injection (foldhpc.faults has the table of what each does) ----------------------------
FAIL_AT_STEP = "FOLDHPC_FAIL_AT_STEP"
FAIL_KIND = "FOLDHPC_FAIL_KIND"
FAIL_ON_RANK = "FOLDHPC_FAIL_ON_RANK"
FAIL_ONCE = "FOLDHPC_FAIL_ONCE"
STEP_DELAY = "FOLDHPC_DEBUG_STEP_DELAY_S"
FIRST_STEP_DELAY = "FOLDHPC_DEBUG_FIRST_STEP_DELAY_S"
WRITE_DELAY = "FOLDHPC_DEBUG_WRITE_DELAY_S"
VAL_BATCH_DELAY = "FOLDHPC_DEBUG_VAL_BATCH_DELAY_S"
HOLD_AFTER_TRAIN = "FOLDHPC_DEBUG_HOLD_AFTER_TRAIN_S"
NAN_AT_STEPS = "FOLDHPC_NAN_AT_STEPS"
NAN_KIND = "FOLDHPC_NAN_KIND"
NAN_ON_RANK = "FOLDHPC_NAN_ON_RANK"
NAN_ONCE = "FOLDHPC_NAN_ONCE"
#: node names (comma-separated) whose health check fails (check "fault_hook"): a bad node, for tests
FAIL_HEALTH_ON_NODE = "FOLDHPC_FAIL_HEALTH_ON_NODE"
STEP_DELAY_ON_RANK = "FOLDHPC_DEBUG_STEP_DELAY_ON_RANK"
BITFLIP_AT_STEP = "FOLDHPC_BITFLIP_AT_STEP"
BITFLIP_ON_RANK = "FOLDHPC_BITFLIP_ON_RANK"
BITFLIP_ONCE = "FOLDHPC_BITFLIP_ONCE"
LOSS_SPIKE_AT_STEP = "FOLDHPC_LOSS_SPIKE_AT_STEP"
LOSS_SPIKE_FACTOR = "FOLDHPC_LOSS_SPIKE_FACTOR"
#: prefixes of every fault hook: a chaos run clears them before it sets its own
FAULT_PREFIXES = ("FOLDHPC_FAIL_", "FOLDHPC_NAN_", "FOLDHPC_DEBUG_", "FOLDHPC_BITFLIP_",
                  "FOLDHPC_LOSS_SPIKE_")
