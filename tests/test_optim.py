"""Schedule against HF's schedulers and hand formulas; accumulation and clipping against NumPy."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jax_iclemb.optim import global_norm, make_optimizer, make_schedule


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_matches_hugging_face(decay):
    torch = pytest.importorskip("torch")
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make_hf = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = make_hf[decay](opt, num_warmup_steps=10, num_training_steps=50)
    ours = make_schedule(2e-4, 10, 50, decay)
    for step in (0, 1, 5, 9, 10, 11, 30, 49, 50):
        np.testing.assert_allclose(ours(step), 2e-4 * hf.lr_lambdas[0](step), rtol=1e-5, atol=1e-12)


def test_schedule_hand_values():
    lr = 1e-3
    linear = make_schedule(lr, 10, 50, "linear", end_lr_ratio=0.1)
    cosine = make_schedule(lr, 10, 50, "cosine", end_lr_ratio=0.1)
    constant = make_schedule(lr, 10, 50, "constant")
    expected = [
        (linear, 0, 0.0),
        (linear, 4, 4e-4),  # warm-up: lr * 4 / 10
        (linear, 10, lr),  # peak
        (linear, 30, lr * (0.1 + 0.9 * 0.5)),  # halfway through decay
        (linear, 50, lr * 0.1),  # end
        (linear, 80, lr * 0.1),  # held after the end
        (cosine, 10, lr),
        (cosine, 20, lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))),
        (cosine, 30, lr * (0.1 + 0.9 * 0.5)),
        (cosine, 50, lr * 0.1),
        (constant, 5, 5e-4),
        (constant, 10, lr),
        (constant, 50, lr),
    ]
    for schedule, step, want in expected:
        np.testing.assert_allclose(schedule(step), want, rtol=1e-6, atol=1e-12)


def _adamw_reference(grads, lr, b1, b2, eps, wd, clip, param):
    """Plain NumPy AdamW with global-norm clipping, one update per gradient."""
    m = v = np.zeros_like(param)
    for t, g in enumerate(grads, 1):
        g = g * min(1.0, clip / np.linalg.norm(g))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        param = param - lr * (mhat / (np.sqrt(vhat) + eps) + wd * param)
    return param


CONFIG = {"lr": 0.1, "warmup_steps": 0, "decay": "constant", "weight_decay": 0.01, "grad_clip": 0.5}


def _run(tx, param, grads):
    state = tx.init(param)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, param)
        param = param + updates
    return np.asarray(param)


def test_clipping_and_adamw_match_formula():
    rng = np.random.default_rng(0)
    param = rng.normal(size=5)
    # Step 1 is clipped (norm 10 > 0.5), step 2 is not: Adam's second update sees the ratio.
    grads = [rng.normal(size=5), 0.05 * rng.normal(size=5)]
    grads[0] *= 10 / np.linalg.norm(grads[0])
    tx, _ = make_optimizer(CONFIG, total_steps=10)
    want = _adamw_reference(grads, 0.1, 0.9, 0.999, 1e-8, 0.01, 0.5, param)
    np.testing.assert_allclose(_run(tx, jnp.asarray(param), grads), want, rtol=1e-5, atol=1e-6)
    unclipped = _adamw_reference(grads, 0.1, 0.9, 0.999, 1e-8, 0.01, np.inf, param)
    assert np.abs(unclipped - want).max() > 1e-3  # the case does exercise the clip
    np.testing.assert_allclose(global_norm({"a": grads[0][:2], "b": grads[0][2:]}), 10, rtol=1e-6)


def test_accumulation_equals_one_step_on_the_mean():
    rng = np.random.default_rng(1)
    param = jnp.asarray(rng.normal(size=4))
    micro = [rng.normal(size=4) for _ in range(6)]  # 2 updates x 3 micro-steps
    accumulated, _ = make_optimizer({**CONFIG, "accumulate_steps": 3}, total_steps=10)
    single, _ = make_optimizer(CONFIG, total_steps=10)
    means = [np.mean(micro[:3], axis=0), np.mean(micro[3:], axis=0)]
    np.testing.assert_allclose(
        _run(accumulated, param, micro), _run(single, param, means), rtol=1e-5
    )
    # Between real updates the parameters do not move.
    np.testing.assert_allclose(_run(accumulated, param, micro[:2]), param)


def test_bad_config_is_named():
    with pytest.raises(KeyError, match="learning_rate"):
        make_optimizer({"learning_rate": 1e-4}, total_steps=10)
    with pytest.raises(ValueError, match=r"optim\.decay"):
        make_optimizer({"decay": "step"}, total_steps=10)
