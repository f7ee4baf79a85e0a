"""Pieces of the train step: dropout keyed by (seed, step), and the same-label negative mask."""

import jax
import numpy as np
from test_sharded_step import ARCH, random_batch

from jax_iclemb import parallel, step_batch
from jax_iclemb.config import default_config
from jax_iclemb.data.packing import ladder, pack_batch, row_bucket, segment_bucket
from jax_iclemb.model import LoraConfig, ModelConfig, create_model
from jax_iclemb.model.block_sparse import most_tiles, padded_tiles
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
    """Two processes: rows per group, tiles and segment slots are the larger of the two (tiles on
    the tile ladder, segment slots on theirs, up to the packer's limit), real tokens and used rows
    their sums; one exchange of (rows, tiles, used rows, sequences in the fullest row) per row
    length and the real tokens."""
    batch = random_batch(np.random.default_rng(0))  # 8 rows in 8 row groups
    config = default_config()
    config.model.attention_block = 8
    tiles = step_batch.attention_tiles(config.model, batch, 2)
    used = int((batch.segment_ids > 0).any(axis=1).sum())
    held = int(batch.segment_ids.max())
    local = [batch.num_rows // 2, tiles.shape[1], used, held]
    # The other process: more rows, and 100 tiles, whose rung (112) is more than its 11 rows
    # of 4 blocks can need (11 x 10): capped there; rows of 3 sequences at most (this one's
    # hold up to 4, the packer's limit).
    other = [local[0] + 3, 100, 2, 3, 100]
    calls = []

    def gather(values):
        calls.append(list(values))
        return np.array([list(values), other])

    monkeypatch.setattr(step_batch, "gather_counts", gather)
    shape = step_batch.step_shape({32: (batch, tiles)}, (32,), groups=2, model=config.model)
    assert len(calls) == 1 and calls[0][:4] == local
    assert shape.rows == 2 * other[0] and shape.length == batch.tokens.shape[1] == 32
    assert ladder(100, config.model.attention_tile_rungs) == 112
    assert shape.tiles == most_tiles(other[0], 32, block=8, causal=True) == 110
    assert shape.real_tokens == int((batch.segment_ids > 0).sum()) + 100
    assert shape.rows_used == used + 2
    assert shape.segments == segment_bucket(max(held, 3), batch.max_segments) == 4
    assert row_bucket(shape.rows // 2) >= shape.rows // 2


def test_processes_settle_on_the_shortest_row_length_that_fits_them_all(monkeypatch):
    """Rows of 128, 64 or 32 tokens. This process packed at 64 and 32; the other's sequences
    fit 128 and 64 only: the step runs at 64 with the rows and tiles each packed there; when
    both fit 32, at 32."""
    rng = np.random.default_rng(0)
    queries = [list(rng.integers(5, 50, size=n)) for n in (20, 9, 30, 12)]
    passages = [[list(rng.integers(5, 50, size=n)) for n in (6, 11)] for _ in queries]
    packed = {
        n: pack_batch(
            queries, passages, group_size=2, pack_len=n, max_segments=8,
            teacher_scores=np.zeros((4, 2)), has_teacher=np.zeros(4, bool),
            in_batch_negatives=True,
        )
        for n in (64, 32)
    }
    config = default_config()
    config.model.attention_block = 8
    model = config.model
    assert packed[32].num_rows > packed[64].num_rows
    for other_fits_32, want in ((False, 64), (True, 32)):
        other = [4, 50, 4, 2, 5, 40, 5, 2, *([3, 12, 3, 5] if other_fits_32 else [-1] * 4), 77]
        monkeypatch.setattr(step_batch, "gather_counts",
                            lambda values, other=other: np.array([list(values), other]))
        with_tiles, shape = step_batch.own_shape(packed, (128, 64, 32), model, groups=1)
        batch = step_batch.pad_to_shape(with_tiles, shape, model, groups=1, num_queries=4,
                                        pad_id=0)
        mine = packed[want]
        assert shape.length == want == batch.tokens.shape[1]
        assert shape.rows == max(mine.num_rows, 5 if want == 64 else 3) == batch.num_rows
        tiles = max(step_batch.attention_tiles(model, mine, 1).shape[1], 40 if want == 64 else 12)
        most = most_tiles(shape.rows, want, block=8, causal=True)
        assert shape.tiles == padded_tiles(tiles, most, 4) == batch.block_pairs.shape[1]
        assert shape.real_tokens == int((mine.segment_ids > 0).sum()) + 77
        # Segment slots: the fullest row over both processes, rounded up to a power of two.
        held = max(int(mine.segment_ids.max()), 5 if want == 32 else 2)
        assert shape.segments == segment_bucket(held, 8) == batch.max_segments
        np.testing.assert_array_equal(batch.tokens[: mine.num_rows], mine.tokens)


def test_tile_rungs_zero_makes_the_row_count_the_whole_shape():
    """`model.attention_tile_rungs=0`: every batch's tile lists are padded to all the tiles its
    rows can need (a causal row of 16 blocks: 136), so batches with the same rows share a shape;
    on the default ladder the same sparse batches need fewer."""
    config = default_config()
    config.model.attention_block = 2  # rows of 32 tokens: 16 blocks

    def short_texts(seed):  # sequences of 2-5 tokens, 8 to a row: a few tiles of each row
        rng = np.random.default_rng(seed)
        text = lambda: list(rng.integers(5, 50, size=int(rng.integers(2, 6))))
        queries = [text() for _ in range(int(rng.integers(8, 17)))]
        return pack_batch(
            queries, [[text(), text()] for _ in queries], group_size=2, pack_len=32,
            max_segments=8, teacher_scores=np.zeros((len(queries), 2)),
            has_teacher=np.zeros(len(queries), bool), in_batch_negatives=True, row_multiple=2,
        )

    shapes = {}
    for rungs in (0, 4):
        config.model.attention_tile_rungs = rungs
        shapes[rungs] = []
        for seed in range(4):
            with_tiles, shape = step_batch.own_shape(
                {32: short_texts(seed)}, (32,), config.model, groups=2
            )
            batch = step_batch.pad_to_shape(with_tiles, shape, config.model, groups=2,
                                            num_queries=16, pad_id=0)
            shapes[rungs].append((batch, shape))
    for (batch, shape), (_, laddered) in zip(shapes[0], shapes[4]):
        assert shape.rows == laddered.rows and shape.tiles == (shape.rows // 2) * 136
        assert batch.block_pairs.shape[1] == shape.tiles
        assert laddered.tiles < shape.tiles  # packed short sequences skip tiles
    assert len({shape.key for _, shape in shapes[0]}) == len({s.rows for _, s in shapes[0]})
