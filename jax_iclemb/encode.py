"""`python -m jax_iclemb.encode --model PATH --input FILE.jsonl|BEIR_DIR --out DIR`

Encodes a corpus (or queries) of any size into an embedding store (`jax_iclemb.embedding_store`:
shards of ids and vectors plus a manifest), reading the input as a stream, so host memory holds
one shard at most whatever the corpus size. A killed run is resumed by running the same command
again: the shards already written are kept and the others are encoded exactly as an uninterrupted
run would have. In a multi-process job every process encodes shards i with i % processes ==
its index on its own devices; process 0 marks the store complete. docs/encoding.md has the details.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from jax_iclemb.beir import EvalDataError, iter_texts, load_examples
from jax_iclemb.embedding_store import (
    DTYPES,
    MANIFEST,
    StoreInfo,
    StoreWriter,
    finish_store,
    finished_shards,
    is_temp,
    model_name,
    remove_store,
    store_info,
    write_manifest,
)
from jax_iclemb.errors import MissingPath, PathExists, add_debug_flag, cli

if TYPE_CHECKING:
    from jax_iclemb.embedder import Embedder

BEIR_FILES = {"corpus": "corpus.jsonl", "queries": "queries.jsonl"}  # a BEIR folder's, by --kind
SHARD_SIZE = 50_000  # default rows per shard: 400 MB of float16 at 4096 dimensions


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jax_iclemb.encode",
        description="Encode a JSONL corpus or queries into a folder of embedding shards.",
    )
    p.add_argument("--model", required=True,
                   help="a training workdir, a merged HF folder, a PEFT folder or a Hub id")
    p.add_argument("--input", required=True,
                   help='JSONL of {"_id", "text"[, "title"]}, or a BEIR folder')
    p.add_argument("--out", required=True, help="the store's folder")
    p.add_argument("--kind", choices=tuple(BEIR_FILES), default="corpus",
                   help="passages (raw text) or queries (instruction and examples first)")
    p.add_argument("--instruction", default=None,
                   help="the task instruction: required for queries; for a corpus, formats "
                        "passages as queries (symmetric tasks)")
    p.add_argument("--examples", default=None,
                   help='few-shot examples for queries: a JSON list of {"query", "response"}')
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="how the embeddings are stored")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="rows per shard")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step of a workdir (default: the latest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store in --out (complete, or of another command)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.kind == "queries" and args.instruction is None:
        p.error("--kind queries needs --instruction (the task's, as in training)")
    if args.examples and args.kind != "queries":
        p.error("--examples goes with --kind queries")
    return args


def input_file(path: str | Path, kind: str) -> Path:
    """The JSONL file to read: `path` itself, or a BEIR folder's file of `kind`."""
    path = Path(path)
    if path.is_dir():
        path = path / BEIR_FILES[kind]
    if not path.is_file():
        raise MissingPath(f"{path}: file not found")
    return path


def count_records(path: Path, kind: str) -> int:
    """Reads every record once, so that a malformed line fails before the model loads."""
    count = sum(1 for _ in iter_texts(path, with_title=kind == "corpus"))
    if not count:
        raise EvalDataError(f"{path}: no records")
    return count


def describe(args: argparse.Namespace, path: Path, examples: list[dict[str, str]]) -> dict:
    """What the store is of: a rerun resumes only a store of the same model, input and settings
    (the input's size and modification time stand for its content)."""
    stat = path.stat()
    return {
        "model": model_name(args.model),
        "step": args.step, "kind": args.kind,
        "input": str(path.absolute()), "input_bytes": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns, "instruction": args.instruction,
        "examples": examples,
    }


def difference(old: StoreInfo, new: StoreInfo) -> str | None:
    """The first setting in which two stores differ, as 'key: old, now new'; None if none."""
    pairs = [(k, getattr(old, k), getattr(new, k)) for k in ("count", "shard_size", "dtype")]
    pairs += [(k, old.source.get(k), v) for k, v in new.source.items()]
    return next((f"{k}: {a!r}, now {b!r}" for k, a, b in pairs if a != b), None)


