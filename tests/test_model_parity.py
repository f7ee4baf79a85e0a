"""Parity of the JAX decoder with PyTorch transformers on tiny random checkpoints of each family.

The torch model runs a left-padded batch (the layout of the bge-en-icl model card); the JAX model
runs the same sequences one per row and packed 2-3 per row. Every real token's final hidden state
and every last-token embedding must agree within 1e-4 (fp32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jax_iclemb.model import (
    LoraConfig,
    create_model,
    l2_normalize,
    last_token_pool,
    load_lora_state,
    load_pretrained,
    lora_state,
    mean_pool,
)
from jax_iclemb.model.decoder import abstract_model
from jax_iclemb.parallel import make_mesh

TOL = 1e-4
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    initializer_range=0.1,
)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # head_dim 16: covers kept, blended and slowed bands
}
# family -> (torch class saved, config class, family-specific options)
FAMILIES = {
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=4)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=LLAMA3)),
    "qwen2": ("Qwen2Model", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Model", "Qwen3Config", dict(head_dim=32)),
}
LENGTHS = [10, 6, 5, 4, 3]
# Packed layout: row 0 holds sequences 0 and 1 (exactly full), row 1 holds 2, 3 and 4.
PACKING = [[0, 1], [2, 3, 4]]
ROWS, LENGTH, SEGMENTS = len(LENGTHS), 16, 3


def save_torch_checkpoint(family: str, folder, **changes) -> None:
    """A tiny random checkpoint of `family`; `changes` override TINY (e.g. the vocabulary)."""
    cls_name, config_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**TINY, **extra, **changes})
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)


def torch_hidden(folder, sequences, bidirectional=False) -> list[np.ndarray]:
    """Each sequence's final hidden states from HF AutoModel on a left-padded batch."""
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    attention = mask
    if bidirectional:  # every real token sees every real token; padding sees itself only
        real = mask.bool()
        attention = (real[:, None, :, None] & real[:, None, None, :]) | torch.eye(width).bool()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention).last_hidden_state.numpy()
    return [out[i, width - len(s) :] for i, s in enumerate(sequences)]


