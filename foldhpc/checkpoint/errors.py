"""CheckpointError, importable without torch.

``foldhpc.cli.main`` catches it for every command, and ``status`` and ``checkpoints`` raise it;
defined here so that commands which never load a checkpoint (the supervisor, ``status``,
``goodput``, ``init``, ...) do not import torch. Re-exported by ``foldhpc.checkpoint.manager``
and ``foldhpc.checkpoint``: one class under all three names.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """No usable checkpoint, or the checkpoint directory cannot be used.

    ``damaged`` is False for I/O errors (a file that could not be read now may be fine later): only
    a damaged file is ever marked bad and deleted.
    """

    def __init__(self, message: str, damaged: bool = True) -> None:
        super().__init__(message)
        self.damaged = damaged
