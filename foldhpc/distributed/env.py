"""Which rank this process is, read from its environment; no torch import.

Three launchers are understood, in this order:

1. ``torchrun`` and foldhpc's own ``foldhpc train --nproc N`` export the ``env://`` variables
   (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
2. a Slurm job step started by ``srun`` (what submitit and ``sbatch/train_multinode.sbatch`` do):
   ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``. The
   step's variables are used, not the job's ``SLURM_NTASKS``: a batch script's own shell has
   ``SLURM_NTASKS`` of the whole allocation but is one process, and a plain ``foldhpc train``
   there must stay single-process instead of waiting for ranks that never start;
3. anything else is one process (rank 0 of 1).

The rendezvous address on Slurm is the first node of the step. A node *name* need not resolve
(``NodeName`` and ``NodeHostname``/``NodeAddr`` differ on some clusters, and on the local
two-node test cluster), so an unresolvable name is looked up with ``scontrol show node``. The
port is derived from the job id (as submitit's helper does), so every rank computes the same one
without talking; ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment win over both.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from foldhpc.records.envvars import NODE_ENV

log = logging.getLogger(__name__)

#: env var set by ``foldhpc train --nproc``'s launcher: the node label of its ranks


class DistEnvError(RuntimeError):
    """The environment describes a multi-process run inconsistently."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    node: str = field(default_factory=socket.gethostname)  # Slurm node name, else the host name
    launcher: str = "single"  # single | env (torchrun, --nproc) | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} on {self.node}"


def _int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise DistEnvError(f"${key} = {env.get(key)!r}: expected an integer") from None


def port_for_job(job_id: str) -> int:
    """A port in 20000..59999 that every rank of the job derives alike from its id."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 40000


def expand_nodelist(nodelist: str) -> list[str]:
    """``n[1-2],gpu07`` -> ``["n1", "n2", "gpu07"]`` (``scontrol show hostnames`` where available)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("scontrol show hostnames %s: %s", nodelist, e)
    return _expand_nodelist_py(nodelist)


def _expand_nodelist_py(nodelist: str) -> list[str]:
    names: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            names.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{len(lo)}d}")
    return names


def node_address(node: str) -> str:
    """An address for Slurm node ``node``: its name if that resolves, else its ``NodeAddr``."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.SubprocessError) as e:
        raise DistEnvError(f"node {node!r} does not resolve and scontrol cannot tell its address ({e}); "
                           "set MASTER_ADDR") from None
    raise DistEnvError(f"node {node!r} does not resolve and has no NodeAddr in scontrol; set MASTER_ADDR")


def from_environ(env: dict[str, str] | None = None) -> DistEnv:
    """This process's place in the run (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank = _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        if world > 1 and "MASTER_PORT" not in env:
            raise DistEnvError("RANK/WORLD_SIZE are set but MASTER_PORT is not (launch with torchrun or "
                               "foldhpc train --nproc)")
        d = DistEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                    int(env.get("MASTER_PORT", "29500")), env.get(NODE_ENV) or env.get("SLURMD_NODENAME")
                    or socket.gethostname(), "env")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        rank = _int(env, "SLURM_PROCID")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        n_nodes = max(1, len(nodes))
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "")
        m = re.match(r"(\d+)", tasks_per_node)
        local_world = int(m.group(1)) if m else max(1, world // n_nodes)
        addr = env.get("MASTER_ADDR") or (node_address(nodes[0]) if world > 1 and nodes else "127.0.0.1")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else port_for_job(env.get("SLURM_JOB_ID", "0"))
        d = DistEnv(rank, world, local_rank, local_world, addr, port,
                    env.get("SLURMD_NODENAME") or socket.gethostname(), "slurm")
    else:
        return DistEnv()
    if not 0 <= d.rank < d.world_size:
        raise DistEnvError(f"rank {d.rank} is outside world size {d.world_size}")
    return d
