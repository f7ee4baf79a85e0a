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


@pytest.mark.parametrize(
    ("triton", "before", "after"),
    [
        (False, None, f"{FLAG}=false"),
        (True, None, f"{FLAG}=true"),
        (False, "--xla_b=1", f"--xla_b=1 {FLAG}=false"),
        (False, f"{FLAG}=true", f"{FLAG}=true"),  # the user's choice stands
    ],
)
def test_the_train_command_sets_triton_gemm_before_jax_starts(monkeypatch, triton, before, after):
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    seen = []

    def stop(*_):  # the job (and JAX's backend) would start here
        seen.append(os.environ.get("XLA_FLAGS"))
        raise ReportedError("stopped")

    monkeypatch.setattr(train.distributed, "initialize", stop)
    argv = ["--config", TINY, f"--config.train.gpu_triton_gemm={triton}"]
    monkeypatch.setattr(sys, "argv", ["jax_iclemb.train", *argv])
    assert train.script() == 1
    assert seen == [after]
    monkeypatch.setenv("XLA_FLAGS", "--xla_b=1")
    assert train.main(argv) == 1  # in-process: the caller's XLA_FLAGS stay as they are
    assert seen == [after, "--xla_b=1"]
