"""benchmarks/gpu_check.sh in its CPU mode: the GPU check must not rot while no GPU is around."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the script itself")
def test_gpu_check_runs_in_cpu_mode_and_says_so(tmp_path):
    results = tmp_path / "gpu_check.txt"
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", "") or __import__("sys").executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(results)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    text = results.read_text()
    assert p.returncode == 0, text[-3000:]
    assert "NO CUDA GPU: the CUDA parts are SKIPPED" in text
    assert "L1 durable save / load" in text and "L2 training-thread stall" in text  # the benchmark ran
    assert "SKIPPED" in text and "needs a CUDA GPU" in text  # the CUDA tests were collected and skipped
    assert (tmp_path / "bench_checkpoint_scale_quick.json").is_file()
    assert "3/3 multi-rank: CPU mode" in text and "training completed at step 20" in text  # 2 gloo ranks ran
