"""bench/vs_flagembedding.py's report arithmetic on hand-written measurements (the runs themselves
need the reference's own venv and minutes, so they are not run here)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location(
        "vs_flagembedding", REPO / "bench" / "vs_flagembedding.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Our trainer's metrics.jsonl: step 1 and 2 are warm-up; step 3 compiled a new shape (1 s of its
# 3 s; one row of 1,500 slots, where steps 1, 2 and 4 ran one of 1,250); one eval line.
def step(n, dataset, real, seconds, compile_seconds, compiles):
    return {"step": n, "loss": 5.0 - n, "dataset": dataset, "real_tokens": real, "rows": 1,
            "tiles": 0, "slots": real * 1.25, "tokens_per_s": real / seconds, "utilisation": 0.8,
            "step_seconds": seconds, "compile_seconds": compile_seconds, "compiles": compiles,
            "compile_cache_hits": 0}


METRICS = [
    step(1, "a", 1000, 10.0, 5.0, 1),
    step(2, "b", 1000, 2.0, 0.0, 1),
    step(3, "a", 1200, 3.0, 1.0, 2),
    {"step": 3, "eval": {"ndcg@10/zero": 0.1}},
    step(4, "b", 1000, 2.0, 0.0, 2),
]

# The launcher's measurement of the reference: step walls 3, 1, 2, 2 s (from train begin).
MEASURE = {
    "train_begin": 100.0,
    "losses": [5.0, 4.0, 3.0, 2.5],
    "steps": [
        {"step": 1, "t_begin": 100.5, "t_end": 103.0, "real": 500, "slots": 1000},
        {"step": 2, "t_begin": 103.2, "t_end": 104.0, "real": 600, "slots": 1000},
        {"step": 3, "t_begin": 104.1, "t_end": 106.0, "real": 800, "slots": 1600, "task": "a"},
        {"step": 4, "t_begin": 106.5, "t_end": 108.0, "real": 700, "slots": 1400, "task": "a"},
    ],
}


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in METRICS) + "\n")
    return path


def test_metrics_parsing_skips_eval_lines(vs, metrics_file):
    records = vs.read_metrics(metrics_file)
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_ours_counts_compiles_after_warmup_only(vs, metrics_file):
    m = vs.summarise_jax(vs.read_metrics(metrics_file), warmup=2)
    assert m["timed_steps"] == 2 and m["steps"] == 4
    assert m["real_tokens"] == pytest.approx(2200)
    assert m["slots"] == pytest.approx(2750)
    assert m["utilisation"] == pytest.approx(0.8)
    assert m["tokens_per_s"] == pytest.approx(2200 / 5.0)  # 3 s (1 of them compiling) + 2 s
    assert m["steady_tokens_per_s"] == pytest.approx(2200 / 4.0)
    assert m["step_seconds_mean"] == pytest.approx(2.5)
    assert (m["compiles"], m["compile_seconds"]) == (2, pytest.approx(1.0))
    assert m["compile_seconds_all"] == pytest.approx(6.0)
    assert (m["first_loss"], m["last_loss"]) == (4.0, 1.0)
    # Once every shape has run: step 4 alone (step 3 ran the last new one).
    assert (m["settled_step"], m["settled_tokens_per_s"]) == (3, pytest.approx(1000 / 2.0))
    assert m["tasks"] == {
        "a": {"steps": 1, "real_tokens": 1200, "slots": 1500, "seconds": 3.0},
        "b": {"steps": 1, "real_tokens": 1000, "slots": 1250, "seconds": 2.0},
    }


def test_reference_step_time_runs_from_the_previous_step_end(vs):
    m = vs.summarise_flag(MEASURE, warmup=2)
    assert m["timed_steps"] == 2
    assert m["tokens_per_s"] == pytest.approx((800 + 700) / (2.0 + 2.0))
    assert m["utilisation"] == pytest.approx(0.5)
    assert m["compute_seconds"] == pytest.approx(1.9 + 1.5)
    assert (m["first_loss"], m["last_loss"]) == (5.0, 2.5)
    assert m["tasks"] == {"a": {"steps": 2, "real_tokens": 1500, "slots": 3000,
                                "seconds": pytest.approx(4.0)}}
    # No warm-up: the first step's wall starts at train begin (3 s).
    assert vs.summarise_flag(MEASURE, warmup=0)["seconds"] == pytest.approx(8.0)


def test_ratio_and_report(vs, metrics_file):
    ours = vs.summarise_jax(vs.read_metrics(metrics_file), warmup=2)
    reference = vs.summarise_flag(MEASURE, warmup=2)
    r = vs.ratios(ours, reference)
    assert r["tokens_per_s"] == pytest.approx(440 / 375)
    assert r["steady_tokens_per_s"] == pytest.approx(550 / 375)
    # After our last new shape (step 3): our step 4 (500 tok/s) against the reference's (350).
    assert r["settled_tokens_per_s"] == pytest.approx(500 / 350)
    result = {
        "date": "2026-01-01", "machine": "test CPU", "warmup": 2, "scratch": "/s",
        "flag_venv": "/v", "versions": {"flag": {"torch": "x"}, "jax": {"jax": "y"}},
        "work": {"data": "d", "tile": 1, "batch": 8, "steps": 4, "query_len": 1024,
                 "passage_len": 256, "example_len": 128,
                 "tasks": [{"name": "t/a", "batch": 8, "records": 10}]},
        "sides": {
            "flag": {"summary": reference, "time": {"peak_rss_mb": 1000.0, "wall_s": 60.0},
                     "command": "python -m FlagEmbedding..."},
            "jax": {"summary": ours, "time": {"peak_rss_mb": 900.0, "wall_s": 50.0},
                    "command": "python -m jax_iclemb.train ...", "devices": 2,
                    "phases": {"start_up": 4.2, "set_up": 1.5, "steps": 40.0, "other": 3.75,
                               "exit": 0.55}},
        },
    }
    result["ratios"] = {"jax": r}
    text = vs.render_report(result)
    assert "| **375** | **440** |" in text
    assert "**1.17×**" in text and "1.47×" in text
    assert "| 2 shapes, 0 from the cache; 1.0 s in timed steps / 6.0 s |" in text
    assert "| 50.0% | 80.0% |" in text
    assert "| – | 500 (step 4; 1.43× the reference's same steps) |" in text
    # Per task: a = reference 2 steps at 375 tok/s, ours 1 step at 1200 / 3 s; b is ours only.
    assert "| a | 2 / 1 | 750 / 1,200 | 50% / 80% | 375 / 400 |" in text
    assert "| b | – / 1 | – / 1,000 | – / 80% | – / 500 |" in text
    # Every step's real tokens over the whole wall: ours 4,200 / 50 s, the reference's 2,600 / 60 s.
    assert "| real tokens / whole-process wall, every step (ratio) | 43 | 84 (1.94×) |" in text
    assert "| devices (ours: from its log) | – | 2 |" in text
    phases = "| wall: start-up / set-up / steps / other / exit (s) |"
    assert f"{phases} – | 4.2 / 1.5 / 40.0 / 3.8 / 0.6 |" in text


def test_our_wall_is_split_by_the_logs_timestamps(vs):
    """Start-up up to the first log line, the logged set-up, the steps' own seconds, the exit
    after the final checkpoint closed; log lines may follow the progress bar's carriage return."""
    day = "2026-01-01"
    started = time.mktime(time.strptime(f"{day} 10:00:00", "%Y-%m-%d %H:%M:%S"))
    log = (
        f"{day} 10:00:03,500 jax_iclemb.distributed: single process\n"
        f"{day} 10:00:03,600 jax_iclemb.train: set up in 1.5 s: data and tokenizer 0.5 s\n"
        "train:  50%|##   | 1/2 [00:01<00:01]\r"
        f"{day} 10:00:09,250 jax_iclemb.train: checkpoints closed in 0.0 s\n"
        "training finished\n"
    )
    records = [{"step_seconds": 2.0}, {"step_seconds": 1.5}]
    phases = vs.wall_phases(log, started, started + 10.0, records)
    assert phases == pytest.approx(
        {"start_up": 3.5, "set_up": 1.5, "steps": 3.5, "exit": 0.75, "other": 0.75}
    )
    assert vs.wall_phases("no trainer lines", started, started + 10.0, records) is None