def layout(sequences, rows_of_sequences):
    """(tokens, positions, segment_ids, last_index, where) with where[i] = (row, start)."""
    tokens = np.zeros((ROWS, LENGTH), np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    last = np.zeros((ROWS, SEGMENTS), np.int32)
    where = {}
    for r, members in enumerate(rows_of_sequences):
        col = 0
        for s, i in enumerate(members):
            n = len(sequences[i])
            tokens[r, col : col + n] = sequences[i]
            positions[r, col : col + n] = np.arange(n)
            segments[r, col : col + n] = s + 1
            last[r, s] = col + n - 1
            where[i] = (r, s, col)
            col += n
    return tokens, positions, segments, last, where


@nnx.jit
def embed(model, tokens, positions, segments, last):
    hidden = model(tokens, positions, segments)
    return hidden, last_token_pool(hidden, last)


def assert_matches_torch(reference, sequences, model):
    for rows in ([[i] for i in range(len(sequences))], PACKING):
        tokens, positions, segments, last, where = layout(sequences, rows)
        hidden, pooled = embed(model, tokens, positions, segments, last)
        hidden, pooled = np.asarray(hidden), np.asarray(pooled)
        assert np.isfinite(hidden).all(), "padding produced non-finite values"
        for i, ref in enumerate(reference):
            r, s, col = where[i]
            np.testing.assert_allclose(hidden[r, col : col + len(ref)], ref, atol=TOL, rtol=0)
            np.testing.assert_allclose(pooled[r, s], ref[-1], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(0)
    return [rng.integers(0, TINY["vocab_size"], n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        save_torch_checkpoint(family, root / family)
    return root


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_torch(family, checkpoints, sequences):
    folder = checkpoints / family
    model, cfg = load_pretrained(folder, dtype="float32", param_dtype="float32")
    assert cfg.model_type == family
    assert_matches_torch(torch_hidden(folder, sequences), sequences, model)


def test_bidirectional_matches_torch_with_full_mask(checkpoints, sequences):
    folder = checkpoints / "llama"
    model, _ = load_pretrained(
        folder, dtype="float32", param_dtype="float32", attention="bidirectional"
    )
    assert_matches_torch(torch_hidden(folder, sequences, bidirectional=True), sequences, model)


def test_sharded_creation_matches_unsharded(checkpoints, sequences):
    _, cfg = load_pretrained(checkpoints / "mistral", dtype="float32", param_dtype="float32")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    mesh = make_mesh((2, 2, 2))
    sharded = create_model(cfg, lora, seed=3, mesh=mesh)
    single = create_model(cfg, lora, seed=3)
    table = sharded.embed_tokens.weight.get_value()
    assert table.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(table.addressable_shards) == 8
    # Non-zero adapters so that the LoRA path is part of the comparison.
    adapters = jax.tree.map(
        lambda x: 0.1 * jax.random.normal(jax.random.key(1), x.shape), lora_state(single)
    )
    load_lora_state(single, adapters)
    load_lora_state(sharded, adapters)
    tokens, positions, segments, last, _ = layout(sequences, PACKING)
    with jax.set_mesh(mesh):
        out_sharded = np.asarray(embed(sharded, tokens, positions, segments, last)[0])
    out_single = np.asarray(embed(single, tokens, positions, segments, last)[0])
    np.testing.assert_allclose(out_sharded, out_single, atol=1e-5, rtol=0)
    assert jnp.abs(out_single).max() > 0


def test_pooling_matches_numpy():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(2, 6, 5)).astype(np.float32)
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32)
    mean = np.asarray(mean_pool(hidden, segments, 3))
    np.testing.assert_allclose(mean[0, 0], hidden[0, :2].mean(0), atol=1e-6)
    np.testing.assert_allclose(mean[0, 1], hidden[0, 2:5].mean(0), atol=1e-6)
    np.testing.assert_allclose(mean[1, 0], hidden[1, :4].mean(0), atol=1e-6)
    np.testing.assert_array_equal(mean[0, 2], 0)  # unused segment slot: zero, not NaN
    np.testing.assert_array_equal(mean[1, 1:], 0)

    last = np.asarray(last_token_pool(hidden, np.array([[1, 4, 0], [3, 0, 0]])))
    np.testing.assert_array_equal(last[0, :2], hidden[0, [1, 4]])
    np.testing.assert_array_equal(last[1, 0], hidden[1, 3])

    unit = np.asarray(l2_normalize(hidden))
    np.testing.assert_allclose(unit, hidden / np.linalg.norm(hidden, axis=-1, keepdims=True), 1e-6)
    assert np.all(np.asarray(l2_normalize(np.zeros((2, 4)))) == 0)  # zero vector: no NaN


def test_normalised_zero_vectors_have_finite_gradients():
    """An unused slot can pool an exactly-zero hidden state (a zero pad embedding that attends to
    nothing); its embedding gets no cotangent from the loss, but 0 · (sqrt's infinite slope)
    had made the whole step's gradient NaN. Elsewhere the gradient is the analytic one:
    d(x/‖x‖)ᵀg = (g − (g·u)u) / ‖x‖ with u = x/‖x‖."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    x[1] = 0.0
    g = rng.normal(size=(3, 5)).astype(np.float32)
    g[1] = 0.0  # what the loss gives an unused slot
    grad = np.asarray(jax.grad(lambda v: (l2_normalize(v) * g).sum())(jnp.asarray(x)))
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[1], 0)
    for i in (0, 2):
        norm = np.linalg.norm(x[i])
        u = x[i] / norm
        np.testing.assert_allclose(grad[i], (g[i] - (g[i] @ u) * u) / norm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["random", "pretrained"])
def test_abstract_model_is_what_creation_and_loading_fill(checkpoints, source):
    """The trainer compiles its steps for `abstract_model` while the weights are drawn or
    loaded: every array must come out with exactly those shapes, dtypes and shardings, under
    the same graph description."""
    folder = checkpoints / "mistral"
    _, cfg = load_pretrained(folder, dtype="float32", param_dtype="float32")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
    mesh = make_mesh((2, 2, 2))
    if source == "random":
        model = create_model(cfg, lora, seed=3, mesh=mesh)
    else:
        model, _ = load_pretrained(
            folder, lora=lora, mesh=mesh, dtype="float32", param_dtype="float32"
        )
    graphdef, state = nnx.split(model)
    expected_graphdef, expected = nnx.split(abstract_model(cfg, lora, mesh))
    assert graphdef == expected_graphdef
    got = dict(nnx.to_flat_state(state))
    want = dict(nnx.to_flat_state(expected))
    assert got.keys() == want.keys()
    for path, var in got.items():
        array, spec = var.get_value(), want[path].get_value()
        assert isinstance(spec, jax.ShapeDtypeStruct), path
        assert (array.shape, array.dtype) == (spec.shape, spec.dtype), path
        assert array.sharding == spec.sharding, path
    # Sharded for real: the embedding table over the tensor and fsdp axes.
    table = want[("embed_tokens", "weight")].get_value()
    assert table.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
