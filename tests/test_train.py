"""The real training CLI: loss falls, resume after SIGKILL is exact, SIGTERM saves, NaN stops."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from conftest import TINY_OVERRIDES

from jax_iclemb.config import load_config
from jax_iclemb.data.builtin import builtin_data_dir
from jax_iclemb.data.packing import row_bucket, segment_bucket
from jax_iclemb.data.pipeline import pipeline_from_config
from jax_iclemb.model.block_sparse import block_pairs, most_tiles, padded_tiles
from jax_iclemb.train_loop import compile_workers

REPO = Path(__file__).resolve().parents[1]

# The tests' small variant of configs/tiny.py, with a constant, large learning rate.
FAST = [
    *TINY_OVERRIDES,
    "--config.optim.lr=0.01",
    "--config.optim.warmup_steps=1",
    "--config.optim.decay=constant",
]


def train_cmd(workdir: Path, *overrides: str, data: Path | None = None) -> list[str]:
    # One task of the built-in data, so that losses of different steps are comparable.
    data = f"--config.data.path={data or builtin_data_dir() / 'retrieval'}"
    config = str(REPO / "configs" / "tiny.py")
    return [
        sys.executable, "-m", "jax_iclemb.train", "--config", config, "--workdir", str(workdir),
        *FAST, data, *overrides,
    ]


def env() -> dict[str, str]:
    """The tests' environment without their XLA_FLAGS: the command chooses the CPU devices."""
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run_cli(
    workdir: Path, *overrides: str, data: Path | None = None, cache: Path | None = None
) -> subprocess.CompletedProcess:
    e = env() if cache is None else dict(env(), JAX_COMPILATION_CACHE_DIR=str(cache))
    return subprocess.run(
        train_cmd(workdir, *overrides, data=data), env=e, capture_output=True, text=True,
        timeout=600,
    )


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after resume) keeps its last value."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def checkpoint_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


# Steps of the reference run: enough for the loss to fall clearly whatever the seed (over 8, the
# step-to-step spread of a task's loss can hide it).
STEPS = 16


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    result = run_cli(
        workdir, f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=100"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / "stderr.txt").write_text(result.stderr)
    return workdir


def test_the_command_trains_on_two_cpu_devices_where_it_has_two_cores(reference_run):
    devices = min(2, len(os.sched_getaffinity(0)))  # train.cpu_devices's default
    log = (reference_run / "stderr.txt").read_text()
    assert f"single process: 1 process x {devices} local devices" in log


def test_tiny_run_writes_metrics_and_the_loss_falls(reference_run):
    records = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "utilisation"):
        assert all(isinstance(r[key], float) for r in records), key
    first, last = [r["loss"] for r in records[:3]], [r["loss"] for r in records[-3:]]
    assert sum(last) < sum(first) - 0.3, (first, last)
    assert json.loads((reference_run / "config.json").read_text())["train"]["steps"] == STEPS
    assert list((reference_run / "tensorboard").iterdir())
    assert checkpoint_steps(reference_run) == [STEPS]  # the final save


