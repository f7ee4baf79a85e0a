"""jax_iclemb: train LLM text embedders that are few-shot learners (bge-en-icl), in JAX/Flax NNX."""

__version__ = "0.1.0"
