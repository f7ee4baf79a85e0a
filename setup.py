"""Packages only; the metadata is in pyproject.toml.

configs/ stays at the top of the repository and ships as `jax_iclemb.configs`, so an installed
package loads its recipes by name (`--config bge_en_icl_mistral7b`).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["jax_iclemb", "jax_iclemb.*"]), "jax_iclemb.configs"],
    package_dir={"jax_iclemb.configs": "configs"},
)
