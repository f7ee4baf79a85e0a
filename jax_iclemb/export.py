"""`python -m jax_iclemb.export --workdir DIR --out OUT --format merged|peft [--step N]`

Turns a training workdir into Hugging Face weights: `merged` (LoRA folded into the base; loads in
`transformers.AutoModel` and sentence-transformers) or `peft` (an adapter for
`peft.PeftModel.from_pretrained` on the base). A run whose base was random-initialised has no base
on the Hub, so its `peft` export also writes that base, LoRA-free, into `OUT/base` (named relative
to the adapter). The exported tokenizer adds BOS/EOS the way training did, and its chat template
renders the training sequence (docs/export.md). `--overwrite` replaces an earlier export in OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import transformers

from jax_iclemb import model_card
from jax_iclemb.data.icl import chat_template, format_query
from jax_iclemb.errors import BadValue, PathExists, add_debug_flag, cli
from jax_iclemb.model import export_merged, export_peft
from jax_iclemb.model.hf import parse_size, remove_export
from jax_iclemb.model.trained import load_trained
from jax_iclemb.workdir import load_workdir_config

ST_MODULES = (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"))
ST_DIRS = tuple(path for path, _ in ST_MODULES[1:])
ST_FILES = (
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    *(f"{d}/config.json" for d in ST_DIRS),
)
BASE_DIR = "base"  # a random-init run's base, next to its PEFT adapter
CARD = "README.md"  # the model card, either format


def write_sentence_transformers_config(
    out: str | Path, *, hidden_size: int, max_seq_length: int, query_instruction: str
) -> None:
    """What `SentenceTransformer(out)` needs: the HF model, last-token pooling, normalisation.

    The `query` prompt is the head of the training query
    `<instruct>{instruction}\n<query>{query}\n<response>`: "<instruct>{instruction}\n<query>".
    Sentence-transformers prompts are prefixes only, so the "\n<response>" suffix comes from the
    exported tokenizer's chat template (`icl.chat_template`): the "message" modality makes
    sentence-transformers (>= 5.4) render every text, its prompt as a system message, through it.
    """
    out = Path(out)
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(ST_MODULES)
    ]
    pooling = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    contents = [
        modules,
        {
            "max_seq_length": max_seq_length,
            "do_lower_case": False,
            # Text goes through the tokenizer's chat template ("message"), as a prompt plus text.
            "transformer_task": "feature-extraction",
            "modality_config": {"text": forward, "message": {**forward, "format": "flat"}},
            "module_output_name": "token_embeddings",
        },
        {
            "model_type": "SentenceTransformer",
            "__version__": {"transformers": transformers.__version__},
            "prompts": {"query": format_query(query_instruction, ""), "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        pooling,
        {},
    ]
    for name, content in zip(ST_FILES, contents, strict=True):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2))


def export_tokenizer(
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> transformers.PreTrainedTokenizerBase:
    """A copy of the training tokenizer for an export: `tokenizer(text)` adds BOS/EOS as training
    did (`load_tokenizer` set that up), and the chat template renders the training sequence. The
    base's own chat template (Qwen's ChatML, Llama 3's headers) would otherwise wrap every text
    that sentence-transformers encodes."""
    if not tokenizer.is_fast:
        raise BadValue(
            f"the workdir's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: an "
            "export must append EOS through tokenizer.json"
        )
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = chat_template()
    return tokenizer


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, an OUT that holds files without --overwrite."""
    if out.exists() and not out.is_dir():
        raise PathExists(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PathExists(f"{out} is not empty; pass --overwrite to replace the export in it")


def remove_previous_export(out: Path) -> None:
    """What an earlier export of either format left in `out` (sentence-transformers modules, the
    base of a PEFT export); the weight files are removed by export_merged / export_peft."""
    for name in (*ST_FILES, CARD):
        (out / name).unlink(missing_ok=True)
    base = out / BASE_DIR
    if base.is_dir():
        remove_export(base)
    for folder in (*ST_DIRS, BASE_DIR):
        with contextlib.suppress(OSError):  # absent, or holds files that are not ours
            (out / folder).rmdir()


def peft_base(config: ml_collections.ConfigDict) -> str:
    """The adapter's base_model_name_or_path: the hub id or (absolute) folder the run started
    from, else BASE_DIR, relative to the adapter folder, so that the export can move."""
    hf_path = config.model.hf_path
    if not hf_path:
        return BASE_DIR
    return str(Path(hf_path).absolute()) if Path(hf_path).is_dir() else hf_path


@cli
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_iclemb.export", description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", choices=("merged", "peft"), default="merged")
    parser.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    parser.add_argument("--max-shard-size", default="5GB", type=parse_size)
    parser.add_argument("--overwrite", action="store_true")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    config = load_workdir_config(args.workdir)
    if args.format == "peft" and config.train.trainable == "all":
        raise BadValue(
            f"{args.workdir} trained every parameter (train.trainable='all'): it has no adapter; "
            f"export it with --format merged"
        )
    out = Path(args.out)
    check_out(out, args.overwrite)
    model, model_config, tokenizer, config, step = load_trained(args.workdir, args.step)
    tokenizer = export_tokenizer(tokenizer)
    if args.overwrite and out.is_dir() and jax.process_index() == 0:
        remove_previous_export(out)
    if args.format == "merged":
        export_merged(
            model, model_config, out, tokenizer=tokenizer,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        )
        if jax.process_index() == 0:
            write_sentence_transformers_config(
                out,
                hidden_size=model_config.hidden_size,
                # Embedder keeps few-shot examples whole in front of a query of query_max_len
                # tokens; sentence-transformers must not cut such an input (or its EOS).
                max_seq_length=min(model_config.max_position_embeddings, 8192),
                query_instruction=config.data.default_prompt,
            )
    else:
        base = peft_base(config)
        export_peft(
            model, model_config, out, base_model_name_or_path=base,
            revision=config.model.revision or None, tokenizer=tokenizer, overwrite=args.overwrite,
        )
        if base == BASE_DIR:
            export_merged(
                model, model_config, out / BASE_DIR, tokenizer=tokenizer, merge_lora=False,
                max_shard_size=args.max_shard_size,
            )
    if jax.process_index() == 0:
        card = model_card.render(
            fmt=args.format, base=config.model.hf_path, model_type=model_config.model_type,
            instruction=config.data.default_prompt, step=step, data=str(config.data.path),
        )
        card.save(out / CARD)
    print(f"exported step {step} of {args.workdir} as {args.format} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
