"""CheckpointManager: self-verifying files, an index that cannot lose work, fallback, async, safety."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from foldhpc.checkpoint import CheckpointError, CheckpointManager, state_digest

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
    optim = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 64, generator=g)}},
             "param_groups": [{"lr": 0.1, "params": [0]}]}
    return {"model": model, "optimizer": optim, "train": {"step": seed}}


def saved(m: CheckpointManager, *steps: int) -> None:
    for s in steps:
        m.save(s, make_state(s), {}, reason="test", blocking=True)


def test_save_load_roundtrip_and_manifest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    for step in (10, 20, 30):
        m.save(step, make_state(step), {"note": "x"}, reason="test")
    entries = m.entries()
    assert [e.step for e in entries] == [20, 30]  # keep_last prunes the oldest
    assert [e.seq for e in entries] == [2, 3]
    assert not (tmp_path / "step_00000010.ckpt").exists()
    loaded = m.load_latest()
    assert loaded.entry.step == 30 and loaded.meta["step"] == 30 and loaded.meta["note"] == "x"
    ref = make_state(30)
    assert torch.equal(loaded.state["model"]["w"], ref["model"]["w"])
    assert loaded.state["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32
    assert loaded.entry.digest == state_digest(ref["model"], ref["optimizer"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_digest_sensitive_to_one_bit():
    a = make_state(1)
    b = make_state(1)
    assert state_digest(a["model"], a["optimizer"]) == state_digest(b["model"], b["optimizer"])
    b["optimizer"]["state"][0]["exp_avg"].view(torch.int32)[0, 0] ^= 1
    assert state_digest(a["model"], a["optimizer"]) != state_digest(b["model"], b["optimizer"])


@pytest.mark.parametrize("damage", ["truncate", "truncate-footer", "bitflip-data", "bitflip-header", "delete",
                                    "garbage", "appended"])
def test_bad_newest_falls_back_to_previous(tmp_path, damage, caplog):
    m = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    saved(m, 1, 2)
    newest = tmp_path / "step_00000002.ckpt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "truncate-footer":
        newest.write_bytes(data[:-5])
    elif damage == "bitflip-data":
        data[len(data) // 3] ^= 0x10  # inside a tensor
        newest.write_bytes(bytes(data))
    elif damage == "bitflip-header":
        data[-100] ^= 0x01  # inside the JSON header, just before the footer
        newest.write_bytes(bytes(data))
    elif damage == "delete":
        newest.unlink()
    elif damage == "garbage":
        newest.write_bytes(os.urandom(len(data)))
    elif damage == "appended":
        newest.write_bytes(bytes(data) + b"\0" * 10)
    fresh = CheckpointManager(tmp_path)
    loaded = fresh.load_latest()
    assert loaded.entry.step == 1
    assert torch.equal(loaded.state["model"]["w"], make_state(1)["model"]["w"])
    assert loaded.skipped and loaded.skipped[0][0] == "step_00000002.ckpt"
    assert ("IS MISSING" if damage == "delete" else "IS BAD") in caplog.text  # missing is not damage
    assert fresh.verify(fresh.entries()[-1]) is not None


def test_all_bad_is_a_clear_error(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False)
    saved(m, 1)
    (tmp_path / "step_00000001.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*--no-resume"):
        CheckpointManager(tmp_path).load_latest()


def test_empty_directory_means_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "nothing").load_latest() is None


# ---------------------------------------------------------------- the index is not a single point of failure
@pytest.mark.parametrize("how", ["deleted", "corrupt", "emptied", "unlisted"])
def test_lost_or_corrupt_manifest_loses_nothing(tmp_path, how, caplog):
    """Item 1: every good file is still found, used, kept for fallback and pruned normally."""
    m = CheckpointManager(tmp_path, keep_last=4, async_save=False)
    saved(m, 1, 2, 3)
    manifest = tmp_path / "manifest.json"
    if how == "deleted":
        manifest.unlink()
    elif how == "corrupt":
        manifest.write_text('{"version": 2, "checkpoints": [{"fi')
    elif how == "emptied":
        manifest.write_text(json.dumps({"version": 2, "checkpoints": []}))
    elif how == "unlisted":  # a crash between the rename and the index update
        doc = json.loads(manifest.read_text())
        doc["checkpoints"] = [c for c in doc["checkpoints"] if c["step"] != 3]
        manifest.write_text(json.dumps(doc))
    fresh = CheckpointManager(tmp_path, keep_last=4, async_save=False)
    loaded = fresh.load_latest()
    assert loaded.entry.step == 3 and not loaded.skipped
    assert torch.equal(loaded.state["model"]["w"], make_state(3)["model"]["w"])
    assert "from their own headers" in caplog.text  # said loudly
    # the next save keeps every older checkpoint in the index (fallback and pruning still see them)
    saved(fresh, 4)
    assert [e.step for e in CheckpointManager(tmp_path).entries()] == [1, 2, 3, 4]
    assert [e["step"] for e in json.loads(manifest.read_text())["checkpoints"]] == [1, 2, 3, 4]
    if how == "corrupt":
        assert len(list(tmp_path.glob("manifest.json.corrupt-*"))) == 1  # kept for inspection
    saved(fresh, 5)
    assert [e.step for e in fresh.entries()] == [2, 3, 4, 5]
    assert not (tmp_path / "step_00000001.ckpt").exists()


def test_corrupt_manifest_then_bad_newest_still_falls_back(tmp_path):
    m = CheckpointManager(tmp_path, async_save=False)
    saved(m, 1, 2)
    (tmp_path / "manifest.json").write_text("not json")
    (tmp_path / "step_00000002.ckpt").write_bytes(b"FOLDHPC2" + b"\0" * 100)
    loaded = CheckpointManager(tmp_path).load_latest()
    assert loaded.entry.step == 1


def test_newest_is_by_commit_order_not_step(tmp_path):
    """Item 4: after resuming an older checkpoint, the new line is kept, the abandoned one pruned."""
    m = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    saved(m, 10, 20, 30)  # the run that will be abandoned: kept 20 and 30
    again = CheckpointManager(tmp_path, keep_last=2, async_save=False)  # --resume step_00000020.ckpt
    saved(again, 21)
    assert (tmp_path / "step_00000021.ckpt").exists()  # not deleted by the commit that wrote it
    saved(again, 22)
    assert [e.step for e in again.entries()] == [21, 22]
    assert not (tmp_path / "step_00000030.ckpt").exists()
    assert CheckpointManager(tmp_path).load_latest().entry.step == 22  # not the abandoned 30


def test_bad_checkpoints_do_not_crowd_out_good_ones(tmp_path):
    """Item 4: a checkpoint found bad is not counted as kept and is deleted at the next commit."""
    m = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    saved(m, 1, 2)
    (tmp_path / "step_00000002.ckpt").write_bytes(b"broken")
    m2 = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    assert m2.load_latest().entry.step == 1
    saved(m2, 3)
    assert [e.step for e in m2.entries()] == [1, 3]  # 1 is still there for fallback
    assert not (tmp_path / "step_00000002.ckpt").exists()


def test_old_format_1_checkpoints_still_load(tmp_path):
    """Checkpoints written by foldhpc 0.1 (format 1, tests/fixtures/checkpoint_v1) load and are verified."""
    d = tmp_path / "ck"
    shutil.copytree(FIXTURE_V1, d)

    def v1_state(seed: int) -> dict:  # what the fixture holds (made with foldhpc 0.1's CheckpointManager)
        g = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g).to(torch.bfloat16),
                "exp_avg": (torch.randn(16, 8, generator=g))}

    m = CheckpointManager(d, keep_last=3, async_save=False)
    loaded = m.load_latest()
    assert loaded.entry.step == 2 and loaded.entry.format == 1
    ref = v1_state(2)
    assert torch.equal(loaded.state["model"]["w"], ref["w"]) and torch.equal(loaded.state["model"]["b"], ref["b"])
    assert torch.equal(loaded.state["optimizer"]["state"][0]["exp_avg"], ref["exp_avg"])
    assert loaded.state["rng"]["python"] == (3, (1, 2), None)
    # a new save goes after them in commit order, and they stay in the index for fallback
    saved(m, 3)
    assert [(e.step, e.format) for e in m.entries()] == [(1, 1), (2, 1), (3, 2)]
    # a damaged format-1 file is still caught (by the manifest's sha256) and skipped
    p = d / "step_00000002.ckpt"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    (d / "step_00000003.ckpt").unlink()
    loaded = CheckpointManager(d).load_latest()
    assert loaded.entry.step == 1 and "sha256 mismatch" in loaded.skipped[-1][1]


def test_unlisted_format_1_file_is_not_used_silently(tmp_path, caplog):
    d = tmp_path / "ck"
    shutil.copytree(FIXTURE_V1, d)
    (d / "manifest.json").unlink()
    assert CheckpointManager(d).load_latest() is None  # cannot verify itself: not picked automatically
    assert "--resume" in caplog.text and "format 1" in caplog.text
    assert CheckpointManager(d).load_file(d / "step_00000002.ckpt")["state"]["train"]["step"] == 2


def test_loading_never_runs_pickled_code(tmp_path):
    """A file that *would* run code under plain torch.load is refused without running it."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "step_00000002.ckpt"
    script = textwrap.dedent(f"""
        import os, sys, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"format": 1, "meta": {{}}, "state": {{"x": Evil()}}}}, sys.argv[1])
    """)
    subprocess.run([sys.executable, "-c", script, str(evil)], check=True, timeout=120)
    # armed: plain torch.load (weights_only=False) would run it
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                   timeout=120, capture_output=True)
    assert marker.exists()
    marker.unlink()
    m = CheckpointManager(tmp_path, async_save=False)
    with pytest.raises(CheckpointError, match="not a foldhpc checkpoint"):
        m.load_file(evil)
    saved(m, 1)
    assert m.load_latest().entry.step == 1  # the evil file is skipped, never executed
    assert not marker.exists()


