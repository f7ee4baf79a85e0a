"""Every CLI answers bad input the same way: one `error:` line naming the file, line, key or path
and what is allowed, exit code 2, no traceback, nothing written; `--debug` shows the traceback.
Then the corrected command starts cleanly in the same workdir, and a finished run says what it
did and what to run next.

The CLIs run as subprocesses, as a user runs them; failures stop before any training step.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_OVERRIDES

from jax_iclemb import errors
from jax_iclemb.beir import beir_from_jsonl
from jax_iclemb.config import load_config, to_json
from jax_iclemb.data.builtin import builtin_data_dir
from jax_iclemb.data.tokenizer import load_tokenizer

TINY = str(REPO / "configs" / "tiny.py")
RECORD = {"query": "Where does Ana live?", "pos": ["Ana lives in Porto."], "neg": ["Bo bakes."]}


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    e.pop(errors.DEBUG_ENV, None)
    return {**e, **extra}


def cli(module: str, *args: str, cwd: Path | None = None, **extra_env: str):
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env(**extra_env), cwd=cwd or REPO,
        capture_output=True, text=True, timeout=600,
    )


def train_args(workdir: Path, *overrides: str, data: Path | None = None) -> list[str]:
    data = data or builtin_data_dir() / "retrieval"
    return [
        "--config", TINY, "--workdir", str(workdir), *TINY_OVERRIDES,
        "--config.train.steps=1", f"--config.data.path={data}", *overrides,
    ]


def train(workdir: Path, *overrides: str, data: Path | None = None):
    return cli("jax_iclemb.train", *train_args(workdir, *overrides, data=data))


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one short message holding every needle, no traceback; returns the message."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in message[0], (needle, message[0])
    return message[0]


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def write_jsonl(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained one step by the CLI, and that run's output."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    """A three-query BEIR folder (encoding it takes seconds)."""
    root = tmp_path_factory.mktemp("beir")
    records = [dict(RECORD, query=f"Where does person {i} live?") for i in range(3)]
    jsonl = write_jsonl(root / "r.jsonl", *map(json.dumps, records))
    return beir_from_jsonl(jsonl, root / "beir")


UNFINISHED = load_config(TINY, list(TINY_OVERRIDES))


def unfinished_workdir(folder: Path) -> Path:
    """What a run that died before its first checkpoint leaves: its config, no checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(to_json(UNFINISHED))
    return folder


# ---- the shared helper -----------------------------------------------------------------------


