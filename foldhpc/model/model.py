"""The structure predictor: sequence -> single/pair trunk -> distogram.

An Evoformer-lite in the AlphaFold/trRosetta family.  It predicts, for every residue pair,
a distribution over CB-CB distances (the distogram), which is the signal trRosetta folds
from and AlphaFold uses as an auxiliary loss.  It reads only ``aatype``,
``residue_index`` and ``mask`` from the batch, never the coordinates, so the labels cannot
leak into the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from foldhpc.config import ModelConfig
from foldhpc.model.layers import (
    AttentionWithPairBias,
    LayerNorm,
    OuterProductUpdate,
    Transition,
    TriangleMultiplication,
    one_hot,
)

#: 20 standard amino acids ("ACDEFGHIKLMNPQRSTVWY") + unknown.
NUM_AATYPES = 21


class TrunkBlock(nn.Module):
    """One pre-LN residual block: attention and MLP on ``s``, then four updates of ``z``.

    Order (single first, then pair) lets the same block's pair update see the freshly
    attended single rep, as in AlphaFold's Evoformer where the outer product follows the
    MSA stack.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_s, d_z = cfg.d_single, cfg.d_pair
        self.attention = AttentionWithPairBias(d_s, d_z, cfg.n_heads)
        self.single_transition = Transition(d_s)
        self.outer_product = OuterProductUpdate(d_s, d_z, d_hidden=max(8, d_z // 2))
        self.tri_out = TriangleMultiplication(d_z, d_z, outgoing=True)
        self.tri_in = TriangleMultiplication(d_z, d_z, outgoing=False)
        self.pair_transition = Transition(d_z)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, s: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, pair_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = s + self.dropout(self.attention(s, z, mask))
        s = s + self.dropout(self.single_transition(s))
        z = z + self.dropout(self.outer_product(s, mask))
        z = z + self.dropout(self.tri_out(z, pair_mask))
        z = z + self.dropout(self.tri_in(z, pair_mask))
        z = z + self.dropout(self.pair_transition(z))
        return s, z


class StructureModel(nn.Module):
    """Distogram predictor.  ``forward(batch)`` returns a dict with:

    * ``distogram_logits`` [B,L,L,n_bins], exactly symmetric in i, j;
    * ``single`` [B,L,d_single] and ``pair`` [B,L,L,d_pair], the trunk outputs.

    Values at padded positions are finite but meaningless; values at real positions do
    not depend on the padding.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.max_relpos = cfg.max_relpos
        self.aa_embed = nn.Linear(NUM_AATYPES, cfg.d_single)
        self.pair_left = nn.Linear(cfg.d_single, cfg.d_pair)
        self.pair_right = nn.Linear(cfg.d_single, cfg.d_pair, bias=False)
        self.relpos_embed = nn.Linear(2 * cfg.max_relpos + 1, cfg.d_pair, bias=False)
        self.blocks = nn.ModuleList(TrunkBlock(cfg) for _ in range(cfg.n_blocks))
        self.distogram_norm = LayerNorm(cfg.d_pair)
        self.distogram_head = nn.Linear(cfg.d_pair, cfg.n_bins)
        with torch.no_grad():  # start near the uniform distogram (loss ~ ln n_bins), not above it
            self.distogram_head.weight.mul_(0.1)
            self.distogram_head.bias.zero_()

    def relative_position(self, residue_index: torch.Tensor) -> torch.Tensor:
        """One-hot of ``clip(ri_j - ri_i, -max_relpos, max_relpos)``: [B,L,L,2*max_relpos+1].

        Uses residue numbers rather than array positions so chain breaks read as gaps.
        """
        ri = residue_index.long()
        offset = (ri[:, None, :] - ri[:, :, None]).clamp(-self.max_relpos, self.max_relpos)
        return one_hot(offset + self.max_relpos, 2 * self.max_relpos + 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        aatype = batch["aatype"].long().clamp(0, NUM_AATYPES - 1)
        mask = batch["mask"].float()
        pair_mask = mask[:, :, None] * mask[:, None, :]

        s = self.aa_embed(one_hot(aatype, NUM_AATYPES)).float()
        z = (
            self.pair_left(s)[:, :, None, :]
            + self.pair_right(s)[:, None, :, :]
            + self.relpos_embed(self.relative_position(batch["residue_index"]))
        ).float()
        for block in self.blocks:
            s, z = block(s, z, mask, pair_mask)

        logits = self.distogram_head(self.distogram_norm(z)).float()
        logits = 0.5 * (logits + logits.transpose(1, 2))  # distances are symmetric
        return {"distogram_logits": logits, "single": s, "pair": z}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters, for logs and preflight size estimates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
