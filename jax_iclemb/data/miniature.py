""""ICL in miniature": a synthetic task family where only in-context examples reveal the task.

Items have 4 attributes × 8 values, one distinct word per value; an item's text is its 4 value words
in a shuffled order. Task "match on attribute a": the positive has the query's value of `a` and
differs on every other attribute; a hard negative has another value of `a` and shares exactly one
other attribute with the query. Every task uses the same instruction, so without examples the task
is ambiguous by construction: an attribute-agnostic similarity scores the positive and the hard
negatives alike. An example's response is the single value word the task matches on
(`<query>wide black plastic circle<response>black`), which names the attribute.

20% of the 4,096 combinations are held out: training records use only the others, and every
evaluation query, passage and in-context example is a held-out item.

Layout of the generated folder (`miniature_dir()`, built once, deterministic in the seed):
    train/match_<attribute>.jsonl   one dataset per task (reference JSONL + `label`, `response`)
    eval/match_<attribute>.json     {"task", "instruction", "items": [{"query", "pos", "neg" (7),
                                     "examples" (5 × {"query", "response"})}]}
    tokenizer/                      a word-level HF tokenizer folder for `load_tokenizer`
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jax_iclemb.data.builtin import generated_dir

VERSION = 2  # bump whenever the generated content changes: it names the cache folder
SEED = 20250301
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black", "white", "yellow", "purple", "orange"),
    "shape": ("circle", "square", "triangle", "star", "heart", "oval", "cross", "diamond"),
    "material": ("wood", "metal", "glass", "plastic", "stone", "paper", "cloth", "rubber"),
    "size": ("tiny", "small", "medium", "large", "huge", "wide", "tall", "flat"),
}
NAMES = tuple(ATTRIBUTES)
INSTRUCTION = "find match item"  # identical for every task: the ambiguity is the point
HELD_OUT_FRACTION = 0.2
TRAIN_POSITIVES = 8  # per record; the pipeline samples one per step
TRAIN_NEGATIVES = 16
EVAL_QUERIES = 256  # per task
EVAL_NEGATIVES = 7
EVAL_EXAMPLES = 5

# Ids fixed by position: the model config needs them before any tokenizer is loaded.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<instruct>", "<query>", "<response>")
VOCAB: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    *INSTRUCTION.split(),
    *(w for values in ATTRIBUTES.values() for w in values),
)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

Item = tuple[int, int, int, int]  # value index per attribute


def task_name(attribute: str) -> str:
    return f"match_{attribute}"


def item_text(rng: random.Random, item: Item) -> str:
    words = [ATTRIBUTES[name][v] for name, v in zip(NAMES, item)]
    rng.shuffle(words)
    return " ".join(words)


def split_items(rng: random.Random) -> tuple[list[Item], list[Item]]:
    """(training items, held-out items), both sorted."""
    items = list(itertools.product(range(8), repeat=len(NAMES)))
    held = set(rng.sample(items, round(HELD_OUT_FRACTION * len(items))))
    return [i for i in items if i not in held], sorted(held)


def is_positive(query: Item, other: Item, a: int) -> bool:
    return all((q == o) == (j == a) for j, (q, o) in enumerate(zip(query, other)))


def is_hard_negative(query: Item, other: Item, a: int) -> bool:
    if query[a] == other[a]:
        return False
    return sum(q == o for j, (q, o) in enumerate(zip(query, other)) if j != a) == 1


def _random_partner(rng: random.Random, query: Item, a: int, positive: bool) -> Item:
    """A random item that is a positive (or a hard negative) of `query` for task `a`."""
    shared = a if positive else rng.choice([j for j in range(len(NAMES)) if j != a])
    out = []
    for j, q in enumerate(query):
        keep = j == shared
        out.append(q if keep else rng.choice([v for v in range(8) if v != q]))
    return tuple(out)


def _sample_partners(
    rng: random.Random, query: Item, a: int, positive: bool, pool: set[Item], count: int
) -> list[Item]:
    """`count` distinct partners drawn from `pool` by rejection (pools hold hundreds of them)."""
    found: list[Item] = []
    for _ in range(1000 * count):
        if len(found) == count:
            return found
        cand = _random_partner(rng, query, a, positive)
        if cand in pool and cand not in found:
            found.append(cand)
    if len(found) < count:
        kind = "positives" if positive else "hard negatives"
        raise ValueError(f"item pool too small: found {len(found)} of {count} {kind} for {query}")
    return found


def train_records(rng: random.Random, train: list[Item], a: int) -> list[dict]:
    """One record per training item for task `a`."""
    pool = set(train)
    value_words = ATTRIBUTES[NAMES[a]]
    records = []
    for query in train:
        pos = _sample_partners(rng, query, a, True, pool, TRAIN_POSITIVES)
        neg = _sample_partners(rng, query, a, False, pool, TRAIN_NEGATIVES)
        records.append(
            {
                "query": item_text(rng, query),
                "pos": [item_text(rng, p) for p in pos],
                "neg": [item_text(rng, n) for n in neg],
                "prompt": INSTRUCTION,
                "type": "normal",
                # Same value of `a` = interchangeable positives: a passage (another query's
                # positive or hard negative) with the query's value is never its negative.
                "label": value_words[query[a]],
                "neg_labels": [value_words[n[a]] for n in neg],
                "response": value_words[query[a]],
            }
        )
    return records


def eval_items(rng: random.Random, held: list[Item], a: int) -> list[dict]:
    """Held-out queries with 1 positive, 7 hard negatives and 5 examples, all held-out items."""
    pool = set(held)
    value_words = ATTRIBUTES[NAMES[a]]
    out = []
    for query in rng.sample(held, EVAL_QUERIES):
        pos = _sample_partners(rng, query, a, True, pool, 1)
        neg = _sample_partners(rng, query, a, False, pool, EVAL_NEGATIVES)
        used = {query, *pos, *neg}
        shots = rng.sample([i for i in held if i not in used], EVAL_EXAMPLES)
        out.append(
            {
                "query": item_text(rng, query),
                "pos": item_text(rng, pos[0]),
                "neg": [item_text(rng, n) for n in neg],
                "examples": [
                    {"query": item_text(rng, s), "response": value_words[s[a]]} for s in shots
                ],
            }
        )
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, whitespace-split (so the templates' "\\n" separators vanish, in training and
    inference alike), BOS/EOS added by a post-processor."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Special tokens are matched inside text ("<instruct>find"), as in the templates.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        padding_side="left",
    )


def generate(out: Path, seed: int = SEED) -> None:
    """Write the training data, evaluation sets and tokenizer under `out`."""
    rng = random.Random(seed)
    train, held = split_items(rng)
    (out / "train").mkdir(parents=True)
    (out / "eval").mkdir()
    for a, attribute in enumerate(NAMES):
        name = task_name(attribute)
        lines = "".join(json.dumps(r) + "\n" for r in train_records(rng, train, a))
        (out / "train" / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        evaluation = {"task": name, "instruction": INSTRUCTION, "items": eval_items(rng, held, a)}
        (out / "eval" / f"{name}.json").write_text(json.dumps(evaluation), encoding="utf-8")
    build_tokenizer().save_pretrained(out / "tokenizer")


def miniature_dir(root: str | Path | None = None) -> Path:
    """The generated folder under `root` (default: the project cache), built on first use."""
    return generated_dir(root, f"miniature-v{VERSION}", generate)


def load_eval(folder: Path) -> dict[str, dict]:
    """Task name -> evaluation set, from a folder written by `generate`."""
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted((folder / "eval").glob("*.json"))
    }
