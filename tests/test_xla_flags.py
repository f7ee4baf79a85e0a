"""The XLA flags the train command chooses: set before JAX's backend starts, never over the
user's own XLA_FLAGS, and only by the command (a caller of `main` in-process keeps its own)."""

import os
import sys
from pathlib import Path

import pytest

from jax_iclemb import train, xla_flags
from jax_iclemb.errors import ReportedError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
FLAG = "--xla_gpu_enable_triton_gemm"


def test_set_default_appends_a_flag_the_environment_does_not_set():
    env = {}
    assert xla_flags.set_default("xla_a", "false", env)
    assert env == {"XLA_FLAGS": "--xla_a=false"}
    env = {"XLA_FLAGS": "--xla_b=1  --xla_ab=2"}  # a longer name sharing the prefix is another
    assert xla_flags.set_default("xla_a", "false", env)
    assert env["XLA_FLAGS"] == "--xla_b=1 --xla_ab=2 --xla_a=false"


@pytest.mark.parametrize("given", ["--xla_a=true", "--xla_b=1 --xla_a"])
def test_set_default_keeps_the_users_setting(given):
    env = {"XLA_FLAGS": given}
    assert not xla_flags.set_default("xla_a", "false", env)
    assert env == {"XLA_FLAGS": given}


def flags_seen_by_the_job(monkeypatch, before: str | None, *overrides: str) -> list[str]:
    """XLA_FLAGS as the train command leaves them when its job starts, given `before` in the
    environment."""
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    seen = []

    def stop(*_):  # the job (and JAX's backend) would start here
        seen.append(os.environ.get("XLA_FLAGS"))
        raise ReportedError("stopped")

    monkeypatch.setattr(train.distributed, "initialize", stop)
    argv = ["--config", TINY, *overrides]
    monkeypatch.setattr(sys, "argv", ["jax_iclemb.train", *argv])
    assert train.script() == 1
    monkeypatch.setenv("XLA_FLAGS", "--xla_b=1")
    assert train.main(argv) == 1  # in-process: the caller's XLA_FLAGS stay as they are
    assert seen[1:] == ["--xla_b=1"]
    return seen[0].split()


@pytest.mark.parametrize(
    ("triton", "before", "expected"),
    [
        (False, None, f"{FLAG}=false"),
        (True, None, f"{FLAG}=true"),
        (False, "--xla_b=1", f"{FLAG}=false"),
        (False, f"{FLAG}=true", f"{FLAG}=true"),  # the user's choice stands
    ],
)
def test_the_train_command_sets_triton_gemm_before_jax_starts(
    monkeypatch, triton, before, expected
):
    flags = flags_seen_by_the_job(monkeypatch, before, f"--config.train.gpu_triton_gemm={triton}")
    assert [f for f in flags if f.startswith(FLAG)] == [expected]
    assert set((before or "").split()) <= set(flags)


DEVICES = "--xla_force_host_platform_device_count"


@pytest.mark.parametrize(
    ("configured", "before", "expected"),
    [
        (None, None, min(2, len(os.sched_getaffinity(0)))),  # the default: 2, cores permitting
        (1, None, 1),
        (64, None, len(os.sched_getaffinity(0))),  # at most one per usable core
        (None, f"{DEVICES}=3", 3),  # the user's choice stands
    ],
)
def test_the_train_command_splits_the_cpu_into_devices(monkeypatch, configured, before, expected):
    overrides = [] if configured is None else [f"--config.train.cpu_devices={configured}"]
    flags = flags_seen_by_the_job(monkeypatch, before, *overrides)
    assert [f for f in flags if f.startswith(DEVICES)] == [f"{DEVICES}={expected}"]


def test_cpu_devices_are_at_most_the_usable_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert [xla_flags.cpu_devices(n) for n in (1, 2, 3, 8)] == [1, 2, 3, 3]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert xla_flags.cpu_devices(2) == 1
