"""A trained workdir -> Embedder, merged / PEFT export, and the PyTorch tools that load them.

References: the model run on one sequence at a time (no packing, no batching); torch
`transformers` with the published model-card recipe (left padding, last token, normalise);
`peft` on the torch base; `sentence-transformers` on the merged folder. Exports are checked for
all four families: the Mistral run of conftest (random base, the real Mistral tokenizer) and runs
on tiny random Llama-3-, Qwen2- and Qwen3-shaped checkpoints whose tokenizers are built here,
offline, with each family's special tokens and BOS/EOS conventions.
"""

import json
import re
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import REPO, TINY_OVERRIDES
from test_embedder import alone
from test_model_parity import save_torch_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jax_iclemb.config import load_config
from jax_iclemb.data.icl import (
    encode_inference_query,
    encode_passage,
    format_inference_query,
    format_query,
)
from jax_iclemb.embedder import Embedder
from jax_iclemb.export import main as export_main
from jax_iclemb.model.trained import load_trained
from jax_iclemb.train import run

INSTRUCTION = "Given a question about a person, retrieve the fact that answers it."
EXAMPLES = [
    {"query": "Where does Ana Lopez live?", "response": "Ana Lopez lives in Porto."},
    {"query": "What is Bo Chen's job?", "response": "Bo Chen works as a baker."},
]
QUERIES = ["Which city is home to Carla Diaz?", "Who is the pilot?", "Name the dog of Eve Kim."]
PASSAGES = ["Carla Diaz lives in Lyon.", "Tom is a pilot with a very long career " * 3, "A dog."]


@pytest.fixture(scope="module")
def embedder(tiny_workdir):
    return Embedder.from_pretrained(tiny_workdir, progress=False)


def test_embedder_equals_unbatched_model(tiny_workdir, embedder):
    model, *_ = load_trained(tiny_workdir)
    model.eval()
    tok = embedder.tokenizer
    got, texts = [], []
    for examples in ((), EXAMPLES):
        got.append(embedder.encode_queries(QUERIES, instruction=INSTRUCTION, examples=examples))
        texts += [format_inference_query(q, instruction=INSTRUCTION, examples=examples)
                  for q in QUERIES]
    corpus = embedder.encode_corpus(PASSAGES)
    got.append(corpus)
    want = alone(model, [tok(t).input_ids for t in texts + PASSAGES], "last_token")
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5)
    assert corpus.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(corpus, axis=1), 1.0, rtol=1e-5)


def test_examples_change_the_query_embedding(embedder):
    zero = embedder.encode_queries(QUERIES, instruction=INSTRUCTION)
    few = embedder.encode_queries(QUERIES, instruction=INSTRUCTION, examples=EXAMPLES)
    assert np.abs(zero - few).max() > 1e-3


def test_order_is_kept_and_similar_calls_do_not_recompile(embedder):
    texts = [f"text number {i} " * (1 + i % 7) for i in range(40)]
    forward = embedder.encode_corpus(texts)
    compiled = embedder._embed._cache_size()
    backward = embedder.encode_corpus(texts[::-1])
    np.testing.assert_allclose(backward[::-1], forward, atol=1e-6)
    embedder.encode_corpus([t + " more" for t in texts[:25]])
    assert embedder._embed._cache_size() == compiled


def torch_model_card(model, tokenizer, texts):
    """The published bge-en-icl recipe: left padding, last-token pooling, L2 normalisation."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).numpy()


def assert_same_directions(got, want, min_cosine=0.9999):
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert (got * want).sum(-1).min() >= min_cosine


# ---- family-shaped tokenizers and runs ----

# family -> (special tokens, bos, eos, pad) as the Llama-3.1 base and Qwen2.5 / Qwen3 tokenizer
# configs name them; Qwen3's chat models end with <|im_end|>, its base models with <|endoftext|>.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FAMILY_TOKENS = {
    "llama": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
         "<|end_header_id|>"),
        "<|begin_of_text|>", "<|end_of_text|>", None,
    ),
    "qwen2": (QWEN_SPECIALS, None, "<|endoftext|>", "<|endoftext|>"),
    "qwen3": (QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>"),
}
CHAT_TEMPLATES = {  # abridged; what matters is that they wrap text in chat markup
    "llama": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}",
    "qwen": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}",
}
CORPUS = [INSTRUCTION, *QUERIES, *PASSAGES, *(e[k] for e in EXAMPLES for k in e)]


def family_tokenizer(family: str) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with the family's special tokens and post-processor: Llama 3
    adds BOS and no EOS; Qwen (class Qwen2Tokenizer) has no BOS token and adds nothing."""
    specials, bos, eos, pad = FAMILY_TOKENS[family]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS, trainer)
    if family == "llama":
        core.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, core.token_to_id(bos))],
            ),
        ])
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token=bos, eos_token=eos
        )
        tok.chat_template = CHAT_TEMPLATES["llama"]
        return tok
    bpe = json.loads(core.to_str())["model"]
    tok = transformers.Qwen2Tokenizer(
        vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], bos_token=bos,
        eos_token=eos, pad_token=pad, unk_token=None,
        additional_special_tokens=[t for t in specials if t not in (eos, pad)],
    )
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.chat_template = CHAT_TEMPLATES["qwen"]
    return tok


