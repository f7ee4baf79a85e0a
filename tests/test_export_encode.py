"""A trained workdir -> Embedder, merged / PEFT export, and the PyTorch tools that load them.

References: the model run on one sequence at a time (no packing, no batching); torch
`transformers` with the published model-card recipe (left padding, last token, normalise);
`peft` on the torch base; `sentence-transformers` on the merged folder.
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jax_iclemb.data.icl import format_inference_query
from jax_iclemb.encode import Embedder
from jax_iclemb.export import load_trained
from jax_iclemb.export import main as export_main
from jax_iclemb.model import l2_normalize

INSTRUCTION = "Given a question about a person, retrieve the fact that answers it."
EXAMPLES = [
    {"query": "Where does Ana Lopez live?", "response": "Ana Lopez lives in Porto."},
    {"query": "What is Bo Chen's job?", "response": "Bo Chen works as a baker."},
]
QUERIES = ["Which city is home to Carla Diaz?", "Who is the pilot?", "Name the dog of Eve Kim."]
PASSAGES = ["Carla Diaz lives in Lyon.", "Tom is a pilot with a very long career " * 3, "A dog."]


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return Embedder.from_pretrained(tiny_workdir, progress=False)


@pytest.fixture(scope="module")
def merged_dir(tiny_workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(out)]) == 0
    return out


def unbatched(model, ids):
    """The reference: one sequence alone, no packing; the EOS hidden state, normalised."""
    tokens = np.asarray([ids], dtype=np.int32)
    hidden = model(tokens, np.arange(len(ids))[None], np.ones_like(tokens))
    return np.asarray(l2_normalize(hidden[0, -1]))


def test_embedder_equals_unbatched_model(tiny_workdir, embedder):
    model, *_ = load_trained(tiny_workdir)
    model.eval()
    tok = embedder.tokenizer
    for examples in ((), EXAMPLES):
        got = embedder.encode_queries(QUERIES, instruction=INSTRUCTION, examples=examples)
        for text, row in zip(QUERIES, got):
            ids = tok(format_inference_query(text, instruction=INSTRUCTION, examples=examples))
            np.testing.assert_allclose(row, unbatched(model, ids.input_ids), atol=1e-5)
    corpus = embedder.encode_corpus(PASSAGES)
    for text, row in zip(PASSAGES, corpus):
        np.testing.assert_allclose(row, unbatched(model, tok(text).input_ids), atol=1e-5)
    assert corpus.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(corpus, axis=1), 1.0, rtol=1e-5)


def test_examples_change_the_query_embedding(embedder):
    zero = embedder.encode_queries(QUERIES, instruction=INSTRUCTION)
    few = embedder.encode_queries(QUERIES, instruction=INSTRUCTION, examples=EXAMPLES)
    assert np.abs(zero - few).max() > 1e-3


def test_order_is_kept_and_similar_calls_do_not_recompile(embedder):
    texts = [f"text number {i} " * (1 + i % 7) for i in range(40)]
    forward = embedder.encode_corpus(texts)
    compiled = embedder._embed._cache_size()
    backward = embedder.encode_corpus(texts[::-1])
    np.testing.assert_allclose(backward[::-1], forward, atol=1e-6)
    embedder.encode_corpus([t + " more" for t in texts[:25]])
    assert embedder._embed._cache_size() == compiled


def torch_model_card(model, tokenizer, texts):
    """The published bge-en-icl recipe: left padding, last-token pooling, L2 normalisation."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).numpy()


def test_merged_export_loads_in_transformers_and_sentence_transformers(embedder, merged_dir):
    from sentence_transformers import SentenceTransformer

    formatted = [
        format_inference_query(q, instruction=INSTRUCTION, examples=EXAMPLES) for q in QUERIES
    ]
    ours = embedder.encode_queries(QUERIES, instruction=INSTRUCTION, examples=EXAMPLES)

    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    tokenizer.padding_side = "left"
    model = transformers.AutoModel.from_pretrained(merged_dir, dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_model_card(model, tokenizer, formatted), ours, atol=1e-4)

    st = SentenceTransformer(str(merged_dir), device="cpu")
    np.testing.assert_allclose(st.encode(formatted), ours, atol=1e-4)
    assert json.loads((merged_dir / "config_sentence_transformers.json").read_text())["prompts"]


def test_peft_export_loads_on_the_base(tiny_workdir, embedder, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(out), "--format", "peft"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    base = transformers.AutoModel.from_pretrained(adapter["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer.padding_side = "left"
    np.testing.assert_allclose(
        torch_model_card(model, tokenizer, PASSAGES), embedder.encode_corpus(PASSAGES), atol=1e-4
    )
    # And our own loader reads the adapter back.
    again = Embedder.from_pretrained(out, progress=False)
    np.testing.assert_allclose(
        again.encode_corpus(PASSAGES), embedder.encode_corpus(PASSAGES), atol=1e-5
    )


def test_export_refuses_a_non_empty_folder(tiny_workdir, merged_dir, capsys):
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(merged_dir)]) == 2
    assert f"error: {merged_dir} is not empty" in capsys.readouterr().err
    assert jax.device_count() == 8
