"""The configuration schema: defaults, `configs/*.py` loading, command-line overrides, validation.

A config file defines `get_config() -> ConfigDict`, usually `default_config()` with a few fields
changed. Overrides look like `--config.train.steps=20`; values are parsed as Python literals and
must have the type of the default. Every key that does not exist, and every value outside its
allowed set, stops with a message that names the key and what is allowed.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jax_iclemb.errors import BadValue

# The choice lists and defaults the model and optimizer check against live here, once: this
# module imports no JAX, so the CLIs validate a config before loading it.
DTYPES = ("bfloat16", "float32", "float16")
ATTENTION_MASKS = ("causal", "bidirectional")
ATTENTION_IMPLS = ("xla", "block_sparse", "pallas", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
INITS = ("normal", "fan_in")
POOLINGS = ("last_token", "mean")
TRAINABLE_MODES = ("lora", "all")  # the adapters only, or every parameter (from scratch)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECAYS = ("linear", "cosine", "constant")
# The optimizer's keys and defaults (paper: AdamW, lr 1e-4, 100 warm-up steps then linear decay,
# weight decay 0, clip 1.0).
OPTIM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "warmup_steps": 100,
    "decay": "linear",
    "end_lr_ratio": 0.0,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "grad_clip": 1.0,
    "accumulate_steps": 1,
}
# The Hugging Face config fields `ModelConfig.from_hf` reads (the rest of a config.json is
# ignored): what `model.arch` may hold.
HF_CONFIG_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "mlp_bias", "attention_bias", "use_sliding_window", "sliding_window", "rope_theta",
    "rope_parameters", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
    "max_position_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)

MISTRAL_7B_ARCH: dict[str, Any] = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Keys whose values must come from a fixed set.
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.on_bad_record": ("error", "skip"),
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.attention": ATTENTION_MASKS,
    "model.pooling": POOLINGS,
    "model.remat": REMAT_POLICIES,
    "model.attention_impl": ATTENTION_IMPLS,
    "model.init": INITS,
    "optim.decay": DECAYS,
    "train.trainable": TRAINABLE_MODES,
}

# Keys that must be positive (> 0) or non-negative (>= 0).
POSITIVE = (
    "data.query_max_len", "data.passage_max_len", "data.example_query_max_len",
    "data.example_passage_max_len", "data.train_group_size", "data.batch_size",
    "data.max_segments_per_row", "model.attention_block", "lora.rank", "loss.temperature",
    "optim.lr", "optim.accumulate_steps", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.grad_cache_chunks", "train.shape_plan_steps",
    "train.cpu_devices",
)
NON_NEGATIVE = (
    "data.max_examples", "data.examples_max_len", "data.pack_len", "data.min_pack_len",
    "data.batch_size_by_kind.retrieval", "data.batch_size_by_kind.symmetric", "lora.dropout",
    "loss.distill_weight",
    "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip", "train.steps", "eval.every",
    "train.compile_ahead", "train.compile_workers", "model.attention_tile_rungs",
)


def default_config() -> ml_collections.ConfigDict:
    """Every key the project reads, with the paper's recipe (`paper_recipe`'s docstring lists it)
    as the default values."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""  # HF folder or hub id; "" = random init from model.arch
    c.model.revision = ""  # branch, tag or commit of a hub id in hf_path; "" = main
    c.model.arch = ml_collections.ConfigDict(MISTRAL_7B_ARCH)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.attention = "causal"
    c.model.pooling = "last_token"
    c.model.remat = "full"
    # One compiled layer body run by lax.scan; False unrolls the layers (compile time grows with
    # the layer count). Same parameters and numbers either way (docs/performance.md).
    c.model.scan_layers = True
    # block_sparse | xla (dense mask) | pallas (GPU) | cudnn (GPU) | splash (TPU); docs/model.md
    c.model.attention_impl = "block_sparse"
    c.model.attention_block = 64  # block_sparse tile size; must divide the packed row length
    # block_sparse tile counts on a ladder of this many rungs per doubling (under 25% padding
    # tiles at 4); 0 pads every step to all the tiles its rows can need, so that its shape is the
    # row count alone: fewer compiles for more attention work (docs/performance.md).
    c.model.attention_tile_rungs = 4
    c.model.init = "normal"

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 64
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.lora.targets = LORA_TARGETS

    c.data = ml_collections.ConfigDict()
    c.data.path = "builtin"
    c.data.tfds_dir = ""
    c.data.on_bad_record = "error"
    c.data.tokenizer = "mistral-7b-v0.1"
    c.data.query_max_len = 2048
    c.data.passage_max_len = 512
    c.data.example_query_max_len = 256
    c.data.example_passage_max_len = 256
    c.data.train_group_size = 8
    c.data.max_examples = 5
    # Tokens a query's in-context examples may take together, with BOS and EOS (0: the default,
    # query_max_len - passage_max_len; the reference hard-codes query_max_len - 512, which is the
    # same at the paper's lengths: docs/data_pipeline.md).
    c.data.examples_max_len = 0
    c.data.batch_size = 512
    # By the task kind of a dataset's records (records.TASK_TYPES): retrieval (normal,
    # only_1neg) or symmetric (STS, classification, clustering); 0 = data.batch_size.
    c.data.batch_size_by_kind = ml_collections.ConfigDict({"retrieval": 0, "symmetric": 0})
    # Per dataset name (fnmatch patterns, the most specific wins): before the kinds' sizes.
    c.data.batch_size_overrides = ml_collections.ConfigDict()
    c.data.default_prompt = (
        "Given a web search query, retrieve relevant passages that answer the query."
    )
    c.data.pack_len = 0
    # A step packs into rows of pack_len, or of its half, quarter... down to this length: the
    # shortest that holds its longest sequence (short texts fill short rows). 0 = pack_len only.
    c.data.min_pack_len = 256
    c.data.max_segments_per_row = 128  # short passages: many per row

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.02
    c.loss.distill_weight = 0.0

    c.optim = ml_collections.ConfigDict(OPTIM_DEFAULTS)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # 0 = one epoch of the data
    c.train.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
    c.train.log_every = 1
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.trainable = "lora"  # "lora": adapters only; "all": every parameter (from scratch)
    # Gradient cache: the step's rows in this many chunks, activations of one chunk live at a
    # time (1 = off). Rows are padded to a multiple of chunks × data shards.
    c.train.grad_cache_chunks = 1
    # Compiled steps kept across runs: "" = $JAX_COMPILATION_CACHE_DIR or ~/.cache/jax_iclemb/xla,
    # "none" = off, else a folder (jax_iclemb/compile_cache.py).
    c.train.compilation_cache = ""
    # Steps whose batches are built ahead; their new shapes compile on background threads.
    c.train.compile_ahead = 4
    # Step shapes compiled at once (0 = one per 4 host cores, 1 to 4): a GPU host's cores compile
    # a cold run's shapes side by side; a small CPU host needs its cores for the steps.
    c.train.compile_workers = 0
    # Step shapes merge when the compiles they save outweigh the padding they add over the run,
    # weighed on its first `shape_plan_steps` steps, a compile taken to cost as much as computing
    # `compile_cost_tokens` token slots on one accelerator, or on the whole CPU host (-1: by
    # platform, 32k on CPUs, 128k on accelerators; 0: every step at its own ladder shape;
    # jax_iclemb/shape_plan.py). Short runs compile fewer shapes; long ones keep them all.
    c.train.compile_cost_tokens = -1
    c.train.shape_plan_steps = 64
    # The train command sets glibc's malloc to keep freed memory, so that each CPU step reuses its
    # buffers' pages: faster steps, slower compiles (for long CPU runs; jax_iclemb/host_memory.py).
    c.train.reuse_host_memory = False
    # XLA's Triton matmuls on GPUs: faster steps, ~3x slower compiles of each step shape
    # (jax_iclemb/xla_flags.py); the train command's default leaves them to cuBLAS.
    c.train.gpu_triton_gemm = False
    # XLA devices the train command splits a CPU host into (at most one per usable core), the
    # rows split over them: each runs its share's small ops on its own core (xla_flags.py).
    c.train.cpu_devices = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.data = ""
    c.eval.instruction = ""
    c.eval.examples = ""

    # Weights & Biases, besides metrics.jsonl and TensorBoard (pip install 'jax_iclemb[wandb]').
    c.log = ml_collections.ConfigDict()
    c.log.wandb = False
    c.log.wandb_project = "jax_iclemb"
    c.log.wandb_entity = ""  # "" = the account's default entity
    c.log.wandb_run_name = ""  # "" = the workdir's name
    return c


