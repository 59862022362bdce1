"""Shared helpers: run foldhpc in a subprocess, tiny fast configs, reading run directories."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# In-process tests use one intra-op thread: results do not depend on the core count, and a
# loaded 2-core CI machine does not make OpenMP threads spin against each other.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
GOOD_DATA = ROOT / "tests" / "data" / "good"


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """--set items for a deterministic tiny run in ``run_dir`` (cache shared between tests)."""
    items = {"run.dir": str(run_dir), "data.path": str(GOOD_DATA), "train.deterministic": True,
             "run.log_every": 1, "train.threads": 1}
    items.update(extra)
    out = []
    for k, v in items.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, list):
            v = json.dumps(v)
        out.append(f"{k}={v}")
    return out


def set_args(overrides: list[str]) -> list[str]:
    args: list[str] = []
    for o in overrides:
        args += ["--set", o]
    return args


def foldhpc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "foldhpc", *args]


def run_foldhpc(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(foldhpc_cmd(*args), capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)


def wait_for(pred, what: str, timeout: float = 120, poll: float = 0.1):
    """Poll ``pred`` until it returns something truthy and return that; TimeoutError(``what``) after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session", autouse=True)
def _warm_test_data_cache():
    """Parse tests/data/good once per session so tests measure training, not parsing."""
    from foldhpc.config import load_config
    from foldhpc.data.cache import load_dataset

    load_dataset(load_config(TINY, [f"data.path={GOOD_DATA}"]).data, progress=False)


class Records(logging.Handler):
    """Every record of the ``foldhpc`` logger (it does not propagate, so caplog sees nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def records():
    h = Records()
    logger = logging.getLogger("foldhpc")
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a small tmpfs of its own (e.g. ``"64k"``, ``"4m"``) and returns its
    folder; unmounted at teardown. Root only: skipped, with the reason, where mount is refused."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{len(mounted)}"
        where.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or p.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_fs(fs: Path) -> Path:
    """Fill the file system of ``fs`` to the last byte (unbuffered writes); returns the filler file."""
    import errno

    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def latest_checkpoint(run_dir: Path) -> Any:
    """The newest good checkpoint of ``run_dir`` (its default checkpoint directory), loaded."""
    from foldhpc.checkpoint import CheckpointManager

    loaded = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert loaded is not None, f"no checkpoint in {run_dir}"
    return loaded


def assert_same_state(a: Any, b: Any, where: str = "") -> None:
    """Two nested states are equal bit for bit (tensors by dtype and torch.equal), naming the first
    path that differs."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
