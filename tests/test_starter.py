"""`foldhpc init`: commented starter configs from the presets shipped in the package (fast tests;
the wheel install itself is tests/test_install.py)."""

from __future__ import annotations

import pytest

from conftest import ROOT, run_foldhpc
from foldhpc.config import load_config, tomllib
from foldhpc.starter import PRESETS, configs_dir


def test_presets_are_the_repository_configs():
    assert configs_dir().resolve() == (ROOT / "configs").resolve()  # one copy: the top-level configs/
    assert sorted(p.stem for p in configs_dir().glob("*.toml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_starter_is_the_preset_with_comments(tmp_path, preset):
    path = tmp_path / "cfg.toml"
    p = run_foldhpc("init", "--preset", preset, str(path))
    assert p.returncode == 0, p.stderr
    assert f"foldhpc train --config {path}" in p.stdout
    text = path.read_text()
    assert "data.path" in text and ".pdb" in text and "foldhpc init" in text  # how to get going
    assert all(len(ln) <= 100 for ln in text.splitlines())
    # the same config as the preset, key for key
    assert load_config(path).to_dict() == load_config(ROOT / "configs" / f"{preset}.toml").to_dict()
    assert text.count("\n#") > 15


def test_data_option_sets_data_path(tmp_path):
    data = tmp_path / "my structures"
    data.mkdir()
    path = tmp_path / "cfg.toml"
    p = run_foldhpc("init", "--preset", "tiny", "--data", str(data), str(path))
    assert p.returncode == 0, p.stderr
    assert "next: put" not in p.stdout  # the folder exists: nothing to tell
    assert load_config(path).data.path == str(data)
    p = run_foldhpc("init", "--data", "nowhere", str(tmp_path / "b.toml"))
    assert p.returncode == 0 and "nowhere" in p.stdout and "does not exist" in p.stdout


def test_an_existing_file_is_not_overwritten_without_force(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("# mine\n")
    p = run_foldhpc("init", str(path))
    assert p.returncode == 2 and "--force" in p.stderr and "Traceback" not in p.stderr
    assert path.read_text() == "# mine\n"
    p = run_foldhpc("init", "--force", "--preset", "gpu", str(path))
    assert p.returncode == 0 and load_config(path).train.amp is True


def test_stdout_and_unknown_preset():
    p = run_foldhpc("init", "--preset", "tiny", "-")
    assert p.returncode == 0 and tomllib.loads(p.stdout)["train"]["max_steps"] == 30
    p = run_foldhpc("init", "--preset", "huge", "x.toml")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    assert not (ROOT / "x.toml").exists()


def test_missing_dataset_error_says_how_to_get_going(tmp_path):
    p = run_foldhpc("data", "info", "--set", f"data.path={tmp_path / 'nothing'}")
    assert p.returncode == 2
    for hint in ("data.path", ".pdb", ".cif", "foldhpc init", "examples/data"):
        assert hint in p.stderr, (hint, p.stderr)


def test_missing_config_file_points_at_init(tmp_path):
    p = run_foldhpc("train", "--config", str(tmp_path / "mine.toml"))
    assert p.returncode == 2 and f"foldhpc init {tmp_path / 'mine.toml'}" in p.stderr

