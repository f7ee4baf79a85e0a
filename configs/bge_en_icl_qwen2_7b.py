"""The paper's recipe on Qwen2.5-7B (q/k/v bias; its tokenizer has no BOS: sequences end in EOS)."""

from jax_iclemb.config import paper_recipe


def get_config():
    return paper_recipe("Qwen/Qwen2.5-7B", tokenizer="Qwen/Qwen2.5-7B")