def test_async_save_returns_at_once_and_snapshots_state(tmp_path):
    """The training thread is blocked for the hand-off only: measured against a blocking save."""
    big = {"model": {"w": torch.randn(4096, 2048)}, "optimizer": {"state": {}}}  # 32 MiB
    m = CheckpointManager(tmp_path, async_save=True)
    m._write_delay = 0.5  # every write takes >= 0.5 s (the FOLDHPC_DEBUG_WRITE_DELAY_S hook)
    t0 = time.perf_counter()
    m.save(1, big, {}, blocking=True)
    sync_s = time.perf_counter() - t0
    expected = state_digest(big["model"], big["optimizer"])
    t0 = time.perf_counter()
    assert m.save(2, big, {})
    async_s = time.perf_counter() - t0
    assert m.in_flight
    assert sync_s >= 0.5 and async_s < 0.1 * sync_s, (async_s, sync_s)
    assert not m.save(3, big, {})  # refused while one is in flight: the caller retries later
    m.wait_staged()  # what the training loop does before its next optimizer.step()
    big["model"]["w"].add_(1.0)  # training continues and mutates parameters in place
    m.wait()
    entry = CheckpointManager(tmp_path).load_latest().entry
    assert entry.step == 2 and entry.digest == expected  # the state as of save(), not as of the write


