"""Storage that lies, for ``foldhpc chaos``: forged checkpoint headers and a full run directory.

The storage kinds of :mod:`.kinds` need a little machinery the runner should not carry inline:

- :func:`craft_checkpoint` turns a real committed checkpoint into a hostile one. Its header is
  replaced by a crafted one *with a valid crc32 and footer*, so it passes every integrity check
  and reaches the parser: crc32 guards against accidents, not against a forged file, and a
  forged file must still be rejected, never crash or hang the process that reads it.
- :func:`tmpfs_method`, :func:`mount_tmpfs`, :func:`unmount_keeping` and :func:`fill` make the
  run directory's file system full while the checkpoint directory has space (a home directory
  over quota next to free scratch). The run directory is a small tmpfs mounted for the chaos run
  only; at the end its contents are copied back onto the real directory, so the run directory
  looks afterwards like any other (``foldhpc plot``, the report). Mounting needs root; where it
  is refused the kind is left out with the reason, never failed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

from foldhpc.checkpoint import fileformat

log = logging.getLogger(__name__)

RUN_FS_SIZE_MB = 64  # the chaos run directory's tmpfs: a 200-fault run's log, events and TensorBoard fit
FILLER = ".chaos-filler"  # the file that fills it
DEEP = 100_000  # nesting depth of the deep_nesting header: far past any recursion limit


def _first_tensor(tree: Any) -> list[Any] | None:
    nodes: list[list[Any]] = []
    fileformat._collect(tree, nodes)
    return nodes[0] if nodes else None


def craft_checkpoint(data: bytes, variant: str) -> tuple[bytes, str]:
    """``data`` (a committed format-2 checkpoint) with a crafted header; (new bytes, what was done).

    The data section is kept, the footer points at the new header and carries its crc32, so the
    file is "intact" as far as checksums go. Variants:

    - ``negative_nbytes``: the first tensor claims -8 bytes (an allocation of a negative size);
    - ``deep_nesting``: the state is a list nested :data:`DEEP` deep (a recursive parser's stack);
    - ``wrong_types``: the step is a word, the commit number a list, the metadata a list and the
      first tensor's dtype a number (code that trusts a header's types).
    """
    footer = fileformat._FOOTER
    hoff, hlen, _, tail = footer.unpack(data[-footer.size:])
    if tail != fileformat.TAIL or hoff + hlen + footer.size != len(data):
        raise ValueError("not a complete format-2 checkpoint")
    header = json.loads(data[hoff:hoff + hlen])
    node = _first_tensor(header["state"])
    if variant == "negative_nbytes":
        if node is None:
            raise ValueError("the checkpoint holds no tensor")
        node[3], node[4] = -8, []
        raw = json.dumps(header, separators=(",", ":")).encode()
        what = f"first tensor (offset {node[2]}) claims -8 bytes"
    elif variant == "deep_nesting":
        placeholder = "@chaos-deep@"
        header["state"] = placeholder
        raw = json.dumps(header, separators=(",", ":")).replace(
            json.dumps(placeholder), "[" * DEEP + "]" * DEEP).encode()
        what = f"state replaced by a list nested {DEEP} deep"
    elif variant == "wrong_types":
        info = header["info"]
        info["step"], info["seq"] = f"step {info.get('step')}", [info.get("seq")]
        header["meta"] = ["not", "a", "dict"]
        if node is not None:
            node[0] = 7
        raw = json.dumps(header, separators=(",", ":")).encode()
        what = "info.step a string, info.seq a list, meta a list, first tensor's dtype the number 7"
    else:
        raise ValueError(f"unknown crafted_header variant {variant!r}")
    return data[:hoff] + raw + footer.pack(hoff, len(raw), zlib.crc32(raw), fileformat.TAIL), \
        f"{what} (header {hlen} -> {len(raw)} bytes, crc32 valid)"


# ---------------------------------------------------------------------- a full file system
def tmpfs_method(scratch: Path) -> tuple[str | None, str]:
    """("tmpfs", how) if a small tmpfs can be mounted here (tried under ``scratch``), else (None, why)."""
    if os.geteuid() != 0:
        return None, (f"needs root to mount a {RUN_FS_SIZE_MB} MiB tmpfs on the run directory (running as uid "
                      f"{os.geteuid()})")
    if not shutil.which("mount") or not shutil.which("umount"):
        return None, "mount/umount are not installed"
    probe = Path(scratch) / ".chaos-mount-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            return None, f"mount -t tmpfs is refused here: {p.stderr.strip() or f'exit {p.returncode}'}"
        subprocess.run(["umount", str(probe)], capture_output=True)
        return "tmpfs", (f"a {RUN_FS_SIZE_MB} MiB tmpfs on the chaos run directory, filled to the last byte; "
                         "checkpoint.dir outside it")
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


def mount_tmpfs(path: Path, size_mb: int = RUN_FS_SIZE_MB) -> None:
    """Mount a fresh tmpfs of ``size_mb`` MiB on the (empty) directory ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)], check=True,
                   capture_output=True)


def unmount_keeping(path: Path) -> None:
    """Unmount the tmpfs on ``path``, keeping what was written there: copied out first, moved back
    onto the real directory after. A busy mount is detached lazily (``umount -l``)."""
    if not os.path.ismount(path):
        return
    (path / FILLER).unlink(missing_ok=True)
    keep = path.with_name(path.name + ".chaos-unmounting")
    shutil.rmtree(keep, ignore_errors=True)
    try:
        shutil.copytree(path, keep, symlinks=True)
    except (OSError, shutil.Error) as e:  # keep what could be copied; unmount anyway
        log.error("chaos: copying %s off its tmpfs: %s", path, e)
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if keep.is_dir():
        for item in keep.iterdir():
            shutil.move(str(item), str(path / item.name))
        keep.rmdir()


def fill(directory: Path) -> int:
    """Fill the file system of ``directory`` to the last byte (:data:`FILLER`); bytes written."""
    written = 0
    fd = os.open(directory / FILLER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    n = os.write(fd, chunk)
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
                written += n
                if n < size:
                    break
    finally:
        os.close(fd)
    return written


def unfill(directory: Path) -> None:
    (directory / FILLER).unlink(missing_ok=True)
