"""Pure sampling: everything random about a training step is a function of (seed, step).

Epoch layout: in epoch e every dataset's records are shuffled and cut into batches of that dataset's
batch size, and the batches of all datasets are interleaved in a shuffled order (one dataset per
step; datasets are weighted by their size). Step s lies in epoch s // steps_per_epoch, so training
simply continues into the next, reshuffled, epoch. A dataset whose size is not a multiple of its
batch size gets one more batch per epoch, completed with records from the start of that epoch's
permutation ("wrap-around"): every record is seen at least once per epoch, no record appears twice
in a batch, and batches keep a fixed size (the reference drops the tail instead).

Per query (seed, step, slot): the positive, the hard negatives, k ~ U{0..max_examples} and the
in-context examples (other slots of the same global batch). Each draw uses a numpy Generator seeded
by a SeedSequence of integers, so any process computes any part of any step without the others.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from jax_iclemb.errors import BadValue

# Stream tags keep the generators for different purposes independent.
_RECORD_ORDER, _BATCH_ORDER, _QUERY = 1, 2, 3


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def batch_size_for(
    name: str,
    default: int,
    overrides: Mapping[str, int],
    kind_sizes: Mapping[str, int] = {},
    kind: str = "",
) -> int:
    """The batch size of dataset `name` (of task kind `kind`): the most specific matching fnmatch
    pattern of `overrides` wins (an exact name first, then the longest pattern), so
    {"retrieval/*": 512, "*": 256} means what it says whatever the mapping's order (ml_collections
    sorts keys); without a match, the size of its kind when `kind_sizes` gives one (> 0), else
    `default`."""
    if name in overrides:
        return int(overrides[name])
    matches = [p for p in overrides if fnmatch.fnmatchcase(name, p)]
    if not matches:
        return int(kind_sizes.get(kind) or default)
    return int(overrides[max(matches, key=lambda p: (len(p), p))])


def check_patterns(names: Sequence[str], overrides: Mapping[str, int]) -> None:
    """Every override pattern must name at least one dataset: a typo would be silently ignored."""
    unused = [p for p in overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise BadValue(
            f"data.batch_size_overrides: pattern(s) {unused} match no dataset; the datasets are "
            f"{list(names)} (fnmatch patterns on these names)"
        )


@dataclasses.dataclass(frozen=True)
class EpochLayout:
    """What fixes the epoch structure: the datasets' names, sizes and batch sizes."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("no datasets to sample from")
        for name, n, b in zip(self.names, self.sizes, self.batch_sizes, strict=True):
            if b < 1 or n < b:
                raise BadValue(
                    f"dataset {name!r} has {n} records but batch size {b}: a batch needs that "
                    f"many distinct records (set a smaller one with data.batch_size, "
                    f"data.batch_size_by_kind or data.batch_size_overrides)"
                )

    @functools.cached_property
    def batches_per_dataset(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / b) for n, b in zip(self.sizes, self.batch_sizes))

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_per_dataset)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, layout: EpochLayout) -> np.ndarray:
    """[steps_per_epoch, 2] (dataset index, batch index within the dataset) in step order."""
    pairs = np.array(
        [(d, b) for d, nb in enumerate(layout.batches_per_dataset) for b in range(nb)],
        dtype=np.int64,
    )
    return pairs[_rng(seed, _BATCH_ORDER, epoch).permutation(len(pairs))]


@functools.lru_cache(maxsize=16)
def _record_order(seed: int, epoch: int, dataset: int, size: int) -> np.ndarray:
    return _rng(seed, _RECORD_ORDER, epoch, dataset).permutation(size)


@dataclasses.dataclass(frozen=True)
class StepLocation:
    epoch: int
    dataset: int  # index into the sorted dataset list
    batch: int  # batch index of that dataset within the epoch
    records: np.ndarray  # int64 [batch size]: record indices of the global batch, in slot order


def locate_step(seed: int, step: int, layout: EpochLayout) -> StepLocation:
    """Which dataset and which records make up global step `step`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, within = divmod(step, layout.steps_per_epoch)
    dataset, batch = (int(x) for x in _epoch_order(seed, epoch, layout)[within])
    n, b = layout.sizes[dataset], layout.batch_sizes[dataset]
    order = _record_order(seed, epoch, dataset, n)
    # Wrap-around: the last, partial batch is completed from the start of the permutation.
    records = order[np.arange(batch * b, (batch + 1) * b) % n]
    return StepLocation(epoch=epoch, dataset=dataset, batch=batch, records=records)


@dataclasses.dataclass(frozen=True)
class QuerySample:
    pos: int  # index into the record's positives
    neg: tuple[int, ...]  # indices into the record's negatives (group size - 1, or fewer if none)
    k: int  # drawn number of examples
    examples: tuple[int, ...]  # slots of the global batch whose records serve as examples


def query_rng(seed: int, step: int, slot: int) -> np.random.Generator:
    return _rng(seed, _QUERY, step, slot)


def positive_index(seed: int, step: int, slot: int, num_pos: int) -> int:
    """The positive sampled for `slot` (also its response when it serves as an example)."""
    return int(query_rng(seed, step, slot).integers(num_pos))


def sample_negatives(rng: np.random.Generator, num_neg: int, count: int) -> tuple[int, ...]:
    """`count` distinct negatives when there are enough; otherwise each one repeated as evenly as
    possible (the reference's rule). None when the record has no negatives at all."""
    if num_neg == 0 or count == 0:
        return ()
    pool = np.tile(np.arange(num_neg), math.ceil(count / num_neg))
    return tuple(int(i) for i in rng.choice(pool, size=count, replace=False))


def sample_query(
    seed: int,
    step: int,
    slot: int,
    *,
    num_pos: int,
    num_neg: int,
    num_negatives: int,
    max_examples: int,
    batch_size: int,
) -> QuerySample:
    """All random choices of one query of the global batch."""
    rng = query_rng(seed, step, slot)
    pos = int(rng.integers(num_pos))  # first draw: see positive_index
    k = int(rng.integers(max_examples + 1))
    neg = sample_negatives(rng, num_neg, num_negatives)
    others = np.delete(np.arange(batch_size), slot)  # never the query's own record
    chosen = rng.choice(others, size=min(k, len(others)), replace=False)
    return QuerySample(pos=pos, neg=neg, k=k, examples=tuple(int(i) for i in chosen))


def layout_for(
    names: Sequence[str],
    sizes: Sequence[int],
    default_batch: int,
    overrides: Mapping[str, int],
    kinds: Sequence[str] = (),
    kind_sizes: Mapping[str, int] = {},
) -> EpochLayout:
    """The epoch layout of datasets `names` (of task `kinds`, if given) and their sizes; batch
    sizes as `batch_size_for` decides them. Patterns matching no dataset are an error."""
    check_patterns(names, overrides)
    kinds = tuple(kinds) or ("",) * len(names)
    return EpochLayout(
        names=tuple(names),
        sizes=tuple(int(n) for n in sizes),
        batch_sizes=tuple(
            batch_size_for(name, default_batch, overrides, kind_sizes, kind)
            for name, kind in zip(names, kinds, strict=True)
        ),
    )
