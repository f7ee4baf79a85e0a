"""bench/encode_throughput.py's texts, agreement and report on hand-written measurements (the runs
need the reference's own venv and minutes, so they are not run here)."""

import argparse
import importlib
import sys

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))  # its sibling modules import by name
    try:
        yield importlib.import_module("encode_throughput")
    finally:
        sys.path.remove(str(REPO / "bench"))


def unit_rows(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_work_is_fixed_and_few_shot(bench):
    args = argparse.Namespace(query_len=512, passage_len=256, batch_size=16)
    work = bench.make_work(30, 7, args)
    assert work == bench.make_work(30, 7, args)  # the same texts on every run and side
    assert (len(work["passages"]), len(work["queries"]), len(work["examples"])) == (30, 7, 5)
    assert all(40 <= len(p.split()) <= 240 for p in work["passages"])
    assert {"query", "response"} == set(work["examples"][0])


def test_agreement_and_report(bench, tmp_path):
    rng = np.random.default_rng(0)
    ours = {"passages": unit_rows(rng, 4), "queries": unit_rows(rng, 2)}
    other = {k: v.copy() for k, v in ours.items()}
    other["queries"][1] = -other["queries"][1]  # one query embedded differently
    sides = {}
    for side, emb, seconds in (("jax", ours, [4.0, 2.0]), ("flag", other, [8.0, 8.0])):
        np.savez(tmp_path / f"{side}.npz", **emb)
        sides[side] = {
            "embeddings": str(tmp_path / f"{side}.npz"), "time": {"peak_rss_mb": 1024.0},
            "timing": {"load_s": 1.0, "passages_s": seconds, "queries_s": seconds,
                       "compile_s": [1.5, 0.5, 0.0, 0.0]},
        }
    agree = bench.agreement(sides)
    assert agree["flag"]["passages"]["min"] == pytest.approx(1.0)
    assert agree["flag"]["queries"]["agree"] == 0.5
    assert agree["flag"]["queries"]["min"] == pytest.approx(-1.0)

    tokens = {"passages": {"tokens": 400, "min": 50, "max": 150},
              "queries": {"tokens": 1000, "min": 490, "max": 510,
                          "without_examples": {"min": 30, "max": 50}}}
    result = {"date": "2026-11-27", "machine": "cpu", "versions": {"jax": "0"}, "tokens": tokens,
              "work": {"passages": 4000, "queries": 2000, "query_len": 512, "passage_len": 512,
                       "batch_size": 32},
              "sides": sides, "agreement": agree}
    report = bench.render_report(result)
    # texts/s: ours 1,000 then 2,000 passages/s, the reference 500; ratios 2× then 4×.
    assert "| ours (`Embedder`) | 1,000.0 | 2,000.0 | 500.0 | 1,000.0 | 1.0 | 1,024 |" in report
    assert "| 2.00× | 4.00× | 2.00× | 4.00× |" in report
    assert "pass 1 1.5 / 0.5" in report
    assert "queries min -1.000000" in report and "50% > 0.999" in report