def train_on_base(base, workdir) -> None:
    """One step of the tiny recipe from an HF folder (the base checkpoint and its tokenizer).
    Longer budgets than TINY_OVERRIDES': the small byte-level BPE spends a token on almost every
    character, and the built-in data's prompts must fit (the pipeline refuses them otherwise)."""
    lengths = [f"--config.data.{key}={n}" for key, n in (
        ("query_max_len", 384), ("passage_max_len", 96), ("example_query_max_len", 128),
        ("example_passage_max_len", 96), ("pack_len", 384),
    )]
    config = load_config(
        REPO / "configs" / "tiny.py",
        [*TINY_OVERRIDES, *lengths, "--config.train.steps=1", "--config.optim.warmup_steps=0",
         f"--config.model.hf_path={base}", f"--config.data.tokenizer={base}"],
    )
    run(config, workdir)


HF_FAMILIES = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=["mistral", *HF_FAMILIES])
def family_run(request, tmp_path_factory):
    """A trained workdir of the family, its merged export, and an Embedder that truncates nothing
    here (so that the references can tokenize whole strings)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = None
    if family == "mistral":
        workdir = request.getfixturevalue("tiny_workdir")
    else:
        base, workdir = root / "base", root / "workdir"
        tok = family_tokenizer(family)
        tok.save_pretrained(base)
        save_torch_checkpoint(
            family, base, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        train_on_base(base, workdir)
    merged = root / "merged"
    assert export_main(["--workdir", str(workdir), "--out", str(merged)]) == 0
    embedder = Embedder.from_pretrained(
        workdir, query_max_len=512, passage_max_len=512, progress=False
    )
    instruction = json.loads((workdir / "config.json").read_text())["data"]["default_prompt"]
    return SimpleNamespace(
        family=family, base=base, workdir=workdir, merged=merged, embedder=embedder,
        instruction=instruction,
    )


def training_ids(run_, queries=QUERIES, instruction=INSTRUCTION, examples=EXAMPLES):
    """Ids the training code builds for these queries (with examples) and PASSAGES."""
    emb = run_.embedder
    return [
        encode_inference_query(
            emb.tokenizer, q, instruction=instruction, examples=examples,
            max_len=emb.query_max_len,
        )
        for q in queries
    ], [encode_passage(emb.tokenizer, p, max_len=emb.passage_max_len) for p in PASSAGES]


def unpadded(batch) -> list[list[int]]:
    return [
        [int(t) for t, m in zip(ids, mask, strict=True) if m]
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def test_exported_tokenizer_adds_bos_and_eos_as_training_did(family_run):
    queries, passages = training_ids(family_run)
    formatted = [
        format_inference_query(q, instruction=INSTRUCTION, examples=EXAMPLES) for q in QUERIES
    ]
    tok = transformers.AutoTokenizer.from_pretrained(family_run.merged)
    assert tok.padding_side == "left"
    assert [tok(t).input_ids for t in formatted] == queries
    assert [tok(t).input_ids for t in PASSAGES] == passages
    for side in ("left", "right"):
        tok.padding_side = side
        assert unpadded(tok([*formatted, *PASSAGES], padding=True)) == queries + passages
    if family_run.base is not None:  # the family's own tokenizer does not end with EOS
        base = transformers.AutoTokenizer.from_pretrained(family_run.base)
        assert base(PASSAGES[0]).input_ids[-1] != tok.eos_token_id


def test_merged_export_in_transformers_and_sentence_transformers(family_run):
    from sentence_transformers import SentenceTransformer

    emb, merged = family_run.embedder, family_run.merged
    formatted = [
        format_inference_query(q, instruction=INSTRUCTION, examples=EXAMPLES) for q in QUERIES
    ]
    few_shot = emb.encode_queries(QUERIES, instruction=INSTRUCTION, examples=EXAMPLES)
    corpus = emb.encode_corpus(PASSAGES)
    zero_shot = emb.encode_queries(QUERIES, instruction=family_run.instruction)

    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModel.from_pretrained(merged, dtype=torch.float32).eval()
    assert_same_directions(torch_model_card(model, tokenizer, formatted), few_shot)
    assert_same_directions(torch_model_card(model, tokenizer, PASSAGES), corpus)

    st = SentenceTransformer(str(merged), device="cpu")
    assert_same_directions(st.encode(PASSAGES), corpus)
    assert_same_directions(st.encode(formatted), few_shot)  # ends with the suffix: not added again
    assert_same_directions(st.encode(QUERIES, prompt_name="query"), zero_shot)
    assert_same_directions(st.encode_query(QUERIES), zero_shot)
    # The prompt renders exactly the training sequence, suffix and EOS included.
    want, _ = training_ids(family_run, instruction=family_run.instruction, examples=())
    assert unpadded(st.preprocess(QUERIES, prompt=st.prompts["query"])) == want
    # The checks above can fail: the suffix and the EOS each move the embedding.
    no_suffix = [emb.tokenizer(format_query(family_run.instruction, q)).input_ids for q in QUERIES]
    no_eos = [ids[:-1] for ids in want]
    for wrong in (no_suffix, no_eos):
        assert ((emb.encode_ids(wrong) * zero_shot).sum(-1) < 0.9999).all()


def peft_export(workdir, out, *extra) -> dict:
    args = ["--workdir", str(workdir), "--out", str(out), "--format", "peft", *extra]
    assert export_main(args) == 0
    return json.loads((out / "adapter_config.json").read_text())


def peft_model_card(base, adapter, texts):
    from peft import PeftModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)
    model = transformers.AutoModel.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))  # a no-op for an exported base
    return torch_model_card(PeftModel.from_pretrained(model, adapter).eval(), tokenizer, texts)


@pytest.mark.parametrize("family_run", HF_FAMILIES, indirect=True)
def test_peft_export_of_a_run_from_an_hf_folder(family_run, tmp_path):
    adapter = peft_export(family_run.workdir, tmp_path / "adapter")
    assert adapter["base_model_name_or_path"] == str(family_run.base.absolute())
    assert not (tmp_path / "adapter" / "base").exists()
    got = peft_model_card(family_run.base, tmp_path / "adapter", PASSAGES)
    assert_same_directions(got, family_run.embedder.encode_corpus(PASSAGES))


def test_peft_export_moves_with_its_base(tiny_workdir, embedder, tmp_path):
    """A random-init run: the adapter names its base "base", relative to itself; re-exporting
    with --overwrite works, and the moved folder still loads."""
    out = tmp_path / "adapter"
    for _ in range(2):
        adapter = peft_export(tiny_workdir, out, "--overwrite")
    assert adapter["base_model_name_or_path"] == "base"
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.move(out, moved)
    want = embedder.encode_corpus(PASSAGES)
    assert_same_directions(peft_model_card(moved / "base", moved, PASSAGES), want)
    again = Embedder.from_pretrained(moved, progress=False)  # resolves "base" next to the adapter
    np.testing.assert_allclose(again.encode_corpus(PASSAGES), want, atol=1e-5)


def test_overwrite_replaces_an_export_of_either_format(tiny_workdir, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "out"
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(out)]) == 0
    merged_files = {p.relative_to(out) for p in out.rglob("*")}
    peft_export(tiny_workdir, out, "--overwrite")
    left = {p.name for p in out.iterdir()}
    assert not left & {"config.json", "model.safetensors", "modules.json", "1_Pooling"}
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(out), "--overwrite"]) == 0
    assert {p.relative_to(out) for p in out.rglob("*")} == merged_files  # no adapter, no base/
    assert SentenceTransformer(str(out), device="cpu").encode(PASSAGES).shape[0] == len(PASSAGES)


def test_export_refuses_bad_input_with_a_message(tiny_workdir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    missing = tmp_path / "new"
    assert export_main(["--workdir", str(tmp_path / "nowhere"), "--out", str(missing)]) == 2
    assert "not a training workdir" in capsys.readouterr().err
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(missing), "--step", "99"]) == 2
    assert "no checkpoint for step 99" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not missing.exists()
    assert jax.device_count() == 8


def card_code_blocks(card_text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card_text, flags=re.S)


def test_model_card_loads_and_its_usage_code_reproduces_the_embedder(tiny_workdir, tmp_path):
    """The merged export's README.md is a Hub model card, and its two snippets (run as written,
    the path filled in) embed as `Embedder` does, zero- and few-shot."""
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer

    from jax_iclemb.model_card import MODEL_PATH

    out = tmp_path / "merged"
    assert export_main(["--workdir", str(tiny_workdir), "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "feature-extraction"
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["model_type"] == "SentenceTransformer"
    SentenceTransformer(str(out), device="cpu")  # the folder loads with the card in it

    emb = Embedder.from_pretrained(tiny_workdir, query_max_len=512, progress=False)
    instruction = json.loads((tiny_workdir / "config.json").read_text())["data"]["default_prompt"]
    query = "how do I reset my password?"
    document = "Open Settings, then Account, then Reset password."
    example = {"query": "where is my order?", "response": "Track it under Orders in your account."}
    zero = emb.encode_queries([query], instruction=instruction)
    few = emb.encode_queries([query], instruction=instruction, examples=[example])
    st_block, hf_block = (b.replace(MODEL_PATH, str(out)) for b in card_code_blocks(card.text))
    names: dict = {"print": lambda *a: None}
    exec(st_block, names)
    assert_same_directions(names["queries"], zero)
    assert_same_directions(names["documents"], emb.encode_corpus([document]))
    assert_same_directions(names["model"].encode([names["few_shot"]]), few)
    names = {}
    exec(hf_block, names)
    assert_same_directions(names["embeddings"].numpy(), zero)
    assert (zero * few).sum() < 0.9999  # the examples move the embedding: the check can fail
