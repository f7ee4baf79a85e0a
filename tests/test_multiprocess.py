"""Multi-host training emulated on CPU: 2 processes x 2 devices (launch/local_multiprocess.sh)
against 1 process x 4 devices on the same config and data.

The runs are independent, so the module fixture starts them all at once (the 2-process job spends
much of its time waiting on its peer) and the tests check their outputs.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
STEPS = 4
TIMEOUT = 300
STOP_TIMEOUT = 120  # a stopped job saves and exits in seconds; a hung one waits for JAX timeouts
PROGRESS_BAR = re.compile(r"train:\s+\d+%\|")  # tqdm's, not the "jax_iclemb.train:" logger

# The tests' small variant of configs/tiny.py; only the process layout differs between runs.
# Rows of 128 or 64 tokens, and at most one example a query: with this seed, steps 2 and 4
# fit 64 in one process's half only, step 3 in both, so the processes must agree on a length.
TRAIN_ARGS = ["--config", str(REPO / "configs" / "tiny.py"), *TINY_OVERRIDES,
              "--config.data.min_pack_len=64", "--config.data.max_examples=1", "--config.seed=6"]


def single_process(workdir: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return subprocess.Popen(
        [sys.executable, "-m", "jax_iclemb.train", *TRAIN_ARGS, "--workdir", str(workdir),
         *overrides],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def two_processes(
    workdir: Path, logs: Path, *overrides: str, emulate: str = "explicit"
) -> subprocess.Popen:
    """2 processes x 2 CPU devices, started as the explicit-coordinator launcher or as a 2-task
    srun step on one node would start them (`EMULATE`, launch/local_multiprocess.sh)."""
    env = dict(
        os.environ, PYTHON=sys.executable, LOG_DIR=str(logs), KILL_AFTER="10", EMULATE=emulate,
        WANDB_MODE="offline",  # for the run that logs to W&B
    )
    return subprocess.Popen(
        [str(LAUNCHER), "2", "2", "--", *TRAIN_ARGS, "--workdir", str(workdir), *overrides],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    """(exit status, output); a job still running after `timeout` is killed and reported as -9."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -9, output
    return proc.returncode, output


def records(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(workdir)}


def checkpoint_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def child_with_process_id(parent: int, process_id: int) -> int:
    """The pid of the launcher's child that runs JAX process `process_id` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if ppid == parent and f"JAX_PROCESS_ID={process_id}".encode() in environ:
            return int(stat.parent.name)
    raise LookupError(f"no child of {parent} runs JAX process {process_id}")


def signal_one_process(launcher: subprocess.Popen, workdir: Path, logged: int) -> int:
    """SIGTERM to JAX process 1 alone once `logged` steps are in metrics.jsonl; returns its pid."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while launcher.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= logged:
            pid = child_with_process_id(launcher.pid, 1)
            os.kill(pid, signal.SIGTERM)
            return pid
        time.sleep(0.05)
    raise AssertionError(f"the 2-process run never logged {logged} steps")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    paths = {name: root / name for name in ("single", "multi", "slurm", "signalled")}
    procs = {
        "single": single_process(
            paths["single"], f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=100"
        ),
        "multi": two_processes(
            paths["multi"], root / "multi-logs", f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5",
            "--config.log.wandb=True",
        ),
        "slurm": two_processes(
            paths["slurm"], root / "slurm-logs", f"--config.train.steps={STEPS}",
            "--config.train.checkpoint_every=100", emulate="slurm",
        ),
        # Runs until stopped: only JAX process 1 gets the SIGTERM (as when one host of a pod is
        # preempted); the job must still stop at one step and save it.
        "signalled": two_processes(
            paths["signalled"], root / "signalled-logs", "--config.train.steps=100000",
            "--config.train.checkpoint_every=100000",
        ),
    }
    try:
        signal_one_process(procs["signalled"], paths["signalled"], logged=2)
        results = {
            name: finish(proc, STOP_TIMEOUT if name == "signalled" else TIMEOUT)
            for name, proc in procs.items()
        }
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for name in ("multi", "slurm", "signalled"):
        paths[f"{name}-logs"] = root / f"{name}-logs"
    return paths, results


