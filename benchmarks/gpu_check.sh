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
  say "1/2 checkpoint benchmark, large model, state on the GPU"
  timeout 300 "$PY" benchmarks/bench_checkpoint_scale.py --device cuda --parts l0,l1,l2 --rounds 3 \
    --out "$(dirname "$RESULTS")/bench_checkpoint_scale_cuda.json" || { say "benchmark FAILED ($?)"; rc=1; }
  say "2/2 CUDA tests"
  timeout 240 "$PY" -m pytest tests/test_cuda.py -v -p no:cacheprovider -o addopts="" --timeout 200 || { say "CUDA tests FAILED"; rc=1; }
else
  say "1/2 checkpoint benchmark, CPU smoke mode (--quick)"
  timeout 300 "$PY" benchmarks/bench_checkpoint_scale.py --quick --parts l0,l1,l2 \
    --out "$(dirname "$RESULTS")/bench_checkpoint_scale_quick.json" || { say "benchmark FAILED ($?)"; rc=1; }
  say "2/2 CUDA tests (all skipped without a GPU)"
  timeout 120 "$PY" -m pytest tests/test_cuda.py -v -rs -p no:cacheprovider -o addopts="" || { r=$?; [ $r = 5 ] || rc=1; }
fi
say "done, exit $rc; results in $RESULTS"
return $rc
}

main 2>&1 | tee "$RESULTS"
exit "${PIPESTATUS[0]}"
