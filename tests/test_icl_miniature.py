"""ICL in miniature: the generator's guarantees, the word-level tokenizer against the templates, the
`response` record field in the pipeline, and a smoke run of train CLI -> Embedder evaluation."""

import importlib.util
import json
import random

import numpy as np
import pytest
from conftest import REPO

from jax_iclemb.data import miniature
from jax_iclemb.data.records import BadRecordError, parse_record

WORD_ATTRIBUTE = {w: name for name, words in miniature.ATTRIBUTES.items() for w in words}


def _bench():
    path = REPO / "bench" / "icl_miniature.py"
    spec = importlib.util.spec_from_file_location("icl_miniature_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attrs(text: str) -> dict[str, str]:
    """attribute -> value word of an item text (each attribute exactly once)."""
    words = text.split()
    out = {WORD_ATTRIBUTE[w]: w for w in words}
    assert len(words) == len(out) == 4, text
    return out


def _shared(a: str, b: str) -> set[str]:
    x, y = _attrs(a), _attrs(b)
    return {name for name in x if x[name] == y[name]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The generated folder in a private cache (the config finds it through the env var)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_ICLEMB_CACHE", str(root))
        yield miniature.miniature_dir()


def test_generator_is_deterministic_and_follows_the_task_rules(folder):
    rng_a, rng_b = random.Random(7), random.Random(7)
    train_a, held_a = miniature.split_items(rng_a)
    train_b, held_b = miniature.split_items(rng_b)
    assert (train_a, held_a) == (train_b, held_b)
    assert len(held_a) == round(0.2 * 8**4) and not set(train_a) & set(held_a)
    assert miniature.train_records(rng_a, train_a, 2) == miniature.train_records(
        rng_b, train_b, 2
    )
    with pytest.raises(ValueError, match="pool too small"):
        miniature.train_records(rng_a, train_a[:20], 2)

    held_texts = {frozenset(t.split()) for t in _eval_texts(folder)}
    for attribute in miniature.ATTRIBUTES:
        lines = (folder / "train" / f"match_{attribute}.jsonl").read_text().splitlines()
        for record in map(json.loads, lines[:50]):
            value = _attrs(record["query"])[attribute]
            assert record["label"] == record["response"] == value
            assert record["prompt"] == miniature.INSTRUCTION
            for p in record["pos"]:
                assert _shared(record["query"], p) == {attribute}
            for n in record["neg"]:
                shared = _shared(record["query"], n)
                assert len(shared) == 1 and attribute not in shared
            for text in (record["query"], *record["pos"], *record["neg"]):
                assert frozenset(text.split()) not in held_texts
        evaluation = json.loads((folder / "eval" / f"match_{attribute}.json").read_text())
        assert len(evaluation["items"]) == miniature.EVAL_QUERIES
        for item in evaluation["items"][:50]:
            assert _shared(item["query"], item["pos"]) == {attribute}
            assert len(item["neg"]) == 7
            assert all(len(_shared(item["query"], n) - {attribute}) == 1 for n in item["neg"])
            assert all(_attrs(n)[attribute] != _attrs(item["query"])[attribute]
                       for n in item["neg"])
            for ex in item["examples"]:
                assert ex["response"] == _attrs(ex["query"])[attribute]


def _eval_texts(folder):
    for data in miniature.load_eval(folder).values():
        for item in data["items"]:
            yield item["query"]
            yield item["pos"]
            yield from item["neg"]
            yield from (ex["query"] for ex in item["examples"])


def test_tokenizer_matches_the_templates(folder):
    from jax_iclemb.data.icl import encode_inference_query, format_inference_query
    from jax_iclemb.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(folder / "tokenizer"))
    examples = [{"query": "red circle wood tiny", "response": "red"}]
    ids = encode_inference_query(
        tok, "blue star glass huge", instruction=miniature.INSTRUCTION, examples=examples,
        max_len=96,
    )
    # The "\n" separators vanish in the whitespace pre-tokenizer; BOS/EOS come from the
    # post-processor when the full string is tokenized.
    task = ["<instruct>", "find", "match", "item", "<query>"]
    expected = [
        "<s>", *task, "red", "circle", "wood", "tiny", "<response>", "red",
        *task, "blue", "star", "glass", "huge", "<response>", "</s>",
    ]
    assert tok.convert_ids_to_tokens(ids) == expected
    full = format_inference_query(
        "blue star glass huge", instruction=miniature.INSTRUCTION, examples=examples
    )
    assert tok(full)["input_ids"] == ids
    assert tok.decode(ids, skip_special_tokens=True).split() == [
        w for w in expected if not w.startswith("<")
    ]
    assert tok.convert_ids_to_tokens(tok("green ghost")["input_ids"]) == [
        "<s>", "green", "<unk>", "</s>"
    ]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        miniature.PAD_ID, miniature.BOS_ID, miniature.EOS_ID
    )


def test_record_response_is_the_example_response(folder):
    from jax_iclemb.config import load_config
    from jax_iclemb.data.pipeline import pipeline_from_config

    with pytest.raises(BadRecordError, match="'response'"):
        parse_record({"query": "q", "pos": ["p"], "response": 3})
    assert parse_record({"query": "q", "pos": ["p"], "response": "r"}).response == "r"

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_ICLEMB_CACHE", str(folder.parent))
        config = load_config(REPO / "configs" / "icl_miniature.py", ["--config.data.batch_size=8"])
    pipeline = pipeline_from_config(config)
    seen = 0
    for step in range(4):
        plan = pipeline.plan(step)
        records = [pipeline.datasets[plan.dataset][int(i)] for i in plan.records]
        for ex in pipeline.examples(step):
            shots = [records[j] for j in ex["example_slots"]]
            # Written out by hand: the example template `<instruct>{prompt}\n<query>{q}\n<response>
            # {r}\n\n` and the query template without their "\n"s; response = the value word.
            text = "".join(
                f"<instruct>{r.prompt}<query>{r.query}<response>{r.response}" for r in shots
            )
            query = records[ex["slot"]]
            text += f"<instruct>{query.prompt}<query>{query.query}<response>"
            assert ex["query"].replace(" ", "") == f"<s>{text}</s>".replace(" ", "")
            seen += len(shots)
    assert seen > 0


def test_top1_counts_ties_as_misses():
    q = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p = np.array([
        [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],  # positive best: hit
        [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]],  # a negative better: miss
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # all tie at 0: miss
    ])
    assert _bench().top1(q, p) == pytest.approx(1 / 3)


def test_smoke_cli_train_and_evaluate(folder, tmp_path):
    from jax_iclemb import train

    bench = _bench()
    workdir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_ICLEMB_CACHE", str(folder.parent))
        code = train.main([
            "--config", str(bench.CONFIG), "--workdir", str(workdir),
            "--config.train.steps=3", "--config.data.batch_size=8",
            "--config.model.arch.num_hidden_layers=1", "--config.optim.warmup_steps=0",
        ])
    assert code == 0
    small = {
        task: dict(data, items=data["items"][:4])
        for task, data in miniature.load_eval(folder).items()
    }
    acc = bench.evaluate(workdir, small, shots=(0, 2))
    assert sorted(acc) == sorted(f"match_{a}" for a in miniature.ATTRIBUTES)
    for per_k in acc.values():
        assert sorted(per_k) == ["0", "2"]
        assert all(0.0 <= v <= 1.0 and v * 4 == round(v * 4) for v in per_k.values())
