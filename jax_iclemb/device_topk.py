"""Exact top-k retrieval on this host's devices, the corpus streamed in blocks.

    search = RunningTopK(queries, 100, query_ids, doc_ids, ignore_identical_ids=True)
    for chunk in chunks:  # [n, D] embeddings of the next documents, in the order of doc_ids
        search.add(chunk)
    run = search.run()    # {query id: {doc id: score}}

Each query keeps its k best documents so far on the devices (score, tie keys, global index). A
block of `doc_block` documents is split over the devices; each device scores its part against
the queries (`query_block` at a time), keeps its own k best, and these are gathered and merged
into the running k. Memory is bounded by the block sizes, never by the corpus: a device holds
[query_block, doc_block / devices] scores, the host one block and the [Q, k] result.

The order is exact, ties included: score descending, then document id descending (trec_eval's
rule, `retrieval.descending_id_rank`). Selection is lexicographic over float32 keys, the score
first and then the id rank, so a tie at the cut-off is resolved as the full score matrix would
be. Scores are float32 dot products at full precision (no TF32 or bf16 passes); they may differ
from NumPy's `q @ d.T` in the last bit (another summation order), as any two BLAS libraries do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_iclemb import parallel
from jax_iclemb.ir_metrics import Run
from jax_iclemb.retrieval import descending_id_rank

RANK_BITS = 24  # float32 holds every integer below 2**24 exactly
# The rank key of padding columns and of the empty running top-k: below every real document's.
PAD_KEY = float(np.finfo(np.float32).min)


def rank_keys(ranks: np.ndarray) -> np.ndarray:
    """Tie keys [R, N] float32 of integer ranks, larger first, compared lexicographically: one key
    (-rank) up to 2**24 documents, two (high and low bits) above, so that every key is exact."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if len(ranks) <= 1 << RANK_BITS:
        return (-ranks).astype(np.float32)[None]
    return np.stack([-(ranks >> RANK_BITS), -(ranks & ((1 << RANK_BITS) - 1))]).astype(np.float32)


def lex_top_k(keys: Sequence[jax.Array], k: int) -> jax.Array:
    """Columns [Q, k] of the k largest entries of each row, compared lexicographically over
    `keys` (each [Q, M], or [1, M] for one key shared by every row): key 0, then key 1 among
    equals, and so on. Exact whatever the ties (the columns come in no particular order).

    One `top_k` per level finds the k-th value t; only where some row has a tie at t straddling
    the cut-off (more than k entries >= t) does the next level run, among the entries equal to t
    (those above t are all taken: they get +inf on the next level, the others -inf)."""
    first, *rest = keys
    if first.shape[1] == k:  # all of them
        return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), first.shape)
    # Only whole outputs of top_k are read (a minimum, not slices): XLA:CPU keeps its fast TopK
    # kernel only then, and falls back to a full sort (100x slower) otherwise.
    values, columns = jax.lax.top_k(first, k)
    if not rest:  # the last key is unique among real documents: no tie to break
        return columns
    kth = jnp.min(values, axis=1, keepdims=True)

    def break_ties() -> jax.Array:
        tied = [jnp.where(first == kth, key, -jnp.inf) for key in rest]
        return lex_top_k([jnp.where(first > kth, jnp.inf, key) for key in tied], k)

    straddles = jnp.any(jnp.sum(first >= kth, axis=1) > k)  # more than k reach the k-th value
    return jax.lax.cond(straddles, break_ties, lambda: columns)


def _take(key: jax.Array, columns: jax.Array) -> jax.Array:
    """key [Q, M] or [1, M] (shared by the rows) at columns [Q, k]."""
    if key.shape[0] == 1:
        return jnp.take(key[0], columns)
    return jnp.take_along_axis(key, columns, axis=1)


