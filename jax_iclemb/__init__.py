"""jax_iclemb: train LLM text embedders that are few-shot learners (bge-en-icl), in JAX/Flax NNX."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Embedder"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import jax_iclemb.config` does not pull in JAX and transformers.
    if name == "Embedder":
        from jax_iclemb.embedder import Embedder  # loads JAX: only when asked for

        return Embedder
    raise AttributeError(f"module 'jax_iclemb' has no attribute {name!r}")
