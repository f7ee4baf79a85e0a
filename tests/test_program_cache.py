"""Step programs kept across runs (program_cache.py): a kept program computes bit for bit what
tracing the step computes; whatever its key holds, changed, misses; a damaged file is traced again
and replaced."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from test_gradcache import batch, config, tiny

from jax_iclemb import program_cache
from jax_iclemb.checkpoint import abstract_like
from jax_iclemb.config import load_config
from jax_iclemb.model import LoraConfig, create_model
from jax_iclemb.train_step import make_grad_fn


@pytest.fixture(scope="module")
def step():
    """The trainer's gradient program (LoRA dropout on) and its arguments."""
    graphdef, params, frozen = tiny(dropout=0.3)
    grad = jax.jit(make_grad_fn(graphdef, config(1)))
    return grad, (params, frozen, batch(), jnp.int32(5))


def assert_bitwise(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_kept_program_computes_what_tracing_the_step_computes(step, tmp_path):
    grad, args = step
    want = grad(*args)
    lowered, kept = program_cache.lower(grad, abstract_like(args), tmp_path, "run")
    assert not kept and len(list(tmp_path.glob("*.jaxexport"))) == 1
    assert_bitwise(lowered.compile()(*args), want)
    lowered, kept = program_cache.lower(grad, abstract_like(args), tmp_path, "run")
    assert kept  # no trace of the model this time
    assert_bitwise(lowered.compile()(*args), want)
    assert list(tmp_path.iterdir()) == list(tmp_path.glob("*.jaxexport"))  # no temporaries left


def test_no_folder_lowers_the_step_itself(step):
    grad, args = step
    lowered, kept = program_cache.lower(grad, abstract_like(args), None, "run")
    assert not kept and lowered.as_text() == grad.lower(*abstract_like(args)).as_text()


def _refuse(*_, **__):
    raise ValueError("custom call with no compatibility guarantee")


@pytest.mark.parametrize(
    "breaks",
    [
        # a program export refuses (cuDNN, Pallas kernels)
        lambda mp: mp.setattr(program_cache.export, "export", _refuse),
        # a JAX whose private trace settings moved: no key, so nothing is kept
        lambda mp: mp.delattr(program_cache.jax_config, "trace_context"),
    ],
    ids=["export-refuses", "no-trace-settings"],
)
def test_what_cannot_be_kept_is_lowered_as_it_is(step, tmp_path, monkeypatch, breaks):
    grad, args = step
    breaks(monkeypatch)
    lowered, kept = program_cache.lower(grad, abstract_like(args), tmp_path, "run")
    assert not kept and not list(tmp_path.iterdir())
    assert lowered.as_text() == grad.lower(*abstract_like(args)).as_text()


def test_a_damaged_file_is_traced_again_and_replaced(step, tmp_path, caplog):
    grad, args = step
    program_cache.lower(grad, abstract_like(args), tmp_path, "run")
    (path,) = tmp_path.glob("*.jaxexport")
    path.write_bytes(path.read_bytes()[:100])  # as if cut short by hand
    with caplog.at_level(logging.WARNING, logger="jax_iclemb.program_cache"):
        lowered, kept = program_cache.lower(grad, abstract_like(args), tmp_path, "run")
    assert not kept and "did not load" in caplog.text
    assert_bitwise(lowered.compile()(*args), grad(*args))
    assert program_cache.lower(grad, abstract_like(args), tmp_path, "run")[1]  # replaced


def test_the_key_holds_the_run_the_shapes_the_code_and_the_tracing_settings(step, monkeypatch):
    _, args = step
    key = program_cache.program_key(abstract_like(args), "run")
    assert program_cache.program_key(abstract_like(args), "run") == key  # stable
    assert program_cache.program_key(abstract_like(args), "another run") != key
    params, frozen, b, s = args
    longer = dataclasses.replace(b, tokens=jnp.concatenate([b.tokens, b.tokens], axis=1))
    assert program_cache.program_key(abstract_like((params, frozen, longer, s)), "run") != key
    as_int16 = (params, frozen, b, jnp.int16(5))
    assert program_cache.program_key(abstract_like(as_int16), "run") != key
    with jax.default_matmul_precision("highest"):
        assert program_cache.program_key(abstract_like(args), "run") != key
    monkeypatch.setattr(program_cache, "_source_digest", lambda: "edited code")
    assert program_cache.program_key(abstract_like(args), "run") != key


def test_runs_that_differ_only_in_the_loop_share_their_programs():
    graphdef = tiny(dropout=0.3)[0]

    def context(*overrides, model=graphdef):
        config = load_config(REPO / "configs" / "tiny.py", overrides)
        return program_cache.run_context(config, model)

    base = context()
    loop_only = ["--config.train.steps=7", "--config.train.compile_workers=3",
                 "--config.train.compile_ahead=9", "--config.train.log_every=5",
                 "--config.train.checkpoint_every=3", "--config.eval.every=2",
                 "--config.eval.data=beir"]
    assert context(*loop_only) == base
    for override in ["--config.lora.rank=4", "--config.lora.dropout=0.2", "--config.seed=1",
                     "--config.loss.temperature=0.1", "--config.train.grad_cache_chunks=2",
                     "--config.model.attention_impl=xla"]:
        assert context(override) != base, override
    # A model setting the config does not hold (a pretrained folder's, say) is in the key too.
    graphdef, params, frozen = tiny(dropout=0.3)
    cfg = nnx.merge(graphdef, params, frozen).config
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.3)
    same = nnx.graphdef(create_model(cfg, lora))
    other = nnx.graphdef(create_model(dataclasses.replace(cfg, rms_norm_eps=1e-5), lora))
    assert context(model=same) == context(model=graphdef)
    assert context(model=other) != context(model=graphdef)
