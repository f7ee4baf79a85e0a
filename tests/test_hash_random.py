"""Fresh weights from the keyed hash (`model.hash_random`): `uniform` and `normal` follow their
distributions (Kolmogorov–Smirnov against the exact CDF, moments within 5 standard errors), stay
finite and inside their bounds, and a created model's weights have the configured scales."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from jax_iclemb.model import ModelConfig, create_model
from jax_iclemb.model.hash_random import normal, uniform

N = 1 << 20
# The KS statistic's critical value at p = 0.001 for N samples.
KS_LIMIT = 1.95 / math.sqrt(N)


def test_uniform_is_uniform_and_strictly_inside():
    x = np.asarray(uniform(jax.random.key(11), (1024, N // 1024), -0.5, 2.0), np.float64)
    assert x.min() > -0.5 and x.max() < 2.0
    assert stats.kstest(x.ravel(), stats.uniform(-0.5, 2.5).cdf).statistic < KS_LIMIT
    assert abs(x.mean() - 0.75) < 5 * 2.5 / math.sqrt(12 * N)


def test_normal_is_standard_normal():
    x = np.asarray(normal(jax.random.key(12), (N,)), np.float64)
    assert np.isfinite(x).all() and np.abs(x).max() < 5.5
    assert stats.kstest(x, stats.norm.cdf).statistic < KS_LIMIT
    assert abs(x.mean()) < 5 / math.sqrt(N)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / N)
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / N)  # tails as heavy as a normal's
    other = np.asarray(normal(jax.random.key(13), (N,)), np.float64)
    assert abs(np.corrcoef(x, other)[0, 1]) < 5 / math.sqrt(N)  # keys give independent draws


@pytest.mark.parametrize("init", ["normal", "fan_in"])
def test_created_weights_have_the_configured_scale(init):
    cfg = ModelConfig(model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=160,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      initializer_range=0.05, init=init, dtype="float32", param_dtype="float32")
    model = create_model(cfg, seed=0)
    down = np.asarray(model.layers.mlp.down_proj.weight[...])  # [layers, 64, 160]
    embed = np.asarray(model.embed_tokens.weight[...])
    if init == "normal":
        want_down, want_embed = 0.05, 0.05
    else:  # σ = 1/√fan_in, × 1/√(2·layers) on down_proj; embeddings σ = 1
        want_down, want_embed = 1 / math.sqrt(160) / math.sqrt(4), 1.0
    assert abs(down.std() / want_down - 1) < 5 * math.sqrt(2 / down.size)
    assert abs(embed.std() / want_embed - 1) < 5 * math.sqrt(2 / embed.size)
    assert not np.allclose(down[0], down[1])  # each layer its own draw
