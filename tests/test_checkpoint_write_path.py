"""The checkpoint write path (issue 26 item 3): writev batches, early writeback, the ctypes byte
views, the collector paused during in-place saves, the cheaper non-finite check.

What must not change is checked against real files: the bytes on disk are exactly those the
previous writer produced, every crc32 is written and verified, a flipped byte is refused, a short
write fails the save instead of committing a short file.
"""

from __future__ import annotations

import gc
import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from foldhpc.checkpoint import CheckpointError, CheckpointManager, fileformat
from foldhpc.checkpoint.finite import nonfinite_tensors


def golden_state() -> dict:
    """A deterministic state with every kind of tensor the writer treats differently: many small
    ones (several writev batches), one over PIECE (two crc32 pieces), more bytes than WRITEBACK in
    all (writeback is started), non-contiguous, conjugate, 0-dim, empty, bf16, int keys."""
    g = torch.arange(3 << 20, dtype=torch.float32) % 251  # 12 MiB
    model = {f"layer{i}.w": (torch.arange(i * 7, i * 7 + 300, dtype=torch.float32) / 7).reshape(3, 100)
             for i in range(2000)}
    model.update({"big": g, "big2": g.flip(0).reshape(1024, -1) * 2, "more": torch.arange(6 << 20, dtype=torch.int64),
                  "bf16": (torch.arange(100) / 3).to(torch.bfloat16), "t": torch.arange(24.0).reshape(4, 6).t(),
                  "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "mask": torch.arange(10) % 2 == 0,
                  "conj": torch.complex(torch.arange(4.0), -torch.arange(4.0)).conj()})
    return {"model": model, "optimizer": {"state": {0: {"step": torch.tensor(9.0), "exp_avg": g[:1000] * 0.5}},
                                          "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "step": 9, "rng": (1, 2, [3, 4])}


# sha256 of the file the writer before this change (commit 2faed93) made from golden_state() with
# these info/meta, conj view resolved (that writer could not store a conjugate view at all).
GOLDEN_SHA256 = "fabe14c9453dc2bb0f79e217df68b1703418662c9b79239a522c0033fbad349d"
INFO = {"step": 9, "seq": 1, "reason": "test", "saved_at": 1700000000.0}


def write_file(path: Path, state: dict) -> dict:
    with open(path, "wb") as f:
        return fileformat.write(f, state, {"m": 1}, INFO)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_file_bytes_unchanged_and_every_tensor_round_trips(tmp_path):
    """The new writer's file is byte for byte the old writer's: the format, the offsets, every
    crc32 and the header are the same, so old readers read new files and the reader is unchanged."""
    state = golden_state()
    path = tmp_path / "x.ckpt"
    header = write_file(path, state)
    assert header["bytes"] == path.stat().st_size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GOLDEN_SHA256
    back = fileformat.read(path)["state"]
    for k, t in state["model"].items():
        assert back["model"][k].dtype == t.dtype and torch.equal(back["model"][k], t.resolve_conj()), k
    assert back["optimizer"]["state"][0]["step"] == 9.0 and back["rng"] == (1, 2, [3, 4])


@pytest.mark.parametrize("where", ["small tensor", "second piece of a big tensor", "last data byte"])
def test_a_flipped_byte_is_refused(tmp_path, where):
    """Every piece's crc32 is written and verified: one flipped bit anywhere in the data is found."""
    state = golden_state()
    path = tmp_path / "x.ckpt"
    write_file(path, state)
    nodes: list = []
    fileformat._collect(fileformat.read_header(path)["state"], nodes)
    big = max(nodes, key=lambda n: n[3])
    offset = {"small tensor": nodes[500][2] + 7, "second piece of a big tensor": big[2] + fileformat.PIECE + 123,
              "last data byte": max(n[2] + n[3] for n in nodes) - 1}[where]
    flip(path, offset)
    with pytest.raises(fileformat.FormatError, match="checksum mismatch"):
        fileformat.read(path)


def test_blocking_save_verifies_and_a_flipped_byte_falls_back(tmp_path):
    """The in-place (blocking) path end to end: committed, loads bit-identical; damage in the newest
    file makes load_latest fall back to the previous one."""
    m = CheckpointManager(tmp_path, keep_last=3, async_save=True)
    state = golden_state()
    m.save(1, state, {}, reason="test", blocking=True)
    state["model"]["big"] = state["model"]["big"] + 1
    m.save(2, state, {}, reason="test", blocking=True)
    loaded = CheckpointManager(tmp_path).load_latest()
    assert loaded.entry.step == 2 and torch.equal(loaded.state["model"]["big"], state["model"]["big"])
    assert torch.equal(loaded.state["model"]["conj"], state["model"]["conj"].resolve_conj())
    flip(tmp_path / "step_00000002.ckpt", 64 + 5)
    loaded = CheckpointManager(tmp_path).load_latest()
    assert loaded.entry.step == 1 and "checksum mismatch" in loaded.skipped[0][1]


def test_in_place_save_pauses_the_collector_and_restores_it(tmp_path):
    """The collector is off while an in-place save runs (the state is staged inside it) and on again
    after, also when the save fails; a background save leaves it alone."""
    seen = []

    def source() -> dict:
        seen.append(gc.isenabled())
        return {"model": {"w": torch.ones(4)}, "optimizer": {}}

    assert gc.isenabled()
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, source, {}, blocking=True)
    assert seen == [False] and gc.isenabled()

    def broken() -> dict:
        raise RuntimeError("no state")

    with pytest.raises(CheckpointError, match="no state"):
        m.save(2, broken, {}, blocking=True)
    assert gc.isenabled()
    m.save(3, source, {})
    m.wait()
    assert seen == [False, True] and gc.isenabled() and m.poll_error() is None
    gc.disable()
    try:  # a caller that had it off keeps it off
        m.save(4, source, {}, blocking=True)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_short_write_fails_the_save_and_commits_nothing(tmp_path):
    """A file system that takes only part of a write (here: RLIMIT_FSIZE, EFBIG after a short write)
    fails the save loudly; no partial file is committed and the previous checkpoint still loads."""
    m = CheckpointManager(tmp_path, async_save=False)
    m.save(1, {"model": {"w": torch.ones(10)}, "optimizer": {}}, {}, blocking=True)
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from foldhpc.checkpoint import CheckpointError, CheckpointManager
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, resource.RLIM_INFINITY))
        m = CheckpointManager({str(tmp_path)!r}, async_save=False)
        try:
            m.save(2, {{"model": {{"w": torch.arange(4 << 20, dtype=torch.float32)}}, "optimizer": {{}}}}, {{}},
                   blocking=True)
        except CheckpointError as e:
            print("FAILED:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FAILED:" in proc.stdout and "File too large" in proc.stdout
    assert not (tmp_path / "step_00000002.ckpt").exists() and not list(tmp_path.glob(".step_*.tmp-*"))
    assert CheckpointManager(tmp_path).load_latest().entry.step == 1


def test_byte_view_keeps_its_tensor_alive_and_is_read_only():
    t = torch.arange(1000, dtype=torch.float32)
    expect = t.numpy().tobytes()
    mv = fileformat.byte_view(t)
    del t
    gc.collect()
    assert mv.readonly and bytes(mv) == expect
    with pytest.raises(TypeError):
        mv[0] = 1


def test_nonfinite_check_sees_every_dtype_and_device_group():
    """An inf in a complex tensor's imaginary part is found (a sum cast to float used to drop it);
    half sums that overflow on finite values are not reported; bf16 NaN and grad tensors are."""
    state = {"c": torch.tensor([1 + 1j, complex(0, float("inf"))]), "h": torch.full((3,), 6e4, dtype=torch.half),
             "b": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "p": torch.ones(3, requires_grad=True),
             "f": torch.ones(5), "i": torch.tensor([1, 2])}
    bad = nonfinite_tensors(state)
    assert bad == ["c: 0 NaN, 1 inf of 2 values", "b: 1 NaN, 0 inf of 2 values"]
    assert nonfinite_tensors({"h": state["h"], "p": state["p"], "f": state["f"]}) == []
