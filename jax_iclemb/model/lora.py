"""LoRA: a linear layer with a frozen base weight and optional float32 low-rank adapters.

Layouts follow Hugging Face and PEFT so that import/export is a rename: the base weight is
(out, in), `lora_a` is PEFT's lora_A.weight (rank, in), `lora_b` is lora_B.weight (out, rank), and
y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.traversals import flatten_mapping

# Optimise only the adapters; `nnx.LoRAParam` subclasses `nnx.Param`, so "frozen" must exclude it.
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 64
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {DEFAULT_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Linear(nnx.Module):
    """y = x Wᵀ (+ b) (+ LoRA). `axes` are the logical names of W's (out, in) dimensions."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        std: float,
        bias: bool = False,
        lora: LoraConfig | None = None,
        dtype: jnp.dtype = jnp.bfloat16,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        weight = std * jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)
        self.weight = nnx.Param(weight.astype(param_dtype), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[0],))
            if bias
            else None
        )
        self.scale = lora.scale if lora is not None else 0.0
        if lora is None:
            self.lora_a = self.lora_b = self.dropout = None
            return
        # PEFT's init: kaiming_uniform(a=√5) on (rank, in) is U(±1/√in); B = 0 so a fresh adapter
        # leaves the layer unchanged.
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(rngs.params(), (lora.rank, in_features), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=("lora_rank", axes[1]))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((out_features, lora.rank), jnp.float32), logical_axes=(axes[0], "lora_rank")
        )
        self.dropout = nnx.Dropout(lora.dropout, rngs=rngs) if lora.dropout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            h = self.dropout(x) if self.dropout is not None else x
            h = jnp.einsum("...i,ri->...r", h, self.lora_a[...].astype(self.dtype))
            h = jnp.einsum("...r,or->...o", h, self.lora_b[...].astype(self.dtype))
            y = y + (self.scale * h).astype(self.dtype)
        return y

    def merged_weight(self) -> jax.Array:
        """W + (alpha/rank) B A in float32 (the adapter folded into the base weight)."""
        w = self.weight[...].astype(jnp.float32)
        if self.lora_a is None:
            return w
        return w + self.scale * (self.lora_b[...] @ self.lora_a[...])


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapters only: what the trainer checkpoints."""
    return nnx.state(model, TRAINABLE)


def load_lora_state(model: nnx.Module, arrays: Mapping) -> None:
    """Write saved adapters (a State or nested dict like `lora_state`'s) back into `model`.

    Every tensor's presence and shape is checked; values keep the model's dtype and sharding.
    """
    current = {param_name(p): v for p, v in flatten_mapping(lora_state(model)).items()}
    given = {param_name(p): v for p, v in flatten_mapping(arrays).items()}
    missing, extra = sorted(current.keys() - given.keys()), sorted(given.keys() - current.keys())
    if missing or extra:
        raise ValueError(f"LoRA state mismatch: missing {missing}, unexpected {extra}")
    for name, var in current.items():
        new = given[name]
        new = new[...] if isinstance(new, nnx.Variable) else new
        if tuple(new.shape) != tuple(var.shape):
            raise ValueError(
                f"LoRA tensor {name} has shape {tuple(new.shape)}, model expects {tuple(var.shape)}"
            )
        old = var[...]
        var[...] = jax.device_put(jnp.asarray(new, old.dtype), old.sharding)


def param_name(path: Sequence) -> str:
    """A state path as a dotted name; for base weights this is the Hugging Face tensor name."""
    return ".".join(str(p) for p in path)
