"""pytest plumbing for tests that need the real local Slurm cluster.

Every test under tests/slurm/ gets the `slurm` marker (deselect with `-m "not slurm"`).
The session fixture `slurm_cluster` runs `tests/slurm/cluster.sh up` once (idempotent; ~0.4 s
when already up, ~15-20 s on a fresh Debian machine incl. apt install) and yields SlurmCluster.

The layout is fixed for the whole suite: two nodes n1 and n2 on this host (one slurmd each), both
in both partitions. A test that needs a `high` job to preempt a `debug` job must make sure the
high job cannot simply start on the other, idle node: pin both to one node
(``--nodelist=<node>``, e.g. ``slurm_cluster.nodes[0]`` or the victim's node) or let the preemptor
need the CPUs of every node.

It skips (with the reason) only where a cluster is impossible here: not root, or no Slurm
and no apt-get to install it. With FOLDHPC_REQUIRE_SLURM=1 (CI) those become failures,
and a failing `cluster.sh up` is always a failure, never a skip.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).with_name("cluster.sh")
SLURM_DIR = Path(__file__).parent.resolve()
UP_TIMEOUT_S = 900  # first run may apt-get install ~30 packages


@dataclass(frozen=True)
class SlurmCluster:
    hostname: str  # this host (hostname -s): NodeHostname of every node, NOT a node name
    nodes: tuple[str, ...] = ("n1", "n2")  # node names in slurm.conf, one slurmd each, all on this host
    default_partition: str = "debug"  # preemptable (PreemptMode=REQUEUE, GraceTime=20), low PriorityTier
    high_partition: str = "high"  # PriorityTier=10: its jobs preempt `debug` jobs (on a node they need)
    partitions: tuple[str, ...] = ("debug", "high")  # both span every node
    cpus: int = 4  # CPUs advertised by EACH node (FOLDHPC_SLURM_CPUS)
    gpus: int = 1  # fake gres/gpu PER NODE (FOLDHPC_SLURM_GPUS)
    profile: str = "fast"  # FOLDHPC_SLURM_PROFILE
    version: str = ""  # e.g. "slurm-wlm 22.05.8"
    cluster_sh: Path = CLUSTER_SH
    log_dir: Path = Path("/var/log/foldhpc-slurm")
    up_output: str = field(default="", repr=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the real local Slurm cluster (tests/slurm/cluster.sh up)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            in_dir = Path(str(item.fspath)).resolve().is_relative_to(SLURM_DIR)
        except (OSError, ValueError):
            in_dir = False
        if in_dir:
            item.add_marker(pytest.mark.slurm)


def _unavailable_reason() -> str | None:
    if platform.system() != "Linux":
        return f"a local Slurm cluster needs Linux (this is {platform.system()})"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "tests/slurm/cluster.sh must run as root to start munged/slurmctld/slurmd (not root here)"
    have_slurm = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "sbatch"))
    if not have_slurm and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("FOLDHPC_REQUIRE_SLURM") == "1":
        pytest.fail(f"FOLDHPC_REQUIRE_SLURM=1 but no Slurm cluster is possible: {reason}", pytrace=False)
    pytest.skip(f"no local Slurm cluster: {reason} (set FOLDHPC_REQUIRE_SLURM=1 to make this a failure)")


def _sinfo_nodes(fmt: str) -> str:
    """`sinfo -N` (one line per node and partition) with the given format."""
    return subprocess.run(
        ["sinfo", "-N", "-h", "-o", fmt], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    ).stdout.strip()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _unavailable_reason()
    if reason:
        _skip_or_fail(reason)
    try:
        p = subprocess.run(
            ["bash", str(CLUSTER_SH), "up"],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{CLUSTER_SH} up did not finish in {UP_TIMEOUT_S}s:\n{e.stdout}\n{e.stderr}", pytrace=False)
    if p.returncode != 0:
        pytest.fail(f"{CLUSTER_SH} up failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}", pytrace=False)

    hostname = socket.gethostname().split(".")[0]
    # one line per node (sinfo -N repeats a node once per partition): name, CPUs, gres
    per_node: dict[str, tuple[int, int]] = {}
    for line in _sinfo_nodes("%N|%c|%G").splitlines():
        name, c, gres = line.split("|")
        cpus_n = int(c.rstrip("+")) if c.rstrip("+").isdigit() else 4
        gpus_n = 0
        for g in gres.split(","):
            parts = g.split("(")[0].split(":")
            if parts[0] == "gpu" and parts[-1].isdigit():
                gpus_n = int(parts[-1])
        per_node.setdefault(name, (cpus_n, gpus_n))
    if len(per_node) < 2 or len(set(per_node.values())) != 1:
        pytest.fail(f"{CLUSTER_SH} up left an unexpected layout (want two equal nodes): {per_node}\n"
                    f"{p.stdout}{p.stderr}", pytrace=False)
    nodes = tuple(sorted(per_node))
    cpus, gpus = per_node[nodes[0]]
    version = subprocess.run(["sinfo", "-V"], capture_output=True, text=True, timeout=30).stdout.strip()
    yield SlurmCluster(
        hostname=hostname,
        nodes=nodes,
        cpus=cpus,
        gpus=gpus,
        profile=os.environ.get("FOLDHPC_SLURM_PROFILE", "fast"),
        version=version,
        up_output=p.stdout + p.stderr,
    )
