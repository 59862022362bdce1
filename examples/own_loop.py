"""Your own model and loop, with foldhpc's checkpoints, signals and exact resume around it.

    python examples/own_loop.py RUN_DIR [STEPS] [CONFIG.toml]

Run it again after an interruption (Ctrl-C excepted: SIGUSR1/SIGTERM save and exit 75, a kill
loses at most the steps since the last checkpoint) and it continues where it left off, bit for bit.
"""

import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import foldhpc


def dataset() -> TensorDataset:
    """Any map-style dataset (len() and ds[i]); here 4096 random points and their labels."""
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x[:, :4].sum(dim=1, keepdim=True) > 0).float())


def main(run_dir: str, total: int, config: str | None) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    states = {"model": model, "optimizer": opt, "scheduler": sched}
    with foldhpc.Session(run_dir, states=states, config=config) as run:
        batches = run.batches(dataset(), batch_size=64)  # batches[step]: a function of (train.seed, step)
        for step in run.steps(total):
            x, y = batches[step]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            run.wait_staged()  # a background save may still be reading the weights
            opt.step()
            sched.step()
            if (step + 1) % 100 == 0:
                run.log_scalars(step + 1, {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
    return run.exit_code


if __name__ == "__main__":
    args = sys.argv[1:]
    if not 1 <= len(args) <= 3:
        sys.exit(__doc__)
    sys.exit(main(args[0], int(args[1]) if len(args) > 1 else 1000, args[2] if len(args) > 2 else None))
