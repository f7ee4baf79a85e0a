"""Tokenizer and ICL templates against strings written from the template rules: real Mistral
tokenizer, the reference-format sample of tests/data."""

import itertools
import json

import numpy as np
import pytest

from jax_iclemb.config import default_config
from jax_iclemb.data import icl
from jax_iclemb.data.pipeline import DataConfig, TrainPipeline
from jax_iclemb.data.sources import open_datasets
from jax_iclemb.data.tokenizer import load_tokenizer

INSTRUCT, QUERY, RESPONSE, NL = 32000, 32001, 32002, 13
ICL_TOKENS = ("<instruct>", "<query>", "<response>")
DEFAULT_PROMPT = "Default prompt."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistral-7b-v0.1")


@pytest.fixture(scope="module")
def datasets(sample_data):
    return {d.name: d for d in open_datasets(str(sample_data))}


def data_config(**kw):
    """The paper's lengths (the defaults), batch 10 (the sample datasets' size)."""
    c = default_config().data
    c.update(batch_size=10, default_prompt=DEFAULT_PROMPT, max_segments_per_row=32)
    c.update(kw)
    return DataConfig.from_section(c)


def prompt_of(rec):
    """A record's instruction; a null prompt falls back to data.default_prompt."""
    return rec.prompt if rec.prompt is not None else DEFAULT_PROMPT


def spurious_spaces(pieces):
    """Positions where a space was inserted after a special token, as the reference's decode and
    re-encode does: "▁" then a "▁"-prefixed piece ("<query>what" -> "▁", "▁what") or "▁▁" before a
    digit. The tokenizer itself puts a lone "▁" only before pieces without one ("▁", "3")."""
    return [
        k
        for k in range(len(pieces) - 2)
        if pieces[k] in ICL_TOKENS
        and (pieces[k + 1].startswith("▁▁") or pieces[k + 1] == "▁" == pieces[k + 2][:1])
    ]


def sequence(batch, slot):
    r, s = divmod(int(slot), batch.max_segments)
    return batch.tokens[r][batch.segment_ids[r] == s + 1].tolist()


def test_mistral_tokenizer_offline(tok):
    assert len(tok) == 32003
    assert tok.convert_tokens_to_ids(["<instruct>", "<query>", "<response>"]) == [
        32000,
        32001,
        32002,
    ]
    # BOS and EOS on every encoding (the converted tokenizer adds neither unless told to).
    assert tok("hello world")["input_ids"] == [1, 6312, 28709, 1526, 2]
    assert (tok.pad_token_id, tok.padding_side) == (0, "left")


def test_template_strings_by_hand():
    assert icl.format_query("Find.", "cats") == "<instruct>Find.\n<query>cats"
    assert (
        icl.format_example("Find.", "cats", "meow")
        == "<instruct>Find.\n<query>cats\n<response>meow\n\n"
    )
    got = icl.format_inference_query(
        "dogs",
        instruction="Find.",
        examples=[{"query": "a", "response": "b"}, {"query": "c", "response": "d"}],
    )
    assert got == (
        "<instruct>Find.\n<query>a\n<response>b\n\n"
        "<instruct>Find.\n<query>c\n<response>d\n\n"
        "<instruct>Find.\n<query>dogs\n<response>"
    )
    assert icl.format_inference_query("x", instruction="I") == "<instruct>I\n<query>x\n<response>"


def test_inference_ids_equal_tokenizer_of_string(tok, sample_data):
    for path in sorted((sample_data / "eval_examples").glob("*.json")):
        examples = json.loads(path.read_text())
        for n in (0, len(examples)):
            text = icl.format_inference_query(
                "what is it?", instruction="Do it.", examples=examples[:n]
            )
            ids = icl.encode_inference_query(
                tok, "what is it?", instruction="Do it.", examples=examples[:n], max_len=512
            )
            assert ids == tok(text)["input_ids"], path.name
    passage = "Some passage text, with  two spaces."
    assert icl.encode_passage(tok, passage, max_len=512) == tok(passage)["input_ids"]
    sym = icl.encode_passage(tok, passage, max_len=512, instruction="Do it.")
    assert sym == tok(f"<instruct>Do it.\n<query>{passage}\n<response>")["input_ids"]
    with pytest.raises(ValueError, match="example 0"):
        icl.encode_inference_query(tok, "q", instruction="i", examples=[{"q": 1}], max_len=64)


