"""LoRA: a linear layer with a frozen base weight and optional float32 low-rank adapters.

Layouts follow Hugging Face and PEFT so that import/export is a rename: the base weight is
(out, in), `lora_a` is PEFT's lora_A.weight (rank, in), `lora_b` is lora_B.weight (out, rank), and
y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ (`apply_dropout`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.traversals import flatten_mapping

from jax_iclemb.config import LORA_TARGETS
from jax_iclemb.model.hash_random import fold_key, normal, random_words, uniform

# Optimise only the adapters; `nnx.LoRAParam` subclasses `nnx.Param`, so "frozen" must exclude it.
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


# The decoder stores its layers stacked: every variable under this state path has a leading
# [num_layers] axis, and that axis has this logical name.
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 64
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Dropout(NamedTuple):
    """Where a forward pass's LoRA dropout masks come from: a key, folded per layer and
    projection, and each row's id (`PackedRows.row_ids`; None: its index), which numbers the row
    in its masks, so that a row keeps its masks wherever the step places it."""

    key: jax.Array
    row_ids: jax.Array | None = None

    def fold(self, n: int | jax.Array) -> Dropout:
        """The masks of sub-stream `n` (a layer, a projection)."""
        return Dropout(fold_key(self.key, n), self.row_ids)


def keep_mask(
    key: jax.Array,
    shape: tuple[int, ...],
    rate: float,
    columns: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> tuple[jax.Array, float]:
    """(bool mask, keep probability): each entry kept independently with probability
    1 - round(rate · 2³²) / 2³² (`random_words` ≥ the threshold)."""
    threshold = min(round(rate * 2**32), 2**32 - 1)
    return _words_at_least(key, shape, threshold, columns, rows), 1.0 - threshold / 2**32


# Its own jit: a step's program draws a mask for each projection of each layer, mostly of a few
# shapes, and a nested jit is traced once per shape rather than once per call (a third of the
# forward pass's tracing otherwise, repeated for every step shape). Same operations, same bits.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _words_at_least(
    key: jax.Array,
    shape: tuple[int, ...],
    threshold: int,
    columns: jax.Array | None,
    rows: jax.Array | None,
) -> jax.Array:
    return random_words(key, shape, columns, rows) >= jnp.uint32(threshold)


def apply_dropout(
    x: jax.Array,
    rate: float,
    key: jax.Array,
    columns: jax.Array | None = None,
    rows: jax.Array | None = None,
) -> jax.Array:
    """Inverted dropout: kept entries scaled by 1 / keep probability, so E[output] = x.
    `columns`: x holds these columns of a larger input, whose mask it gets; `rows`: the ids its
    rows are numbered by in the mask (`random_words`)."""
    keep, p = keep_mask(key, x.shape, rate, columns, rows)
    return jnp.where(keep, x / p, 0).astype(x.dtype)


class Linear(nnx.Module):
    """y = x Wᵀ (+ b) (+ LoRA). `axes` are the logical names of W's (out, in) dimensions."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        std: float,
        name: str = "",
        bias: bool = False,
        lora: LoraConfig | None = None,
        dtype: jnp.dtype = jnp.bfloat16,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        weight = std * normal(rngs.params(), (out_features, in_features))
        self.weight = nnx.Param(weight.astype(param_dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[0],))
            if bias
            else None
        )
        self.scale = lora.scale if lora is not None else 0.0
        self.dropout_rate = lora.dropout if lora is not None else 0.0
        # Which projection this is: its dropout key is the layer's key folded with it.
        self.stream = LORA_TARGETS.index(name) if name in LORA_TARGETS else 0
        if lora is None:
            self.lora_a = self.lora_b = None
            return
        # PEFT's init: kaiming_uniform(a=√5) on (rank, in) is U(±1/√in); B = 0 so a fresh adapter
        # leaves the layer unchanged.
        bound = 1.0 / math.sqrt(in_features)
        a = uniform(rngs.params(), (lora.rank, in_features), -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=("lora_rank", axes[1]))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((out_features, lora.rank), jnp.float32), logical_axes=(axes[0], "lora_rank")
        )

    def __call__(
        self, x: jax.Array, dropout: Dropout | None = None, columns: jax.Array | None = None
    ) -> jax.Array:
        """`dropout` turns on the adapter's input dropout (training); None: inference.
        `columns` [R, S]: x [R, S, in] holds these columns of the layer's [R, L, in] input, and
        gets that input's dropout mask there."""
        x = x.astype(self.dtype)
        y = dense(x, self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            h = x
            if self.dropout_rate and dropout is not None:
                draw = dropout.fold(self.stream)
                h = apply_dropout(x, self.dropout_rate, draw.key, columns, draw.row_ids)
            a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
            y = y + (self.scale * low_rank(h, a, b)).astype(self.dtype)
        return y

    def merged_weight(self) -> jax.Array:
        """W + (alpha/rank) B A in float32 (the adapter folded into the base weight)."""
        w = self.weight[...].astype(jnp.float32)
        if self.lora_a is None:
            return w
        return w + self.scale * (self.lora_b[...] @ self.lora_a[...])


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _contract_rows(small: jax.Array, big: jax.Array) -> jax.Array:
    """smallᵀ @ big over the token axis: [N, r], [N, k] -> [r, k]. The narrow operand goes
    first, so the backend transposes [N, r] rather than the wide [N, k] activation."""
    return jax.lax.dot_general(small, big, (((0,), (0,)), ((), ())))


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x Wᵀ: x [..., in], W [out, in] -> [..., out], with the weight gradient contracting the token
    axis with the saved input in front (see `low_rank`); when W is frozen XLA drops that
    gradient."""
    return x @ w.T


def _dense_fwd(x, w):
    return x @ w.T, (x, w)


def _dense_bwd(res, g):
    x, w = res
    g2 = _flat(g)
    return (g2 @ w).reshape(x.shape), _contract_rows(_flat(x), g2).T.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def low_rank(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x Aᵀ) Bᵀ: x [..., in], A [rank, in], B [out, rank] -> [..., out].

    Written out by hand so that the weight gradients contract the token axis with the rank-sized
    operand in front: differentiated automatically, XLA's CPU backend transposed the wide
    activation gradients instead, which took a third of a training step (docs/performance.md)."""
    return (x @ a.T) @ b.T


def _low_rank_fwd(x, a, b):
    h = x @ a.T
    return h @ b.T, (x, a, b, h)


def _low_rank_bwd(res, g):
    x, a, b, h = res
    g2 = _flat(g)
    gh = g2 @ b  # [N, rank]
    da = _contract_rows(gh, _flat(x))
    db = _contract_rows(_flat(h), g2).T
    return (gh @ a).reshape(x.shape), da.astype(a.dtype), db.astype(b.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapters only: what the trainer checkpoints."""
    return nnx.state(model, TRAINABLE)


def load_lora_state(model: nnx.Module, arrays: Mapping) -> None:
    """Write saved adapters (a State or nested dict like `lora_state`'s) back into `model`.

    Every tensor's presence and shape is checked, per layer under its Hugging Face name; values
    keep the model's dtype and sharding.
    """
    current = flatten_mapping(lora_state(model))
    given = flatten_mapping(arrays)

    def shapes(flat: Mapping) -> dict[str, tuple[int, ...]]:
        return {name: shape for p, v in flat.items() for name, _, shape in hf_tensors(p, v.shape)}

    want, got = shapes(current), shapes(given)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        raise ValueError(f"LoRA state mismatch: missing {missing}, unexpected {extra}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(f"LoRA tensor {name} has shape {got[name]}, model expects {shape}")
    for path, var in current.items():
        new = given[path]
        new = new[...] if isinstance(new, nnx.Variable) else new
        old = var[...]
        var[...] = jax.device_put(jnp.asarray(new, old.dtype), old.sharding)


def is_stacked(path: Sequence) -> bool:
    """Whether a state path is one of the stacked layers' variables (leading layer axis)."""
    return len(path) > 0 and path[0] == LAYERS


def param_name(path: Sequence, layer: int | None = None) -> str:
    """A state path as a dotted name; `layer` names one layer's slice of a stacked variable:
    (("layers", "mlp", "up_proj", "weight"), 3) -> "layers.3.mlp.up_proj.weight". For base
    weights this is the Hugging Face tensor name."""
    parts = [str(p) for p in path]
    if layer is not None:
        parts.insert(1, str(layer))
    return ".".join(parts)


def hf_tensors(
    path: Sequence, shape: Sequence[int]
) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """The Hugging Face tensors a state variable holds, as (name, layer, shape): one per layer
    of a stacked variable (layer i's slice), else the variable itself (layer None)."""
    shape = tuple(shape)
    if not is_stacked(path):
        return [(param_name(path), None, shape)]
    return [(param_name(path, i), i, shape[1:]) for i in range(shape[0])]
