"""A trained model from a training workdir: the base built from its source again, as on resume,
with the checkpoint's trainable parameters (read alone: no optimizer is built)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from jax_iclemb import checkpoint, parallel
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.errors import BadValue, MissingPath
from jax_iclemb.model.build import build_model, lora_config, split_model
from jax_iclemb.model.config import ModelConfig
from jax_iclemb.workdir import load_workdir_config


def checkpoint_step(workdir: Path, ckpt: checkpoint.Checkpointer, step: int | None,
                    config: ml_collections.ConfigDict) -> int:
    """`step`, or the latest, checked to be a finished checkpoint."""
    steps = ckpt.all_steps()
    if not steps:
        raise MissingPath(
            f"{workdir}: no checkpoint yet (the run saves every train.checkpoint_every="
            f"{config.train.checkpoint_every} steps and at its end); resume it with its "
            f"train command"
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise BadValue(f"{workdir}: no checkpoint for step {step}; available: {steps}")
    return step


def load_trained(
    workdir: str | Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[nnx.Module, ModelConfig, Any, ml_collections.ConfigDict, int]:
    """(model with its trained parameters, its config, tokenizer, run config, step) from a
    workdir, the latest checkpoint unless `step` names one."""
    workdir = Path(workdir)
    config = load_workdir_config(workdir)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=1 << 30, read_only=True)
    step = checkpoint_step(workdir, ckpt, step, config)
    tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    mesh = mesh or parallel.make_mesh((1, -1, 1))
    with jax.set_mesh(mesh):
        model, model_config = build_model(
            config.model, lora_config(config.lora, config.train.trainable),
            seed=config.seed, mesh=mesh, vocab_size=len(tokenizer),
        )
        _, params, _ = split_model(model, config.train.trainable)
        params = ckpt.restore_params(step, params)
    ckpt.close()
    nnx.update(model, params)
    return model, model_config, tokenizer, config, step