def test_batched_inference_ids_equal_the_tokenizer_of_each_string(tok, sample_data):
    """Many texts of one task at once (examples tokenized once, one batched call, repeated and
    cut texts among them) give each text's own ids."""
    first = sorted((sample_data / "eval_examples").glob("*.json"))[0]
    examples = json.loads(first.read_text())
    texts = ["what is it?", "a dog  barks", "what is it?", "long " * 80, "é ü 東京"]
    got = icl.encode_inference_queries(
        tok, texts, instruction="Do it.", examples=examples[:3], max_len=512
    )
    for text, ids in zip(texts, got, strict=True):
        string = icl.format_inference_query(text, instruction="Do it.", examples=examples[:3])
        assert ids == tok(string)["input_ids"], text
    assert icl.encode_passages(tok, texts, max_len=512) == [tok(t)["input_ids"] for t in texts]
    cut = icl.encode_passages(tok, texts, max_len=16, instruction="Do it.")
    assert cut == [icl.encode_passage(tok, t, max_len=16, instruction="Do it.") for t in texts]
    assert max(map(len, cut)) == 16


def test_truncation_is_on_token_ids(tok):
    long = "word " * 300
    # Raw passages: exactly the tokenizer's own truncation (which keeps BOS and EOS).
    assert (
        icl.encode_passage(tok, long, max_len=16)
        == tok(long, truncation=True, max_length=16)["input_ids"]
    )
    # Queries: BOS + formatted ids cut + "\n<response>" + EOS, no re-tokenization.
    body = tok(f"<instruct>Do it.\n<query>{long}", add_special_tokens=False)["input_ids"]
    ids = icl.encode_inference_query(tok, long, instruction="Do it.", max_len=32)
    assert ids == [1, *body[: 32 - 4], NL, RESPONSE, 2]
    # The prompt never loses its word-prefix piece and no "▁" appears after special tokens.
    assert ids[2] == tok("Do", add_special_tokens=False)["input_ids"][0]


def test_pipeline_queries_match_hand_written_strings(tok, datasets):
    """Every query/passage of a whole epoch of sample data (nothing truncated at paper lengths)
    equals tokenizer(the template string), the strings written out here by hand: examples, each
    answered by the positive (clustering: the category), then the task query; STS and clustering
    passages formatted like an example-less query, other passages raw."""
    ds = list(datasets.values())
    pipe = TrainPipeline(data_config(), tok, ds, seed=3)
    seen_types = set()
    for step in range(pipe.steps_per_epoch):
        plan = pipe.plan(step)
        dataset = ds[plan.dataset]
        batch, info = pipe.batch(step)
        assert info["dataset"] == dataset.name
        records = [dataset[int(i)] for i in plan.records]
        for i, rec in enumerate(records):
            sample = plan.samples[i]
            assert i not in sample.examples and len(set(sample.examples)) == len(sample.examples)
            prompt = prompt_of(rec)
            expected = ""
            for j in sample.examples:  # all fit at these lengths
                other = records[j]
                resp = (
                    other.category
                    if other.type == "symmetric_clustering"
                    else other.pos[plan.samples[j].pos]
                )
                expected += (
                    f"<instruct>{prompt_of(other)}\n<query>{other.query}\n<response>{resp}\n\n"
                )
            expected += f"<instruct>{prompt}\n<query>{rec.query}\n<response>"
            assert sequence(batch, batch.query_slot[i]) == tok(expected)["input_ids"]
            texts = [rec.pos[sample.pos], *(rec.neg[n] for n in sample.neg)]
            for g, text in enumerate(texts):
                if rec.type in ("symmetric_sts", "symmetric_clustering"):
                    text = f"<instruct>{prompt}\n<query>{text}\n<response>"
                assert sequence(batch, batch.passage_slot[i, g]) == tok(text)["input_ids"]
            seen_types.add(rec.type)
    assert seen_types == {d[i].type for d in ds for i in range(len(d))}  # the whole epoch


