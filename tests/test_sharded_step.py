"""The loss and gradients of the sharded step equal a single-device computation of the same
global batch, for each mesh layout the configs use: pure data, data x fsdp, fsdp x tensor; with
the dense attention and with block-sparse attention (one tile list per data shard)."""

import dataclasses

import jax
import numpy as np
import pytest

from jax_iclemb import parallel
from jax_iclemb.config import default_config
from jax_iclemb.data.packing import pack_batch
from jax_iclemb.model import LoraConfig, ModelConfig, create_model
from jax_iclemb.model.build import split_model
from jax_iclemb.step_batch import device_batch, own_shape, pad_to_shape
from jax_iclemb.train_step import StepConfig, make_loss_fn

ARCH = {
    "model_type": "mistral", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "sliding_window": 4096, "rms_norm_eps": 1e-5,
}
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def random_batch(rng: np.random.Generator, num_queries=8, group=3, pack_len=32, row_multiple=8):
    def seq(n):
        return [*rng.integers(3, 96, n - 1).tolist(), 2]

    queries = [seq(int(rng.integers(4, 30))) for _ in range(num_queries)]
    passages = [[seq(int(rng.integers(3, 20))) for _ in range(group)] for _ in range(num_queries)]
    passages[1] = passages[1][:2]  # a short group: masked slot
    return pack_batch(
        queries, passages, group_size=group, pack_len=pack_len, max_segments=4,
        teacher_scores=rng.normal(size=(num_queries, group)),
        has_teacher=np.ones(num_queries, bool), in_batch_negatives=True,
        query_label=np.array([0, 0, 1, -1, 2, 2, -1, 3]), row_multiple=row_multiple,
    )


def loss_and_grads(
    mesh, batch, impl="xla", tile_rungs=4, dropout=0.0, extra_rows=0, segments=None
):
    model_section = default_config().model
    model_section.attention_impl, model_section.attention_block = impl, 8
    model_section.attention_tile_rungs = tile_rungs
    # InfoNCE + distillation: both terms cross devices.
    step_config = StepConfig(temperature=0.05, distill_weight=1.0)
    length = batch.tokens.shape[1]
    groups = parallel.data_parallel_size(mesh)
    with_tiles, shape = own_shape({length: batch}, (length,), model_section, groups)
    # A larger planned shape: each data shard pads its own block of rows.
    shape = dataclasses.replace(shape, rows=shape.rows + extra_rows,
                                segments=segments or shape.segments)
    batch = pad_to_shape(
        with_tiles, shape, model_section, groups=groups, num_queries=len(batch.query_slot),
        pad_id=0,
    )
    cfg = ModelConfig.from_hf(
        ARCH, dtype="float32", param_dtype="float32", attention_impl=impl, attention_block=8
    )
    with jax.set_mesh(mesh):
        model = create_model(cfg, dataclasses.replace(LORA, dropout=dropout), seed=3, mesh=mesh)
        graphdef, params, frozen = split_model(model)
        # Non-zero B matrices, so that every adapter receives a gradient.
        rng = np.random.default_rng(0)
        params = jax.tree.map(
            lambda x: jax.device_put(0.1 * rng.standard_normal(x.shape, np.float32), x.sharding),
            params,
        )
        fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, step_config), has_aux=True))
        (loss, _), grads = fn(params, frozen, device_batch(mesh, batch), 5)
        return float(loss), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def single_device_result():
    single = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return loss_and_grads(single, random_batch(np.random.default_rng(1)))


@pytest.mark.parametrize("impl", ["xla", "block_sparse"])
@pytest.mark.parametrize("layout", [(8, 1, 1), (2, 4, 1), (1, 4, 2)], ids=str)
def test_sharded_step_equals_single_device(layout, impl, single_device_result):
    batch = random_batch(np.random.default_rng(1))
    assert_same_step(loss_and_grads(parallel.make_mesh(layout), batch, impl), single_device_result)


def test_padding_to_every_tile_changes_nothing(single_device_result):
    """`model.attention_tile_rungs=0`: each row group's tile list padded to all the tiles its
    rows can need (no-op tiles), one step shape per row count; the same loss and gradients."""
    batch = random_batch(np.random.default_rng(1))
    mesh = parallel.make_mesh((2, 4, 1))
    result = loss_and_grads(mesh, batch, "block_sparse", tile_rungs=0)
    assert_same_step(result, single_device_result)


def test_rows_of_another_length_change_nothing(single_device_result):
    """The same sequences packed into rows of 64 tokens instead of 32 (what a step's row length
    decides, `data.min_pack_len`): the same loss and gradients."""
    batch = random_batch(np.random.default_rng(1), pack_len=64)
    assert batch.tokens.shape[1] == 64
    mesh = parallel.make_mesh((2, 4, 1))
    assert_same_step(loss_and_grads(mesh, batch, "block_sparse"), single_device_result)


def test_more_segment_slots_change_nothing(single_device_result):
    """Each row given 16 segment slots instead of its step's own (`segment_bucket`: 4 here), so
    the pooled last layer computes at 12 more columns a row, all padding: the same loss and
    gradients."""
    batch = random_batch(np.random.default_rng(1))
    mesh = parallel.make_mesh((2, 4, 1))
    result = loss_and_grads(mesh, batch, "block_sparse", segments=16)
    assert_same_step(result, single_device_result)


def test_dropout_masks_follow_the_rows_not_their_places():
    """With LoRA dropout, 2 data shards that each pad their own block of rows (real rows then sit
    at other global positions) give the single device's step, whose rows are padded at the end:
    each row's masks come from its id (`PackedRows.row_ids`), not from where it lands."""
    single = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    sharded = parallel.make_mesh((2, 1, 1), devices=jax.devices()[:2])
    one, two = (
        loss_and_grads(mesh, random_batch(np.random.default_rng(1), row_multiple=shards),
                       "block_sparse", dropout=0.3, extra_rows=2)
        for mesh, shards in ((single, 1), (sharded, 2))
    )
    assert_same_step(two, one)
    no_dropout = loss_and_grads(single, random_batch(np.random.default_rng(1), row_multiple=1),
                                "block_sparse", extra_rows=2)
    assert abs(no_dropout[0] - one[0]) > 1e-4  # the masks were on


def assert_same_step(result, reference):
    (loss_n, grads_n), (loss_1, grads_1) = result, reference
    assert np.isfinite(loss_1) and loss_1 > 0
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    leaves_1, leaves_n = jax.tree.leaves(grads_1), jax.tree.leaves(grads_n)
    assert len(leaves_1) == 2 * 7  # A and B of every adapter, stacked over the layers
    assert all(len(g) == ARCH["num_hidden_layers"] for g in leaves_1)
    assert all(np.abs(layer).max() > 0 for g in leaves_1 for layer in g)
    for g1, gn in zip(leaves_1, leaves_n):
        # fp32 summation order differs between layouts: absolute error relative to the leaf's
        # scale (gradients reach ~30, where one ulp is 2e-6).
        np.testing.assert_allclose(gn, g1, rtol=1e-4, atol=1e-6 * np.abs(g1).max())