def check_out(out: Path, info: StoreInfo, overwrite: bool) -> bool:
    """Whether to resume the unfinished store of this same command in `out`. Any other store
    with shards written, or files that are not a store, are refused unless `overwrite`; a store
    that a failed start left without shards is replaced. Nothing is changed here."""
    if out.exists() and not out.is_dir():
        raise PathExists(f"{out} exists and is not a folder")
    # A kill while the first manifest was written leaves its temp file alone: a fresh start.
    if not out.is_dir() or all(is_temp(p) for p in out.iterdir()) or overwrite:
        return False
    if not (out / MANIFEST).is_file():
        raise PathExists(f"{out} is not empty and holds no embedding store; pass --overwrite")
    old = store_info(out)
    if old.complete:
        raise PathExists(f"{out} holds a complete store; pass --overwrite to encode again")
    changed = difference(old, info)
    if changed and not finished_shards(out):
        return False  # a failed start (e.g. out of memory in the first chunk): nothing to lose
    if changed:
        raise PathExists(
            f"{out} holds the unfinished store of another command ({changed}); run that command "
            "again to finish it, or pass --overwrite"
        )
    return True


def shard_rows(
    records: Iterable[tuple[str, str]], shard_size: int
) -> Iterator[tuple[int, list[str], list[str]]]:
    """(shard, ids, texts) of each shard. A shard goes to the `Embedder` whole: it orders, packs
    and streams the texts itself, preparing the next calls while the devices run (a call per
    few thousand texts would end each one with part-filled calls and an idle host). Shards
    depend on the row order and the size alone, so a resumed run encodes a shard as an
    uninterrupted one did."""
    for shard, rows in itertools.groupby(enumerate(records), key=lambda r: r[0] // shard_size):
        batch = [record for _, record in rows]
        yield shard, [i for i, _ in batch], [t for _, t in batch]


def encode_shards(
    rows: Iterable[tuple[int, list[str], list[str]]],
    encode: Callable[[list[str]], np.ndarray],
    writer: StoreWriter,
    shards: set[int],
    bar: tqdm,
) -> None:
    """Encode and write the rows of `shards`, skipping the others' rows."""
    last = max(shards)
    for shard, ids, texts in rows:
        if shard > last:
            break
        if shard not in shards:
            continue
        writer.seek(shard)
        writer.append(ids, encode(texts))
        bar.update(len(ids))
    writer.flush()  # the input's last shard is short


def encoder(
    embedder: Embedder, args: argparse.Namespace, examples: list[dict[str, str]]
) -> Callable[[list[str]], np.ndarray]:
    if args.kind == "queries":
        return functools.partial(
            embedder.encode_queries, instruction=args.instruction, examples=examples
        )
    return functools.partial(embedder.encode_corpus, instruction=args.instruction)


def run(args: argparse.Namespace, path: Path, info: StoreInfo, resume: bool,
        examples: list[dict[str, str]]) -> StoreInfo | None:
    """Encode this process's shards into the store; process 0 returns the finished manifest."""
    import jax
    from jax.experimental import multihost_utils

    from jax_iclemb import distributed  # loads JAX: only once the input and --out are checked
    from jax_iclemb.embedder import Embedder, local_mesh  # the same

    def barrier(name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jax_iclemb.encode:{name}")

    distributed.initialize()
    # This host's devices only: processes encode different shards, so none may wait on another.
    # The Embedder's bar shows texts/s within a shard; the outer one counts finished shards.
    embedder = Embedder.from_pretrained(
        args.model, step=args.step, mesh=local_mesh(), progress=jax.process_index() == 0
    )
    out, process, processes = Path(args.out), jax.process_index(), jax.process_count()
    barrier("loaded")  # every process has checked --out before process 0 changes it
    if process == 0 and not resume:
        if out.is_dir():
            remove_store(out)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, info)
    barrier("ready")
    done = set(finished_shards(out))
    mine = {k for k in range(process, info.num_shards, processes) if k not in done}
    if process == 0 and done:
        print(f"resuming: {len(done)} of {info.num_shards} shards already in {out}", flush=True)
    if mine:
        records = ((i, t) for _, i, t in iter_texts(path, with_title=args.kind == "corpus"))
        writer = StoreWriter(out, shard_size=info.shard_size, dtype=info.dtype)
        total = sum(info.shard_rows(k) for k in mine)
        with tqdm(total=total, unit="text", desc="written", disable=process != 0) as bar:
            encode_shards(
                shard_rows(records, info.shard_size),
                encoder(embedder, args, examples), writer, mine, bar,
            )
    barrier("written")
    return finish_store(out) if process == 0 else None


@cli
def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    path = input_file(args.input, args.kind)
    examples = load_examples(args.examples) if args.examples else []
    info = StoreInfo(
        count=count_records(path, args.kind), shard_size=args.shard_size, dtype=args.dtype,
        source=describe(args, path, examples),
    )
    resume = check_out(Path(args.out), info, args.overwrite)
    finished = run(args, path, info, resume, examples)
    if finished is not None:
        print(
            f"encoded {finished.count} {args.kind} texts ({finished.dim} dimensions, "
            f"{finished.dtype}) into {finished.num_shards} shards in {args.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
