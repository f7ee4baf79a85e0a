"""The decoder (Mistral/Llama/Qwen2/Qwen3), LoRA, pooling and Hugging Face import/export."""

from jax_iclemb.model.attention import dot_product_attention
from jax_iclemb.model.config import FAMILIES, ModelConfig, RopeScaling
from jax_iclemb.model.decoder import Decoder, create_model, state_shardings
from jax_iclemb.model.hf import export_merged, export_peft, load_peft, load_pretrained
from jax_iclemb.model.lora import FROZEN, TRAINABLE, LoraConfig, load_lora_state, lora_state
from jax_iclemb.model.pooling import l2_normalize, last_token_pool, mean_pool

__all__ = [
    "FAMILIES",
    "FROZEN",
    "TRAINABLE",
    "Decoder",
    "LoraConfig",
    "ModelConfig",
    "RopeScaling",
    "create_model",
    "dot_product_attention",
    "export_merged",
    "export_peft",
    "l2_normalize",
    "last_token_pool",
    "load_lora_state",
    "load_peft",
    "load_pretrained",
    "lora_state",
    "mean_pool",
    "state_shardings",
]
