"""Step -> batch pipeline: determinism across process counts, host slices, flags, teacher scores."""

import dataclasses
import json

import numpy as np
import pytest

from jax_iclemb.config import default_config
from jax_iclemb.data import icl
from jax_iclemb.data.batch import ROW_IDS_PER_PROCESS
from jax_iclemb.data.icl import BudgetError
from jax_iclemb.data.pipeline import DataConfig, TrainPipeline
from jax_iclemb.data.records import Record
from jax_iclemb.data.sources import open_datasets
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.errors import BadValue


@dataclasses.dataclass
class ListDataset:
    """A list-backed dataset satisfying the records.Dataset protocol."""

    name: str
    records: list
    in_batch_negatives: bool = True

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistral-7b-v0.1")


def config(**kw):
    c = default_config().data
    c.update(
        query_max_len=96,
        passage_max_len=24,
        example_query_max_len=16,
        example_passage_max_len=8,
        train_group_size=4,
        batch_size=8,
        default_prompt="Default task.",
        max_segments_per_row=8,
    )
    c.update(kw)
    return DataConfig.from_section(c)


def make_records(prefix, n, **kw):
    return [
        Record(
            query=f"{prefix} question {i}",
            pos=(f"{prefix} answer {i}", f"{prefix} other answer {i}"),
            neg=tuple(f"{prefix} wrong {i}.{j}" for j in range(i % 5)),
            **kw,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def datasets():
    scores = dict(pos_scores=(0.5, 0.25), neg_scores=None)
    return [
        ListDataset("a/retrieval", make_records("alpha", 20)),
        ListDataset("b/sts", make_records("beta", 12, type="symmetric_sts", prompt="Match.")),
        ListDataset("c/one", make_records("gamma", 9, type="only_1neg", **scores)),
    ]


def sequences(batch, slots):
    out = []
    for slot in np.asarray(slots).ravel():
        r, s = divmod(int(slot), batch.max_segments)
        out.append(batch.tokens[r][batch.segment_ids[r] == s + 1].tolist())
    return out


def host_view(batch):
    """Per query: its ids, its passages' ids (masked ones empty), teacher data."""
    return [
        (q, [p if m else [] for p, m in zip(sequences(batch, ps), mask)], t.tolist(), bool(h))
        for q, ps, mask, t, h in zip(
            sequences(batch, batch.query_slot),
            batch.passage_slot,
            batch.passage_mask,
            batch.teacher_scores,
            batch.has_teacher,
        )
    ]


def test_same_batch_for_any_process_count(tok, datasets):
    ref = TrainPipeline(config(), tok, datasets, seed=7)
    assert ref.steps_per_epoch == 3 + 2 + 2  # ceil(20/8) + ceil(12/8) + ceil(9/8)
    steps = [0, 3, 6, ref.steps_per_epoch + 2]  # the last one in epoch 1
    whole = {s: host_view(ref.batch(s)[0]) for s in steps}
    for count in (2, 4):
        hosts = [
            TrainPipeline(config(), tok, datasets, seed=7, process_index=p, process_count=count)
            for p in range(count)
        ]
        for s in reversed(steps):  # order of computation does not matter (resume)
            parts = [h.batch(s) for h in hosts]
            joined = [q for batch, _ in parts for q in host_view(batch)]
            assert joined == whole[s]  # host slices partition the global batch, in order
            for p, (batch, _) in enumerate(parts):  # row ids unique over the processes
                first = p * ROW_IDS_PER_PROCESS
                np.testing.assert_array_equal(batch.row_ids, first + np.arange(batch.num_rows))
            assert sum(info["num_queries"] for _, info in parts) == 8
            assert {info["dataset"] for _, info in parts} == {ref.plan(s).dataset_name}
    other_seed = TrainPipeline(config(), tok, datasets, seed=8)
    assert host_view(other_seed.batch(0)[0]) != whole[0]


def test_flags_groups_and_teacher(tok, datasets):
    pipe = TrainPipeline(config(), tok, datasets, seed=0)
    kinds = set()
    for s in range(pipe.steps_per_epoch):
        plan = pipe.plan(s)
        batch, info = pipe.batch(s)
        name = plan.dataset_name
        kinds.add(name)
        records = [datasets[plan.dataset][int(i)] for i in plan.records]
        assert bool(batch.in_batch_negatives) and info["in_batch_negatives"]
        for i, rec in enumerate(records):
            sample = plan.samples[i]
            group = 2 if name == "c/one" else 4
            assert batch.passage_mask[i].sum() == (group if rec.neg else 1)
            if name == "c/one":
                assert batch.has_teacher[i] == (not rec.neg)  # neg_scores absent
                if not rec.neg:
                    assert batch.teacher_scores[i, 0] == rec.pos_scores[sample.pos]
            else:
                assert not batch.has_teacher[i]
    assert kinds == {"a/retrieval", "b/sts", "c/one"}


def test_sample_data_flags_and_teacher_scores(tok, sample_data):
    ds = open_datasets(str(sample_data))
    # Budgets that hold the sample data's prompts and templates (a smaller one is an error).
    lengths = dict(query_max_len=192, passage_max_len=48, example_query_max_len=48)
    pipe = TrainPipeline(config(batch_size=10, max_segments_per_row=32, **lengths), tok, ds, seed=0)
    flags = {}
    for s in range(pipe.steps_per_epoch):
        plan = pipe.plan(s)
        batch, info = pipe.batch(s)
        flags[plan.dataset_name] = info["in_batch_negatives"]
        records = [ds[plan.dataset][int(i)] for i in plan.records]
        for i, rec in enumerate(records):
            sample = plan.samples[i]
            if rec.pos_scores is None:
                assert not batch.has_teacher[i]
                continue
            want = [rec.pos_scores[sample.pos], *(rec.neg_scores[n] for n in sample.neg)]
            assert batch.has_teacher[i]
            np.testing.assert_allclose(batch.teacher_scores[i], want, rtol=1e-6)
    assert flags == {
        "retrieval/web_search": True,
        "sts/sentence_pairs": True,
        "classification-no_in_batch_neg/bank_intents": False,
        "clustering-no_in_batch_neg/paper_titles": False,
    }


def test_class_records_disable_in_batch_negatives(tok):
    recs = make_records("x", 8, type="symmetric_class")
    pipe = TrainPipeline(config(), tok, [ListDataset("cls", recs, True)], seed=0)
    assert not pipe.batch(0)[1]["in_batch_negatives"]


def test_a_step_tokenizes_its_texts_in_one_batched_call(tok, sample_data, monkeypatch):
    """The batched primer asks for every text run the id builders read (examples with category
    responses, symmetric passages...): nothing cut, nothing is tokenized one by one."""
    calls = []
    encode = icl.TemplateTokenizer._encode
    record = lambda self, texts: calls.append(texts) or encode(self, texts)
    monkeypatch.setattr(icl.TemplateTokenizer, "_encode", record)
    ds = open_datasets(str(sample_data))
    lengths = dict(query_max_len=1024, passage_max_len=256, example_query_max_len=256,
                   example_passage_max_len=256)
    pipe = TrainPipeline(config(batch_size=10, **lengths), tok, ds, seed=0)
    for step in range(pipe.steps_per_epoch):
        calls.clear()
        _, info = pipe.batch(step)
        assert len(calls) == 1, (info["dataset"], calls[1:])


def test_bad_process_split_and_pack_len(tok, datasets):
    with pytest.raises(
        ValueError, match="batch size 8 of dataset 'a/retrieval' is not divisible by 3"
    ):
        TrainPipeline(config(), tok, datasets, seed=0, process_count=3)
    with pytest.raises(ValueError, match="pack_len=50"):
        TrainPipeline(config(pack_len=50), tok, datasets, seed=0)


def test_row_multiple_and_info(tok, datasets):
    pipe = TrainPipeline(config(), tok, datasets, seed=0, row_multiple=4)
    batch, info = pipe.batch(0)
    assert batch.num_rows % 4 == 0 and info["num_rows"] == batch.num_rows
    assert info["real_tokens"] == int((batch.segment_ids > 0).sum())
    assert info["utilisation"] == pytest.approx(batch.utilisation())


def test_a_step_packs_into_the_shortest_rows_that_hold_it(tok, datasets):
    """Rows of 128, 64 or 32 tokens (pack_len 128 halved down to min_pack_len 32): a step packs
    into the shortest that holds its longest sequence; every longer one holds the same
    sequences (what processes that must agree on a length need)."""
    pipe = TrainPipeline(config(pack_len=128, min_pack_len=32, max_examples=1), tok, datasets,
                         seed=0, row_unit=16)
    assert pipe.row_lengths == (128, 64, 32)
    shortest_seen = set()
    for s in range(pipe.steps_per_epoch):
        packed, info = pipe.batches(s, every_length=True)
        view = host_view(packed[128])
        longest = max(len(x) for q, passages, *_ in view for x in (q, *passages))
        assert sorted(packed) == [n for n in (32, 64, 128) if n >= longest]
        assert all(host_view(batch) == view for batch in packed.values())
        batch, alone = pipe.batch(s)
        assert batch.tokens.shape[1] == min(packed) == info["row_length"] == alone["row_length"]
        np.testing.assert_array_equal(batch.tokens, packed[min(packed)].tokens)
        shortest_seen.add(min(packed))
    assert shortest_seen == {32, 64}  # this data has steps of either kind
    fixed = TrainPipeline(config(pack_len=128, min_pack_len=0), tok, datasets, seed=0)
    assert fixed.row_lengths == (128,) and fixed.batch(0)[0].tokens.shape[1] == 128


def test_preview_cli(tmp_path, sample_data, capsys):
    from jax_iclemb.data import preview

    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from jax_iclemb.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.data.path = {str(sample_data)!r}\n"
        "    c.data.batch_size = 10\n"
        "    return c\n"
    )
    argv = ["--config", str(cfg), "--step", "4", "--config.data.query_max_len=1024"]
    assert preview.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    head, queries = lines[0], lines[1:]
    assert head["kind"] == "step" and head["step"] == 4 and 0 < head["utilisation"] <= 1
    assert head["dataset"] in {p.relative_to(sample_data).with_suffix("").as_posix()
                               for p in sample_data.rglob("*.jsonl")}
    assert len(queries) == 10
    for q in queries:
        assert q["query"].startswith("<s><instruct>") and q["query"].endswith("\n<response></s>")
        assert q["query"].count("<instruct>") == q["num_examples"] + 1
        assert q["query_tokens"] <= 1024 and len(q["passages"]) == 8
    with pytest.raises(SystemExit):
        preview.main(["--config", str(cfg), "--step", "0", "--data.x=1"])


def test_batch_size_follows_the_records_task_kind_not_the_file_name(tok):
    """The paper's 512/256 split: retrieval records (normal, only_1neg) get the retrieval size
    wherever their file is (nq.jsonl at the root), symmetric tasks the other; a name override
    still wins over both."""
    data = [
        ListDataset("nq", make_records("n", 12)),
        ListDataset("retrieval/one", make_records("o", 12, type="only_1neg")),
        ListDataset("retrieval/sts", make_records("s", 12, type="symmetric_sts")),
        ListDataset("clusters", make_records("c", 12, type="symmetric_clustering", category="x")),
    ]

    def sizes(**kw):
        layout = TrainPipeline(config(batch_size=2, **kw), tok, data, seed=0).layout
        return dict(zip(layout.names, layout.batch_sizes))

    kinds = {"retrieval": 8, "symmetric": 4}
    assert sizes(batch_size_by_kind=kinds) == {
        "nq": 8, "retrieval/one": 8, "retrieval/sts": 4, "clusters": 4
    }
    assert sizes(batch_size_by_kind={"retrieval": 8}, batch_size_overrides={"nq": 6}) == {
        "nq": 6, "retrieval/one": 8, "retrieval/sts": 2, "clusters": 2  # symmetric: 0 = default
    }


def test_an_override_pattern_that_matches_no_dataset_is_an_error(tok, datasets):
    with pytest.raises(BadValue, match=r"\['retreival\*'\] match no dataset.*'a/retrieval'"):
        TrainPipeline(config(batch_size_overrides={"retreival*": 4}), tok, datasets, seed=0)


def test_a_budget_too_small_for_the_prompt_is_an_error_with_the_numbers(tok, datasets):
    prompt = "Given a question about a person, retrieve the fact that answers it."
    data = [ListDataset("r", make_records("r", 8, prompt=prompt))]
    head = len(icl.instruction_head(icl.TemplateTokenizer(tok), prompt))
    query = icl.query_overhead(icl.TemplateTokenizer(tok), prompt)
    assert head == len(tok(f"<instruct>{prompt}\n<query>", add_special_tokens=False).input_ids)
    with pytest.raises(BudgetError, match=rf"'r': data.example_query_max_len=16 .*takes {head}"):
        TrainPipeline(config(), tok, data, seed=0)
    fits = dict(example_query_max_len=head + 1)
    rows = TrainPipeline(config(**fits), tok, data, seed=0).examples(0)  # one token of room
    assert any(r["num_examples"] for r in rows)
    assert all(r["query"].count("<query>") == r["num_examples"] + 1 for r in rows)
    with pytest.raises(BudgetError, match=rf"data.query_max_len={query} leaves no room.*{query}"):
        TrainPipeline(
            config(query_max_len=query, passage_max_len=16, max_examples=0), tok, data, seed=0
        )
    # Examples may take query_max_len - passage_max_len (data.examples_max_len's default): the
    # query must fit in the rest.
    room = 96 - query + 1  # the largest budget of BOS + examples + EOS that leaves the text room
    with pytest.raises(BudgetError, match=rf"= 88, the default .* must be less than {room + 1}"):
        TrainPipeline(config(passage_max_len=8, **fits), tok, data, seed=0)
    with pytest.raises(BudgetError, match=rf"data.examples_max_len={room + 1} must be less than"):
        TrainPipeline(config(examples_max_len=room + 1, **fits), tok, data, seed=0)
    TrainPipeline(config(passage_max_len=8, examples_max_len=room, **fits), tok, data, seed=0)
    sym = [ListDataset("s", make_records("s", 8, type="symmetric_sts", prompt=prompt))]
    with pytest.raises(BudgetError, match=rf"passage_max_len={query} .*symmetric_sts passage"):
        TrainPipeline(config(passage_max_len=query, max_examples=0), tok, sym, seed=0)
    TrainPipeline(config(passage_max_len=query + 1, max_examples=0), tok, sym, seed=0).batch(0)
    # A later record with a longer prompt fails at its step, naming dataset, record and key.
    long = [*make_records("r", 8), *make_records("l", 8, prompt=prompt)]
    pipe = TrainPipeline(config(), tok, [ListDataset("mixed", long)], seed=0)
    with pytest.raises(BudgetError, match=r"dataset 'mixed', record \d+: .*data\.\w+_max_len="):
        for step in range(pipe.steps_per_epoch):
            pipe.batch(step)
