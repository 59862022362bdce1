"""Which tensors of a training state hold NaN or inf.

The checkpoint manager refuses to commit such a state (a resume from it would be a resume into
garbage), and the non-finite guard (``foldhpc.resilience.nonfinite``) uses the same check on the
live weights; both need it, so it lives at the lower of the two layers.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


def _floating_tensors(tree: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _floating_tensors(v, f"{path}/{k}" if path else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _floating_tensors(v, f"{path}[{i}]")


def nonfinite_tensors(tree: Any, limit: int = 5) -> list[str]:
    """The floating tensors of a nested state that hold NaN or inf, described ("model/w: 3 NaN,
    0 inf of 4096 values"), at most ``limit`` of them; empty when everything is finite.

    A sum per tensor (NaN and inf propagate through a sum; a sum of finite values can only
    overflow, and such a tensor is then checked element by element) and one host sync per device
    for the whole state; only offending tensors are counted in detail. On CPU the sum streams
    memory ~10x faster than ``isfinite(t).all()`` (0.1 s vs 1.0 s for the 0.94 GiB state of
    configs/large.toml, one thread). That state has 10,410 tensors, so the cost per tensor counts:
    one op each, under no_grad (0.16 s for the whole check, was 0.23 s with four ops each). The
    sums are compared in their own dtype (a complex sum cast to float would drop an inf in its
    imaginary part).
    """
    found = [(p, t) for p, t in _floating_tensors(tree) if t.numel()]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for p, t in found:
        by_device.setdefault(t.device, []).append((p, t))
    bad: list[str] = []
    with torch.no_grad():  # no autograd node per sum: per tensor, the dispatch is most of the cost
        for items in by_device.values():
            sums = [t.sum() for _, t in items]  # one op per tensor (10,410 of them in a large state)
            groups: dict[torch.dtype, list[int]] = {}
            for i, s in enumerate(sums):
                groups.setdefault(s.dtype, []).append(i)
            ok = torch.empty(len(items), dtype=torch.bool, device=sums[0].device)
            for idx in groups.values():  # stack needs one dtype; still one host sync per device
                ok[idx] = torch.isfinite(torch.stack([sums[i] for i in idx]))
            if bool(ok.all()):
                continue
            for (p, t), fine in zip(items, ok.tolist()):
                t = t.detach()
                if fine or bool(torch.isfinite(t).all()):  # the second: finite values whose sum overflowed
                    continue
                if len(bad) >= limit:
                    return bad + ["..."]
                bad.append(f"{p}: {int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf "
                           f"of {t.numel()} values")
    return bad
