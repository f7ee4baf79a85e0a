"""Random numbers from a keyed integer hash: LoRA dropout masks and fresh weights.

An entry's 32 bits are a keyed hash of its global position, or of its row's id and its place in
the row (`random_words`): two rounds of lowbias32, a dozen integer operations an entry where
threefry (`jax.random`) takes about a hundred. That is cheaper to run (drawing dropout masks took
more than the adapters' matmuls on a CPU) and to compile (a fresh model's initialisation:
docs/performance.md), and a sharded array's values do not depend on how it is sharded.
tests/test_lora.py checks the bits; tests/test_hash_random.py the distributions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B9  # 2³² / φ: consecutive integers times it spread over the words


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons, "hash-prospector"): a bijection of uint32 whose output bits each
    flip with probability ~1/2 when any input bit does."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def random_words(
    key: jax.Array,
    shape: tuple[int, ...],
    columns: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> jax.Array:
    """Uniform uint32 words, one per entry: a keyed hash of the entry's global position.

    Entry (*lead, i, j) gets mix(mix(i · shape[-1] + j + k0) ^ mix(lead index · φ + k1)), where
    (k0, k1) are the threefry key's two words (why a hash, and why global positions: the module
    docstring).

    `columns` [*lead, n] (int): the words of an array that holds only these columns i of a
    larger one (the decoder's last layer at the pooled tokens), the larger array's at them.
    `rows` [*lead] (int): the lead index to hash for each leading entry instead of its own (a
    packed row's id, which stays with the row wherever a step places it)."""
    k0, k1 = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)[:2]
    *lead, n, m = (1, *shape) if len(shape) == 1 else shape
    i = (
        jax.lax.broadcasted_iota(jnp.uint32, (n, m), 0)
        if columns is None
        else columns.astype(jnp.uint32)[..., None]
    )
    within = i * jnp.uint32(m) + jax.lax.broadcasted_iota(jnp.uint32, (n, m), 1)
    row = jnp.arange(math.prod(lead), dtype=jnp.uint32) if rows is None else rows
    row = row.astype(jnp.uint32).reshape(*lead, 1, 1)
    words = _mix(within + k0) ^ _mix(row * jnp.uint32(_GOLDEN) + k1)
    return _mix(words).reshape(shape)


# Jitted like `lora._words_at_least`: a step's program folds 8 keys a layer, all of one shape,
# so tracing them once instead of 32 times takes a fifth to a third off tracing a step shape of
# the 4-layer comparison model (docs/performance.md). Same operations, same bits.
@jax.jit
def fold_key(key: jax.Array, n: int | jax.Array) -> jax.Array:
    """The key of sub-stream `n` of `key` (a layer, a projection): its words rehashed with a salt
    of n: a few integer operations, where `jax.random.fold_in` runs threefry (about a hundred) in
    every step shape's program, once per layer and projection."""
    words = jax.random.key_data(key).astype(jnp.uint32)
    lanes = jnp.arange(1, words.shape[-1] + 1, dtype=jnp.uint32)
    salt = _mix(jnp.asarray(n, jnp.uint32) * jnp.uint32(_GOLDEN) + lanes)
    return jax.random.wrap_key_data(_mix(words ^ salt), impl=jax.random.key_impl(key))


def uniform(key: jax.Array, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0
            ) -> jax.Array:
    """U(low, high) in float32: each word's top 23 bits k as (2k + 1) / 2²⁴ (exact, never 0 or
    1), scaled."""
    k = random_words(key, shape) >> 9
    return low + (high - low) * ((2 * k + 1).astype(jnp.float32) * 2.0**-24)


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) in float32: √2 · erf⁻¹(2u − 1) of `uniform`'s u (jax.random.normal's transform;
    2u − 1 is exact and never ±1, so |x| < 5.4)."""
    return math.sqrt(2.0) * jax.lax.erf_inv(2.0 * uniform(key, shape) - 1.0)
