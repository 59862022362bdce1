"""Behaviour of the structure model, its distogram loss and its contact metrics."""

from __future__ import annotations

import math

import pytest
import torch

from foldhpc.config import ModelConfig
from foldhpc.model import (
    StructureModel,
    contact_density,
    contact_precision,
    count_parameters,
    distogram_bins,
    distogram_loss,
    distogram_targets,
    evaluate,
    virtual_cb,
)

TINY = ModelConfig(d_single=32, d_pair=16, n_blocks=1, n_heads=2, n_bins=64, max_relpos=32)

# AlphaFold's ideal alanine backbone in its local frame (residue_constants, rigid group 0).
IDEAL_N = torch.tensor([-0.525, 1.363, 0.0])
IDEAL_C = torch.tensor([1.526, 0.0, 0.0])
IDEAL_CB = torch.tensor([-0.529, -0.774, -1.205])


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def helix_backbone(n: int) -> torch.Tensor:
    """Ideal alpha helix [n, 4, 3] (N, CA, C, O) built from planar trans peptides.

    CA on a helix of radius 2.3 A, rise 1.5 A, 100 deg/residue (CA-CA 3.80 A).  Each peptide
    CA_i-C-N-CA_i+1 has standard geometry (CA-C 1.52, C-N 1.33, N-CA 1.46 A, angles 116/122
    deg, C=O 1.23 A), rotated about the CA-CA axis to the angle that gives N-CA-C ~ 110 deg;
    the virtual CB then points out of the helix and towards the N terminus, as in real helices.
    """
    t = torch.arange(-1, n + 1, dtype=torch.float64)
    theta = torch.deg2rad(100.0 * t)
    ca = torch.stack([2.3 * torch.cos(theta), 2.3 * torch.sin(theta), 1.5 * t], dim=-1)
    step = ca[1:] - ca[:-1]  # one peptide per CA-CA step, n + 1 of them
    x = _unit(step)
    scale = step.norm(dim=-1, keepdim=True) / 3.802  # the local coordinates assume CA-CA 3.802 A
    axis = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(x)
    y0 = _unit(axis - (axis * x).sum(-1, keepdim=True) * x)
    phi = math.radians(195.0)
    y = math.cos(phi) * y0 + math.sin(phi) * torch.linalg.cross(x, y0, dim=-1)
    c_atom = ca[:-1] + scale * (1.421 * x - 0.539 * y)  # peptide-local coordinates of C and N
    n_atom = ca[:-1] + scale * (2.390 * x + 0.372 * y)
    o_atom = c_atom + 1.23 * _unit(-_unit(ca[:-1] - c_atom) - _unit(n_atom - c_atom))
    # residue r owns N of the peptide before it and C, O of the peptide after it
    return torch.stack([n_atom[:-1], ca[1:-1], c_atom[1:], o_atom[1:]], dim=1).float()


def globule_backbone(n: int, generator: torch.Generator, radius: float = 11.0) -> torch.Tensor:
    """Residues scattered in a sphere [n, 4, 3]: compact, so many long-range contacts."""
    direction = _unit(torch.randn(n, 3, generator=generator))
    ca = direction * radius * torch.rand(n, 1, generator=generator) ** (1 / 3)
    rot = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator))[0]  # random frames
    local = torch.stack([IDEAL_N, torch.zeros(3), IDEAL_C, IDEAL_C + torch.tensor([0.6, 1.07, 0.0])])
    return ca[:, None, :] + torch.einsum("nij,aj->nai", rot, local)


