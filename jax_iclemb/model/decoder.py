"""The decoder (Mistral / Llama / Qwen2 / Qwen3) in Flax NNX, for packed rows of segments.

Weights keep Hugging Face's names and layouts. The decoder layers are stored stacked: one `Block`
under `layers` whose every variable has a leading [num_layers] axis (logical axis "layers"), so
that a `jax.lax.scan` runs them and XLA compiles one layer body, not `num_layers` copies. A state
path joined by "." is the HF tensor name with the layer index after `layers`
(`lora.param_name(("layers", "self_attn", "q_proj", "weight"), 0)` is
`layers.0.self_attn.q_proj.weight`). Each weight carries `logical_axes` metadata; `state_shardings`
turns it into shardings for any mesh.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jax_iclemb.model.attention import attention_at_columns, dot_product_attention
from jax_iclemb.model.config import ModelConfig
from jax_iclemb.model.hash_random import normal
from jax_iclemb.model.lora import LAYERS, Dropout, Linear, LoraConfig
from jax_iclemb.model.pooling import take_columns
from jax_iclemb.parallel import logical_to_spec

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# Logical names of activations.
_HIDDEN = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_KV_HEADS = ("batch", "length", "act_kv_heads", None)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint from logical names, when a mesh is set (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed and returned in float32."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.weight[...].astype(jnp.float32)


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        std = 1.0 if cfg.init == "fan_in" else cfg.initializer_range
        table = std * normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
        self.weight = nnx.Param(table.astype(cfg.weight_dtype), logical_axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


# ---- rotary position embedding (HF's rotate-half layout, float32) ----


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2], with Llama 3 scaling when configured."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [R, L, head_dim] for integer positions [R, L]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [R, L, heads, head_dim] rotated in float32."""
    x = x.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---- layers ----


def _linear_factory(cfg: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
    """Builds projections with the config's dtypes, init scale and LoRA targeting."""
    out_scale = 1.0 / math.sqrt(2 * cfg.num_layers) if cfg.init == "fan_in" else 1.0

    def make(name: str, in_f: int, out_f: int, axes: tuple[str, str], bias: bool = False):
        std = 1.0 / math.sqrt(in_f) if cfg.init == "fan_in" else cfg.initializer_range
        if name in ("o_proj", "down_proj"):
            std *= out_scale
        return Linear(
            in_f,
            out_f,
            axes,
            std=std,
            name=name,
            bias=bias,
            lora=lora if lora is not None and name in lora.targets else None,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            rngs=rngs,
        )

    return make


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        make = _linear_factory(cfg, lora, rngs)
        d, q_dim, kv_dim = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        )
        self.q_proj = make("q_proj", d, q_dim, ("q_heads", "embed"), cfg.qkv_bias)
        self.k_proj = make("k_proj", d, kv_dim, ("kv_heads", "embed"), cfg.qkv_bias)
        self.v_proj = make("v_proj", d, kv_dim, ("kv_heads", "embed"), cfg.qkv_bias)
        self.o_proj = make("o_proj", q_dim, d, ("embed", "q_heads"), cfg.o_bias)
        norm = functools.partial(RMSNorm, cfg.head_dim, cfg.rms_norm_eps, cfg.weight_dtype)
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None
        self.cfg = cfg

    def __call__(
        self, x, cos, sin, segment_ids, positions, block_pairs, dropout=None, prefix=None,
        columns=None,
    ):
        """-> (output, (keys, values) after the rotation: what a later call's `prefix` holds).
        With `columns` [R, S], queries and output at those columns only ([R, S, D]); keys and
        values from every column."""
        cfg = self.cfg
        r, length, _ = x.shape
        xq, cq, sq = (x, cos, sin) if columns is None else [
            take_columns(a, columns) for a in (x, cos, sin)
        ]
        q = self.q_proj(xq, dropout, columns)
        q = q.reshape(*xq.shape[:2], cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, dropout).reshape(r, length, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, dropout).reshape(r, length, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, cq, sq).astype(cfg.compute_dtype), _HEADS)
        k = constrain(apply_rope(k, cos, sin).astype(cfg.compute_dtype), _KV_HEADS)
        v = constrain(v, _KV_HEADS)
        causal = cfg.attention == "causal"
        if columns is None:
            out = dot_product_attention(
                q,
                k,
                v,
                segment_ids,
                positions,
                causal=causal,
                sliding_window=cfg.sliding_window,
                impl=cfg.attention_impl,
                block_pairs=block_pairs,
                block=cfg.attention_block,
                prefix=prefix,
            )
        else:
            out = attention_at_columns(
                q, k, v, segment_ids, positions, columns,
                causal=causal, sliding_window=cfg.sliding_window,
            )
        out = self.o_proj(out.reshape(*xq.shape[:2], -1), dropout, columns)
        return out, (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        make = _linear_factory(cfg, lora, rngs)
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make("gate_proj", d, m, ("mlp", "embed"))
        self.up_proj = make("up_proj", d, m, ("mlp", "embed"))
        self.down_proj = make("down_proj", m, d, ("embed", "mlp"))

    def __call__(
        self, x: jax.Array, dropout: Dropout | None = None, columns: jax.Array | None = None
    ) -> jax.Array:
        """`columns`: x holds these columns of the layer's rows (their dropout masks)."""
        h = jax.nn.silu(self.gate_proj(x, dropout, columns)) * self.up_proj(x, dropout, columns)
        return self.down_proj(constrain(h, ("batch", "length", "act_mlp")), dropout, columns)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype)
        self.self_attn = Attention(cfg, lora, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype)
        self.mlp = MLP(cfg, lora, rngs=rngs)
        self.dtype = cfg.compute_dtype

    def __call__(
        self, x, cos, sin, segment_ids, positions, block_pairs, dropout=None, prefix=None,
        columns=None,
    ):
        """-> (hidden, (keys, values) of the attention). With `columns` [R, S], the hidden states
        at those columns only, [R, S, D]: the attention reads every column's keys and values,
        nothing else is computed elsewhere."""
        h, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, segment_ids, positions, block_pairs, dropout,
            prefix, columns,
        )
        if columns is not None:
            x = take_columns(x, columns)
        x = constrain(x + h.astype(self.dtype), _HIDDEN)
        h = self.mlp(self.post_attention_layernorm(x), dropout, columns)
        return constrain(x + h.astype(self.dtype), _HIDDEN), kv


