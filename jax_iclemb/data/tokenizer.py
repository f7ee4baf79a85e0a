"""Tokenizer loading: the built-in offline Mistral vocabulary, or any Hugging Face tokenizer.

Every tokenizer gets the three ICL special tokens (`<instruct>`, `<query>`, `<response>`), pads
on the left, and (when fast) adds BOS/EOS to `tokenizer(text)` the way training sequences get them.
Training itself assembles sequences (BOS/EOS, truncation) on token ids in `icl.py`, not here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import transformers
from tokenizers import processors

from jax_iclemb.errors import BadValue

MISTRAL_V01 = "mistral-7b-v0.1"
ICL_SPECIAL_TOKENS = ("<instruct>", "<query>", "<response>")
_RECIPE = "sentencepiece-legacy+bos+eos+icl-tokens"


def cache_dir() -> Path:
    """Where converted tokenizers are kept ($JAX_ICLEMB_CACHE, else ~/.cache/jax_iclemb)."""
    root = os.environ.get("JAX_ICLEMB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jax_iclemb"
    )
    return Path(root)


def _mistral_v01_dir() -> Path:
    """A folder with the converted Mistral-7B-v0.1 tokenizer, built once from mistral-common.

    Converting the SentencePiece model to a fast tokenizer takes seconds, so the result (with the
    special tokens already added) is saved, keyed by the model file's hash. The folder is written
    under a temporary name and renamed, so concurrent processes never see a half-written one.
    """
    model = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not model.is_file():
        raise FileNotFoundError(f"mistral-common does not ship {model}; is it installed?")
    blob = model.read_bytes()
    # The key covers the conversion recipe too, so changing it never reuses a stale folder.
    digest = hashlib.sha256(blob + _RECIPE.encode()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / f"{MISTRAL_V01}-{digest}"
    if (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "tokenizer.model").write_bytes(blob)
        # Default ("legacy") SentencePiece mode, as in the published Mistral/bge-en-icl
        # tokenizer.json: every text run between special tokens gets the "▁" word prefix.
        tok = transformers.AutoTokenizer.from_pretrained(
            src, add_bos_token=True, add_eos_token=True
        )
        add_icl_tokens(tok)
        out = Path(tmp) / "out"
        tok.save_pretrained(out)
        try:
            out.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "tokenizer_config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                raise
    return target


def add_icl_tokens(tok: transformers.PreTrainedTokenizerBase) -> None:
    missing = [t for t in ICL_SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})


def add_training_special_tokens(tok: transformers.PreTrainedTokenizerBase) -> None:
    """Make `tok(text)` give BOS (when the tokenizer has one) + ids + EOS, as `icl.py` builds every
    training sequence, by setting the post-processor of the fast tokenizer's backend (saved in
    tokenizer.json, which transformers 5 reads instead of add_bos_token/add_eos_token flags).

    Base tokenizers differ: Mistral adds BOS only, Llama 3 adds BOS only, Qwen adds neither; an
    embedder read at EOS needs EOS on every sequence, whoever tokenizes it. `tok` is fast and
    has an EOS token (`load_tokenizer` checks both).
    """
    specials = [(tok.eos_token, tok.eos_token_id)]
    bos = ""
    if tok.bos_token_id is not None:
        specials.insert(0, (tok.bos_token, tok.bos_token_id))
        bos = f"{tok.bos_token} "
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}$A {tok.eos_token}",
        pair=f"{bos}$A {tok.eos_token} {bos}$B:1 {tok.eos_token}:1",
        special_tokens=specials,
    )


def _auto_tokenizer(spec: str | Path) -> transformers.PreTrainedTokenizerBase:
    """What `AutoTokenizer.from_pretrained(spec)` loads. A folder whose `tokenizer_config.json`
    names a class that transformers exports is loaded through that class directly: AutoTokenizer's
    imports pull in torch when it is installed (seconds at every start of a JAX program)."""
    config = Path(spec) / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase):
        return cls.from_pretrained(spec)
    return transformers.AutoTokenizer.from_pretrained(spec)


def load_tokenizer(spec: str) -> transformers.PreTrainedTokenizerBase:
    """`"mistral-7b-v0.1"` (offline, from mistral-common), an HF tokenizer folder, or a hub id."""
    if spec == MISTRAL_V01:
        tok = _auto_tokenizer(_mistral_v01_dir())
    else:
        try:
            tok = _auto_tokenizer(spec)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadValue(
                f"cannot load tokenizer {spec!r}: not {MISTRAL_V01!r}, a tokenizer folder, or a "
                f"hub id available offline ({reason})"
            ) from err
    add_icl_tokens(tok)
    if tok.eos_token_id is None:
        raise BadValue(f"tokenizer {spec!r} has no EOS token; the embedding is read at EOS")
    if tok.is_fast:  # a slow tokenizer still trains: `icl.py` adds BOS/EOS on ids
        add_training_special_tokens(tok)
    if tok.pad_token is None:
        # Mistral/Llama have no pad token; <unk> (id 0) is what the reference pads with.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "left"
    # save_pretrained writes the init kwargs: a saved (exported) tokenizer pads left too.
    tok.init_kwargs["padding_side"] = "left"
    return tok
