"""The paper's recipe on Llama-3.1-8B (rope scaling "llama3")."""

from jax_iclemb.config import paper_recipe


def get_config():
    return paper_recipe("meta-llama/Llama-3.1-8B", tokenizer="meta-llama/Llama-3.1-8B")
