"""The inference fast path (`Embedder` over `inference_batch`): texts sorted by length, packed into
calls of a few shapes, block-sparse or dense as the model's config says.

Reference: the same model run on each text alone (one segment in one row, the dense mask, no
packing, no batching), pooled and normalised in NumPy. The host side is checked against the
sequences themselves: every input lands in exactly one call, whole, at the slot it is read from.
"""

import itertools

import jax
import numpy as np
import pytest

from jax_iclemb.data.icl import (
    encode_inference_queries,
    format_inference_query,
    inference_query_prefix,
)
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.embedder import Embedder, _embed_rows, local_mesh
from jax_iclemb.inference_batch import CallLayout, chunked_calls, overlapped
from jax_iclemb.model.config import ModelConfig
from jax_iclemb.model.decoder import create_model

INSTRUCTION = "Given a question, retrieve the passage that answers it."
EXAMPLES = [
    {"query": "Where does Ana live?", "response": "Ana lives in Porto, by the river."},
    {"query": "What is Bo's job?", "response": "Bo works as a baker in a small town."},
]
WORDS = ["the", "of", "a", "river", "city", "model", "data", "year", "people", "north", "stone",
         "light", "under", "over"]


def texts(count: int, seed: int, most_words: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, most_words))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mistral-7b-v0.1")


def model(tokenizer, impl: str, attention: str = "causal", **options):
    config = ModelConfig(
        model_type="mistral", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32",
        param_dtype="float32", attention=attention, attention_impl=impl, attention_block=32,
        init="fan_in", **options,
    )
    return create_model(config, seed=0, mesh=local_mesh())


def alone(model, seqs: list[list[int]], pooling: str) -> np.ndarray:
    """The reference: each sequence alone in a row (one segment, padding after it), the dense
    mask; pooled and normalised in NumPy."""
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    segment_ids = np.zeros_like(tokens)
    for row, seq in enumerate(seqs):
        tokens[row, : len(seq)] = seq
        segment_ids[row, : len(seq)] = 1
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    hidden = np.asarray(jax.jit(model.__call__)(tokens, positions, segment_ids))
    pooled = np.stack([
        hidden[row, : len(seq)].mean(0) if pooling == "mean" else hidden[row, len(seq) - 1]
        for row, seq in enumerate(seqs)
    ])
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


CASES = [("block_sparse", "causal", "last_token"), ("xla", "causal", "mean"),
         ("block_sparse", "bidirectional", "last_token")]


@pytest.mark.parametrize("impl, attention, pooling", CASES)
def test_embeddings_equal_each_text_run_alone(tokenizer, impl, attention, pooling):
    """Passages of 1..~700 tokens (several row lengths, texts sharing rows) and zero- and
    few-shot queries, in input order, as the model gives them for each text alone. A small
    chunk makes calls carry texts over from one chunk to the next."""
    net = model(tokenizer, impl, attention)
    embedder = Embedder(
        net, tokenizer, pooling=pooling, passage_max_len=1024, query_max_len=256, chunk_size=16,
        progress=False,
    )
    assert (embedder.layout.block is not None) == (impl == "block_sparse")
    passages = texts(40, seed=1, most_words=30) + texts(4, seed=2, most_words=500)
    got = embedder.encode_corpus(passages)
    assert got.dtype == np.float32 and got.shape == (len(passages), 32)
    want = alone(net, [tokenizer(text).input_ids for text in passages], pooling)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    queries = texts(6, seed=3, most_words=12)
    for examples in ((), EXAMPLES):
        got = embedder.encode_queries(queries, instruction=INSTRUCTION, examples=examples)
        formatted = [format_inference_query(q, instruction=INSTRUCTION, examples=examples)
                     for q in queries]
        want = alone(net, [tokenizer(text).input_ids for text in formatted], pooling)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl, scan", [("xla", True), ("block_sparse", False)])
