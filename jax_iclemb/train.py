"""`python -m jax_iclemb.train --config configs/tiny.py [--workdir DIR] [--config.KEY=VALUE ...]`

The whole job: build the mesh, tokenizer, datasets, pipeline and model; restore the latest
checkpoint if there is one; then for every step turn the step number into a packed batch, run one
jitted update over the global batch, log, and checkpoint. Everything a step needs is a function of
(config, step), which is what makes resume exact.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jax_iclemb import checkpoint, compile_cache, distributed, gradcache, parallel
from jax_iclemb import config as config_lib
from jax_iclemb.data.batch import PackedBatch
from jax_iclemb.data.packing import ladder, pad_batch
from jax_iclemb.data.pipeline import TrainPipeline, pipeline_from_config
from jax_iclemb.errors import PathExists, ReportedError, add_debug_flag, cli
from jax_iclemb.loss import contrastive_loss
from jax_iclemb.model import (
    TRAINABLE,
    LoraConfig,
    ModelConfig,
    create_model,
    l2_normalize,
    last_token_pool,
    load_pretrained,
    mean_pool,
)
from jax_iclemb.model.block_sparse import block_pairs, pad_pairs
from jax_iclemb.observe import MetricsWriter, flops_per_token, peak_flops, wandb_options
from jax_iclemb.optim import global_norm, make_optimizer

log = logging.getLogger("jax_iclemb.train")

TrainState = dict[str, Any]  # {"step": int32[], "params": trainable (pure dict), "opt": optax}


class TrainingError(ReportedError):
    """The run cannot go on (a non-finite loss): the message says why and what was kept."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return {
        "dtype": m.dtype,
        "param_dtype": m.param_dtype,
        "attention": m.attention,
        "remat": m.remat,
        "scan_layers": m.scan_layers,
        "attention_impl": m.attention_impl,
        "attention_block": m.attention_block,
        "init": m.init,
    }


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
    """The adapters; None when the whole model is trained (`train.trainable="all"`)."""
    if config.train.trainable == "all":
        return None
    c = config.lora
    return LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets))


# What the optimizer updates (`train.trainable`): the adapters, or every parameter (from scratch).
TRAINABLE_BY_MODE = {"lora": TRAINABLE, "all": nnx.Param}


def build_model(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, vocab_size: int
) -> tuple[nnx.Module, ModelConfig]:
    """The decoder with fresh LoRA adapters, its parameters created directly into their shards."""
    if config.model.hf_path:
        return load_pretrained(
            config.model.hf_path,
            lora=lora_config(config),
            mesh=mesh,
            vocab_size=vocab_size,
            seed=config.seed,
            **model_options(config),
        )
    arch = dict(config.model.arch.to_dict())
    arch["vocab_size"] = max(int(arch["vocab_size"]), vocab_size)
    model_config = ModelConfig.from_hf(arch, **model_options(config))
    model = create_model(model_config, lora_config(config), seed=config.seed, mesh=mesh)
    return model, model_config


def embed_packed(
    model: nnx.Module,
    batch: dict[str, jax.Array],
    pooling: str = "last_token",
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Normalised embeddings of every segment slot of a packed batch: [R * S, D]; LoRA dropout
    on when a `dropout_key` is given (training)."""
    hidden = model(
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        batch.get("block_pairs"),
        dropout_key=dropout_key,
    )
    if pooling == "mean":
        pooled = mean_pool(hidden, batch["segment_ids"], batch["last_index"].shape[1])
    else:
        pooled = last_token_pool(hidden, batch["last_index"])
    pooled = l2_normalize(pooled)
    return pooled.reshape(-1, pooled.shape[-1])


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def same_label_passages(query_label: jax.Array, passage_label: jax.Array) -> jax.Array:
    """[B, B·G] True where a passage carries the query's label: a positive for that query, so a
    false negative (another query of the same class, a hard negative that matches), excluded
    from the softmax. The query's own positive stays its target."""
    flat = passage_label.reshape(1, -1)
    return (query_label[:, None] == flat) & (query_label[:, None] >= 0)


def make_embed_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict) -> Callable:
    """Pure (params, frozen, rows, dropout_key) -> normalised slot embeddings [rows · S, D]."""
    pooling = config.model.pooling

    def embed(params: dict, frozen: dict, rows: dict, key: jax.Array) -> jax.Array:
        return embed_packed(nnx.merge(graphdef, frozen, params), rows, pooling, key)

    return embed


