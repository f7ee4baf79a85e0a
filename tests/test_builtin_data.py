"""The built-in dataset: deterministic, valid reference format, every task, learnable structure."""

import json
import re

import pytest

from jax_iclemb.data import builtin
from jax_iclemb.data.sources import open_datasets

# Written from the spec of the tasks, not from the generator's internals.
EXPECTED = {
    "classification-no_in_batch_neg/help_desk_intents": ("symmetric_class", False),
    "clustering-no_in_batch_neg/report_titles": ("symmetric_clustering", False),
    "retrieval/world_facts": ("normal", True),
    "sts/world_paraphrase": ("symmetric_sts", True),
}
NAME = re.compile(rf"(?:{'|'.join(builtin.SYLLABLES)}){{2,3}}")
VALUES = {v for values, _, _ in builtin.RELATIONS.values() for v in values}


def words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return builtin.builtin_data_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def datasets(data_dir):
    return {d.name: [d[i] for i in range(len(d))] for d in open_datasets(str(data_dir))}


def test_deterministic_and_cached(data_dir, tmp_path):
    again = builtin.builtin_data_dir(tmp_path)
    files = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((data_dir / f).read_bytes() == (again / f).read_bytes() for f in files)
    # A second call reuses the folder; no temporary folders are left behind.
    stamp = (again / files[0]).stat().st_mtime_ns
    assert builtin.builtin_data_dir(tmp_path) == again
    assert (again / files[0]).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [again.name]


def test_every_task_valid(data_dir, datasets, monkeypatch):
    monkeypatch.setenv("JAX_ICLEMB_CACHE", str(data_dir.parent))
    opened = open_datasets("builtin")  # strict validation of every record
    assert [(d.name, d.in_batch_negatives) for d in opened] == [
        (name, flag) for name, (_, flag) in EXPECTED.items()
    ]
    for name, (rtype, _) in EXPECTED.items():
        records = datasets[name]
        assert 300 <= len(records) <= 1000
        assert {r.type for r in records} == {rtype}
        assert all(r.prompt and len(r.neg) >= 7 for r in records)
    for task in builtin.TASKS.values():
        examples = json.loads((data_dir / "eval_examples" / f"{task}.json").read_text())
        assert len(examples) >= 3
        assert all(set(e) == {"query", "response"} and all(e.values()) for e in examples)


@pytest.mark.parametrize("name", ["retrieval/world_facts", "sts/world_paraphrase"])
def test_fact_positives_share_the_attribute_negatives_do_not(datasets, name):
    for r in datasets[name]:
        (person,) = [w for w in words(r.query) if NAME.fullmatch(w.lower())]
        (value,) = words(r.pos[0]) & VALUES
        assert person in words(r.pos[0])
        if name.startswith("sts"):
            assert value in words(r.query) and r.query != r.pos[0]
        assert not any(value in words(n) for n in r.neg)
        # Hard: some negatives are about the same person, some about look-alike names.
        assert any(person in words(n) for n in r.neg)
        if r.pos_scores is not None:
            assert r.pos_scores[0] > max(r.neg_scores)


def test_classification_positive_is_the_class_text(datasets):
    records = datasets["classification-no_in_batch_neg/help_desk_intents"]
    labels = {r.pos[0] for r in records}
    assert len(labels) >= 8
    for r in records:
        assert r.pos[0] not in r.neg and set(r.neg) | {r.pos[0]} == labels
    counts = [sum(r.pos[0] == label for r in records) for label in labels]
    assert min(counts) >= len(records) // len(labels) - 1  # balanced classes


def test_clustering_positive_shares_the_category(datasets):
    records = datasets["clustering-no_in_batch_neg/report_titles"]
    category = {r.query: r.category for r in records}
    assert len(set(category.values())) >= 5
    for r in records:
        assert r.pos[0] != r.query and category.get(r.pos[0], r.category) == r.category
        assert all(category.get(n) != r.category for n in r.neg)
