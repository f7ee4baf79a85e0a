"""`python -m jax_iclemb.encode` and the embedding store it writes.

The store's shards must hold what `Embedder.encode_corpus` / `encode_queries` return for the same
texts, in input order; a run killed after some shards must resume into the very bytes of an
uninterrupted run; 2 processes must write the store 1 process writes; bad input is one `error:`
line, exit code 2 and nothing written. The store's own rules (shard boundaries, atomic shards,
incomplete stores refused) are checked against NumPy first, without a model.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import REPO
from test_cli_errors import assert_user_error
from test_multiprocess import finish

from jax_iclemb import embedding_store as store
from jax_iclemb import encode
from jax_iclemb.embedder import Embedder
from jax_iclemb.errors import BadValue, MissingPath

WORDS = ["river", "market", "engine", "forest", "coffee", "island", "song", "court", "protein",
         "winter", "bank", "city"]
NUM_PASSAGES = 300
SHARD = 64  # 5 shards, the last one short


def passage(rng: np.random.Generator, i: int) -> dict[str, str]:
    """A record of 2..60 random words (some cut at passage_max_len), every other one titled."""
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 61))))
    title = f"Title {i}" if i % 2 else ""
    return {"_id": f"dóc-{i}", "title": title, "text": text}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """(corpus.jsonl, its ids, its texts as BEIR joins them: title + " " + text)."""
    rng = np.random.default_rng(0)
    records = [passage(rng, i) for i in range(NUM_PASSAGES)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    texts = [f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in records]
    return path, [r["_id"] for r in records], texts


@pytest.fixture(scope="module")
def embedder(tiny_workdir) -> Embedder:
    return Embedder.from_pretrained(tiny_workdir, progress=False)


@pytest.fixture(scope="module")
def reference(embedder, corpus) -> np.ndarray:
    return embedder.encode_corpus(corpus[2])


def run_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`encode.main` in this process (JAX and the compiled shapes are shared), as a user sees it."""
    rc = encode.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def encode_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--input", str(corpus), "--out", str(out),
            "--shard-size", str(SHARD), *extra]


def read_all(folder: Path) -> tuple[list[str], np.ndarray]:
    shards = list(store.read_store(folder))
    return [i for ids, _ in shards for i in ids], np.concatenate([e for _, e in shards])


