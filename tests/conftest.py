"""Test set-up: 8 emulated CPU devices, fp32, offline; the sample data shipped in tests/data."""

import os
import tempfile
from pathlib import Path

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session (training CLIs in subprocesses too), never the user's.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_iclemb_xla_"))

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "tests" / "data"  # reference-format records, see tests/data/README.md


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
