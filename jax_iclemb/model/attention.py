"""Attention over packed rows (causal AND same segment AND within the window), several kernels.

`model.attention_impl` picks one; all compute the same function (tests/test_attention_kernels.py):

- "xla": a dense mask and two einsums, 128 queries at a time (on CPU a row at a time), each chunk
  against the keys it can see (causal: none after it). Any backend; memory O(L²) per row and head.
- "block_sparse": only the (query block, key block) tiles that hold a same-segment pair, listed per
  step by the host (`block_sparse.py`). Any backend; work and memory follow the kept tiles. Needs
  the step's tile list (`block_pairs`); called without one (inference) it falls back to "xla".
- "pallas": jax's Pallas (Triton) flash attention for GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`), which takes segment ids natively. It has no
  grouped KV, so K/V heads are repeated to the query heads.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`. Its public API takes no segment
  ids (the packed THD layout is reachable only through private jax modules), so the same-segment
  mask goes in as a dense mask; cuDNN still fuses the softmax and skips the causal upper half.
- "splash": TPU splash attention with segment ids; grouped KV through its multi-query kernel,
  vmapped over KV heads.

Segment 0 (padding) attends only to padding (under "block_sparse": to nothing, output 0), so no
softmax row is empty; outputs on padding are never used.
Under a mesh, "xla" and the fused kernels run per shard (`jax.shard_map`): GSPMD cannot partition
a custom call, nor a map over a sharded axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jax_iclemb.config import ATTENTION_IMPLS
from jax_iclemb.model import block_sparse
from jax_iclemb.model.pooling import take_columns
from jax_iclemb.parallel import logical_to_spec

# Queries per chunk of the "xla" path: a row's chunk of scores ([heads, 128, ≤ L] floats) stays in
# cache, and causal chunks skip the keys after them (docs/performance.md).
QUERY_CHUNK = 128
_MASKED = -1e30  # added to masked scores: exp() gives 0, and no inf reaches a gradient


def xla_attention(q, k, v, segment_ids, positions, *prefix, causal, sliding_window):
    """Dense-mask attention with grouped KV. q [R,L,H,Dh], k/v [R,L,K,Dh] -> [R,L,H,Dh].

    `prefix` = (keys [P,K,Dh], values [P,K,Dh], length []): a cached shared prefix in front of
    every sequence (the few-shot examples of a task's queries): every real token also sees its
    first `length` keys. Needs causal attention and no window.

    On CPU one row at a time (`lax.map`; under a mesh, call it through `dot_product_attention`,
    which maps over each device's own rows), elsewhere all rows at once. Queries go in chunks of
    `QUERY_CHUNK`, each against the columns it can see: up to its last query when causal, and
    from its first query's window start (positions are contiguous within a segment, so columns
    further left are out of the window).
    """
    length, window = q.shape[1], sliding_window
    chunk = min(QUERY_CHUNK, length)
    spans = []  # (first query, query end, first key, key end) of each chunk
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        first, end = 0, stop if causal else length
        if window is not None:  # keys further than the window from every query of the chunk are out
            first, end = max(0, start - window + 1), min(end, stop + window - 1)
        spans.append((start, stop, first, end))

    if prefix:
        prefix_k, prefix_v, prefix_len = prefix
        prefix_k, prefix_v = prefix_k.transpose(1, 0, 2), prefix_v.transpose(1, 0, 2)  # [K, P, Dh]
        prefix_cols = jnp.arange(prefix_k.shape[1]) < prefix_len

    def one_row(args):
        q, k, v, seg, pos = args  # q [L, H, Dh], k/v [L, K, Dh], seg/pos [L]
        kv_heads, head_dim = k.shape[1:]
        qh = q.reshape(length, kv_heads, -1, head_dim).transpose(1, 2, 0, 3)  # [K, G, L, Dh]
        kh, vh = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [K, L, Dh]
        outs = []
        for start, stop, first, end in spans:
            keys, values = kh[:, first:end], vh[:, first:end]
            mask = _chunk_mask(seg, pos, start, stop, first, end, causal, window)
            if prefix:  # the prefix's columns in front: real tokens see its real ones
                keys = jnp.concatenate([prefix_k, keys], 1)
                values = jnp.concatenate([prefix_v, values], 1)
                seen = (seg[start:stop, None] > 0) & prefix_cols[None, :]
                mask = jnp.concatenate([seen, mask], -1)
            scores = jnp.einsum(
                "kgqd,ksd->kgqs", qh[:, :, start:stop], keys, preferred_element_type=jnp.float32
            )
            scores = scores * head_dim**-0.5 + jnp.where(mask, 0.0, _MASKED)
            # Softmax normalised after the value product: a divide of [.., Dh], not [.., keys].
            # The max is a constant shift (no gradient needed); every query sees itself.
            weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
            out = jnp.einsum("kgqs,ksd->kgqd", weights.astype(v.dtype), values)
            outs.append(out / weights.sum(-1)[..., None].astype(out.dtype))
        out = jnp.concatenate(outs, axis=2)  # [K, G, L, Dh]
        return out.transpose(2, 0, 1, 3).reshape(q.shape).astype(q.dtype)

    # CPU: a row at a time, so that a chunk's scores stay in cache. Accelerators: every row at
    # once (one batched op per chunk), as wide as the dense path was.
    rows_at_once = 1 if jax.default_backend() == "cpu" else q.shape[0]
    return jax.lax.map(one_row, (q, k, v, segment_ids, positions), batch_size=rows_at_once)


def attention_at_columns(q, k, v, segment_ids, positions, columns, *, causal, sliding_window):
    """The attention of the queries at `columns` [R, S] only: q [R,S,H,Dh] (those columns'),
    k/v [R,L,K,Dh] (every column's) -> [R,S,H,Dh], with `xla_attention`'s mask. Dense over each
    row's keys: S is a row's few segments, so this is a sliver of the full attention's work.
    (The decoder's last layer at the pooled tokens.)"""
    r, s, heads, head_dim = q.shape
    length, kv_heads = k.shape[1], k.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < length else None
    groups = heads // kv_heads
    # [R, K, G·S, Dh] against [R, K, L, Dh]: batched matmuls over (row, KV head).
    qg = q.reshape(r, s, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(r, kv_heads, groups * s, head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("rkqd,rkld->rkql", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(r, kv_heads, groups, s, length)
    # [R, S, L]: may the query at column columns[r, s] see key column l?
    mask = take_columns(segment_ids, columns)[..., None] == segment_ids[:, None]
    if causal:
        mask &= jnp.arange(length) <= columns[..., None]
    if window is not None:
        dist = take_columns(positions, columns)[..., None] - positions[:, None]
        mask &= (dist if causal else jnp.abs(dist)) < window
    scores = scores * head_dim**-0.5 + jnp.where(mask, 0.0, _MASKED)[:, None, None]
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum(
        "rkql,rkld->rkqd", weights.astype(v.dtype).reshape(r, kv_heads, groups * s, length), v
    ).reshape(r, kv_heads, groups, s, head_dim)
    out = out / weights.sum(-1)[..., None].astype(out.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)


def _chunk_mask(seg, pos, start, stop, first, end, causal, window):
    """bool [stop - start, end - first]: may query i (of one row's [start, stop)) see key j (of
    [first, end))? Same segment AND (causal: j not after i) AND (window: within it, by position).
    Padding (segment 0) sees padding, and every token itself, so no query sees nothing."""
    mask = seg[start:stop, None] == seg[None, first:end]
    if causal:
        mask &= jnp.arange(start, stop)[:, None] >= jnp.arange(first, end)[None, :]
    if window is not None:
        dist = pos[start:stop, None] - pos[None, first:end]
        mask &= (dist if causal else jnp.abs(dist)) < window
    return mask


def _pallas_attention(q, k, v, segment_ids, *, causal, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return gpu_attention.mha(
        q, k, v, segment_ids, sm_scale=q.shape[-1] ** -0.5, causal=causal, interpret=interpret
    )


def _cudnn_attention(q, k, v, segment_ids, *, causal, window):
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [R, 1, L, L]
    return jax.nn.dot_product_attention(
        q, k, v, mask=same, is_causal=causal, implementation="cudnn",
        local_window_size=None if window is None else (window - 1, 0),
    )


@functools.cache
def _splash_kernel(length: int, groups: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = min(512, length)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    mask = splash.MultiHeadMask([one] * groups)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_attention(q, k, v, segment_ids, *, causal, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    r, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    kernel = _splash_kernel(length, heads // kv_heads, causal, interpret)
    # [R, L, K, G, D] -> [R, K, G, L, D]: one MQA call per (row, KV head); splash does not scale.
    qg = (q * head_dim**-0.5).reshape(r, length, kv_heads, -1, head_dim).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [R, K, L, D]

    def per_row(qr, kr, vr, seg):
        ids = SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(per_row)(qg, kt, vt, segment_ids)  # [R, K, G, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(r, length, heads, head_dim)


def _per_shard(fn, q, k, v, *row_arrays, prefix=()):
    """Run `fn(q, k, v, *row_arrays, *prefix)` on each device's rows (and heads) under the current
    mesh, if any; `row_arrays` are [R, L] (segment ids, positions), `prefix` (keys, values
    [P, K, Dh], length []) is every row's."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, *row_arrays, *prefix)
    rows = logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    # Heads split over "tensor" only when both query and KV heads divide evenly, so every shard
    # keeps whole GQA groups.
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    spec = PartitionSpec(rows, None, heads, None)
    shared = (PartitionSpec(None, heads, None),) * 2 + (PartitionSpec(),) if prefix else ()
    return jax.shard_map(
        fn, in_specs=(spec, spec, spec, *[PartitionSpec(rows, None)] * len(row_arrays), *shared),
        out_specs=spec, check_vma=False,
    )(q, k, v, *row_arrays, *prefix)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    impl: str = "xla",
    interpret: bool | None = None,
    block_pairs: jax.Array | None = None,
    block: int = 64,
    prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Attention of packed rows. q [R,L,H,Dh], k/v [R,L,K,Dh], ids/positions [R,L] -> [R,L,H,Dh].

    `block_pairs` [groups, P, 3] is the tile list of "block_sparse" (`block_sparse.block_pairs` of
    these rows with this `block`).

    `prefix` (keys, values [P, K, Dh], length []): a cached prefix every sequence continues (see
    `xla_attention`); the "xla" path computes it (under "block_sparse" when no tile list is given).

    `interpret` runs the Pallas kernels ("pallas", "splash") in the Pallas interpreter; by default
    it does so exactly when JAX runs on CPU, where they cannot compile (slow: tests and
    `bench/gpu_step.py --smoke`).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {ATTENTION_IMPLS}")
    length = q.shape[1]
    # Positions are contiguous within a segment, so a window is a band of columns; one at least
    # as long as the row never masks anything (Mistral's 4096 at rows of 2048).
    window = sliding_window if sliding_window is not None and sliding_window < length else None
    if prefix is not None and (
        not causal or impl not in ("xla", "block_sparse")
        or (sliding_window is not None and sliding_window < length + prefix[0].shape[0])
        or block_pairs is not None
    ):
        raise ValueError(
            "a cached prefix needs causal attention, computed by the 'xla' path, and no window "
            "shorter than the prefix and the row together"
        )
    if impl == "block_sparse" and block_pairs is not None:
        return block_sparse.attention(
            q, k, v, segment_ids, positions, block_pairs,
            block=block, causal=causal, sliding_window=window,
        )
    if impl in ("xla", "block_sparse"):
        # Per shard: each device maps over its own rows (a map over a sharded axis would gather).
        fn = functools.partial(xla_attention, causal=causal, sliding_window=window)
        return _per_shard(fn, q, k, v, segment_ids, positions, prefix=prefix or ())
    if impl == "cudnn":
        if window is not None and not causal:
            raise ValueError("attention impl 'cudnn' supports a sliding window only when causal")
        fn = functools.partial(_cudnn_attention, causal=causal, window=window)
        return _per_shard(fn, q, k, v, segment_ids)
    if window is not None:
        raise ValueError(
            f"attention impl {impl!r} has no sliding window: window {sliding_window} is shorter "
            f"than the row length {length}; use impl 'xla' or 'cudnn', or shorter rows"
        )
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    kernel = _pallas_attention if impl == "pallas" else _splash_attention
    fn = functools.partial(kernel, causal=causal, interpret=interpret)
    return _per_shard(fn, q, k, v, segment_ids)