def test_few_shot_queries_run_their_examples_once(tokenizer, impl, scan):
    """With the prefix cache the device calls hold only each query's own tokens (BOS, examples
    and instruction head run once, for all of them), and the embeddings are those of the whole
    sequences, on an 8-device mesh, scanned or unrolled."""
    net = model(tokenizer, impl, scan_layers=scan)
    options = dict(query_max_len=64, chunk_size=16, progress=False)
    cached = Embedder(net, tokenizer, **options)
    plain = Embedder(net, tokenizer, prefix_cache=False, **options)
    assert cached.mesh.devices.size == 8
    real_tokens = []

    def recording(state, rows, prefix, **kw):
        assert prefix is not None and rows.block_pairs is None
        real_tokens.append(int((np.asarray(rows.segment_ids) > 0).sum()))
        return _embed_rows(state, rows, prefix, **kw)

    cached._embed = recording
    queries = texts(40, seed=4, most_words=40)
    got = cached.encode_queries(queries, instruction=INSTRUCTION, examples=EXAMPLES)
    want = plain.encode_queries(queries, instruction=INSTRUCTION, examples=EXAMPLES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    whole = encode_inference_queries(
        tokenizer, queries, instruction=INSTRUCTION, examples=EXAMPLES, max_len=64
    )
    shared = inference_query_prefix(tokenizer, instruction=INSTRUCTION, examples=EXAMPLES)
    assert len(shared) > 40 and all(ids[: len(shared)] == shared for ids in whole)
    assert sum(real_tokens) == sum(len(ids) - len(shared) for ids in whole)
    spot = alone(net, [whole[i] for i in (0, 17, 39)], "last_token")  # and the plain reference
    np.testing.assert_allclose(got[[0, 17, 39]], spot, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["block_sparse", "xla"])
def test_compiled_shapes_stay_within_the_bound(tokenizer, impl):
    """500 sequences of random lengths compile at most `CallLayout.shapes` executables, each of
    them one of those shapes; encoding them again, in another order, compiles nothing."""
    embedder = Embedder(model(tokenizer, impl), tokenizer, progress=False)
    seen = []

    def recording(state, rows, prefix, **kw):
        tiles = 0 if rows.block_pairs is None else rows.block_pairs.shape[1]
        seen.append((rows.num_rows, rows.tokens.shape[1], rows.max_segments, tiles))
        return _embed_rows(state, rows, prefix, **kw)

    embedder._embed = recording
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(5, 1000, n)) for n in rng.integers(1, 300, 500)]
    before = _embed_rows._cache_size()
    forward = embedder.encode_ids(seqs)
    compiled = _embed_rows._cache_size() - before
    bound = embedder.layout.shapes(300)
    assert set(seen) <= bound
    assert compiled <= len(set(seen)) <= len(bound)
    backward = embedder.encode_ids(seqs[::-1])
    assert _embed_rows._cache_size() - before == compiled
    np.testing.assert_allclose(backward[::-1], forward, rtol=1e-5, atol=1e-6)


def test_empty_input_is_an_error(tokenizer):
    embedder = Embedder(model(tokenizer, "xla"), tokenizer, progress=False)
    for encode in (embedder.encode_corpus, embedder.encode_ids):
        with pytest.raises(ValueError, match="nothing to encode"):
            encode([])
    with pytest.raises(ValueError, match="nothing to encode"):
        embedder.encode_queries([], instruction=INSTRUCTION)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        embedder.encode_ids([[1, 2], []])
    with pytest.raises(ValueError, match="rows_per_call must be a positive multiple"):
        Embedder(model(tokenizer, "xla"), tokenizer, rows_per_call=0)


@pytest.mark.parametrize("layout", [CallLayout(shards=2, block=32), CallLayout(shards=1)])
def test_calls_hold_every_sequence_once_and_whole_a_chunk_at_a_time(layout):
    """Chunks of 50: token ids are fetched 50 at a time, each chunk's calls before the next
    fetch; each input is in exactly one call, its tokens at the row and columns its slot names,
    and each call's shape is one of the bound's."""
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 99, n)) for n in rng.integers(1, 300, 333)]
    events = []

    def fetch(positions):
        events.append(("fetch", len(positions)))
        return [seqs[i] for i in positions]

    found = {}
    for calls in chunked_calls(np.array([len(s) for s in seqs]), fetch, layout, chunk=50):
        events.append(("calls", len(calls)))
        for call in calls:
            assert call.key in layout.shapes(300)
            rows = call.rows
            for i, slot in zip(call.index, call.slot):
                row, segment = divmod(int(slot), rows.max_segments)
                columns = np.flatnonzero(rows.segment_ids[row] == segment + 1)
                assert columns[-1] == rows.last_index[row, segment]
                np.testing.assert_array_equal(rows.tokens[row, columns], seqs[i])
                np.testing.assert_array_equal(rows.positions[row, columns], np.arange(len(seqs[i])))
                assert i not in found
                found[i] = True
    assert sorted(found) == list(range(len(seqs)))
    fetches = [e for e in events if e[0] == "fetch"]
    assert fetches == [("fetch", 50)] * 6 + [("fetch", 33)]
    # Lazy: a chunk's calls come out before the next chunk is fetched, never two at once.
    assert events.index(next(e for e in events if e[0] == "calls")) < len(fetches)
    assert all(a[0] == "fetch" for a, b in itertools.pairwise(events) if b[0] == "calls")


def test_the_host_prepares_the_next_batch_before_waiting_for_the_last():
    events = []

    def batches():
        for k in range(3):
            events.append(f"make {k}")
            yield k

    overlapped(batches(), lambda k: events.append(f"start {k}") or k,
               lambda k: events.append(f"finish {k}"))
    assert events == ["make 0", "start 0", "make 1", "start 1", "finish 0", "make 2", "start 2",
                      "finish 1", "finish 2"]

