"""Block-sparse attention for packed rows: compute only the (query block, key block) tiles that hold
a query-key pair of the same segment.

A packed row of 2048 tokens holds many short sequences; the dense path computes all 2048² scores
and masks ~95% of them away (docs/benchmarks.md). Here the row is cut into blocks of `block`
tokens, the host lists the tiles that can hold an allowed pair (`block_pairs`, from the segment
layout), and the kernel gathers exactly those tiles, computes their scores, and combines the tiles
of each query block with a two-pass softmax over segment sums. Plain XLA ops (gather, batched
matmul, segment sum), so it runs, differentiates and partitions on any backend.

The tile list has a static length per step (padded with no-op entries) and is split into `groups`
contiguous row groups, each listing its own rows' tiles: with one group per data shard and
gradient-cache chunk, a shard's tiles never reference another shard's rows.

Outputs equal the dense path's on every real token; on padding (segment 0) they are 0 (padding
attends to nothing here; the dense path lets it attend to padding; neither value is ever used).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_iclemb.data.packing import ladder


def block_pairs(
    segment_ids: np.ndarray, *, block: int, causal: bool, groups: int = 1
) -> np.ndarray:
    """int32 [groups, P, 3]: the (row within the group, query block, key block) tiles that hold an
    allowed query-key pair, sorted; P = the largest group's count; shorter groups are padded with
    (0, num_blocks, 0), which the kernel ignores.

    A tile is needed when some segment (> 0) has tokens in both blocks (and, when causal, the key
    block does not come after the query block). Host-side numpy, from the batch's segment ids.
    """
    rows, length = segment_ids.shape
    if length % block or rows % groups:
        raise ValueError(
            f"block-sparse attention: row length {length} must be a multiple of the block "
            f"{block}, and {rows} rows must split into {groups} groups"
        )
    nb = length // block
    num_segments = int(segment_ids.max(initial=0)) + 1
    # present[r, j, s]: segment s has a token in block j of row r
    present = np.zeros((rows, nb, num_segments), np.float32)
    r_index = np.broadcast_to(np.arange(rows)[:, None], segment_ids.shape)
    b_index = np.broadcast_to(np.arange(length)[None, :] // block, segment_ids.shape)
    present[r_index, b_index, segment_ids] = 1.0
    present[..., 0] = 0.0  # padding needs no tiles
    needed = present @ present.transpose(0, 2, 1) > 0  # [R, nb (query), nb (key)]
    if causal:
        needed &= np.tri(nb, dtype=bool)
    r, qb, kb = np.nonzero(needed)
    per_row = rows // groups
    group = r // per_row
    counts = np.bincount(group, minlength=groups)
    out = np.zeros((groups, max(int(counts.max(initial=0)), 1), 3), np.int32)
    out[:, :, 1] = nb
    slot = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[group, slot] = np.stack([r - group * per_row, qb, kb], axis=1)
    return out


def most_tiles(rows: int, length: int, *, block: int, causal: bool) -> int:
    """Every tile `rows` rows of `length` tokens can need: each row's lower block triangle when
    causal, else its whole block grid."""
    blocks = length // block
    return rows * (blocks * (blocks + 1) // 2 if causal else blocks * blocks)


def padded_tiles(count: int, most: int, rungs: int) -> int:
    """How many tiles a row group's list of `count` is padded to: `ladder(count, rungs)` while
    `count` is at most half of `most` (`most_tiles` of its rows, never exceeded), and `most`
    from there up: the top doubling is one rung. Padding a list that needs over half of its
    rows' tiles to all of them at most doubles its attention work, and its shape is then the
    row count alone (short rows mostly land there: a causal row of 4 blocks has 10 tiles).
    With `rungs` 0, always `most`: the fewest shapes, the most padding."""
    return min(ladder(count, rungs), most) if rungs and 2 * count <= most else most


def pad_pairs(pairs: np.ndarray, count: int, num_blocks: int) -> np.ndarray:
    """Extend each group's tile list to `count` entries with no-op tiles (a fixed shape)."""
    extra = count - pairs.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {pairs.shape[1]} tiles down to {count}")
    fill = np.zeros((pairs.shape[0], extra, 3), np.int32)
    fill[:, :, 1] = num_blocks
    return np.concatenate([pairs, fill], axis=1)


def _split(x: jax.Array, groups: int) -> jax.Array:
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])


