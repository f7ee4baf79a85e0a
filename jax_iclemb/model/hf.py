"""Hugging Face import (safetensors -> sharded Decoder) and export (merged model, PEFT adapter).

Import reads each shard of each tensor lazily from its safetensors file straight into its device;
export gathers tensors to the host one file (a shard, at most `max_shard_size`) at a time. Hub ids
are downloaded with `huggingface_hub`, only the files that loading needs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safetensors' numpy API returns)
import numpy as np
import transformers
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jax_iclemb.errors import BadValue, MissingPath, PathExists
from jax_iclemb.model.config import FAMILIES, ModelConfig
from jax_iclemb.model.decoder import (
    Decoder,
    abstract_model,
    layer_view,
    model_rngs,
    shardings_of,
)
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

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What export_merged / export_peft write besides weight shards (overwrite=True removes them).
EXPORT_FILES = (
    CONFIG_FILE, INDEX_FILE, ADAPTER_FILE, ADAPTER_CONFIG,
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
)
# What a Hub download fetches before the weights: the configs, and the tokenizer of any family.
HUB_META_FILES = (
    CONFIG_FILE, INDEX_FILE, ADAPTER_CONFIG,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
)
_IGNORED = re.compile(r"^(lm_head\.weight|.*rotary_emb\.inv_freq)$")  # never needed by an embedder
_COMMIT = re.compile(r"[0-9a-f]{40}")


# ---- the safetensors container ----


def _open_safetensors(path: Path) -> dict[str, Any]:
    """Tensor name -> lazy slice (`get_shape()`; nothing is read until it is indexed)."""
    with safe_open(path, framework="np") as f:
        # safe_open is not iterable; its slices outlive the handle.
        return {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118


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
    """Write `tensors` to one file, with the `{"format": "pt"}` metadata transformers expects.

    safetensors has no streaming writer (it serialises arrays that are all in memory), so the host
    holds one file's tensors at once: `_write_sharded` bounds that by the shard size.
    """
    arrays = {}
    for t in tensors:
        array = np.ascontiguousarray(t.fetch(), dtype=t.dtype)
        if array.shape != t.shape:
            raise ValueError(f"tensor {t.name}: produced shape {array.shape}, declared {t.shape}")
        arrays[t.name] = array
    save_file(arrays, path, metadata={"format": "pt"})


# ---- the Hugging Face Hub ----


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


def _snapshot(hub_id: str, files: list[str], revision: str | None, token: str | None) -> Path:
    try:
        folder = huggingface_hub.snapshot_download(
            hub_id, revision=revision, token=token, allow_patterns=files
        )
    except Exception as e:
        # Any failure of the download (network, offline, no such repository) means the same.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingPath(
            f"{hub_id}: no such folder, and the Hugging Face Hub download failed ({reason})"
        ) from e
    return Path(folder)


def _weight_files(folder: Path) -> list[str]:
    """The weight files a downloaded config names: an adapter's (with the folder of a relative
    base, which `resolve_base` looks for), the shards of the index, or the single file."""
    if (folder / ADAPTER_CONFIG).is_file():
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        relative = base and not Path(base).is_absolute() and ".." not in Path(base).parts
        return [ADAPTER_FILE, f"{base}/*"] if relative else [ADAPTER_FILE]
    if (folder / INDEX_FILE).is_file():
        return sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
    return [SINGLE_FILE]


def download(hub_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local snapshot of a Hub model or PEFT adapter repository with only what loading needs:
    configs and tokenizer, then the weights they name, not every *.safetensors of the repository
    (consolidated or duplicate copies). `revision`: a branch, tag or commit; `token`: None uses
    the logged-in token or $HF_TOKEN."""
    folder = _snapshot(hub_id, list(HUB_META_FILES), revision, token)
    # The cache names a snapshot by its commit: fetch the weights of that same commit, even if
    # the branch moves between the two calls.
    commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
    return _snapshot(hub_id, _weight_files(folder), commit, token)


