"""fair-esm's ESM-2, randomly initialised, trained on the contact maps of examples/data, as a [task].

    pip install 'foldhpc[esm]'
    foldhpc train --config examples/esm_contacts.toml        # or submit / --supervise / chaos

Nothing here knows about checkpoints, signals or restarts: foldhpc's Session does. What makes a
resume bit-exact is only this: the batch of a step comes from ``StepBatches`` (a function of
``train.seed`` and the step), and the random crops come from torch's global generator, whose
state the session saves with every checkpoint.
"""

from __future__ import annotations

import esm
import torch
import torch.nn.functional as F

import foldhpc
from foldhpc.data import ProteinChain, load_dataset, split_by_sequence

CONTACT_A = 8.0  # Cβ-Cβ distance of a contact, in Å
MIN_SEP = 6  # |i-j| below this is trivially close: not trained on
LONG_RANGE = 24  # |i-j| of a long-range contact (evaluation)


def contacts(chain: ProteinChain, start: int, length: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The crop's sequence, its Cβ<8 Å contact map, and the mask of residue pairs it is known for."""
    xyz = torch.tensor(chain.coords[start:start + length], dtype=torch.float64)
    n, ca, c = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    b, cc = ca - n, c - ca  # a virtual Cβ from the backbone (ideal geometry)
    cb = -0.58273431 * torch.cross(b, cc, dim=-1) + 0.56802827 * b - 0.54067466 * cc + ca
    known = torch.from_numpy(chain.atom_mask[start:start + length, :3].all(axis=1))
    i = torch.arange(len(cb))
    pair_ok = known[:, None] & known[None, :] & ((i[:, None] - i[None, :]).abs() >= MIN_SEP)
    return chain.sequence[start:start + length], (torch.cdist(cb, cb) < CONTACT_A).float(), pair_ok


def build(cfg: foldhpc.Config) -> foldhpc.Task:
    p = cfg.task.params
    crop, batch_size = int(p["crop"]), int(p["batch_size"])
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=p["layers"], embed_dim=p["embed_dim"], attention_heads=p["heads"],
                                alphabet=alphabet, token_dropout=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    train_chains, val_chains = split_by_sequence(load_dataset(cfg.data, progress=False).records,
                                                 cfg.data.val_fraction, cfg.data.split_seed)
    batches = foldhpc.StepBatches(train_chains, batch_size, cfg.train.seed, collate_fn=list)
    to_tokens = alphabet.get_batch_converter()

    def loss_and_probs(crops: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, tokens = to_tokens([("", seq) for seq, _, _ in crops])
        probs = model(tokens, return_contacts=True)["contacts"]  # [B, L, L]
        target, mask = torch.zeros_like(probs), torch.zeros_like(probs, dtype=torch.bool)
        for k, (_, t, m) in enumerate(crops):
            target[k, :len(t), :len(t)], mask[k, :len(t), :len(t)] = t, m
        return F.binary_cross_entropy(probs[mask].clamp(1e-6, 1 - 1e-6), target[mask]), probs

    def step(run: foldhpc.Session, step: int) -> dict[str, float]:
        crops = [contacts(ch, int(torch.randint(max(1, len(ch) - crop + 1), ())), crop) for ch in batches[step]]
        loss, _ = loss_and_probs(crops)
        opt.zero_grad()
        loss.backward()
        run.wait_staged()  # a background save may still be reading the weights
        if run.check_finite(loss):  # a NaN/inf loss: the update is skipped (rolled back after several)
            opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Top-L/5 long-range (|i-j| >= 24) contact precision and the loss on the held-out chains (centre crops)."""
        hits = total = 0
        losses = []
        for ch in val_chains:
            n = min(len(ch), int(p["eval_crop"]))
            seq, target, known = contacts(ch, (len(ch) - n) // 2, n)
            loss, probs = loss_and_probs([(seq, target, known)])
            losses.append(loss.item())
            i = torch.arange(n)
            ok = known & ((i[:, None] - i[None, :]) >= LONG_RANGE)  # i > j: each pair once
            top = probs[0][ok].topk(min(max(1, n // 5), int(ok.sum()))).indices
            hits, total = hits + int(target[ok][top].sum()), total + len(top)
        return {"top_l5_long_range_precision": hits / max(total, 1), "val_loss": sum(losses) / len(losses),
                "val_chains": float(len(val_chains))}

    return foldhpc.Task(states={"model": model, "optimizer": opt}, step=step, evaluate=evaluate)