def make_objective(config: ml_collections.ConfigDict) -> Callable:
    """Pure (slot embeddings [R · S, D], batch) -> (loss, metrics) over the global batch."""
    temperature = float(config.loss.temperature)
    distill_weight = float(config.loss.distill_weight)

    def objective(emb: jax.Array, batch: dict):
        q = emb[batch["query_slot"]]
        p = emb[batch["passage_slot"]]
        return contrastive_loss(
            q,
            p,
            batch["passage_mask"],
            batch["in_batch_negatives"],
            temperature=temperature,
            teacher_scores=batch["teacher_scores"] if distill_weight else None,
            has_teacher=batch["has_teacher"] if distill_weight else None,
            distill_weight=distill_weight,
            negative_mask=same_label_passages(batch["query_label"], batch["passage_label"]),
        )

    return objective


def dropout_key(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """Dropout masks are a function of (seed, step): nothing random lives in the checkpoint."""
    return jax.random.fold_in(jax.random.key(config.seed + 1), step)


def make_loss_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict) -> Callable:
    """Pure (params, frozen, batch, step) -> (loss, metrics) over the global batch."""
    embed, objective = make_embed_fn(graphdef, config), make_objective(config)

    def loss_fn(params: dict, frozen: dict, batch: dict, step: jax.Array):
        return objective(embed(params, frozen, batch, dropout_key(config, step)), batch)

    return loss_fn


def make_grad_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict) -> Callable:
    """Pure (params, frozen, batch, step) -> ((loss, metrics), grads); with
    `train.grad_cache_chunks` > 1 through the gradient cache (chunk c's dropout key is the step's
    key folded with c)."""
    chunks = int(config.train.grad_cache_chunks)
    if chunks == 1:
        return jax.value_and_grad(make_loss_fn(graphdef, config), has_aux=True)
    embed, objective = make_embed_fn(graphdef, config), make_objective(config)

    def grad_fn(params: dict, frozen: dict, batch: dict, step: jax.Array):
        key = dropout_key(config, step)
        return gradcache.value_and_grad(
            lambda p, rows, c: embed(p, frozen, rows, jax.random.fold_in(key, c)),
            lambda emb: objective(emb, batch),
            params,
            {name: batch[name] for name in ROW_ARRAYS if name in batch},
            chunks,
        )

    return grad_fn


