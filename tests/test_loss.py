"""contrastive_loss against a direct NumPy implementation (loops, one query at a time)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jax_iclemb.loss import contrastive_loss
from jax_iclemb.parallel import make_mesh

TAU = 0.02


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def reference(q, p, pm, in_batch, teacher=None, has_teacher=None, weight=0.0, neg_mask=None):
    """InfoNCE + distillation written out per query, in float64."""
    b, g, _ = p.shape
    flat = p.reshape(b * g, -1)
    ce, kd, correct, pos, hardest = [], [], [], [], []
    for i in range(b):
        if not pm[i, 0]:
            continue  # padding query
        cols = []
        for j in range(b):
            for s in range(g):
                c = j * g + s
                if not pm[j, s] or (not in_batch and j != i):
                    continue
                if c != i * g and neg_mask is not None and neg_mask[i, c]:
                    continue
                cols.append(c)
        sims = np.array([q[i] @ flat[c] for c in cols])
        target = cols.index(i * g)
        ce.append(-_log_softmax(sims / TAU)[target])
        correct.append(float(np.argmax(sims) == target))
        pos.append(sims[target])
        if len(cols) > 1:
            hardest.append(max(s for c, s in zip(cols, sims, strict=True) if c != i * g))
        if teacher is not None and has_teacher[i]:
            slots = [s for s in range(g) if pm[i, s]]
            t = np.exp(_log_softmax(teacher[i, slots]))
            student = _log_softmax(np.array([q[i] @ p[i, s] / TAU for s in slots]))
            kd.append(-(t * student).sum())
    distill = np.mean(kd) if kd else 0.0
    metrics = {
        "contrastive_loss": np.mean(ce),
        "distill_loss": distill,
        "accuracy": np.mean(correct),
        "positive_score": np.mean(pos),
        "hardest_negative_score": np.mean(hardest) if hardest else 0.0,
    }
    return np.mean(ce) + weight * distill, metrics


def _case(seed, b, g, d, extras):
    rng = np.random.default_rng(seed)
    q, p = _unit(rng, b, d), _unit(rng, b, g, d)
    pm = np.ones((b, g), bool)
    kwargs = {}
    if extras in ("holes", "all"):
        pm = rng.random((b, g)) < 0.6
        pm[:, 0] = True
        if extras == "all":
            pm[1] = False  # one padding query
    if extras in ("negmask", "all"):
        neg = rng.random((b, b * g)) < 0.3
        neg[np.arange(b), np.arange(b) * g] = True  # must not drop the own positive
        kwargs["negative_mask"] = neg
    if extras in ("distill", "all"):
        kwargs["teacher_scores"] = rng.normal(scale=3.0, size=(b, g))
        kwargs["has_teacher"] = np.arange(b) % 3 != 2
        kwargs["distill_weight"] = 0.7
    return q, p, pm, kwargs


_jitted = jax.jit(partial(contrastive_loss, temperature=TAU), static_argnames="distill_weight")


@pytest.mark.parametrize("b,g", [(4, 3), (5, 4)])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("extras", ["plain", "holes", "negmask", "distill", "all"])
def test_matches_numpy_reference(b, g, in_batch, extras):
    q, p, pm, kwargs = _case(b * 10 + g, b, g, 16, extras)
    want_loss, want_metrics = reference(
        q,
        p,
        pm,
        in_batch,
        kwargs.get("teacher_scores"),
        kwargs.get("has_teacher"),
        kwargs.get("distill_weight", 0.0),
        kwargs.get("negative_mask"),
    )
    f32 = {
        k: jnp.asarray(v, jnp.float32) if k == "teacher_scores" else v for k, v in kwargs.items()
    }
    loss, metrics = _jitted(
        jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32), pm, jnp.asarray(in_batch), **f32
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, want in want_metrics.items():
        np.testing.assert_allclose(metrics[name], want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gradients_finite_with_masked_rows():
    q, p, pm, kwargs = _case(0, 4, 3, 8, "all")
    pm[2, 1:] = False  # a query whose group holds only its positive
    # Not jitted: op-by-op execution exposes NaNs that XLA's fusion may happen to hide.
    loss_fn = partial(contrastive_loss, temperature=TAU, **kwargs)
    for in_batch in (True, False):
        (loss, _), grads = jax.value_and_grad(
            lambda q, p, flag=in_batch: loss_fn(q, p, pm, jnp.asarray(flag)),
            argnums=(0, 1),
            has_aux=True,
        )(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32))
        assert np.isfinite(loss)
        for grad in grads:
            assert np.isfinite(np.asarray(grad)).all()
        assert np.abs(np.asarray(grads[0])).sum() > 0
        np.testing.assert_array_equal(grads[0][1], 0.0)  # the padding query gets no gradient


def test_one_compile_serves_both_modes():
    q, p, pm, _ = _case(1, 4, 3, 8, "holes")
    f = jax.jit(partial(contrastive_loss, temperature=TAU))
    with_in_batch, _ = f(q, p, pm, jnp.asarray(True))
    without, _ = f(q, p, pm, jnp.asarray(False))
    assert f._cache_size() == 1
    np.testing.assert_allclose(with_in_batch, reference(q, p, pm, True)[0], rtol=1e-5)
    np.testing.assert_allclose(without, reference(q, p, pm, False)[0], rtol=1e-5)


def test_sharded_global_batch_equals_single_device():
    b, g, d = 16, 3, 8
    q, p, pm, kwargs = _case(2, b, g, d, "distill")
    mesh = make_mesh((-1, 1, 1))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded = [jax.device_put(np.asarray(x, np.float32), rows) for x in (q, p)]
    pm_sharded = jax.device_put(pm, rows)
    assert sharded[1].sharding.num_devices == 8
    f = jax.jit(partial(contrastive_loss, temperature=TAU, distill_weight=0.5))
    extra = {k: v for k, v in kwargs.items() if k != "distill_weight"}
    got, _ = f(*sharded, pm_sharded, jnp.asarray(True), **extra)
    cpu0 = jax.devices()[0]
    single = [jax.device_put(np.asarray(x, np.float32), cpu0) for x in (q, p)]
    want, _ = f(*single, jax.device_put(pm, cpu0), jnp.asarray(True), **extra)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        want, reference(q, p, pm, True, weight=0.5, **_teacher(kwargs))[0], rtol=1e-5
    )


def _teacher(kwargs):
    return {"teacher": kwargs["teacher_scores"], "has_teacher": kwargs["has_teacher"]}


def test_shape_errors_name_the_argument():
    q, p, pm, _ = _case(3, 4, 3, 8, "plain")
    with pytest.raises(ValueError, match="passage_mask"):
        contrastive_loss(q, p, pm[:, :2], True, temperature=TAU)
    with pytest.raises(ValueError, match="negative_mask"):
        contrastive_loss(q, p, pm, True, temperature=TAU, negative_mask=np.zeros((4, 4), bool))
