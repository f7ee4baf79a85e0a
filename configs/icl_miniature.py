"""ICL in miniature (docs/icl_miniature.md): a 0.81M-parameter decoder trained from scratch on the
generated attribute-matching tasks, with 0-5 in-context examples per query (model A).

    python -m jax_iclemb.train --config configs/icl_miniature.py
    python -m jax_iclemb.train --config configs/icl_miniature.py --config.data.max_examples=0  # B

The data and the word-level tokenizer are generated into the cache on first use.
"""

from jax_iclemb.config import default_config
from jax_iclemb.data import miniature


def get_config():
    folder = miniature.miniature_dir()
    c = default_config()
    c.model.arch.update(
        vocab_size=len(miniature.VOCAB),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=128,
        sliding_window=128,
        bos_token_id=miniature.BOS_ID,
        eos_token_id=miniature.EOS_ID,
    )
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.init = "fan_in"  # GPT-style 0.02 init stalls at log N (research/icl-miniature.md)
    c.model.remat = "none"
    # 4 layers compile quickly unrolled, and unrolled steps skip the scan's copies of every
    # activation into stacked buffers (13% faster here; docs/performance.md).
    c.model.scan_layers = False
    c.train.trainable = "all"  # from scratch: no pretrained base to adapt

    c.data.path = str(folder / "train")
    c.data.tokenizer = str(folder / "tokenizer")
    # Longest query: BOS + 5 examples × 11 + 11 tokens = 67; an item is 6 with BOS/EOS.
    c.data.query_max_len = 96
    c.data.passage_max_len = 16
    c.data.example_query_max_len = 16
    c.data.example_passage_max_len = 4
    c.data.max_examples = 5
    c.data.train_group_size = 4  # 1 positive + 3 hard negatives
    c.data.batch_size = 32
    c.data.pack_len = 128

    c.loss.temperature = 0.05
    c.optim.update(
        lr=1e-3, warmup_steps=100, decay="cosine", end_lr_ratio=0.05, weight_decay=0.01,
        b1=0.9, b2=0.98, grad_clip=1.0,
    )
    c.train.steps = 6000  # the loss leaves its plateau at ~1,500-3,500 steps, by seed
    c.train.log_every = 50
    c.train.checkpoint_every = 1_000_000  # only the final one: saves cost time on this scale
    c.train.keep_checkpoints = 1
    # 6,000 steps of 4 shapes: steps that reuse their freed buffers' pages beat faster compiles.
    c.train.reuse_host_memory = True
    return c