def test_cli_wrapper_reports_user_errors_and_keeps_bugs(capsys, monkeypatch):
    @errors.cli
    def main(argv):
        if argv == ["bug"]:
            raise KeyError("a programming error")
        raise errors.MissingPath("data path does not exist: /nope")

    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    assert main(["x"]) == 2
    assert capsys.readouterr().err == "error: data path does not exist: /nope\n"
    with pytest.raises(KeyError):  # not a user error: the traceback stays
        main(["bug"])
    assert main(["x", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: data path does not exist: /nope\n")


# ---- train -----------------------------------------------------------------------------------

BAD_TRAIN = {
    "config key typo": (
        ["--config.model.arch.num_hidden_layer=2"],
        None,
        ["'model.arch.num_hidden_layer'", "did you mean 'num_hidden_layers'?"],
    ),
    "malformed JSONL line": (
        [],
        ("bad.jsonl", [json.dumps(RECORD), '{"query": "q", "pos": ["p"']),
        ["bad.jsonl:2: invalid JSON"],
    ),
    "missing data path": ([], "missing", ["data path does not exist", "missing"]),
    "dataset smaller than its batch": (
        [],
        ("small.jsonl", [json.dumps(RECORD)] * 3),
        ["dataset 'small' has 3 records but batch size 8"],
    ),
    "override pattern matching nothing": (
        ["--config.data.batch_size_overrides.msmarco=4"],
        None,
        ["['msmarco'] match no dataset", "['world_facts']"],
    ),
    "budget smaller than the template": (
        ["--config.data.example_query_max_len=8"],
        None,
        ["data.example_query_max_len=8 leaves no room", "its template takes {head} tokens"],
    ),
}


def train_badly(case: str, workdir: Path, tmp_path: Path, template: dict[str, int]) -> None:
    """Run the BAD_TRAIN `case` in `workdir` and check its error."""
    overrides, data, needles = BAD_TRAIN[case]
    if isinstance(data, str):
        data = tmp_path / data
    elif data is not None:
        data = write_jsonl(tmp_path / "data" / data[0], *data[1])
    result = train(workdir, *overrides, data=data)
    assert_user_error(result, *(n.format(**template) for n in needles))


@pytest.fixture(scope="module")
def template():
    """Token counts of the built-in retrieval task's templates, by the tokenizer itself:
    head = "<instruct>{prompt}\\n<query>", query = BOS + head + "\\n<response>" + EOS."""
    tok = load_tokenizer("mistral-7b-v0.1")
    lines = (builtin_data_dir() / "retrieval" / "world_facts.jsonl").read_text().splitlines()
    prompt = json.loads(lines[0])["prompt"]
    head = len(tok(f"<instruct>{prompt}\n<query>", add_special_tokens=False)["input_ids"])
    newline = 1  # "\n" continuing a text run is one id (tests/test_tokenizer_templates.py)
    return {"head": head, "query": 1 + head + newline + 2}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_train_bad_input_fails_cleanly_and_writes_nothing(case, tmp_path, template):
    train_badly(case, tmp_path / "run", tmp_path, template)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny random Mistral checkpoint as transformers saves it."""
    import transformers

    folder = tmp_path_factory.mktemp("mistral")
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    transformers.MistralModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", ["misshaped", "missing"])
def test_train_from_a_checkpoint_that_does_not_fit_fails_before_compiling(
    damage, pretrained, tmp_path
):
    """Checked from the safetensors headers before the step shapes start compiling: the error
    comes at once (a 7B's first compile takes minutes) and names the tensor."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "checkpoint"
    shutil.copytree(pretrained, folder)
    name = "layers.1.mlp.up_proj.weight"
    tensors = load_file(folder / "model.safetensors")
    if damage == "missing":
        del tensors[name]
        needles = ["lacks tensor", name]
    else:
        tensors[name] = np.zeros((128, 60), np.float32)
        needles = [name, "(128, 60)", "(128, 64)"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cache = tmp_path / "xla"
    result = cli(
        "jax_iclemb.train", *train_args(tmp_path / "run", f"--config.model.hf_path={folder}"),
        JAX_COMPILATION_CACHE_DIR=str(cache),
    )
    assert_user_error(result, *needles)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing compiled
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    args = train_args(tmp_path / "run", "--config.model.arch.num_hidden_layer=2")
    for result in (
        cli("jax_iclemb.train", *args, "--debug"),
        cli("jax_iclemb.train", *args, **{errors.DEBUG_ENV: "1"}),
    ):
        assert result.returncode == 2 and "Traceback" in result.stderr
        assert result.stderr.rstrip().splitlines()[-1].startswith("error: unknown config key")


def test_failed_starts_leave_the_workdir_as_it_was_then_the_corrected_run_starts(
    tmp_path, template
):
    workdir = tmp_path / "run"
    for case in ("malformed JSONL line", "config key typo"):
        train_badly(case, workdir, tmp_path, template)
        assert not workdir.exists()
    result = train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "checkpoints" / "1").is_dir()
    # A failed start of an existing run (here: resume with a bad pattern) changes none of its files.
    before = files(workdir)
    assert_user_error(train(workdir, "--config.data.batch_size_overrides.x=4"), "match no dataset")
    assert files(workdir) == before


def test_a_finished_run_prints_its_summary_and_the_next_commands(trained):
    workdir, result = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["real_tokens"] for r in records)
    seconds = sum(r["step_seconds"] for r in records)
    lines = result.stdout.splitlines()
    loss = records[-1]["loss"]
    assert lines[0].startswith(f"training finished: step 1 of 1, final loss {loss:.4f}")
    assert lines[1].startswith(f"speed: {tokens / seconds:.0f} real tokens/s over this run's 1 ")
    assert lines[2] == f"checkpoint: {workdir / 'checkpoints' / '1'}"
    assert (workdir / "checkpoints" / "1").is_dir()
    export = next(line for line in lines if "jax_iclemb.export" in line)
    evaluate = next(line for line in lines if "jax_iclemb.evaluate" in line)
    assert shlex.split(export)[3:] == ["--workdir", str(workdir), "--out", f"{workdir}-merged"]
    assert shlex.split(evaluate)[3:] == ["--model", str(workdir), "--data", "BEIR_DIR"]
    # The printed export command works as printed.
    exported = subprocess.run(
        shlex.split(export.replace("python", sys.executable, 1)), env=env(), capture_output=True,
        text=True, timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (Path(f"{workdir}-merged") / "config.json").is_file()


# ---- export ----------------------------------------------------------------------------------


def test_export_of_a_missing_or_unfinished_workdir(tmp_path):
    out = tmp_path / "out"
    assert_user_error(
        cli("jax_iclemb.export", "--workdir", str(tmp_path / "nope"), "--out", str(out)),
        f"{tmp_path / 'nope'} is not a training workdir: it does not exist",
    )
    workdir = unfinished_workdir(tmp_path / "died")
    before = files(workdir)
    assert_user_error(
        cli("jax_iclemb.export", "--workdir", str(workdir), "--out", str(out)),
        "no checkpoint yet", f"train.checkpoint_every={UNFINISHED.train.checkpoint_every} ",
    )
    assert files(workdir) == before  # no empty checkpoints/ folder
    assert not out.exists()


def test_export_of_a_missing_step_or_into_a_full_folder(trained, tmp_path):
    workdir, _ = trained
    before = files(workdir)
    out = tmp_path / "out"
    assert_user_error(
        cli("jax_iclemb.export", "--workdir", str(workdir), "--out", str(out), "--step", "7"),
        "no checkpoint for step 7; available: [1]",
    )
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(
        cli("jax_iclemb.export", "--workdir", str(workdir), "--out", str(out)),
        f"{out} is not empty", "--overwrite",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert files(workdir) == before


# ---- evaluate --------------------------------------------------------------------------------


def test_evaluate_a_model_path_that_does_not_exist_fails_without_the_hub(beir, tmp_path):
    (tmp_path / "runs").mkdir()
    result = cli("jax_iclemb.evaluate", "--model", "runs/nope", "--data", str(beir), cwd=tmp_path)
    message = assert_user_error(result, "runs/nope: no such folder")
    assert "tokenizer" not in message and "download" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    assert not any((tmp_path / "runs").iterdir())


def test_evaluate_a_workdir_without_checkpoint_is_not_taken_for_an_hf_folder(beir, tmp_path):
    workdir = unfinished_workdir(tmp_path / "died")
    before = files(workdir)
    result = cli("jax_iclemb.evaluate", "--model", str(workdir), "--data", str(beir))
    assert_user_error(result, f"{workdir}: no checkpoint yet")
    assert files(workdir) == before


def test_evaluate_bad_data_names_file_and_line(tmp_path):
    beir = tmp_path / "beir"
    write_jsonl(beir / "corpus.jsonl", json.dumps({"_id": "d0", "text": "x"}), "{not json")
    result = cli("jax_iclemb.evaluate", "--model", "unused", "--data", str(beir))
    assert_user_error(result, f"{beir / 'corpus.jsonl'}:2: not valid JSON")


def test_evaluate_a_query_budget_smaller_than_the_instruction(trained, beir):
    workdir, _ = trained
    result = cli(
        "jax_iclemb.evaluate", "--model", str(workdir), "--data", str(beir),
        "--query-max-len", "8",
    )
    assert_user_error(result, "the query template with this instruction takes", "no room")


# ---- data.preview and data.prepare -----------------------------------------------------------


def test_inspect_bad_inputs(tmp_path, template):
    data = f"--config.data.path={builtin_data_dir() / 'retrieval'}"
    assert_user_error(
        cli("jax_iclemb.data.preview", "--config", TINY, "--step", "0", data,
            "--config.data.batch_size_overrides.retrieval=4"),
        "['retrieval'] match no dataset", "['world_facts']",
    )
    assert_user_error(
        cli("jax_iclemb.data.preview", "--config", TINY, "--step", "0", data,
            "--config.data.query_max_len=16", "--config.data.passage_max_len=16",
            "--config.data.pack_len=64"),
        "data.query_max_len=16 leaves no room for the query text",
        f"its prompt takes {template['query']} tokens",
    )
    assert_user_error(
        cli("jax_iclemb.data.preview", "--config", str(tmp_path / "nope.py"), "--step", "0"),
        f"config file {tmp_path / 'nope.py'} does not exist",
    )


def test_prepare_bad_inputs(tmp_path):
    out = tmp_path / "tfds"
    src = write_jsonl(tmp_path / "src" / "a.jsonl", json.dumps(RECORD), json.dumps({"pos": []}))
    assert_user_error(
        cli("jax_iclemb.data.prepare", "--src", str(src.parent), "--out", str(out)),
        f"{src}:2: field 'query': missing",
    )
    assert_user_error(
        cli("jax_iclemb.data.prepare", "--src", str(tmp_path / "none"), "--out", str(out)),
        "data path does not exist",
    )
    assert not out.exists()
    write_jsonl(src, json.dumps(RECORD))  # corrected
    prepare = ["jax_iclemb.data.prepare", "--src", str(src.parent), "--out", str(out)]
    assert cli(*prepare).returncode == 0
    assert_user_error(cli(*prepare), "exists; pass --overwrite to replace it")
