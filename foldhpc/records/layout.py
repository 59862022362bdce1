"""The name of every file and folder foldhpc keeps in a run directory (and in its checkpoint directory).

Writers and readers take the names from here, so a tool never guesses a path. The README's "Run
directory" section describes each; tests/test_architecture.py checks that no module spells one of
these names as a literal of its own.
"""

from __future__ import annotations

# -- <run.dir>/ ---------------------------------------------------------------------------------
CONFIG_FILE = "config.toml"  # the resolved config of the latest start
LOG_FILE = "train.log"  # prose for people, appended across restarts; no tool parses it
STATUS_FILE = "status.json"  # the run's state now (foldhpc.records.status)
HISTORY_FILE = "jobs.jsonl"  # Slurm job history (foldhpc.records.history)
EVENTS_FILE = "events.jsonl"  # runtime events, one JSON object a line (foldhpc.records.events)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files
CHECKPOINT_DIR = "checkpoints"  # the default checkpoint directory (checkpoint.dir overrides it)
SLURM_DIR = "slurm"  # submitit's job scripts and per-job stdout/stderr
#: slurm/command.json: the command a ``foldhpc submit -- CMD`` job runs (for people; the job's pickle has it)
COMMAND_FILE = "command.json"
LOCK_DIR = "lock"  # one writer per run directory (foldhpc.resilience.runlock)
#: lock/gen-NNNNNNNN.child: the flock of the one descendant that uses a supervisor's lock (runlock)
LOCK_CHILD_SUFFIX = ".child"
NOTIFY_LOG = "notify.log"  # output of the monitor.on_state_change command (foldhpc.records.notify)
STACKS_FILE = "stacks.log"  # Python stacks of a trainer the supervisor found hung
RANKS_DIR = "ranks"  # multi-rank runs: ranks/rank-N.json
#: .foldhpc-health-<node>-<pid>: the health check's probe file, in the run and checkpoint directories,
#: removed at once (foldhpc.resilience.health)
HEALTH_PROBE_PREFIX = ".foldhpc-health-"

# -- <checkpoint dir>/ --------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"  # the checkpoint index (rebuilt from the files when it is bad)
OWNER_FILE = "OWNER.json"  # the run directory this checkpoint directory belongs to

#: files whose presence marks a folder as a run directory
RUN_MARKERS = (STATUS_FILE, HISTORY_FILE, CONFIG_FILE, CHECKPOINT_DIR)
