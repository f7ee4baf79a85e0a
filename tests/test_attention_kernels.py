"""Fused attention kernels for packed rows equal the dense-mask XLA path: causal and
bidirectional, segment ids, grouped KV heads, forward and gradients; and the decoder gives the
same hidden states and LoRA gradients with either implementation.

Two kinds of test. In the Pallas interpreter (any platform, CPU by default), fp32: what our code
around the Pallas kernels does (layouts, GQA, segment ids, the per-shard call), not the kernels'
compiled code. Compiled for real (`accelerator(PLATFORM)`, skipped elsewhere; on a GPU machine
`JAX_ICLEMB_TEST_PLATFORM=gpu pytest -m accelerator`), bf16 against the XLA path in fp32 on the same
bf16 values: pallas and cudnn on a GPU, splash on a TPU.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_iclemb import parallel
from jax_iclemb.model import TRAINABLE, LoraConfig, ModelConfig, create_model
from jax_iclemb.model.attention import dot_product_attention

# Row 0: segments of 21, 30 and 9 tokens, then 4 padding columns; row 1 a single full segment.
LENGTHS = ((21, 30, 9), (64,))


def packed_ids(length: int) -> tuple[np.ndarray, np.ndarray]:
    segs = np.zeros((len(LENGTHS), length), np.int32)
    pos = np.zeros_like(segs)
    for r, lens in enumerate(LENGTHS):
        start = 0
        for s, n in enumerate(lens):
            segs[r, start : start + n] = s + 1
            pos[r, start : start + n] = np.arange(n)
            start += n
    return segs, pos


def qkv(length: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    keys = jax.random.split(jax.random.key(0), 4)
    r = len(LENGTHS)
    q = jax.random.normal(keys[0], (r, length, heads, head_dim))
    k = jax.random.normal(keys[1], (r, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (r, length, kv_heads, head_dim))
    cotangent = jax.random.normal(keys[3], q.shape)
    return q, k, v, cotangent


def numpy_attention(q, k, v, segs, pos, *, causal: bool, window: int | None) -> np.ndarray:
    """The definition, one row and head at a time, in float64: softmax over the keys of the same
    segment (and not after the query, and within the window) of q·k / sqrt(Dh), times v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    rows, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    cols = np.arange(length)
    for r in range(rows):
        allowed = segs[r][:, None] == segs[r][None, :]
        if causal:
            allowed &= cols[:, None] >= cols[None, :]
        if window is not None:
            dist = pos[r][:, None] - pos[r][None, :]
            allowed &= (dist if causal else np.abs(dist)) < window
        for h in range(heads):
            scores = q[r, :, h] @ k[r, :, h // group].T / np.sqrt(head_dim)
            scores = np.where(allowed, scores, -np.inf)
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[r, :, h] = weights / weights.sum(axis=1, keepdims=True) @ v[r, :, h // group]
    return out


@pytest.mark.parametrize("backend", ["cpu", "gpu"], ids=["row-by-row", "rows-at-once"])
@pytest.mark.parametrize(
    ("causal", "window"), [(True, None), (False, None), (True, 100), (False, 100)],
    ids=["causal", "bidirectional", "causal-window", "bidirectional-window"],
)
def test_xla_path_equals_the_definition_across_query_chunks(causal, window, backend, monkeypatch):
    """Rows of 320 tokens: three query chunks (the last one short), segments that cross chunk
    boundaries, a window shorter than a segment; traced as for a CPU (a row at a time) and as for
    an accelerator (every row at once)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    length, lengths = 320, ((150, 100, 50), (300,))
    segs = np.zeros((2, length), np.int32)
    pos = np.zeros_like(segs)
    for r, lens in enumerate(lengths):
        ends = np.cumsum(lens)
        for s, (n, end) in enumerate(zip(lens, ends)):
            segs[r, end - n : end] = s + 1
            pos[r, end - n : end] = np.arange(n)
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 16))
    k, v = (jax.random.normal(key, (2, length, 2, 16)) for key in keys[1:])
    got = dot_product_attention(
        q, k, v, jnp.asarray(segs), jnp.asarray(pos), causal=causal, sliding_window=window
    )
    want = numpy_attention(q, k, v, segs, pos, causal=causal, window=window)
    real = segs > 0  # padding's outputs are never used
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5)


# Where each fused kernel compiles; elsewhere only the Pallas ones run, in the interpreter.
COMPILES_ON = {"pallas": "gpu", "cudnn": "gpu", "splash": "tpu"}
# bf16 kernels against fp32 XLA: relative L2 error of outputs and gradients. A wrong mask or
# layout errs by O(1); bf16 rounding of inputs and outputs by ~1e-2 at most.
BF16_REL_ERROR = 2e-2


def compiled(impl: str):
    """A parameter `impl` whose test compiles the kernel on its platform (skipped elsewhere)."""
    return pytest.param(impl, marks=pytest.mark.accelerator(COMPILES_ON[impl]), id=impl)


def value_and_grads(impl: str, q, k, v, cotangent, segs, pos, causal: bool, interpret=None):
    f = lambda q, k, v: dot_product_attention(
        q, k, v, jnp.asarray(segs), jnp.asarray(pos), causal=causal, impl=impl,
        interpret=interpret,
    )
    out, pull = jax.vjp(f, q, k, v)
    return out, pull(cotangent)


def relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(
    ("impl", "length", "causal"),
    [("pallas", 64, True), ("pallas", 64, False), ("splash", 128, True)],
)
def test_kernel_in_the_pallas_interpreter_equals_dense_mask_attention(impl, length, causal):
    segs, pos = packed_ids(length)
    q, k, v, cot = qkv(length)
    out, grads = value_and_grads(impl, q, k, v, cot, segs, pos, causal, interpret=True)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, cot, segs, pos, causal)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("impl", [compiled("pallas"), compiled("cudnn"), compiled("splash")])
def test_compiled_kernel_equals_dense_mask_attention(impl, causal):
    """Mistral's head size, rows of 256 (splash tiles of 128 and more), bf16 as in training."""
    segs, pos = packed_ids(256)
    q, k, v, cot = (x.astype(jnp.bfloat16) for x in qkv(256, head_dim=128))
    out, grads = value_and_grads(impl, q, k, v, cot, segs, pos, causal, interpret=False)
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = value_and_grads(
            "xla", *(x.astype(jnp.float32) for x in (q, k, v, cot)), segs, pos, causal
        )
    real = segs > 0  # outputs on padding are never used (and differ by design)
    assert relative_error(np.asarray(out)[real], np.asarray(ref_out)[real]) < BF16_REL_ERROR
    for name, g, ref in zip("qkv", grads, ref_grads):
        error = relative_error(np.asarray(g)[real], np.asarray(ref)[real])
        assert error < BF16_REL_ERROR, f"d{name}: relative error {error:.3g}"


def test_kernel_without_window_refuses_a_window_shorter_than_the_row():
    segs, pos = packed_ids(64)
    q, k, v, _ = qkv(64)
    with pytest.raises(ValueError, match="sliding window"):
        dot_product_attention(q, k, v, segs, pos, sliding_window=16, impl="pallas")


def decoder_hidden_and_grads(impl: str, *, dtype: str, head_dim: int, length: int, mesh=None):
    """A 1-layer Mistral-shaped decoder with LoRA on packed rows: (hidden states on real tokens,
    gradient of a fixed projection of them with respect to every LoRA parameter, flattened).
    Mistral's window (longer than the row) is inert."""
    arch = dict(
        model_type="mistral", vocab_size=64, hidden_size=64, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        sliding_window=4096,
    )
    config = ModelConfig.from_hf(arch, dtype=dtype, param_dtype="float32", attention_impl=impl)
    model = create_model(config, LoraConfig(rank=4, alpha=8.0, dropout=0.0), seed=0)
    graphdef, params, rest = nnx.split(model, TRAINABLE, ...)
    segs, pos = packed_ids(length)
    real = jnp.asarray(segs > 0)
    tokens = jax.random.randint(jax.random.key(1), segs.shape, 0, 64)
    weights = jax.random.normal(jax.random.key(2), (*segs.shape, 64))

    def loss(params):
        hidden = nnx.merge(graphdef, params, rest)(tokens, jnp.asarray(pos), jnp.asarray(segs))
        hidden = jnp.where(real[..., None], hidden.astype(jnp.float32), 0)
        return jnp.sum(hidden * weights), hidden

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    return np.asarray(hidden)[np.asarray(real)], flat


def test_decoder_in_the_pallas_interpreter_on_a_mesh_equals_xla():
    """The decoder's call site, with the kernel run per shard (rows over data, heads over tensor)
    on 4 emulated CPU devices, against the XLA path without a mesh."""
    if jax.default_backend() != "cpu":
        pytest.skip("the interpreter on an emulated CPU mesh; compiled: test_compiled_kernel_*")
    mesh = parallel.make_mesh((2, 1, 2), jax.devices()[:4])
    got = decoder_hidden_and_grads("pallas", dtype="float32", head_dim=16, length=64, mesh=mesh)
    want = decoder_hidden_and_grads("xla", dtype="float32", head_dim=16, length=64)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=2e-4)
    assert np.abs(want[1]).max() > 0  # the adapters do get a gradient


@pytest.mark.parametrize("impl", [compiled("pallas"), compiled("cudnn"), compiled("splash")])
def test_compiled_kernel_in_the_decoder_gives_the_xla_path_gradients(impl):
    """bf16 compute, one device; the reference is the XLA path at the same dtype."""
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    got = decoder_hidden_and_grads(impl, dtype="bfloat16", head_dim=128, length=256, mesh=mesh)
    want = decoder_hidden_and_grads("xla", dtype="bfloat16", head_dim=128, length=256, mesh=mesh)
    assert relative_error(got[0], want[0]) < BF16_REL_ERROR
    assert relative_error(got[1], want[1]) < BF16_REL_ERROR