def _stacked_blocks(cfg: ModelConfig, lora: LoraConfig | None, key: jax.Array) -> Block:
    """All decoder layers as one Block whose variables have a leading [num_layers] axis (logical
    axis "layers"), layer i initialised from the i-th split of `key`."""
    make = nnx.vmap(lambda k: Block(cfg, lora, rngs=nnx.Rngs(params=k)), in_axes=0, out_axes=0)
    block = make(jax.random.split(key, cfg.num_layers))
    for _, node in nnx.iter_graph(block):
        if isinstance(node, nnx.Variable):
            node.set_metadata(logical_axes=(LAYERS, *node.get_metadata()["logical_axes"]))
    return block


def _index(state: nnx.State, i: int | jax.Array) -> nnx.State:
    return jax.tree.map(lambda a: a[i], state)


def layer_view(stacked: nnx.Module, i: int) -> nnx.Module:
    """Layer i of the stacked layers (or of a module inside them, e.g. one projection) as an
    ordinary module: a copy of every array's slice i, for per-layer reading (export)."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, _index(state, i))


class Prefix(NamedTuple):
    """A cached prefix that every sequence of a call continues (the few-shot examples in front of
    a task's queries): each layer's keys and values [layers, P, K, Dh] after the rotation, and how
    many of the P are real ([] int32; the rest is padding, never seen)."""

    keys: jax.Array
    values: jax.Array
    length: jax.Array


class Decoder(nnx.Module):
    """tokens, positions, segment_ids [R, L] -> final-norm hidden states [R, L, D] (float32).

    `block_pairs`: the step's tile list for `attention_impl="block_sparse"` (else unused).
    `dropout`: turns on LoRA dropout (training), its key folded per layer and projection, its
    row ids numbering the rows in the masks; None (inference): no dropout.
    `prefix`: every sequence continues this cached prefix (positions then start after it).
    `keep_kv`: also return every layer's keys and values, [layers, R, L, K, Dh] each: row 0's
    first P make the `Prefix` of a later call.
    `pool_at` [R, S]: return the hidden states at these columns only, [R, S, D] (last-token
    pooling). Unrolled, without a prefix or `keep_kv`, the last layer then computes its queries,
    attention output and MLP only there: nothing else reads them (exact; 1 / num_layers of the
    layers' work saved, less the keys and values). Scanned, the last layer stays in the scan
    (peeling it off would copy the stacked weights), and the columns are taken after it."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None, *, rngs: nnx.Rngs):
        self.config = cfg
        self.lora = lora
        self.embed_tokens = Embed(cfg, rngs=rngs)
        self.layers = _stacked_blocks(cfg, lora, rngs.params())
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.weight_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        block_pairs: jax.Array | None = None,
        dropout: Dropout | None = None,
        prefix: Prefix | None = None,
        keep_kv: bool = False,
        pool_at: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        cfg = self.config
        x = constrain(self.embed_tokens(tokens).astype(cfg.compute_dtype), _HIDDEN)
        cos, sin = rope_tables(positions, rope_inv_freq(cfg))
        graphdef, stacked = nnx.split(self.layers)
        layer_kv = None if prefix is None else (prefix.keys, prefix.values)

        # Pure in (hidden, one layer's variables, layer index, its prefix keys and values);
        # everything else is loop-invariant. Out: (hidden, the layer's keys and values or None).
        def layer(x, params, i, kv, columns=None):
            draw = None if dropout is None else dropout.fold(i)
            block = nnx.merge(graphdef, params)
            cached = None if kv is None else (*kv, prefix.length)
            x, kv = block(x, cos, sin, segment_ids, positions, block_pairs, draw, cached, columns)
            return x, (kv if keep_kv else None)

        # The last layer at the pooled columns only (see the docstring).
        pooled_last = pool_at is not None and not cfg.scan_layers and prefix is None and not keep_kv
        if cfg.remat != "none":
            # Inside a scan the body cannot be CSE'd with its recomputation anyway, so the
            # optimisation barriers of `prevent_cse` are only needed unrolled (jax.checkpoint docs).
            policy = _REMAT_POLICIES[cfg.remat]
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            steps = (stacked, jnp.arange(cfg.num_layers), layer_kv)
            x, kv = jax.lax.scan(lambda x, step: layer(x, *step), x, steps)
        else:  # the same layers unrolled: one compiled copy per layer (the reference in tests)
            kvs = []
            for i in range(cfg.num_layers):
                at = pool_at if pooled_last and i == cfg.num_layers - 1 else None
                x, kv = layer(x, _index(stacked, i), i, _index(layer_kv, i), at)
                kvs.append(kv)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if keep_kv else None
        if pool_at is not None and not pooled_last:
            x = take_columns(x, pool_at)
        hidden = constrain(self.norm(x), _HIDDEN)
        return (hidden, kv) if keep_kv else hidden


# ---- creation ----


def _sharding(var: nnx.Variable, mesh: jax.sharding.Mesh) -> NamedSharding:
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh) if axes else PartitionSpec())


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for a model (or optimizer) state from each variable's `logical_axes`.

    Variables without logical axes (RNG state, step counters) are replicated.
    """
    return jax.tree.map(lambda v: v.replace(_sharding(v, mesh)), state, is_leaf=_is_variable)


def model_rngs(key: jax.Array) -> nnx.Rngs:
    """Parameter initialisation only: dropout keys are passed to each call, never stored."""
    return nnx.Rngs(params=key)


def abstract_model(
    cfg: ModelConfig, lora: LoraConfig | None = None, mesh: jax.sharding.Mesh | None = None
) -> Decoder:
    """The decoder without arrays: each variable a `jax.ShapeDtypeStruct`, with a mesh sharded
    by its logical axes (`state_shardings`). What a training step compiles for before any weight
    is drawn or loaded, and the shapes and shardings `create_model` and `load_pretrained` fill."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, lora, rngs=model_rngs(jax.random.key(0))))
    if mesh is None:
        return abstract
    graphdef, state = nnx.split(abstract)

    def sharded(var: nnx.Variable) -> nnx.Variable:
        value, sharding = var.get_value(), _sharding(var, mesh)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    return nnx.merge(graphdef, jax.tree.map(sharded, state, is_leaf=_is_variable))


def shardings_of(state: nnx.State, default: jax.sharding.Sharding | None = None) -> nnx.State:
    """The shardings of an abstract state's arrays (`abstract_model`'s); `default` for arrays
    without one (an abstract model without a mesh)."""
    return jax.tree.map(
        lambda v: v.replace(v.get_value().sharding or default), state, is_leaf=_is_variable
    )


def create_model(
    cfg: ModelConfig,
    lora: LoraConfig | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> Decoder:
    """A fresh decoder; with a mesh, every parameter is created directly in its shards."""
    key = rngs() if rngs is not None else jax.random.key(seed)
    if mesh is None:
        return Decoder(cfg, lora, rngs=model_rngs(key))
    graphdef, abstract_state = nnx.split(abstract_model(cfg, lora, mesh))

    @functools.partial(jax.jit, out_shardings=shardings_of(abstract_state))
    def init(k: jax.Array) -> nnx.State:
        return nnx.state(Decoder(cfg, lora, rngs=model_rngs(k)))

    with jax.set_mesh(mesh):
        return nnx.merge(graphdef, init(key))
