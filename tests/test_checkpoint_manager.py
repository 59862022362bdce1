"""CheckpointManager: atomic verified files, fallback to the previous good one, async, safety."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from foldhpc.checkpoint import CheckpointError, CheckpointManager, state_digest


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    optim = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 64, generator=g)}},
             "param_groups": [{"lr": 0.1, "params": [0]}]}
    return {"model": model, "optimizer": optim, "train": {"step": seed}}


def test_save_load_roundtrip_and_manifest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    for step in (10, 20, 30):
        m.save(step, make_state(step), {"note": "x"}, reason="test")
    entries = m.entries()
    assert [e.step for e in entries] == [20, 30]  # keep_last prunes the oldest
    assert not (tmp_path / "step_00000010.ckpt").exists()
    loaded = m.load_latest()
    assert loaded.entry.step == 30 and loaded.meta["step"] == 30 and loaded.meta["note"] == "x"
    ref = make_state(30)
    assert torch.equal(loaded.state["model"]["w"], ref["model"]["w"])
    assert loaded.entry.digest == state_digest(ref["model"], ref["optimizer"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_digest_sensitive_to_one_bit():
    a = make_state(1)
    b = make_state(1)
    assert state_digest(a["model"], a["optimizer"]) == state_digest(b["model"], b["optimizer"])
    b["optimizer"]["state"][0]["exp_avg"].view(torch.int32)[0, 0] ^= 1
    assert state_digest(a["model"], a["optimizer"]) != state_digest(b["model"], b["optimizer"])


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "no-manifest-entry", "garbage"])
def test_bad_newest_falls_back_to_previous(tmp_path, damage, caplog):
    m = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    m.save(1, make_state(1), {})
    m.save(2, make_state(2), {})
    newest = tmp_path / "step_00000002.ckpt"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "bitflip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0x10
        newest.write_bytes(bytes(data))
    elif damage == "delete":
        newest.unlink()
    elif damage == "no-manifest-entry":
        doc = json.loads((tmp_path / "manifest.json").read_text())
        doc["checkpoints"] = [c for c in doc["checkpoints"] if c["step"] != 2]
        (tmp_path / "manifest.json").write_text(json.dumps(doc))
    elif damage == "garbage":  # right size and hash recorded for garbage: caught by the loader
        newest.write_bytes(os.urandom(newest.stat().st_size))
        doc = json.loads((tmp_path / "manifest.json").read_text())
        from foldhpc.checkpoint.manager import sha256_file
        doc["checkpoints"][-1]["sha256"] = sha256_file(newest)
        (tmp_path / "manifest.json").write_text(json.dumps(doc))
    fresh = CheckpointManager(tmp_path)
    loaded = fresh.load_latest()
    assert loaded.entry.step == 1
    assert torch.equal(loaded.state["model"]["w"], make_state(1)["model"]["w"])
    if damage != "no-manifest-entry":
        assert loaded.skipped and loaded.skipped[0][0] == "step_00000002.ckpt"
        assert "IS BAD" in caplog.text
    else:
        assert "no manifest entry" in caplog.text


def test_all_bad_is_a_clear_error(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, make_state(1), {})
    (tmp_path / "step_00000001.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*--no-resume"):
        m.load_latest()


def test_empty_directory_means_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "nothing").load_latest() is None


def test_loading_never_runs_pickled_code(tmp_path):
    """A checkpoint from an untrusted place cannot execute code: weights_only loading."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, make_state(1), {})
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "meta": {}, "state": {"x": Evil()}}, evil)
    with pytest.raises(Exception):
        m.load_file(evil)
    assert not marker.exists()


def test_async_save_does_not_block_and_snapshots_state(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True)
    state = make_state(5)
    assert m.save(5, state, {})
    m.wait_staged()  # what the training loop does before its next optimizer.step()
    state["model"]["w"].add_(1.0)  # training continues and mutates parameters in place
    second = m.save(6, state, {})  # refused while the first is in flight, or accepted after it finished
    m.wait()
    loaded = CheckpointManager(tmp_path).load_latest()
    first = [e for e in m.entries() if e.step == 5][0]
    assert first.digest == state_digest(make_state(5)["model"], make_state(5)["optimizer"])
    assert loaded.entry.step == (6 if second else 5)


def test_failed_background_write_is_reported_and_previous_kept(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, make_state(1), {})
    m.wait()
    # make the next write fail: the temp file name is taken by a directory
    (tmp_path / f".step_00000002.ckpt.tmp-{os.getpid()}").mkdir()
    m.save(2, make_state(2), {})
    m.wait()
    err = m.poll_error()
    assert err is not None and m.poll_error() is None  # reported once
    assert CheckpointManager(tmp_path).load_latest().entry.step == 1
    with pytest.raises(CheckpointError, match="step 2 failed"):
        m.save(2, make_state(2), {}, blocking=True)


def test_preflight_rejects_unusable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot create checkpoint directory.*checkpoint.dir"):
        CheckpointManager(blocker / "ckpt").preflight(1000)
    with pytest.raises(CheckpointError, match="MiB free.*checkpoint.dir"):
        CheckpointManager(tmp_path / "ok").preflight(1000, min_free_bytes=1 << 60)


def test_kill_during_write_leaves_previous_loadable(tmp_path):
    """SIGKILL while a (large) checkpoint is being written: the previous one still loads."""
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, make_state(1), {})
    script = textwrap.dedent(f"""
        import os, signal, torch
        from foldhpc.checkpoint import CheckpointManager, fileformat
        m = CheckpointManager({str(tmp_path)!r}, async_save=False)
        big = {{"model": {{"w": torch.randn(4096, 4096)}}, "optimizer": {{}}}}
        def write_then_die(f, obj):
            f.write(b"FOLDHPC1" + b"partial" * 1000); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        fileformat.write = write_then_die
        m.save(2, big, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert list(tmp_path.glob(".step_00000002.ckpt.tmp-*"))  # the torn temp file is there ...
    loaded = CheckpointManager(tmp_path).load_latest()  # ... and ignored
    assert loaded.entry.step == 1


def test_file_format_round_trips_every_state_type(tmp_path):
    from foldhpc.checkpoint import fileformat

    state = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "i64": torch.tensor(7),
             "empty": torch.empty(0, 3), "bool": torch.tensor([True, False]), 0: {"nested": [1, 2.5, None]},
             "tuple": (3, (1, 2), "x"), "nan": float("nan"), "s": "text"}
    path = tmp_path / "x.ckpt"
    with open(path, "wb") as f:
        sha = fileformat.write(f, state)
    from foldhpc.checkpoint.manager import sha256_file
    assert sha == sha256_file(path)
    back = fileformat.read(path)
    for k in ("f32", "bf16", "i64", "empty", "bool"):
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    assert back[0] == {"nested": [1, 2.5, None]} and 0 in back  # int keys stay ints (optimizer state)
    assert back["tuple"] == (3, (1, 2), "x") and back["s"] == "text" and back["nan"] != back["nan"]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(fileformat.FormatError, match="out of range"):
        fileformat.read(path)
