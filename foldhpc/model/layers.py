"""Building blocks of the Evoformer-lite trunk (single + pair representations).

Every layer here keeps three promises the rest of the package relies on:

* **Padding never leaks.**  Keys of padded residues get an additive ``-1e9`` bias (their
  softmax weight underflows to exactly 0) and padded residues are multiplied out of every
  sum over a third residue ``k``, so the output at real positions does not depend on how
  much padding follows or what it contains.
* **Numerically safe in reduced precision.**  LayerNorm and softmax run in float32 even
  under ``torch.autocast(..., dtype=torch.bfloat16)``; the residual streams stay float32.
  A fully padded row gets a uniform (finite) softmax instead of NaN.
* **Deterministic and compile-friendly.**  Only matmul/einsum/elementwise ops: no
  scatter, index_add or data-dependent Python control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Additive logit bias for masked keys.  Finite on purpose: ``-inf`` turns a fully
#: masked row into ``nan`` (``-inf - -inf``), a large finite value gives a uniform row.
MASK_BIAS = 1e9


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot encoding by comparison with ``arange``.

    Used instead of :func:`torch.nn.functional.one_hot` because that one checks the maximum
    index on the host (a device sync and a ``torch.compile`` graph break) and is built on
    ``scatter``; out-of-range indices simply give an all-zero row here.
    """
    classes = torch.arange(num_classes, device=index.device)
    return (index.unsqueeze(-1) == classes).to(dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always normalises in float32 and returns the input's dtype.

    Under bf16 autocast the variance of a wide feature vector loses most of its precision;
    computing it in float32 is cheap and keeps the trunk stable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def _init_gate(linear: nn.Linear) -> None:
    """Gates start almost open (AlphaFold: weight 0, bias 1) so early training sees the update."""
    nn.init.zeros_(linear.weight)
    nn.init.ones_(linear.bias)


class Transition(nn.Module):
    """Pre-LN two-layer MLP applied per position (single or pair)."""

    def __init__(self, dim: int, factor: int = 4) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fc1 = nn.Linear(dim, factor * dim)
        self.fc2 = nn.Linear(factor * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(F.relu(self.fc1(self.norm(x))))  # nn.Module.__call__ is typed Any
        return out


class AttentionWithPairBias(nn.Module):
    """Gated multi-head self-attention over residues, biased by the pair representation.

    The pair bias is how geometry hypotheses in ``z`` steer which residues talk to each
    other in ``s`` (AlphaFold's row attention with pair bias, here on the single rep).
    """

    def __init__(self, d_single: int, d_pair: int, n_heads: int) -> None:
        super().__init__()
        if d_single % n_heads:
            raise ValueError(f"d_single={d_single} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_single // n_heads
        self.norm_s = LayerNorm(d_single)
        self.norm_z = LayerNorm(d_pair)
        self.qkv = nn.Linear(d_single, 3 * d_single, bias=False)
        self.pair_bias = nn.Linear(d_pair, n_heads, bias=False)
        self.gate = nn.Linear(d_single, d_single)
        self.out = nn.Linear(d_single, d_single)
        _init_gate(self.gate)

    def forward(self, s: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``s`` [B,L,Ds], ``z`` [B,L,L,Dz], ``mask`` [B,L] (1 real, 0 padding) -> update [B,L,Ds]."""
        b, n, _ = s.shape
        x = self.norm_s(s)
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        logits = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.d_head))
        logits = logits + self.pair_bias(self.norm_z(z)).float().permute(0, 3, 1, 2)
        key_bias = (mask.float() - 1.0) * MASK_BIAS  # 0 for real keys, -1e9 for padding
        logits = logits + key_bias[:, None, None, :]
        weights = torch.softmax(logits, dim=-1).to(v.dtype)
        o = torch.matmul(weights, v).transpose(1, 2).reshape(b, n, self.n_heads * self.d_head)
        out: torch.Tensor = self.out(o * torch.sigmoid(self.gate(x)))  # nn.Module.__call__ is typed Any
        return out


class OuterProductUpdate(nn.Module):
    """Single -> pair update: ``z_ij += W (a_i outer b_j) + bias``.

    With a single sequence this is AlphaFold's outer-product-mean over one row.  The
    contraction is factorised (``a_i`` is multiplied into ``W`` first) so the ``[L, L, c*c]``
    outer-product tensor is never materialised: O(L^2 c Dz) work instead of O(L^2 c^2 Dz).
    """

    def __init__(self, d_single: int, d_pair: int, d_hidden: int) -> None:
        super().__init__()
        self.norm = LayerNorm(d_single)
        self.proj_a = nn.Linear(d_single, d_hidden)
        self.proj_b = nn.Linear(d_single, d_hidden)
        self.weight = nn.Parameter(torch.empty(d_hidden, d_hidden, d_pair))
        self.bias = nn.Parameter(torch.zeros(d_pair))
        bound = 1.0 / d_hidden  # nn.Linear's default bound 1/sqrt(fan_in), fan_in = d_hidden**2
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``s`` [B,L,Ds], ``mask`` [B,L] -> pair update [B,L,L,Dz]."""
        x = self.norm(s)
        m = mask.to(x.dtype).unsqueeze(-1)
        a = self.proj_a(x) * m
        b = self.proj_b(x) * m
        aw = torch.einsum("bic,cde->bide", a, self.weight.to(a.dtype))
        return torch.einsum("bide,bjd->bije", aw, b) + self.bias.to(aw.dtype)


class TriangleMultiplication(nn.Module):
    """Triangle multiplicative update (AlphaFold algorithms 11 and 12).

    Outgoing: ``x_ij = sum_k a_ik b_jk``; incoming: ``x_ij = sum_k a_ki b_kj``.  The edge
    i-j is updated from the two other edges of every triangle (i, j, k), which is what lets
    the pair rep become consistent with a 3-D geometry.  ``a`` and ``b`` are multiplied by
    the pair mask, so a padded ``k`` contributes an exact zero to the sum.
    """

    def __init__(self, d_pair: int, d_hidden: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        self.norm_in = LayerNorm(d_pair)
        self.proj = nn.Linear(d_pair, 2 * d_hidden)
        self.proj_gate = nn.Linear(d_pair, 2 * d_hidden)
        self.norm_out = LayerNorm(d_hidden)
        self.out = nn.Linear(d_hidden, d_pair)
        self.gate = nn.Linear(d_pair, d_pair)
        _init_gate(self.proj_gate)
        _init_gate(self.gate)

    def forward(self, z: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """``z`` [B,L,L,Dz], ``pair_mask`` [B,L,L] -> update [B,L,L,Dz]."""
        x = self.norm_in(z)
        ab = self.proj(x) * torch.sigmoid(self.proj_gate(x)) * pair_mask.to(x.dtype).unsqueeze(-1)
        a, b = ab.permute(0, 3, 1, 2).chunk(2, dim=1)  # each [B,C,L,L]
        if self.outgoing:  # Python constant fixed at construction: no graph break
            t = torch.matmul(a, b.transpose(-1, -2))
        else:
            t = torch.matmul(a.transpose(-1, -2), b)
        t = t.permute(0, 2, 3, 1)
        out: torch.Tensor = torch.sigmoid(self.gate(x)) * self.out(self.norm_out(t))  # Module.__call__: Any
        return out
