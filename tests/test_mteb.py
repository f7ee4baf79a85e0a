"""The mteb 2.x encoder protocol: `MTEBEmbedder.encode` with real mteb task metadata (offline)
returns what `Embedder` gives for that task's instruction and examples."""

import json

import numpy as np
import pytest

from jax_iclemb.embedder import Embedder
from jax_iclemb.mteb_model import MTEBEmbedder

mteb = pytest.importorskip("mteb")
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402

TEXTS = ["how do I reset my card pin", "card stuck in the machine", "top up failed", "hello"]


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return Embedder.from_pretrained(tiny_workdir, progress=False)


def loader(texts, batch_size=3):
    """mteb's own data loader of texts (batches of {"text": [...]})."""
    from mteb._create_dataloaders import _create_dataloader_from_texts

    return _create_dataloader_from_texts(texts, batch_size=batch_size)


def encode(model, task, prompt_type):
    return model.encode(
        loader(TEXTS),
        task_metadata=mteb.get_task(task).metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=prompt_type,
    )


def test_encode_follows_the_task_instruction_and_examples(embedder, sample_data, tmp_path):
    from mteb.types import PromptType

    own_examples = tmp_path / "sts.json"
    own_examples.write_text(json.dumps([{"query": "A man plays.", "response": "A person plays."}]))
    model = MTEBEmbedder(
        embedder,
        tasks={"STSBenchmark": {"examples": str(own_examples)}},
        examples_dir=sample_data / "eval_examples",
    )
    assert isinstance(model, EncoderProtocol)

    examples_dir = sample_data / "eval_examples"
    banking = json.loads((examples_dir / "Banking77Classification.json").read_text())
    # Classification (prompt_type None): every text is a few-shot query, with the paper's
    # instruction and the examples file of the examples folder.
    np.testing.assert_array_equal(
        encode(model, "Banking77Classification", None),
        embedder.encode_queries(
            TEXTS,
            instruction="Given a online banking query, find the corresponding intents.",
            examples=banking,
        ),
    )
    # STS: the instruction of its task type, the examples given for the task.
    np.testing.assert_array_equal(
        encode(model, "STSBenchmark", None),
        embedder.encode_queries(
            TEXTS,
            instruction="Retrieve semantically similar text.",
            examples=json.loads(own_examples.read_text()),
        ),
    )
    # Retrieval: documents are plain passages.
    np.testing.assert_array_equal(
        encode(model, "MSMARCO", PromptType.document), embedder.encode_corpus(TEXTS)
    )
    q = encode(model, "MSMARCO", PromptType.query)
    np.testing.assert_array_equal(
        q,
        embedder.encode_queries(
            TEXTS,
            instruction="Given a web search query, retrieve relevant passages that answer the "
            "query.",
            examples=json.loads((examples_dir / "MSMARCO.json").read_text()),
        ),
    )
    d = encode(model, "MSMARCO", PromptType.document)
    np.testing.assert_allclose(np.asarray(model.similarity(q, d)), q @ d.T, rtol=1e-6)
    assert model.mteb_model_meta.similarity_fn_name == "cosine"


def test_task_without_instruction_is_named(embedder):
    model = MTEBEmbedder(embedder)
    with pytest.raises(KeyError, match="no instruction for MTEB task 'EmotionClassification'"):
        encode(model, "EmotionClassification", None)
