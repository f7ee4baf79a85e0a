"""JSONL/TFDS readers: reference-format parsing, validation errors, memory, fork safety, TFDS."""

import json
import logging
import os
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jax_iclemb.data.records import BadRecordError, Record
from jax_iclemb.data.sources import open_datasets

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "prompt": "Find it.", "type": "normal"}


def expected_record(d: dict) -> Record:
    """The Record a reference-format JSON object should become: missing `neg` = none, missing
    `type` = normal, optional prompt, category and teacher scores (docs/data_format.md)."""
    scores = lambda key: tuple(float(x) for x in d[key]) if key in d else None
    return Record(
        query=d["query"],
        pos=tuple(d["pos"]),
        neg=tuple(d.get("neg", [])),
        prompt=d.get("prompt"),
        type=d.get("type", "normal"),
        category=d.get("category"),
        pos_scores=scores("pos_scores"),
        neg_scores=scores("neg_scores"),
    )


def write_lines(path: Path, lines: list[bytes | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    path.write_bytes(b"".join(line + b"\n" for line in raw))
    return path


def test_sample_data_opens_as_reference_records(sample_data):
    datasets = open_datasets(str(sample_data))
    assert [(d.name, d.in_batch_negatives) for d in datasets] == [
        ("classification-no_in_batch_neg/bank_intents", False),
        ("clustering-no_in_batch_neg/paper_titles", False),
        ("retrieval/web_search", True),
        ("sts/sentence_pairs", True),
    ]
    for d in datasets:
        lines = (sample_data / f"{d.name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [d[i] for i in range(len(d))] == [expected_record(json.loads(x)) for x in lines]
        assert d[-1] == d[len(d) - 1]
        with pytest.raises(IndexError):
            d[len(d)]


def test_sample_data_covers_the_edge_cases(sample_data):
    """What tests/data/README.md promises, so that the tests reading the sample exercise it."""
    raw = [
        json.loads(line)
        for path in sample_data.rglob("*.jsonl")
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    types = {r.get("type", "normal") for r in raw}
    assert types == {"normal", "symmetric_sts", "symmetric_class", "symmetric_clustering"}
    assert any("type" not in r and "pos_scores" not in r for r in raw)
    assert any(r.get("prompt", "") is None for r in raw)
    assert any(len(r["pos"]) > 1 and len(r["pos_scores"]) == len(r["pos"]) for r in raw)
    assert {r.get("type", "normal") for r in raw if len(r["neg"]) < 7} == types  # repeated
    texts = [t for r in raw for t in [r["query"], *r["pos"], *r["neg"]]]
    assert any("\n" in t for t in texts) and any(not t.isascii() for t in texts)


def test_single_file_and_name_rules(tmp_path):
    write_lines(tmp_path / "root" / "a-no_in_batch_neg" / "x.jsonl", [GOOD])
    write_lines(tmp_path / "root" / "b" / "y-no_in_batch_neg.jsonl", [GOOD])
    write_lines(tmp_path / "root" / "b" / "c" / "z.jsonl", [GOOD, GOOD])
    (tmp_path / "root" / "notes.txt").write_text("not data")
    datasets = open_datasets(str(tmp_path / "root"))
    assert [(d.name, d.in_batch_negatives, len(d)) for d in datasets] == [
        ("a-no_in_batch_neg/x", False, 1),
        ("b/c/z", True, 2),
        ("b/y-no_in_batch_neg", False, 1),
    ]
    (single,) = open_datasets(str(tmp_path / "root" / "b" / "c" / "z.jsonl"))
    assert (single.name, single.in_batch_negatives, single[1]) == ("z", True, expected_record(GOOD))
    # The root directory's own name counts too (the reference checks the directory it is given).
    (flat,) = open_datasets(str(tmp_path / "root" / "a-no_in_batch_neg"))
    assert (flat.name, flat.in_batch_negatives) == ("x", False)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_datasets(str(tmp_path / "nope"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.jsonl"):
        open_datasets(str(tmp_path / "empty_dir"))
    with pytest.raises(ValueError, match="on_bad_record"):
        open_datasets(str(tmp_path), on_bad_record="ignore")


def with_(**changes):
    d = {k: v for k, v in GOOD.items() if changes.get(k, 0) is not None}
    d.update({k: v for k, v in changes.items() if v is not None})
    return d


BAD_LINES = {
    "truncated_json": (b'{"query": "q", "pos": ["p"', "invalid JSON"),
    "not_an_object": (b'["q", "p"]', "JSON object"),
    "missing_query": (with_(query=None), "'query'"),
    "query_not_str": (with_(query=3), "'query'"),
    "pos_not_list": (with_(pos="p"), "'pos'"),
    "empty_pos": (with_(pos=[]), "'pos'"),
    "empty_pos_text": (with_(pos=["ok", ""]), r"'pos\[1\]'"),
    "neg_item_not_str": (with_(neg=["n", 7]), r"'neg\[1\]'"),
    "unknown_type": (with_(type="asymmetric"), "'type'"),
    "prompt_not_str": (with_(prompt=["x"]), "'prompt'"),
    "scores_wrong_len": (with_(pos_scores=[1.0], neg_scores=[0.5]), "'neg_scores'"),
    "scores_not_numbers": (with_(pos_scores=["high"], neg_scores=[0.1, 0.2]), r"'pos_scores\[0\]'"),
    "scores_half_given": (with_(pos_scores=[1.0]), "'neg_scores'"),
    "clustering_no_category": (with_(type="symmetric_clustering"), "'category'"),
    "non_utf8": (b'{"query": "caf\xe9", "pos": ["p"], "neg": []}', "non-UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_named_by_file_line_and_field(tmp_path, case, caplog):
    bad, field = BAD_LINES[case]
    other = with_(query="second", neg=None, type=None, prompt=None)
    path = write_lines(tmp_path / "t.jsonl", [GOOD, b"", bad, other])
    with pytest.raises(BadRecordError, match=rf"{path}:3: .*{field}"):
        open_datasets(str(path))
    with caplog.at_level(logging.WARNING):
        (d,) = open_datasets(str(path), on_bad_record="skip")
    assert (len(d), d.skipped) == (2, 1)
    assert [d[0], d[1]] == [expected_record(GOOD), expected_record(other)]
    assert "skipped bad records" in caplog.text


def test_empty_datasets(tmp_path, caplog):
    empty = write_lines(tmp_path / "d" / "empty.jsonl", [])
    write_lines(tmp_path / "d" / "good.jsonl", [GOOD])
    with pytest.raises(BadRecordError, match=str(empty)):
        open_datasets(str(tmp_path / "d"))
    with caplog.at_level(logging.WARNING):
        kept = open_datasets(str(tmp_path / "d"), on_bad_record="skip")
    assert [d.name for d in kept] == ["good"]
    assert "empty.jsonl" in caplog.text
    all_bad = write_lines(tmp_path / "bad.jsonl", [b"{", with_(pos=[])])
    with pytest.raises(BadRecordError, match=rf"{all_bad} \(2 bad records\)"):
        open_datasets(str(all_bad), on_bad_record="skip")


def test_reader_holds_only_offsets(tmp_path):
    n = 50_000
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(n):
            rec = {"query": f"query {i} " + "x" * 40, "pos": [f"pos {i} " + "y" * 60], "neg": []}
            f.write(json.dumps(rec) + "\n")
    tracemalloc.start()
    (d,) = open_datasets(str(path))
    retained, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(d) == n and d[n - 1].query.startswith(f"query {n - 1} ")
    # The index is 8 bytes a record; the texts (here ~25x more) stay on disk.
    assert retained < 8 * n + 200_000 < path.stat().st_size / 10
    texts = [v for v in vars(d).values() if isinstance(v, str | list | tuple | dict)]
    assert texts == [d.name]


def test_concurrent_reads_threads_and_fork(tmp_path):
    # Lines of up to ~40 kB: longer than one read chunk.
    recs = [with_(query=f"query number {i}", pos=[f"p{i}" * (i + 1) * 700]) for i in range(20)]
    (d,) = open_datasets(str(write_lines(tmp_path / "f.jsonl", recs)))
    expected = [expected_record(r) for r in recs]
    assert d[3] == expected[3]  # the parent reads through the descriptor before the fork
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        ok = False
        try:
            ok = all(d[i] == expected[i] for _ in range(200) for i in range(20))
        finally:
            os._exit(0 if ok else 1)
    ok = all(d[i] == expected[i] for _ in range(200) for i in range(19, -1, -1))
    _, status = os.waitpid(pid, 0)
    assert ok and os.waitstatus_to_exitcode(status) == 0
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(d.__getitem__, [i % 20 for i in range(2000)]))
    assert got == [expected[i % 20] for i in range(2000)]


def test_tfds_round_trip_equals_jsonl(sample_data, tmp_path):
    from jax_iclemb.data import prepare

    out = tmp_path / "tfds"
    assert prepare.main(["--src", str(sample_data), "--out", str(out), "--name", "sample"]) == 0
    assert (out / "sample" / "1.0.0" / "dataset_info.json").is_file()
    jsonl = open_datasets(str(sample_data))
    tfds_sets = open_datasets("tfds:sample", tfds_dir=str(out))
    assert [(d.name, d.in_batch_negatives, len(d)) for d in tfds_sets] == [
        (d.name, d.in_batch_negatives, len(d)) for d in jsonl
    ]
    for a, b in zip(tfds_sets, jsonl, strict=True):
        assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.prepare(str(sample_data), str(out), "sample")
    with pytest.raises(FileNotFoundError, match="'other'"):
        open_datasets("tfds:other", tfds_dir=str(out))


def test_jsonl_data_opens_without_tensorflow_datasets(sample_data):
    """The TFDS reader (and its large tensorflow_datasets import) loads only for tfds: paths."""
    code = (
        "import sys\n"
        "from jax_iclemb.data.sources import open_datasets\n"
        "assert open_datasets(sys.argv[1])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tensorflow', 'jax_iclemb.data.t'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(sample_data)], capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]"


def test_tfds_prepare_validates(tmp_path):
    from jax_iclemb.data import prepare

    src = write_lines(tmp_path / "src" / "x-no_in_batch_neg.jsonl", [GOOD, with_(pos=[]), GOOD])
    args = ["--src", str(src.parent), "--out", str(tmp_path / "out"), "--name", "x"]
    with pytest.raises(BadRecordError, match=rf"{src}:2: field 'pos'"):
        prepare.prepare(str(src.parent), str(tmp_path / "out"), "x")
    assert prepare.main([*args, "--on-bad-record", "skip"]) == 0
    (d,) = open_datasets("tfds:x", tfds_dir=str(tmp_path / "out"))
    assert (d.name, d.in_batch_negatives, [d[0], d[-1]]) == (
        "x-no_in_batch_neg",
        False,
        [expected_record(GOOD), expected_record(GOOD)],
    )
    assert len(d) == 2


def test_neg_labels_must_match_the_negatives(tmp_path):
    good = {"query": "q", "pos": ["p"], "neg": ["a", "b"], "label": "x", "neg_labels": ["x", None]}
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "neg_labels": ["x"]}) + "\n")
    with pytest.raises(BadRecordError, match=r"labels.jsonl:2.*neg_labels.*1 labels for 2"):
        open_datasets(str(path))
    (dataset,) = open_datasets(str(path), on_bad_record="skip")
    assert dataset[0].neg_labels == ("x", None) and dataset[0].label == "x"
