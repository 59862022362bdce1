"""Lint and type checks as part of the test suite: ``foldhpc/py.typed`` tells users' type checkers
that foldhpc's annotations can be relied on, so CI checks them (and the README's test command,
``python -m pytest``, covers both checks, as ``.ci/run`` does).

``python -m ruff check`` and ``python -m mypy`` run from the repository root with the configuration
in pyproject.toml ([tool.ruff], [tool.mypy]: which files, which rules, and the per-file exceptions
with the reason for each). ruff and mypy come with the ``dev`` extra (``pip install -e ".[dev]"``);
a missing one fails here rather than skips, so CI cannot pass without the checks.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def run_tool(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m <tool> ...`` with this interpreter; fails the test (not errors) if it is missing."""
    probe = subprocess.run([sys.executable, "-m", args[0], "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"{args[0]} is not installed for {sys.executable}: pip install -e \".[dev]\"\n{probe.stderr}")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def shown(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_ruff_passes() -> None:
    proc = run_tool("ruff", "check", "--no-fix", "--output-format", "concise")
    assert proc.returncode == 0, shown(proc)


def test_mypy_passes() -> None:
    proc = run_tool("mypy")
    assert proc.returncode == 0, shown(proc)
    assert "Success" in proc.stdout, shown(proc)


def test_checked_scope() -> None:
    """The whole package stays in mypy's list (what py.typed promises) and ruff's, and mypy stays
    strict on it: no per-module override switches a check off for foldhpc."""
    conf = tomllib.loads(PYPROJECT.read_text())["tool"]
    files = conf["mypy"]["files"]
    assert "foldhpc" in files
    assert {"tests/test_records.py", "tests/test_lint.py"} <= set(files)
    assert conf["mypy"]["strict"] is True
    for override in conf["mypy"].get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not any(m == "foldhpc" or m.startswith("foldhpc.") for m in modules), override
    assert {"E", "F", "W"} <= set(conf["ruff"]["lint"]["select"])
    for where in ("foldhpc/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "examples/**/*.py"):
        assert where in conf["ruff"]["include"]


def test_the_configuration_catches_what_it_should(tmp_path: Path) -> None:
    """The project's own configuration, on a file with one finding of each kind: ruff reports the
    unused import and the undefined name, mypy the unannotated function (strict) and the bad call."""
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""\
        import os


        def untyped(x):
            return x


        def typed(n: int) -> int:
            return n + undefined_name


        typed("three")
        """))
    ruff = run_tool("ruff", "check", "--no-fix", "--no-cache", "--output-format", "concise",
                    "--config", str(PYPROJECT), str(bad), cwd=tmp_path)
    assert ruff.returncode == 1, shown(ruff)
    assert "F401" in ruff.stdout and "F821" in ruff.stdout, shown(ruff)
    mypy = run_tool("mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / "cache"), str(bad),
                    cwd=tmp_path)
    assert mypy.returncode == 1, shown(mypy)
    assert "[no-untyped-def]" in mypy.stdout and "[arg-type]" in mypy.stdout, shown(mypy)
