"""Gradient cache: a contrastive loss over the whole global batch with one chunk's activations live.

The loss couples every embedding of the step (in-batch and cross-device negatives), so it cannot be
split into independent micro-batches. It can be split at the embeddings (Gao et al. 2021, "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup"):

1. embed the rows chunk by chunk without differentiating (nothing is kept for a backward pass);
2. the loss over all embeddings and its gradient with respect to them, [N, D], which is cheap;
3. per chunk, recompute the forward and pull that chunk's embedding gradient back into the
   parameters (a VJP); the chunks' parameter gradients sum to the unchunked gradient (chain rule).

The price is one extra forward per step; peak activation memory follows the chunk, not the batch.
Rows carry their ids (`PackedRows.row_ids`), which number them in their dropout masks, so both
passes draw the masks of the unchunked step.

Rows are sharded over the data axes in contiguous blocks. Chunk c takes every shard's c-th
sub-block, so each chunk is spread over all devices and no row moves between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jax_iclemb.parallel import data_parallel_size, logical_to_spec

Params = Any
# (params, rows of one chunk [r, ...]) -> slot embeddings [r * S, D]
EmbedFn = Callable[[Params, Any], jax.Array]
# embeddings of every slot [R * S, D] -> (loss, aux)
ObjectiveFn = Callable[[jax.Array], tuple[jax.Array, Any]]


def row_shards() -> int:
    """How many data shards the rows have under the current mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else data_parallel_size(mesh)


def _constrain_shards(x: jax.Array) -> jax.Array:
    """Keep axis 0 (the data shards) on the data axes, so the reshapes below move no rows."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(("batch",), x.shape[:1], mesh)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec, *(None,) * (x.ndim - 1)))


def to_chunks(x: jax.Array, chunks: int, shards: int) -> jax.Array:
    """[R, ...] -> [chunks, R / chunks, ...]; chunk c = every shard's c-th block of rows."""
    n = x.shape[0] // (chunks * shards)
    x = _constrain_shards(x.reshape(shards, chunks, n, *x.shape[1:]))
    return jnp.swapaxes(x, 0, 1).reshape(chunks, shards * n, *x.shape[3:])


def from_chunks(x: jax.Array, chunks: int, shards: int) -> jax.Array:
    """The inverse of `to_chunks`: [chunks, R / chunks, ...] -> [R, ...]."""
    n = x.shape[1] // shards
    x = jnp.swapaxes(x.reshape(chunks, shards, n, *x.shape[2:]), 0, 1)
    return _constrain_shards(x).reshape(chunks * shards * n, *x.shape[3:])


def check_rows(num_rows: int, chunks: int, shards: int) -> None:
    if num_rows % (chunks * shards):
        raise ValueError(
            f"gradient cache: {num_rows} rows do not split into {chunks} chunks over {shards} data "
            f"shards; the pipeline must pad rows to a multiple of grad_cache_chunks × data shards "
            f"per process (row_multiple = {chunks} × data shards / processes)"
        )


def value_and_grad(
    embed: EmbedFn,
    objective: ObjectiveFn,
    params: Params,
    rows: Any,
    chunks: int,
) -> tuple[tuple[jax.Array, Any], Params]:
    """((loss, aux), d loss / d params) of `objective(embeddings of all rows)`, chunk by chunk.

    Equal (up to float rounding) to `jax.value_and_grad` of the composed function when `embed`
    gives each row the embeddings it gets among all the rows. `rows` is a pytree of [R, ...]
    arrays (`PackedRows`, whose block-sparse tile lists are [groups, ...], a group per chunk and
    shard); R must split into `chunks` equal chunks on every data shard.
    """
    shards = row_shards()
    num_rows = jax.tree.leaves(rows)[0].shape[0]
    check_rows(num_rows, chunks, shards)
    chunked = jax.tree.map(lambda v: to_chunks(v, chunks, shards), rows)

    # Pass 1: embeddings only; nothing here is differentiated, so no activation outlives its chunk.
    emb = jax.lax.map(lambda chunk_rows: embed(params, chunk_rows), chunked)
    per_row = emb.reshape(chunks, num_rows // chunks, -1, emb.shape[-1])  # [C, r, S, D]
    flat = from_chunks(per_row, chunks, shards).reshape(-1, emb.shape[-1])
    (loss, aux), emb_grad = jax.value_and_grad(objective, has_aux=True)(flat)
    emb_grad = to_chunks(emb_grad.reshape(num_rows, -1, emb.shape[-1]), chunks, shards)
    emb_grad = emb_grad.reshape(emb.shape)

    # Pass 2: recompute each chunk and pull its cached embedding gradient into the parameters.
    def accumulate(total: Params, xs) -> tuple[Params, None]:
        chunk_rows, chunk_grad = xs
        _, pull = jax.vjp(lambda p: embed(p, chunk_rows), params)
        (grad,) = pull(chunk_grad)
        return jax.tree.map(jnp.add, total, grad), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (chunked, emb_grad))
    return (loss, aux), grads