def test_our_device_count_is_read_from_the_log(vs):
    line = ("2026-01-01 10:00:03,500 jax_iclemb.distributed: single process: 1 process x 2 local "
            "devices (this is process 0; 2 devices in all)\n")
    assert vs.logged_devices("start\n" + line) == 2
    assert vs.logged_devices("no such line") is None


def test_time_v_parsing(vs):
    text = (
        "\tCommand being timed: \"python -m x\"\n"
        "\tUser time (seconds): 12.50\n"
        "\tSystem time (seconds): 1.25\n"
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:05.50\n"
        "\tMaximum resident set size (kbytes): 2048000\n"
    )
    t = vs.parse_time_v(text)
    assert t == {"user_s": 12.5, "sys_s": 1.25, "wall_s": 65.5, "peak_rss_mb": 2000.0}
    assert vs.parse_elapsed("1:02:03") == 3723


def test_reference_batch_sizes_and_quoting(vs):
    assert vs.reference_batch_size({"type": "symmetric_sts"}, 8) == 4
    assert vs.reference_batch_size({"type": "normal"}, 8) == 8
    assert vs.reference_batch_size({"type": "symmetric_class", "batch_size": 6}, 8) == 6
    assert vs.shell_quote("<instruct>{}\n<query>{}") == "$'<instruct>{}\\n<query>{}'"
    assert vs.shell_quote("a b") == "'a b'"