def resolve_folder(
    path_or_hub_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> Path:
    """A local model or adapter folder as it is, else the Hub download of that id."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if not is_hub_id(path_or_hub_id):
        raise MissingPath(
            f"{path_or_hub_id}: no such model folder (a folder with config.json and "
            f"*.safetensors, or a Hugging Face Hub id owner/name)"
        )
    return download(str(path_or_hub_id), revision=revision, token=token)


# ---- import ----


def read_hf_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json as transformers reads it (older keys such as `rope_scaling`
    normalised, the family's defaults filled in)."""
    if not (folder / CONFIG_FILE).is_file():
        hint = (
            " (it is a PEFT adapter: load it with load_peft)"
            if (folder / ADAPTER_CONFIG).is_file()
            else " (not a Hugging Face model folder)"
        )
        raise MissingPath(f"{folder}: {CONFIG_FILE} not found{hint}")
    try:
        return transformers.AutoConfig.from_pretrained(folder).to_dict()
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadValue(
            f"{folder / CONFIG_FILE}: transformers cannot read it ({reason}); "
            f"supported model types: {sorted(FAMILIES)}"
        ) from e


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Every tensor of a folder's single-file or sharded safetensors checkpoint, as a lazy slice."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {
            name: _open_safetensors(folder / name) for name in sorted(set(weight_map.values()))
        }
        return {key: files[name][key] for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return _open_safetensors(single)
    raise MissingPath(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _lookup(tensors: dict[str, Any], name: str, folder: Path) -> Any:
    for key in (name, "model." + name):
        if key in tensors:
            return tensors[key]
    raise MissingPath(f"checkpoint {folder} lacks tensor {name!r} (also tried 'model.{name}')")


def _with_new_rows(table: Any, vocab_size: int) -> Callable[[tuple], np.ndarray]:
    """Slice reader for an embedding (a lazy slice) extended to `vocab_size` rows, new rows = mean
    of old rows."""
    base = table.get_shape()[0]
    mean = np.mean(table[...], axis=0, dtype=np.float64)

    def read(index: tuple) -> np.ndarray:
        rows, cols = range(vocab_size)[index[0]], index[1]
        old = table[min(rows.start, base) : min(rows.stop, base), cols]
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
    revision: str | None = None,
    token: str | None = None,
    **options: Any,
) -> tuple[Decoder, ModelConfig]:
    """A Decoder with a checkpoint's weights, streamed into their shards; LoRA adapters fresh.

    `vocab_size` (the tokenizer's length) larger than the checkpoint's appends embedding rows set to
    the mean of the existing rows. `revision`/`token` are for a Hub id (`download`). `options` are
    further ModelConfig fields (remat, attention, ...).
    """
    folder = resolve_folder(path_or_hub_id, revision=revision, token=token)
    cfg = pretrained_config(
        folder, vocab_size=vocab_size, dtype=dtype, param_dtype=param_dtype, **options
    )
    return load_weights(folder, cfg, lora=lora, mesh=mesh, seed=seed), cfg


def pretrained_config(
    folder: Path, *, vocab_size: int | None = None, **options: Any
) -> ModelConfig:
    """The settings of the model in `folder` (a local folder: `resolve_folder`), with `options`
    (dtypes, remat, attention, ...) and a `vocab_size` grown to the tokenizer's length."""
    cfg = ModelConfig.from_hf(read_hf_config(folder), **options)
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        if vocab_size < cfg.vocab_size:
            raise BadValue(
                f"vocab_size={vocab_size} is smaller than the checkpoint's {cfg.vocab_size}"
            )
        cfg = cfg.replace(vocab_size=vocab_size, base_vocab_size=cfg.vocab_size)
    return cfg


def checkpoint_readers(folder: Path, cfg: ModelConfig) -> dict[tuple, Callable]:
    """A reader of each base weight's checkpoint data (index -> array of `cfg.weight_dtype`),
    by its state path in the Decoder `cfg`: every tensor's name and shape are checked here, and
    nothing is read yet (safetensors' headers only)."""
    abstract_state = nnx.state(abstract_model(cfg), FROZEN)
    tensors = read_checkpoint(folder)
    used, out = set(), {}
    for path, var in nnx.to_flat_state(abstract_state):
        readers = []
        for name, _, want in hf_tensors(path, var.get_value().shape):
            src = _lookup(tensors, name, folder)
            used.update({name, "model." + name})
            reader = lambda index, src=src: src[index]
            if name == "embed_tokens.weight" and cfg.base_vocab_size is not None:
                want, reader = (cfg.base_vocab_size, *want[1:]), _with_new_rows(src, cfg.vocab_size)
            if tuple(src.get_shape()) != tuple(want):
                raise BadValue(
                    f"tensor {name!r} in {folder} has shape {tuple(src.get_shape())}, "
                    f"the model expects {tuple(want)}"
                )
            readers.append(lambda index, r=reader: np.asarray(r(index), dtype=cfg.weight_dtype))
        out[path] = _stacked_reader(readers) if is_stacked(path) else readers[0]
    unused = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
    if unused:
        log.warning("ignoring %d checkpoint tensors not in the model: %s", len(unused), unused[:8])
    return out


def load_weights(
    folder: Path,
    cfg: ModelConfig,
    *,
    lora: LoraConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    readers: dict[tuple, Callable] | None = None,
) -> Decoder:
    """The Decoder `cfg` (`pretrained_config(folder)`) with the weights of `folder`, streamed into
    their shards; LoRA adapters fresh (`load_pretrained`). `readers`: `checkpoint_readers(folder,
    cfg)`, when the caller checked the checkpoint already."""
    key = jax.random.key(seed)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, lora, mesh))
    # Without a mesh, on the default device.
    shardings = shardings_of(abstract_state, default=SingleDeviceSharding(jax.devices()[0]))
    flat_shardings = {p: v.get_value() for p, v in nnx.to_flat_state(shardings)}
    if readers is None:
        readers = checkpoint_readers(folder, cfg)
    base = {
        path: var.replace(jax.make_array_from_callback(
            var.get_value().shape, flat_shardings[path], readers[path]
        ))
        for path, var in nnx.to_flat_state(nnx.filter_state(abstract_state, FROZEN))
    }

    # Adapters and RNG state are initialised fresh; XLA drops the unused base-weight init.
    init = jax.jit(
        lambda k: nnx.state(Decoder(cfg, lora, rngs=model_rngs(k)), nnx.Not(FROZEN)),
        out_shardings=nnx.filter_state(shardings, nnx.Not(FROZEN)),
    )
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        rest = init(key)
    return nnx.merge(graphdef, nnx.from_flat_state(base), rest)


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
    fields = {**cfg.to_hf(), "dtype": out_dtype.name}
    transformers.AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(out)
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
    revision: str | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """A PEFT LoRA adapter folder (task FEATURE_EXTRACTION) for `PeftModel.from_pretrained`.
    `revision` pins a Hub base (PEFT's field of that name, which `load_peft` reads too).

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
        "revision": revision,
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
    path_or_hub_id: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    revision: str | None = None,
    token: str | None = None,
    **options: Any,
) -> tuple[Decoder, ModelConfig]:
    """A base model (its `base_model_name_or_path`) with a PEFT LoRA adapter folder or Hub id
    applied: the inverse of `export_peft`. `revision` is the adapter repository's; the base's is
    the adapter config's `revision` (PEFT's field), if any. `options` go to `load_pretrained`
    (dtype, mesh, ...)."""
    folder = resolve_folder(path_or_hub_id, revision=revision, token=token)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise MissingPath(f"{folder}: {ADAPTER_CONFIG} not found (not a PEFT adapter)")
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
        lora=lora, vocab_size=vocab_size, revision=adapter.get("revision"), token=token, **options,
    )
    tensors = _open_safetensors(folder / ADAPTER_FILE)
    arrays = {}
    for path, var in nnx.to_flat_state(nnx.state(model, TRAINABLE)):
        layers = []
        for _, layer, _ in hf_tensors(path, var.get_value().shape):
            name = _peft_name(path, layer)
            if name not in tensors:
                raise KeyError(f"{folder / ADAPTER_FILE} lacks tensor {name!r}")
            layers.append(tensors[name][...])
        arrays[path] = np.stack(layers) if is_stacked(path) else layers[0]
    load_lora_state(model, traverse_util.unflatten_dict(arrays))
    rows = (adapter.get("trainable_token_indices") or {}).get("embed_tokens")
    if rows:
        new = tensors["base_model.model.embed_tokens.token_adapter.trainable_tokens_delta"][...]
        table = model.embed_tokens.weight
        value = table[...]
        table[...] = value.at[np.asarray(rows)].set(jnp.asarray(new, value.dtype))
    return model, cfg
