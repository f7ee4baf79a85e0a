"""The mteb 2.x encoder protocol: `MTEBEmbedder.encode` with real mteb task metadata (offline)
returns what `Embedder` gives for that task's instruction and examples, and by default those are
the paper's, for every task of MTEB (English) as mteb defines the benchmark."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import jax_iclemb
from jax_iclemb.embedder import Embedder
from jax_iclemb.errors import BadValue, MissingPath
from jax_iclemb.mteb_model import MTEBEmbedder

mteb = pytest.importorskip("mteb")
from mteb.abstasks.aggregated_task import AbsTaskAggregate  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402

TEXTS = ["how do I reset my card pin", "card stuck in the machine", "top up failed", "hello"]
# The shipped protocol, read here as plain files (not through jax_iclemb.mteb_protocol).
PROTOCOL = Path(jax_iclemb.__file__).parent / "protocols" / "mteb_icl"


def protocol_file(name: str):
    return json.loads((PROTOCOL / name).read_text(encoding="utf-8"))


INSTRUCTIONS = protocol_file("instructions.json")


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return Embedder.from_pretrained(tiny_workdir, progress=False)


@pytest.fixture(scope="module")
def benchmark_tasks() -> dict[str, str]:
    """{task name: mteb task type} of MTEB(eng, v1), CQADupstack as its sub-forum tasks (what
    mteb.evaluate encodes: an aggregate task runs its sub-tasks)."""
    benchmark = mteb.get_benchmark("MTEB(eng, v1)")
    assert len(benchmark.tasks) == 56
    tasks = {}
    for task in benchmark.tasks:
        parts = task.metadata.tasks if isinstance(task, AbsTaskAggregate) else [task]
        tasks.update({t.metadata.name: t.metadata.type for t in parts})
    return tasks


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


def test_paper_task_list_is_mteb_english_v1(benchmark_tasks):
    """The paper's 56 tasks (67 names: CQADupstack's 12 sub-forums count as one) are mteb's
    MTEB(eng, v1), with the same task types."""
    paper = {
        name: task_type
        for task_type, names in INSTRUCTIONS["mteb_eng_56_tasks_by_type"].items()
        for name in names
    }
    assert len(paper) == 67
    assert paper == benchmark_tasks


def test_every_benchmark_task_has_the_papers_prompt(benchmark_tasks):
    model = MTEBEmbedder(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no task falls back to zero-shot
        prompts = {name: model.task_prompt(name, kind) for name, kind in benchmark_tasks.items()}
    for name, prompt in prompts.items():
        assert prompt.instruction, name
        assert prompt.examples, name
        assert all(set(e) == {"query", "response"} for e in prompt.examples), name
    by_task, by_type = INSTRUCTIONS["by_task"], INSTRUCTIONS["by_task_type"]
    expected = {  # one task per lookup rule: (instruction, examples file)
        "Banking77Classification": (
            by_task["Classification"]["Banking77Classification"], "Banking77Classification"
        ),
        "SprintDuplicateQuestions": (
            by_task["PairClassification"]["SprintDuplicateQuestions"], "SprintDuplicateQuestions"
        ),
        "SciDocsRR": (by_task["Reranking"]["SciDocsRR"], "SciDocsRR"),
        "TwentyNewsgroupsClustering": (
            by_task["Clustering"]["TwentyNewsgroupsClustering"], "TwentyNewsgroupsClustering"
        ),
        "FiQA2018": (by_task["Retrieval"]["FiQA2018"], "FiQA2018"),
        "STS12": (by_type["STS"], "STS12"),
        "SummEval": (by_type["Summarization"], "SummEval"),
        "CQADupstackGisRetrieval": (INSTRUCTIONS["cqadupstack_prefix"], "CQADupstackRetrieval"),
    }
    for name, (instruction, examples) in expected.items():
        assert prompts[name].instruction == instruction, name
        assert list(prompts[name].examples) == protocol_file(f"examples/{examples}.json"), name


def test_beir_names_resolve_as_the_note_says():
    model = MTEBEmbedder(None)
    aliases, targets = re.search(r"\(([^)]*)\) map to ([^.]*)\.", INSTRUCTIONS["note"]).groups()
    pairs = list(zip(aliases.split(", "), targets.split(", "), strict=True))
    assert len(pairs) == 6
    for alias, target in [*pairs, ("scifact", "SciFact"), ("nfcorpus", "NFCorpus")]:
        prompt = model.task_prompt(alias, "Retrieval")
        assert prompt.instruction == INSTRUCTIONS["by_task"]["Retrieval"][target], alias
        assert list(prompt.examples) == protocol_file(f"examples/{target}.json"), alias


def test_zero_shot_and_overrides(tmp_path):
    own = [{"query": "a claim", "response": "a document"}]
    (tmp_path / "SciFact.json").write_text(json.dumps(own))
    scifact = INSTRUCTIONS["by_task"]["Retrieval"]["SciFact"]
    paper_nq = protocol_file("examples/NQ.json")

    zero = MTEBEmbedder(None, examples="none")
    assert zero.task_prompt("SciFact", "Retrieval").examples == ()
    assert zero.task_prompt("SciFact", "Retrieval").instruction == scifact

    folder = MTEBEmbedder(None, examples_dir=tmp_path)  # overrides the tasks it has a file for
    assert list(folder.task_prompt("SciFact", "Retrieval").examples) == own
    assert list(folder.task_prompt("NQ", "Retrieval").examples) == paper_nq
    zero_folder = MTEBEmbedder(None, examples="none", examples_dir=tmp_path)
    assert list(zero_folder.task_prompt("SciFact", "Retrieval").examples) == own
    assert zero_folder.task_prompt("NQ", "Retrieval").examples == ()

    paper_file = str(PROTOCOL / "examples" / "SciFact.json")
    mapping = MTEBEmbedder(
        None, examples_dir=tmp_path,
        tasks={"SciFact": {"instruction": "Find it.", "examples": paper_file}},
    )
    prompt = mapping.task_prompt("SciFact", "Retrieval")
    assert prompt.instruction == "Find it."
    assert list(prompt.examples) == protocol_file("examples/SciFact.json")


def test_task_outside_the_protocol_is_named():
    model = MTEBEmbedder(None)
    with pytest.raises(BadValue, match=r"no instruction for MTEB task 'StackOverflowQA'.*tasks="):
        model.task_prompt("StackOverflowQA", "Retrieval")
    own = MTEBEmbedder(None, tasks={"StackOverflowQA": {"instruction": "Find the answer."}})
    with pytest.warns(UserWarning, match="'StackOverflowQA'.*zero-shot"):
        assert own.task_prompt("StackOverflowQA", "Retrieval").examples == ()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(BadValue, match="examples='few': expected one of paper, none"):
        MTEBEmbedder(None, examples="few")
    with pytest.raises(MissingPath, match="no such folder"):
        MTEBEmbedder(None, examples_dir=tmp_path / "missing")
    with pytest.raises(BadValue, match=r"tasks\['SciFact'\]: unknown keys \['prompt'\]"):
        MTEBEmbedder(None, tasks={"SciFact": {"prompt": "x"}})


def test_zero_and_few_shot_results_land_apart(tmp_path):
    """Where mteb.evaluate saves a TaskResult for this model (its ResultCache layout)."""
    cache = mteb.ResultCache(tmp_path)
    paths = {
        examples: cache.get_task_result_path(
            "SciFact",
            MTEBEmbedder(None, examples=examples, name="jax_iclemb/tiny", revision="step-3")
            .mteb_model_meta,
        )
        for examples in ("paper", "none")
    }
    run = tmp_path / "results" / "jax_iclemb__tiny" / "step-3" / "experiments"
    assert paths == {
        "paper": run / "examples_paper" / "SciFact.json",
        "none": run / "examples_none" / "SciFact.json",
    }


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
            instruction=INSTRUCTIONS["by_task"]["Classification"]["Banking77Classification"],
            examples=banking,
        ),
    )
    # STS: the instruction of its task type, the examples given for the task.
    np.testing.assert_array_equal(
        encode(model, "STSBenchmark", None),
        embedder.encode_queries(
            TEXTS,
            instruction=INSTRUCTIONS["by_task_type"]["STS"],
            examples=json.loads(own_examples.read_text()),
        ),
    )
    # Retrieval: documents are plain passages; queries few-shot (the paper's examples where the
    # folder has none).
    np.testing.assert_array_equal(
        encode(model, "MSMARCO", PromptType.document), embedder.encode_corpus(TEXTS)
    )
    q = encode(model, "SciFact", PromptType.query)
    np.testing.assert_array_equal(
        q,
        embedder.encode_queries(
            TEXTS,
            instruction=INSTRUCTIONS["by_task"]["Retrieval"]["SciFact"],
            examples=protocol_file("examples/SciFact.json"),
        ),
    )
    d = encode(model, "MSMARCO", PromptType.document)
    np.testing.assert_allclose(np.asarray(model.similarity(q, d)), q @ d.T, rtol=1e-6)
    assert model.mteb_model_meta.similarity_fn_name == "cosine"


@pytest.mark.filterwarnings("ignore:The task 'STSBenchmark' is superseded")
def test_mteb_evaluate_writes_the_task_result(embedder, tmp_path):
    """mteb.evaluate end to end on STSBenchmark's protocol (its data replaced by 8 pairs, no
    download): the TaskResult JSON lands in the cache, scored as scipy scores our embeddings."""
    from datasets import Dataset, DatasetDict
    from scipy.stats import pearsonr, spearmanr

    pairs = {
        "sentence1": ["a cat sits on the mat", "a dog runs", "rain falls", "the sun is hot",
                      "he reads a book", "prices went up", "the bus is late", "she sings"],
        "sentence2": ["a cat is sitting on a mat", "a man sings", "it is raining", "cold snow",
                      "a book is being read", "costs rose", "the train left", "she is singing"],
        "score": [5.0, 0.5, 4.6, 0.2, 4.0, 4.2, 1.0, 4.8],
    }
    task = mteb.get_task("STSBenchmark")
    task.dataset, task.data_loaded = DatasetDict({"test": Dataset.from_dict(pairs)}), True
    model = MTEBEmbedder(embedder, name="jax_iclemb/tiny", revision="step-3")
    mteb.evaluate(model, task, cache=mteb.ResultCache(tmp_path), show_progress_bar=False)

    path = tmp_path / "results/jax_iclemb__tiny/step-3/experiments/examples_paper/STSBenchmark.json"
    result = json.loads(path.read_text())
    assert result["task_name"] == "STSBenchmark"
    (scores,) = result["scores"]["test"]
    prompt = {
        "instruction": INSTRUCTIONS["by_task_type"]["STS"],
        "examples": protocol_file("examples/STSBenchmark.json"),
    }
    a = embedder.encode_queries(pairs["sentence1"], **prompt)
    b = embedder.encode_queries(pairs["sentence2"], **prompt)
    # mteb scores `similarity_pairwise` (this dot product); its own cosine, from float32
    # distances, differs in the 5th digit.
    cosine = np.sum(a * b, axis=-1)
    assert scores["pearson"] == pytest.approx(pearsonr(pairs["score"], cosine)[0], abs=1e-6)
    assert scores["main_score"] == pytest.approx(spearmanr(pairs["score"], cosine)[0], abs=1e-6)
