"""Checkpoints at real model scale: ~1 GB of trainer state saved, loaded and resumed, side by side
with torch.save/torch.load and torch.distributed.checkpoint (DCP), against the machine's limits.

State: the ``configs/large.toml`` model (OpenFold-sized trunk, 83.8M parameters) + AdamW after real
training steps (short crop on CPU), i.e. the exact dict the Trainer checkpoints (model, optimizer,
scheduler, scaler, RNG states, counters): 0.94 GiB.

L0  physical limits, same directory: sequential write + fsync of one preallocated buffer of the
    state's size (os.write of 64 MiB pieces; and again in 32 MiB pieces with the disk's writeback
    started after each, as foldhpc's writer does: what the disk allows when it works while the
    file is written), read into a preallocated buffer (page cache warm, as every load
    below), memory copy between preallocated tensors, and fresh allocation + first touch.
L1  durable save and load, interleaved rounds (A B C ... then reversed), medians:
    torch.save + fsync | torch.load(weights_only=True)
    DCP save (sync_files) and async_save (durable = future done; stall = the call) | DCP load
        (in place into a preallocated copy of the state: DCP's own protocol)
    foldhpc sync  = CheckpointManager.save(blocking=True) | foldhpc load = load_latest()
        (finds the newest file, checks every crc32, builds every tensor)
    foldhpc async = save() .. wait() (durable)
    and both loads again, each in a fresh process (what a restart pays: no memory to reuse)
L2  training-thread stall of an async save inside a real training loop: real steps of the model;
    per round one plain step and one step that saves at its start, per mode (foldhpc async, DCP
    async_save, foldhpc sync), each save durable before the next step is timed; stall = step
    with save - median plain step. The foldhpc step calls wait_staged() before optimizer.step()
    exactly as the Trainer does.
L3  restart at scale: ``foldhpc train --config configs/large.toml`` (CPU, crop 16, batch 1) is
    stopped by SIGUSR1 (1 GB checkpoint), then restarted N times: wall time from Popen to the
    ``first_step`` record in events.jsonl, plus the process's own breakdown (status.json ``startup``).

    python benchmarks/bench_checkpoint_scale.py             # README figures (~10 min on 2 cores)
    python benchmarks/bench_checkpoint_scale.py --quick     # smoke test: 4-block model, 1 round
    python benchmarks/bench_checkpoint_scale.py --device cuda   # state on the GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from _common import (REPO, default_out, environment, event_tail, fmt_summary, print_table, read_json, summary,
                     wait_for, write_json)

LARGE = REPO / "configs" / "large.toml"
GOAL_RESTART_S = 10.0
GOAL_STALL_FRAC = 0.05


def tensor_bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def drop(path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        path.rmdir()
    elif path.exists():
        path.unlink()


def trainer(overrides: list[str], device: str) -> Any:
    from foldhpc.config import load_config
    from foldhpc.train.loop import Trainer

    cfg = load_config(LARGE, overrides + [f"train.device={device}"])
    tr = Trainer(cfg)
    tr.timings = {}
    tr._setup()
    return tr


def train_step(tr: Any, before_optimizer_step: Callable[[], None] = lambda: None) -> None:
    from foldhpc.model.loss import distogram_loss

    batch = {k: v.to(tr.device) for k, v in tr.train_batches[tr.step].items()}
    tr.model.train()
    out = tr.model(batch)
    loss, _ = distogram_loss(out["distogram_logits"].float(), batch)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    before_optimizer_step()
    tr.optimizer.step()
    tr.scheduler.step()
    tr.step += 1
    if tr.device.type == "cuda":
        torch.cuda.synchronize()


# ====================================================================== L0
def limits(tmp: Path, nbytes: int, rounds: int) -> dict[str, Any]:
    from foldhpc.checkpoint.fileformat import _start_writeback as start_writeback

    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.fill_(1)
    mv = memoryview(buf.numpy())
    path = tmp / "limits.bin"
    w, wb, r, c, a = [], [], [], [], []
    dst = torch.empty_like(buf)
    dst.fill_(0)
    for i in range(rounds):
        for early in ((False, True) if i % 2 == 0 else (True, False)):
            # early: the disk's writeback started every 32 MiB (as foldhpc's writer does), so
            # the disk works while the rest is written; the fsync at the end is still the commit
            drop(path)
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            step = 32 << 20 if early else 64 << 20
            for off in range(0, nbytes, step):
                os.write(fd, mv[off:off + step])
                if early and start_writeback is not None:
                    start_writeback(fd, off, min(step, nbytes - off))
            os.fsync(fd)
            os.close(fd)
            (wb if early else w).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < nbytes:
                pos += f.readinto(mv[pos:pos + (64 << 20)])
        r.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(buf)
        c.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        fresh.fill_(2)
        a.append(time.perf_counter() - t0)
        del fresh
    drop(path)
    gib = nbytes / 2**30
    res = {"bytes": nbytes, "write_fsync_s": summary(w), "write_early_writeback_fsync_s": summary(wb),
           "read_s": summary(r), "memcpy_s": summary(c), "alloc_touch_s": summary(a)}
    res["write_gibps"] = gib / res["write_fsync_s"]["median"]
    res["write_early_writeback_gibps"] = gib / res["write_early_writeback_fsync_s"]["median"]
    res["read_gibps"] = gib / res["read_s"]["median"]
    res["memcpy_gibps"] = gib / res["memcpy_s"]["median"]
    res["alloc_touch_gibps"] = gib / res["alloc_touch_s"]["median"]
    s = dict(unit="s", digits=3)
    print_table(f"L0 physical limits ({gib:.2f} GiB, same directory)", ["what", "time", "GiB/s"], [
        ["sequential write + fsync", fmt_summary(res["write_fsync_s"], **s), f"{res['write_gibps']:.2f}"],
        ["  same, writeback started every 32 MiB" + ("" if start_writeback else " (n/a: no sync_file_range)"),
         fmt_summary(res["write_early_writeback_fsync_s"], **s), f"{res['write_early_writeback_gibps']:.2f}"],
        ["read (page cache warm)", fmt_summary(res["read_s"], **s), f"{res['read_gibps']:.2f}"],
        ["memory copy", fmt_summary(res["memcpy_s"], **s), f"{res['memcpy_gibps']:.2f}"],
        ["fresh allocation + first touch", fmt_summary(res["alloc_touch_s"], **s), f"{res['alloc_touch_gibps']:.2f}"],
    ])
    return res


# ====================================================================== L1
def save_load(tr: Any, tmp: Path, rounds: int, lim: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from foldhpc.checkpoint import CheckpointManager
    from foldhpc.records.fsio import fsync_dir

    state = tr.state_dict()
    meta = tr.checkpoint_meta()
    nbytes = tensor_bytes(state)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)
    template = copy.deepcopy(state)  # DCP loads in place into preallocated tensors
    t: dict[str, list[float]] = {k: [] for k in (
        "torch_save", "torch_load", "dcp_save", "dcp_async_durable", "dcp_async_call", "dcp_load",
        "foldhpc_sync", "foldhpc_async_durable", "foldhpc_async_call", "foldhpc_load")}
    mgr_dir = tmp / "foldhpc"

    def torch_save() -> None:
        p = tmp / "state.pt"
        drop(p)
        t0 = time.perf_counter()
        with open(p, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        t["torch_save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = torch.load(p, weights_only=True)
        t["torch_load"].append(time.perf_counter() - t0)
        del back

    def dcp_round() -> None:
        for kind in ("sync", "async"):
            d = tmp / f"dcp-{kind}"
            drop(d)
            t0 = time.perf_counter()
            if kind == "sync":
                dcp.save(state, checkpoint_id=str(d))
                t["dcp_save"].append(time.perf_counter() - t0)
            else:
                fut = dcp.async_save(state, checkpoint_id=str(d))
                t["dcp_async_call"].append(time.perf_counter() - t0)
                fut.result()
                t["dcp_async_durable"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dcp.load(template, checkpoint_id=str(tmp / "dcp-sync"))
        t["dcp_load"].append(time.perf_counter() - t0)

    def foldhpc_round() -> None:
        for kind in ("sync", "async"):
            drop(mgr_dir)
            m = CheckpointManager(mgr_dir, keep_last=1, async_save=kind == "async")
            m.preflight(1 << 20)
            t0 = time.perf_counter()
            if kind == "sync":
                m.save(tr.step, state, meta, reason="bench", blocking=True)
                t["foldhpc_sync"].append(time.perf_counter() - t0)
            else:
                m.save(tr.step, tr.state_source(), meta, reason="bench")
                t["foldhpc_async_call"].append(time.perf_counter() - t0)
                m.wait()
                t["foldhpc_async_durable"].append(time.perf_counter() - t0)
                assert m.last_committed is not None and m.poll_error() is None
        t0 = time.perf_counter()
        loaded = CheckpointManager(mgr_dir).load_latest()
        t["foldhpc_load"].append(time.perf_counter() - t0)
        assert loaded is not None and torch.equal(
            loaded.state["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"].cpu())
        del loaded

    order = [torch_save, dcp_round, foldhpc_round]
    for r in range(rounds):
        for fn in order if r % 2 == 0 else order[::-1]:
            fn()
    ck_bytes = sum(p.stat().st_size for p in mgr_dir.glob("step_*.ckpt"))
    # A restart loads in a fresh process (no memory to reuse): the same files, loaded that way.
    fresh = {"torch_load_fresh": [], "foldhpc_load_fresh": []}
    code = {"torch_load_fresh": f"torch.load({str(tmp / 'state.pt')!r}, weights_only=True)",
            "foldhpc_load_fresh": f"CheckpointManager({str(mgr_dir)!r}).load_latest()"}
    for r in range(rounds):
        for k in (list(fresh) if r % 2 == 0 else list(fresh)[::-1]):
            out = subprocess.run([sys.executable, "-c", "import time, torch; from foldhpc.checkpoint import "
                                  f"CheckpointManager; t = time.perf_counter(); {code[k]}; "
                                  "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
            fresh[k].append(float(out.stdout.split()[-1]))
    t.update(fresh)
    for d in ("state.pt", "dcp-sync", "dcp-async", "foldhpc"):
        drop(tmp / d)
    res: dict[str, Any] = {"state_bytes": nbytes, "file_bytes": ck_bytes, "rounds": rounds,
                           **{k: summary(v) for k, v in t.items()}}
    med = {k: res[k]["median"] for k in t}
    res["ratio_save_sync_vs_torch"] = med["foldhpc_sync"] / med["torch_save"]
    res["ratio_save_async_vs_dcp_async"] = med["foldhpc_async_durable"] / med["dcp_async_durable"]
    res["ratio_load_vs_torch"] = med["foldhpc_load"] / med["torch_load"]
    res["ratio_load_fresh_vs_torch"] = med["foldhpc_load_fresh"] / med["torch_load_fresh"]
    gib = nbytes / 2**30

    def frac_w(x: float) -> str:
        return f"{gib / x:.2f} GiB/s = {gib / x / lim['write_gibps']:.0%} of write+fsync"

    def frac_r(x: float) -> str:
        return f"{gib / x:.2f} GiB/s = {gib / x / lim['read_gibps']:.0%} of read"

    res["sync_save_gibps"] = gib / med["foldhpc_sync"]
    res["sync_save_frac_of_write_fsync"] = res["sync_save_gibps"] / lim["write_gibps"]
    res["sync_save_frac_of_early_writeback"] = res["sync_save_gibps"] / lim["write_early_writeback_gibps"]
    s = dict(unit="s", digits=3)
    rows = [
        ["torch.save + fsync", fmt_summary(res["torch_save"], **s), "1.00", frac_w(med["torch_save"])],
        ["DCP save (sync_files)", fmt_summary(res["dcp_save"], **s), f"{med['dcp_save'] / med['torch_save']:.2f}",
         frac_w(med["dcp_save"])],
        ["DCP async_save, durable", fmt_summary(res["dcp_async_durable"], **s),
         f"{med['dcp_async_durable'] / med['torch_save']:.2f}", frac_w(med["dcp_async_durable"])],
        ["foldhpc sync (blocking save)", fmt_summary(res["foldhpc_sync"], **s),
         f"{res['ratio_save_sync_vs_torch']:.2f}", frac_w(med["foldhpc_sync"])],
        ["foldhpc async, durable", fmt_summary(res["foldhpc_async_durable"], **s),
         f"{med['foldhpc_async_durable'] / med['torch_save']:.2f}", frac_w(med["foldhpc_async_durable"])],
        ["torch.load(weights_only=True)", fmt_summary(res["torch_load"], **s), "1.00", frac_r(med["torch_load"])],
        ["DCP load (in place)", fmt_summary(res["dcp_load"], **s), f"{med['dcp_load'] / med['torch_load']:.2f}",
         frac_r(med["dcp_load"])],
        ["foldhpc load_latest (all crc32s checked)", fmt_summary(res["foldhpc_load"], **s),
         f"{res['ratio_load_vs_torch']:.2f}", frac_r(med["foldhpc_load"])],
        ["torch.load, fresh process", fmt_summary(res["torch_load_fresh"], **s), "1.00",
         frac_r(med["torch_load_fresh"])],
        ["foldhpc load_latest, fresh process", fmt_summary(res["foldhpc_load_fresh"], **s),
         f"{res['ratio_load_fresh_vs_torch']:.2f}", frac_r(med["foldhpc_load_fresh"])],
    ]
    print_table(f"L1 durable save / load of the trainer state ({gib:.2f} GiB, file {ck_bytes / 2**30:.2f} GiB, "
                f"{rounds} interleaved rounds)", ["what", "time", "x torch", "throughput"], rows)
    print(f"goals: sync save <= 1.0x torch.save+fsync: {res['ratio_save_sync_vs_torch']:.2f}x; "
          f"async durable <= DCP async: {res['ratio_save_async_vs_dcp_async']:.2f}x; "
          f"load <= 1.0x torch.load: {res['ratio_load_vs_torch']:.2f}x (in this long-lived process), "
          f"{res['ratio_load_fresh_vs_torch']:.2f}x (fresh process, as at a restart)")
    print(f"sync save = {res['sync_save_gibps']:.2f} GiB/s = {res['sync_save_frac_of_write_fsync']:.0%} of write+fsync "
          f"({lim['write_gibps']:.2f} GiB/s, same run; goal >= 80 %); "
          f"{res['sync_save_frac_of_early_writeback']:.0%} of write+fsync with early writeback "
          f"({lim['write_early_writeback_gibps']:.2f} GiB/s)")
    return res


# ====================================================================== L2
def stall_in_loop(tr: Any, tmp: Path, rounds: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from foldhpc.checkpoint import CheckpointManager

    mgrs = {"foldhpc async": CheckpointManager(tmp / "l2-async", keep_last=1, async_save=True),
            "foldhpc sync": CheckpointManager(tmp / "l2-sync", keep_last=1, async_save=False)}
    for m in mgrs.values():
        m.preflight(1 << 20)
    plain: list[float] = []
    with_save: dict[str, list[float]] = {k: [] for k in ("foldhpc async", "DCP async_save", "foldhpc sync")}
    call: dict[str, list[float]] = {k: [] for k in with_save}
    modes = list(with_save)
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            t0 = time.perf_counter()
            train_step(tr)
            plain.append(time.perf_counter() - t0)
            fut = None
            t0 = time.perf_counter()
            if mode == "foldhpc async":
                mgrs[mode].save(tr.step, tr.state_source(), tr.checkpoint_meta(), reason="bench")
                call[mode].append(time.perf_counter() - t0)
                train_step(tr, mgrs[mode].wait_staged)
            elif mode == "foldhpc sync":
                mgrs[mode].save(tr.step, tr.state_source(), tr.checkpoint_meta(), reason="bench", blocking=True)
                call[mode].append(time.perf_counter() - t0)
                train_step(tr)
            else:
                d = tmp / f"l2-dcp-{r}"
                fut = dcp.async_save(tr.state_dict(), checkpoint_id=str(d))
                call[mode].append(time.perf_counter() - t0)
                train_step(tr)
            with_save[mode].append(time.perf_counter() - t0)
            if fut is not None:  # durable before the next timed step (no overlap into it)
                fut.result()
                drop(tmp / f"l2-dcp-{r}")
            for m in mgrs.values():
                m.wait()
    base = summary(plain)["median"]
    res: dict[str, Any] = {"rounds": rounds, "plain_step_s": summary(plain)}
    rows = [["plain step", fmt_summary(summary(plain), unit="s"), "-", "-"]]
    for mode in modes:
        stall = [x - base for x in with_save[mode]]
        res[mode] = {"step_with_save_s": summary(with_save[mode]), "stall_s": summary(stall),
                     "call_s": summary(call[mode])}
        rows.append([f"step with {mode}", fmt_summary(summary(with_save[mode]), unit="s"),
                     fmt_summary(summary(stall), unit="s"), fmt_summary(summary(call[mode]), unit="s")])
    a, d, s = (res[m]["stall_s"]["median"] for m in modes)
    res["stall_async_vs_sync"] = a / s if s > 0 else float("nan")
    res["stall_async_vs_dcp"] = a / d if d > 0 else float("nan")
    print_table(f"L2 training-thread stall per save in a real training loop ({rounds} rounds)",
                ["what", "step time", "stall (step - plain)", "save call"], rows)
    print(f"goals: async stall <= DCP async_save stall: {a:.3f} s vs {d:.3f} s; "
          f"<= 5 % of sync: {res['stall_async_vs_sync']:.1%}")
    return res


# ====================================================================== L3
def restart(tmp: Path, cycles: int, overrides: list[str]) -> dict[str, Any]:
    run = tmp / "l3-run"
    sets = [a for o in [f"run.dir={run}", "train.val_every=0", "checkpoint.interval=0", "run.log_every=1",
                        "train.max_steps=100000", *overrides] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "foldhpc", "train", "--config", str(LARGE), *sets]
    walls, startups = [], []
    tail = event_tail(run)

    def first_steps() -> int:
        tail.poll()
        return len(tail.of_kind("first_step"))

    for cycle in range(cycles + 1):  # cycle 0: the fresh start that writes the first 1 GB checkpoint
        before = first_steps()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ok = wait_for(lambda: first_steps() > before or proc.poll() is not None, 900, 0.01)
        wall = time.perf_counter() - t0
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"L3: trainer did not reach its first step: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=900)
        if rc != 75:
            raise RuntimeError(f"L3: trainer exited {rc}, expected 75: {proc.stderr.read()[-2000:]}")
        st = read_json(run / "status.json") or {}
        if cycle:
            walls.append(wall)
            startups.append(st.get("startup", {}))
    keys = sorted({k for s in startups for k in s})
    res = {"cycles": cycles, "popen_to_first_step_s": summary(walls),
           "breakdown_s": {k: summary([s.get(k, float("nan")) for s in startups]) for k in keys},
           "checkpoint_bytes": max((p.stat().st_size for p in (run / "checkpoints").glob("step_*.ckpt")), default=0)}
    rows = [["Popen -> first resumed step", fmt_summary(res["popen_to_first_step_s"], unit="s")]]
    rows += [[f"  {k}", fmt_summary(v, unit="s")] for k, v in res["breakdown_s"].items()]
    print_table(f"L3 restart with a {res['checkpoint_bytes'] / 2**30:.2f} GiB checkpoint ({cycles} restarts)",
                ["what", "time"], rows)
    print(f"goal: <= {GOAL_RESTART_S:.0f} s: {res['popen_to_first_step_s']['median']:.2f} s")
    drop(run)
    return res


# ====================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 4-block model, one round, one restart")
    ap.add_argument("--device", default="cpu", help="where the model trains: cpu (default) or cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="l0,l1,l2,l3")
    ap.add_argument("--dir", type=Path, default=None, help="checkpoint directory to measure (default: a temp dir "
                    "under the repository, i.e. the same file system as runs/)")
    ap.add_argument("--out", type=Path, default=default_out("bench_checkpoint_scale"))
    args = ap.parse_args()
    os.chdir(REPO)
    torch.manual_seed(0)
    parts = {p.strip().lower() for p in args.parts.split(",") if p.strip()}
    rounds = 1 if args.quick else args.rounds
    small = ["model.n_blocks=4"] if args.quick else []
    crop = ["data.crop_size=16", "train.batch_size=1"] if args.device == "cpu" else ["data.crop_size=64"]
    out: dict[str, Any] = {"mode": "quick" if args.quick else "full", "device": args.device, "env": environment()}
    if args.device.startswith("cuda"):
        out["env"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    base = args.dir or REPO / "bench-out"
    base.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foldhpc-bench-scale-", dir=base) as d:
        tmp = Path(d)
        tr = None
        if parts & {"l0", "l1", "l2"}:
            tr = trainer([f"run.dir={tmp / 'trainer'}", *crop, *small], args.device)
            n_params = sum(p.numel() for p in tr.model.parameters())
            for _ in range(2):
                train_step(tr)  # Adam moments exist: the state has its full size
            nbytes = tensor_bytes(tr.state_dict())
            out["parameters"] = n_params
            out["state_bytes"] = nbytes
            print(f"bench_checkpoint_scale ({out['mode']}, {args.device}): {n_params:,} parameters, trainer state "
                  f"{nbytes / 2**30:.3f} GiB, {len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.2f}")
            lim = limits(tmp, nbytes, rounds)
            out["l0_limits"] = lim
            if "l1" in parts:
                out["l1_save_load"] = save_load(tr, tmp, rounds, lim)
            if "l2" in parts:
                out["l2_stall"] = stall_in_loop(tr, tmp, rounds)
            del tr
        if "l3" in parts and args.device == "cpu":
            out["l3_restart"] = restart(tmp, 1 if args.quick else args.rounds, [*crop, *small, "train.device=cpu"])
    out["elapsed_s"] = time.perf_counter() - t_start
    print(f"\ntotal {out['elapsed_s']:.0f}s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
