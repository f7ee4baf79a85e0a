"""One training step as pure functions: embed the packed rows, score them with the contrastive
loss over the global batch, differentiate (directly or through the gradient cache), update.

The factories take a `StepConfig` (the handful of config values a step reads), never the whole
config, and return functions of arrays only, ready for `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jax_iclemb import gradcache
from jax_iclemb.checkpoint import TrainState
from jax_iclemb.data.batch import PackedBatch, PackedRows
from jax_iclemb.loss import contrastive_loss
from jax_iclemb.model.build import embed_packed
from jax_iclemb.optim import global_norm


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step reads from a run's config."""

    pooling: str = "last_token"  # model.pooling
    temperature: float = 0.02  # loss.temperature
    distill_weight: float = 0.0  # loss.distill_weight
    seed: int = 0  # seed: dropout masks are a function of (seed, step)
    grad_cache_chunks: int = 1  # train.grad_cache_chunks
    accumulate_steps: int = 1  # optim.accumulate_steps: micro-steps per optimizer update

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepConfig:
        return cls(
            pooling=config.model.pooling,
            temperature=float(config.loss.temperature),
            distill_weight=float(config.loss.distill_weight),
            seed=int(config.seed),
            grad_cache_chunks=int(config.train.grad_cache_chunks),
            accumulate_steps=max(1, int(config.optim.accumulate_steps)),
        )


def same_label_passages(query_label: jax.Array, passage_label: jax.Array) -> jax.Array:
    """[B, B·G] True where a passage carries the query's label: a positive for that query, so a
    false negative (another query of the same class, a hard negative that matches), excluded
    from the softmax. The query's own positive stays its target."""
    flat = passage_label.reshape(1, -1)
    return (query_label[:, None] == flat) & (query_label[:, None] >= 0)


def make_embed_fn(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable:
    """Pure (params, frozen, rows, dropout_key) -> normalised slot embeddings [rows · S, D]."""

    def embed(params: dict, frozen: dict, rows: PackedRows, key: jax.Array) -> jax.Array:
        return embed_packed(nnx.merge(graphdef, frozen, params), rows, cfg.pooling, key)

    return embed


def make_objective(cfg: StepConfig) -> Callable:
    """Pure (slot embeddings [R · S, D], batch) -> (loss, metrics) over the global batch."""
    distill = cfg.distill_weight != 0

    def objective(emb: jax.Array, batch: PackedBatch):
        return contrastive_loss(
            emb[batch.query_slot],
            emb[batch.passage_slot],
            batch.passage_mask,
            batch.in_batch_negatives,
            temperature=cfg.temperature,
            teacher_scores=batch.teacher_scores if distill else None,
            has_teacher=batch.has_teacher if distill else None,
            distill_weight=cfg.distill_weight,
            negative_mask=same_label_passages(batch.query_label, batch.passage_label),
        )

    return objective


def numbered(rows: PackedRows) -> PackedRows:
    """`rows` with ids (their index where they have none), which chunks then carry along."""
    if rows.row_ids is not None:
        return rows
    return dataclasses.replace(rows, row_ids=jnp.arange(rows.num_rows, dtype=jnp.int32))


def dropout_key(cfg: StepConfig, step: jax.Array) -> jax.Array:
    """Dropout masks are a function of (seed, step): nothing random lives in the checkpoint."""
    return jax.random.fold_in(jax.random.key(cfg.seed + 1), step)


def make_loss_fn(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable:
    """Pure (params, frozen, batch, step) -> (loss, metrics) over the global batch."""
    embed, objective = make_embed_fn(graphdef, cfg), make_objective(cfg)

    def loss_fn(params: dict, frozen: dict, batch: PackedBatch, step: jax.Array):
        return objective(embed(params, frozen, batch.rows(), dropout_key(cfg, step)), batch)

    return loss_fn


def make_grad_fn(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable:
    """Pure (params, frozen, batch, step) -> ((loss, metrics), grads); with `grad_cache_chunks`
    > 1 through the gradient cache, whose chunks keep their rows' ids: the same dropout masks."""
    if cfg.grad_cache_chunks == 1:
        return jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True)
    embed, objective = make_embed_fn(graphdef, cfg), make_objective(cfg)

    def grad_fn(params: dict, frozen: dict, batch: PackedBatch, step: jax.Array):
        key = dropout_key(cfg, step)
        return gradcache.value_and_grad(
            lambda p, rows: embed(p, frozen, rows, key),
            lambda emb: objective(emb, batch),
            params,
            numbered(batch.rows()),
            cfg.grad_cache_chunks,
        )

    return grad_fn


def make_update(
    cfg: StepConfig, tx: optax.GradientTransformation, schedule: Callable
) -> Callable:
    """Pure (state, grads) -> (state, {grad_norm, lr}): the optimizer's part of a step. It does not
    depend on the batch's shape, so the trainer compiles it once per run, apart from the
    gradient, which compiles once per step shape (a quarter less to compile for every shape)."""

    def update(state: TrainState, grads: dict):
        updates, opt = tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "grad_norm": global_norm(grads), "lr": schedule(state.step // cfg.accumulate_steps)
        }
        return TrainState(step=state.step + 1, params=params, opt=opt), metrics

    return update


def make_train_step(
    graphdef: nnx.GraphDef,
    cfg: StepConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
) -> Callable:
    """Pure (state, frozen, batch) -> (state, metrics): one update on the global batch, as one
    function (the trainer runs its two parts, `make_grad_fn` and `make_update`, as two programs)."""
    grad_fn, update = make_grad_fn(graphdef, cfg), make_update(cfg, tx, schedule)

    def train_step(state: TrainState, frozen: dict, batch: PackedBatch):
        (loss, metrics), grads = grad_fn(state.params, frozen, batch, state.step)
        state, more = update(state, grads)
        return state, dict(metrics, loss=loss, **more)

    return train_step


def first_step() -> jax.Array:
    """A fresh state's step counter (int32 [])."""
    return jnp.zeros((), jnp.int32)


def initial_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=first_step(), params=params, opt=jax.jit(tx.init)(params))
