"""Stacked decoder layers (`ModelConfig.scan_layers`): the scanned model equals the unrolled one
and a hand-written per-layer loop (hidden states and LoRA gradients, dropout on), compiles one
layer body whatever the depth, and creates every stacked parameter in its shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jax_iclemb import parallel
from jax_iclemb.model import TRAINABLE, LoraConfig, ModelConfig, create_model, lora_state
from jax_iclemb.model.block_sparse import block_pairs
from jax_iclemb.model.decoder import layer_view, rope_inv_freq, rope_tables, state_shardings
from jax_iclemb.model.hash_random import fold_key
from jax_iclemb.model.lora import Dropout

CFG = ModelConfig(
    model_type="qwen3",  # q/k norms and biases: every kind of layer variable is stacked
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
    o_bias=True,
    qk_norm=True,
    dtype="float32",
    param_dtype="float32",
)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.3)
KEY = jax.random.key(7)


def packed_rows():
    """Two rows of 16 tokens: three segments, then one segment and padding."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 11 + [0] * 5], np.int32)
    positions = np.zeros_like(segments)
    for r in range(2):
        for s in set(segments[r].tolist()) - {0}:
            positions[r, segments[r] == s] = np.arange((segments[r] == s).sum())
    return tokens, positions, segments


def adapted_model():
    """CFG with LORA, every adapter's B non-zero, so that each changes the output."""
    model = create_model(CFG, LORA, seed=1)
    rng = np.random.default_rng(2)
    noise = lambda v: 0.2 * rng.standard_normal(v.shape, np.float32)
    nnx.update(model, jax.tree.map(noise, lora_state(model)))
    return model


@pytest.fixture(scope="module")
def model():
    return adapted_model()


def reference_hidden(model, tokens, positions, segments, key):
    """The documented computation, layer by layer: layer i is `layers` sliced at i, run with
    dropout key fold_key(key, i)."""
    x = model.embed_tokens(tokens)
    cos, sin = rope_tables(positions, rope_inv_freq(CFG))
    for i in range(CFG.num_layers):
        block = layer_view(model.layers, i)
        x, _ = block(x, cos, sin, segments, positions, None, Dropout(fold_key(key, i)))
    return model.norm(x)


def hidden_and_grads(model, cfg, rows, pairs=None):
    """Hidden states and the LoRA gradients of a fixed random projection of them: `model`'s
    parameters run by a decoder built with `cfg` (same state layout, other options)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(cfg, LORA)))
    params, rest = nnx.state(model, TRAINABLE, ...)
    probe = jax.random.normal(jax.random.key(0), (*rows[0].shape, CFG.hidden_size))

    @jax.jit
    def run(params):
        hidden = nnx.merge(graphdef, params, rest)(*rows, pairs, dropout=Dropout(KEY))
        return jnp.sum(hidden * probe), hidden

    (_, hidden), grads = jax.value_and_grad(run, has_aux=True)(params)
    return np.asarray(hidden), jax.tree.map(np.asarray, grads)


def assert_same(got, want):
    (h1, g1), (h2, g2) = got, want
    np.testing.assert_allclose(h1, h2, rtol=0, atol=2e-5 * np.abs(h2).max())  # fp32 rounding
    leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(leaves1) == 14  # A and B of the 7 projections, each stacked over the layers
    for a, b in zip(leaves1, leaves2, strict=True):
        assert a.shape[0] == CFG.num_layers and np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())  # fp32 rounding


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_equals_unrolled_with_dropout(model, remat):
    rows = packed_rows()
    scanned = hidden_and_grads(model, CFG.replace(remat=remat), rows)
    unrolled = hidden_and_grads(model, CFG.replace(remat=remat, scan_layers=False), rows)
    assert_same(scanned, unrolled)


def test_scanned_equals_the_layer_by_layer_reference(model):
    rows = packed_rows()
    real = rows[2] > 0
    got = np.asarray(model(*rows, dropout=Dropout(KEY)))[real]
    want = np.asarray(reference_hidden(model, *rows, KEY))[real]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not np.allclose(got, np.asarray(model(*rows))[real], atol=1e-3)  # dropout was on


def test_block_sparse_inside_the_scan(model):
    """The step's tile list is a loop-invariant input of the scanned layers."""
    rows = packed_rows()
    pairs = jnp.asarray(block_pairs(rows[2], block=4, causal=True, groups=1))
    sparse = CFG.replace(attention_impl="block_sparse", attention_block=4)
    got = hidden_and_grads(model, sparse, rows, pairs)
    want = hidden_and_grads(model, CFG.replace(scan_layers=False), rows)
    real = rows[2] > 0  # padding outputs differ between the two attentions; no one reads them
    np.testing.assert_allclose(got[0][real], want[0][real], rtol=0, atol=1e-5)


def count_dots(cfg):
    model = nnx.eval_shape(lambda: create_model(cfg, LORA, seed=0))
    rows = [jax.ShapeDtypeStruct((2, 16), jnp.int32)] * 3
    text = nnx.jit(lambda m, *r: m(*r)).lower(model, *rows).as_text()
    return text.count("dot_general")


def test_one_layer_body_whatever_the_depth():
    """Scanned, the program's matmuls do not grow with the layer count; unrolled, they do."""
    two, five = CFG.replace(num_layers=2), CFG.replace(num_layers=5)
    assert count_dots(two) == count_dots(five)
    unrolled = [count_dots(c.replace(scan_layers=False)) for c in (two, five)]
    assert unrolled[1] > unrolled[0]


def test_stacked_parameters_are_created_in_their_shards():
    mesh = parallel.make_mesh((1, 4, 2))
    cfg = CFG.replace(hidden_size=64, num_heads=8, num_kv_heads=4, intermediate_size=128)
    model = create_model(cfg, LORA, seed=0, mesh=mesh)
    q = model.layers.self_attn.q_proj
    assert q.weight.get_metadata()["logical_axes"] == ("layers", "q_heads", "embed")
    assert q.weight.get_value().shape == (3, 64, 64)
    assert q.weight.get_value().sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert q.lora_a.get_value().sharding.spec == PartitionSpec(None, None, "fsdp")
    assert model.layers.mlp.down_proj.weight.get_value().sharding.spec == PartitionSpec(
        None, "fsdp", "tensor"
    )
    assert model.embed_tokens.weight.get_value().sharding.spec == PartitionSpec("tensor", "fsdp")
    specs = nnx.to_flat_state(state_shardings(nnx.state(model), mesh))
    for path, sharding in specs:
        spec = sharding.get_value().spec
        if path[0] == "layers":
            assert spec[0] is None, path  # the layer axis is never split
