"""The layer contracts of pyproject.toml (docs/architecture.md) hold: no module imports a layer
above its own, sibling commands never import each other, and the modules that check a user's
input before any work (config, workdir, evaluation I/O) load no JAX. import-linter reads the
import graph statically, so an import inside a function counts as much as one at the top."""

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jax_iclemb"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the copy of the package under `package_parent`, in a fresh interpreter
    (its CLI reconfigures logging, which would silence the loggers of later tests)."""
    check = (
        "import sys, jax_iclemb; from importlinter.cli import lint_imports; "
        f"assert jax_iclemb.__file__.startswith({str(package_parent)!r}), jax_iclemb.__file__; "
        f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True))"
    )
    return subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=package_parent,
        env={**os.environ, "PYTHONPATH": str(package_parent)},
    )


def test_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_a_violation_would_be_caught(tmp_path):
    """The contracts can fail: in a copy of the package where the model layer imports the
    trainer, the layers contract is broken (checked in a fresh interpreter that finds the copy)."""
    copy = tmp_path / "jax_iclemb"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    build = copy / "model" / "build.py"
    build.write_text(build.read_text() + "\nfrom jax_iclemb import train_loop  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "jax_iclemb.model.build -> jax_iclemb.train_loop" in result.stdout


def test_no_import_inside_a_function_names_a_package_module():
    """Function-level imports can hide a cycle from a reader: the ones kept (JAX or a heavy
    optional dependency, loaded only when used) say why, on their line or the one above."""
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                    "jax_iclemb"
                ):
                    line = lines[inner.lineno - 1]
                    said = "#" in line or lines[inner.lineno - 2].strip().startswith("#")
                    assert said, (
                        f"{path.relative_to(REPO)}:{inner.lineno}: {line.strip()}"
                    )
