"""Test set-up: 8 emulated CPU devices, fp32, offline; paths to the shared sample data."""

import os
from pathlib import Path

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_DATA = SHARED / "data" / "reference-sample"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    if not SAMPLE_DATA.is_dir():
        pytest.fail(f"shared sample data not found at {SAMPLE_DATA}")
    return SAMPLE_DATA