# Its own jit: the layers of a step call it with the same shapes, and a nested jit is traced once
# per shape instead of once per layer (tracing is paid again for every step shape).
@functools.partial(jax.jit, static_argnames=("block", "causal", "sliding_window"))
def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    pairs: jax.Array,
    *,
    block: int,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
    """q [R,L,H,Dh], k/v [R,L,K,Dh], ids/positions [R,L], pairs [groups, P, 3] (`block_pairs`
    with the same `block`) -> [R,L,H,Dh]."""
    groups = pairs.shape[0]
    fn = functools.partial(
        _group_attention, block=block, causal=causal, sliding_window=sliding_window
    )
    out = jax.vmap(fn)(
        *(_split(x, groups) for x in (q, k, v, segment_ids, positions)), pairs
    )
    return out.reshape(q.shape)


def _group_attention(q, k, v, segment_ids, positions, pairs, *, block, causal, sliding_window):
    rows, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    nb = length // block
    num_blocks = rows * nb
    valid = pairs[:, 1] < nb
    q_block = pairs[:, 0] * nb + jnp.minimum(pairs[:, 1], nb - 1)  # flat index, clamped
    k_block = pairs[:, 0] * nb + pairs[:, 2]
    # Segment-op index of each tile: its query block, or out of range (dropped) for no-op tiles.
    # block_pairs sorts the tiles by (row, query block) and puts no-op tiles last.
    target = jnp.where(valid, q_block, num_blocks)

    def tiles(x: jax.Array, index: jax.Array) -> jax.Array:  # [num_blocks, ...] -> [P, ...]
        # Indices are in range by construction; "clip" skips the bounds masking of x[index],
        # several times faster on CPU.
        return jnp.take(x, index, axis=0, mode="clip")

    def head_major(x: jax.Array) -> jax.Array:  # [rows, L, heads, D] -> [rows·nb, heads, block, D]
        x = x.reshape(rows, nb, block, x.shape[2], head_dim).transpose(0, 1, 3, 2, 4)
        return x.reshape(num_blocks, x.shape[2], block, head_dim)

    # Blocks are made head-major once, before the gather, so that both einsums below are plain
    # batched matmuls (batch dims first, no per-tile transposes).
    qt = tiles(head_major(q), q_block).reshape(-1, kv_heads, heads // kv_heads, block, head_dim)
    kt, vt = tiles(head_major(k), k_block), tiles(head_major(v), k_block)  # [P, K, block, D]
    scores = jnp.einsum("pkgqd,pksd->pkgqs", qt, kt, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)

    def row_tiles(x: jax.Array, index: jax.Array) -> jax.Array:  # [rows, L] -> [P, block]
        return tiles(x.reshape(num_blocks, block), index)

    seg_q, seg_k = row_tiles(segment_ids, q_block), row_tiles(segment_ids, k_block)
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] > 0)
    mask &= valid[:, None, None]
    if causal:
        offset = jnp.arange(block)
        col_q = pairs[:, 1, None] * block + offset
        col_k = pairs[:, 2, None] * block + offset
        mask &= col_q[:, :, None] >= col_k[:, None, :]
    if sliding_window is not None:
        dist = row_tiles(positions, q_block)[:, :, None] - row_tiles(positions, k_block)[:, None, :]
        mask &= (dist if causal else jnp.abs(dist)) < sliding_window
    mask = mask[:, None, None]  # [P, 1, 1, block_q, block_k]

    segment = functools.partial(
        jax.ops.segment_sum, segment_ids=target, num_segments=num_blocks,
        indices_are_sorted=True, mode="drop",
    )
    # Pass 1: each query's max over all its tiles (a constant shift: no gradient needed).
    tile_max = jnp.where(mask, scores, -jnp.inf).max(axis=-1)
    row_max = jax.ops.segment_max(
        tile_max, target, num_blocks, indices_are_sorted=True, mode="drop"
    )
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # Pass 2: unnormalised weights; masked entries go through exp(-inf) = 0, so no inf reaches a
    # gradient.
    shift = tiles(row_max, q_block)[..., None]
    weights = jnp.exp(jnp.where(mask, scores - shift, -jnp.inf))
    denom = segment(weights.sum(axis=-1))  # [rows·nb, K, G, block_q]
    out = segment(jnp.einsum("pkgqs,pksd->pkgqd", weights.astype(v.dtype), vt))
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None].astype(out.dtype)
    # [rows·nb, K, G, block, D] -> [rows, L, H, D]
    out = out.reshape(rows, nb, kv_heads, -1, block, head_dim).transpose(0, 1, 4, 2, 3, 5)
    return out.reshape(rows, length, heads, head_dim).astype(q.dtype)
