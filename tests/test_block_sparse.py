"""Block-sparse attention: the tile list holds exactly the tiles with an allowed pair (checked
against the dense mask), and the kernel's outputs and gradients equal the dense path's on every
real token, in fp32, for causal/bidirectional, sliding windows, GQA, row groups and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jax_iclemb.config import ConfigError, load_config
from jax_iclemb.data.packing import ladder
from jax_iclemb.model.attention import dot_product_attention, xla_attention
from jax_iclemb.model.block_sparse import attention, block_pairs, pad_pairs, padded_tiles


def packed_layout(rng, rows, length, *, empty_rows=0):
    """Segment ids and positions of rows packed with sequences of mixed lengths (some longer than
    a block), padding at each row's end, and `empty_rows` all-padding rows last."""
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows - empty_rows):
        t, s = 0, 1
        while t < length:
            n = int(rng.integers(1, 6)) if rng.random() < 0.6 else int(rng.integers(6, 40))
            n = min(n, length - t)
            if rng.random() < 0.1 and t > 0:  # leave the rest of the row as padding
                break
            seg[r, t : t + n], pos[r, t : t + n] = s, np.arange(n)
            t, s = t + n, s + 1
    return seg, pos


def tiles_from_dense_mask(seg, pos, block, causal):
    """Reference: the tiles in which the dense mask allows some real query a key."""
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg > 0)[:, :, None]
    if causal:
        mask &= np.tri(seg.shape[1], dtype=bool)
    rows, length = seg.shape
    nb = length // block
    tiles = mask.reshape(rows, nb, block, nb, block).any(axis=(2, 4))
    return {tuple(t) for t in np.argwhere(tiles)}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("block", [4, 8, 16])
def test_tile_list_is_exactly_the_tiles_with_an_allowed_pair(causal, block):
    rng = np.random.default_rng(block)
    seg, pos = packed_layout(rng, rows=6, length=64, empty_rows=1)
    pairs = block_pairs(seg, block=block, causal=causal, groups=3)
    nb = 64 // block
    got = set()
    for g, group in enumerate(pairs):
        real = group[group[:, 1] < nb]
        assert (group[len(real):, 1] == nb).all()  # no-op tiles only at the end
        keys = [tuple(t) for t in real]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)  # sorted, no duplicates
        got |= {(g * 2 + r, q, k) for r, q, k in keys}
    assert got == tiles_from_dense_mask(seg, pos, block, causal)
    assert pairs.shape[1] == max(len(t[t[:, 1] < nb]) for t in pairs)


@pytest.mark.parametrize("rungs", [0, 1, 4])
@pytest.mark.parametrize("most", [10, 136, 1000])
def test_tile_lists_pad_to_a_ladder_rung_below_half_of_every_tile_and_to_all_above(rungs, most):
    padded = [padded_tiles(count, most, rungs) for count in range(1, most + 1)]
    for count, n in enumerate(padded, start=1):
        assert count <= n <= most
        if rungs == 0 or 2 * count > most:
            assert n == most  # work at most doubled; the shape is the rows' alone
        else:
            assert n == min(ladder(count, rungs), most)
    assert padded[most // 2] == most  # just past half
    if rungs:
        assert len(set(padded)) <= len({ladder(c, rungs) for c in range(1, most // 2 + 1)}) + 1


def test_tile_list_rejects_shapes_that_do_not_split():
    seg = np.ones((4, 30), np.int32)
    with pytest.raises(ValueError, match="row length 30 must be a multiple of the block 8"):
        block_pairs(seg, block=8, causal=True)
    with pytest.raises(ValueError, match="4 rows must split into 3 groups"):
        block_pairs(np.ones((4, 32), np.int32), block=8, causal=True, groups=3)


def qkv(rng, rows, length, heads=4, kv_heads=2, head_dim=8):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return (normal(rows, length, heads, head_dim), normal(rows, length, kv_heads, head_dim),
            normal(rows, length, kv_heads, head_dim))


CASES = {
    "causal": dict(causal=True, window=None, groups=1, extra_tiles=0),
    "bidirectional": dict(causal=False, window=None, groups=1, extra_tiles=0),
    "causal-window": dict(causal=True, window=7, groups=1, extra_tiles=0),
    "bidirectional-window": dict(causal=False, window=5, groups=1, extra_tiles=0),
    "row-groups+no-op-tiles": dict(causal=True, window=None, groups=4, extra_tiles=9),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_outputs_and_gradients_equal_the_dense_path(case):
    c = CASES[case]
    rng = np.random.default_rng(0)
    rows, length, block = 8, 48, 8
    seg, pos = packed_layout(rng, rows, length, empty_rows=2)
    pairs = block_pairs(seg, block=block, causal=c["causal"], groups=c["groups"])
    pairs = pad_pairs(pairs, pairs.shape[1] + c["extra_tiles"], length // block)
    q, k, v = qkv(rng, rows, length)
    real = jnp.asarray(seg > 0)[:, :, None, None]
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * real

    def run(fn):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(cotangent)

    sparse = run(lambda q, k, v: attention(
        q, k, v, jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(pairs), block=block,
        causal=c["causal"], sliding_window=c["window"]))
    dense = run(lambda q, k, v: xla_attention(
        q, k, v, jnp.asarray(seg), jnp.asarray(pos), causal=c["causal"],
        sliding_window=c["window"]))
    np.testing.assert_allclose(sparse[0] * real, dense[0] * real, atol=2e-6)
    assert np.abs(np.asarray(dense[0] * real)).max() > 0.1
    for got, want in zip(sparse[1], dense[1]):
        np.testing.assert_allclose(got, want, atol=2e-6)
        assert np.isfinite(np.asarray(got)).all()
    # Padding attends to nothing under block_sparse: 0, never NaN.
    np.testing.assert_array_equal(np.asarray(sparse[0])[seg == 0], 0.0)


def test_dispatch_uses_the_tile_list_and_falls_back_to_dense_without_one():
    rng = np.random.default_rng(1)
    seg, pos = packed_layout(rng, 2, 32)
    q, k, v = qkv(rng, 2, 32)
    args = (q, k, v, jnp.asarray(seg), jnp.asarray(pos))
    dense = dot_product_attention(*args, impl="xla")
    no_tiles = dot_product_attention(*args, impl="block_sparse")
    np.testing.assert_array_equal(no_tiles, dense)
    pairs = jnp.asarray(block_pairs(seg, block=8, causal=True))
    tiled = dot_product_attention(*args, impl="block_sparse", block_pairs=pairs, block=8)
    real = (seg > 0)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(tiled) * real, np.asarray(dense) * real, atol=2e-6)


def test_config_requires_rows_that_split_into_tiles():
    with pytest.raises(ConfigError, match=r"model.attention_block=48.*data.pack_len.*= 256"):
        load_config(REPO / "configs" / "tiny.py", ["--config.model.attention_block=48"])
    config = load_config(
        REPO / "configs" / "tiny.py",
        ["--config.model.attention_block=48", "--config.model.attention_impl=xla"],
    )
    assert config.model.attention_block == 48
