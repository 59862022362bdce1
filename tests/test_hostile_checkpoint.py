"""Issue 19: a checkpoint directory holding hostile or broken things (H1: checkpoint storage).

Crafted manifests and headers, files that vanish for a moment, a newer foldhpc's files, a FIFO named
like a checkpoint, a full file system after the commit, --no-resume on a symlink or a mount point.
Each is the review's reproduction; none may delete a file it does not own, crash, or hang, and every
damaged newest file falls back to the previous good one (the README's promise).
"""

from __future__ import annotations

import json
import os
import stat
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, tiny_overrides
from foldhpc.checkpoint import CheckpointManager, fileformat
from foldhpc.checkpoint.listing import format_table, list_checkpoints
from foldhpc.config import load_config
from foldhpc.train.loop import Trainer


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(64, 64, generator=g)}}, "param_groups": []},
            "train": {"step": seed}}


def saved(m: CheckpointManager, *steps: int) -> None:
    m.dir.mkdir(parents=True, exist_ok=True)  # what preflight does before a run's first save
    for s in steps:
        m.save(s, make_state(s), {}, reason="test", blocking=True)


def split(path: Path) -> tuple[bytes, dict]:
    """(magic + tensor data, header) of a format-2 file."""
    raw = path.read_bytes()
    hoff, hlen, _, _ = fileformat._FOOTER.unpack(raw[-fileformat._FOOTER.size:])
    return raw[:hoff], json.loads(raw[hoff:hoff + hlen])


def write_raw(path: Path, data: bytes, header: bytes) -> None:
    """A file whose footer and header crc32 are right: only the header's content is hostile."""
    path.write_bytes(data + header + fileformat._FOOTER.pack(len(data), len(header), zlib.crc32(header),
                                                             fileformat.TAIL))


def nodes_of(header: dict) -> list[list]:
    out: list[list] = []
    fileformat._collect(header["state"], out)
    return out


