"""Test set-up: 8 emulated CPU devices, fp32, offline; the sample data shipped in tests/data.

The tests run on CPU unless JAX_ICLEMB_TEST_PLATFORM names another platform (gpu, tpu). Tests
marked `accelerator(PLATFORM)` compile a fused attention kernel for that platform for real; on
any other platform they are skipped, saying so. On a GPU machine:
`JAX_ICLEMB_TEST_PLATFORM=gpu pytest -m accelerator`.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

PLATFORMS = ("cpu", "gpu", "tpu")
TEST_PLATFORM = os.environ.get("JAX_ICLEMB_TEST_PLATFORM", "cpu")
if TEST_PLATFORM not in PLATFORMS:
    raise SystemExit(
        f"JAX_ICLEMB_TEST_PLATFORM must be one of {', '.join(PLATFORMS)}, got {TEST_PLATFORM!r}"
    )
# Must happen before JAX initialises its backends. One platform, never a silent fallback to CPU.
os.environ["JAX_PLATFORMS"] = TEST_PLATFORM
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# On a GPU the test process and the training CLIs it starts share the card: allocate on demand.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session (training CLIs in subprocesses too), never the user's;
# removed when the process that made it (pytest, or xdist's controller) exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_iclemb_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "tests" / "data"  # reference-format records, see tests/data/README.md


def pytest_collection_modifyitems(config, items):
    """Skip `accelerator(PLATFORM)` tests off that platform, with the command that runs them."""
    for item in items:
        mark = item.get_closest_marker("accelerator")
        if mark is None:
            continue
        (platform,) = mark.args
        if platform != TEST_PLATFORM:
            item.add_marker(pytest.mark.skip(reason=(
                f"compiles for a {platform.upper()} (this run's platform is {TEST_PLATFORM}; "
                f"on a {platform.upper()} machine: JAX_ICLEMB_TEST_PLATFORM={platform} "
                "pytest -m accelerator)"
            )))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


# A small variant of configs/tiny.py shared by the tests that need a trained workdir.
TINY_OVERRIDES = (
    "--config.model.arch.num_hidden_layers=2",
    "--config.model.arch.hidden_size=64",
    "--config.model.arch.intermediate_size=128",
    "--config.model.arch.head_dim=16",
    "--config.data.batch_size=8",
    "--config.data.train_group_size=2",
    "--config.data.query_max_len=128",
    "--config.data.passage_max_len=48",
    "--config.data.pack_len=128",
    "--config.train.log_every=1",
)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A workdir trained for 3 steps in-process (LoRA weights non-zero after the updates)."""
    from jax_iclemb.config import load_config
    from jax_iclemb.train import run

    config = load_config(
        REPO / "configs" / "tiny.py",
        [*TINY_OVERRIDES, "--config.train.steps=3", "--config.optim.warmup_steps=0"],
    )
    workdir = tmp_path_factory.mktemp("tiny_workdir")
    run(config, workdir)
    return workdir