def make_update(
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    schedule: Callable,
) -> Callable:
    """Pure (state, grads) -> (state, {grad_norm, lr}): the optimizer's part of a step. It does not
    depend on the batch's shape, so the trainer compiles it once per run, apart from the
    gradient, which compiles once per step shape (a quarter less to compile for every shape)."""
    accumulate = max(1, config.optim.accumulate_steps)

    def update(state: TrainState, grads: dict):
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"grad_norm": global_norm(grads), "lr": schedule(state["step"] // accumulate)}
        return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

    return update


def make_train_step(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    schedule: Callable,
) -> Callable:
    """Pure (state, frozen, batch) -> (state, metrics): one update on the global batch, as one
    function (the trainer runs its two parts, `make_grad_fn` and `make_update`, as two programs)."""
    grad_fn, update = make_grad_fn(graphdef, config), make_update(config, tx, schedule)

    def train_step(state: TrainState, frozen: dict, batch: dict):
        (loss, metrics), grads = grad_fn(state["params"], frozen, batch, state["step"])
        state, more = update(state, grads)
        return state, dict(metrics, loss=loss, **more)

    return train_step


def initial_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": jax.jit(tx.init)(params)}


def split_model(model: nnx.Module, trainable: str = "lora") -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, trainable parameters, everything else), both as plain dicts: merged inside a
    traced function they become that trace's variables (dropout may then advance its RNG)."""
    graphdef, params, frozen = nnx.split(model, TRAINABLE_BY_MODE[trainable], ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


# ---------------------------------------------------------------------------------------------
# Batches onto the mesh
# ---------------------------------------------------------------------------------------------

# Split over the data axes with the rows (block_pairs: one tile list per row group).
ROW_ARRAYS = ("tokens", "segment_ids", "positions", "last_index", "block_pairs")
SLOT_ARRAYS = ("query_slot", "passage_slot")


TILE_RUNGS = 4  # attention tiles: under 25% padding tiles (attention is ~10% of a CPU step)


def attention_tiles(config: ml_collections.ConfigDict, batch: PackedBatch, groups: int):
    """The block-sparse attention's tile lists of the batch's rows, one per contiguous row group
    (`block_sparse.block_pairs`), not yet padded; None unless `model.attention_impl` is
    "block_sparse"."""
    m = config.model
    if m.attention_impl != "block_sparse":
        return None
    return block_pairs(
        batch.segment_ids, block=m.attention_block, causal=m.attention == "causal", groups=groups
    )


def gather_counts(values: Sequence[int]) -> np.ndarray:
    """int64 [processes, len(values)]: every process's `values`, in one collective."""
    local = np.asarray(values, np.int64)[None]
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def global_max(value: int) -> int:
    """The largest `value` over all processes."""
    return int(gather_counts([value]).max())


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What a step computes, agreed by all processes: its shape decides its executable."""

    rows: int  # packed rows per process
    length: int  # tokens per row
    tiles: int  # block-sparse tiles per row group (0: dense attention)
    real_tokens: int  # over all processes
    rows_used: int  # rows holding a token, over all processes (before the ladder)

    @property
    def key(self) -> tuple[int, int, int]:
        return self.rows, self.length, self.tiles


def step_shape(config, batch: PackedBatch, tiles, groups: int) -> StepShape:
    """The step's shape on the ladders, a function of this step's batches only (so a resumed run
    computes exactly what an uninterrupted one does): rows on `row_bucket`'s ladder, tile lists
    on `ladder(·, TILE_RUNGS)`, both the largest over processes (one collective)."""
    used = int((batch.segment_ids > 0).any(axis=1).sum())
    real = int((batch.segment_ids > 0).sum())
    count = 0 if tiles is None else tiles.shape[1]
    counts = gather_counts([batch.num_rows // groups, count, real, used])
    per_group, count = counts[:, :2].max(axis=0)
    return StepShape(
        rows=int(per_group) * groups,
        length=batch.tokens.shape[1],
        tiles=ladder(int(count), TILE_RUNGS) if tiles is not None else 0,
        real_tokens=int(counts[:, 2].sum()),
        rows_used=int(counts[:, 3].sum()),
    )


def device_batch(
    mesh: jax.sharding.Mesh, batch: PackedBatch, block_pairs: np.ndarray | None = None
) -> dict[str, jax.Array]:
    """This host's packed rows (and their attention tile lists) -> global arrays on the mesh.

    Rows are split over the data axes; each host contributes its own rows
    (`make_array_from_process_local_data`), which land where its devices' shards are: one block
    or several, depending on the mesh's device order. The small per-query arrays are gathered to
    every host and replicated, with slot indices moved to the global rows their local rows became
    (`parallel.process_rows`). The batch must already have the same shape on every host
    (`pad_batch`).
    """
    global_shape = (batch.num_rows * jax.process_count(), batch.tokens.shape[1])
    rows = parallel.process_rows(
        parallel.named_sharding(mesh, ("batch", None), global_shape), global_shape
    )
    if len(rows) != batch.num_rows:
        raise ValueError(
            f"this process's devices hold {len(rows)} of the step's {global_shape[0]} rows, but "
            f"it packed {batch.num_rows}: the mesh's data axes must split the rows evenly over "
            f"processes (mesh {dict(mesh.shape)})"
        )
    arrays = batch.arrays()
    if block_pairs is not None:
        arrays["block_pairs"] = block_pairs
    out = {}
    for name, value in arrays.items():
        if name in ROW_ARRAYS:
            spec = ("batch",) + (None,) * (value.ndim - 1)
            global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
            sharding = parallel.named_sharding(mesh, spec, global_shape)
            out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
            continue
        if name in SLOT_ARRAYS:
            row, segment = np.divmod(value, batch.max_segments)
            value = (rows[row] * batch.max_segments + segment).astype(value.dtype)
        if jax.process_count() > 1 and value.ndim:
            value = multihost_utils.process_allgather(value, tiled=True)
        out[name] = jax.device_put(value, parallel.named_sharding(mesh, (None,) * value.ndim))
    return out


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


def total_steps(config: ml_collections.ConfigDict, pipeline: TrainPipeline) -> int:
    """`train.steps`, or one epoch when it is 0."""
    return int(config.train.steps) or int(pipeline.steps_per_epoch)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train until `train.steps` (resuming from the latest checkpoint); returns a summary.

    Nothing is written to the workdir before the data, tokenizer and model have loaded: a bad
    path, record or config key fails with the workdir as it was."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    wandb_options(config.log)  # a missing wandb package stops here, on every process

    cache = compile_cache.enable(config.train.compilation_cache)
    log.info("compiled steps are cached in %s", cache or "(nowhere: cache off)")
    mesh = parallel.make_mesh(config.train.mesh)
    pipeline = pipeline_from_config(
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        # Gradient-cache chunks take equal row blocks from every data shard.
        row_multiple=config.train.grad_cache_chunks
        * max(1, parallel.data_parallel_size(mesh) // jax.process_count()),
    )
    tokenizer = pipeline.tokenizer
    steps = total_steps(config, pipeline)
    updates = max(1, math.ceil(steps / config.optim.accumulate_steps))

    with jax.set_mesh(mesh):
        model, model_config = build_model(config, mesh, vocab_size=len(tokenizer))
        workdir.mkdir(parents=True, exist_ok=True)
        if is_main:
            (workdir / "config.json").write_text(config_lib.to_json(config))
            tokenizer.save_pretrained(workdir / "tokenizer")
            (workdir / "model_config.json").write_text(json.dumps(model_config.to_hf(), indent=2))
        graphdef, params, frozen = split_model(model, config.train.trainable)
        del model
        tx, schedule = make_optimizer(config.optim, updates)
        state = initial_state(params, tx)
        ckpt = checkpoint.Checkpointer(
            workdir / "checkpoints",
            every=config.train.checkpoint_every,
            keep=config.train.keep_checkpoints,
        )
        start = ckpt.latest_step()
        if start is not None:
            state, _ = ckpt.restore(start, checkpoint.abstract_like(state))
            log.info("resumed from step %d", start)

        loop = TrainLoop(
            config, workdir, pipeline, mesh,
            jax.jit(make_grad_fn(graphdef, config)),
            # The new state reuses the old one's buffers; the gradients have no output of their
            # shape left to go to, so donating them only drew a warning.
            jax.jit(make_update(config, tx, schedule), donate_argnums=0),
            ckpt,
            flops_token=flops_per_token(model_config, lora_config(config)), graphdef=graphdef,
        )
        summary = loop.run(state, frozen, steps)
        ckpt.close()
    return summary


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: what lowering needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class StepCompiler:
    """One gradient executable per step shape, compiled on a background thread in the order the
    steps need them, so that compiling a shape that comes up overlaps the steps before it.

    `grad_step` is the jitted `make_grad_fn` (params, frozen, batch, step). `note` gets a line per
    shape (what it is, compiled or loaded from the persistent cache, how long it took)."""

    def __init__(self, grad_step: Any, state: TrainState, frozen: dict, note: Callable):
        self._grad_step, self._note = grad_step, note
        self._params, self._frozen, self._step = abstract((state["params"], frozen, state["step"]))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self._futures: dict[tuple[int, int, int], concurrent.futures.Future] = {}
        self.cache_hits = 0  # executables loaded from the persistent compilation cache

    @property
    def count(self) -> int:
        """Shapes compiled or being compiled."""
        return len(self._futures)

    def submit(self, shape: StepShape, batch: dict[str, jax.Array]) -> None:
        if shape.key not in self._futures:
            self._futures[shape.key] = self._pool.submit(
                self._compile, shape, abstract(batch), len(self._futures) + 1
            )

    def _compile(self, shape: StepShape, batch: dict, index: int) -> Any:
        t0, hits = time.perf_counter(), compile_cache.hits()
        compiled = self._grad_step.lower(self._params, self._frozen, batch, self._step).compile()
        cached = compile_cache.hits() > hits
        self.cache_hits += cached
        self._note(
            f"step shape {index}: {shape.rows * jax.process_count()} rows x {shape.length} "
            f"tokens, {shape.tiles} attention tiles per row group; "
            f"{'loaded from the compilation cache' if cached else 'compiled'} in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        return compiled

    def get(self, shape: StepShape, batch: dict[str, jax.Array]) -> tuple[Any, float]:
        """The executable for `shape` and the seconds spent waiting for it."""
        self.submit(shape, batch)
        future = self._futures[shape.key]
        if future.done():
            return future.result(), 0.0
        t0 = time.perf_counter()
        compiled = future.result()
        return compiled, time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TrainLoop:
    """Step numbers -> batches -> updates, with logging, checkpoints, signals and NaN checks.

    Each step runs at its own shape (`step_shape`: rows, tiles and queries on small ladders), one
    gradient executable per shape; the optimizer update is shape-free (one for the run). The
    batches of the next `train.compile_ahead` steps are built while the device runs the current
    one, and their new shapes compile on a background thread (`StepCompiler`); JAX's persistent
    compilation cache keeps the executables across runs.
    """

    def __init__(
        self, config, workdir, pipeline, mesh, grad_step, update, ckpt, *, flops_token, graphdef
    ):
        self.config, self.workdir, self.pipeline, self.mesh = config, workdir, pipeline, mesh
        self.grad_step, self.update, self.ckpt = grad_step, update, ckpt
        self.flops_token, self.graphdef = flops_token, graphdef

    def next_batch(self, step: int) -> tuple[dict[str, jax.Array], StepShape, dict[str, Any]]:
        batch, info = self.pipeline.batch(step)
        # One row group per data shard and gradient-cache chunk (row_multiple); each group has
        # its own tile list.
        groups = self.pipeline.row_multiple
        tiles = attention_tiles(self.config, batch, groups)
        shape = step_shape(self.config, batch, tiles, groups)
        batch = pad_batch(
            batch,
            num_rows=shape.rows,
            num_queries=self.pipeline.max_local_queries,
            pad_id=self.pipeline.tokenizer.pad_token_id or 0,
            groups=groups,
        )
        if tiles is not None:
            tiles = pad_pairs(tiles, shape.tiles, shape.length // self.config.model.attention_block)
        return device_batch(self.mesh, batch, tiles), shape, info

    def save(self, state: TrainState, *, force: bool = False) -> None:
        step = int(state["step"])
        self.ckpt.save(step, state, {"step": step}, force=force)

    def maybe_evaluate(
        self, state: TrainState, frozen: dict, writer: MetricsWriter, steps: int
    ) -> None:
        """Every `eval.every` steps and at the last: retrieval metrics of the current weights on
        `eval.data`, logged as {"step", "eval": {"<metric>/<zero|few>": value}}. Every process
        computes (the model is sharded); the writer is a no-op off process 0."""
        every, step = self.config.eval.every, int(state["step"])
        if not every or (step % every and step != steps):
            return
        from jax_iclemb.evaluate import evaluate_model  # evaluate imports train (via encode)

        model = nnx.merge(self.graphdef, frozen, state["params"])
        metrics = evaluate_model(model, self.pipeline.tokenizer, self.config, self.mesh)
        writer.write({"step": step, "eval": metrics})

    def run(self, state: TrainState, frozen: dict, steps: int) -> dict[str, Any]:
        config, workdir = self.config, self.workdir
        is_main = jax.process_index() == 0
        start = int(state["step"])
        stop = _StopFlag()
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        writer = MetricsWriter(
            workdir, enabled=is_main, total=steps, initial=start, config=config_lib.to_json(config),
            wandb=wandb_options(config.log),
        )
        peak = peak_flops(jax.devices()[0]) * jax.device_count()
        history: list[float] = []
        totals = {"real_tokens": 0, "seconds": 0.0, "compile_seconds": 0.0}  # this run's steps
        reason = "finished"
        compiler = StepCompiler(self.grad_step, state, frozen, writer.note)
        upcoming: collections.deque = collections.deque()  # (batch, shape, info) of next steps
        ahead = max(1, int(config.train.compile_ahead))

        built = start  # the batches of the steps before `built` exist

        def prepare(until: int) -> None:
            """Build the batches of the steps before `until`; queue their new shapes."""
            nonlocal built
            for s in range(built, min(until, steps)):
                upcoming.append(self.next_batch(s))
                compiler.submit(upcoming[-1][1], upcoming[-1][0])
            built = max(built, min(until, steps))

        try:
            for step in range(start, steps):
                t0 = time.perf_counter()
                prepare(step + 1)
                batch, shape, info = upcoming.popleft()
                compiled, compile_seconds = compiler.get(shape, batch)
                # Dispatched, not awaited:
                (loss, metrics), grads = compiled(state["params"], frozen, batch, state["step"])
                state, more = self.update(state, grads)
                metrics = dict(metrics, loss=loss, **more)
                # Host work while the device runs this step: the next steps' batches, whose
                # new shapes compile in the background.
                prepare(step + 1 + ahead)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step + 1} ({metrics}); stopping. "
                        f"The last good checkpoint (step {self.ckpt.latest_step()}) is kept in "
                        f"{workdir / 'checkpoints'}."
                    )
                history.append(metrics["loss"])
                totals["real_tokens"] += shape.real_tokens
                totals["seconds"] += seconds
                totals["compile_seconds"] += compile_seconds
                rows = shape.rows * jax.process_count()
                slots = rows * shape.length
                record = {
                    "step": step + 1,
                    **metrics,
                    "dataset": info["dataset"],
                    "tokens_per_s": shape.real_tokens / seconds,
                    "real_tokens": shape.real_tokens,
                    "slots": slots,
                    "utilisation": shape.real_tokens / slots,
                    "rows": rows,
                    "row_padding": 1 - shape.rows_used / rows,
                    "tiles": shape.tiles,
                    "step_seconds": seconds,  # wall time of the step, compiles included
                    "compile_seconds": compile_seconds,  # of which waiting for its executable
                    "compiles": compiler.count,  # step shapes so far (some still compiling)
                    "compile_cache_hits": compiler.cache_hits,
                }
                if peak:
                    record["mfu"] = record["tokens_per_s"] * self.flops_token / peak
                if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
                    writer.write(record)
                writer.advance(record)
                self.save(state)
                self.maybe_evaluate(state, frozen, writer, steps)
                # The final save is collective: every process must leave at the same step, even
                # when only some of them were signalled.
                if global_max(int(stop.signal is not None)):
                    reason = f"stopped by signal {stop.signal or 'on another process'}"
                    break
            self.save(state, force=True)
        finally:
            compiler.close()
            self.ckpt.wait()
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if reason != "finished":  # every process says so in its own log
            print(f"{reason}: saved step {int(state['step'])} in {workdir}", file=sys.stderr)
        saved = self.ckpt.latest_step()
        return {
            "reason": reason,
            "step": int(state["step"]),
            "steps": steps,
            "losses": history,
            **totals,
            "checkpoint_step": saved,
        }


def closing_summary(
    summary: dict[str, Any], workdir: str | Path, config: ml_collections.ConfigDict
) -> str:
    """What a finished (or stopped) run tells its user: where it ended, its final loss and speed,
    where the weights are, and the commands to run next with this workdir filled in."""
    step, steps, losses = summary["step"], summary["steps"], summary["losses"]
    lines = [f"training {summary['reason']}: step {step} of {steps}"]
    if losses:
        first = step - len(losses) + 1
        lines[0] += f", final loss {losses[-1]:.4f} ({losses[0]:.4f} at step {first})"
        tokens, seconds = summary["real_tokens"], summary["seconds"]
        working = seconds - summary["compile_seconds"]
        speed = f"speed: {tokens / seconds:.0f} real tokens/s over this run's {len(losses)} steps"
        if working > 0:
            speed += f" ({tokens / working:.0f} without waiting for compiles)"
        lines.append(speed)
    else:
        lines[0] += " (nothing left to train)"
    work, saved = Path(workdir), summary["checkpoint_step"]
    where = "none saved" if saved is None else work / "checkpoints" / str(saved)
    lines.append(f"checkpoint: {where}")
    if summary["reason"] != "finished":
        lines.append("resume: run the same command again")
    if saved is not None:
        out = work.with_name(work.name + "-merged")
        data = config.eval.data or "BEIR_DIR"
        lines += [
            "next:",
            f"  python -m jax_iclemb.export --workdir {shlex.quote(str(work))} "
            f"--out {shlex.quote(str(out))}",
            f"  python -m jax_iclemb.evaluate --model {shlex.quote(str(work))} "
            f"--data {shlex.quote(data)}",
        ]
        if not config.eval.data:
            lines.append(
                "  (BEIR_DIR: a BEIR folder; make one from records with python -m "
                "jax_iclemb.evaluate --make-beir --from-jsonl FILE.jsonl --out BEIR_DIR)"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jax_iclemb.train",
        description="Train a few-shot (in-context) text embedder.",
        epilog="Any --config.KEY=VALUE overrides a config field, e.g. --config.train.steps=20.",
    )
    parser.add_argument(
        "--config", required=True, help="a config file, or a recipe name from configs/ (e.g. tiny)"
    )
    parser.add_argument("--workdir", default=None, help="default: runs/<config name>")
    add_debug_flag(parser)
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    return args, rest


@cli
def main(argv: Sequence[str]) -> int:
    args, overrides = parse_args(argv)
    config = config_lib.load_config(args.config, overrides)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    if workdir.exists() and not workdir.is_dir():
        raise PathExists(f"--workdir {workdir} exists and is not a folder")
    distributed.initialize()
    summary = run(config, workdir)
    if jax.process_index() == 0:
        print(closing_summary(summary, workdir, config), flush=True)
    return 0


def log_to_stderr() -> None:
    """The CLI's logging: our INFO lines, other libraries' warnings. `force`: importing orbax
    already gave the root logger absl's handler, at WARNING (so a plain basicConfig did nothing)."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("jax_iclemb").setLevel(logging.INFO)


def script() -> int:
    """The command (`python -m jax_iclemb.train`, `jax-iclemb-train`): `main` with the CLI's
    logging, which is not in `main` so that a caller in-process keeps its own."""
    log_to_stderr()
    return main()


if __name__ == "__main__":
    sys.exit(script())
