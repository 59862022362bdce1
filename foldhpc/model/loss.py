"""Distogram targets and loss (AlphaFold's distogram head loss on virtual CB atoms).

The target for pair (i, j) is the bin of the CB-CB distance; CB is rebuilt from N, CA, C
("virtual CB") so glycines and structures without side chains get a target too.  Pairs
are scored only where both residues are real (``mask``) and have N, CA and C
(``atom_mask``), so a residue with missing backbone atoms, whatever garbage its
coordinates hold, cannot change the loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from foldhpc.model.layers import one_hot

#: AlphaFold's distogram range: the first and last of the ``n_bins - 1`` bin boundaries.
FIRST_BREAK = 2.3125
LAST_BREAK = 21.6875


def virtual_cb(coords: torch.Tensor) -> torch.Tensor:
    """Ideal CB position [..., L, 3] from backbone ``coords`` [..., L, 4, 3] (N, CA, C, O).

    AlphaFold's constants: ``b = CA - N``, ``c = C - CA``, ``a = b x c``,
    ``CB = -0.58273431 a + 0.56802827 b - 0.54067466 c + CA``.
    """
    n, ca, c = coords[..., 0, :], coords[..., 1, :], coords[..., 2, :]
    b = ca - n
    c = c - ca
    a = torch.linalg.cross(b, c, dim=-1)
    cb: torch.Tensor = -0.58273431 * a + 0.56802827 * b - 0.54067466 * c + ca  # torch.linalg.cross is typed Any
    return cb


def distogram_bins(
    n_bins: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``n_bins - 1`` bin boundaries in Angstrom, evenly spaced from 2.3125 to 21.6875.

    Bin 0 is everything below the first boundary, the last bin everything above the last
    one; with 64 bins each inner bin is 0.3125 A wide (AlphaFold's setting).
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    return torch.linspace(FIRST_BREAK, LAST_BREAK, n_bins - 1, device=device, dtype=dtype)


def backbone_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Float [B,L]: 1 where the residue is real and has N, CA and C (a virtual CB exists)."""
    atom_mask = batch["atom_mask"].float()
    return batch["mask"].float() * atom_mask[..., 0] * atom_mask[..., 1] * atom_mask[..., 2]


def valid_pair_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Float [B,L,L]: pairs i != j whose residues both pass :func:`backbone_mask`."""
    res = backbone_mask(batch)
    n = res.shape[-1]
    off_diagonal = 1.0 - torch.eye(n, device=res.device, dtype=res.dtype)
    return res[:, :, None] * res[:, None, :] * off_diagonal


def cb_distances(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """CB-CB distances [B,L,L] in Angstrom; entries involving missing atoms are finite junk.

    Coordinates of absent atoms are zeroed first (``where``, not multiplication: NaN * 0
    is NaN), so downstream masks can remove those entries without NaN leaking through.
    """
    coords = batch["coords"].float()
    present = batch["atom_mask"][..., None] > 0
    coords = torch.where(present & torch.isfinite(coords), coords, torch.zeros_like(coords))
    cb = virtual_cb(coords)
    diff = cb[:, :, None, :] - cb[:, None, :, :]
    return torch.sqrt((diff * diff).sum(-1) + 1e-10)


def distogram_targets(batch: Mapping[str, torch.Tensor], n_bins: int) -> torch.Tensor:
    """True distogram bin per pair, long [B,L,L] (AlphaFold: count of boundaries exceeded)."""
    dist = cb_distances(batch)
    breaks = distogram_bins(n_bins, device=dist.device)
    return (dist.unsqueeze(-1) > breaks).sum(-1)


def distogram_loss(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked cross-entropy of ``logits`` [B,L,L,n_bins] against the true CB distogram.

    Averaged over all valid pairs of the batch (see :func:`valid_pair_mask`).  With no
    valid pair the loss is an exact 0 that still has a ``grad_fn`` (so ``backward`` works
    and nothing is NaN).  The stats are detached tensors (no host sync here; call
    ``.item()`` when logging): ``loss``, ``n_pairs``, ``accuracy`` (argmax bin == true
    bin), ``per_example_loss`` [B] and ``per_example_pairs`` [B] (for per-protein means).
    """
    n_bins = logits.shape[-1]
    with torch.no_grad():
        pair = valid_pair_mask(batch)
        target = distogram_targets(batch, n_bins)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    # One-hot product instead of gather/cross_entropy: gather's backward is a scatter-add,
    # which is non-deterministic on CUDA.
    nll = -(log_probs * one_hot(target, n_bins)).sum(-1)
    weighted = nll * pair
    n_per_example = pair.sum(dim=(1, 2))
    n_pairs = n_per_example.sum()
    loss = weighted.sum() / n_pairs.clamp(min=1.0)
    with torch.no_grad():
        correct = (logits.argmax(-1) == target).float() * pair
        stats = {
            "loss": loss.detach(),
            "n_pairs": n_pairs,
            "accuracy": correct.sum() / n_pairs.clamp(min=1.0),
            "per_example_loss": weighted.detach().sum(dim=(1, 2)) / n_per_example.clamp(min=1.0),
            "per_example_pairs": n_per_example,
        }
    return loss, stats