def make_batch(coords: list[torch.Tensor], crop: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of [L_i, 4, 3] backbones to ``crop`` the way the data pipeline does."""
    g = torch.Generator().manual_seed(seed)
    b = len(coords)
    batch = {
        "aatype": torch.randint(0, 21, (b, crop), generator=g),
        "residue_index": torch.arange(crop).repeat(b, 1),
        "mask": torch.zeros(b, crop),
        "coords": torch.zeros(b, crop, 4, 3),
        "atom_mask": torch.zeros(b, crop, 4),
        "length": torch.tensor([len(c) for c in coords]),
    }
    for i, xyz in enumerate(coords):
        n = len(xyz)
        batch["mask"][i, :n] = 1.0
        batch["coords"][i, :n] = xyz
        batch["atom_mask"][i, :n] = 1.0
    return batch


def one_hot_truth_logits(batch: dict[str, torch.Tensor], n_bins: int = 64) -> torch.Tensor:
    return 20.0 * torch.nn.functional.one_hot(distogram_targets(batch, n_bins), n_bins).float()


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- model


def test_forward_backward_shapes_and_all_parameters_get_gradients():
    torch.manual_seed(0)
    model = StructureModel(TINY)
    g = torch.Generator().manual_seed(1)
    batch = make_batch([globule_backbone(20, g), globule_backbone(13, g)], crop=24)
    out = model(batch)
    assert out["distogram_logits"].shape == (2, 24, 24, 64)
    assert out["single"].shape == (2, 24, 32)
    assert out["pair"].shape == (2, 24, 24, 16)
    loss, stats = distogram_loss(out["distogram_logits"], batch)
    loss.backward()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert stats["n_pairs"].item() == 20 * 19 + 13 * 12


def test_distogram_logits_symmetric():
    torch.manual_seed(0)
    model = StructureModel(TINY).eval()
    batch = make_batch([globule_backbone(17, torch.Generator().manual_seed(0))], crop=17)
    batch["residue_index"] = torch.tensor([[0, 1, 2, 5, 6, 7, 8, 9, 20, 21, 22, 23, 24, 25, 26, 40, 41]])
    logits = model(batch)["distogram_logits"]
    assert torch.equal(logits, logits.transpose(1, 2))


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = StructureModel(TINY).eval()
    n, extra = 30, 20
    tight = make_batch([helix_backbone(n)], crop=n, seed=3)
    padded = make_batch([helix_backbone(n)], crop=n + extra, seed=4)
    g = torch.Generator().manual_seed(5)
    padded["aatype"][0, :n] = tight["aatype"][0]
    padded["aatype"][0, n:] = torch.randint(0, 21, (extra,), generator=g)  # arbitrary junk
    padded["residue_index"][0, n:] = torch.randint(-50, 200, (extra,), generator=g)
    with torch.no_grad():
        a, b = model(tight), model(padded)
    assert not torch.equal(padded["aatype"][0, n:], torch.zeros(extra, dtype=torch.long))
    torch.testing.assert_close(b["distogram_logits"][:, :n, :n], a["distogram_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["single"][:, :n], a["single"], atol=1e-5, rtol=1e-5)


def test_all_padding_sample_gives_no_nan():
    torch.manual_seed(0)
    model = StructureModel(TINY)
    batch = make_batch([helix_backbone(12), helix_backbone(0)], crop=16)
    out = model(batch)
    assert torch.isfinite(out["distogram_logits"]).all()
    assert torch.isfinite(out["single"]).all() and torch.isfinite(out["pair"]).all()
    loss, stats = distogram_loss(out["distogram_logits"], batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert stats["per_example_pairs"].tolist() == [12 * 11, 0]


def _train(cfg: ModelConfig, batch: dict[str, torch.Tensor], steps: int, lr: float, seed: int = 0) -> tuple[
        StructureModel, list[float]]:
    torch.manual_seed(seed)
    model = StructureModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = distogram_loss(model(batch)["distogram_logits"], batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_tiny_model_overfits_a_helix():
    batch = make_batch([helix_backbone(24), helix_backbone(18)], crop=24)
    _, losses = _train(TINY, batch, steps=100, lr=3e-3)
    assert losses[0] > 3.0  # starts near ln(64) = 4.16
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_training_is_bit_reproducible_under_deterministic_algorithms():
    cfg = ModelConfig(d_single=32, d_pair=16, n_blocks=1, n_heads=2, dropout=0.1)
    batch = make_batch([globule_backbone(16, torch.Generator().manual_seed(0))], crop=20)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, _ = _train(cfg, batch, steps=3, lr=1e-3, seed=7)
        b, _ = _train(cfg, batch, steps=3, lr=1e-3, seed=7)
        c, _ = _train(cfg, batch, steps=3, lr=1e-3, seed=8)
    finally:
        torch.use_deterministic_algorithms(previous)
    pa, pb, pc = (list(m.state_dict().values()) for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))  # the seed matters


# ---------------------------------------------------------------- loss


def test_virtual_cb_matches_ideal_geometry():
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    shift = torch.tensor([3.0, -7.0, 11.0])
    coords = torch.stack([IDEAL_N, torch.zeros(3), IDEAL_C, IDEAL_C]) @ rot.T + shift
    cb = virtual_cb(coords[None, None])[0, 0]
    assert abs((cb - shift).norm().item() - 1.52) < 0.02
    torch.testing.assert_close(cb, IDEAL_CB @ rot.T + shift, atol=0.02, rtol=0)
    # and on the helix every residue gets a proper CB
    helix = helix_backbone(10)
    bond = (virtual_cb(helix) - helix[:, 1]).norm(dim=-1)
    assert torch.allclose(bond, torch.full_like(bond, 1.52), atol=0.05)


def test_distogram_bins_are_alphafolds():
    bins = distogram_bins(64)
    assert bins.shape == (63,)
    assert bins[0].item() == pytest.approx(2.3125) and bins[-1].item() == pytest.approx(21.6875)
    assert torch.allclose(bins.diff(), torch.full((62,), 0.3125))


def test_distogram_loss_rewards_the_true_bin():
    batch = make_batch([helix_backbone(20)], crop=24)
    uniform, _ = distogram_loss(torch.zeros(1, 24, 24, 64), batch)
    assert uniform.item() == pytest.approx(math.log(64), abs=1e-5)
    sharp, stats = distogram_loss(one_hot_truth_logits(batch), batch)
    assert sharp.item() < 0.01 * uniform.item()
    assert stats["accuracy"].item() == 1.0
    wrong = one_hot_truth_logits(batch).roll(7, dims=-1)
    assert distogram_loss(wrong, batch)[0].item() > uniform.item()


def test_distogram_loss_ignores_missing_atoms():
    batch = make_batch([helix_backbone(20)], crop=24)
    logits = torch.randn(1, 24, 24, 64, generator=torch.Generator().manual_seed(0))
    logits = logits + logits.transpose(1, 2)
    batch["atom_mask"][0, 5, 1] = 0.0  # residue 5 has no CA
    loss_a, stats = distogram_loss(logits, batch)
    batch["coords"][0, 5] = torch.tensor(float("nan"))  # whatever its coordinates hold ...
    loss_b, _ = distogram_loss(logits, batch)
    batch["coords"][0, 5] = 1e4
    loss_c, _ = distogram_loss(logits, batch)
    assert loss_a.item() == loss_b.item() == loss_c.item()  # ... the loss does not move
    assert stats["n_pairs"].item() == 19 * 18
    batch["coords"][0, 6] += 3.0  # a present residue does move it
    assert distogram_loss(logits, batch)[0].item() != loss_a.item()


def test_distogram_loss_with_no_valid_pair_is_zero_with_grad():
    batch = make_batch([helix_backbone(0)], crop=8)
    logits = torch.randn(1, 8, 8, 64, requires_grad=True)
    loss, stats = distogram_loss(logits, batch)
    loss.backward()
    assert loss.item() == 0.0 and stats["n_pairs"].item() == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------- metrics


def _globule_batch(n_proteins: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return make_batch([globule_backbone(length, g) for _ in range(n_proteins)], crop=length + 4, seed=seed)


def test_contact_precision_is_one_for_the_true_distogram():
    batch = _globule_batch(4, 64, seed=0)
    density = contact_density(batch)
    assert (density > 0.1).all()  # the test proteins do have long-range contacts
    logits = one_hot_truth_logits(batch)
    assert contact_precision(logits, batch).tolist() == [1.0] * 4
    assert contact_precision(logits, batch, 12, 23, reduction="mean").item() == 1.0
    # a residue that lost its atoms is left out, whatever its coordinates say
    batch["atom_mask"][0, 10] = 0.0
    batch["coords"][0, 10] = 1e4
    assert contact_precision(logits, batch)[0].item() == 1.0
    # the inverted ranking finds none
    assert contact_precision(-logits, batch, reduction="mean").item() == 0.0


def test_contact_precision_of_random_logits_is_the_contact_density():
    batch = _globule_batch(24, 64, seed=1)
    logits = torch.randn(24, 68, 68, 64, generator=torch.Generator().manual_seed(2))
    precision = contact_precision(logits, batch, reduction="mean").item()
    density = contact_density(batch).mean().item()
    assert 0.15 < density < 0.6
    assert abs(precision - density) < 0.08, (precision, density)


def test_contact_precision_nan_without_eligible_pairs():
    batch = make_batch([helix_backbone(10)], crop=12)  # no pair is 24 apart
    out = contact_precision(torch.zeros(1, 12, 12, 64), batch)
    assert math.isnan(out.item())


class _Oracle(torch.nn.Module):
    """Predicts the true distogram: evaluate() must then report perfect precision."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch):
        return {"distogram_logits": self.scale * one_hot_truth_logits(batch)}


def test_evaluate_averages_over_proteins_and_restores_train_mode():
    oracle = _Oracle().train()
    batches = [_globule_batch(2, 64, seed=3), _globule_batch(1, 50, seed=4)]
    out = evaluate(oracle, batches)
    assert oracle.training
    assert out["n_proteins"] == 3
    assert out["precision_long"] == 1.0 and out["precision_medium"] == 1.0
    assert out["distogram_loss"] < 1e-3
    densities = torch.cat([contact_density(b) for b in batches])
    assert out["random_long"] == pytest.approx(densities.mean().item())
    torch.manual_seed(0)
    model = StructureModel(TINY).train()
    out = evaluate(model, batches)
    assert model.training and math.isfinite(out["distogram_loss"])
    assert 0.0 <= out["precision_long"] <= 1.0
