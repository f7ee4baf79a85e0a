"""Hugging Face import (safetensors -> sharded Decoder) and export (merged model, PEFT adapter).

Tensors stream one at a time in both directions: import reads each shard of each tensor straight
from a memory-mapped safetensors file into its device; export gathers one tensor to the host,
writes it and drops it. The safetensors container is read and written here directly because the
`safetensors` numpy API cannot represent bfloat16, the dtype of nearly every released checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from jax_iclemb.errors import BadValue, MissingPath, PathExists
from jax_iclemb.model.config import ModelConfig
from jax_iclemb.model.decoder import Decoder, layer_view, model_rngs, state_shardings
from jax_iclemb.model.lora import (
    FROZEN,
    TRAINABLE,
    Linear,
    LoraConfig,
    hf_tensors,
    is_stacked,
    load_lora_state,
    param_name,
)

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What export_merged / export_peft write besides weight shards (overwrite=True removes them).
EXPORT_FILES = (
    "config.json", INDEX_FILE, ADAPTER_FILE, ADAPTER_CONFIG,
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
)
_IGNORED = re.compile(r"^(lm_head\.weight|.*rotary_emb\.inv_freq)$")  # never needed by an embedder

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# ---- the safetensors container ----


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensor name -> read-only memory-mapped array (nothing is read until sliced)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = np.zeros(shape, dtype)
            continue
        flat = np.memmap(path, np.uint8, mode="r", offset=8 + header_len + begin, shape=end - begin)
        out[name] = flat.view(dtype).reshape(shape)
    return out


class _Tensor(NamedTuple):
    """A tensor to write: fetched (gathered to the host) only when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_safetensors(path: Path, tensors: list[_Tensor]) -> None:
    """Write `tensors`; each is fetched, written and dropped in turn."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            array = np.ascontiguousarray(t.fetch(), dtype=t.dtype)
            if array.shape != t.shape:
                raise ValueError(
                    f"tensor {t.name}: produced shape {array.shape}, declared {t.shape}"
                )
            f.write(array.tobytes())


# ---- import ----


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec: str | os.PathLike) -> bool:
    """Whether `spec`, no local folder, may name a Hugging Face Hub repository: "owner/name",
    and not a path into a local folder that exists (`runs/nope` when there is a `runs/`)."""
    path = Path(spec)
    return (
        _HUB_ID.fullmatch(str(spec)) is not None
        and ".." not in str(spec)
        and not path.exists()
        and not path.parent.exists()
    )


def _resolve(path_or_hub_id: str | os.PathLike) -> Path:
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if not is_hub_id(path_or_hub_id):
        raise MissingPath(
            f"{path_or_hub_id}: no such model folder (a folder with config.json and "
            f"*.safetensors, or a Hugging Face Hub id owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:
        # Any failure of the download (network, offline, no such repository) means the same.
        raise MissingPath(
            f"{path_or_hub_id}: no such folder, and the Hugging Face Hub download failed "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    return Path(folder)


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a folder's single-file or sharded safetensors checkpoint, memory-mapped."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {
            name: _read_safetensors(folder / name) for name in sorted(set(weight_map.values()))
        }
        return {key: files[name][key] for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return _read_safetensors(single)
    raise MissingPath(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _lookup(tensors: dict[str, np.ndarray], name: str, folder: Path) -> np.ndarray:
    for key in (name, "model." + name):
        if key in tensors:
            return tensors[key]
    raise KeyError(f"checkpoint {folder} lacks tensor {name!r} (also tried 'model.{name}')")


def _with_new_rows(table: np.ndarray, vocab_size: int) -> Callable[[tuple], np.ndarray]:
    """Slice reader for an embedding extended to `vocab_size` rows, new rows = mean of old rows."""
    base = table.shape[0]
    mean = table.astype(np.float64).mean(axis=0)

    def read(index: tuple) -> np.ndarray:
        rows, cols = range(vocab_size)[index[0]], index[1]
        old = table[rows.start : min(rows.stop, base), cols]
        new = np.broadcast_to(mean[cols], (max(rows.stop - max(rows.start, base), 0), old.shape[1]))
        return np.concatenate([old, new.astype(old.dtype)])

    return read


def _stacked_reader(layers: list[Callable[[tuple], np.ndarray]]) -> Callable[[tuple], np.ndarray]:
    """Slice reader for a stacked layer variable: the index's first entry picks layers, each
    filled in turn from its own checkpoint tensor (the host holds one device's shard)."""

    def read(index: tuple) -> np.ndarray:
        picked = range(len(layers))[index[0]]
        first = layers[picked[0]](index[1:])
        out = np.empty((len(picked), *first.shape), first.dtype)
        out[0] = first
        for j, i in enumerate(picked[1:], 1):
            out[j] = layers[i](index[1:])
        return out

    return read


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    *,
    lora: LoraConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "bfloat16",
    param_dtype: str = "bfloat16",
    vocab_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> tuple[Decoder, ModelConfig]:
    """A Decoder with a checkpoint's weights, streamed into their shards; LoRA adapters fresh.

    `vocab_size` (the tokenizer's length) larger than the checkpoint's appends embedding rows set to
    the mean of the existing rows. `options` are further ModelConfig fields (remat, attention, ...).
    """
    folder = _resolve(path_or_hub_id)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingPath(f"{folder}: config.json not found (not a Hugging Face model folder)")
    hf = json.loads(config_file.read_text())
    cfg = ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype, **options)
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        if vocab_size < cfg.vocab_size:
            raise BadValue(
                f"vocab_size={vocab_size} is smaller than the checkpoint's {cfg.vocab_size}"
            )
        cfg = cfg.replace(vocab_size=vocab_size, base_vocab_size=cfg.vocab_size)

    key = jax.random.key(seed)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, lora, rngs=model_rngs(key)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(abstract_state, mesh)
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(
            lambda v: v.replace(device),
            abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    flat_shardings = {p: v.get_value() for p, v in nnx.to_flat_state(shardings)}

    tensors = read_checkpoint(folder)
    used = set()
    base = {}
    for path, var in nnx.to_flat_state(nnx.filter_state(abstract_state, FROZEN)):
        shape, readers = var.get_value().shape, []
        for name, _, want in hf_tensors(path, shape):
            src = _lookup(tensors, name, folder)
            used.update({name, "model." + name})
            reader = lambda index, src=src: src[index]
            if name == "embed_tokens.weight" and cfg.base_vocab_size is not None:
                want, reader = (cfg.base_vocab_size, *want[1:]), _with_new_rows(src, cfg.vocab_size)
            if tuple(src.shape) != tuple(want):
                raise BadValue(
                    f"tensor {name!r} in {folder} has shape {tuple(src.shape)}, "
                    f"the model expects {tuple(want)}"
                )
            readers.append(lambda index, r=reader: np.asarray(r(index), dtype=cfg.weight_dtype))
        read = _stacked_reader(readers) if is_stacked(path) else readers[0]
        base[path] = var.replace(jax.make_array_from_callback(shape, flat_shardings[path], read))
    unused = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
    if unused:
        log.warning("ignoring %d checkpoint tensors not in the model: %s", len(unused), unused[:8])

    # Adapters and RNG state are initialised fresh; XLA drops the unused base-weight init.
    init = jax.jit(
        lambda k: nnx.state(Decoder(cfg, lora, rngs=model_rngs(k)), nnx.Not(FROZEN)),
        out_shardings=nnx.filter_state(shardings, nnx.Not(FROZEN)),
    )
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        rest = init(key)
    return nnx.merge(graphdef, nnx.from_flat_state(base), rest), cfg


# ---- export ----


def parse_size(size: int | str) -> int:
    """Bytes of a shard size: an int, or '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not match:
        raise BadValue(f"cannot parse max_shard_size {size!r} (e.g. '5GB', '500MB', 10**9)")
    unit = (match.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    return int(float(match.group(1)) * (1024 if "I" in unit else 1000) ** power)


def remove_export(folder: Path) -> None:
    """Delete the files an earlier export of either kind wrote into `folder` (nothing else): stale
    shards would load next to new ones, and a model config.json left beside an adapter makes the
    folder look like both."""
    for f in [*folder.glob("model*.safetensors"), *(folder / n for n in EXPORT_FILES)]:
        f.unlink(missing_ok=True)


def _prepare_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PathExists(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PathExists(
                f"{out} is not empty; pass overwrite=True (--overwrite) to write into it anyway"
            )
        remove_export(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _to_host(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_only(tensors: list[_Tensor]) -> bool:
    """On processes other than 0: take part in every gather, write nothing (returns True)."""
    if jax.process_index() == 0:
        return False
    for t in tensors:
        t.fetch()
    return True


def _module_at(model: nnx.Module, path: tuple) -> Any:
    node = model
    for p in path:
        node = getattr(node, p)
    return node


def _fetch_base(model: Decoder, path: tuple, layer: int | None, merge_lora: bool) -> np.ndarray:
    """One base tensor on the host (layer `layer` of a stacked one), its LoRA folded in."""
    owner = _module_at(model, path[:-1])
    if layer is not None:
        owner = layer_view(owner, layer)  # slices only this module's arrays
    adapted = isinstance(owner, Linear) and owner.lora_a is not None
    if merge_lora and adapted and path[-1] == "weight":
        return _to_host(owner.merged_weight())
    return _to_host(getattr(owner, path[-1]).get_value())


def _merged_tensors(model: Decoder, dtype: np.dtype, merge_lora: bool) -> Iterator[_Tensor]:
    """Every base weight under its HF name, with its LoRA folded in (unless `merge_lora` is
    False); fetched only when written."""
    for path, var in nnx.to_flat_state(nnx.state(model, FROZEN)):
        for name, layer, shape in hf_tensors(path, var.get_value().shape):
            fetch = functools.partial(_fetch_base, model, path, layer, merge_lora)
            yield _Tensor(name, shape, dtype, fetch)


def _write_sharded(out: Path, tensors: list[_Tensor], max_bytes: int) -> None:
    """One file, or HF-named shards of at most `max_bytes` each (a bigger tensor alone) + index."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        _write_safetensors(out / SINGLE_FILE, shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, shard)
        weight_map.update({t.name: fname for t in shard})
    total = sum(t.nbytes for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def export_merged(
    model: Decoder,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    dtype: str | None = None,
    merge_lora: bool = True,
) -> Path:
    """An HF base-model folder (for `AutoModel.from_pretrained`), LoRA folded into the weights.

    `merge_lora=False` writes the base alone (the base of a PEFT export of a random-init run).
    """
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    tensors = list(_merged_tensors(model, out_dtype, merge_lora))
    if _gather_only(tensors):
        return Path(out_dir)
    out = _prepare_dir(out_dir, overwrite)
    _write_sharded(out, tensors, parse_size(max_shard_size))
    hf = cfg.to_hf()
    hf["dtype"] = out_dtype.name
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _peft_name(path: tuple, layer: int | None) -> str:
    """PEFT's tensor name of an adapter (`layer`: its slice of a stacked one)."""
    which = {"lora_a": "lora_A", "lora_b": "lora_B"}[path[-1]]
    return f"base_model.model.{param_name(path[:-1], layer)}.{which}.weight"


def export_peft(
    model: Decoder,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """A PEFT LoRA adapter folder (task FEATURE_EXTRACTION) for `PeftModel.from_pretrained`.

    Embedding rows appended after import travel as PEFT trainable tokens (replacement rows), so
    the base model must first be resized to `cfg.vocab_size` (`resize_token_embeddings`).
    """
    lora = model.lora
    if lora is None:
        raise ValueError("export_peft needs a model with LoRA adapters (created with lora=...)")
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(model, TRAINABLE)):
        value = var.get_value()
        for _, layer, shape in hf_tensors(path, value.shape):
            fetch = lambda v=value, i=layer: _to_host(v if i is None else v[i])
            tensors.append(_Tensor(_peft_name(path, layer), shape, np.dtype(np.float32), fetch))
    adapter: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    if cfg.base_vocab_size is not None:
        new_rows = list(range(cfg.base_vocab_size, cfg.vocab_size))
        adapter["trainable_token_indices"] = {"embed_tokens": new_rows}
        table = model.embed_tokens.weight
        shape = (len(new_rows), cfg.hidden_size)
        fetch = lambda: _to_host(table.get_value())[cfg.base_vocab_size :]
        name = "base_model.model.embed_tokens.token_adapter.trainable_tokens_delta"
        tensors.append(_Tensor(name, shape, np.dtype(cfg.weight_dtype), fetch))
    if _gather_only(tensors):
        return Path(out_dir)
    out = _prepare_dir(out_dir, overwrite)
    _write_safetensors(out / ADAPTER_FILE, tensors)
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def resolve_base(adapter_dir: str | os.PathLike, base_model_name_or_path: str) -> str:
    """An adapter's base: a folder relative to the adapter folder (an export's "base", so that the
    export can move), else the name as written (an absolute folder, or a hub id)."""
    here = Path(adapter_dir) / base_model_name_or_path
    if not Path(base_model_name_or_path).is_absolute() and here.is_dir():
        return str(here)
    return base_model_name_or_path


def load_peft(
    folder: str | os.PathLike, *, vocab_size: int | None = None, **options: Any
) -> tuple[Decoder, ModelConfig]:
    """A base model (its `base_model_name_or_path`) with a PEFT LoRA adapter folder applied:
    the inverse of `export_peft`. `options` go to `load_pretrained` (dtype, mesh, ...)."""
    folder = Path(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    if adapter.get("peft_type") != "LORA":
        kind = adapter.get("peft_type")
        raise BadValue(f"{folder}: only LORA adapters are supported, got {kind!r}")
    lora = LoraConfig(
        rank=int(adapter["r"]),
        alpha=float(adapter["lora_alpha"]),
        dropout=float(adapter.get("lora_dropout", 0.0)),
        targets=tuple(adapter["target_modules"]),
    )
    model, cfg = load_pretrained(
        resolve_base(folder, adapter["base_model_name_or_path"]),
        lora=lora, vocab_size=vocab_size, **options,
    )
    tensors = _read_safetensors(folder / ADAPTER_FILE)
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(model, TRAINABLE)):
        layers = []
        for _, layer, _ in hf_tensors(path, var.get_value().shape):
            name = _peft_name(path, layer)
            if name not in tensors:
                raise KeyError(f"{folder / ADAPTER_FILE} lacks tensor {name!r}")
            layers.append(np.asarray(tensors[name]))
        arrays[path] = np.stack(layers) if is_stacked(path) else layers[0]
    load_lora_state(model, traverse_util.unflatten_dict(arrays))
    rows = (adapter.get("trainable_token_indices") or {}).get("embed_tokens")
    if rows:
        new = tensors["base_model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
        table = model.embed_tokens.weight
        value = table[...]
        table[...] = value.at[np.asarray(rows)].set(jnp.asarray(new, value.dtype))
    return model, cfg
