"""What a run reports to Weights & Biases, read back from the run files wandb itself writes offline
(the `.wandb` transaction log that `wandb sync` uploads), and who reports: process 0 alone.

wandb's offline runs (WANDB_MODE=offline) keep everything in `<workdir>/wandb/offline-run-*/
run-<id>.wandb`, a LevelDB-style log of wandb's protobuf `Record`s; no account or network is used.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_OVERRIDES

from jax_iclemb import config as config_lib
from jax_iclemb.data.builtin import builtin_data_dir
from jax_iclemb.errors import BadValue, UserError
from jax_iclemb.observe import WANDB_RUN_ID, MetricsWriter, WandbOptions, wandb_options

CONFIG = config_lib.to_json(config_lib.default_config())
OPTIONS = WandbOptions(project="tests", entity="", name="")


def wandb_log(path: Path):
    """The `Record`s of a `.wandb` file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, at, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:at] == b":W&B\xe1\xbe\x00", data[:at]
    while at + 7 <= len(data):
        if block - at % block < 7:  # too little room left for a chunk header: block padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        pending += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(workdir: Path) -> list[dict]:
    """Each offline run under `workdir`, oldest first: its id, config, and {step: {key: value}}."""
    runs = []
    for folder in sorted((workdir / "wandb").glob("offline-run-*")):
        (path,) = folder.glob("run-*.wandb")
        run = {"id": None, "config": {}, "history": {}}
        for record in wandb_log(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                         for i in record.history.item}
                run["history"][record.history.step.num] = {
                    k: v for k, v in items.items() if not k.startswith("_")
                }
        runs.append(run)
    return runs


def train_record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-4 * step, "dataset": "msmarco",
            "tokens_per_s": 100.0 * step, "rows": 8}


def write_run(workdir: Path, initial: int, steps: range, eval_at: int | None = None) -> None:
    """A run's records through the writer; then wandb's service is waited for (a process does it
    at exit), as `run.finish()` may return before the service has written all to the log."""
    import wandb

    writer = MetricsWriter(
        workdir, enabled=True, total=steps[-1], initial=initial, config=CONFIG, wandb=OPTIONS
    )
    for step in steps:
        writer.write(train_record(step))
        writer.advance(train_record(step))
        if step == eval_at:
            writer.write({"step": step, "eval": {"ndcg@10/zero": 0.25, "ndcg@10/few": 0.5}})
    writer.close()
    wandb.teardown()


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")


def wandb_lines_precede_the_bar(stderr: str) -> bool:
    lines = stderr.splitlines()
    bar = next(i for i, line in enumerate(lines) if line.startswith("train:"))
    return all(not line.startswith("wandb:") for line in lines[bar:])


def test_wandb_gets_the_config_and_every_record_and_a_resume_continues_the_run(
    offline, tmp_path, capfd
):
    write_run(tmp_path, 0, range(1, 4), eval_at=3)
    first_err = capfd.readouterr().err
    run_id = (tmp_path / WANDB_RUN_ID).read_text()
    # Killed after step 3 with its checkpoint at step 2: steps 3 and 4 come again.
    write_run(tmp_path, 2, range(3, 5))
    second_err = capfd.readouterr().err

    first, second = offline_runs(tmp_path)
    assert first["id"] == second["id"] == run_id  # one W&B run: offline, a folder per session
    assert {k: v for k, v in first["config"].items() if k != "_wandb"} == json.loads(CONFIG)
    # Numbers under train/, eval dicts under eval/; no strings, no step (W&B's own axis).
    want = {
        s: {"train/loss": 1.0 / s, "train/lr": 1e-4 * s, "train/tokens_per_s": 100.0 * s,
            "train/rows": 8}
        for s in (1, 2, 3)
    }
    want[3].update({"eval/ndcg@10/zero": 0.25, "eval/ndcg@10/few": 0.5})
    assert first["history"] == want
    assert sorted(second["history"]) == [3, 4]
    assert second["history"][4]["train/loss"] == 0.25
    for err in (first_err, second_err):  # wandb says its few lines before the bar, no warnings
        assert wandb_lines_precede_the_bar(err), err
        assert "WARNING" not in err, err


