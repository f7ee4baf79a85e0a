"""Retrieval evaluation: the CLI against a direct recomputation, a corpus encoded in chunks
against one call, the BEIR builder against the records it reads, bad input, and evaluation during
training (the ranking itself: tests/test_topk.py).

References: the BEIR files re-read here with `json`/`csv`, embeddings scored with one NumPy matrix
product, runs selected by `ir_metrics.top_k_from_scores` (itself tested against pytrec_eval).
"""

import csv
import dataclasses
import json

import numpy as np
import pytest
from conftest import REPO, TINY_OVERRIDES

from jax_iclemb import embedding_store as store
from jax_iclemb import encode, ir_metrics
from jax_iclemb.beir import EvalDataError, beir_from_jsonl, load_beir, load_examples
from jax_iclemb.beir_eval import evaluate_beir
from jax_iclemb.embedder import Embedder
from jax_iclemb.evaluate import main

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query."


@pytest.fixture(scope="module")
def beir_dir(sample_data, tmp_path_factory):
    return beir_from_jsonl(
        sample_data / "retrieval" / "web_search.jsonl", tmp_path_factory.mktemp("beir") / "web"
    )


@pytest.fixture(scope="module")
def examples_file(sample_data, tmp_path_factory):
    """Two of the MS MARCO evaluation examples (short prefixes keep the rows small)."""
    path = tmp_path_factory.mktemp("examples") / "msmarco.json"
    examples = json.loads((sample_data / "eval_examples" / "MSMARCO.json").read_text())
    path.write_text(json.dumps(examples[:2]))
    return path


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return Embedder.from_pretrained(tiny_workdir, progress=False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_beir_from_jsonl_keeps_queries_positives_and_distractors(sample_data, beir_dir):
    records = read_jsonl(sample_data / "retrieval" / "web_search.jsonl")
    queries = read_jsonl(beir_dir / "queries.jsonl")
    corpus = {d["_id"]: d["text"] for d in read_jsonl(beir_dir / "corpus.jsonl")}
    with open(beir_dir / "qrels" / "test.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["query-id", "corpus-id", "score"]
    judged = {}
    for qid, docid, score in rows[1:]:
        assert score == "1"
        judged.setdefault(qid, set()).add(corpus[docid])
    assert [q["text"] for q in queries] == [r["query"] for r in records]
    for query, record in zip(queries, records, strict=True):
        assert judged[query["_id"]] == set(record["pos"])
    assert set(corpus.values()) == {t for r in records for t in r["pos"] + r["neg"]}
    assert len(corpus) == len(set(corpus.values()))  # identical texts share one document


def direct_metrics(embedder, beir_dir, examples):
    """The reference: re-read the folder, encode, one full score matrix, metrics.*."""
    queries = read_jsonl(beir_dir / "queries.jsonl")
    corpus = read_jsonl(beir_dir / "corpus.jsonl")
    qrels = {}
    with open(beir_dir / "qrels" / "test.tsv", newline="") as f:
        for qid, docid, score in list(csv.reader(f, delimiter="\t"))[1:]:
            qrels.setdefault(qid, {})[docid] = int(score)
    d = embedder.encode_corpus([(c["title"] + " " + c["text"]).strip() for c in corpus])
    q = embedder.encode_queries(
        [x["text"] for x in queries], instruction=INSTRUCTION, examples=examples
    )
    run = ir_metrics.top_k_from_scores(
        q @ d.T, 100, [x["_id"] for x in queries], [c["_id"] for c in corpus]
    )
    top10 = ir_metrics.top_k_from_scores(
        q @ d.T, 10, [x["_id"] for x in queries], [c["_id"] for c in corpus]
    )
    return top10, {
        "ndcg@10": ir_metrics.ndcg_at_k(qrels, run, 10)[1],
        "mrr@10": ir_metrics.mrr_at_k(qrels, run, 10)[1],
        "recall@10": ir_metrics.recall_at_k(qrels, run, 10)[1],
        "recall@100": ir_metrics.recall_at_k(qrels, run, 100)[1],
    }


def test_cli_zero_and_few_shot_match_direct_recomputation(
    tiny_workdir, embedder, beir_dir, examples_file, tmp_path, capsys, monkeypatch
):
    # The CLI gets the already compiled embedder of the workdir (loading is tested elsewhere).
    loaded = []
    monkeypatch.setattr(
        Embedder, "from_pretrained", lambda path, **kw: loaded.append(path) or embedder
    )
    out = tmp_path / "result.json"
    argv = [
        "--model", str(tiny_workdir), "--data", str(beir_dir), "--instruction", INSTRUCTION,
        "--examples", str(examples_file), "--json", str(out), "--keep-runs",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| metric | zero-shot | few-shot |" in table
    for label in ("nDCG@10", "MRR@10", "Recall@10", "Recall@100"):
        assert f"| {label} |" in table
    result = json.loads(out.read_text())
    num_queries = len(read_jsonl(beir_dir / "queries.jsonl"))
    assert result["num_queries"] == num_queries and result["num_examples"] == 2
    assert loaded == [str(tiny_workdir)]
    examples = json.loads(examples_file.read_text())
    for mode, shots in (("zero", []), ("few", examples)):
        top10, expected = direct_metrics(embedder, beir_dir, shots)
        assert result[mode] == pytest.approx(expected, abs=1e-6)
        assert f"{expected['ndcg@10']:.4f}" in table
        for qid, docs in top10.items():
            assert list(result["runs"][mode][qid]) == sorted(docs, key=docs.get, reverse=True)
            assert result["runs"][mode][qid] == pytest.approx(docs, abs=1e-5)
    # The examples change the rankings (a barely trained tiny model scores near 0 either way, so
    # the metrics alone may coincide).
    assert result["runs"]["zero"] != result["runs"]["few"]


def test_corpus_encoded_in_chunks_gives_the_same_results(embedder, beir_dir, examples_file):
    """Chunks of 7 documents (the block of documents ranked at once then spans every chunk)
    against the whole corpus in one call: the same metrics and the same runs. Scores may differ
    in the last bits only if an embedding depends on the texts packed with it (today it does
    not: the results are equal)."""
    examples = json.loads(examples_file.read_text())
    whole = evaluate_beir(embedder, beir_dir, instruction=INSTRUCTION, examples=examples,
                          keep_runs=True)
    assert whole["num_documents"] > 3 * 7
    chunked = evaluate_beir(embedder, beir_dir, instruction=INSTRUCTION, examples=examples,
                            keep_runs=True, corpus_chunk=7)
    runs, expected_runs = chunked.pop("runs"), whole.pop("runs")
    for mode in ("zero", "few"):
        assert chunked.pop(mode) == pytest.approx(whole.pop(mode), abs=1e-6)
        for qid, docs in expected_runs[mode].items():
            assert list(runs[mode][qid]) == list(docs)  # the same documents in the same order
            assert runs[mode][qid] == pytest.approx(docs, abs=1e-6)
    assert chunked == whole  # counts and settings


def test_cli_reads_the_corpus_from_an_encoded_store(
    tiny_workdir, embedder, beir_dir, examples_file, tmp_path, capsys, monkeypatch
):
    """`encode` writes the corpus's store (shards of 16); `evaluate --corpus-store` then gives the
    metrics and runs of encoding the corpus itself. A store of another step, or of the same
    documents in another order, is refused with exit code 2, naming what differs."""
    monkeypatch.setattr(Embedder, "from_pretrained", lambda path, **kw: embedder)
    folder = tmp_path / "store"
    encode_argv = ["--model", str(tiny_workdir), "--input", str(beir_dir), "--out", str(folder),
                   "--shard-size", "16"]
    assert encode.main(encode_argv) == 0
    assert store.store_info(folder).num_shards > 2
    examples = json.loads(examples_file.read_text())
    want = evaluate_beir(embedder, beir_dir, instruction=INSTRUCTION, examples=examples,
                         keep_runs=True)
    argv = ["--model", str(tiny_workdir), "--data", str(beir_dir), "--instruction", INSTRUCTION,
            "--examples", str(examples_file), "--keep-runs", "--json", str(tmp_path / "r.json")]
    assert main([*argv, "--corpus-store", str(folder)]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    for mode in ("zero", "few"):
        assert got[mode] == pytest.approx(want[mode], abs=1e-6)
        for qid, docs in want["runs"][mode].items():
            assert list(got["runs"][mode][qid]) == list(docs)
            assert got["runs"][mode][qid] == pytest.approx(docs, abs=1e-5)
    capsys.readouterr()

    assert main([*argv, "--corpus-store", str(folder), "--step", "3"]) == 2
    assert "the store's step is None, this evaluation's 3" in capsys.readouterr().err

    ids, vectors = (list(x) for x in zip(*store.read_store(folder)))
    ids, vectors = [i for part in ids for i in part], np.concatenate(vectors)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    info = store.store_info(folder)
    store.write_manifest(shuffled, dataclasses.replace(info, dim=None, complete=False))
    writer = store.StoreWriter(shuffled, shard_size=info.shard_size, dtype=info.dtype)
    writer.append(ids[::-1], vectors[::-1])
    writer.flush()
    store.finish_store(shuffled)
    assert main([*argv, "--corpus-store", str(shuffled)]) == 2
    err = capsys.readouterr().err
    assert f"row 0 is document {ids[-1]!r}, but the corpus has {ids[0]!r}" in err
    assert "Traceback" not in err


def write_beir(folder, corpus_lines, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)


def test_bad_input_names_the_culprit(tmp_path, capsys):
    good_doc = json.dumps({"_id": "d1", "title": "", "text": "a passage"})
    query = {"_id": "q1", "text": "a query"}

    write_beir(tmp_path / "a", [good_doc, '{"_id": "d2", "text": '], [query], "q1\td1\t1\n")
    with pytest.raises(EvalDataError, match=r"corpus\.jsonl:2: not valid JSON"):
        load_beir(tmp_path / "a")

    write_beir(tmp_path / "b", [good_doc], [query], "q1\td1\t1\nq9\td1\t1\n")
    with pytest.raises(EvalDataError, match=r"missing from .*queries\.jsonl.*'q9'"):
        load_beir(tmp_path / "b")

    write_beir(tmp_path / "c", [good_doc], [query], "q1\td1\n")
    with pytest.raises(EvalDataError, match=r"test\.tsv:2: expected 3 tab-separated"):
        load_beir(tmp_path / "c")

    with pytest.raises(EvalDataError, match="example 0 needs string 'query' and 'response'"):
        (tmp_path / "ex.json").write_text('[{"query": "x"}]')
        load_examples(tmp_path / "ex.json")

    assert main(["--model", "unused", "--data", str(tmp_path / "missing")]) == 2
    assert "missing/corpus.jsonl: file not found" in capsys.readouterr().err


def test_training_writes_periodic_eval_records(sample_data, tmp_path):
    from jax_iclemb.config import load_config
    from jax_iclemb.train import run

    # Three queries and their documents; zero-shot only: small and few shapes to compile.
    lines = (sample_data / "retrieval" / "web_search.jsonl").read_text().splitlines()[:3]
    (tmp_path / "three.jsonl").write_text("\n".join(lines) + "\n")
    beir = beir_from_jsonl(tmp_path / "three.jsonl", tmp_path / "beir")
    assert len(read_jsonl(beir / "corpus.jsonl")) <= 100  # so that recall@100 must be 1
    workdir = tmp_path / "run"
    config = load_config(
        REPO / "configs" / "tiny.py",
        [*TINY_OVERRIDES, "--config.train.steps=3", "--config.eval.every=2",
         f"--config.eval.data={beir}"],
    )
    run(config, workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps and at the end
    for r in evals:
        assert set(r["eval"]) == {"ndcg@10/zero", "mrr@10/zero", "recall@10/zero",
                                  "recall@100/zero"}
    # Every document is within the top 100: recall@100 is exactly 1 for each query.
    assert evals[-1]["eval"]["recall@100/zero"] == 1.0
