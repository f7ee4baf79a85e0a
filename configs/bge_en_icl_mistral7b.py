"""The paper's recipe (bge-en-icl) on Mistral-7B-v0.1, the paper's base model.

    python -m jax_iclemb.train --config configs/bge_en_icl_mistral7b.py \
        --config.data.path=/data/bge-icl-train --workdir runs/bge-en-icl
"""

from jax_iclemb.config import paper_recipe


def get_config():
    # The built-in tokenizer is Mistral-7B-v0.1's vocabulary (offline, from mistral-common).
    return paper_recipe("mistralai/Mistral-7B-v0.1", tokenizer="mistral-7b-v0.1")
