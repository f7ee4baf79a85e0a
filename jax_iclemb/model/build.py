"""The embedder model from its config sections: build it, split its trainable part off, embed a
packed batch. Training, inference and export all start here; nothing here knows about optimizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jax_iclemb.data.batch import PackedBatch
from jax_iclemb.model.config import ModelConfig
from jax_iclemb.model.decoder import Prefix, create_model
from jax_iclemb.model.hf import (
    checkpoint_readers,
    load_weights,
    pretrained_config,
    resolve_folder,
)
from jax_iclemb.model.lora import TRAINABLE, Dropout, LoraConfig
from jax_iclemb.model.pooling import l2_normalize, mean_pool

# What the optimizer updates (`train.trainable`): the adapters, or every parameter (from scratch).
TRAINABLE_BY_MODE = {"lora": TRAINABLE, "all": nnx.Param}


def model_options(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `model.*` keys that are our options rather than the architecture's."""
    keys = ("dtype", "param_dtype", "attention", "remat", "scan_layers", "attention_impl",
            "attention_block", "init")
    return {key: model[key] for key in keys}


def lora_config(lora: ml_collections.ConfigDict, trainable: str) -> LoraConfig | None:
    """The adapters of the `lora.*` section; None when the whole model is trained
    (`train.trainable="all"`)."""
    if trainable == "all":
        return None
    return LoraConfig(
        rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets)
    )


class ModelSource(NamedTuple):
    """Where a run's decoder comes from: its settings, and for a pretrained model its local
    folder (already downloaded) with a reader of each base weight (`hf.checkpoint_readers`:
    every tensor's name and shape checked); None for a random initialisation from `model.arch`."""

    config: ModelConfig
    folder: Path | None = None
    readers: dict | None = None


def model_source(model: ml_collections.ConfigDict, vocab_size: int) -> ModelSource:
    """The `model.*` section's decoder, without its weights: a Hub id is downloaded here, once,
    and a checkpoint that does not fit the model fails here, before anything is compiled."""
    if model.hf_path:
        folder = resolve_folder(model.hf_path, revision=model.revision or None)
        config = pretrained_config(folder, vocab_size=vocab_size, **model_options(model))
        return ModelSource(config, folder, checkpoint_readers(folder, config))
    arch = dict(model.arch.to_dict())
    arch["vocab_size"] = max(int(arch["vocab_size"]), vocab_size)
    return ModelSource(ModelConfig.from_hf(arch, **model_options(model)))


def instantiate(
    source: ModelSource, lora: LoraConfig | None, *, seed: int, mesh: jax.sharding.Mesh
) -> nnx.Module:
    """The decoder of `source` with fresh adapters: its checkpoint's weights or random ones,
    every parameter created directly into its shards (`decoder.abstract_model`'s)."""
    if source.folder is not None:
        return load_weights(
            source.folder, source.config, lora=lora, mesh=mesh, seed=seed, readers=source.readers
        )
    return create_model(source.config, lora, seed=seed, mesh=mesh)


def build_model(
    model: ml_collections.ConfigDict,
    lora: LoraConfig | None,
    *,
    seed: int,
    mesh: jax.sharding.Mesh,
    vocab_size: int,
) -> tuple[nnx.Module, ModelConfig]:
    """The decoder of the `model.*` section (pretrained from `hf_path`, or random from `arch`)
    with fresh adapters, its parameters created directly into their shards."""
    source = model_source(model, vocab_size)
    return instantiate(source, lora, seed=seed, mesh=mesh), source.config


def split_model(model: nnx.Module, trainable: str = "lora") -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, trainable parameters, everything else), both as plain dicts: merged inside a
    traced function they become that trace's variables (dropout may then advance its RNG)."""
    graphdef, params, frozen = nnx.split(model, TRAINABLE_BY_MODE[trainable], ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def embed_packed(
    model: nnx.Module,
    batch: PackedBatch,
    pooling: str = "last_token",
    dropout_key: jax.Array | None = None,
    prefix: Prefix | None = None,
) -> jax.Array:
    """Normalised embeddings of every segment slot of a packed batch: [R * S, D]; LoRA dropout
    on when a `dropout_key` is given (training). With a `prefix`, every sequence continues it:
    its positions start at the prefix's length."""
    positions = batch.positions
    if prefix is not None:
        positions = positions + jnp.where(batch.segment_ids > 0, prefix.length, 0)
    last_token = pooling != "mean"
    dropout = None if dropout_key is None else Dropout(dropout_key, batch.row_ids)
    hidden = model(
        batch.tokens, positions, batch.segment_ids, batch.block_pairs,
        dropout=dropout, prefix=prefix, pool_at=batch.last_index if last_token else None,
    )
    if last_token:  # hidden [R, S, D]: the decoder computed the last tokens' only
        pooled = hidden.astype(jnp.float32)
    else:
        pooled = mean_pool(hidden, batch.segment_ids, batch.last_index.shape[1])
    pooled = l2_normalize(pooled)
    return pooled.reshape(-1, pooled.shape[-1])
