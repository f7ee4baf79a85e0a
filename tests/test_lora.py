"""LoRA: the layer formula, PEFT's init, the trainable/frozen split, adapter state I/O."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_iclemb.model import (
    FROZEN,
    TRAINABLE,
    LoraConfig,
    ModelConfig,
    create_model,
    load_lora_state,
    lora_state,
)
from jax_iclemb.model.hash_random import fold_key, random_words
from jax_iclemb.model.lora import (
    LORA_TARGETS,
    Dropout,
    Linear,
    apply_dropout,
    dense,
    keep_mask,
    low_rank,
)

CFG = ModelConfig(
    model_type="mistral",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    sliding_window=8,
    dtype="float32",
    param_dtype="float32",
)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.5)


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    positions = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    segments = np.ones((2, 12), np.int32)
    segments[1, 9:] = 0  # padding at the end of row 1
    return tokens, positions, segments


@nnx.jit
def forward(model, tokens, positions, segments):
    return model(tokens, positions, segments)


def loss(model):
    # A fixed random projection: sum(hidden²) would be nearly constant after the final RMSNorm.
    probe = jax.random.normal(jax.random.key(0), (2, 12, CFG.hidden_size))
    return jnp.sum(model(*batch()) * probe)


def randomize_adapters(model, seed=1):
    noisy = jax.tree.map(
        lambda x: 0.3 * jax.random.normal(jax.random.key(seed), x.shape), lora_state(model)
    )
    load_lora_state(model, noisy)


def test_linear_matches_formula_and_dropout_touches_only_adapter():
    layer = Linear(16, 12, ("mlp", "embed"), std=0.5, name="up_proj", bias=True, lora=LORA,
                   rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)  # fmt: skip
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(12, 16)), rng.normal(size=12)
    a, bb = rng.normal(size=(4, 16)), rng.normal(size=(12, 4))
    for var, value in ((layer.weight, w), (layer.bias, b), (layer.lora_a, a), (layer.lora_b, bb)):
        var[...] = jnp.asarray(value, jnp.float32)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    expected = x @ w.T + b + (8.0 / 4) * (x @ a.T @ bb.T)

    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)  # no key: no dropout

    key = jax.random.key(3)
    keep, p = keep_mask(fold_key(key, LORA_TARGETS.index("up_proj")), x.shape, 0.5)
    dropped = np.where(keep, x / p, 0)
    want = x @ w.T + b + (8.0 / 4) * (dropped @ a.T @ bb.T)  # the mask is on the adapter input
    np.testing.assert_allclose(layer(x, Dropout(key)), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(layer(x, Dropout(key)), expected, atol=1e-3)
    layer.lora_b[...] = jnp.zeros((12, 4))
    base = x @ w.T + b  # the base is untouched
    np.testing.assert_allclose(layer(x, Dropout(key)), base, rtol=1e-5, atol=1e-5)


def test_hand_written_backwards_equal_autodiff():
    """The hand-written backward of x Wᵀ and of (x Aᵀ) Bᵀ against JAX's own differentiation of
    the formulas, for every input."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(12, 16)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
    cases = [
        (dense, lambda x, w: x @ w.T, (x, w)),
        (low_rank, lambda x, a, b: (x @ a.T) @ b.T, (x, a, b)),
    ]
    def probed(fn):
        return lambda *z: jnp.sum(fn(*z) * probe)

    for ours, formula, args in cases:
        argnums = tuple(range(len(args)))
        got = jax.grad(probed(ours), argnums=argnums)(*args)
        want = jax.grad(probed(formula), argnums=argnums)(*args)
        np.testing.assert_allclose(ours(*args), formula(*args), rtol=1e-6)
        for g, v in zip(got, want, strict=True):
            np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_mask_rate_and_independence(rate):
    """Bernoulli(1 - rate) per entry, within 5 standard errors, at the documented 32-bit rate;
    masks of other keys (projections, layers) and of neighbouring entries, rows and positions are
    uncorrelated."""
    shape = (64, 257, 33)
    key = jax.random.key(0)
    keep, p = keep_mask(key, shape, rate)
    keep = np.asarray(keep, np.float64)
    assert p == 1 - round(rate * 2**32) / 2**32 and abs(p - (1 - rate)) < 2**-32
    se = math.sqrt(p * (1 - p) / keep.size)
    assert abs(keep.mean() - p) < 5 * se
    others = [np.asarray(keep_mask(k, shape, rate)[0], np.float64)
              for k in (jax.random.key(1), fold_key(key, 0), fold_key(key, 1),
                        fold_key(fold_key(key, 1), 0))]  # fmt: skip
    others += [np.roll(keep, 1, axis=a) for a in (0, 1, 2)]  # the next row, position, feature
    for other in others:
        corr = np.corrcoef(keep.ravel(), other.ravel())[0, 1]
        assert abs(corr) < 5 / math.sqrt(keep.size)
    x = jnp.ones(shape)
    np.testing.assert_allclose(float(apply_dropout(x, rate, key).mean()), 1.0, atol=0.01)
    # The mask is drawn under its own jit (traced once per shape): the same bits as the words
    # compared to the threshold directly, here and inside a jitted caller.
    words = np.asarray(random_words(key, shape))
    np.testing.assert_array_equal(keep, words >= round(rate * 2**32))
    inside = jax.jit(lambda k: keep_mask(k, shape, rate)[0])(key)
    np.testing.assert_array_equal(np.asarray(inside, np.float64), keep)


