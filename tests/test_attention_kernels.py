"""Fused attention kernels for packed rows equal the dense-mask XLA path (fp32, on CPU the Pallas
kernels run in the Pallas interpreter): causal and bidirectional, segment ids, grouped KV heads,
forward and gradients; and the decoder gives the same hidden states with either implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_iclemb import parallel
from jax_iclemb.model import LoraConfig, ModelConfig, create_model
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


def value_and_grads(impl: str, q, k, v, cotangent, segs, pos, causal: bool):
    f = lambda q, k, v: dot_product_attention(
        q, k, v, jnp.asarray(segs), jnp.asarray(pos), causal=causal, impl=impl
    )
    out, pull = jax.vjp(f, q, k, v)
    return out, pull(cotangent)


@pytest.mark.parametrize(
    ("impl", "length", "causal"),
    [("pallas", 64, True), ("pallas", 64, False), ("splash", 128, True)],
)
def test_fused_kernel_equals_dense_mask_attention(impl, length, causal):
    segs, pos = packed_ids(length)
    q, k, v, cot = qkv(length)
    out, grads = value_and_grads(impl, q, k, v, cot, segs, pos, causal)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, cot, segs, pos, causal)
    np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=2e-4, atol=2e-4, err_msg=f"d{name}")


def test_cudnn_equals_dense_mask_attention():
    if jax.default_backend() != "gpu":
        pytest.skip(f"cuDNN attention needs a CUDA GPU; the backend is {jax.default_backend()}")
    segs, pos = packed_ids(64)
    q, k, v, cot = (x.astype(jnp.bfloat16) for x in qkv(64, head_dim=64))
    out, grads = value_and_grads("cudnn", q, k, v, cot, segs, pos, True)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, cot, segs, pos, True)
    np.testing.assert_allclose(out.astype(np.float32), ref_out.astype(np.float32), atol=3e-2)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g.astype(np.float32), ref.astype(np.float32), atol=6e-2)


def test_kernel_without_window_refuses_a_window_shorter_than_the_row():
    segs, pos = packed_ids(64)
    q, k, v, _ = qkv(64)
    with pytest.raises(ValueError, match="sliding window"):
        dot_product_attention(q, k, v, segs, pos, sliding_window=16, impl="pallas")


def test_decoder_with_pallas_attention_on_a_mesh_equals_xla():
    """The decoder's call site, with the kernel run per shard (rows over data, heads over tensor),
    against the XLA path without a mesh. Mistral's window (longer than the row) is inert."""
    arch = dict(
        model_type="mistral", vocab_size=64, hidden_size=64, intermediate_size=96,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=4096,
    )
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    segs, pos = packed_ids(64)
    tokens = jax.random.randint(jax.random.key(1), segs.shape, 0, 64)
    xla, pallas = (
        create_model(
            ModelConfig.from_hf(arch, dtype="float32", param_dtype="float32", attention_impl=impl),
            lora,
            seed=0,
        )
        for impl in ("xla", "pallas")
    )
    want = xla(tokens, jnp.asarray(pos), jnp.asarray(segs))
    with jax.set_mesh(parallel.make_mesh((2, 1, 2), jax.devices()[:4])):
        got = jax.jit(lambda t, p, s: pallas(t, p, s))(tokens, pos, segs)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
