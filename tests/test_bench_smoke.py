"""The benchmarks' small modes run end to end, so the scripts cannot rot (they are not timed)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def run_bench(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def test_gpu_step_smoke_measures_each_attention_into_a_report(tmp_path):
    out = run_bench("bench/gpu_step.py", "--smoke", "--report", str(tmp_path)).stdout
    results = json.loads((tmp_path / "gpu_step.json").read_text())
    assert [r["attention"] for r in results] == ["block_sparse", "xla"]
    for r in results:
        assert r["status"] == "ok", r
        assert r["chunks"] > 1  # one device: the step really goes through the gradient cache
        assert r["real_tokens_per_s"] > 0 and 0 < r["utilisation"] <= 1
        assert r["compile_s"] > 0 and r["step_s"] > 0 and r["device"] == "1 x cpu"
    # The same batches and weights: the two attentions train the same function.
    assert abs(results[0]["last_loss"] - results[1]["last_loss"]) < 1e-4 * results[1]["last_loss"]
    table = (tmp_path / "gpu_step.md").read_text()
    assert table in out and "| block_sparse | ok |" in table and "| xla | ok |" in table


def test_gpu_step_reports_a_failed_and_an_overrunning_attention(tmp_path):
    """cuDNN cannot run on CPU; a compile given one second is killed. The run fails, the report
    says why for each."""
    run_bench(
        "bench/gpu_step.py", "--smoke", "--attention", "cudnn", "--report", str(tmp_path / "a"),
        ok=False,
    )
    run_bench(
        "bench/gpu_step.py", "--smoke", "--attention", "xla", "--compile-timeout", "1",
        "--report", str(tmp_path / "b"), ok=False,
    )
    (failed,) = json.loads((tmp_path / "a" / "gpu_step.json").read_text())
    (killed,) = json.loads((tmp_path / "b" / "gpu_step.json").read_text())
    assert failed["status"].startswith("failed: RuntimeError") and "cuDNN" in failed["status"]
    assert killed["status"] == "compile not done in 1 s: killed"
    table = (tmp_path / "b" / "gpu_step.md").read_text()
    assert "| xla | compile not done in 1 s: killed | – |" in table


def test_profile_step_profiles_the_trainers_step_on_its_devices():
    """Without XLA_FLAGS the profiler splits the CPU as the train command does (two devices,
    cores permitting), and attributes the traced op time to the model's functions."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "bench/profile_step.py", "--config", "configs/tiny.py", "--step", "1",
         "--config.model.arch.num_hidden_layers=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    devices = min(2, len(os.sched_getaffinity(0)))
    assert f"on {devices} cpu device(s):" in result.stdout
    tables = [
        [float(line.split("%")[0].strip("| ")) for line in block.splitlines()
         if line.startswith("| ") and "%" in line]
        for block in result.stdout.split("\n\n")
    ]
    tables = [shares for shares in tables if shares]
    assert len(tables) == 2  # by function, by XLA op kind
    for shares in tables:  # largest first; a small op's share may print as 0.0%
        assert shares[0] > 0 and all(0 <= s <= 100 for s in shares)
        assert shares == sorted(shares, reverse=True) and sum(shares) <= 100 + 0.05 * len(shares)
    assert "lora.py" in result.stdout  # the projections' matmuls, found behind their ops


def test_pipeline_scale_quick_reports_each_size():
    out = run_bench("bench/pipeline_scale.py", "--quick").stdout
    assert "1,000" in out or "1000" in out
    assert "queries/s" in out
