"""The benchmarks' small modes run end to end, so the scripts cannot rot (they are not timed)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def run_bench(*args: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_step_tiny_runs_the_gradient_cache_path_on_cpu():
    out = run_bench("bench/gpu_step.py", "--tiny")
    result = json.loads(out[out.index("{") :])
    assert result["chunks"] > 1  # one device: the tiny step really goes through the cache
    assert result["real_tokens_per_s"] > 0 and 0 < result["utilisation"] <= 1
    assert result["last_loss"] > 0


def test_pipeline_scale_quick_reports_each_size():
    out = run_bench("bench/pipeline_scale.py", "--quick")
    assert "1,000" in out or "1000" in out
    assert "queries/s" in out