def test_budgets_hold_when_truncating(tok, datasets):
    cfg = data_config(
        query_max_len=160, passage_max_len=32, example_query_max_len=24, example_passage_max_len=12
    )
    ds = list(datasets.values())
    pipe = TrainPipeline(cfg, tok, ds, seed=0, row_multiple=1)
    num_examples = 0
    for step in range(2 * pipe.steps_per_epoch):
        batch, _ = pipe.batch(step)
        for slot in batch.query_slot:
            ids = sequence(batch, slot)
            assert len(ids) <= 160 and ids[0] == 1 and ids[-3:] == [NL, RESPONSE, 2]
            starts = [k for k, t in enumerate(ids) if t == INSTRUCT]
            prefix = ids[1 : starts[-1]]
            assert len(prefix) + 2 <= 160 - 32
            bounds = [*starts, len(ids)]
            for a, b in itertools.pairwise(bounds[:-1]):  # each example: query, response parts
                example = ids[a:b]
                r = example.index(RESPONSE)
                assert example[r - 1] == NL and r - 1 <= 24
                assert example[-2:] == [NL, NL] and len(example) - r - 1 - 2 <= 12
                num_examples += 1
            assert not spurious_spaces(tok.convert_ids_to_tokens(ids))
        for p_slot in batch.passage_slot[batch.passage_mask]:
            p = sequence(batch, p_slot)
            assert len(p) <= 32 and p[0] == 1 and p[-1] == 2
    assert num_examples > 0


def test_examples_max_len_is_the_examples_budget(tok, datasets):
    """`data.examples_max_len` replaces query_max_len - passage_max_len (its default) as the
    budget of BOS + a query's in-context examples + EOS (the reference's is query_max_len - 512).
    Checked against the same steps under the default budget, which keep more of the same sampled
    examples: a smaller budget keeps a leading run of them and stops at the first that does not
    fit."""
    lengths = dict(
        query_max_len=160, passage_max_len=32, example_query_max_len=24, example_passage_max_len=12
    )
    ds = list(datasets.values())

    def example_runs(limit):
        pipe = TrainPipeline(data_config(examples_max_len=limit, **lengths), tok, ds, seed=0)
        runs = []
        for step in range(pipe.steps_per_epoch):
            batch, _ = pipe.batch(step)
            for slot in batch.query_slot:
                ids = sequence(batch, slot)
                starts = [k for k, t in enumerate(ids) if t == INSTRUCT]
                runs.append([ids[a:b] for a, b in itertools.pairwise(starts)])
        return runs

    wide = example_runs(0)
    assert max(sum(map(len, run)) for run in wide) + 2 > 60  # the budgets below cut some
    for limit in (30, 60):
        cut = 0
        for run, full in zip(example_runs(limit), wide, strict=True):
            used = sum(map(len, run))
            assert run == full[: len(run)] and used + 2 <= limit
            if len(run) < len(full):
                assert used + len(full[len(run)]) + 2 > limit
                cut += 1
        assert cut


def test_clustering_examples_answer_with_category(tok, datasets):
    ds = [datasets["clustering-no_in_batch_neg/paper_titles"]]
    pipe = TrainPipeline(data_config(), tok, ds, seed=1)
    rows = pipe.examples(0)
    records = [ds[0][int(i)] for i in pipe.plan(0).records]
    with_examples = [r for r in rows if r["num_examples"]]
    assert with_examples
    for row in with_examples:
        for j in row["example_slots"]:
            other = records[j]
            assert f"<query>{other.query}\n<response>{other.category}\n\n" in row["query"]
        prompt = records[row["slot"]].prompt
        assert all(p.startswith(f"<s><instruct>{prompt}\n<query>") for p in row["passages"])
        assert all(p.endswith("\n<response></s>") for p in row["passages"])
    assert np.all([r["query"].endswith("\n<response></s>") for r in rows])


def test_a_budget_without_room_for_the_text_is_an_error(tok):
    """Cutting to the budget used to drop <query>, the text and part of the instruction without
    a word; now the smallest budget that keeps one token of text is the limit."""
    instruction = "Given a web search query, retrieve relevant passages that answer the query."
    # BOS + "<instruct>{instruction}\n<query>" + "\n" (one id, NL, after text) + <response> + EOS.
    head = tok(f"<instruct>{instruction}\n<query>", add_special_tokens=False)["input_ids"]
    template = 1 + len(head) + 1 + 2
    with pytest.raises(icl.BudgetError, match=rf"takes {template} tokens: no room .* {template}"):
        icl.encode_inference_query(tok, "q", instruction=instruction, max_len=template)
    ids = icl.encode_inference_query(tok, "what is it", instruction=instruction,
                                     max_len=template + 1)
    assert len(ids) == template + 1 and ids.count(tok.convert_tokens_to_ids("<query>")) == 1
    assert ids[: len(head) + 1] == [1, *head] and ids[-3:] == [NL, RESPONSE, 2]
    with pytest.raises(icl.BudgetError, match=rf"takes {template} tokens"):
        icl.encode_passage(tok, "p", max_len=template, instruction=instruction)
