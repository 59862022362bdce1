#!/usr/bin/env bash
# One-shot GPU check: everything foldhpc does on CUDA that CPU-only CI cannot check, in < 8 min.
#
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]     (default: $OUT/gpu_check.txt, else bench-out/gpu_check.txt)
#
# On a machine with a CUDA GPU it
#   1. prints the machine (nvidia-smi, torch, CUDA),
#   2. runs the checkpoint benchmark at `configs/large.toml` scale with the state on the GPU
#      (bench_checkpoint_scale.py --device cuda: limits, save/load vs torch.save/torch.load and DCP,
#      async stall in a real GPU training loop),
#   3. runs the CUDA tests (tests/test_cuda.py: bit-exact resume with deterministic algorithms, with
#      bf16 autocast and with torch.compile; a signal during an async save; pinned staging),
#   4. trains with one rank per GPU over NCCL (`foldhpc train --nproc NGPU`) where there are >= 2 GPUs,
#      or checks NCCL itself with one GPU,
# and writes everything to one results file. Without a GPU it says so, skips the CUDA parts and runs
# the same plumbing on the CPU (the benchmark in --quick mode), so the script cannot rot: CI runs
# that mode (tests/test_gpu_check.py).
#
# The lent GPU machine has no network and lacks submitit and biopython: carry wheels for its Python
# in .wheels/ (git-ignored), e.g. on this machine
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .wheels submitit biopython
# and this script installs them from there (--no-index) if they are missing. foldhpc itself is used
# from the working tree (PYTHONPATH), not installed: no build step, no network.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RESULTS=${1:-${OUT:+$OUT/gpu_check.txt}}
RESULTS=${RESULTS:-$REPO/bench-out/gpu_check.txt}
mkdir -p "$(dirname "$RESULTS")"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
say() { echo "== gpu_check [$(( $(date +%s) - t0 ))s] $*"; }

main() {

say "foldhpc $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname), $(date -Is)"
if ! "$PY" -c "import submitit, Bio" 2>/dev/null; then
  if [ -d .wheels ]; then
    say "installing submitit/biopython from .wheels (offline)"
    "$PY" -m pip install -q --no-index --find-links .wheels submitit biopython || say "WARNING: wheel install failed"
  else
    say "WARNING: submitit/biopython missing and no .wheels/ to install them from"
  fi
fi
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "| CUDA available:", torch.cuda.is_available(),
      "| CUDA", torch.version.cuda, "| GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PYEOF
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  CUDA=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
  CUDA=0
  say "NO CUDA GPU: the CUDA parts are SKIPPED; running the CPU mode (plumbing check only, no GPU figures)"
fi

rc=0
if [ "$CUDA" = 1 ]; then
  say "1/3 checkpoint benchmark, large model, state on the GPU"
  timeout 300 "$PY" benchmarks/bench_checkpoint_scale.py --device cuda --parts l0,l1,l2 --rounds 3 \
    --out "$(dirname "$RESULTS")/bench_checkpoint_scale_cuda.json" || { say "benchmark FAILED ($?)"; rc=1; }
  say "2/3 CUDA tests"
  timeout 240 "$PY" -m pytest tests/test_cuda.py -v -p no:cacheprovider -o addopts="" --timeout 200 || { say "CUDA tests FAILED"; rc=1; }
else
  say "1/3 checkpoint benchmark, CPU smoke mode (--quick)"
  timeout 300 "$PY" benchmarks/bench_checkpoint_scale.py --quick --parts l0,l1,l2 \
    --out "$(dirname "$RESULTS")/bench_checkpoint_scale_quick.json" || { say "benchmark FAILED ($?)"; rc=1; }
  say "2/3 CUDA tests (all skipped without a GPU)"
  timeout 120 "$PY" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider -o addopts="" || { r=$?; [ $r = 5 ] || rc=1; }
fi
# 3. several ranks: NCCL across the machine's GPUs (gloo ranks on the CPU without a GPU)
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
MR_RUN=$(mktemp -d "${TMPDIR:-/tmp}/foldhpc-gpucheck-mr.XXXXXX")
if [ "$NGPU" -ge 2 ]; then
  say "3/3 multi-rank: foldhpc train --nproc $NGPU, NCCL, configs/gpu.toml, 60 steps"
  timeout 300 "$PY" -m foldhpc train --config configs/gpu.toml --nproc "$NGPU" --set run.dir="$MR_RUN" \
    --set distributed.backend=nccl --set train.max_steps=60 --set run.log_every=20 --set train.val_every=0 \
    --set train.batch_size=$((4 * NGPU)) || { say "multi-rank NCCL run FAILED"; rc=1; }
elif [ "$NGPU" = 1 ]; then
  say "3/3 multi-rank: one GPU only, so no NCCL between ranks; NCCL world-size-1 all-reduce smoke"
  MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 timeout 120 "$PY" -c "
import torch, torch.distributed as d
d.init_process_group('nccl', rank=0, world_size=1)
x = torch.ones(4, device='cuda'); d.all_reduce(x); torch.cuda.synchronize()
print('NCCL', torch.cuda.nccl.version(), 'all_reduce ok:', x.tolist()); d.destroy_process_group()" ||
    { say "NCCL smoke FAILED"; rc=1; }
else
  say "3/3 multi-rank: CPU mode, foldhpc train --nproc 2 (gloo), tiny config"
  timeout 300 "$PY" -m foldhpc train --config configs/tiny.toml --nproc 2 --set run.dir="$MR_RUN" \
    --set train.batch_size=4 --set train.max_steps=20 || { say "multi-rank gloo run FAILED"; rc=1; }
fi
rm -rf "$MR_RUN"
say "done, exit $rc; results in $RESULTS"
return $rc
}

main 2>&1 | tee "$RESULTS"
exit "${PIPESTATUS[0]}"
