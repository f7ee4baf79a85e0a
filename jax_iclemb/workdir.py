"""A training workdir, read: is it one, its run config, and its trained model at a step.

    runs/tiny/
      config.json          the run's config (`jax_iclemb.config.to_json`)
      model_config.json    the decoder's Hugging Face config
      tokenizer/           the tokenizer, with the in-context special tokens
      checkpoints/<step>/  orbax checkpoints (`jax_iclemb.checkpoint`)
      metrics.jsonl        per-step metrics

Readers only read: nothing is created or changed here. This module loads no JAX (the trained
model itself is read by `jax_iclemb.model.trained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from jax_iclemb import config as config_lib
from jax_iclemb.errors import MissingPath


def is_workdir(path: str | Path) -> bool:
    """Whether `path` is a training workdir (its config.json is a run's config, not an HF
    model's), with or without checkpoints yet."""
    config = Path(path) / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and {"train", "data", "model"} <= raw.keys()


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    if not is_workdir(workdir):
        what = "does not exist" if not Path(workdir).exists() else "has no run's config.json"
        raise MissingPath(f"{workdir} is not a training workdir: it {what}")
    return config_lib.from_json((Path(workdir) / "config.json").read_text())