def kill_after_checkpoint(
    workdir: Path, step: int, *overrides: str, data: Path | None = None
) -> None:
    """Start a run, SIGKILL it once its checkpoint of `step` is listed."""
    proc = subprocess.Popen(
        train_cmd(workdir, *overrides, data=data), env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while step not in checkpoint_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step in checkpoint_steps(workdir), "the run never reached its first checkpoint"


def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
    steps = f"--config.train.steps={STEPS}"
    kill_after_checkpoint(tmp_path, 3, steps, "--config.train.checkpoint_every=3")
    result = run_cli(tmp_path, steps, "--config.train.checkpoint_every=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path) == losses(reference_run)  # bitwise, every step
    # Each step is listed and plotted once: the killed run's steps after its checkpoint are gone.
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    scalars = tensorboard_scalars(tmp_path / "tensorboard", "train/loss")
    assert scalars == pytest.approx(losses(reference_run), rel=1e-6)  # TensorBoard keeps float32


def test_resumed_metrics_keep_the_steps_up_to_the_checkpoint(tmp_path):
    """What a killed run logged after its checkpoint goes, a line torn mid-write included."""
    from jax_iclemb.observe import MetricsWriter

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    writer = MetricsWriter(tmp_path, enabled=True, total=6, initial=2, config="{}")
    writer.write({"step": 3, "loss": 0.5})
    writer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]


def tensorboard_scalars(logdir: Path, tag: str) -> dict[int, float]:
    """step -> value as TensorBoard shows it: event files in order, a session START at step s
    (`purge_step`) drops what earlier files logged at steps >= s."""
    from tensorboardX.proto.event_pb2 import Event

    values: dict[int, float] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        data, at = path.read_bytes(), 0
        while at < len(data):  # TFRecord: length (8 bytes), its CRC (4), payload, CRC (4)
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                values = {s: v for s, v in values.items() if s < event.step}
            for value in event.summary.value if event.HasField("summary") else ():
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        train_cmd(tmp_path, "--config.train.steps=500", "--config.train.checkpoint_every=1000"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    last = max(losses(tmp_path))
    assert checkpoint_steps(tmp_path) == [last]
    assert "stopped by signal" in stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_cli(
        tmp_path,
        "--config.train.steps=20",
        "--config.train.checkpoint_every=1",
        "--config.optim.lr=1e38",
        "--config.optim.warmup_steps=0",
        "--config.optim.grad_clip=0.0",
    )
    assert result.returncode == 1
    assert "non-finite" in result.stderr
    logged = losses(tmp_path)
    assert checkpoint_steps(tmp_path), "no checkpoint survived"
    assert max(checkpoint_steps(tmp_path)) == max(logged)  # the last finite step, not the NaN one


def test_out_of_device_memory_says_what_to_change_and_the_rerun_resumes(
    tmp_path, monkeypatch, capsys
):
    """Step 3's program fails as XLA reports a GPU out of memory: the command prints one message
    (where, XLA's line, what fits) without a traceback, keeps steps 1-2, and the same command
    run again resumes from step 2 and finishes."""
    from jax_iclemb import train, train_loop

    argv = train_cmd(tmp_path, "--config.train.steps=4", "--config.train.checkpoint_every=1")[3:]
    real_get, calls = train_loop.StepCompiler.get, []

    def get(self, shape, batch, feed):
        compiled, seconds = real_get(self, shape, batch, feed)

        def step(*args):
            calls.append(shape.key)
            if len(calls) == 3:
                raise jax.errors.JaxRuntimeError(
                    "RESOURCE_EXHAUSTED: Failed to launch CUDA kernel: input_scatter_fusion_11: "
                    "CUDA_ERROR_OUT_OF_MEMORY: out of memory\nmore lines of XLA's report"
                )
            return compiled(*args)

        return step, seconds

    monkeypatch.setattr(train_loop.StepCompiler, "get", get)
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: the device ran out of memory at step 3 (step shape: " in err
    assert "input_scatter_fusion_11" in err and "more lines" not in err
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in err and "data.batch_size" in err
    assert "Traceback" not in err
    assert checkpoint_steps(tmp_path) == [1, 2]
    assert f"last checkpoint (step 2) is kept in {tmp_path / 'checkpoints'}" in err

    monkeypatch.setattr(train_loop.StepCompiler, "get", real_get)
    assert train.main(argv) == 0
    assert max(checkpoint_steps(tmp_path)) == 4
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


# At most one example per query, 4 queries a step of the built-in data's four tasks: some steps
# fit rows of 64 tokens, others need 128.
MIXED = ["--config.data.min_pack_len=64", "--config.data.max_examples=1",
         "--config.data.batch_size=4"]


def check_own_shapes(records: list[dict], overrides: list[str]) -> dict[int, tuple]:
    """Check each record's real tokens and row length against the step's batch, recomputed from
    the pipeline alone; returns step -> its own ladder shape (rows, row length, tiles, segment
    slots)."""
    config = load_config(
        REPO / "configs" / "tiny.py",
        [*FAST, f"--config.data.path={builtin_data_dir()}", *overrides],
    )
    groups = 2  # 2 devices: one row group per data shard
    pipeline = pipeline_from_config(config, row_multiple=groups)
    assert pipeline.row_lengths == (128, 64)
    own = {}
    for r in records:
        batch, info = pipeline.batch(r["step"] - 1)
        length = batch.tokens.shape[1]
        assert r["row_length"] == length == min(pipeline.batches(r["step"] - 1, True)[0])
        tiles = block_pairs(batch.segment_ids, block=64, causal=True, groups=groups)
        rows = row_bucket(info["rows_used"], groups)
        most = most_tiles(rows // groups, length, block=64, causal=True)
        own[r["step"]] = (
            rows, length, padded_tiles(tiles.shape[1], most, config.model.attention_tile_rungs),
            segment_bucket(int(batch.segment_ids.max()), config.data.max_segments_per_row),
        )
        assert r["real_tokens"] == info["real_tokens"]
        assert r["utilisation"] == r["real_tokens"] / (r["rows"] * length)
    return own


def test_every_step_runs_at_its_own_ladder_shape_and_a_rerun_compiles_nothing(tmp_path):
    """Four tasks of different lengths, no shape plan: each step's row length (128 or 64
    tokens), rows, tiles and segment slots are the rungs of its own batch (recomputed here from
    the pipeline alone), one compile per distinct shape, with two shapes compiling at a time;
    the same run again, one compile worker, loads every executable from the persistent
    compilation cache (the programs compiled side by side are the serial ones) and every traced
    program kept beside them, and gives the same losses."""
    steps = ["--config.train.steps=12", "--config.train.checkpoint_every=100", *MIXED,
             "--config.train.compile_cost_tokens=0"]
    cache = tmp_path / "xla"
    first = run_cli(tmp_path / "a", *steps, "--config.train.compile_workers=2",
                    data=builtin_data_dir(), cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    records = metrics(tmp_path / "a")
    own = check_own_shapes(records, steps)
    key = lambda r: (r["rows"], r["row_length"], r["tiles"], r["segments"])
    assert all(key(r) == own[r["step"]] for r in records)
    assert len({r["row_length"] for r in records}) > 1
    assert len({r["segments"] for r in records}) > 1  # the segment slots follow the rows
    shapes = {key(r) for r in records}
    assert len({r["dataset"] for r in records}) > 1 and len(shapes) > 1
    assert records[-1]["compiles"] == len(shapes)  # one executable per shape, no more
    assert sum(r["compile_seconds"] > 0 for r in records) <= len(shapes)
    assert records[-1]["compile_cache_hits"] == 0
    assert first.stderr.count("compiled in") == len(shapes)
    assert "planned" not in first.stderr

    again = run_cli(tmp_path / "b", *steps, "--config.train.compile_workers=1",
                    data=builtin_data_dir(), cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = metrics(tmp_path / "b")
    assert rerun[-1]["compile_cache_hits"] == rerun[-1]["compiles"] == len(shapes)
    # ... and each shape's traced program (program_cache.py): no trace of the model at all
    assert "(its traced program too)" not in first.stderr
    assert again.stderr.count("(its traced program too)") == len(shapes)
    assert [r["loss"] for r in rerun] == [r["loss"] for r in records]


def test_a_short_run_merges_its_shapes_and_resumes_exactly(tmp_path):
    """The default shape plan on the same four tasks: each step runs at a shape that holds its
    own ladder shape (same row length, at least its rows, tiles and segment slots), on fewer
    shapes than the steps' own, each compiled once; a run killed after its checkpoint at step 5
    and resumed plans the same shapes from the same first steps and logs the same losses, bit
    for bit."""
    steps = ["--config.train.steps=12", *MIXED]
    whole = run_cli(tmp_path / "whole", *steps, "--config.train.checkpoint_every=100",
                    data=builtin_data_dir())
    assert whole.returncode == 0, whole.stderr[-3000:]
    records = metrics(tmp_path / "whole")
    own = check_own_shapes(records, steps)
    for r in records:
        rows, length, tiles, segments = own[r["step"]]
        assert r["row_length"] == length and r["rows"] >= rows and r["tiles"] >= tiles, r
        assert r["segments"] >= segments, r
    shapes = {(r["rows"], r["row_length"], r["tiles"], r["segments"]) for r in records}
    assert len(shapes) < len(set(own.values()))
    assert records[-1]["compiles"] == len(shapes)
    assert f"their {len(set(own.values()))} shapes run as {len(shapes)}" in whole.stderr

    work = tmp_path / "resumed"
    kill_after_checkpoint(
        work, 5, *steps, "--config.train.checkpoint_every=5", data=builtin_data_dir()
    )
    resumed = run_cli(work, *steps, "--config.train.checkpoint_every=5", data=builtin_data_dir())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    shapes_of = lambda logged: [(r["step"], r["rows"], r["row_length"], r["tiles"])
                                for r in logged]
    assert shapes_of(metrics(work)) == shapes_of(records)  # planned from the same first steps
    assert losses(work) == losses(tmp_path / "whole")  # bitwise, every step


def test_compile_workers_default_to_one_per_four_host_cores(monkeypatch):
    for cores, workers in [(None, 1), (2, 1), (4, 1), (8, 2), (16, 4), (64, 4)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert compile_workers(0) == workers, cores
    assert compile_workers(3) == 3  # a configured count is kept
