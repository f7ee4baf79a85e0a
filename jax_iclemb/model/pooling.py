"""Pooling of packed hidden states into one vector per segment (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def take_columns(a: jax.Array, columns: jax.Array) -> jax.Array:
    """a [R, L, ...] at columns [R, S] of each row -> [R, S, ...]."""
    index = columns.astype(jnp.int32).reshape(*columns.shape, *[1] * (a.ndim - 2))
    return jnp.take_along_axis(a, index, axis=1)


def last_token_pool(hidden: jax.Array, last_index: jax.Array) -> jax.Array:
    """hidden [R, L, D], last_index [R, S] (column of segment s+1's last token) -> [R, S, D]."""
    return take_columns(hidden, last_index).astype(jnp.float32)


def mean_pool(hidden: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Mean over the tokens of segment s+1, s < num_segments -> [R, S, D]; empty segments give 0."""
    seg = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    member = (segment_ids[:, None, :] == seg[None, :, None]).astype(jnp.float32)  # [R, S, L]
    total = jnp.einsum("rsl,rld->rsd", member, hidden.astype(jnp.float32))
    count = member.sum(-1, keepdims=True)
    return total / jnp.maximum(count, 1.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(‖x‖, eps) along the last axis, in float32 (zero vectors stay zero).

    The clamp is applied to ‖x‖² inside the root: at a zero vector (an unused slot whose token
    embedding and attention output are exactly 0) sqrt's gradient is infinite, and 0 · inf made
    every gradient of the step NaN."""
    x = x.astype(jnp.float32)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))
