"""ICL templates and token-level assembly: one source of truth for training and inference.

Strings (the reference's templates; the special tokens are added to the tokenizer):
    task query   "<instruct>{prompt}\\n<query>{query}"  then "\\n<response>"
    one example  "<instruct>{prompt}\\n<query>{q}\\n<response>{r}\\n\\n"
    symmetric passage = a task query without examples; other passages are raw text.

Sequences are assembled on token ids, never by decode/re-encode. A tokenizer splits its input at
special tokens and tokenizes the text runs between them independently, so the ids of a template
string are the concatenation, run by run, of `[special] + ids(run)`. Every run that may be truncated
ends with a fixed tail ("\\n" or "\\n\\n"): when the run fits, it is tokenized whole (ids then equal
`tokenizer(full_string)`); when it must be cut, the cut ids are followed by the tail's ids as a
continuation (`TemplateTokenizer.tail_ids`), so no spurious "▁" word-prefix pieces are ever
inserted. `query_runs`, `example_runs` and `passage_runs` spell the templates as such runs, once:
the strings, the ids and the training pipeline's batched tokenization (`TemplateTokenizer.prime`)
all read them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence

import transformers

from jax_iclemb.data.tokenizer import ICL_SPECIAL_TOKENS
from jax_iclemb.errors import BadValue

INSTRUCT, QUERY, RESPONSE = ICL_SPECIAL_TOKENS
NEWLINE = "\n"
EXAMPLE_SEPARATOR = "\n\n"
SUFFIX = NEWLINE + RESPONSE  # closes a task query: its text run's tail, then <response>


class BudgetError(BadValue):
    """A length budget too small for the instruction and the template: cutting to it would drop
    the text (and the template's own tokens) without a word."""


@dataclasses.dataclass(frozen=True)
class Run:
    """The text between two special tokens: a `body` a length budget may cut, then a fixed `tail`
    that is always kept."""

    body: str
    tail: str = ""

    @property
    def text(self) -> str:
        return self.body + self.tail


# The templates, run by run; the strings, the token ids and the pipeline's batched tokenization
# all read them, so a template changes here only.
def query_runs(prompt: str, query: str) -> tuple[Run, Run]:
    """A task query: the runs after <instruct> (the prompt, never cut) and after <query>."""
    return Run(prompt, NEWLINE), Run(query, NEWLINE)


def example_runs(prompt: str, query: str, response: str) -> tuple[Run, Run, Run]:
    """An in-context example: a task query's runs, then the run after <response>."""
    return (*query_runs(prompt, query), Run(response, EXAMPLE_SEPARATOR))


def passage_runs(text: str, *, prompt: str, symmetric: bool) -> tuple[Run, ...]:
    """A passage (`passage_ids`): a task query's runs when `symmetric`, else the raw text."""
    return query_runs(prompt, text) if symmetric else (Run(text),)


def format_query(prompt: str, query: str) -> str:
    """The instruction-formatted query (no suffix)."""
    instruction, text = query_runs(prompt, query)
    return f"{INSTRUCT}{instruction.text}{QUERY}{text.body}"


def format_example(prompt: str, query: str, response: str) -> str:
    """One in-context example, with its trailing separator."""
    instruction, text, answer = example_runs(prompt, query, response)
    return f"{INSTRUCT}{instruction.text}{QUERY}{text.text}{RESPONSE}{answer.text}"


def format_inference_query(
    query: str, *, instruction: str, examples: Sequence[Mapping[str, str]] = ()
) -> str:
    """The full query string (without BOS/EOS) that `encode_inference_query` tokenizes."""
    prefix = "".join(
        format_example(instruction, *_example_pair(e, i)) for i, e in enumerate(examples)
    )
    return prefix + format_query(instruction, query) + SUFFIX


def chat_template() -> str:
    """A Jinja chat template that renders messages as the training sequence of their joined text.

    The messages' contents are concatenated (sentence-transformers sends a prompt as a system
    message before the text); a query-formatted result (it starts with "<instruct>") gets the
    "\\n<response>" suffix unless it already ends with it; BOS (when the tokenizer has one) and EOS
    enclose the whole. Tokenized, the rendering gives the ids `encode_inference_query` /
    `encode_passage` build (untruncated): the tokenizer splits at the same special tokens.
    """
    suffix, head = json.dumps(SUFFIX), json.dumps(INSTRUCT)
    return (
        "{%- set text = namespace(value='') -%}"
        "{%- for message in messages -%}"
        "{%- if message.content is string -%}{%- set text.value = text.value + message.content -%}"
        "{%- else -%}{%- for part in message.content -%}"
        "{%- set text.value = text.value + part.text -%}{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if bos_token -%}{{ bos_token }}{%- endif -%}{{ text.value }}"
        f"{{%- if text.value.startswith({head}) and not text.value.endswith({suffix}) -%}}"
        f"{{{{ {suffix} }}}}{{%- endif -%}}"
        "{{ eos_token }}"
    )


class TemplateTokenizer:
    """Token ids of template pieces for one tokenizer, with a per-step memo of text runs.

    `prime(runs)` tokenizes many runs in one batched call (the fast path for the training
    pipeline); `text(s)` falls back to one call per run.
    """

    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids(list(ICL_SPECIAL_TOKENS))
        if None in ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
            raise ValueError(f"tokenizer lacks {ICL_SPECIAL_TOKENS}; load it with load_tokenizer")
        self.instruct, self.query, self.response = ids
        self.bos: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token; the embedding is read at EOS")
        self.eos: int = tokenizer.eos_token_id
        self._memo: dict[str, list[int]] = {}
        # What follows a cut run: the continuation ids of each tail of the templates.
        self.tail_ids = {r.tail: self._continuation(r.tail) for r in example_runs("", "", "")}

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _continuation(self, tail: str) -> list[int]:
        """Ids of `tail` continuing a run (SentencePiece prefixes a lone run with "▁")."""
        anchor = "a"  # a letter never merges with a following newline
        head, joint = self._encode([anchor, anchor + tail])
        if joint[: len(head)] != head:
            raise ValueError(f"cannot split {anchor + tail!r} into {anchor!r} + {tail!r} tokens")
        return joint[len(head) :]

    def prime(self, runs: Iterable[Run]) -> None:
        """Tokenize the runs whole (as the id builders first ask for them) in one batched call."""
        todo = list(dict.fromkeys(r.text for r in runs if r.text not in self._memo))
        if todo:
            self._memo.update(zip(todo, self._encode(todo)))

    def clear(self) -> None:
        self._memo.clear()

    def text(self, run: str) -> list[int]:
        """Ids of a text run that starts the sequence or follows a special token."""
        ids = self._memo.get(run)
        if ids is None:
            ids = self._memo[run] = self._encode([run])[0]
        return ids


def instruction_head(tt: TemplateTokenizer, prompt: str) -> list[int]:
    """`<instruct>{prompt}\\n<query>`: what precedes a query's text in every template."""
    instruction, _ = query_runs(prompt, "")
    return [tt.instruct, *tt.text(instruction.text), tt.query]


def _run_with_tail(tt: TemplateTokenizer, head: list[int], run: Run, limit: int) -> list[int]:
    """`head + ids(run.body)` cut to `limit` ids, then the tail.

    When the whole run fits, it is tokenized as one piece, so the ids equal the tokenizer's on the
    full string; otherwise the cut ids are followed by the tail's continuation ids.
    """
    tail_ids = tt.tail_ids[run.tail]
    joint = tt.text(run.text)
    if len(head) + len(joint) <= limit + len(tail_ids):
        return head + joint
    return (head + tt.text(run.body))[: max(limit, 0)] + tail_ids


def example_ids(
    tt: TemplateTokenizer,
    prompt: str,
    query: str,
    response: str,
    *,
    query_limit: int | None = None,
    response_limit: int | None = None,
) -> list[int]:
    """One example; its formatted query is cut to `query_limit` ids, its response to
    `response_limit` ids (None: no limit)."""
    _, question, answer = example_runs(prompt, query, response)
    head = instruction_head(tt, prompt)
    if query_limit is not None and len(head) >= query_limit:
        raise BudgetError(
            f"an example's template with this instruction takes {len(head)} tokens: no room for "
            f"its query in {query_limit}"
        )
    q_limit = len(head) + len(tt.text(question.body)) if query_limit is None else query_limit
    r_limit = len(tt.text(answer.body)) if response_limit is None else response_limit
    return [
        *_run_with_tail(tt, head, question, q_limit),
        tt.response,
        *_run_with_tail(tt, [], answer, r_limit),
    ]


def add_examples(
    tt: TemplateTokenizer, examples: Iterable[list[int]], *, limit: int
) -> tuple[list[int], int]:
    """Concatenate examples in order, stopping before the first that would make BOS + prefix + EOS
    longer than `limit`. Returns (prefix ids, number of examples used)."""
    prefix: list[int] = []
    used = 0
    for ex in examples:
        if len(tt.bos) + len(prefix) + len(ex) + 1 > limit:
            break
        prefix += ex
        used += 1
    return prefix, used


def query_overhead(tt: TemplateTokenizer, prompt: str) -> int:
    """Ids of a task query besides its text and examples: BOS, <instruct>, the instruction and
    its newline, <query>, the closing newline, <response>, EOS."""
    _, text = query_runs(prompt, "")
    return len(tt.bos) + len(instruction_head(tt, prompt)) + len(tt.tail_ids[text.tail]) + 2


def query_ids(
    tt: TemplateTokenizer, prompt: str, text: str, *, max_len: int, prefix: Sequence[int] = ()
) -> list[int]:
    """BOS + prefix + formatted query (cut) + "\\n<response>" + EOS, at most `max_len` ids."""
    overhead = query_overhead(tt, prompt)
    if len(prefix) + overhead >= max_len:
        examples = f" and the in-context examples {len(prefix)}" if prefix else ""
        raise BudgetError(
            f"the query template with this instruction takes {overhead} tokens{examples}: no "
            f"room for the text in {max_len}"
        )
    _, run = query_runs(prompt, text)
    head = [*prefix, *instruction_head(tt, prompt)]
    budget = max_len - len(tt.bos) - len(tt.tail_ids[run.tail]) - 2  # <response>, EOS
    return [*tt.bos, *_run_with_tail(tt, head, run, budget), tt.response, tt.eos]


def raw_passage_ids(tt: TemplateTokenizer, text: str, *, max_len: int) -> list[int]:
    """BOS + text (cut) + EOS."""
    budget = max_len - len(tt.bos) - 1
    if budget < 1:
        raise BudgetError(f"max_len={max_len} leaves no room for a passage between BOS and EOS")
    return [*tt.bos, *tt.text(text)[:budget], tt.eos]


def passage_ids(
    tt: TemplateTokenizer, text: str, *, max_len: int, prompt: str | None, symmetric: bool
) -> list[int]:
    """A passage: formatted like a query without examples when `symmetric`, else raw."""
    if not symmetric:
        return raw_passage_ids(tt, text, max_len=max_len)
    if prompt is None:
        raise ValueError("a symmetric passage needs the task prompt")
    return query_ids(tt, prompt, text, max_len=max_len)


def _example_pair(example: Mapping[str, str], index: int) -> tuple[str, str]:
    try:
        return str(example["query"]), str(example["response"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"inference example {index} must be a mapping with 'query' and 'response', "
            f"got {example!r}"
        ) from err


def _examples_ids(
    tt: TemplateTokenizer, instruction: str, examples: Sequence[Mapping[str, str]]
) -> list[int]:
    return [
        t
        for i, e in enumerate(examples)
        for t in example_ids(tt, instruction, *_example_pair(e, i))
    ]


def inference_query_prefix(
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    instruction: str,
    examples: Sequence[Mapping[str, str]] = (),
) -> list[int]:
    """The ids that every query of `encode_inference_queries(..., instruction, examples)` starts
    with: BOS, the examples and the instruction's head (then comes the query's own text)."""
    tt = TemplateTokenizer(tokenizer)
    return [*tt.bos, *_examples_ids(tt, instruction, examples), *instruction_head(tt, instruction)]


def encode_inference_queries(
    tokenizer: transformers.PreTrainedTokenizerBase,
    queries: Sequence[str],
    *,
    instruction: str,
    examples: Sequence[Mapping[str, str]] = (),
    max_len: int,
) -> list[list[int]]:
    """Ids of `format_inference_query(...)` with BOS/EOS, for each query of one task.

    As in the published model card, `max_len` bounds BOS + the task query + suffix + EOS; the user's
    examples are kept whole in front of it (so the total is at most len(examples' ids) + max_len).
    The examples are tokenized once, the queries in one batched call.
    """
    tt = TemplateTokenizer(tokenizer)
    prefix = _examples_ids(tt, instruction, examples)
    tt.prime(run for q in queries for run in query_runs(instruction, q))
    return [
        query_ids(tt, instruction, q, max_len=max_len + len(prefix), prefix=prefix)
        for q in queries
    ]


def encode_inference_query(
    tokenizer: transformers.PreTrainedTokenizerBase,
    query: str,
    *,
    instruction: str,
    examples: Sequence[Mapping[str, str]] = (),
    max_len: int,
) -> list[int]:
    """`encode_inference_queries` of one query."""
    return encode_inference_queries(
        tokenizer, [query], instruction=instruction, examples=examples, max_len=max_len
    )[0]


def encode_passages(
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_len: int,
    instruction: str | None = None,
) -> list[list[int]]:
    """Passages for inference: raw text, or query-formatted when an instruction is given
    (symmetric tasks such as STS and clustering); tokenized in one batched call."""
    tt = TemplateTokenizer(tokenizer)
    symmetric = instruction is not None
    tt.prime(r for t in texts for r in passage_runs(t, prompt=instruction, symmetric=symmetric))
    return [
        passage_ids(tt, t, max_len=max_len, prompt=instruction, symmetric=symmetric)
        for t in texts
    ]


def encode_passage(
    tokenizer: transformers.PreTrainedTokenizerBase,
    text: str,
    *,
    max_len: int,
    instruction: str | None = None,
) -> list[int]:
    """`encode_passages` of one text."""
    return encode_passages(tokenizer, [text], max_len=max_len, instruction=instruction)[0]


def render(tokenizer: transformers.PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Human-readable text of a sequence: each run between special tokens is decoded on its own, so
    an untruncated sequence renders as exactly its template string (with BOS/EOS shown)."""
    special = set(tokenizer.all_special_ids)
    out: list[str] = []
    run: list[int] = []
    for t in ids:
        if t in special:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(tokenizer.convert_ids_to_tokens(t))
        else:
            run.append(t)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)
