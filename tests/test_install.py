"""foldhpc installed from a wheel, not a clone: the starter configs are in the package, and
`foldhpc init` + `foldhpc train` work outside the repository.

SLOW-ISH (marker ``install``, ~15-40 s for the two tests): builds foldhpc's wheel from a copy of the sources and
installs it into a fresh virtual environment, then runs the installed `foldhpc` in a temporary
directory. Nothing is downloaded: torch, numpy, Biopython, ... come from this interpreter's
site-packages through a ``.pth`` file appended after the fresh venv's own site-packages (so the
fresh install of foldhpc is the one imported); the wheel is built without build isolation when
this environment's setuptools can build it, else pip fetches setuptools as for any install.
Deselect with ``-m "not install"``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import GOOD_DATA, ROOT
from foldhpc.config import tomllib

COPY = ("pyproject.toml", "README.md", "foldhpc", "configs")


def test_packages_list_is_complete():
    """pyproject.toml lists the packages (for the configs mapping): every subpackage must be there."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "foldhpc").rglob("__init__.py")}
    assert found | {"foldhpc.configs"} == listed, "add new subpackages to [tool.setuptools] packages"


def _can_build_without_isolation() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
    return version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel") is not None)


def _pip(*args: str, build: bool = False, timeout: float = 180) -> None:
    """pip of this interpreter; ``build``: a build from source, offline where this environment
    can build it (else with isolation, which fetches setuptools like any ``pip install``)."""
    offline = ["--no-index"]
    if build:
        offline = ["--no-build-isolation", "--no-index"] if _can_build_without_isolation() else []
    p = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args, *offline],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _source_copy(dest: Path) -> Path:
    dest.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dest / name)
    return dest


def _fresh_venv(path: Path) -> Path:
    """A venv without pip whose site-packages sees this interpreter's (torch & co.) after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "zz-foldhpc-test-deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return py


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "FOLDHPC_"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


@pytest.mark.install
def test_wheel_install_init_and_train_outside_the_repository(tmp_path):
    src = _source_copy(tmp_path / "src")
    _pip("wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src), build=True)
    wheel = next((tmp_path / "dist").glob("foldhpc-*.whl"))
    venv = tmp_path / "venv"
    py = _fresh_venv(venv)
    _pip("--python", str(py), "install", "--no-deps", "-q", str(wheel))

    work = tmp_path / "elsewhere"  # not the repository, not the source copy
    work.mkdir()
    shutil.copytree(GOOD_DATA, work / "structures", ignore=shutil.ignore_patterns(".foldhpc-cache"))
    env = _clean_env(venv)

    def foldhpc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "foldhpc"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=180)

    where = subprocess.run([str(py), "-c", "import foldhpc, foldhpc.starter as s; print(foldhpc.__file__); "
                            "print(s.configs_dir())"], cwd=work, env=env, capture_output=True, text=True)
    pkg_file, configs = where.stdout.split()
    assert pkg_file.startswith(str(venv)) and configs == str(Path(pkg_file).parent / "configs"), where
    assert sorted(p.name for p in Path(configs).glob("*.toml")) == ["default.toml", "gpu.toml", "large.toml",
                                                                     "tiny.toml"]

    p = foldhpc("init", "--preset", "tiny", "--data", "structures", "my.toml")
    assert p.returncode == 0, p.stderr
    p = foldhpc("train", "--config", "my.toml", "--set", "train.max_steps=6", "--set", "run.dir=runs/first")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    status = (work / "runs" / "first" / "status.json").read_text()
    assert '"completed"' in status
    # without a dataset: one line that says how to get going
    p = foldhpc("init", "--preset", "default", "other.toml")
    assert p.returncode == 0 and "examples/data" in p.stdout and "does not exist" in p.stdout
    p = foldhpc("train", "--config", "other.toml")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "foldhpc init" in p.stderr and "data.path" in p.stderr


@pytest.mark.install
def test_editable_install_maps_the_configs(tmp_path):
    """`pip install -e .` (the development install) finds the same files through foldhpc.configs."""
    src = _source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    py = _fresh_venv(venv)
    _pip("--python", str(py), "install", "--no-deps", "-q", "-e", str(src), build=True)
    code = ("import importlib.resources as r, foldhpc.starter as s; "
            "print(r.files('foldhpc.configs').joinpath('tiny.toml').is_file(), s.configs_dir())")
    p = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=_clean_env(venv), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", str(src / "configs")]