# ------------------------------------------------------------------------------------------ item 6
def _craft(kind: str, header: dict) -> bytes:
    """The review's ten crafted headers (each otherwise a valid file: crc32s right)."""
    state, info, first = header["state"], header["info"], nodes_of(header)[0]
    biggest = max(nodes_of(header), key=lambda n: n[3])
    extra = ""
    if kind == "negative-nbytes":
        first[3] = -8
    elif kind == "dtype-5":
        first[0] = 5
    elif kind == "D-is-5":
        header["state"] = {"D": 5}
    elif kind == "unhashable-key":
        state["D"].append([[1, 2], 3])
    elif kind == "deep-100k":
        state["D"].append(["deep", "@X@"])
        extra = "[" * 100_000 + "]" * 100_000
    elif kind == "step-forty":
        info["step"] = "forty"
    elif kind == "no-seq":
        del info["seq"]
    elif kind == "no-state":
        del header["state"]
    elif kind == "overlapping":  # 1000 tensors over the same bytes: 16 MiB of allocations from a 50 KiB file
        state["D"].extend([f"copy{i}", {"T": list(biggest)}] for i in range(1000))
    elif kind == "near-cap-empties":  # just over the cap, nothing but empty containers
        state["D"].append(["pad", "@X@"])
        extra = "[" + ",".join(["{}"] * ((fileformat.MAX_HEADER // 3) + 10)) + "]"
    text = json.dumps(header, separators=(",", ":"))
    return text.replace('"@X@"', extra).encode()


CRAFTED = ["negative-nbytes", "dtype-5", "D-is-5", "unhashable-key", "deep-100k", "step-forty", "no-seq",
           "no-state", "overlapping", "near-cap-empties"]


@pytest.mark.parametrize("listed", [False, True], ids=["unlisted", "listed"])
@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_header_falls_back_to_previous_good(tmp_path, kind, listed):
    """Item 6: each crafted newest file is skipped (never a crash) and the previous good one used;
    ``foldhpc checkpoints --verify`` and ``status`` (both list_checkpoints) do not crash either.
    ``listed``: the file replaces one the index lists (loaded, not only indexed, from its header)."""
    run = tmp_path / "run"
    d = run / "checkpoints"
    m = CheckpointManager(d, keep_last=5, async_save=False)
    saved(m, 1, 2)
    data, header = split(d / "step_00000002.ckpt")
    if listed:  # the newest listed file is replaced by the crafted one: fallback to step 1
        target, fallback = d / "step_00000002.ckpt", 1
    else:  # a crafted file the index does not list, newer than every listed one
        header["info"].update(step=3, seq=3)
        target, fallback = d / "step_00000003.ckpt", 2
    write_raw(target, data, _craft(kind, header))

    fresh = CheckpointManager(d, keep_last=5, async_save=False)
    t0 = time.monotonic()
    loaded = fresh.load_latest()
    assert time.monotonic() - t0 < 10
    assert loaded.entry.step == fallback
    assert torch.equal(loaded.state["model"]["w"], make_state(fallback)["model"]["w"])
    rows = list_checkpoints(run, verify=True)
    format_table(rows)
    assert [r["step"] for r in rows if r["verified"]] == list(range(1, fallback + 1))
    saved(fresh, 10)  # the next commit works and keeps the good ones
    assert CheckpointManager(d).load_latest().entry.step == 10
    assert (d / f"step_{fallback:08d}.ckpt").is_file()


def test_oversized_header_is_rejected_before_it_is_parsed(tmp_path):
    """Item 6: a header of empty containers just over the cap costs neither memory nor time (the old
    256 MiB cap let one 6.6 GB; json needs ~25 bytes of memory per byte of such a header)."""
    m = CheckpointManager(tmp_path, async_save=False)
    saved(m, 1)
    data, header = split(tmp_path / "step_00000001.ckpt")
    path = tmp_path / "step_00000002.ckpt"
    write_raw(path, data, _craft("near-cap-empties", header))
    assert path.stat().st_size > fileformat.MAX_HEADER
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(fileformat.FormatError, match="over the 16 MiB limit"):
            fileformat.read_header(path)
        with pytest.raises(fileformat.FormatError, match="over the 16 MiB limit"):
            fileformat.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 1.0 and peak < 1 << 20, peak


def test_overlapping_tensor_ranges_are_rejected_before_allocating(tmp_path):
    """Item 6: 1000 tensors claiming the same bytes are refused by the layout check, which runs
    before any tensor storage is allocated (the total of all tensors can never exceed the file)."""
    m = CheckpointManager(tmp_path, async_save=False)
    saved(m, 1)
    data, header = split(tmp_path / "step_00000001.ckpt")
    path = tmp_path / "x.ckpt"
    write_raw(path, data, _craft("overlapping", header))
    with pytest.raises(fileformat.FormatError, match="overlap"):
        fileformat.read(path)
    with pytest.raises(fileformat.FormatError, match="overlap"):
        fileformat.read_header(path)  # so status/checkpoints never index it either
    header_ok = split(tmp_path / "step_00000001.ckpt")[1]
    nodes_of(header_ok)[0][1] = [3]  # a shape that does not account for the bytes
    write_raw(path, data, json.dumps(header_ok).encode())
    with pytest.raises(fileformat.FormatError, match="is not .* bytes"):
        fileformat.read(path)


# ------------------------------------------------------------------------------------------ item 1
def _add_entries(d: Path, *entries: dict) -> None:
    doc = json.loads((d / "manifest.json").read_text())
    doc["checkpoints"] += list(entries)
    (d / "manifest.json").write_text(json.dumps(doc))


def test_manifest_names_outside_the_directory_are_never_deleted(tmp_path):
    """Item 1: index entries ``/abs/path`` and ``../config.keep`` (seq 0, so pruned first) made the
    first commit of a resume delete both."""
    run = tmp_path / "run"
    d = run / "checkpoints"
    m = CheckpointManager(d, keep_last=2, async_save=False)
    saved(m, 1, 2)
    keep_me, victim = run / "config.keep", tmp_path / "victim.ckpt"
    keep_me.write_text("precious")
    victim.write_text("precious")
    _add_entries(d, {"file": str(victim), "step": 0, "seq": 0}, {"file": "../config.keep", "step": 0, "seq": 0})
    fresh = CheckpointManager(d, keep_last=2, async_save=False)
    saved(fresh, 3, 4)  # commits and prunes
    assert keep_me.read_text() == "precious" and victim.read_text() == "precious"
    assert [e.step for e in fresh.entries()] == [3, 4]
    assert list(d.glob("manifest.json.corrupt-*"))  # the bad index kept for inspection, rebuilt from the files


def test_manifest_cannot_point_loading_at_another_file(tmp_path):
    """Item 1: an entry with the highest seq naming another run's checkpoint made a resume load it."""
    run = tmp_path / "run"
    d = run / "checkpoints"
    other = CheckpointManager(tmp_path / "other" / "checkpoints", async_save=False)
    saved(other, 99)
    foreign = tmp_path / "other" / "checkpoints" / "step_00000099.ckpt"
    m = CheckpointManager(d, keep_last=2, async_save=False)
    saved(m, 1, 2)
    _add_entries(d, {"file": str(foreign), "step": 99, "seq": 99})
    loaded = CheckpointManager(d).load_latest()
    assert loaded.path == d / "step_00000002.ckpt" and loaded.entry.step == 2  # its own newest
    assert [r["path"] for r in list_checkpoints(run)] == [str(d / "step_00000001.ckpt"), str(d / "step_00000002.ckpt")]
    assert foreign.is_file()


# ------------------------------------------------------------------------------------------ item 7
@pytest.mark.parametrize("field,value", [("seq", "7"), ("bytes", "big"), ("step", True), ("saved_at", 1e300),
                                         ("saved_at", "yesterday"), ("write_s", [1]), ("file", 5)])
def test_wrong_typed_manifest_field_rebuilds_the_index(tmp_path, field, value, caplog):
    """Item 7: ``"seq": "7"`` or ``"bytes": "big"`` crashed train, status and checkpoints."""
    run = tmp_path / "run"
    d = run / "checkpoints"
    m = CheckpointManager(d, keep_last=3, async_save=False)
    saved(m, 1, 2)
    doc = json.loads((d / "manifest.json").read_text())
    doc["checkpoints"][0][field] = value
    (d / "manifest.json").write_text(json.dumps(doc))
    fresh = CheckpointManager(d, keep_last=3, async_save=False)
    assert [e.step for e in fresh.entries()] == [1, 2]  # rebuilt from the files' headers
    assert f"{field} = " in caplog.text and "from their own headers" in caplog.text
    assert "step_00000002.ckpt" in format_table(list_checkpoints(run, verify=True))
    assert fresh.load_latest().entry.step == 2
    saved(fresh, 3)
    assert [c["step"] for c in json.loads((d / "manifest.json").read_text())["checkpoints"]] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ item 3
def test_briefly_invisible_file_is_not_deleted_when_it_reappears(tmp_path):
    """Item 3: a file the file system hid for a moment (NFS/Lustre lookup cache, automounter) was
    put on the bad list and unlinked at the next commit once it was visible again."""
    m = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    saved(m, 1, 2)
    newest = tmp_path / "step_00000002.ckpt"
    hidden = tmp_path / "hidden"
    newest.rename(hidden)
    fresh = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    loaded = fresh.load_latest()
    assert loaded.entry.step == 1 and loaded.skipped[0][1] == "file is missing"
    hidden.rename(newest)  # visible again
    saved(fresh, 3)
    assert newest.is_file() and [e.step for e in CheckpointManager(tmp_path).entries()] == [1, 2, 3]


def test_file_found_bad_then_replaced_is_not_deleted(tmp_path):
    """Item 3: what is deleted must be the file that was found bad; a good copy put in its place
    (a restore from backup while the run is up) is judged afresh, not deleted."""
    m = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    saved(m, 1, 2)
    newest = tmp_path / "step_00000002.ckpt"
    good = newest.read_bytes()
    newest.write_bytes(good[: len(good) // 2])
    fresh = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    assert fresh.load_latest().entry.step == 1
    restored = tmp_path / "restore.tmp"
    restored.write_bytes(good)
    os.replace(restored, newest)
    saved(fresh, 3)
    assert newest.read_bytes() == good
    assert CheckpointManager(tmp_path).verify(CheckpointManager(tmp_path).entries()[1]) is None
    third = tmp_path / "step_00000003.ckpt"
    third.write_bytes(b"broken")  # a file that is still the bad one when the commit comes is deleted
    again = CheckpointManager(tmp_path, keep_last=3, async_save=False)
    assert again.load_latest().entry.step == 2
    saved(again, 4)
    assert not third.exists() and newest.is_file()


@pytest.mark.parametrize("how", ["magic", "header"])
def test_newer_format_checkpoint_is_never_deleted(tmp_path, how, caplog):
    """Item 3: an older foldhpc resumed on a run a newer one wrote (format 3, listed in its index)
    falls back to a file it can read and never deletes the newer ones."""
    m = CheckpointManager(tmp_path, keep_last=1, async_save=False)
    saved(m, 1)
    data, header = split(tmp_path / "step_00000001.ckpt")
    header["info"].update(step=2, seq=2)
    newer = tmp_path / "step_00000002.ckpt"
    if how == "magic":
        newer.write_bytes(b"FOLDHPC3" + os.urandom(4000))
    else:
        header["format"] = 3
        write_raw(newer, data, json.dumps(header).encode())
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["checkpoints"].append({"file": newer.name, "step": 2, "seq": 2, "format": 3, "saved_at": time.time()})
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    fresh = CheckpointManager(tmp_path, keep_last=1, async_save=False)
    loaded = fresh.load_latest()
    assert loaded.entry.step == 1 and "newer foldhpc" in loaded.skipped[0][1]
    saved(fresh, 3, 4)  # keep_last=1: prunes 1 and 3, never the newer foldhpc's file
    assert newer.is_file() and not (tmp_path / "step_00000001.ckpt").exists()
    (tmp_path / "manifest.json").unlink()  # unlisted too: indexed as "not mine", not as bad
    again = CheckpointManager(tmp_path, keep_last=1, async_save=False)
    assert again.load_latest().entry.step == 4 and "IS BAD" not in caplog.text
    saved(again, 5)
    assert newer.is_file()


# ------------------------------------------------------------------------------------------ item 8
def _within(seconds: float, fn, fifo: Path):
    """fn() in a thread; if it is still blocked after ``seconds`` (in open() of the FIFO), a writer
    is opened to release it and the test fails."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(v=fn()), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail(f"{fn} blocked on the FIFO {fifo}")
    return out.get("v")


@pytest.mark.parametrize("name", ["step_00000009.ckpt", "manifest.json"])
def test_fifo_named_like_a_checkpoint_does_not_hang(tmp_path, name, caplog):
    """Item 8: a FIFO named like a checkpoint (or the index) hung status, checkpoints and train."""
    run = tmp_path / "run"
    d = run / "checkpoints"
    m = CheckpointManager(d, keep_last=3, async_save=False)
    saved(m, 1, 2)
    fifo = d / name
    if name == "manifest.json":
        fifo.unlink()
    os.mkfifo(fifo)
    rows = _within(10, lambda: list_checkpoints(run, verify=True), fifo)
    assert [r["step"] for r in rows] == [1, 2] and all(r["verified"] for r in rows)
    loaded = _within(10, lambda: CheckpointManager(d, keep_last=3).load_latest(), fifo)
    assert loaded.entry.step == 2
    fresh = CheckpointManager(d, keep_last=3, async_save=False)
    _within(10, lambda: saved(fresh, 3), fifo)
    assert [e.step for e in fresh.entries()] == [1, 2, 3]
    if name != "manifest.json":
        assert fifo.exists() and "not a regular file (a FIFO)" in caplog.text  # skipped, not deleted
        doc = json.loads((d / "manifest.json").read_text())  # listed by the index: still never opened
        doc["checkpoints"].append({"file": name, "step": 9, "seq": 9})
        (d / "manifest.json").write_text(json.dumps(doc))
        loaded = _within(10, lambda: CheckpointManager(d, keep_last=3).load_latest(), fifo)
        assert loaded.entry.step == 3 and "not a regular file" in loaded.skipped[0][1]


# ------------------------------------------------------------------------------------------ item 17a
def _unshare_python(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``script`` as root of its own user and mount namespace (mounts vanish with it); skips the
    test where this machine does not allow that."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"],
                                                          capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user + mount namespaces) to mount a small tmpfs")
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run(["unshare", "-rm", sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_full_file_system_after_the_rename_is_a_committed_checkpoint(tmp_path):
    """Item 17a: ENOSPC while writing the index after the rename reported a committed checkpoint
    as failed (an exit save would give 1 instead of 75) and left the index's temp file behind.
    A real full file system: a tmpfs filled so that the checkpoint file fits and nothing more."""
    p = _unshare_python(f"""
        import logging, os, subprocess, sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_hostile_checkpoint import make_state
        from foldhpc.checkpoint import CheckpointManager
        logging.basicConfig(level=logging.INFO)
        d = {str(tmp_path / "mnt")!r}
        os.makedirs(d)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", d], check=True)
        m = CheckpointManager(d, keep_last=2, async_save=False)
        m.save(1, make_state(1), {{}}, blocking=True)
        size = os.path.getsize(os.path.join(d, "step_00000001.ckpt"))
        st = os.statvfs(d)
        # leave room for one more checkpoint file only (33.6 KB: 9 pages, ~3 KB from a page boundary, so
        # the second file, 15 bytes longer, fits and the index's one more page does not)
        with open(os.path.join(d, "filler"), "wb") as f:
            f.write(b"x" * (st.f_bavail * st.f_frsize - (size + 4095) // 4096 * 4096))
        assert m.save(2, make_state(2), {{}}, reason="signal:SIGTERM", blocking=True)  # no CheckpointError
        print("LAST", m.last_committed.step)
        print("FILES", sorted(os.listdir(d)))
        os.remove(os.path.join(d, "filler"))
        print("LATEST", CheckpointManager(d).load_latest().entry.step)
    """, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LAST 2" in p.stdout and "LATEST 2" in p.stdout
    assert "FILES ['filler', 'manifest.json', 'step_00000001.ckpt', 'step_00000002.ckpt']" in p.stdout  # no temp
    assert "is committed" in p.stderr and "No space left on device" in p.stderr and "FAILED" not in p.stderr


# ------------------------------------------------------------------------------------ pruning message
def test_interrupted_pruning_is_reported_as_such(tmp_path, caplog):
    """A kill between the index write and the unlinks leaves older files the index does not list:
    that is an interrupted pruning (INFO), not "a save was interrupted after its rename" (ERROR)."""
    m = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    saved(m, 1, 2, 3)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["checkpoints"] = doc["checkpoints"][1:]  # what the index says once step 1 is pruned ...
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    caplog.clear()
    caplog.set_level("INFO")
    fresh = CheckpointManager(tmp_path, keep_last=2, async_save=False)
    assert [e.step for e in fresh.entries()] == [2, 3]  # ... while its file is still there
    rec = [r for r in caplog.records if "step_00000002.ckpt" in r.getMessage()]
    assert rec and rec[0].levelname == "INFO" and "pruning was interrupted" in rec[0].getMessage()
    assert "save was interrupted" not in caplog.text
    saved(fresh, 4)
    assert not (tmp_path / "step_00000002.ckpt").exists()  # the pruning is finished


# ------------------------------------------------------------------------------------------ item 19
def test_move_aside_keeps_a_symlinked_directory_and_unique_names(tmp_path):
    """Item 19: the old files move into <dir>/old-<time>-<n>/ by rename; the directory (here a
    symlink to scratch) stays what it was; two in the same second get different folders; the
    moved files are never indexed or pruned again."""
    scratch = tmp_path / "scratch" / "ck"
    scratch.mkdir(parents=True)
    link = tmp_path / "run" / "checkpoints"
    link.parent.mkdir()
    link.symlink_to(scratch)
    m = CheckpointManager(link, keep_last=1, async_save=False)
    saved(m, 1, 2)
    (link / "manifest.json.corrupt-20240101-000000").write_text("x")
    first = m.move_aside()
    assert link.is_symlink() and first.parent == link and first.name.startswith("old-")
    assert sorted(p.name for p in (scratch / first.name).iterdir()) == [
        "manifest.json", "manifest.json.corrupt-20240101-000000", "step_00000002.ckpt"]
    assert m.entries() == [] and m.load_latest() is None
    saved(m, 1)
    second = m.move_aside()
    assert second != first and (second / "step_00000001.ckpt").is_file()
    saved(m, 5, 6, 7)  # keep_last=1 prunes, never inside the old-* folders
    assert [e.step for e in m.entries()] == [7]
    assert (first / "step_00000002.ckpt").is_file() and (second / "step_00000001.ckpt").is_file()
    assert CheckpointManager(tmp_path / "nothing").move_aside() is None


def test_moved_aside_folder_is_private_whatever_the_umask(tmp_path):
    """Item 4 for item 19's folder: the old checkpoints keep the run's protection (0750), also
    under a umask that would make a new folder group-writable."""
    m = CheckpointManager(tmp_path / "ck", async_save=False)
    saved(m, 1)
    old = os.umask(0o002)
    try:
        aside = m.move_aside()
    finally:
        os.umask(old)
    assert stat.S_IMODE(aside.stat().st_mode) == 0o750


def test_move_aside_on_a_mount_point_and_refusal_when_a_rename_fails(tmp_path):
    """Item 19: a checkpoint.dir that is a mount point: shutil.move copied it all to the parent's
    file system, then failed (EBUSY). Now renames inside it; and where a rename fails (a file that
    is itself a mount point: EBUSY), a clear CheckpointError and everything left as it was."""
    p = _unshare_python(f"""
        import os, subprocess, sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_hostile_checkpoint import saved
        from foldhpc.checkpoint import CheckpointError, CheckpointManager
        d = {str(tmp_path / "mnt")!r}
        os.makedirs(d)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", d], check=True)
        m = CheckpointManager(d, async_save=False)
        saved(m, 1, 2)
        aside = m.move_aside()
        print("MOUNTED", os.path.ismount(d), "ASIDE", sorted(os.listdir(aside)), "TOP", sorted(os.listdir(d)))
        saved(m, 3, 4)
        other = {str(tmp_path / "other")!r}
        open(other, "w").close()
        subprocess.run(["mount", "--bind", other, os.path.join(d, "step_00000004.ckpt")], check=True)
        try:
            m.move_aside()
        except CheckpointError as e:
            print("REFUSED", e)
        print("TOP", sorted(os.listdir(d)))
    """, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "MOUNTED True ASIDE ['manifest.json', 'step_00000001.ckpt', 'step_00000002.ckpt'] TOP ['old-" in p.stdout
    refused = next(line for line in p.stdout.splitlines() if line.startswith("REFUSED"))
    assert "step_00000004.ckpt" in refused and "mount point" in refused and "nothing was moved" in refused
    assert "checkpoint.dir" in refused
    top = p.stdout.splitlines()[-1]
    assert "'manifest.json', 'old-" in top and "'step_00000003.ckpt', 'step_00000004.ckpt']" in top
    assert top.count("old-") == 1  # the failed attempt's folder is gone again


def test_no_resume_keeps_a_symlinked_checkpoint_dir(tmp_path):
    """Item 19 end to end: ``foldhpc train --no-resume`` with checkpoint.dir a symlink to scratch
    swapped the symlink for a real directory (the next checkpoints landed on the wrong file system).
    In-process: the Trainer with the resume choice ``--no-resume`` maps to ("never")."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    link = tmp_path / "ck-link"
    link.symlink_to(scratch)
    run = tmp_path / "run"
    over = tiny_overrides(run, **{"train.max_steps": 4, "checkpoint.every_steps": 2, "train.val_every": 0,
                                  "checkpoint.dir": str(link)})
    for resume in ("auto", "never"):
        assert Trainer(load_config(TINY, over), resume=resume).run().state == "completed"
    assert link.is_symlink()
    aside = list(scratch.glob("old-*"))
    assert len(aside) == 1 and (aside[0] / "step_00000004.ckpt").is_file()
    assert (scratch / "step_00000004.ckpt").is_file()  # the new run's, on scratch
    assert "moved 3 existing checkpoint file(s)" in (run / "train.log").read_text()