def test_pytorch_way_summary(vs):
    measure = {"steps": 2, "warmup": 1, "real_tokens": 3000, "tokens_per_s": 600.0,
               "step_times": [2.0, 3.0], "utilisation": 0.5, "losses": [3.0, 2.0, 1.5]}
    m = vs.summarise_torch(measure)
    assert (m["steps"], m["timed_steps"]) == (3, 2)
    assert m["real_tokens_per_step"] == 1500 and m["step_seconds_mean"] == 2.5
    assert (m["first_loss"], m["last_loss"]) == (3.0, 1.5)


@pytest.mark.parametrize("query_len", [1024, 512])
def test_ours_gets_the_references_examples_budget(vs, tmp_path, query_len):
    """The reference caps a query's examples at query_max_len - 512 tokens whatever the passage
    length (none at all up to 512): our side's config gets the same budget, so both do the same
    work at any lengths."""
    from jax_iclemb.config import load_config
    from jax_iclemb.data.pipeline import DataConfig

    args = vs.parse_args(["--query-len", str(query_len), "--passage-len", "128"])
    argv = vs.jax_args(args, tmp_path, tmp_path / "run", [{"name": "t", "batch": args.batch}])
    config = load_config(REPO / argv[1], [a for a in argv if a.startswith("--config.")])
    data = DataConfig.from_section(config.data)
    assert (data.passage_max_len, data.query_max_len) == (128, query_len)
    if query_len > 512:
        assert data.max_examples == 5 and data.examples_limit == query_len - 512
    else:
        assert data.max_examples == 0


def test_a_stopped_bench_stops_the_side_it_runs(tmp_path):
    """SIGTERM to the bench while it runs a side: the side's whole process group (here a shell
    and the sleeper under it, as /usr/bin/time and the trainer) is stopped, not left running."""
    pids = tmp_path / "pids"
    side = f"sleep 120 & echo $$ $! > {pids}; wait"
    module, log = str(REPO / "bench" / "vs_flagembedding.py"), str(tmp_path / "side.log")
    bench = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('vs', {module!r})\n"
        "vs = importlib.util.module_from_spec(spec); spec.loader.exec_module(vs)\n"
        "vs.stop_on_sigterm()\n"
        f"vs.run_timed(['sh', '-c', {side!r}], {{}}, vs.Path({log!r}), vs.Path('.'))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", bench])
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and proc.poll() is None, "the side never started"
        time.sleep(0.05)
    shell, sleeper = (int(p) for p in pids.read_text().split())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while running(shell) or running(sleeper):
        assert time.monotonic() < deadline, "the side still runs after the bench stopped"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit waits for a reaper that a container may lack)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
