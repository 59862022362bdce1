"""Config loading: every shipped config is valid; bad keys/types/values are rejected up front."""

from pathlib import Path

import pytest

from foldhpc.config import ConfigError, config_to_toml, load_config, parse_duration

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "default", "gpu"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.checkpoint.interval_s == 15 * 60
    assert cfg.train.max_steps > 0


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/tiny.toml",
                      ["train.max_steps=7", "train.deterministic=true", "checkpoint.interval=30s",
                       "run.dir=/tmp/some run", "train.lr=0.5", "checkpoint.signals=SIGUSR2,SIGTERM"])
    assert cfg.train.max_steps == 7 and cfg.train.deterministic is True
    assert cfg.checkpoint.interval_s == 30
    assert cfg.run.dir == "/tmp/some run"
    assert cfg.train.lr == 0.5
    assert cfg.checkpoint.signals == ["SIGUSR2", "SIGTERM"]


@pytest.mark.parametrize("text,seconds", [("15m", 900), ("30s", 30), ("1h", 3600), ("1h30m", 5400),
                                          ("0", 0), ("2.5s", 2.5), (90, 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "m15", "15 minutes", "-5s", "1h x", "5y"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("override,needles", [
    ("train.max_step=5", ["train.max_step", "Did you mean 'train.max_steps'"]),
    ("trian.seed=1", ["trian", "Did you mean 'train'"]),
    ("train.max_steps=abc", ["train.max_steps", "'abc'", "integer"]),
    ("train.batch_size=0", ["train.batch_size = 0", ">= 1"]),
    ("checkpoint.interval=5q", ["checkpoint.interval", "'5q'", "15m"]),
    ("checkpoint.signals=SIGFOO", ["checkpoint.signals", "SIGFOO", "SIGUSR1"]),
    ("data.val_fraction=1.5", ["data.val_fraction = 1.5", "(0, 1)"]),
    ("train.deterministic=yes", ["train.deterministic", "true or false"]),
    ("train.device=tpu", ["train.device", "auto, cpu, cuda"]),
    ("nodot=3", ["section.key"]),
])
def test_bad_overrides_name_key_value_and_rule(override, needles):
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/tiny.toml", [override])
    for n in needles:
        assert n in str(exc.value)


def test_bad_file_key_names_file(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("[train]\nmax_stepz = 3\n")
    with pytest.raises(ConfigError, match=r"x\.toml.*train\.max_stepz.*train\.max_steps"):
        load_config(f)
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/gpu.toml", ["train.seed=5"])
    f = tmp_path / "resolved.toml"
    f.write_text(config_to_toml(cfg))
    assert load_config(f) == cfg


def test_fingerprint_tracks_model_and_data_only():
    a = load_config(ROOT / "configs/tiny.toml")
    assert a.fingerprint() == load_config(ROOT / "configs/tiny.toml", ["train.max_steps=99",
                                                                        "data.num_workers=3"]).fingerprint()
    assert a.fingerprint() != load_config(ROOT / "configs/tiny.toml", ["model.d_pair=8"]).fingerprint()
