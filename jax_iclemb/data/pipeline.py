"""Step -> packed batch: sampling (sampling.py), templates (icl.py) and packing (packing.py) joined.

Everything is a pure function of (seed, step): process p of P builds queries [p*B/P, (p+1)*B/P) of
the global batch with their passages, reading only the step's records, so resuming at step s gives
the same batches as never stopping, under any process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import transformers

from jax_iclemb.data import icl, sampling
from jax_iclemb.data.batch import ROW_IDS_PER_PROCESS, PackedBatch
from jax_iclemb.data.packing import pack_batch, row_lengths
from jax_iclemb.data.records import Dataset, Record, task_kind
from jax_iclemb.data.sources import open_datasets
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.errors import BadValue


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The global step: which records, and every query's random choices."""

    step: int
    epoch: int
    dataset: int  # index into the pipeline's datasets
    dataset_name: str
    batch_in_epoch: int
    records: np.ndarray  # int64 [B]
    samples: tuple[sampling.QuerySample, ...]  # per slot of the global batch
    in_batch_negatives: bool


@dataclasses.dataclass(frozen=True)
class QuerySequences:
    """Token ids of one query and its passage group, as they go into the batch."""

    slot: int
    record: int
    query: list[int]
    passages: list[list[int]]  # positive first
    num_examples: int  # examples that fit the prefix budget (<= k)
    teacher: list[float] | None
    label: int  # label_id of the record's label
    passage_labels: list[int]  # label_id of each passage: the positive has the record's label


def _passage_texts(record: Record, sample: sampling.QuerySample) -> list[str]:
    """A query's passage group: its sampled positive, then its sampled negatives."""
    return [record.pos[sample.pos], *(record.neg[n] for n in sample.neg)]