def _merge_block(
    best: jax.Array,
    best_docs: jax.Array,
    nan: jax.Array,
    queries: jax.Array,
    own_docs: jax.Array,
    block: jax.Array,
    block_keys: jax.Array,
    start: jax.Array,
    stop: jax.Array,
    *,
    k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One device's part of a block: its documents scored and cut to k, then every device's k
    gathered and merged with the running best (keys [L, Q, k], the same on every device)."""
    width = block.shape[0]
    docs = start + jax.lax.axis_index("data") * width + jnp.arange(width, dtype=jnp.int32)
    scores = jnp.dot(queries, block.T, precision=jax.lax.Precision.HIGHEST)
    nan = nan | (jax.lax.psum(jnp.isnan(scores).any().astype(jnp.int32), "data") > 0)
    # Padding columns and each query's own document (ignore_identical_ids) are never retrieved.
    dropped = (docs[None, :] >= stop) | (docs[None, :] == own_docs[:, None])
    keys = [jnp.where(dropped, -jnp.inf, scores), *block_keys[:, None, :]]
    local = lex_top_k(keys, min(k, width))
    gathered = [jax.lax.all_gather(_take(key, local), "data", axis=1, tiled=True) for key in keys]
    keys = [jnp.concatenate(pair, axis=1) for pair in zip(best, gathered)]
    docs = jax.lax.all_gather(jnp.take(docs, local), "data", axis=1, tiled=True)
    docs = jnp.concatenate([best_docs, docs], axis=1)
    keep = lex_top_k(keys, k)
    return jnp.stack([_take(key, keep) for key in keys]), _take(docs, keep), nan


@functools.partial(jax.jit, static_argnames=("k", "mesh"), donate_argnums=(0, 1))
def _rank_block(
    best, best_docs, nan, queries, own_docs, block, block_keys, start, stop, *, k, mesh
):
    """`_merge_block` on each device of `mesh`: the block's documents split, the rest replicated.
    The running best is donated: it is replaced, never kept."""
    replicated, rows = P(), P("data")
    return jax.shard_map(
        functools.partial(_merge_block, k=k), mesh=mesh,
        in_specs=(replicated,) * 5 + (rows, P(None, "data"), replicated, replicated),
        out_specs=replicated, check_vma=False,
    )(best, best_docs, nan, queries, own_docs, block, block_keys, start, stop)


class RunningTopK:
    """Each query's top-k documents by dot product, exact (see the module docstring), over a
    corpus added in chunks of any size in the order of `doc_ids`.

    `ignore_identical_ids`: a document whose id is the query's is never retrieved (BEIR's exact
    search and mteb do this: in ArguAna and Quora the queries are also in the corpus).
    `mesh`: default, this host's devices, data-parallel over the documents of a block."""

    def __init__(
        self,
        queries: np.ndarray,
        k: int,
        query_ids: Sequence[str],
        doc_ids: Sequence[str],
        *,
        ignore_identical_ids: bool = False,
        query_block: int = 1024,
        doc_block: int = 16384,
        mesh: jax.sharding.Mesh | None = None,
    ):
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or len(queries) != len(query_ids) or not len(queries):
            raise ValueError(f"queries {queries.shape} do not match {len(query_ids)} query ids")
        if not doc_ids or k < 1:
            raise ValueError(f"need documents and k >= 1, got {len(doc_ids)} documents, k={k}")
        self._mesh = mesh or parallel.make_mesh((-1, 1, 1), jax.local_devices())
        devices = self._mesh.shape["data"]
        self._k = min(k, len(doc_ids))
        # Whole columns per device; no bigger than the corpus, which a small one is padded to.
        self._doc_block = -(-min(doc_block, len(doc_ids)) // devices) * devices
        self._doc_ids = doc_ids
        self._query_ids = query_ids
        self._rank_keys = rank_keys(descending_id_rank(doc_ids))
        column = {doc: j for j, doc in enumerate(doc_ids)} if ignore_identical_ids else {}
        own = np.array([column.get(qid, -1) for qid in query_ids], dtype=np.int32)
        self._query_block = min(query_block, len(queries))
        pad = -len(queries) % self._query_block  # every query block has one shape: one compile
        queries = np.pad(queries, ((0, pad), (0, 0)))
        own = np.pad(own, (0, pad), constant_values=-1)
        replicated = NamedSharding(self._mesh, P())
        self._queries = [
            jax.device_put((queries[i : i + self._query_block], own[i : i + self._query_block]),
                           replicated)
            for i in range(0, len(queries), self._query_block)
        ]
        empty = np.full((1 + len(self._rank_keys), self._query_block, self._k), PAD_KEY, np.float32)
        empty[0] = -np.inf
        self._best = [
            jax.device_put((empty, np.full(empty.shape[1:], -1, np.int32), np.bool_(False)),
                           replicated)
            for _ in self._queries
        ]
        self._pending = np.empty((0, queries.shape[1]), np.float32)  # less than one block
        self._added = 0
        self._ranked = 0

    def add(self, docs: np.ndarray) -> None:
        """Rank the next documents' embeddings [n, D] (whole blocks now, the rest with the next
        chunk or at `run`)."""
        docs = np.asarray(docs, dtype=np.float32)
        if docs.ndim != 2 or docs.shape[1] != self._pending.shape[1]:
            raise ValueError(f"document embeddings {docs.shape} do not match the queries' "
                             f"dimension {self._pending.shape[1]}")
        if self._added + len(docs) > len(self._doc_ids):
            raise ValueError(f"{self._added + len(docs)} documents added for "
                             f"{len(self._doc_ids)} doc ids")
        self._added += len(docs)
        if len(self._pending):
            fill = self._doc_block - len(self._pending)
            self._pending = np.concatenate([self._pending, docs[:fill]])
            docs = docs[fill:]
            if len(self._pending) < self._doc_block:
                return
            self._rank(self._pending)
        whole = len(docs) - len(docs) % self._doc_block
        for start in range(0, whole, self._doc_block):
            self._rank(docs[start : start + self._doc_block])
        self._pending = docs[whole:].copy()
        self._check_finite()  # once per chunk: a NaN stops the work early, with little waiting

    def run(self) -> Run:
        """{query id: {doc id: score}}: each query's top k (fewer where its own document was
        left out), once every document has been added."""
        if self._added != len(self._doc_ids):
            raise ValueError(f"{self._added} documents added for {len(self._doc_ids)} doc ids")
        if len(self._pending):
            self._rank(self._pending)
            self._pending = self._pending[:0]
        self._check_finite()
        run: Run = {}
        for i, (keys, docs, _) in enumerate(self._best):
            qids = self._query_ids[i * self._query_block : (i + 1) * self._query_block]
            scores, docs = np.asarray(keys[0]), np.asarray(docs)
            for qid, row, cols in zip(qids, scores, docs):
                run[qid] = {self._doc_ids[j]: float(s) for j, s in zip(cols, row) if s > -np.inf}
        return run

    def _rank(self, block: np.ndarray) -> None:
        """Merge one block (the last may be short: padded, its padding never retrieved)."""
        start, stop = self._ranked, self._ranked + len(block)
        pad = self._doc_block - len(block)
        if pad:
            block = np.pad(block, ((0, pad), (0, 0)))
        keys = np.pad(self._rank_keys[:, start:stop], ((0, 0), (0, pad)), constant_values=PAD_KEY)
        block = jax.device_put(block, NamedSharding(self._mesh, P("data")))
        keys = jax.device_put(keys, NamedSharding(self._mesh, P(None, "data")))
        bounds = np.int32(start), np.int32(stop)
        self._best = [
            _rank_block(*best, queries, own, block, keys, *bounds, k=self._k, mesh=self._mesh)
            for best, (queries, own) in zip(self._best, self._queries)
        ]
        self._ranked = stop

    def _check_finite(self) -> None:
        if any(bool(nan) for *_, nan in self._best):
            raise ValueError("embeddings produced NaN scores")