def test_steps_wandb_already_holds_are_not_sent_again(offline, tmp_path, capfd, monkeypatch):
    """Online, a resumed W&B run starts after the last step it holds (`starting_step`) and drops
    earlier steps with a warning each; offline runs start at 0, so that step is set here."""
    from wandb.sdk.wandb_run import Run

    monkeypatch.setattr(Run, "starting_step", property(lambda run: 5))
    write_run(tmp_path, 2, range(3, 7))
    (run,) = offline_runs(tmp_path)
    assert sorted(run["history"]) == [5, 6]
    assert "WARNING" not in capfd.readouterr().err


def test_off_process_zero_nothing_is_written_and_wandb_is_not_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails
    writer = MetricsWriter(
        tmp_path, enabled=False, total=3, initial=0, config=CONFIG, wandb=OPTIONS
    )
    writer.write(train_record(1))
    writer.advance(train_record(1))
    writer.note("compiled")
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_options_need_the_package_only_when_on(monkeypatch):
    config = config_lib.default_config()
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert wandb_options(config.log) is None  # off by default: wandb is never looked for
    config.log.wandb = True
    with pytest.raises(BadValue, match=r"pip install 'jax_iclemb\[wandb\]'"):
        wandb_options(config.log)


def test_wandb_that_cannot_start_a_run_is_a_user_error(tmp_path, monkeypatch):
    """Online without an API key (none in the environment, none in this HOME): wandb refuses
    before any network use; the error says how to log in, go offline or turn W&B off."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UserError, match=r"could not start a run: .*API key.*WANDB_MODE=offline"):
        MetricsWriter(tmp_path, enabled=True, total=3, initial=0, config=CONFIG, wandb=OPTIONS)


TRAIN = [
    "--config", str(REPO / "configs" / "tiny.py"), *TINY_OVERRIDES,
    f"--config.data.path={builtin_data_dir() / 'retrieval'}", "--config.log.wandb=True",
]


def train(workdir: Path, *args: str, hide_wandb: bool = False):
    """The training CLI in a subprocess; `hide_wandb` runs it as if wandb were not installed."""
    hide = "import sys; sys.modules['wandb'] = None; " if hide_wandb else ""
    code = f"{hide}from jax_iclemb.train import script; sys.exit(script())"
    return subprocess.run(
        [sys.executable, "-c", f"import sys; {code}", "--workdir", str(workdir), *TRAIN, *args],
        env=dict(
            os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
        ),
        capture_output=True, text=True, timeout=600,
    )


def test_train_without_wandb_installed_fails_cleanly_and_writes_nothing(tmp_path):
    result = train(tmp_path / "run", "--config.train.steps=1", hide_wandb=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: log.wandb=True needs the wandb package: pip install 'jax_iclemb[wandb]'" in (
        result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_run_starts_without_importing_torch(tmp_path):
    """The tokenizer and the metrics writer (tensorboardX) would each import torch when it is
    installed, seconds at every start; a fresh interpreter that loads both and logs a step must
    not, and the step's scalar is in the event file."""
    pytest.importorskip("torch")  # without torch installed there is nothing to avoid
    script = f"""
import sys
from pathlib import Path
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.observe import MetricsWriter
load_tokenizer("mistral-7b-v0.1")
writer = MetricsWriter(Path({str(tmp_path)!r}), enabled=True, total=1, initial=0, config="{{}}")
writer.write({{"step": 1, "loss": 2.5}})
writer.close()
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)
    from test_train import tensorboard_scalars

    assert tensorboard_scalars(tmp_path / "tensorboard", "train/loss") == {1: 2.5}