def test_failed_background_write_is_reported_and_previous_kept(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True)
    saved(m, 1)
    # make the next write fail: the temp file name is taken by a directory
    (tmp_path / f".step_00000002.ckpt.tmp-{socket.gethostname()}-{os.getpid()}").mkdir()
    m.save(2, make_state(2), {})
    m.wait()
    err = m.poll_error()
    assert err is not None and m.poll_error() is None  # reported once
    assert CheckpointManager(tmp_path).load_latest().entry.step == 1
    with pytest.raises(CheckpointError, match="step 2 failed"):
        m.save(2, make_state(2), {}, blocking=True)


def test_blocking_save_does_not_raise_an_earlier_background_failure(tmp_path):
    """Item 5: the signal save succeeds, so the run is checkpointed, not failed."""
    m = CheckpointManager(tmp_path, async_save=True)
    (tmp_path / f".step_00000002.ckpt.tmp-{socket.gethostname()}-{os.getpid()}").mkdir()
    m.save(2, make_state(2), {})  # fails in the background, not yet reported
    assert m.save(3, make_state(3), {}, reason="signal:SIGUSR1", blocking=True)  # its own write is fine
    assert CheckpointManager(tmp_path).load_latest().entry.step == 3
    assert m.poll_error() is not None  # the earlier failure is still reported, once


def test_synchronous_mode_failure_is_logged_not_raised(tmp_path, caplog):
    """Item 5: async_save=false, a transient write error: logged, training goes on."""
    m = CheckpointManager(tmp_path, async_save=False)
    saved(m, 1)
    blocker = tmp_path / f".step_00000002.ckpt.tmp-{socket.gethostname()}-{os.getpid()}"
    blocker.mkdir()
    assert m.save(2, make_state(2), {}, reason="steps")  # does not raise
    assert "FAILED, previous checkpoint kept" in caplog.text
    assert m.poll_error() is not None
    blocker.rmdir()
    assert m.save(3, make_state(3), {}, reason="steps") and m.poll_error() is None
    assert [e.step for e in m.entries()] == [1, 3]


def test_preflight_rejects_unusable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot create checkpoint directory.*checkpoint.dir"):
        CheckpointManager(blocker / "ckpt").preflight(1000)
    with pytest.raises(CheckpointError, match="MiB free.*checkpoint.dir"):
        CheckpointManager(tmp_path / "ok").preflight(1000, min_free_bytes=1 << 60)


def test_preflight_probes_the_rename(tmp_path):
    """Item 9: a directory where write+fsync work but the rename a save needs fails is refused."""
    d = tmp_path / "ck"
    d.mkdir()
    (d / f".preflight-{socket.gethostname()}-{os.getpid()}").mkdir()  # rename target is a directory
    (d / f".preflight-{socket.gethostname()}-{os.getpid()}" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="rename"):
        CheckpointManager(d).preflight(1000)
    assert not list(d.glob(".*.tmp-*"))  # the probe cleaned up after itself