@pytest.fixture(scope="module")
def float32_store(tiny_workdir, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "f32"
    assert encode.main(encode_args(tiny_workdir, corpus[0], out)) == 0
    return out


# ---- the store, against NumPy ----------------------------------------------------------------


def test_writer_flushes_a_shard_every_n_rows_and_reads_back_in_order(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"id-{i}" for i in range(23)]
    vectors = rng.normal(size=(23, 6)).astype(np.float32)
    info = store.StoreInfo(count=23, shard_size=10, dtype="float32", source={"what": "test"})
    store.write_manifest(tmp_path, info)
    writer = store.StoreWriter(tmp_path, shard_size=10, dtype="float32")
    writer.append(ids[:7], vectors[:7])
    assert store.finished_shards(tmp_path) == []  # 7 of 10 rows: nothing written yet
    writer.append(ids[7:19], vectors[7:19])
    assert store.finished_shards(tmp_path) == [0] and writer.buffered == 9
    writer.append(ids[19:], vectors[19:])
    writer.flush()
    assert store.finished_shards(tmp_path) == [0, 1, 2]
    finished = store.finish_store(tmp_path)
    assert (finished.dim, finished.complete, finished.num_shards) == (6, True, 3)
    assert store.store_info(tmp_path) == finished
    shards = list(store.read_store(tmp_path))
    assert [len(i) for i, _ in shards] == [10, 10, 3]
    got_ids, got = read_all(tmp_path)
    assert got_ids == ids
    np.testing.assert_array_equal(got, vectors)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_dtypes_store_the_rounded_values(tmp_path, dtype):
    vectors = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    path = store.write_shard(tmp_path, 0, list("abcde"), vectors, dtype)
    ids, stored = store.read_shard(path)
    narrow = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    assert ids == list("abcde") and stored.dtype == narrow
    np.testing.assert_array_equal(stored, vectors.astype(narrow))


def test_a_writer_of_some_shards_seeks_to_them(tmp_path):
    """Two writers, one per process, each owning every other shard, make the store one does."""
    vectors = np.arange(50, dtype=np.float32).reshape(25, 2)
    ids = [str(i) for i in range(25)]
    store.write_manifest(tmp_path, store.StoreInfo(25, 10, "float32", {}))
    for owner in (0, 1):
        writer = store.StoreWriter(tmp_path, shard_size=10, dtype="float32")
        for shard in range(owner, 3, 2):
            writer.seek(shard)
            rows = slice(shard * 10, shard * 10 + 10)
            writer.append(ids[rows], vectors[rows])
        writer.flush()
    store.finish_store(tmp_path)
    got_ids, got = read_all(tmp_path)
    assert got_ids == ids
    np.testing.assert_array_equal(got, vectors)


def test_unfinished_and_broken_stores_are_refused(tmp_path):
    with pytest.raises(MissingPath, match="not an embedding store"):
        store.store_info(tmp_path)
    store.write_manifest(tmp_path, store.StoreInfo(25, 10, "float16", {}))
    store.write_shard(tmp_path, 0, [str(i) for i in range(10)], np.ones((10, 3)), "float16")
    # A kill in the middle of shard 1 leaves its temp file: not a finished shard.
    (tmp_path / ".shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    assert store.finished_shards(tmp_path) == [0]
    with pytest.raises(BadValue, match=r"not complete \(1 of 3 shards written\)"):
        list(store.read_store(tmp_path))
    with pytest.raises(BadValue, match="2 of 3 shards are not written yet"):
        store.finish_store(tmp_path)
    store.write_shard(tmp_path, 1, ["x"] * 10, np.ones((10, 3)), "float16")
    store.write_shard(tmp_path, 2, ["y"] * 4, np.ones((4, 3)), "float16")  # 5 rows are due
    with pytest.raises(BadValue, match="4 rows of F16, but the manifest says 5 of float16"):
        store.finish_store(tmp_path)
    (tmp_path / store.MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(BadValue, match="not a manifest of an embedding store"):
        store.store_info(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    store.remove_store(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---- the command -----------------------------------------------------------------------------


def test_corpus_store_equals_encode_corpus(float32_store, corpus, reference):
    info = store.store_info(float32_store)
    assert (info.count, info.num_shards, info.dim, info.complete) == (
        NUM_PASSAGES, 5, reference.shape[1], True
    )
    assert store.finished_shards(float32_store) == list(range(5))
    ids, embeddings = read_all(float32_store)
    assert ids == corpus[1]
    np.testing.assert_allclose(embeddings, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_store_is_the_embeddings_rounded(tiny_workdir, corpus, reference, tmp_path, dtype):
    out = tmp_path / dtype
    assert encode.main(encode_args(tiny_workdir, corpus[0], out, "--dtype", dtype)) == 0
    _, stored = store.read_shard(out / store.shard_name(0))
    assert stored.dtype == store.DTYPES[dtype]
    _, embeddings = read_all(out)
    eps = float(ml_dtypes.finfo(store.DTYPES[dtype]).eps)
    # Rounding to nearest is off by half an ulp at most, on top of the float32 noise.
    np.testing.assert_allclose(embeddings, reference, rtol=eps / 2 + 1e-5, atol=1e-6)


def test_queries_of_a_beir_folder_equal_encode_queries(tiny_workdir, embedder, tmp_path, capsys):
    beir = tmp_path / "beir"
    beir.mkdir()
    queries = [{"_id": f"q{i}", "text": f"where is the {w} near the river"}
               for i, w in enumerate(WORDS)]
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    examples = [{"query": "a coffee market", "response": "the island market sells coffee"}]
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    instruction = "Retrieve a passage that answers the question"
    result = run_cli(
        capsys, "--model", str(tiny_workdir), "--input", str(beir), "--out", str(tmp_path / "q"),
        "--kind", "queries", "--instruction", instruction,
        "--examples", str(tmp_path / "examples.json"), "--shard-size", "5",
    )
    assert result.returncode == 0, result.stderr
    assert "encoded 12 queries texts" in result.stdout
    ids, embeddings = read_all(tmp_path / "q")
    assert ids == [q["_id"] for q in queries]
    expected = embedder.encode_queries(
        [q["text"] for q in queries], instruction=instruction, examples=examples
    )
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)


# `encode` in a process that SIGKILLs itself half-way through writing shard 2: no Python cleanup
# runs (no `finally`, no atexit), as when the job is killed or the host dies.
KILLED_IN_SHARD_2 = """
import os, signal, sys
from pathlib import Path
from jax_iclemb import embedding_store, encode

write_shard = embedding_store.write_shard

def dies_in_shard_2(folder, index, *rest):
    if index == 2:
        (Path(folder) / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    return write_shard(folder, index, *rest)

embedding_store.write_shard = dies_in_shard_2
sys.exit(encode.main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_into_the_uninterrupted_store(
    tiny_workdir, corpus, float32_store, tmp_path, capsys
):
    out = tmp_path / "resumed"
    args = encode_args(tiny_workdir, corpus[0], out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SHARD_2, *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert (out / ".shard-00002.safetensors.tmp").read_bytes() == b"half a shard"
    assert store.finished_shards(out) == [0, 1] and not store.store_info(out).complete
    with pytest.raises(BadValue, match="not complete"):
        read_all(out)
    kept = {i: (out / store.shard_name(i)).stat() for i in (0, 1)}

    result = run_cli(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert "resuming: 2 of 5 shards already in" in result.stdout
    for i, before in kept.items():  # skipped, not written again
        after = (out / store.shard_name(i)).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in float32_store.iterdir())
    for name in [store.MANIFEST, *(store.shard_name(i) for i in range(5))]:
        assert (out / name).read_bytes() == (float32_store / name).read_bytes(), name


# ---- bad input -------------------------------------------------------------------------------


def test_bad_input_is_one_error_line_and_writes_nothing(tiny_workdir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n\n{"_id": "b", "text": "cut off\n')
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"_id": "a", "title": "t"}\n')
    cases = {
        "missing input": (encode_args(tiny_workdir, tmp_path / "nope.jsonl", out),
                          ["nope.jsonl: file not found"]),
        "BEIR folder without corpus.jsonl": (encode_args(tiny_workdir, tmp_path, out),
                                             ["corpus.jsonl: file not found"]),
        "malformed line": (encode_args(tiny_workdir, bad, out), [f"{bad}:3: not valid JSON"]),
        "record without text": (encode_args(tiny_workdir, no_text, out),
                                [f"{no_text}:1: field 'text' must be a string"]),
        "missing model": (encode_args(tmp_path / "no_model", corpus[0], out),
                          ["no_model: no such folder"]),
        "missing examples": ([*encode_args(tiny_workdir, corpus[0], out), "--kind", "queries",
                              "--instruction", "x", "--examples", str(tmp_path / "ex.json")],
                             ["ex.json: file not found"]),
    }
    for name, (args, needles) in cases.items():
        result = run_cli(capsys, *args)
        assert_user_error(result, *needles)
        assert not out.exists(), name


def test_an_out_folder_in_use_is_refused_and_kept(tiny_workdir, corpus, float32_store, tmp_path,
                                                  capsys):
    def files(folder: Path) -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}

    complete = files(float32_store)
    result = run_cli(capsys, *encode_args(tiny_workdir, corpus[0], float32_store))
    assert_user_error(result, "holds a complete store; pass --overwrite")
    assert files(float32_store) == complete

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_cli(capsys, *encode_args(tiny_workdir, corpus[0], foreign))
    assert_user_error(result, "holds no embedding store; pass --overwrite")

    killed_at_start = tmp_path / "killed"  # while writing the first manifest: start afresh
    killed_at_start.mkdir()
    (killed_at_start / ".manifest.json.tmp").write_text("{")
    info = store.store_info(float32_store)
    assert encode.check_out(killed_at_start, info, overwrite=False) is False

    other = tmp_path / "other"  # the unfinished store of another command: float16
    other.mkdir()
    store.write_manifest(other, store.StoreInfo(info.count, SHARD, "float16", info.source))
    # No shard written yet (a start that failed): the corrected command starts afresh.
    assert encode.check_out(other, info, overwrite=False) is False
    store.write_shard(other, 0, ["x"] * SHARD, np.ones((SHARD, 4)), "float16")
    before = files(other)
    result = run_cli(capsys, *encode_args(tiny_workdir, corpus[0], other))
    assert_user_error(result, "another command (dtype: 'float16', now 'float32')")
    assert files(other) == before


def test_the_command_line_answers_bad_input_without_loading_a_model(tmp_path):
    """As a user runs it: exit 2, one line, no traceback, before JAX is imported at all."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "fine"}\n{"_id": 7, "text": ["no"]}\n')
    code = (
        "import sys; from jax_iclemb.encode import main; rc = main(sys.argv[1:]); "
        "assert 'jax' not in sys.modules, 'JAX loaded'; sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--model", "m", "--input", str(bad), "--out",
         str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert_user_error(result, f"{bad}:2: field 'text' must be a string")
    assert not (tmp_path / "out").exists()
    usage = subprocess.run(
        [sys.executable, "-m", "jax_iclemb.encode", "--model", "m", "--input", str(bad), "--out",
         str(tmp_path / "out"), "--kind", "queries"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert "--kind queries needs --instruction" in usage.stderr


# ---- two processes ---------------------------------------------------------------------------


def test_two_processes_write_the_store_of_one(tiny_workdir, corpus, float32_store, tmp_path):
    """2 processes x 2 CPU devices (the explicit launcher's variables, as
    launch/local_multiprocess.sh sets them) against the in-process run on 8 devices."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jax_iclemb.encode",
             *encode_args(tiny_workdir, corpus[0], out)],
            env=dict(
                os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                XLA_FLAGS="--xla_force_host_platform_device_count=2",
            ),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]
    results = [finish(p) for p in procs]
    for rc, output in results:
        assert rc == 0, output[-4000:]
    assert "into 5 shards" in results[0][1] and "into 5 shards" not in results[1][1]
    assert store.store_info(out) == store.store_info(float32_store)
    ids, embeddings = read_all(out)
    want_ids, want = read_all(float32_store)
    assert ids == want_ids
    np.testing.assert_allclose(embeddings, want, rtol=1e-5, atol=1e-6)
