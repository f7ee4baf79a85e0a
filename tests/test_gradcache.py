"""The gradient cache gives the unchunked step's loss and gradients (fp32, 1e-5 relative), also with
rows sharded over a mesh and with dropout (rows keep their ids, hence their masks)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_iclemb import gradcache, parallel
from jax_iclemb.data.batch import PackedBatch
from jax_iclemb.model import LoraConfig, ModelConfig, create_model
from jax_iclemb.model.block_sparse import block_pairs
from jax_iclemb.model.build import split_model
from jax_iclemb.train_step import StepConfig, make_grad_fn

ROWS, LENGTH, SEGMENTS = 8, 16, 2
QUERIES, GROUP = 4, 3  # 4 queries + 12 passages fill the 16 slots


def tiny(dropout: float, attention_impl: str = "xla"):
    cfg = ModelConfig(
        model_type="mistral", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", param_dtype="float32",
        attention_impl=attention_impl, attention_block=4,
    )
    model = create_model(cfg, LoraConfig(rank=4, alpha=8.0, dropout=dropout), seed=0)
    graphdef, params, frozen = split_model(model)
    # LoRA B starts at zero, which would zero every gradient of A: give both random values.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = tree.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return graphdef, params, frozen


def config(chunks: int) -> StepConfig:
    return StepConfig(temperature=0.1, distill_weight=0.5, grad_cache_chunks=chunks)


def batch() -> PackedBatch:
    rng = np.random.default_rng(0)
    segs = np.zeros((ROWS, LENGTH), np.int32)
    pos = np.zeros((ROWS, LENGTH), np.int32)
    last = np.zeros((ROWS, SEGMENTS), np.int32)
    for r in range(ROWS):
        a = int(rng.integers(3, 10))
        b = int(rng.integers(2, LENGTH - a + 1))
        segs[r, :a], segs[r, a : a + b] = 1, 2
        pos[r, :a], pos[r, a : a + b] = np.arange(a), np.arange(b)
        last[r] = a - 1, a + b - 1
    slots = rng.permutation(ROWS * SEGMENTS)
    mask = np.ones((QUERIES, GROUP), bool)
    mask[3, 2] = False
    return PackedBatch(
        tokens=jnp.asarray(rng.integers(1, 50, (ROWS, LENGTH)), jnp.int32),
        segment_ids=jnp.asarray(segs),
        positions=jnp.asarray(pos),
        last_index=jnp.asarray(last),
        query_slot=jnp.asarray(slots[:QUERIES], jnp.int32),
        passage_slot=jnp.asarray(slots[QUERIES:].reshape(QUERIES, GROUP), jnp.int32),
        passage_mask=jnp.asarray(mask),
        teacher_scores=jnp.asarray(rng.normal(size=(QUERIES, GROUP)), jnp.float32),
        has_teacher=jnp.asarray([True, False, True, True]),
        in_batch_negatives=jnp.asarray(True),
        query_label=jnp.asarray([0, 0, -1, 1], jnp.int32),
        passage_label=jnp.asarray(rng.integers(-1, 2, (QUERIES, GROUP)), jnp.int32),
    )


def assert_close(got, want):
    """Loss to 1e-5 relative; each gradient tensor to 1e-5 of its largest entry."""
    np.testing.assert_allclose(got[0][0], want[0][0], rtol=1e-5)
    flat_got = jax.tree_util.tree_leaves_with_path(got[1])
    flat_want = jax.tree.leaves(want[1])
    for (path, g), w in zip(flat_got, flat_want):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, f"zero reference gradient at {jax.tree_util.keystr(path)}"
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale, err_msg=name)


def test_chunks_take_every_shards_block_and_invert():
    x = jnp.arange(12)
    chunked = gradcache.to_chunks(x, chunks=3, shards=2)
    # Shard 0 holds rows 0-5 and shard 1 rows 6-11; chunk c = each shard's c-th pair of rows.
    np.testing.assert_array_equal(chunked, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])
    np.testing.assert_array_equal(gradcache.from_chunks(chunked, 3, 2), x)


def test_rows_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match=r"6 rows do not split into 4 chunks.*row_multiple"):
        gradcache.check_rows(6, chunks=4, shards=1)


@pytest.mark.parametrize("impl", ["xla", "block_sparse"])
def test_grad_cache_on_a_mesh_equals_the_unchunked_step(impl):
    graphdef, params, frozen = tiny(dropout=0.0)
    b, step = batch(), jnp.int32(3)
    want = jax.jit(make_grad_fn(graphdef, config(1)))(params, frozen, b, step)
    # 8 rows = 2 chunks x 4 data shards x 1 row; heads split over "tensor" as well.
    mesh = parallel.make_mesh((2, 2, 2))
    graphdef, _, _ = tiny(dropout=0.0, attention_impl=impl)
    if impl == "block_sparse":  # one tile list per (data shard, chunk) row group
        tiles = block_pairs(np.asarray(b.segment_ids), block=4, causal=True, groups=8)
        b = dataclasses.replace(b, block_pairs=jnp.asarray(tiles))
    with jax.set_mesh(mesh):
        got = jax.jit(make_grad_fn(graphdef, config(2)))(params, frozen, b, step)
    assert_close(got, want)
    np.testing.assert_allclose(got[0][1]["accuracy"], want[0][1]["accuracy"])


def test_grad_cache_with_dropout_equals_the_unchunked_step():
    """Rows keep their ids in the chunks, so the chunked step, on a mesh too, draws the unchunked
    step's dropout masks: the same loss and gradients."""
    graphdef, params, frozen = tiny(dropout=0.3)
    b, step = batch(), jnp.int32(5)
    unchunked = jax.jit(make_grad_fn(graphdef, config(1)))
    want = unchunked(params, frozen, b, step)
    assert_close(jax.jit(make_grad_fn(graphdef, config(2)))(params, frozen, b, step), want)
    with jax.set_mesh(parallel.make_mesh((2, 2, 2))):  # 2 chunks x 4 data shards x 1 row
        got = jax.jit(make_grad_fn(graphdef, config(2)))(params, frozen, b, step)
    assert_close(got, want)
    # Dropout is really on: another step's masks give another loss.
    assert not np.isclose(unchunked(params, frozen, b, step + 1)[0][0], got[0][0], rtol=1e-4)
