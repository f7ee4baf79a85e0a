"""The built-in default: a small random-initialised Mistral-shaped decoder, the real Mistral
tokenizer, and the project's generated multi-task data. Runs on a 2-core CPU in about a minute.

    python -m jax_iclemb.train --config configs/tiny.py
"""

from jax_iclemb.config import default_config


def get_config():
    c = default_config()
    c.model.arch.update(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        sliding_window=4096,
    )
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.init = "fan_in"  # a random base must pass signal through: see docs/training.md
    c.model.remat = "none"
    # 4 layers compile quickly unrolled, and unrolled steps skip the scan's copies of every
    # activation into stacked buffers (13% faster here; docs/performance.md).
    c.model.scan_layers = False
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.0

    c.data.path = "builtin"
    c.data.query_max_len = 256
    c.data.passage_max_len = 64
    c.data.example_query_max_len = 48
    c.data.example_passage_max_len = 48
    c.data.train_group_size = 4
    c.data.batch_size = 16
    c.data.pack_len = 256

    c.loss.temperature = 0.05
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 10
    c.train.steps = 120
    c.train.log_every = 5
    c.train.checkpoint_every = 50
    return c
