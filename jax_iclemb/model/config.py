"""ModelConfig: the decoder's shape, read from and written to a Hugging Face `config.json` dict.

Families differ only in a few switches (biases, q/k norm, sliding window, RoPE scaling), so one
frozen dataclass covers them; it is hashable and can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from jax_iclemb.config import ATTENTION_IMPLS, ATTENTION_MASKS, INITS, REMAT_POLICIES
from jax_iclemb.errors import BadValue

# model_type -> the base-model class name written to `architectures` on export.
FAMILIES = {
    "mistral": "MistralModel",
    "llama": "LlamaModel",
    "qwen2": "Qwen2Model",
    "qwen3": "Qwen3Model",
}
ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (HF `rope_parameters` with rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Our options (not in HF's config).
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations
    param_dtype: str = "bfloat16"  # dtype of the frozen base weights
    attention: Literal["causal", "bidirectional"] = "causal"
    remat: str = "none"
    scan_layers: bool = True  # run the stacked layers with lax.scan (False: a Python loop)
    attention_impl: str = "xla"
    attention_block: int = 64  # tile size of attention_impl="block_sparse"
    init: Literal["normal", "fan_in"] = "normal"
    # Rows [base_vocab_size, vocab_size) of the embedding were appended after import.
    base_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise BadValue(
                f"unsupported model_type {self.model_type!r}; supported: {sorted(FAMILIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise BadValue(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention not in ATTENTION_MASKS:
            raise BadValue(f"attention must be one of {ATTENTION_MASKS}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise BadValue(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise BadValue(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.attention_block < 1:
            raise BadValue(f"attention_block must be >= 1, got {self.attention_block}")
        if self.init not in INITS:
            raise BadValue(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises TypeError on a bad name

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **options: Any) -> ModelConfig:
        """From a Hugging Face config dict; `options` set our own fields (dtype, remat, ...)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in FAMILIES:
            raise BadValue(
                f"unsupported model_type {model_type!r} (architectures {archs}); "
                f"supported model types: {sorted(FAMILIES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise BadValue(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu'")
        if hf.get("mlp_bias"):
            raise BadValue("unsupported config: mlp_bias=True")
        if hf.get("use_sliding_window"):
            raise BadValue(f"unsupported config: use_sliding_window=True for {model_type}")
        theta, scaling = _read_rope(hf)
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            # Qwen's `sliding_window` is inert unless use_sliding_window (rejected above).
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            # Qwen2 always has q/k/v biases; Llama/Qwen3 put `attention_bias` on q/k/v/o.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **options,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config dict that `transformers.AutoConfig` reads back to the same architecture."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta}
            rope.update(dataclasses.asdict(self.rope_scaling))
        hf: dict[str, Any] = {
            "architectures": [FAMILIES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = self.o_bias
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        return hf


def _read_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from transformers 5 `rope_parameters` or the older top-level keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise BadValue(f"unsupported rope_type {rope_type!r}; supported: {ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise BadValue(f"llama3 rope scaling lacks key {e.args[0]!r}: {params}") from None
    return theta, scaling