class ConfigError(BadValue):
    """A config key that does not exist or a value it does not allow; the message names both."""


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(key: str, allowed: Sequence[str], what: str = "Keys here") -> ConfigError:
    """The error for an unknown key: the closest allowed one, and all of them."""
    hint = _did_you_mean(key.rpartition(".")[2], allowed) or "."
    return ConfigError(f"unknown config key {key!r}{hint} {what}: {', '.join(sorted(allowed))}")


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def _parse_value(key: str, text: str, default: Any) -> Any:
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"--config.{key}={text!r}: not a Python literal ({e})") from None
    if isinstance(default, bool) != isinstance(value, bool):
        raise ConfigError(f"--config.{key}: expected {type(default).__name__}, got {text!r}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(
            f"--config.{key}: expected {type(default).__name__}, "
            f"got {type(value).__name__} {text!r}"
        )
    return value


def _literal_or_text(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `--config.a.b=value` (or `a.b=value`) overrides in place."""
    for raw in overrides:
        item = raw.removeprefix("--").removeprefix("config.")
        if "=" not in item:
            raise ConfigError(f"override {raw!r} must look like --config.KEY=VALUE")
        key, text = item.split("=", 1)
        parent_key, _, leaf = key.rpartition(".")
        parent = config
        for part in parent_key.split(".") if parent_key else ():
            if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
                sections = [k for k, v in parent.items() if isinstance(v, type(config))]
                hint = _did_you_mean(part, sections)
                raise ConfigError(f"unknown config key {key!r}: no section {part!r}{hint}")
            parent = parent[part]
        if leaf not in parent:
            # Free-form sections (per-dataset batch sizes, HF architecture fields) accept new keys.
            if parent_key in ("data.batch_size_overrides", "model.arch"):
                parent[leaf] = _literal_or_text(text)
                continue
            raise _unknown_key(key, list(parent.keys()))
        parent[leaf] = _parse_value(key, text, parent[leaf])


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the whole config against the schema of `default_config()`."""
    schema = _flat_keys(default_config())
    values = _flat_keys(config)
    for key in config.model.arch:
        if key not in HF_CONFIG_KEYS:
            raise _unknown_key(
                f"model.arch.{key}", HF_CONFIG_KEYS,
                "model.arch holds the Hugging Face config fields the decoder reads",
            )
    for key, value in values.items():
        free = key.startswith(("model.arch.", "data.batch_size_overrides."))
        if key not in schema and not free:
            section = key.rpartition(".")[0]
            siblings = [k.rpartition(".")[2] for k in schema if k.rpartition(".")[0] == section]
            raise _unknown_key(key, siblings or sorted({k.split(".")[0] for k in schema}))
        default = schema.get(key)
        if free or default is None or isinstance(value, type(default)):
            continue
        if not (isinstance(default, float) and isinstance(value, int)):
            raise ConfigError(f"config key {key!r} must be {type(default).__name__}, got {value!r}")
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise ConfigError(f"config key {key!r} is {values[key]!r}; allowed: {allowed}")
    for key in POSITIVE:
        if not values[key] > 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {values[key]!r}")
    for key in NON_NEGATIVE:
        if not values[key] >= 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {values[key]!r}")
    if not 0 <= config.optim.end_lr_ratio <= 1:
        raise ConfigError(f"optim.end_lr_ratio must be in [0, 1], got {config.optim.end_lr_ratio}")
    if config.train.compile_cost_tokens < -1:
        raise ConfigError(
            "train.compile_cost_tokens must be -1 (by platform), 0 (no shape plan) or a token "
            f"count, got {config.train.compile_cost_tokens}"
        )
    if len(config.train.mesh) != 3:
        raise ConfigError(f"train.mesh must be (data, fsdp, tensor), got {config.train.mesh}")
    for name, size in config.data.batch_size_overrides.items():
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(f"data.batch_size_overrides[{name!r}] must be a positive int")
    if config.model.revision and (not config.model.hf_path or Path(config.model.hf_path).is_dir()):
        raise ConfigError(
            f"model.revision={config.model.revision!r} pins a Hugging Face Hub id in "
            f"model.hf_path, which is {config.model.hf_path!r} (a local folder has no revisions)"
        )
    if config.eval.every and not config.eval.data:
        raise ConfigError("eval.every > 0 needs eval.data (a BEIR-format folder)")
    if config.data.passage_max_len > config.data.query_max_len:
        raise ConfigError("data.passage_max_len must not exceed data.query_max_len")
    rungs = config.model.attention_tile_rungs
    if rungs & (rungs - 1):
        raise ConfigError(f"model.attention_tile_rungs must be 0 or a power of two, got {rungs}")
    row_len = config.data.pack_len or config.data.query_max_len
    if config.model.attention_impl == "block_sparse" and row_len % config.model.attention_block:
        raise ConfigError(
            f"model.attention_impl='block_sparse' cuts packed rows into tiles of "
            f"model.attention_block={config.model.attention_block} tokens: the row length "
            f"(data.pack_len, or data.query_max_len when it is 0) = {row_len} must be a multiple"
        )


def recipe_names() -> list[str]:
    """The recipes shipped with the package (the repository's configs/, `jax_iclemb.configs`)."""
    return sorted(p.stem for p in _recipe_dir().glob("*.py") if not p.stem.startswith("_"))


def _recipe_dir() -> Path:
    spec = importlib.util.find_spec("jax_iclemb.configs")
    if spec is None:  # a source checkout on sys.path, not installed: configs/ beside the package
        return Path(__file__).resolve().parents[1] / "configs"
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file: an existing path, else a shipped recipe's name (`tiny`, `tiny.py`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = _recipe_dir() / f"{path.stem}.py"
    if path.parent == Path() and path.suffix in ("", ".py") and recipe.is_file():
        return recipe
    raise ConfigError(
        f"config file {name_or_path} does not exist and is not a recipe name "
        f"(recipes: {', '.join(recipe_names())})"
    )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `get_config()` from a Python file or a shipped recipe's name, apply overrides,
    validate."""
    path = resolve_config_path(path)
    spec = importlib.util.spec_from_file_location(f"_jax_iclemb_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    config = module.get_config()
    apply_overrides(config, overrides)
    validate(config)
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    """The inverse of `to_json`, validated. JSON has no tuples: lists become tuples where the
    schema has them. Keys added to the schema after the file was written get their defaults, so
    older workdirs still load."""
    raw = json.loads(text)
    for key, default in _flat_keys(default_config()).items():
        if key.startswith("model.arch."):  # free-form (an HF config): never fill it in
            continue
        section, _, leaf = key.rpartition(".")
        parent = raw
        for part in section.split(".") if section else ():
            parent = parent.setdefault(part, {})
        value = parent.setdefault(leaf, default)
        if isinstance(default, tuple) and isinstance(value, list):
            parent[leaf] = tuple(value)
    config = ml_collections.ConfigDict(raw)
    validate(config)
    return config


def paper_recipe(hf_path: str, tokenizer: str) -> ml_collections.ConfigDict:
    """The bge-en-icl recipe (the paper's hyperparameters) for a Hugging Face base model.

    LoRA rank 64 / alpha 32 / dropout 0.1 on all projections; τ = 0.02; group size 8; 0–5
    in-context examples; query 2048 / passage 512 / example 256+256 tokens; lr 1e-4 with 100
    warm-up steps and linear decay; AdamW without weight decay; clip 1.0; one epoch; batch 512 for
    retrieval datasets and 256 for the others, by the task kind of each dataset's records
    (`records.TASK_TYPES`), whatever its file name. Parameters are sharded over all devices (FSDP).
    """
    c = default_config()
    c.model.hf_path = hf_path
    c.data.tokenizer = tokenizer
    c.data.path = "data/bge-icl-train"  # a directory of reference-format JSONL datasets
    c.data.batch_size = 256
    c.data.batch_size_by_kind.retrieval = 512
    c.train.mesh = (1, -1, 1)
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    return c