def test_a_row_id_gives_the_row_that_index_s_words():
    """`rows`: row r is hashed as row ids[r], so a row keeps its words wherever it is placed."""
    key, shape = jax.random.key(11), (6, 5, 8)
    ids = np.array([4, 0, 5, 2, 3, 1])
    placed = np.asarray(random_words(key, shape, rows=jnp.asarray(ids)))
    np.testing.assert_array_equal(placed, np.asarray(random_words(key, shape))[ids])
    keep, _ = keep_mask(key, shape, 0.3, rows=jnp.asarray(ids))
    np.testing.assert_array_equal(keep, np.asarray(keep_mask(key, shape, 0.3)[0])[ids])


def test_random_words_are_uniform_and_do_not_depend_on_sharding():
    """Every bit is a fair coin and every byte value equally likely (chi-square over 256 bins,
    5 sigma); the words of a row-sharded array equal the unsharded ones (global positions)."""
    shape = (8, 128, 96)
    words = np.asarray(random_words(jax.random.key(7), shape))
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.abs(bits.mean(axis=(0, 1, 2)) - 0.5).max() < 5 * 0.5 / math.sqrt(words.size)
    for shift in (0, 8, 16, 24):
        counts = np.bincount(((words >> shift) & 255).ravel(), minlength=256)
        expected = words.size / 256
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert abs(chi2 - 255) < 5 * math.sqrt(2 * 255)
    assert len(np.unique(words)) > 0.99 * words.size  # no short cycles
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.jit(random_words, static_argnums=1, out_shardings=rows)(jax.random.key(7), shape)
    assert len(sharded.sharding.device_set) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(sharded), words)


def test_adapter_init_follows_peft():
    layer = Linear(256, 8, ("mlp", "embed"), std=0.02, lora=LoraConfig(rank=64), rngs=nnx.Rngs(0))
    a = np.asarray(layer.lora_a[...])
    assert a.dtype == np.float32 and layer.lora_b[...].dtype == jnp.float32
    assert a.shape == (64, 256) and layer.lora_b[...].shape == (8, 64)
    # torch kaiming_uniform_(a=√5): gain √(2/(1+5)), bound = gain·√(3/fan_in) = 1/√fan_in.
    bound = math.sqrt(2 / 6) * math.sqrt(3 / 256)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.03 * bound
    assert not np.any(np.asarray(layer.lora_b[...]))
    assert layer.weight[...].dtype == jnp.bfloat16  # default param_dtype


@pytest.fixture(scope="module")
def models():
    base = create_model(CFG, None, seed=0)
    adapted = create_model(CFG, LORA, seed=5)
    nnx.update(adapted, nnx.state(base, nnx.Param))  # same base weights, fresh adapters
    return base, adapted


def test_fresh_adapter_leaves_outputs_unchanged(models):
    base, adapted = models
    assert not jax.tree.leaves(nnx.state(base, TRAINABLE))  # lora=None: no adapters at all
    # Even with dropout active: B = 0.
    hidden = adapted(*batch(), dropout=Dropout(jax.random.key(0)))
    np.testing.assert_allclose(hidden, forward(base, *batch()), atol=1e-6)


def test_optimizer_step_changes_only_lora_params(models):
    _, model = models
    model = nnx.clone(model)
    randomize_adapters(model)  # B ≠ 0 so that A gets a gradient too
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=TRAINABLE)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE))(model)
        optimizer.update(model, grads)

    before_frozen = {
        p: np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, FROZEN))
    }
    before_lora = {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(lora_state(model))}
    assert ("embed_tokens", "weight") in before_frozen
    step(model, optimizer)
    for path, var in nnx.to_flat_state(nnx.state(model, FROZEN)):
        np.testing.assert_array_equal(var.get_value(), before_frozen[path], err_msg=str(path))
    for path, var in nnx.to_flat_state(lora_state(model)):
        assert not np.array_equal(var.get_value(), before_lora[path]), path


def test_remat_gives_the_same_gradients(models):
    _, model = models
    model = nnx.clone(model)
    randomize_adapters(model)
    remat = create_model(CFG.replace(remat="dots"), LORA, seed=9)
    nnx.update(remat, nnx.state(model, nnx.Param))

    @nnx.jit
    def grads(m):
        return nnx.grad(loss, argnums=nnx.DiffState(0, TRAINABLE))(m)

    for got, want in zip(jax.tree.leaves(grads(remat)), jax.tree.leaves(grads(model)), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_lora_state_round_trip_and_errors(models):
    _, model = models
    source = nnx.clone(model)
    randomize_adapters(source, seed=7)
    target = nnx.clone(model)
    load_lora_state(target, lora_state(source))
    for (_, got), (_, want) in zip(
        nnx.to_flat_state(lora_state(target)), nnx.to_flat_state(lora_state(source)), strict=True
    ):
        np.testing.assert_array_equal(got.get_value(), want.get_value())

    # Stacked layers: errors name each layer's tensor as Hugging Face / PEFT do.
    state = lora_state(source)
    state["layers"]["self_attn"]["q_proj"]["lora_a"] = jnp.zeros((2, 3, 32))
    with pytest.raises(
        ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_a.*\(3, 32\).*\(4, 32\)"
    ):
        load_lora_state(target, state)
    state["layers"]["self_attn"]["q_proj"]["lora_a"] = jnp.zeros((3, 4, 32))  # one layer too many
    with pytest.raises(ValueError, match=r"unexpected \['layers\.2\.self_attn\.q_proj\.lora_a'\]"):
        load_lora_state(target, state)
    del state["layers"]["mlp"]["up_proj"]["lora_b"]
    with pytest.raises(
        ValueError, match=r"missing \['layers\.0\.mlp\.up_proj\.lora_b', 'layers\.1\.mlp"
    ):
        load_lora_state(target, state)
