"""The sdist and wheel as a user gets them: built offline from the tracked files, the sdist builds
a wheel again, and the wheel carries the recipes, the MTEB protocol data, console scripts and
declared dependencies."""

import dataclasses
import email
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "export", "evaluate", "encode", "prepare", "inspect")
PROTOCOL = REPO / "jax_iclemb" / "protocols" / "mteb_icl"
# Checked with one file named as well: a moved folder would make this set empty.
PROTOCOL_FILES = {str(p.relative_to(REPO)) for p in PROTOCOL.rglob("*") if p.is_file()}


def _normal(requirement: str) -> str:
    return str(Requirement(requirement))


def _build(source: Path, out: Path, *kinds: str) -> None:
    command = [sys.executable, "-m", "build", "--no-isolation", *kinds, "--outdir", str(out)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """sdist from a copy of the tracked files; the wheel built from that sdist (as pip does)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to list the tracked files")
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    _build(source, tmp / "sdist", "--sdist")
    (sdist,) = (tmp / "sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    _build(unpacked, tmp / "wheel", "--wheel")
    (wheel,) = (tmp / "wheel").glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "tmp": tmp}


@dataclasses.dataclass(frozen=True)
class Installed:
    python: Path  # the fresh environment's interpreter
    bin: Path  # its scripts folder
    site: Path  # where the wheel's files went


@pytest.fixture(scope="module")
def installed(dists) -> Installed:
    """A fresh virtual environment with the wheel pip-installed into it. The dependencies are
    this environment's (a .pth file points at them: the test stays offline), the package and
    its console scripts only the wheel's."""
    venv = dists["tmp"] / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()]
    (site / "dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--quiet", str(dists["wheel"])],
        check=True, capture_output=True, text=True,
    )
    return Installed(python=python, bin=venv / "bin", site=site)


def _run_installed(installed: Installed, code: str, cwd: Path) -> list[str]:
    """stdout lines of `code` run by the fresh environment (not this checkout)."""
    return subprocess.run(
        [installed.python, "-c", code], cwd=cwd, env={"PATH": str(installed.bin)},
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()


def test_sdist_has_what_the_build_reads(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"requirements.txt", "LICENSE", "pyproject.toml", "configs/tiny.py"} <= names
    assert {*PROTOCOL_FILES, "jax_iclemb/protocols/mteb_icl/NOTICE"} <= names


def test_wheel_metadata_scripts_and_recipes(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        metadata = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    recipes = {p.name for p in (REPO / "configs").glob("*.py")}
    assert {f"jax_iclemb/configs/{name}" for name in recipes} <= names
    assert {*PROTOCOL_FILES, "jax_iclemb/protocols/mteb_icl/instructions.json"} <= names
    for script in SCRIPTS:
        assert f"jax-iclemb-{script} = jax_iclemb." in entry_points
    requirements = [
        line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    required = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(map(_normal, required)) == sorted(map(_normal, requirements))
    assert metadata["License-Expression"] == "Apache-2.0"
    extras = {"torch", "mteb", "gpu", "tpu", "wandb", "test"}
    assert extras <= set(metadata.get_all("Provides-Extra"))


def test_installed_wheel_loads_recipes_by_name(installed, tmp_path):
    """The wheel's own files (not this checkout) resolve `--config tiny`."""
    code = (
        "import jax_iclemb.config as c; "
        "print(c.resolve_config_path('tiny')); print(c.load_config('tiny').train.steps)"
    )
    out = _run_installed(installed, code, tmp_path)
    assert Path(out[0]) == installed.site / "jax_iclemb" / "configs" / "tiny.py"
    assert int(out[1]) > 0


def test_installed_wheel_reads_the_mteb_protocol(installed, tmp_path):
    """The paper's instructions and examples come from the wheel's package data."""
    code = (
        "import jax_iclemb.mteb_protocol as p; print(p.PROTOCOL); "
        "print(p.instruction('SciFact', 'Retrieval')); "
        "print(len(p.examples('CQADupstackTexRetrieval', 'Retrieval')))"
    )
    out = _run_installed(installed, code, tmp_path)
    assert Path(out[0]) == installed.site / "jax_iclemb" / "protocols" / "mteb_icl"
    instructions = json.loads((PROTOCOL / "instructions.json").read_text(encoding="utf-8"))
    assert out[1] == instructions["by_task"]["Retrieval"]["SciFact"]
    cqadupstack = json.loads((PROTOCOL / "examples" / "CQADupstackRetrieval.json").read_text())
    assert int(out[2]) == len(cqadupstack)


def test_installed_console_scripts_run_and_pip_check_is_clean(installed, tmp_path):
    """Every console script of the wheel starts (its --help), and pip finds every declared
    dependency of the installed package satisfied."""
    for script in SCRIPTS:
        result = subprocess.run(
            [installed.bin / f"jax-iclemb-{script}", "--help"], cwd=tmp_path,
            env={"PATH": str(installed.bin)}, capture_output=True, text=True,
        )
        assert result.returncode == 0, (script, result.stderr[-2000:])
        assert "usage:" in result.stdout
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(installed.python), "check"],
        capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