def test_preflight_removes_stale_temporary_files(tmp_path):
    """Item 9: a dead writer's temporary file (full size on quota-limited scratch) is removed."""
    d = tmp_path / "ck"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = d / f".step_00000005.ckpt.tmp-{host}-{dead.pid}"
    old_v1 = d / ".step_00000004.ckpt.tmp-12345"  # format-1 name, an hour old
    live = d / f".step_00000006.ckpt.tmp-{host}-{os.getpid()}"  # a writer that is still running
    other = d / f".step_00000007.ckpt.tmp-otherhost-{dead.pid}"  # another node's, recent: not ours to judge
    for p in (stale, old_v1, live, other):
        p.write_bytes(b"\0" * 1000)
    os.utime(old_v1, (time.time() - 7200, time.time() - 7200))
    CheckpointManager(d).preflight(1000)
    assert not stale.exists() and not old_v1.exists()
    assert live.exists() and other.exists()


def test_kill_during_write_leaves_previous_loadable(tmp_path):
    """SIGKILL while a (large) checkpoint is being written: the previous one still loads."""
    m = CheckpointManager(tmp_path, async_save=False)
    saved(m, 1)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from foldhpc.checkpoint import CheckpointManager, fileformat
        m = CheckpointManager({str(tmp_path)!r}, async_save=False)
        big = {{"model": {{"w": torch.randn(4096, 4096)}}, "optimizer": {{}}}}
        def write_then_die(f, *args, **kwargs):
            f.write(b"FOLDHPC2" + b"partial" * 1000); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        fileformat.write = write_then_die
        m.save(2, big, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert list(tmp_path.glob(".step_00000002.ckpt.tmp-*"))  # the torn temp file is there ...
    loaded = CheckpointManager(tmp_path).load_latest()  # ... and ignored
    assert loaded.entry.step == 1 and not loaded.skipped
    CheckpointManager(tmp_path).preflight(1000)  # and removed at the next start (its writer is dead)
    assert not list(tmp_path.glob(".step_00000002.ckpt.tmp-*"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_snapshot_synchronizes_every_device(tmp_path):
    """Item 13: a state on cuda:1 is fully copied before it is written."""
    t = torch.randn(4096, 4096, device="cuda:1")
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, {"model": {"w": t}, "optimizer": {}}, {})
    m.wait()
    assert torch.equal(m.load_latest().state["model"]["w"], t.cpu())


def test_file_format_round_trips_every_state_type(tmp_path):
    from foldhpc.checkpoint import fileformat

    state = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "i64": torch.tensor(7),
             "empty": torch.empty(0, 3), "bool": torch.tensor([True, False]), 0: {"nested": [1, 2.5, None]},
             "tuple": (3, (1, 2), "x"), "nan": float("nan"), "s": "text", "big": torch.randn(3 << 20),
             "strided": torch.randn(6, 4).t()}
    path = tmp_path / "x.ckpt"
    with open(path, "wb") as f:
        fileformat.write(f, state, {"m": 1}, {"step": 1, "seq": 1, "saved_at": 0.0})
    back = fileformat.read(path)["state"]
    for k in ("f32", "bf16", "i64", "empty", "bool", "big", "strided"):
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    assert back[0] == {"nested": [1, 2.5, None]} and 0 in back  # int keys stay ints (optimizer state)
    assert back["tuple"] == (3, (1, 2), "x") and back["s"] == "text" and back["nan"] != back["nan"]
    header = fileformat.read_header(path)
    assert header["info"]["step"] == 1 and header["meta"] == {"m": 1}
    nodes = []
    fileformat._collect(header["state"], nodes)
    assert all(n[2] % fileformat.ALIGN == 0 for n in nodes)  # aligned: tensors are views, not copies
    assert len(next(n for n in nodes if n[3] == 12 << 20)[4]) == 2  # 12 MiB: two crc32 pieces
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(fileformat.FormatError, match="footer"):
        fileformat.read(path)


def test_io_error_is_not_damage(tmp_path, monkeypatch, caplog):
    """An EIO while reading (flaky storage; simulated: this machine cannot make a disk fail) falls
    back like damage does, but the file is never marked bad or deleted: it may read fine later."""
    import errno

    from foldhpc.checkpoint import fileformat

    m = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    saved(m, 1, 2)
    real_read = fileformat.read

    def flaky(path, verify=True):
        if Path(path).name == "step_00000002.ckpt":
            raise OSError(errno.EIO, "Input/output error")
        return real_read(path, verify)

    monkeypatch.setattr(fileformat, "read", flaky)
    m2 = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    assert m2.load_latest().entry.step == 1 and "UNREADABLE" in caplog.text
    monkeypatch.setattr(fileformat, "read", real_read)
    saved(m2, 3)
    assert (tmp_path / "step_00000002.ckpt").is_file()  # kept: keep_last=2 -> 2 and 3
    assert [e.step for e in m2.entries()] == [2, 3]