def assert_ok(results: dict, name: str) -> None:
    rc, output = results[name]
    assert rc == 0, f"{name} run exited with {rc}:\n{output[-4000:]}"


def test_two_processes_match_one_process(runs):
    paths, results = runs
    assert_ok(results, "single")
    assert_ok(results, "multi")
    one, two = losses(paths["single"]), losses(paths["multi"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    steps = sorted(one)
    # Same batches and parameters; only the order of reductions may differ.
    np.testing.assert_allclose([two[s] for s in steps], [one[s] for s in steps], rtol=1e-5)
    # The same row length each step: the shortest that holds the sequences of both halves.
    lengths = [r["row_length"] for r in records(paths["single"])]
    assert [r["row_length"] for r in records(paths["multi"])] == lengths
    assert lengths == [128, 128, 64, 128]


@pytest.mark.parametrize("launcher", ["multi", "slurm"])
def test_every_process_starts_with_all_its_local_devices(runs, launcher):
    paths, results = runs
    assert_ok(results, launcher)
    name = "explicit" if launcher == "multi" else "slurm"
    for i in range(2):
        log = (paths[f"{launcher}-logs"] / f"proc-{i}.log").read_text()
        assert f"{name}: 2 processes x 2 local devices (this is process {i}; 4 devices" in log


def test_slurm_step_matches_one_process(runs):
    """The SLURM path (JAX's own detection from the variables of a 2-task srun, through
    launch/gpu_single_host.sh with JAX_LOCAL_DEVICE_IDS=0,1) trains as 1 process does."""
    paths, results = runs
    assert_ok(results, "single")
    assert_ok(results, "slurm")
    one, slurm = losses(paths["single"]), losses(paths["slurm"])
    assert sorted(slurm) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([slurm[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                               rtol=1e-5)
    assert "JAX_LOCAL_DEVICE_IDS=0,1" in (paths["slurm-logs"] / "proc-1.log").read_text()


def test_only_process_zero_writes_metrics_logs_and_config(runs):
    paths, results = runs
    assert_ok(results, "multi")
    workdir = paths["multi"]
    assert [r["step"] for r in records(workdir)] == list(range(1, STEPS + 1))  # each step once
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
    assert len(list((workdir / "tensorboard").iterdir())) == 1  # one event file, not one per host
    assert len(list((workdir / "wandb").glob("offline-run-*"))) == 1  # one W&B run, process 0's
    assert (workdir / "tokenizer").is_dir()
    # The progress bar is process 0's alone; process 1 only logs.
    assert PROGRESS_BAR.search((paths["multi-logs"] / "proc-0.log").read_text())
    assert not PROGRESS_BAR.search((paths["multi-logs"] / "proc-1.log").read_text())
    assert "wandb:" not in (paths["multi-logs"] / "proc-1.log").read_text()
    assert checkpoint_steps(workdir) == [2, 4]


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    paths, results = runs
    assert_ok(results, "single")
    assert_ok(results, "multi")
    # A fresh workdir holding only the 2-process run's step-2 checkpoint.
    shutil.copytree(paths["multi"] / "checkpoints" / "2", tmp_path / "checkpoints" / "2")
    rc, output = finish(single_process(
        tmp_path, f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=100"
    ))
    assert rc == 0, output[-4000:]
    resumed, reference = losses(tmp_path), losses(paths["single"])
    assert sorted(resumed) == [3, 4]  # it started from the checkpoint, not from scratch
    np.testing.assert_allclose(
        [resumed[s] for s in (3, 4)], [reference[s] for s in (3, 4)], rtol=1e-5
    )


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(runs):
    paths, results = runs
    assert_ok(results, "signalled")
    workdir = paths["signalled"]
    steps = [r["step"] for r in records(workdir)]
    assert steps == list(range(1, len(steps) + 1))
    assert checkpoint_steps(workdir) == [steps[-1]]  # the stop was saved, at the last logged step
    for i in (0, 1):
        assert "stopped by signal" in (paths["signalled-logs"] / f"proc-{i}.log").read_text()