def label_id(label: str | None) -> int:
    """A record label as a non-negative int, the same in every process (-1: no label)."""
    return -1 if label is None else zlib.crc32(label.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data.*` values the pipeline reads, typed (`jax_iclemb.config.default_config` gives
    each key's meaning and default)."""

    query_max_len: int  # a query with its in-context examples
    passage_max_len: int
    example_query_max_len: int
    example_passage_max_len: int
    train_group_size: int  # passages per query: the positive and its hard negatives
    max_examples: int  # in-context examples per query: 0..max_examples
    examples_max_len: int  # their tokens together, with BOS and EOS; 0 = examples_limit's default
    batch_size: int
    batch_size_by_kind: Mapping[str, int]  # 0 = batch_size
    batch_size_overrides: Mapping[str, int]  # fnmatch pattern on the dataset name -> size
    default_prompt: str
    pack_len: int  # packed row length; 0 = query_max_len
    min_pack_len: int  # shortest row a step may pack into (packing.row_lengths); 0 = pack_len
    max_segments_per_row: int

    @property
    def examples_limit(self) -> int:
        """The most tokens BOS + a query's in-context examples + EOS may take."""
        return self.examples_max_len or self.query_max_len - self.passage_max_len

    @classmethod
    def from_section(cls, data: Mapping[str, Any]) -> DataConfig:
        """From the config's `data` section (other keys there, such as the path, are ignored)."""
        values = {}
        for field in dataclasses.fields(cls):
            value = data[field.name]
            values[field.name] = dict(value) if isinstance(value, Mapping) else value
        return cls(**values)


class TrainPipeline:
    def __init__(
        self,
        data_config: DataConfig,
        tokenizer: transformers.PreTrainedTokenizerBase,
        datasets: Sequence[Dataset],
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        row_multiple: int = 1,
        row_unit: int = 1,
    ):
        self.cfg = data_config
        self.tokenizer = tokenizer
        self.datasets = list(datasets)
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.row_multiple = row_multiple
        self.template_tokenizer = icl.TemplateTokenizer(tokenizer)
        self.pack_len = data_config.pack_len or data_config.query_max_len
        # Each a multiple of `row_unit` (the block-sparse attention's block).
        self.row_lengths = row_lengths(self.pack_len, data_config.min_pack_len, row_unit)
        self.layout = sampling.layout_for(
            [d.name for d in self.datasets],
            [len(d) for d in self.datasets],
            data_config.batch_size,
            dict(data_config.batch_size_overrides),
            [task_kind(d) for d in self.datasets],
            dict(data_config.batch_size_by_kind),
        )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        for name, b in zip(self.layout.names, self.layout.batch_sizes):
            if b % process_count:
                raise BadValue(
                    f"batch size {b} of dataset {name!r} is not divisible by "
                    f"{process_count} processes"
                )
        longest = max(data_config.query_max_len, data_config.passage_max_len)
        if self.pack_len < longest:
            raise BadValue(
                f"data.pack_len={self.pack_len} is shorter than a sequence ({longest})"
            )
        for dataset in self.datasets:
            self._check_budgets(dataset)

    @contextlib.contextmanager
    def _budget(self, key: str, dataset: str, record: int) -> Iterator[None]:
        """Names the config key, dataset and record of a template too long for its budget."""
        try:
            yield
        except icl.BudgetError as e:
            raise icl.BudgetError(
                f"dataset {dataset!r}, record {record}: {e} "
                f"(data.{key}={getattr(self.cfg, key)}; raise it or shorten the prompt)"
            ) from None

    def _check_budgets(self, dataset: Dataset) -> None:
        """Fail at the start, not at some later step, when a dataset's prompt (its first
        record's) and the templates leave no room for the text in a length budget, whatever the
        in-context examples take (at most `examples_limit`, with BOS and EOS)."""
        cfg, tt, rec = self.cfg, self.template_tokenizer, dataset[0]
        prompt = self._prompt(rec)
        query = icl.query_overhead(tt, prompt)
        example = len(icl.instruction_head(tt, prompt))
        tt.clear()
        q, p, limit = cfg.query_max_len, cfg.passage_max_len, cfg.examples_limit
        examples = cfg.max_examples and limit > len(tt.bos) + 1  # room for one example token
        most = q - query + len(tt.bos) + 1  # from this budget up, the query text has no room
        if cfg.examples_max_len:
            too_long = f"data.examples_max_len={limit} must be less than {most}"
        else:
            too_long = (
                f"data.query_max_len - data.passage_max_len = {limit}, the default of "
                f"data.examples_max_len, must be less than {most}: raise data.passage_max_len "
                f"or set data.examples_max_len"
            )
        checks = [
            (query >= q, f"data.query_max_len={q} leaves no room for the query text"),
            (
                examples and limit >= most,
                f"in-context examples may take up to {limit} tokens, which leaves no room for "
                f"the query text: {too_long}",
            ),
            (
                examples and example >= cfg.example_query_max_len,
                f"data.example_query_max_len={cfg.example_query_max_len} leaves no room for an "
                f"example's query (its template takes {example} tokens)",
            ),
            (
                rec.task.symmetric_passages and query >= p,
                f"data.passage_max_len={p} leaves no room for the text of a {rec.type} passage "
                f"(formatted like a query)",
            ),
        ]
        for failed, why in checks:
            if failed:
                raise icl.BudgetError(
                    f"dataset {dataset.name!r}: {why}; the query template with its prompt takes "
                    f"{query} tokens (raise the budget or shorten the prompt)"
                )

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    @property
    def max_local_queries(self) -> int:
        """The most queries one process gets in a step (datasets may differ in batch size)."""
        return max(self.layout.batch_sizes) // self.process_count

    def _group_size(self, record: Record) -> int:
        fixed = record.task.group_size
        return self.cfg.train_group_size if fixed is None else fixed

    def _plan_and_records(self, step: int) -> tuple[StepPlan, list[Record]]:
        where = sampling.locate_step(self.seed, step, self.layout)
        dataset = self.datasets[where.dataset]
        records = [dataset[int(i)] for i in where.records]
        b = len(records)
        samples = tuple(
            sampling.sample_query(
                self.seed,
                step,
                slot,
                num_pos=len(rec.pos),
                num_neg=len(rec.neg),
                num_negatives=self._group_size(rec) - 1,
                max_examples=self.cfg.max_examples,
                batch_size=b,
            )
            for slot, rec in enumerate(records)
        )
        in_batch = dataset.in_batch_negatives and all(r.task.in_batch_negatives for r in records)
        plan = StepPlan(
            step=step,
            epoch=where.epoch,
            dataset=where.dataset,
            dataset_name=dataset.name,
            batch_in_epoch=where.batch,
            records=where.records,
            samples=samples,
            in_batch_negatives=in_batch,
        )
        return plan, records

    def plan(self, step: int) -> StepPlan:
        """The global plan of `step` (identical in every process)."""
        return self._plan_and_records(step)[0]

    def local_slots(self, global_batch: int) -> range:
        per = global_batch // self.process_count
        return range(self.process_index * per, (self.process_index + 1) * per)

    def _prompt(self, record: Record) -> str:
        return record.prompt if record.prompt is not None else self.cfg.default_prompt

    def _response(self, plan: StepPlan, records: list[Record], slot: int) -> str:
        rec = records[slot]
        if rec.response is not None:
            return rec.response
        if rec.task.response_from == "category":
            if rec.category is None:
                raise ValueError(
                    f"{plan.dataset_name} record {plan.records[slot]}: {rec.type} records need "
                    f"a 'category' (the response of an in-context example)"
                )
            return rec.category
        return rec.pos[plan.samples[slot].pos]

    def _prime(self, plan: StepPlan, records: list[Record], slots: range) -> None:
        """Tokenize the step's text runs in one batched call (much faster than one by one)."""
        runs: list[icl.Run] = []
        for j in {j for i in slots for j in plan.samples[i].examples}:
            rec = records[j]
            runs += icl.example_runs(
                self._prompt(rec), rec.query, self._response(plan, records, j)
            )
        for i in slots:
            rec, prompt = records[i], self._prompt(records[i])
            runs += icl.query_runs(prompt, rec.query)
            for text in _passage_texts(rec, plan.samples[i]):
                runs += icl.passage_runs(
                    text, prompt=prompt, symmetric=rec.task.symmetric_passages
                )
        self.template_tokenizer.prime(runs)

    def _sequences(self, step: int) -> tuple[StepPlan, list[QuerySequences]]:
        plan, records = self._plan_and_records(step)
        slots = self.local_slots(len(records))
        cfg, tt = self.cfg, self.template_tokenizer
        self._prime(plan, records, slots)
        try:
            examples: dict[int, list[int]] = {}
            out = []
            for i in slots:
                rec, sample = records[i], plan.samples[i]
                for j in sample.examples:
                    if j not in examples:
                        where = ("example_query_max_len", plan.dataset_name, int(plan.records[j]))
                        with self._budget(*where):
                            examples[j] = icl.example_ids(
                                tt,
                                self._prompt(records[j]),
                                records[j].query,
                                self._response(plan, records, j),
                                query_limit=cfg.example_query_max_len,
                                response_limit=cfg.example_passage_max_len,
                            )
                prefix, used = icl.add_examples(
                    tt,
                    (examples[j] for j in sample.examples),
                    limit=cfg.examples_limit,
                )
                prompt = self._prompt(rec)
                with self._budget("query_max_len", plan.dataset_name, int(plan.records[i])):
                    query = icl.query_ids(
                        tt, prompt, rec.query, max_len=cfg.query_max_len, prefix=prefix
                    )
                symmetric = rec.task.symmetric_passages
                with self._budget("passage_max_len", plan.dataset_name, int(plan.records[i])):
                    passages = [
                        icl.passage_ids(
                            tt, t, max_len=cfg.passage_max_len, prompt=prompt,
                            symmetric=symmetric,
                        )
                        for t in _passage_texts(rec, sample)
                    ]
                teacher = None
                if rec.pos_scores is not None and (not sample.neg or rec.neg_scores is not None):
                    teacher = [rec.pos_scores[sample.pos]]
                    teacher += [rec.neg_scores[n] for n in sample.neg] if sample.neg else []
                out.append(
                    QuerySequences(
                        slot=i,
                        record=int(plan.records[i]),
                        query=query,
                        passages=passages,
                        num_examples=used,
                        teacher=teacher,
                        label=label_id(rec.label),
                        passage_labels=[
                            label_id(rec.label),
                            *(label_id(rec.neg_labels[n] if rec.neg_labels else None)
                              for n in sample.neg),
                        ],
                    )
                )
        finally:
            tt.clear()
        return plan, out

    def batch(self, step: int) -> tuple[PackedBatch, dict[str, Any]]:
        """This process's part of global step `step`, packed into the shortest rows that hold it,
        and a summary of it."""
        packed, info = self.batches(step)
        return packed[min(packed)], info

    def batches(
        self, step: int, every_length: bool = False
    ) -> tuple[dict[int, PackedBatch], dict[str, Any]]:
        """This process's part of global step `step`, packed at the shortest of `row_lengths`
        that holds its longest sequence, or with `every_length` at each one that does (so that
        processes can agree on the shortest that holds all of theirs: `step_batch.step_shape`),
        as {row length: batch}; and a summary of it (its rows: those of the shortest)."""
        plan, seqs = self._sequences(step)
        longest = max(len(s) for q in seqs for s in (q.query, *q.passages))
        # None fits only a sequence over pack_len, which pack_batch reports by its length.
        fitting = [n for n in self.row_lengths if n >= longest] or [self.pack_len]
        packed = {n: self._pack(plan, seqs, n) for n in (fitting if every_length else fitting[-1:])}
        batch = packed[min(packed)]
        real = int((batch.segment_ids > 0).sum())
        info = {
            "step": step,
            "dataset": plan.dataset_name,
            "epoch": plan.epoch,
            "batch_in_epoch": plan.batch_in_epoch,
            "global_batch": len(plan.records),
            "num_queries": len(seqs),
            "num_passages": int(batch.passage_mask.sum()),
            "num_rows": batch.num_rows,
            "row_length": batch.tokens.shape[1],
            "rows_used": int((batch.segment_ids > 0).any(axis=1).sum()),  # before bucket padding
            "real_tokens": real,
            "utilisation": real / batch.tokens.size,
            "in_batch_negatives": plan.in_batch_negatives,
            "mean_examples": float(np.mean([q.num_examples for q in seqs])),
        }
        return packed, info

    def _pack(self, plan: StepPlan, seqs: list[QuerySequences], length: int) -> PackedBatch:
        g = self.cfg.train_group_size
        teacher = np.zeros((len(seqs), g), dtype=np.float32)
        has_teacher = np.zeros(len(seqs), dtype=bool)
        passage_labels = np.full((len(seqs), g), -1, dtype=np.int32)
        for i, q in enumerate(seqs):
            if q.teacher is not None:
                teacher[i, : len(q.teacher)] = q.teacher
                has_teacher[i] = True
            passage_labels[i, : len(q.passage_labels)] = q.passage_labels
        return pack_batch(
            [q.query for q in seqs],
            [q.passages for q in seqs],
            group_size=g,
            pack_len=length,
            max_segments=self.cfg.max_segments_per_row,
            teacher_scores=teacher,
            has_teacher=has_teacher,
            in_batch_negatives=plan.in_batch_negatives,
            query_label=[q.label for q in seqs],
            passage_label=passage_labels,
            row_multiple=self.row_multiple,
            pad_id=self.tokenizer.pad_token_id or 0,
            # Ids unique over the processes: each numbers its rows from its own block.
            first_row_id=self.process_index * ROW_IDS_PER_PROCESS,
        )

    def examples(self, step: int) -> list[dict[str, Any]]:
        """Human-readable texts of this process's queries of `step` (for inspection)."""
        plan, seqs = self._sequences(step)
        render = lambda ids: icl.render(self.tokenizer, ids)
        return [
            {
                "slot": q.slot,
                "record": q.record,
                "k": plan.samples[q.slot].k,
                "num_examples": q.num_examples,
                "example_slots": list(plan.samples[q.slot].examples[: q.num_examples]),
                "query": render(q.query),
                "query_tokens": len(q.query),
                "passages": [render(p) for p in q.passages],
                "passage_tokens": [len(p) for p in q.passages],
                "teacher_scores": q.teacher,
            }
            for q in seqs
        ]


def pipeline_from_config(
    config: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    row_multiple: int = 1,
) -> TrainPipeline:
    """Open the configured datasets and tokenizer and build the pipeline."""
    data, model = config.data, config.model
    datasets = open_datasets(
        data.path, on_bad_record=data.on_bad_record, tfds_dir=data.tfds_dir or None
    )
    return TrainPipeline(
        DataConfig.from_section(data),
        load_tokenizer(data.tokenizer),
        datasets,
        seed=int(config.seed),
        process_index=process_index,
        process_count=process_count,
        row_multiple=row_multiple,
        # Block-sparse attention cuts rows into blocks: every row length a whole number of them.
        row_unit=model.attention_block if model.attention_impl == "block_sparse" else 1,
    )
