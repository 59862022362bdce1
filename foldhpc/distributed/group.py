"""Talking to the other ranks: rendezvous, the per-step stop agreement, small object exchange.

:class:`SoloGroup` is the one-process case: every collective is the identity and costs nothing,
so a single-GPU run is not changed by any of this. :class:`TorchGroup` wraps
``torch.distributed``: the default process group (NCCL on CUDA, gloo on CPU) carries DDP's
gradients; a second, gloo group carries foldhpc's own control traffic (the stop agreement,
checkpoint hand-offs), so deciding "stop at this step" never waits on the GPU stream.

Every collective runs under ``distributed.timeout``. A rank that dies is noticed much sooner
than that on gloo (its sockets close: the peer's collective fails at once); a rank that hangs
is noticed when the timeout expires. Either way a collective raises :class:`PeerFailure`, and
the trainer fails (see :mod:`foldhpc.distributed.ranks` for which rank is named).
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Callable, TypeVar

from foldhpc.distributed.env import DistEnv

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout or could not be reached."""


class SoloGroup:
    """One process: nothing to agree with."""

    def __init__(self, env: DistEnv | None = None) -> None:
        self.env = env or DistEnv()

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def agree(self, signum: int, save_due: bool) -> tuple[int, bool]:
        """(the largest signal number any rank has seen, whether any rank's timer says save)."""
        return signum, save_due

    def broadcast(self, obj: T, what: str = "") -> T:  # noqa: ARG002
        """Rank 0's ``obj`` on every rank."""
        return obj

    def all_gather(self, obj: T, what: str = "") -> list[T]:  # noqa: ARG002
        return [obj]

    def sum_(self, tensor: Any) -> Any:
        """In-place sum over ranks of a tensor on the training device (default group)."""
        return tensor

    def barrier(self, what: str = "") -> None:  # noqa: ARG002
        return None

    def collective(self, what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:  # noqa: ARG002
        """Run ``fn``, which communicates with the other ranks (e.g. DDP's backward, whose hooks
        all-reduce the gradients); with several ranks its failure is a :class:`PeerFailure`."""
        return fn(*args, **kwargs)

    def close(self) -> None:
        return None


class TorchGroup(SoloGroup):
    """``torch.distributed`` across ``env.world_size`` processes (see the module docstring)."""

    def __init__(self, env: DistEnv, backend: str, timeout_s: float) -> None:
        import torch.distributed as dist

        super().__init__(env)
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        t0 = time.monotonic()
        init = f"tcp://{env.master_addr}:{env.master_port}"
        log.info("%s: joining the %s process group at %s (timeout %ss)", env.describe(), backend, init, timeout_s)
        try:
            dist.init_process_group(backend, init_method=init, rank=env.rank, world_size=env.world_size,
                                    timeout=self.timeout)
            self._ctrl = dist.new_group(backend="gloo", timeout=self.timeout) if backend != "gloo" else None
        except Exception as e:  # noqa: BLE001 - torch raises several types here
            raise PeerFailure(f"{env.describe()}: rendezvous at {init} failed within {timeout_s:g}s: "
                              f"{type(e).__name__}: {e}") from e
        self.join_s = time.monotonic() - t0
        log.info("%s: process group ready in %.2fs", env.describe(), self.join_s)

    def collective(self, what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return self._call(what, fn, *args, **kwargs)

    def _call(self, what: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - DistBackendError, RuntimeError, ValueError...
            raise PeerFailure(f"{self.env.describe()}: {what} failed (another rank died, hung longer than "
                              f"distributed.timeout = {self.timeout.total_seconds():g}s or is unreachable): "
                              f"{type(e).__name__}: {e}") from e

    def agree(self, signum: int, save_due: bool) -> tuple[int, bool]:
        import torch
        import torch.distributed as dist

        flags = torch.tensor([signum, int(save_due)], dtype=torch.int64)
        self._call("the stop agreement", dist.all_reduce, flags, op=dist.ReduceOp.MAX, group=self._ctrl)
        return int(flags[0]), bool(flags[1])

    def broadcast(self, obj: T, what: str = "a broadcast") -> T:
        import torch.distributed as dist

        box = [obj]
        self._call(what, dist.broadcast_object_list, box, src=0, group=self._ctrl)
        return box[0]

    def all_gather(self, obj: T, what: str = "an all-gather") -> list[T]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._call(what, dist.all_gather_object, out, obj, group=self._ctrl)
        return out

    def sum_(self, tensor: Any) -> Any:
        import torch.distributed as dist

        self._call("a sum over ranks", dist.all_reduce, tensor)
        return tensor

    def barrier(self, what: str = "a barrier") -> None:
        import torch
        import torch.distributed as dist

        # an all-reduce, not dist.barrier(): on NCCL that one needs a device and on gloo it
        # honours the same timeout anyway
        self._call(what, dist.all_reduce, torch.zeros(1), group=self._ctrl)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - shutting down after a peer died
                log.debug("destroy_process_group: %s", e)


def open_group(env: DistEnv, backend: str, device_type: str, timeout_s: float) -> SoloGroup:
    """A :class:`SoloGroup` for one process, else a :class:`TorchGroup`.

    ``backend`` "auto" picks NCCL for CUDA devices and gloo otherwise.
    """
    if not env.distributed:
        return SoloGroup(env)
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    return TorchGroup(env, backend, timeout_s)
