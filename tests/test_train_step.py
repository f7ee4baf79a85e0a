"""Pieces of the train step: dropout keyed by (seed, step), and the same-label negative mask."""

import jax
import numpy as np
from test_sharded_step import ARCH, random_batch

from jax_iclemb import parallel, step_batch
from jax_iclemb.config import default_config
from jax_iclemb.data.packing import ladder, row_bucket
from jax_iclemb.model import LoraConfig, ModelConfig, create_model
from jax_iclemb.model.block_sparse import most_tiles
from jax_iclemb.model.build import split_model
from jax_iclemb.step_batch import device_batch
from jax_iclemb.train_step import StepConfig, make_loss_fn, same_label_passages


def test_dropout_masks_follow_the_step_and_repeat_for_the_same_step():
    config = StepConfig(temperature=0.05)
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = ModelConfig.from_hf(ARCH, dtype="float32", param_dtype="float32")
    with jax.set_mesh(mesh):
        model = create_model(cfg, LoraConfig(rank=4, alpha=8.0, dropout=0.5), seed=0, mesh=mesh)
        graphdef, params, frozen = split_model(model)
        params = jax.tree.map(lambda x: x + 0.1, params)  # B != 0: dropout reaches the output
        fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, config), has_aux=True))
        batch = device_batch(mesh, random_batch(np.random.default_rng(0)))
        losses = [float(fn(params, frozen, batch, step)[0][0]) for step in (0, 1, 0)]
    assert losses[0] == losses[2]  # a function of the step: exact resume
    assert losses[0] != losses[1]  # new masks every step


def test_same_label_passages_against_a_loop():
    query_label = np.array([3, 3, -1, 5, 3])
    passage_label = np.array([[3, -1, 5], [3, 5, 5], [-1, 3, -1], [5, 3, -1], [3, 3, 7]])
    got = np.asarray(same_label_passages(query_label, passage_label))
    want = np.zeros((5, 15), bool)
    for i in range(5):
        for j in range(5):
            for g in range(3):
                # A passage labelled like the query is a positive for it: never a negative.
                if query_label[i] >= 0 and passage_label[j, g] == query_label[i]:
                    want[i, j * 3 + g] = True
    np.testing.assert_array_equal(got, want)
    assert want[0, 3] and want[0, 13] and want[3, 2] and not want[2].any()


def test_step_shape_is_the_largest_rung_over_processes(monkeypatch):
    """Two processes: rows per group and tiles are the larger of the two (tiles on the tile
    ladder), real tokens and used rows their sums; one exchange of four numbers."""
    batch = random_batch(np.random.default_rng(0))  # 8 rows in 8 row groups
    config = default_config()
    config.model.attention_block = 8
    tiles = step_batch.attention_tiles(config.model, batch, 2)
    local = [batch.num_rows // 2, tiles.shape[1]]
    # The other process: more rows, and 100 tiles, whose rung (112) is more than its 11 rows
    # of 4 blocks can need (11 x 10): capped there.
    other = [local[0] + 3, 100, 100, 2]
    calls = []

    def gather(values):
        calls.append(list(values))
        return np.array([list(values), other])

    monkeypatch.setattr(step_batch, "gather_counts", gather)
    shape = step_batch.step_shape(batch, tiles, groups=2, model=config.model)
    assert len(calls) == 1 and calls[0][:2] == local
    assert shape.rows == 2 * other[0] and shape.length == batch.tokens.shape[1]
    assert ladder(100, config.model.attention_tile_rungs) == 112
    assert shape.tiles == most_tiles(other[0], 32, block=8, causal=True) == 110
    assert shape.real_tokens == int((batch.segment_ids > 0).sum()) + 100
    assert shape.rows_used == int((batch.segment_ids > 0).any(axis=1).sum()) + 2
    assert row_bucket(shape.rows // 2) >= shape.rows // 2


def test_tile_rungs_zero_makes_the_row_count_the_whole_shape():
    """`model.attention_tile_rungs=0`: every batch's tile lists are padded to all the tiles its
    rows can need (a causal row of 8 blocks: 36), so batches with the same rows share a shape;
    on the default ladder the same sparse batches need fewer."""
    config = default_config()
    config.model.attention_block = 4  # rows of 32 tokens: 8 blocks
    shapes = {}
    for rungs in (0, 4):
        config.model.attention_tile_rungs = rungs
        shapes[rungs] = [
            step_batch.shape_batch(random_batch(np.random.default_rng(seed)), config.model,
                                   groups=2, num_queries=8, pad_id=0)
            for seed in range(4)
        ]
    for (batch, shape), (_, laddered) in zip(shapes[0], shapes[4]):
        assert shape.rows == laddered.rows and shape.tiles == (shape.rows // 2) * 36
        assert batch.block_pairs.shape[1] == shape.tiles
        assert laddered.tiles < shape.tiles  # packed short sequences skip tiles
    assert len({shape.key for _, shape in shapes[0]}) == len({s.rows for _, s in shapes[0]})
