"""The decoder's last layer at the pooled columns only (`Decoder(..., pool_at=...)`): the same
hidden states and LoRA gradients as the full last layer read at those columns, with dropout on
(a pooled path without the full layer's masks would differ), for every kind of layer and mask;
its dropout masks are bit for bit the full layer's there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_scan_layers import CFG as SCANNED
from test_scan_layers import LORA, adapted_model
from test_scan_layers import packed_rows as scan_rows

from jax_iclemb.data.batch import PackedRows
from jax_iclemb.model import TRAINABLE, create_model
from jax_iclemb.model.build import embed_packed
from jax_iclemb.model.hash_random import random_words
from jax_iclemb.model.lora import Dropout
from jax_iclemb.model.pooling import take_columns

KEY = jax.random.key(3)
UNROLLED = SCANNED.replace(scan_layers=False)
VARIANTS = {
    "causal": UNROLLED,
    "sliding window": UNROLLED.replace(sliding_window=5),
    "bidirectional": UNROLLED.replace(attention="bidirectional"),
    "remat": UNROLLED.replace(remat="full"),
}


@pytest.fixture(scope="module")
def model():
    return adapted_model()


def packed_rows():
    """test_scan_layers' rows (three segments; one segment and padding) and a row of padding
    only. The columns are each segment's last token, 0 for unused slots (as the packer writes
    them)."""
    tokens, positions, segments = (
        np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)]) for a in scan_rows()
    )
    columns = np.zeros((3, 3), np.int32)
    for r in range(3):
        ends = [int(np.flatnonzero(segments[r] == s)[-1]) for s in range(1, segments[r].max() + 1)]
        columns[r, : len(ends)] = ends
    return tokens, positions, segments, columns


def pooled_and_grads(model, cfg, *, pooled_last):
    """Hidden states at the columns and the LoRA gradients of a fixed random projection of them;
    `pooled_last=False` runs every layer on every column and reads the columns after the norm."""
    tokens, positions, segments, columns = packed_rows()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(cfg, LORA)))
    params, rest = nnx.state(model, TRAINABLE, ...)
    probe = jax.random.normal(jax.random.key(0), (*columns.shape, cfg.hidden_size))

    @jax.jit
    def run(params):
        decoder = nnx.merge(graphdef, params, rest)
        if pooled_last:
            hidden = decoder(tokens, positions, segments, dropout=Dropout(KEY), pool_at=columns)
        else:
            full = decoder(tokens, positions, segments, dropout=Dropout(KEY))
            hidden = take_columns(full, columns)
        return jnp.sum(hidden * probe), hidden

    (_, hidden), grads = jax.value_and_grad(run, has_aux=True)(params)
    return np.asarray(hidden), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_last_layer_at_the_columns_equals_the_full_last_layer(model, variant):
    cfg = VARIANTS[variant]
    got_hidden, got_grads = pooled_and_grads(model, cfg, pooled_last=True)
    want_hidden, want_grads = pooled_and_grads(model, cfg, pooled_last=False)
    assert got_hidden.shape == (3, 3, SCANNED.hidden_size)
    np.testing.assert_allclose(got_hidden, want_hidden, rtol=0, atol=2e-5)  # fp32 rounding
    leaves, want = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    assert len(leaves) == 14  # A and B of the 7 projections
    for a, b in zip(leaves, want, strict=True):
        # The last layer's adapters ran at the columns only; their gradients must agree too.
        assert np.abs(b[-1]).max() > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())


def test_scanned_layers_pool_the_same_columns(model):
    got = pooled_and_grads(model, SCANNED, pooled_last=True)
    want = pooled_and_grads(model, UNROLLED, pooled_last=False)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=2e-5)


def test_words_at_columns_are_the_full_inputs_words():
    shape = (3, 16, 24)
    columns = np.array([[4, 11, 15], [10, 0, 0], [0, 2, 7]], np.int32)
    full = np.asarray(random_words(KEY, shape))
    at = np.asarray(random_words(KEY, (3, 3, 24), jnp.asarray(columns)))
    np.testing.assert_array_equal(at, full[np.arange(3)[:, None], columns])


def test_embed_packed_pools_through_the_pooled_last_layer(model):
    """The training embeddings: last-token pooling through `embed_packed` equals the full model's
    hidden states at each segment's last token, normalised."""
    tokens, positions, segments, columns = packed_rows()
    rows = PackedRows(tokens=tokens, positions=positions, segment_ids=segments,
                      last_index=columns, block_pairs=None)
    unrolled = nnx.merge(
        nnx.graphdef(nnx.eval_shape(lambda: create_model(UNROLLED, LORA))), nnx.state(model)
    )
    got = np.asarray(embed_packed(unrolled, rows, "last_token", KEY))
    hidden = take_columns(unrolled(tokens, positions, segments, dropout=Dropout(KEY)), columns)
    want = np.asarray(hidden).reshape(-1, SCANNED.hidden_size)
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
